"""Which kernel runs: a run's kernel policy and the one rule table every op's dispatcher follows.

The owner of a run (the Engine, the Trainer, the RL trainer, the alignment probe) makes one
`KernelPolicy` and hands it down: the attention context that every layer's forward receives carries
it, the layers pass it to their norms, MLP and MoE, and each op takes it as an argument. No op reads
a global flag, and a reader answers "which kernel runs here?" from this file alone.

`backend` ("auto" is "triton" for CUDA tensors when Triton is installed, else "torch"):
- "torch": the readable PyTorch reference of every op: no Triton, no torch.compile, no
  torch._grouped_mm, no FlashAttention varlen call.
- "triton": the Triton kernel of every op that has one, on CUDA and (for tests, through
  TRITON_INTERPRET=1) on the CPU; on CUDA also PyTorch's own fast paths. Triton kernels take fp16,
  bf16 and fp32; float64 tensors always take the references.

`invariant`: batch-invariant numerics. A token's numbers do not depend on what else is in its batch
(see `batch_invariant.py`), so the training forward and any engine step give the same bits. Generic
torch ops (`F.linear`, `@`, reductions, softmax, `sigmoid`, `topk`) take invariant forms inside
`batch_invariant.numerics(policy)`, which the model's forward enters for its whole body (and the
sampler for its log-probs); the ops below switch by the table. Backward passes run outside it.

| op (file)                   | triton                   | torch          | invariant, triton   | invariant, torch |
|-----------------------------|--------------------------|----------------|---------------------|------------------|
| lightning_attn (lightning/) | chunk.py                 | naive chunked  | recurrent.py        | naive recurrent  |
| lightning_decode            | decode.py                | naive decode   | recurrent.py        | naive recurrent  |
| lightning_tree_verify       | tree.py                  | tree quadratic | root paths (6)      | root paths (6)   |
| lightning_tree_fold         | tree.py                  | tree fold loop | tree.py             | tree fold loop   |
| causal_attention            | SDPA; FlashAttention (1) | SDPA, masked   | key blocks (10)     | key-block loop   |
| paged_attention             | kernel.py (3)            | gather + SDPA  | key blocks (10)     | key-block loop   |
| paged_latent_attention      | kernel.py (3)            | gather + SDPA  | none (8)            | none (8)         |
| route (routing.py)          | routing_kernel.py (11)   | PyTorch        | routing_kernel.py   | PyTorch          |
| routed_experts (moe.py)     | moe_kernels.py (12)      | as grouped_glu | (12) on Hopper, (2) | as grouped_glu   |
| grouped_glu (moe.py)        | torch._grouped_mm (4)    | expert loop    | grouped GEMM (2)    | expert loop      |
| grouped GEMM's backward     | –                        | –              | _grouped_mm (9)     | –                |
| grouped_glu, fp8            | fp8 loop; grouped (13)   | fp8 loop, refs | fp8 loop (13)       | fp8 loop, refs   |
| rms_norm (layers.py)        | torch.compile (5)        | eager          | invariant_kernels   | eager            |
| elementwise chains (fused)  | torch.compile (5)        | eager          | eager               | eager            |
| fp8 quantize (fp8/)         | kernels.py               | reference.py   | –                   | –                |
| fp8 GEMM (fp8/)             | torch._scaled_mm (7)     | reference.py   | –                   | –                |
| fp8 grouped GEMM (fp8/)     | kernels.py (13)          | reference loop | –                   | –                |
| F.linear, @, sum, softmax   | PyTorch                  | PyTorch        | invariant_kernels   | fixed row blocks |

(1) FlashAttention's varlen kernel for packed documents in CUDA fp16/bf16. (2) On
`invariant_kernels.py`. (3) Pages of a power of two ≥ 16 tokens; Lightning kernels take head sizes
LIGHTNING_HEAD_DIMS; other shapes take the references. (4) CUDA bf16; else the expert loop.
(5) CUDA activations of at least COMPILE_MIN_ELEMENTS. (6) Each draft token's root path through
lightning_attn's invariant form (so a recurrent kernel, by the backend), the bits a decode step gives it.
(7) cuBLAS's blockwise recipes on Hopper (CUDA ≥ 12.9) for operands whose dimensions are multiples of 128,
if a probe product on the device matches the reference (`blockwise_scaled_mm_works`); else kernels.py's
GEMM. FP8 is not batch-invariant.
(8) The absorbed form sums over the latent, not the heads' channels as the training forward does: it
cannot give the training forward's bits, and an invariant policy is refused.
(9) torch._grouped_mm for CUDA bf16 (`grouped_mm_gradients_kernel`); else a loop over the groups. One
group (F.linear, @): two plain products.
(10) `attention.attention_by_key_blocks` on `invariant_kernels.key_block_attention`: tensor cores, one tile
(a sequence's queries × the query heads of a KV head) for every call, key blocks of KEY_BLOCK at fixed
positions read through the page table (any page size; a training sequence is one page); head dims a
power of two ≥ 16. Its backward: SDPA's, recomputed.
(11) fp32 logits over a power-of-two number of experts and groups (at most 1,024 experts); else PyTorch.
Its backward is PyTorch's, from the experts it chose.
(12) bf16 (on CUDA; on the CPU through the interpreter): the fused kernels, which read the tokens' rows
in place and sum their k outputs in fp32 without a copy of x in expert order; their backward recomputes
the gated activation from the saved gate and up products and runs its products as torch._grouped_mm
(`grouped_mm_gradients_kernel`; else one product per expert). Their tiles and sums are fixed by the
shapes, so in invariant mode they serve where a row's products keep their bits whatever shares their tile
(`rows_keep_their_bits`: Hopper). Other dtypes, FP8 and invariant mode elsewhere copy the rows into expert
order and run grouped_glu (`moe.dispatched_experts`).
(13) e4m3 expert weights with their 128×128 scales (serving), not invariant and without autograd: the rows
quantized per 1×128 once, then one grouped blockwise-FP8 GEMM per projection (`fp8/kernels.py`), each program
taking its row tile from `moe_kernels`' schedule on the device (no host sync: CUDA-graph safe). FP8 training
(`fp8`: bf16 or fp32 master weights quantized on every call, with autograd) and e4m3 weights in invariant mode
(FP8 is not batch-invariant) loop over the experts (a host sync) with one fp8_linear per projection.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
LIGHTNING_HEAD_DIMS = (64, 128, 256)  # what the Triton Lightning kernels take; other head sizes run the references
# A compiled chain costs more host time than the few launches it replaces, which a small step
# (launch-bound) would feel: compile from 2,048 tokens of a 2,048-wide activation (prefill chunks, training).
COMPILE_MIN_ELEMENTS = 1 << 22


def triton_installed() -> bool:
    # find_spec, not an import: importing triton here would fix TRITON_INTERPRET for the process
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class KernelPolicy:
    backend: Backend = "auto"
    invariant: bool = False
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.fp8 and self.invariant:
            raise ValueError("fp8 GEMMs are not batch-invariant: choose fp8 or invariant, not both")

    def resolve(self, device: torch.device | str) -> KernelPolicy:
        """This policy with "auto" made concrete for tensors on `device` (what an owner logs and passes)."""
        return replace(self, backend=self._backend_on(torch.device(device)))

    def _backend_on(self, device: torch.device) -> Backend:
        if self.backend != "auto":
            return self.backend
        return "triton" if device.type == "cuda" and triton_installed() else "torch"

    def triton(self, *xs: Tensor) -> bool:
        """Whether the Triton kernels take these tensors: the backend is Triton on their device and they
        share one of KERNEL_DTYPES."""
        return (self._backend_on(xs[0].device) == "triton" and xs[0].dtype in KERNEL_DTYPES
                and all(x.dtype == xs[0].dtype for x in xs))

    def cuda_fast_paths(self, x: Tensor) -> bool:
        """Whether PyTorch's CUDA-only fast paths (FlashAttention varlen, torch._grouped_mm, compiled
        chains) may run on `x`: Triton backend, CUDA, and not invariant (their arithmetic follows the shapes)."""
        return not self.invariant and x.is_cuda and self._backend_on(x.device) == "triton"


@functools.cache  # a property of the device; a host call per launch otherwise
def rows_keep_their_bits(device: torch.device) -> bool:
    """Whether a product's row (16-bit on the tensor cores, fp32 as IEEE FMAs) has the same bits whatever
    tile and rows it is computed with: on Hopper (sm_90) they depend on the order of the reduction alone
    (every tile of `benchmarks/check_invariant.py --tiles` and `--fp32-tiles` gave the same bits, H200,
    2026-12-02); elsewhere (the interpreter's numpy products, other GPUs) not known, so not assumed."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


# -- the rule table, one function per row ----------------------------------------------------------

RoutingKernel = Literal["triton", "reference"]


def routing_kernel(policy: KernelPolicy, logits: Tensor, n_group: int) -> RoutingKernel:
    """routing.route: one Triton program per token for fp32 logits over a power-of-two number of experts
    (and groups, up to 1,024 experts), in either mode (a token's choice never depends on the other
    rows); else the reference, whose top-k `numerics` makes invariant in invariant mode."""
    E = logits.shape[-1]
    powers_of_two = E & (E - 1) == 0 and n_group & (n_group - 1) == 0
    if policy.triton(logits) and logits.dtype == torch.float32 and powers_of_two and E <= 1024:
        return "triton"
    return "reference"


LightningKernel = Literal["chunk", "recurrent", "chunked_reference", "recurrent_reference"]


def lightning_kernel(policy: KernelPolicy, q: Tensor) -> LightningKernel:
    """lightning_attn and lightning_decode: `chunk` is chunk.py for whole sequences and decode.py for
    one token; invariant mode runs the recurrent form for both, so a token gets the same bits whether
    it was prefilled or decoded."""
    triton = policy.triton(q) and q.shape[-1] in LIGHTNING_HEAD_DIMS
    if policy.invariant:
        return "recurrent" if triton else "recurrent_reference"
    return "chunk" if triton else "chunked_reference"


TreeVerifyKernel = Literal["tree", "tree_reference", "root_paths"]


def lightning_tree_kernel(policy: KernelPolicy, q: Tensor) -> TreeVerifyKernel:
    """lightning_tree_verify: tree.py takes a whole tree in one tile (a masked product, whose sums follow
    the tree's shape); invariant mode decodes each token's root path instead, one token per step."""
    if policy.invariant:
        return "root_paths"
    return "tree" if policy.triton(q) and q.shape[-1] in LIGHTNING_HEAD_DIMS else "tree_reference"


def lightning_fold_kernel(policy: KernelPolicy, k: Tensor) -> Literal["tree", "fold_reference"]:
    """lightning_tree_fold: either form is a decode step's update per token, elementwise in fp32 (the
    same in invariant mode)."""
    return "tree" if policy.triton(k) and k.shape[-1] in LIGHTNING_HEAD_DIMS else "fold_reference"


AttentionKernel = Literal["sdpa", "flash_varlen", "key_blocks", "key_blocks_reference"]


def causal_attention_kernel(policy: KernelPolicy, q: Tensor, k: Tensor, v: Tensor, packed: bool) -> AttentionKernel:
    """causal_attention. Both invariant forms are `attention.attention_by_key_blocks`, which takes the
    Triton kernel by the same test (`policy.triton`), as do the generic ops inside `batch_invariant.numerics`."""
    if policy.invariant:
        return "key_blocks" if policy.triton(q, k, v) else "key_blocks_reference"
    if packed and policy.cuda_fast_paths(q) and q.dtype in (torch.float16, torch.bfloat16):
        return "flash_varlen"
    return "sdpa"


PagedKernel = Literal["paged", "gather_reference", "key_blocks"]


def paged_attention_kernel(policy: KernelPolicy, q: Tensor, k_cache: Tensor) -> PagedKernel:
    """paged_attention, k_cache [P, page_size, KV, D]. The kernel multiplies a page of keys on the tensor
    cores: pages of a power of two ≥ 16 tokens; others take the reference. Invariant:
    `attention_by_key_blocks` reading its key blocks through the pages (kernel or loop as for
    causal_attention), so a query visits the blocks the training forward visits, whatever the page size."""
    if policy.invariant:
        return "key_blocks"
    page = k_cache.shape[1]
    return "paged" if policy.triton(q, k_cache) and page >= 16 and page & (page - 1) == 0 else "gather_reference"


def latent_attention_kernel(policy: KernelPolicy, q: Tensor, cache: Tensor) -> Literal["paged", "gather_reference"]:
    """paged_latent_attention, cache [P, page_size, r + rope]: the kernel reads whole key blocks of
    pages of a power of two ≥ 16 tokens; others take the reference. No invariant form (8)."""
    if policy.invariant:
        raise ValueError("paged_latent_attention has no batch-invariant form: run MLA with invariant=False")
    page = cache.shape[1]
    return "paged" if policy.triton(q, cache) and page >= 16 and page & (page - 1) == 0 else "gather_reference"


ExpertsKernel = Literal["fused", "grouped_mm", "invariant_grouped_mm", "loop", "fp8_grouped", "fp8_loop"]


def experts_kernel(policy: KernelPolicy, x: Tensor, *weights: Tensor, token_order: bool = False) -> ExpertsKernel:
    """routed_experts (`token_order`: x is the tokens, in token order) and grouped_glu (x is rows already
    copied into expert order). The fused Triton kernels gather the tokens' rows themselves, so they take
    the first, in bf16 (12; in invariant mode on Hopper); torch._grouped_mm (no host sync, so CUDA-graph
    safe) takes bf16 rows in expert order on CUDA. e4m3 weights (serving) on the Triton backend, not invariant and without
    autograd, run one grouped FP8 GEMM per projection (13; no host sync either); other FP8 (the policy's,
    whose master weights need autograd, or the torch backend) loops over the experts (a host sync) with
    one fp8_linear per projection."""
    e4m3 = weights[0].dtype == torch.float8_e4m3fn
    if (e4m3 and not policy.invariant and policy._backend_on(x.device) == "triton"
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return "fp8_grouped"
    if policy.fp8 or e4m3:
        return "fp8_loop"
    if (token_order and x.dtype == torch.bfloat16 and policy.triton(x, *weights)
            and (not policy.invariant or rows_keep_their_bits(x.device))):
        return "fused"
    if policy.invariant:
        return "invariant_grouped_mm" if policy.triton(x, *weights) else "loop"
    return "grouped_mm" if policy.cuda_fast_paths(x) and x.dtype == torch.bfloat16 else "loop"


def grouped_mm_gradients_kernel(dy: Tensor) -> Literal["grouped_mm", "loop"]:
    """The backward's products of the invariant grouped GEMM and the fused experts (no invariance needed):
    torch._grouped_mm takes CUDA bf16 (no host sync); else a loop over the groups (a host sync)."""
    return "grouped_mm" if dy.is_cuda and dy.dtype == torch.bfloat16 else "loop"


def compiles_chain(policy: KernelPolicy, x: Tensor) -> bool:
    """fused.py: compile an elementwise chain into one kernel. Invariant mode runs it eagerly, so its
    reductions keep their fixed form."""
    return policy.cuda_fast_paths(x) and x.numel() >= COMPILE_MIN_ELEMENTS


def rms_norm_kernel(policy: KernelPolicy, x: Tensor, weight: Tensor) -> Literal["invariant_rows", "chain"]:
    """layers.rms_norm: in invariant mode on the Triton backend one program per row (its sums fixed by the
    row length); else the elementwise chain, compiled or eager (`compiles_chain`)."""
    return "invariant_rows" if policy.invariant and policy.triton(x, weight) else "chain"


Fp8GemmKernel = Literal["scaled_mm", "triton", "reference"]


def fp8_quantize_triton(policy: KernelPolicy, x: Tensor) -> bool:
    """fp8 quantize: the Triton kernel, or the reference (float64 inputs always take the reference)."""
    return policy.triton(x)


def fp8_gemm_kernel(policy: KernelPolicy, a: Tensor, b: Tensor) -> Fp8GemmKernel:
    """fp8 GEMM of e4m3 operands a [M, K], b [N, K]."""
    if policy._backend_on(a.device) != "triton":
        return "reference"
    aligned = a.shape[0] % 128 == 0 and b.shape[0] % 128 == 0 and a.shape[1] % 512 == 0  # `scaled_mm_blockwise`
    return "scaled_mm" if a.is_cuda and aligned and blockwise_scaled_mm_works(a.device) else "triton"


def fp8_grouped_gemm_kernel(policy: KernelPolicy, a: Tensor) -> Literal["triton", "reference"]:
    """fp8 grouped GEMM of e4m3 rows a [M, K] sorted by expert: the Triton kernel on the Triton backend (13),
    else the reference per expert (a host sync)."""
    return "triton" if policy._backend_on(a.device) == "triton" else "reference"


@functools.cache
def blockwise_scaled_mm_works(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes DeepSeek's blockwise recipes here: Hopper, a CUDA ≥ 12.9 build, and a
    probe product that matches the reference (a build without them raises, which is the answer too)."""
    if torch.cuda.get_device_capability(device) != (9, 0) or torch.version.cuda is None:
        return False
    if tuple(int(v) for v in torch.version.cuda.split(".")[:2]) < (12, 9):
        return False
    from .fp8.gemm import probe_scaled_mm
    try:
        return probe_scaled_mm(device)
    except (RuntimeError, ValueError):  # what torch's shape and layout checks raise
        return False
