"""The kernel policy's rule table (`ops.policy`), row by row, as its docstring states it: for tensors
on the CPU and on CUDA (stand-ins that carry a device, dtype and shape, which is all the table reads),
fast and invariant, each backend."""

import math

import pytest
import torch

from ringlinear.ops.batch_invariant import numerics
from ringlinear.ops.policy import (COMPILE_MIN_ELEMENTS, KernelPolicy, causal_attention_kernel, compiles_chain,
                                   experts_kernel, lightning_fold_kernel, lightning_kernel, lightning_tree_kernel,
                                   paged_attention_kernel, triton_installed)

pytestmark = pytest.mark.skipif(not triton_installed(), reason="the table's Triton rows need Triton installed")


class Stand:
    """What the rule table reads of a tensor."""

    def __init__(self, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, shape=(1, 4096, 16, 128)):
        self.device, self.dtype, self.shape, self.is_cuda = torch.device(device), dtype, shape, device == "cuda"

    def numel(self) -> int:
        return math.prod(self.shape)


def row(policy: KernelPolicy, x: Stand) -> tuple:
    """Every op's choice for activations like x."""
    return (lightning_kernel(policy, x), causal_attention_kernel(policy, x, x, x, packed=False),
            causal_attention_kernel(policy, x, x, x, packed=True), paged_attention_kernel(policy, x, x),
            experts_kernel(policy, x, x), compiles_chain(policy, x))


REFERENCES = ("chunked_reference", "sdpa", "sdpa", "gather_reference", "loop", False)


def test_the_cpu_runs_the_references_by_default():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert row(KernelPolicy(), Stand("cpu", dtype)) == REFERENCES
    assert KernelPolicy().resolve("cpu") == KernelPolicy("torch")


def test_cuda_runs_the_kernels_and_pytorchs_fast_paths_by_default():
    policy = KernelPolicy().resolve("cuda")
    assert policy == KernelPolicy("triton")
    for p in (KernelPolicy(), policy):
        assert row(p, Stand()) == ("chunk", "sdpa", "flash_varlen", "paged", "grouped_mm", True)
    small = Stand(shape=(1, 8, 16, 128))  # a decode step: launch-bound, so not compiled
    assert not compiles_chain(policy, small) and COMPILE_MIN_ELEMENTS > small.numel()
    fp32 = Stand(dtype=torch.float32)  # torch._grouped_mm and FlashAttention take half precision only
    assert row(policy, fp32) == ("chunk", "sdpa", "sdpa", "paged", "loop", True)


def test_the_torch_backend_is_the_references_everywhere_even_on_cuda():
    assert row(KernelPolicy("torch"), Stand()) == REFERENCES


def test_float64_and_unsupported_head_sizes_take_the_references():
    assert row(KernelPolicy("triton"), Stand(dtype=torch.float64))[:4] == REFERENCES[:4]
    assert lightning_kernel(KernelPolicy("triton"), Stand(shape=(1, 64, 4, 32))) == "chunked_reference"
    assert paged_attention_kernel(KernelPolicy("triton"), Stand(shape=(64, 4, 32)), Stand()) == "paged"
    for page, kernel in ((8, "gather_reference"), (16, "paged"), (48, "gather_reference"), (64, "paged")):
        assert paged_attention_kernel(KernelPolicy("triton"), Stand(), Stand(shape=(9, page, 2, 128))) == kernel


def test_invariant_mode_takes_the_fixed_order_forms():
    assert row(KernelPolicy(invariant=True), Stand()) == (
        "recurrent", "key_blocks", "key_blocks", "key_blocks", "invariant_grouped_mm", False)
    for device in ("cpu", "cuda"):
        assert row(KernelPolicy("torch", invariant=True), Stand(device)) == (
            "recurrent_reference", "key_blocks_reference", "key_blocks_reference", "key_blocks", "loop", False)


def test_the_triton_backend_on_the_cpu_interprets_the_kernels_but_no_cuda_fast_path():
    policy = KernelPolicy("triton")
    assert row(policy, Stand("cpu", torch.float32)) == ("chunk", "sdpa", "sdpa", "paged", "loop", False)
    assert row(KernelPolicy("triton", invariant=True), Stand("cpu", torch.float32)) == (
        "recurrent", "key_blocks", "key_blocks", "key_blocks", "invariant_grouped_mm", False)


def test_mixed_dtypes_take_the_references_and_a_bad_backend_is_named():
    assert not KernelPolicy("triton").triton(Stand(dtype=torch.bfloat16), Stand(dtype=torch.float32))
    with pytest.raises(ValueError, match="backend must be one of"):
        KernelPolicy("cuda")


def test_numerics_switch_the_generic_ops_only_inside_and_only_when_invariant():
    """Under the invariant policy's numerics a row's product does not depend on the rows with it (the
    CPU's BLAS takes another kernel for 1 row than for 64); the mode is entered there and nowhere else."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(512, 256, generator=g)
    modes = torch._C._len_torch_function_stack
    with numerics(KernelPolicy(invariant=True)):
        assert modes() == 1
        assert torch.equal(torch.nn.functional.linear(x[:1], w)[0], torch.nn.functional.linear(x, w)[0])
    with numerics(KernelPolicy()):
        assert modes() == 0
    assert modes() == 0


def test_tree_verify_takes_the_kernel_the_reference_or_in_invariant_mode_the_root_paths():
    tokens = Stand(shape=(64, 16, 128))
    assert (lightning_tree_kernel(KernelPolicy(), tokens), lightning_fold_kernel(KernelPolicy(), tokens)) == (
        "tree", "tree")
    for policy, x in ((KernelPolicy("torch"), tokens), (KernelPolicy(), Stand(shape=(64, 16, 32))),
                      (KernelPolicy("triton"), Stand(dtype=torch.float64))):
        assert (lightning_tree_kernel(policy, x), lightning_fold_kernel(policy, x)) == (
            "tree_reference", "fold_reference")
    for backend in ("torch", "triton"):
        assert lightning_tree_kernel(KernelPolicy(backend, invariant=True), tokens) == "root_paths"
    assert lightning_fold_kernel(KernelPolicy(invariant=True), tokens) == "tree"  # a decode step's update either way
