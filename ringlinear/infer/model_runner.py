"""The model runner: a scheduled step's inputs on the device, the forward against the paged cache,
and decode steps replayed from CUDA graphs. It owns the cache tensors and takes the scheduler's
cache decisions (new slots, new pages) from each step's output; it changes no sequence."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..model import RingLinearForCausalLM
from ..ops.policy import KernelPolicy
from .cache import CacheSize, PagedCache
from .context import PagedContext, StepBatch
from .graphs import DecodeGraphs
from .scheduler import SchedulerOutput

StepHook = Callable[[SchedulerOutput, StepBatch], None]


class ModelRunner:
    def __init__(self, model: RingLinearForCausalLM, size: CacheSize, policy: KernelPolicy, cuda_graphs: bool,
                 max_num_seqs: int):
        """`cuda_graphs`: capture decode steps of up to `max_num_seqs` sequences (the caller checks that
        the forward never waits for the host under `policy`)."""
        param = next(model.parameters())
        self.model, self.policy = model, policy
        self.cache = PagedCache(model.config, size, param.device, param.dtype)
        self.graphs = DecodeGraphs(model, self.cache, max_num_seqs, policy) if cuda_graphs else None
        self._step_hooks: OrderedDict[int, StepHook] = OrderedDict()  # weakly referenced by the handles

    def register_step_hook(self, hook: StepHook) -> RemovableHandle:
        """Call `hook(scheduler_output, batch)` before every forward, with the step's host inputs:
        row t of the packed forward is token `batch.positions[t]` of the sequence of the chunk whose
        rows `batch.query_start` places it in, and the rows `batch.logits_indices` get logits. The
        alignment probe keys the module outputs its forward hooks see by it. Steps that replay a CUDA
        graph run no module forward."""
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = hook
        return handle

    @torch.no_grad()
    def execute(self, output: SchedulerOutput) -> Tensor:
        """Logits [sampled sequences, V] fp32 of one scheduled step."""
        self.cache.apply(output.new_slots, output.new_pages)
        batch = StepBatch.build(output.chunks, self.cache)
        for hook in self._step_hooks.values():
            hook(output, batch)
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        batch = batch.to(self.cache.device)
        context = PagedContext(self.cache, batch, self.policy)
        return self.model(batch.input_ids[None], context=context, logits_indices=batch.logits_indices).logits[0]
