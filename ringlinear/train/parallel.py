"""Processes, devices and FSDP2 sharding.

Launched by torchrun, each process joins the group of the environment (NCCL on GPUs, gloo on CPUs);
alone, it makes a group of one. The model is sharded with `fully_shard` per decoder layer and at
the root: parameters, gradients and AdamW state stay fp32 and sharded; each layer all-gathers its
parameters in `param_dtype` to compute and reduce-scatters gradients in fp32. A single process
computing in fp32 has nothing to shard or cast, and keeps the plain module.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..model import RingLinearForCausalLM


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU; a process of torchrun takes the GPU of its LOCAL_RANK."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", name):
        raise ValueError(f"invalid --device {name!r}: expected cpu, cuda, cuda:N or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but there are {torch.cuda.device_count()} GPUs here")
        torch.cuda.set_device(device)
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """The torchrun group (or a group of one), torn down on the way out if it was made here."""
    made = not dist.is_initialized()
    if made:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if made:
            dist.destroy_process_group()


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


Recompute = Literal["all", "elementwise"]  # train.config.RECOMPUTE
# What "elementwise" recompute keeps from the forward: the products and the attention, where the
# FLOPs are; the backward recomputes norms, activations, RoPE, routing and casts, which are cheap but
# hold most of a layer's activation memory (the report's state-aware recompute). Lightning's Triton
# kernel is no aten op: it is recomputed.
KEPT_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_grouped_mm", "_scaled_mm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward") if hasattr(torch.ops.aten, name))


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def parallelize(model: RingLinearForCausalLM, world: World, param_dtype: torch.dtype,
                checkpoint_every: int, recompute: Recompute = "all") -> RingLinearForCausalLM:
    """Activation checkpointing on every `checkpoint_every`-th layer (0: none), recomputing all of
    its forward or its elementwise ops only (`KEPT_OPS`), then FSDP2."""
    layers = list(model.model.layers)
    if checkpoint_every:
        options = {} if recompute == "all" else {
            "context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_products)}
        for layer in layers[checkpoint_every - 1::checkpoint_every]:
            checkpoint(layer, **options)
    if world.size == 1 and param_dtype == torch.float32:
        return model
    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        if hasattr(layer, "final_layernorm"):  # an MTP layer's output norm runs outside its forward
            fully_shard(layer.final_layernorm, mesh=mesh, mp_policy=policy)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In place over all processes (a no-op alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def full_norm(norm: Tensor) -> float:
    """The gradient norm `clip_grad_norm_` returns, as a number (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
