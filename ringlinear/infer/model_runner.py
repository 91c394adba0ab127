"""The model runner: a scheduled step's inputs on the device, the forward against the paged cache,
and decode and verify steps replayed from CUDA graphs. It owns the cache tensors and takes the scheduler's
cache decisions (new slots and pages, restored, forked and saved states) from each step's output;
it changes no sequence."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..model import RingLinearForCausalLM
from ..ops.policy import KernelPolicy
from .cache import CacheSize, PagedCache
from .context import PagedContext, StepBatch
from .graphs import Shape, StepGraphs
from .scheduler import SchedulerOutput

StepHook = Callable[[SchedulerOutput, StepBatch], None]


@dataclass
class StepResult:
    logits: Tensor  # [rows: one per sampling chunk, every row of a verify chunk, V] fp32
    hidden_states: Tensor | None  # [T, hidden] after the final norm, when asked or a chunk wants prompt log-probs


class ModelRunner:
    def __init__(self, model: RingLinearForCausalLM, size: CacheSize, policy: KernelPolicy, cuda_graphs: bool,
                 max_num_seqs: int, max_num_batched_tokens: int, verify_shapes: tuple[Shape, ...] = ()):
        """`cuda_graphs`: capture decode steps of up to `max_num_seqs` sequences, and verify steps of
        each draft-tree shape in `verify_shapes` that fit `max_num_batched_tokens` (the caller checks
        that the forward never waits for the host under `policy`)."""
        param = next(model.parameters())
        self.model, self.policy = model, policy
        self.cache = PagedCache(model.config, size, param.device, param.dtype)
        self.graphs = StepGraphs(model, self.cache, max_num_seqs, policy, ((), *verify_shapes),
                                 max_num_batched_tokens) if cuda_graphs else None
        self._step_hooks: OrderedDict[int, StepHook] = OrderedDict()  # weakly referenced by the handles
        self._verifying: PagedContext | None = None  # the last step's, while its verify chunks wait for `fold`
        self._fold_replays = False  # the last step replayed a graph, and so does its fold

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
    def execute(self, output: SchedulerOutput, hidden_states: bool = False) -> StepResult:
        """Run one scheduled step: its logits, and its hidden states if asked (the MTP drafter reads
        them) or prompt log-probs are. A step with verify chunks waits for `fold`."""
        self.cache.apply_before(output.changes)
        batch = StepBatch.build(output.chunks, self.cache)
        for hook in self._step_hooks.values():
            hook(output, batch)
        needs_prompt_logprobs = any(chunk.prompt_logprob_positions() for chunk in output.chunks)
        wants_hidden = hidden_states or needs_prompt_logprobs
        plan = None if self.graphs is None or needs_prompt_logprobs else self.graphs.plan(output.chunks)
        self._fold_replays = plan is not None
        if plan is not None:
            logits, hidden, context = self.graphs.run(plan, output.chunks, batch)
            result = StepResult(logits, hidden if hidden_states else None)
        else:
            batch = batch.to(self.cache.device)
            context = PagedContext(self.cache, batch, self.policy)
            out = self.model(batch.input_ids[None], context=context, logits_indices=batch.logits_indices)
            result = StepResult(out.logits[0], out.hidden_states[0] if wants_hidden else None)
        self._verifying = context if batch.num_verifies else None
        # single-token chunks run the decode kernel, which updates the slots in place (in a padded verify
        # step, a replayed fold does): their snapshots are the slots' states after the step (a longer
        # chunk's come from its rounds)
        saved = [(chunk.seq.slot, snapshot) for chunk in output.chunks if chunk.num_tokens == 1
                 for _, snapshot in chunk.snapshots]
        if saved:
            self.cache.save_snapshots(*zip(*saved))
        self.cache.apply_after(output.changes)
        return result

    def fold(self, output: SchedulerOutput, accepted: list[list[int]]) -> None:
        """The accepted path of each of the last step's verify chunks (its draft nodes, root to leaf,
        in the order of `output.verifies`) into the Lightning states and to consecutive positions of
        the pages."""
        if self._verifying is not None:
            sizes = [chunk.num_tokens for chunk, _ in output.verifies]
            (self.graphs if self._fold_replays else self._verifying).fold(sizes, accepted)
            self._verifying = None
