"""The Triton kernels of batch-invariant mode (`ops.invariant_kernels`) on one GPU: correctness,
bit-identity, then speed.

    PYTHONPATH=$PWD python3 benchmarks/check_invariant.py [--quick] [--seed N]
                                                          [--tiles | --fp32-tiles | --attention-tiles | --slices]

At Ring-mini shapes (hidden 2048, 16 query / 4 KV heads of 128, 256 experts of 512, vocab 157,184):
1. correctness against PyTorch in fp64/fp32: the grouped GEMM (up to 8,192 rows over 256 experts with
   random counts, some experts empty), the linear (bf16, and fp32 with no TF32), row sums, softmax
   and log_softmax, the key-block attention (2 sequences of 2,048 tokens against causal SDPA), topk
   against a stable sort (ties to the lower index), the gradients (fp32, and bf16's torch._grouped_mm);
2. bit-identity: rows (tokens) computed within batches of other sizes and contents, and from
   misaligned views, must be torch.equal to the same rows of the full batch; an attention query's
   output from its sequence's training forward alone must equal it from a padded training batch,
   packed documents, a prefill chunk after a cached prefix beside other sequences' decodes, and
   single decode steps (engine pages of 64 and of 16 tokens, scattered, NaN past the sequences);
3. speed (triton.testing.do_bench, median ms): each kernel against its fast PyTorch equivalent and,
   where it runs in reasonable time, the fixed-block PyTorch form that aligned mode used before;
   the attention as training calls it and as an engine step does (paged: decodes of 64 sequences,
   a prefill chunk after a prefix), against SDPA and the paged Triton kernel.
Each case runs on its own: a failure is reported and the rest go on; the exit status is 1 if any
check failed.

`--tiles` runs instead a choice of the bf16 GEMM tile (`mm_config`): each candidate timed at M = 1,
64, 256 and 4,096 tokens on Ring-mini's product shapes (the experts' with 8 of 256 experts a token),
summed and then per shape (a tile may be a function of the weight's shape, never of M), checked
batch-invariant (a row's bits the same whatever M), and compared bit for bit with today's tile: a tile
whose bits are today's could take the small M (decode) while today's takes the rest; `--fp32-tiles` the same
for the fp32 tile on the router's product (IEEE products on CUDA cores). `--attention-tiles` likewise times
the candidate tiles of the key-block attention (`attention_config`) on decode, prefill-chunk and
training shapes and checks that single decode steps and a chunk get the training forward's bits.
`--slices` times the GEMM's split of K (`k_slices`) per product shape and token count, a program per
slice against the slices summed in place and against no split, and checks the two forms' bits.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from ringlinear.ops import attention
from ringlinear.ops.batch_invariant import KEY_BLOCK, numerics
from ringlinear.ops.invariant_kernels import (LARGE_TILE_ROWS, SLICE_ALIGN, AttentionConfig, MMConfig, _grouped_mm,
                                              attention_config, invariant_grouped_mm, invariant_linear, k_slices,
                                              key_block_attention, mm_config, row_sum, softmax)
from ringlinear.ops.moe import grouped_glu, routed_experts
from ringlinear.ops.paged_attention import paged_attention
from ringlinear.ops.policy import KernelPolicy, experts_kernel

ALIGNED = KernelPolicy(invariant=True)  # on the Triton kernels
ALIGNED_BLOCKS = KernelPolicy("torch", invariant=True)  # as aligned mode ran before them: fixed-block PyTorch forms
FAST = KernelPolicy()

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, INTER, TOPK, VOCAB = 2048, 16, 4, 128, 256, 512, 8, 157184
T0 = time.time()
FAILURES: list[str] = []


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def check(name: str, ok: bool, detail: str = "") -> None:
    log(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        FAILURES.append(name)


def case(name: str, fn: Callable[[], None]) -> None:
    """Run one case; an exception is a failure of that case only."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - report and go on to the next case
        log(f"FAIL {name}: raised\n{traceback.format_exc()}")
        FAILURES.append(name)
    finally:
        torch.cuda.empty_cache()


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of x as a view one element past an aligned address."""
    buffer = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
    view = buffer[1:].view(x.shape)
    view.copy_(x)
    return view


def random_counts(rows: int, gen: torch.Generator) -> torch.Tensor:
    """Counts of `rows` rows over the experts: skewed, about a tenth of the experts empty."""
    weights = torch.rand(EXPERTS, generator=gen, device="cuda") ** 3
    weights[torch.rand(EXPERTS, generator=gen, device="cuda") < 0.1] = 0
    experts = torch.multinomial(weights, rows, replacement=True, generator=gen)
    return torch.bincount(experts, minlength=EXPERTS)


def grouped_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    parts = [rows.double() @ w_e.double().T for rows, w_e in zip(x.split(counts.tolist()), w) if len(rows)]
    return torch.cat(parts)


def row_subset(counts: torch.Tensor, keep: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random subset of the rows (order kept) and the counts of each group within it."""
    mask = torch.rand(int(counts.sum()), generator=gen, device="cuda") < keep
    mask[torch.randint(len(mask), (1,), generator=gen, device="cuda")] = True
    group = torch.repeat_interleave(torch.arange(EXPERTS, device="cuda"), counts)
    return mask, torch.bincount(group[mask], minlength=EXPERTS)


# -- 1 and 2: correctness and bit-identity ---------------------------------------------------------

@torch.no_grad()
def check_grouped_mm(rows: int, N: int, K: int, gen: torch.Generator) -> None:
    counts = random_counts(rows, gen)
    x = torch.randn(rows, K, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(EXPERTS, N, K, generator=gen, device="cuda") * K**-0.5).bfloat16()
    out = invariant_grouped_mm(x, w, counts)
    ref = grouped_reference(x, w, counts)
    fast = torch._grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    err = rel(out, ref)
    check(f"grouped mm bf16 {rows}x{K} -> {N}, {EXPERTS} experts vs fp64", err < 1e-2,
          f"rel err {err:.2e} (torch._grouped_mm {rel(fast, ref):.2e}; {int((counts == 0).sum())} empty)")
    bad = []
    for keep in (0.0, 0.001, 0.05, 0.5, 0.9):
        mask, sub_counts = row_subset(counts, keep, gen)
        for source in (x[mask], misaligned(x[mask])):
            if not torch.equal(invariant_grouped_mm(source, w, sub_counts), out[mask]):
                bad.append(f"{int(mask.sum())} rows")
    check(f"grouped mm {N}x{K}: rows within other batches (5 subsets, aligned and not)", not bad, ", ".join(bad))


@torch.no_grad()
def check_routed_experts(tokens: int, gen: torch.Generator) -> None:
    """The MoE's routed experts in two forms, each against float64 and each token's output the same bits
    among other tokens as alone: as the invariant policy runs them (`policy.experts_kernel`), and the
    fast mode's fused kernels (`moe_kernels.fused_experts`), whose tiles and sums are fixed by the shapes:
    where they pass, invariant mode could take them too."""
    from ringlinear.ops.moe_kernels import fused_experts
    policy = KernelPolicy("triton", invariant=True)
    x = torch.randn(tokens, HIDDEN, generator=gen, device="cuda").bfloat16()
    gate, up = ((torch.randn(EXPERTS, INTER, HIDDEN, generator=gen, device="cuda") * HIDDEN**-0.5).bfloat16()
                for _ in range(2))
    down = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, device="cuda") * INTER**-0.5).bfloat16()
    experts = torch.rand(tokens, EXPERTS, generator=gen, device="cuda").topk(TOPK, dim=-1).indices
    weights = torch.rand(tokens, TOPK, generator=gen, device="cuda")
    h = [torch.nn.functional.silu(x.double() @ gate[e].double().T) * (x.double() @ up[e].double().T)
         for e in range(EXPERTS)]
    ref = sum(weights[:, j, None].double() * torch.stack([h[e][t] @ down[e].double().T for t, e in
                                                            enumerate(experts[:, j].tolist())]) for j in range(TOPK))
    kernel = experts_kernel(policy, x, gate, up, down, token_order=True)
    forms = {f"invariant policy ({kernel})": lambda x, w, e, g, u, d: routed_experts(x, w, e, g, u, d, policy),
             "fused kernels": lambda x, w, e, g, u, d: fused_experts(x, g, u, d, w, e)}
    for name, run in forms.items():
        with numerics(policy):
            out = run(x, weights, experts, gate, up, down)
        err = rel(out, ref)
        check(f"routed experts, {name}: bf16 {tokens} tokens vs fp64", err < 2e-2, f"rel err {err:.2e}")
        bad = []
        for keep in (0.002, 0.1, 0.5):
            mask = torch.rand(tokens, generator=gen, device="cuda") < keep
            mask[0] = True
            with numerics(policy):
                sub = run(x[mask], weights[mask], experts[mask], gate, up, down)
            if not torch.equal(sub, out[mask]):
                bad.append(f"{int(mask.sum())} tokens")
        check(f"routed experts, {name}: tokens within other batches", not bad, ", ".join(bad))


@torch.no_grad()
def check_linear(rows: int, N: int, K: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    x = torch.randn(rows, K, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(N, K, generator=gen, device="cuda") * K**-0.5).to(dtype)
    out = invariant_linear(x, w)
    ref = x.double() @ w.double().T
    err = rel(out, ref)
    name = f"linear {str(dtype).removeprefix('torch.')}"
    check(f"{name} {rows}x{K} -> {N} vs fp64", err < (2e-6 if dtype == torch.float32 else 1e-2),
          f"rel err {err:.2e}")
    bad = []
    for m in (1, 3, 16, 64, 65, 1000):
        pick = torch.randperm(rows, generator=gen, device="cuda")[:m]
        for source in (x[pick], misaligned(x[pick])):
            if not torch.equal(invariant_linear(source, w), out[pick]):
                bad.append(f"{m} rows")
    check(f"{name} {N}x{K}: rows within batches of 1 to 1000, shuffled", not bad, ", ".join(bad))


@torch.no_grad()
def check_rows(rows: int, columns: int, gen: torch.Generator) -> None:
    x = torch.randn(rows, columns, generator=gen, device="cuda") * 4
    ops = {"sum": (row_sum, x.double().sum(-1)), "mean": (lambda t: row_sum(t, mean=True), x.double().mean(-1)),
           "softmax": (softmax, x.double().softmax(-1)),
           "log_softmax": (lambda t: softmax(t, log=True), x.double().log_softmax(-1))}
    for name, (fn, ref) in ops.items():
        out = fn(x)
        err = rel(out, ref)
        bad = []
        for m in (1, 2, 7, 100):
            pick = torch.randperm(rows, generator=gen, device="cuda")[:m]
            for source in (x[pick], misaligned(x[pick])):
                if not torch.equal(fn(source), out[pick]):
                    bad.append(f"{m} rows")
        check(f"{name} fp32 [{rows}, {columns}]", err < 1e-5 and not bad,
              f"rel err {err:.2e} vs fp64; rows within other batches: {', '.join(bad) or 'bit-identical'}")
    half = x.bfloat16()
    err = rel(softmax(half), half.float().softmax(-1))
    check(f"softmax bf16 [{rows}, {columns}]", err < 1e-2, f"rel err {err:.2e}")


def scatter_pages(kvs: list[tuple[torch.Tensor, torch.Tensor]], page: int, gen: torch.Generator):
    """Sequences' keys and values ([L, KV, D] each) in pages of `page` tokens scattered over a pool in
    random order, every slot no sequence holds NaN (a page may hold anything past a sequence's end):
    k_cache, v_cache [P, page, KV, D] and the block table [N, max_pages] int32."""
    counts = [-(-len(k) // page) for k, _ in kvs]
    pool = sum(counts) + 3
    caches = [torch.full((pool, page, *kvs[0][0].shape[1:]), float("nan"), dtype=kvs[0][0].dtype, device="cuda")
              for _ in range(2)]
    order = torch.randperm(pool, generator=gen, device="cuda")
    table = torch.zeros(len(kvs), max(counts), dtype=torch.int32, device="cuda")
    start = 0
    for n, (count, kv) in enumerate(zip(counts, kvs)):
        table[n, :count] = order[start:start + count]
        start += count
        for cache, x in zip(caches, kv):
            padded = F.pad(x, (0, 0, 0, 0, 0, count * page - len(x)), value=float("nan"))
            cache[table[n, :count].long()] = padded.view(count, page, *x.shape[1:])
    return *caches, table


def paged_step(queries: list[torch.Tensor], kvs: list[tuple[torch.Tensor, torch.Tensor]], page: int,
               gen: torch.Generator, policy: KernelPolicy = ALIGNED, misalign: bool = False) -> torch.Tensor:
    """One engine step's attention: sequence n's new queries (its last len(queries[n]) positions) against
    its keys and values kvs[n] in scattered pages."""
    k_cache, v_cache, table = scatter_pages(kvs, page, gen)
    lens = torch.tensor([len(x) for x in queries], device="cuda")
    query_start = F.pad(lens.cumsum(0), (1, 0)).int()
    seq_lens = torch.tensor([len(k) for k, _ in kvs], dtype=torch.int32, device="cuda")
    q = torch.cat(queries)
    return paged_attention(misaligned(q) if misalign else q, k_cache, v_cache, table, seq_lens, query_start,
                           HEAD_DIM**-0.5, int(lens.max()), policy=policy)


@torch.no_grad()
def check_attention(seq_len: int, gen: torch.Generator) -> None:
    scale = HEAD_DIM**-0.5
    q, k, v = (torch.randn(2, seq_len, h, HEAD_DIM, generator=gen, device="cuda")
               for h in (HEADS, KV_HEADS, KV_HEADS))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        args = [t.to(dtype) for t in (q, k, v)]
        out = attention._causal_by_key_blocks(*args, scale, None, ALIGNED)
        ref = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in args), is_causal=True,
                                             scale=scale, enable_gqa=True).transpose(1, 2)
        err = rel(out, ref)
        check(f"attention {str(dtype).removeprefix('torch.')} B2 T{seq_len} vs causal SDPA fp64", err < tol,
              f"rel err {err:.2e}")
    # bit-identity: each sequence's queries from its training forward alone against every other way of
    # computing them: a padded training batch, packed documents, engine steps over pages of 64 and 16
    lengths = [seq_len, 1, 17, seq_len // 3, 700]
    seqs = [tuple(torch.randn(n, h, HEAD_DIM, generator=gen, device="cuda").bfloat16()
                  for h in (HEADS, KV_HEADS, KV_HEADS)) for n in lengths]
    kvs = [(k, v) for _, k, v in seqs]
    alone = [attention.causal_attention(q[None], k[None], v[None], scale, policy=ALIGNED)[0] for q, k, v in seqs]
    T = max(lengths)
    batch = attention.causal_attention(*(torch.stack([F.pad(s[i], (0, 0, 0, 0, 0, T - len(s[i]))) for s in seqs])
                                         for i in range(3)), scale, policy=ALIGNED)
    cu = F.pad(torch.tensor(lengths, device="cuda").cumsum(0), (1, 0))
    packed = attention.causal_attention(*(torch.cat([s[i] for s in seqs])[None] for i in range(3)), scale,
                                        cu_seqlens=cu, policy=ALIGNED)[0]
    last_tokens = [a[-1:] for a in alone[1:]]
    # (way, outputs, the same queries' outputs alone)
    ways = [("a padded training batch", [batch[n, :L] for n, L in enumerate(lengths)], alone),
            ("packed documents", list(packed.split(lengths)), alone)]
    long_q, half = seqs[0][0], seq_len // 2
    picks = sorted({0, 63, 64, 65, 127, 128, half, seq_len - 1})  # at and around key-block edges
    for page in (64, 16):
        for misalign in (False, True):
            step = paged_step([long_q[half:]] + [s[0][-1:] for s in seqs[1:]], kvs, page, gen, misalign=misalign)
            ways.append((f"pages of {page}: a chunk after a {half}-token prefix beside decodes"
                         f"{', misaligned' * misalign}", [step[:seq_len - half], *step[seq_len - half:].split(1)],
                         [alone[0][half:], *last_tokens]))
        decodes = [paged_step([long_q[t:t + 1]], [(seqs[0][1][:t + 1], seqs[0][2][:t + 1])], page, gen) for t in picks]
        ways.append((f"pages of {page}: single decode steps", decodes, list(alone[0][picks].split(1))))
    bad = [name for name, got, expected in ways
           if len(got) != len(expected) or not all(map(torch.equal, got, expected))]
    check(f"attention bf16: a query's bits alone vs in other calls ({len(lengths)} sequences, {len(ways)} ways)",
          not bad, ", ".join(bad))


def check_gradients(gen: torch.Generator) -> None:
    counts = random_counts(512, gen)
    x = torch.randn(512, 256, generator=gen, device="cuda", requires_grad=True)
    w = torch.randn(EXPERTS, 128, 256, generator=gen, device="cuda", requires_grad=True)
    dy = torch.randn(512, 128, generator=gen, device="cuda")
    grads = torch.autograd.grad((invariant_grouped_mm(x, w, counts) * dy).sum(), [x, w])
    with torch.no_grad():
        ref = (grouped_reference(dy, w.transpose(1, 2), counts), torch.stack(
            [d.double().T @ r.double() for d, r in zip(dy.split(counts.tolist()), x.split(counts.tolist()))]))
    errs = [rel(a, b) for a, b in zip(grads, ref)]
    check("grouped mm fp32 gradients", max(errs) < 1e-6, f"dx {errs[0]:.1e}, dw {errs[1]:.1e}")
    # bf16 takes torch._grouped_mm (no host sync), empty experts included
    leaves = [t.detach().bfloat16().requires_grad_() for t in (x, w)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad((invariant_grouped_mm(*leaves, counts) * dy.bfloat16()).sum(), leaves)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    errs = [rel(a, b) for a, b in zip(grads, ref)]
    check("grouped mm bf16 gradients, no host sync", max(errs) < 1e-2 and bool((grads[1][counts == 0] == 0).all()),
          f"dx {errs[0]:.1e}, dw {errs[1]:.1e}; {int((counts == 0).sum())} empty experts' dw zero")
    q, k, v = (torch.randn(2, 300, h, HEAD_DIM, generator=gen, device="cuda", requires_grad=True)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    do = torch.randn(2, 300, HEADS, HEAD_DIM, generator=gen, device="cuda")
    out = attention.causal_attention(q, k, v, 0.1, policy=ALIGNED)
    grads = torch.autograd.grad((out * do).sum(), [q, k, v])
    ref = torch.autograd.grad((attention.causal_attention(q, k, v, 0.1) * do).sum(), [q, k, v])
    errs = [rel(a, b) for a, b in zip(grads, ref)]
    check("attention fp32 gradients through the aligned kernel", max(errs) < 1e-5, ", ".join(f"{e:.1e}" for e in errs))


@torch.no_grad()
def check_topk(gen: torch.Generator) -> None:
    """The sampler's top log-probs over the vocabulary and the router's choice, many values tied."""
    for name, x, k in (("vocab", torch.randn(64, VOCAB, generator=gen, device="cuda").bfloat16().float(), 20),
                       ("experts", torch.randint(0, 4, (4096, EXPERTS), generator=gen, device="cuda").float() / 4, 8)):
        x[:, ::7] = -0.0  # ties of -0.0 with +0.0
        with numerics(ALIGNED):
            top = x.topk(k)
            alone = [x[r:r + 1].topk(k) for r in (0, 17)]
        values, indices = x.sort(descending=True, stable=True)
        ok = torch.equal(top.indices, indices[:, :k]) and torch.equal(top.values, values[:, :k])
        ok = ok and all(torch.equal(a.indices[0], top.indices[r]) for a, r in zip(alone, (0, 17)))
        check(f"topk {name} {list(x.shape)} k={k} vs a stable sort, rows alone", ok)


# -- 3: speed --------------------------------------------------------------------------------------

def time_ms(fn: Callable[[KernelPolicy], object], policy: KernelPolicy, slow: bool = False) -> float:
    """Median ms of fn(policy) inside the policy's numerics; `slow`: one timed call."""
    def call():
        with numerics(policy):
            return fn(policy)
    if not slow:
        return do_bench(call, warmup=10, rep=50, return_mode="median")
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def timings(tokens: int, seq_len: int, gen: torch.Generator) -> list[tuple[str, float, float, float | None]]:
    """(case, ms under the mode on the kernels, ms of the fast path, ms under the mode before the
    kernels or None where that takes minutes). Each op is called as the model calls it."""
    rows: list[tuple[str, float, float, float | None]] = []
    env: dict[str, torch.Tensor] = {}  # the current case's inputs, freed after it

    def add(name: str, fn: Callable[[KernelPolicy], object], inputs: Callable[[], None], old: bool = True) -> None:
        try:
            inputs()
            rows.append((name, time_ms(fn, ALIGNED), time_ms(fn, FAST),
                         time_ms(fn, ALIGNED_BLOCKS, slow=True) if old else None))
            log(f"timed {name}")
        except Exception:  # noqa: BLE001 - report and go on
            log(f"FAIL timing {name}:\n{traceback.format_exc()}")
            FAILURES.append(f"timing {name}")
        finally:
            env.clear()
            torch.cuda.empty_cache()

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(dtype)

    def moe_inputs() -> None:
        M = tokens * TOPK
        env.update(x=randn(M, HIDDEN), gate=randn(EXPERTS, INTER, HIDDEN, std=0.02),
                   up=randn(EXPERTS, INTER, HIDDEN, std=0.02), down=randn(EXPERTS, HIDDEN, INTER, std=0.02),
                   counts=random_counts(M, gen), scales=torch.rand(M, generator=gen, device="cuda"))

    add(f"MoE SwiGLU bf16, {tokens} tok x top-{TOPK}",
        lambda policy: grouped_glu(env["x"], env["gate"], env["up"], env["down"], env["counts"], env["scales"],
                                      policy),
        moe_inputs)
    for name, M, N, K, dtype in ((f"linear bf16 {tokens}x{HIDDEN}->{HIDDEN}", tokens, HIDDEN, HIDDEN, torch.bfloat16),
                                 (f"linear bf16 decode 64x{HIDDEN}->{HIDDEN}", 64, HIDDEN, HIDDEN, torch.bfloat16),
                                 (f"router fp32 {tokens}x{HIDDEN}->{EXPERTS}", tokens, EXPERTS, HIDDEN, torch.float32),
                                 (f"lm_head bf16 {tokens // 4}x{HIDDEN}->{VOCAB}", tokens // 4, VOCAB, HIDDEN,
                                  torch.bfloat16)):
        add(name, lambda policy: F.linear(env["x"], env["w"]),
            lambda M=M, N=N, K=K, dtype=dtype: env.update(x=randn(M, K, dtype=dtype), w=randn(N, K, dtype=dtype)))
    add(f"RMSNorm mean fp32 [{tokens}, {HIDDEN}]", lambda policy: env["x"].pow(2).mean(-1, keepdim=True),
        lambda: env.update(x=randn(tokens, HIDDEN, dtype=torch.float32)))
    add(f"router softmax fp32 [{tokens}, {EXPERTS}]", lambda policy: env["x"].softmax(-1),
        lambda: env.update(x=randn(tokens, EXPERTS, dtype=torch.float32)))
    add(f"log_softmax fp32 [{tokens // 4}, {VOCAB}]", lambda policy: env["x"].log_softmax(-1),
        lambda: env.update(x=randn(tokens // 4, VOCAB, dtype=torch.float32)))
    # the old aligned topk was the stable sort: the "fast" column times torch.topk, not it
    add(f"topk 20 fp32 [64, {VOCAB}]", lambda policy: env["x"].topk(20),
        lambda: env.update(x=randn(64, VOCAB, dtype=torch.float32)), old=False)
    add(f"router topk 8 fp32 [{tokens}, {EXPERTS}]", lambda policy: env["x"].topk(TOPK),
        lambda: env.update(x=randn(tokens, EXPERTS, dtype=torch.float32)), old=False)
    for B, T in ((1, seq_len // 2), (8, seq_len)):
        # before the kernels, aligned attention ran ~T·H/16 products per key block: only the small case
        add(f"attention bf16 B{B} T{T}",
            lambda policy: attention.causal_attention(env["q"], env["k"], env["v"], HEAD_DIM**-0.5, policy=policy),
            lambda B=B, T=T: env.update(q=randn(B, T, HEADS, HEAD_DIM), k=randn(B, T, KV_HEADS, HEAD_DIM),
                                        v=randn(B, T, KV_HEADS, HEAD_DIM)), old=B == 1)

    def engine_step(queries: list[int], contexts: list[int]) -> None:
        """An engine step's attention inputs: sequence n's last queries[n] of contexts[n] tokens, pages of
        the engine's default 64 tokens scattered over the pool."""
        page = 64
        counts = [-(-n // page) for n in contexts]
        k_cache, v_cache = (randn(sum(counts), page, KV_HEADS, HEAD_DIM) for _ in range(2))
        order = torch.randperm(sum(counts), generator=gen, device="cuda").int()
        table = torch.zeros(len(contexts), max(counts), dtype=torch.int32, device="cuda")
        for n, (start, count) in enumerate(zip([0, *torch.tensor(counts).cumsum(0).tolist()], counts)):
            table[n, :count] = order[start:start + count]
        lens = torch.tensor(queries, device="cuda")
        env.update(q=randn(sum(queries), HEADS, HEAD_DIM), k_cache=k_cache, v_cache=v_cache, table=table,
                   seq_lens=torch.tensor(contexts, dtype=torch.int32, device="cuda"),
                   query_start=F.pad(lens.cumsum(0), (1, 0)).int(), max_query_len=torch.tensor(max(queries)))

    def paged(policy: KernelPolicy) -> torch.Tensor:
        return paged_attention(env["q"], env["k_cache"], env["v_cache"], env["table"], env["seq_lens"],
                               env["query_start"], HEAD_DIM**-0.5, int(env["max_query_len"]), policy=policy)

    add(f"paged decode bf16 64 x {2 * seq_len} context", paged,
        lambda: engine_step([1] * 64, [2 * seq_len] * 64), old=False)
    add(f"paged prefill bf16 {seq_len} after {seq_len}", paged,
        lambda: engine_step([seq_len], [2 * seq_len]), old=False)
    return rows


# -- --tiles: the bf16 GEMM tile ------------------------------------------------------------------

TILE_CANDIDATES = (
    MMConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),  # the tile today
    MMConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4),  # decode: few rows a group
    MMConfig(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=4),
    MMConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
    MMConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=3),
    MMConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    MMConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    MMConfig(block_m=64, block_n=32, block_k=64, num_warps=4, num_stages=4),  # decode: N / 32 programs
    MMConfig(block_m=64, block_n=16, block_k=128, num_warps=4, num_stages=4),
    # today's block_k with fewer rows or columns: if a row's bits do not depend on the tile's width,
    # such a tile may serve decode's few rows while today's serves the rest
    MMConfig(block_m=64, block_n=32, block_k=64, num_warps=4, num_stages=6),
    MMConfig(block_m=64, block_n=16, block_k=64, num_warps=4, num_stages=8),
    MMConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4),
    MMConfig(block_m=16, block_n=32, block_k=64, num_warps=2, num_stages=6),
    MMConfig(block_m=16, block_n=16, block_k=64, num_warps=1, num_stages=8),
    MMConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3),
)
# (name, N, K, experts): Ring-mini's bf16 products; the experts' rows are 8 a token over 256 experts
TILE_SHAPES = (("lightning qkv", 3 * HEADS * HEAD_DIM, HIDDEN, 1), ("dense / g_proj", HIDDEN, HIDDEN, 1),
               ("softmax qkv", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, 1), ("shared gate/up", INTER, HIDDEN, 1),
               ("experts gate/up", INTER, HIDDEN, EXPERTS), ("experts down", HIDDEN, INTER, EXPERTS),
               ("lm_head", VOCAB, HIDDEN, 1))
TILE_TOKENS = (1, 64, 256, 4096)
# fp32 (the router's product: IEEE on CUDA cores, no tensor cores)
FP32_TILE_CANDIDATES = (
    MMConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3),  # below LARGE_TILE_ROWS
    MMConfig(block_m=128, block_n=64, block_k=32, num_warps=4, num_stages=3),
    MMConfig(block_m=128, block_n=64, block_k=32, num_warps=8, num_stages=3),
    MMConfig(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=3),
    MMConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=2),  # from LARGE_TILE_ROWS on Hopper
    MMConfig(block_m=128, block_n=128, block_k=16, num_warps=8, num_stages=3),
    MMConfig(block_m=64, block_n=64, block_k=16, num_warps=4, num_stages=4),
    MMConfig(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=3),
)
FP32_TILE_SHAPES = (("router", EXPERTS, HIDDEN, 1),)


@torch.no_grad()
def tiles(gen: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> None:
    """Median ms of each candidate at each shape and token count (summed over the shapes: one layer's
    products, roughly), and whether a row's bits are the same at every token count; bf16's candidates on
    its products, or fp32's on the router's."""
    candidates, products = ((TILE_CANDIDATES, TILE_SHAPES) if dtype == torch.bfloat16
                            else (FP32_TILE_CANDIDATES, FP32_TILE_SHAPES))
    shapes = []
    for name, N, K, E in products:
        rows = TILE_TOKENS[-1] * (TOPK if E > 1 else 1)
        counts = random_counts(rows, gen) if E > 1 else None
        x = torch.randn(rows, K, generator=gen, device="cuda").to(dtype)
        w = (torch.randn(E, N, K, generator=gen, device="cuda") * K**-0.5).to(dtype)
        shapes.append((name, x, w, counts))
    header = "".join(f"{f'M={m} ms':>12}" for m in TILE_TOKENS)
    print(f"{'tile (m, n, k, warps, stages)':<32}{header}  invariant; bits of today's tile")
    per_shape: dict[str, list[tuple[str, list[float]]]] = {name: [] for name, *_ in shapes}
    today = {name: _grouped_mm(x, w, counts, candidates[0]) for name, x, w, counts in shapes}
    for c in candidates:
        tile = f"({c.block_m}, {c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages})"
        totals, broken, other_bits = [0.0] * len(TILE_TOKENS), [], []
        for name, x, w, counts in shapes:
            try:
                full = _grouped_mm(x, w, counts, c)
                if not torch.equal(full, today[name]):  # a tile with today's bits may serve any M beside it
                    other_bits.append(name)
                times = []
                for m in TILE_TOKENS:
                    if counts is None:
                        sub_x, sub_counts, rows = x[:m], None, slice(0, m)
                    else:  # about m tokens' rows: a random subset, each expert's rows a subset of its group
                        mask, sub_counts = row_subset(counts, m / TILE_TOKENS[-1], gen)
                        sub_x, rows = x[mask], mask
                    times.append(do_bench(lambda: _grouped_mm(sub_x, w, sub_counts, c), warmup=5, rep=25,
                                          return_mode="median"))
                    if not torch.equal(_grouped_mm(sub_x, w, sub_counts, c), full[rows]):
                        broken.append(f"{name} M={m}")
                totals = [t + u for t, u in zip(totals, times)]
                per_shape[name].append((tile, times))
            except Exception as e:  # noqa: BLE001 - a tile the compiler refuses (shared memory): report it
                broken.append(f"{name}: {type(e).__name__}")
        verdict = "yes" if not broken else ", ".join(broken)
        same = "same" if not other_bits else "differ: " + ", ".join(other_bits)
        print(f"{tile:<32}" + "".join(f"{t:>12.3f}" for t in totals) + f"  {verdict}; {same}")
        if broken:
            FAILURES.append(f"tile {tile}")
    # a tile may depend on the weight's (N, K), never on M: training and the engine share it whatever M is
    for name, rows in per_shape.items():
        print(f"\n{name}:\n{'tile':<32}{header}")
        for tile, times in rows:
            print(f"{tile:<32}" + "".join(f"{t:>12.3f}" for t in times))


# -- --slices: the split of K -----------------------------------------------------------------------

@torch.no_grad()
def slices(gen: torch.Generator) -> None:
    """Per product shape and token count, µs from CUDA graphs (no launch overhead, as decode steps run):
    the K slices `k_slices` chooses, computed a program per slice and summed after, or summed in place,
    against one slice (the kernel unsliced); whether both forms give the same bits, and a row its bits at
    every token count."""
    from triton.testing import do_bench_cudagraph
    print(f"{'product':<18}{'tokens':>8}{'slices':>10}{'unsliced':>10}{'split':>9}{'in place':>10}  same bits")
    for name, N, K, E in TILE_SHAPES:
        rows = TILE_TOKENS[-1] * (TOPK if E > 1 else 1)
        counts = random_counts(rows, gen) if E > 1 else None
        x = torch.randn(rows, K, generator=gen, device="cuda").bfloat16()
        w = (torch.randn(E, N, K, generator=gen, device="cuda") * K**-0.5).bfloat16()
        chosen = k_slices(E, N, K)
        full = _grouped_mm(x, w, counts)
        for m in TILE_TOKENS:
            if counts is None:
                sub_x, sub_counts, sub = x[:m], None, slice(0, m)
            else:
                sub, sub_counts = row_subset(counts, m / TILE_TOKENS[-1], gen)
                sub_x = x[sub]
            forms = {"unsliced": {"slices": (1, -(-K // SLICE_ALIGN) * SLICE_ALIGN)}, "split": {"split": True},
                     "in place": {"split": False}}
            times = {label: 1e3 * do_bench_cudagraph(lambda kw=kw: _grouped_mm(sub_x, w, sub_counts, **kw), rep=20)
                     for label, kw in forms.items()}
            outs = [_grouped_mm(sub_x, w, sub_counts, **forms[label]) for label in ("split", "in place")]
            same = torch.equal(outs[0], outs[1]) and torch.equal(outs[1], full[sub])
            if not same:
                FAILURES.append(f"slices {name} M={m}")
            print(f"{name:<18}{m:>8}{f'{chosen[0]}x{chosen[1]}':>10}" + "".join(
                f"{times[label]:>{width}.1f}" for label, width in (("unsliced", 10), ("split", 9), ("in place", 10)))
                + f"  {'yes' if same else 'NO'}")


# -- --attention-tiles: the bf16 attention tile ---------------------------------------------------

ATTENTION_CANDIDATES = (
    AttentionConfig(block_m=64, num_warps=4, num_stages=2),  # the tile today
    AttentionConfig(block_m=16, num_warps=4, num_stages=2),  # decode: G = 4 rows of a query's heads
    AttentionConfig(block_m=32, num_warps=4, num_stages=2),
    AttentionConfig(block_m=64, num_warps=4, num_stages=3),
    AttentionConfig(block_m=128, num_warps=8, num_stages=2),
    AttentionConfig(block_m=128, num_warps=8, num_stages=3),
)


@torch.no_grad()
def attention_tiles(seq_len: int, gen: torch.Generator) -> None:
    """Median ms of each candidate tile (key blocks of KEY_BLOCK) on Ring-mini's heads: decodes of 64
    sequences of 2·seq_len keys, a prefill chunk of seq_len after seq_len, a training batch of 8 × seq_len;
    and whether a sequence's queries get the same bits as single decode steps and as a chunk after a
    prefix as in its training forward."""
    scale = HEAD_DIM**-0.5

    def inputs(B: int, Tq: int, Tk: int):
        """B sequences of Tk keys (each one page, as training passes them), their last Tq queries."""
        q = torch.randn(B * Tq, HEADS, HEAD_DIM, generator=gen, device="cuda").bfloat16()
        k, v = (torch.randn(B, Tk, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").bfloat16() for _ in range(2))
        table = torch.arange(B, device="cuda")[:, None]
        return (q, k, v, table, torch.zeros(B, dtype=torch.long, device="cuda"),
                torch.full((B,), Tk, device="cuda"), torch.arange(B + 1, device="cuda") * Tq)

    shapes = {f"decode 64x{2 * seq_len}": inputs(64, 1, 2 * seq_len),
              f"chunk {seq_len} after {seq_len}": inputs(1, seq_len, 2 * seq_len),
              f"train 8x{seq_len}": inputs(8, seq_len, seq_len)}
    q, k, v, *rest = inputs(1, seq_len, seq_len)
    picks = [0, KEY_BLOCK - 1, KEY_BLOCK, seq_len // 2, seq_len - 1]
    print(f"{'tile (rows, warps, stages)':<30}" + "".join(f"{name + ' ms':>24}" for name in shapes) + "  invariant")
    for c in ATTENTION_CANDIDATES:
        try:
            times = [do_bench(lambda x=x: key_block_attention(*x, scale, config=c), warmup=5, rep=25,
                              return_mode="median") for x in shapes.values()]
            whole = key_block_attention(q, k, v, *rest, scale, config=c)
            one, start = torch.ones(1, dtype=torch.long, device="cuda"), torch.tensor([0, 1], device="cuda")
            decodes = [key_block_attention(q[t:t + 1], k[:, :t + 1], v[:, :t + 1], rest[0], rest[1], one * (t + 1),
                                           start, scale, config=c) for t in picks]
            half = seq_len // 2
            chunk = key_block_attention(q[half:], k, v, *rest[:3], start * (seq_len - half), scale, config=c)
            ok = torch.equal(torch.cat(decodes), whole[picks]) and torch.equal(chunk, whole[half:])
            verdict = "yes" if ok else "NO"
        except Exception as e:  # noqa: BLE001 - a tile the compiler refuses (shared memory): report it
            times, verdict = [float("nan")] * len(shapes), f"{type(e).__name__}: {str(e)[:60]}"
        tile = f"({c.block_m}, {c.num_warps}, {c.num_stages})"
        print(f"{tile:<30}" + "".join(f"{t:>24.3f}" for t in times) + f"  {verdict}")
        if verdict != "yes":
            FAILURES.append(f"attention tile {tile}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes: a smoke test of every case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiles", action="store_true", help="time and check the candidate bf16 GEMM tiles instead")
    parser.add_argument("--fp32-tiles", action="store_true", help="time and check the candidate fp32 GEMM tiles "
                        "(the router's product) instead")
    parser.add_argument("--attention-tiles", action="store_true",
                        help="time and check the candidate bf16 attention tiles instead")
    parser.add_argument("--slices", action="store_true",
                        help="time and check the GEMM's split of K (k_slices) in both forms instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_invariant needs a CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references and the fast fp32 path in IEEE fp32
    gen = torch.Generator("cuda").manual_seed(args.seed)
    rows, seq_len = (1024, 512) if args.quick else (8192, 2048)
    if args.tiles or args.fp32_tiles or args.attention_tiles or args.slices:
        if args.tiles or args.fp32_tiles:
            tiles(gen, torch.bfloat16 if args.tiles else torch.float32)
        else:
            attention_tiles(seq_len, gen) if args.attention_tiles else slices(gen)
        print(f"\n{'FAIL: ' + ', '.join(FAILURES) if FAILURES else 'every choice batch-invariant'}")
        return 1 if FAILURES else 0
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GEMM tiles bf16 {mm_config(torch.bfloat16)} "
        f"(from {LARGE_TILE_ROWS} rows {mm_config(torch.bfloat16, LARGE_TILE_ROWS, torch.device('cuda'))}), "
        f"fp32 {mm_config(torch.float32)}; attention tile bf16 {attention_config(torch.bfloat16)}")
    case("grouped mm gate/up", lambda: check_grouped_mm(rows, INTER, HIDDEN, gen))
    case("grouped mm down", lambda: check_grouped_mm(rows, HIDDEN, INTER, gen))
    case("routed experts", lambda: check_routed_experts(rows // (4 * TOPK), gen))
    case("linear bf16", lambda: check_linear(rows // 2, HIDDEN, HIDDEN, torch.bfloat16, gen))
    case("linear fp32", lambda: check_linear(rows // 2, EXPERTS, HIDDEN, torch.float32, gen))
    case("lm_head bf16", lambda: check_linear(rows // 8, VOCAB, HIDDEN, torch.bfloat16, gen))
    case("row ops, experts", lambda: check_rows(rows, EXPERTS, gen))
    case("row ops, vocab", lambda: check_rows(rows // 8, VOCAB, gen))
    case("attention", lambda: check_attention(seq_len, gen))
    case("gradients", lambda: check_gradients(gen))
    case("topk", lambda: check_topk(gen))
    table = timings(rows // TOPK * (1 if args.quick else 4), seq_len, gen)
    print(f"\n{'ms (median; old: one call)':<44}{'kernels':>10}{'fast':>10}{'kern/fast':>11}{'old aligned':>13}"
          f"{'old/kern':>10}")
    for name, ours, fast, old in table:
        before = f"{old:>13.2f}{old / ours:>9.1f}x" if old is not None else f"{'-':>13}{'':>10}"
        print(f"{name:<44}{ours:>10.3f}{fast:>10.3f}{ours / fast:>10.1f}x{before}")
    print(f"\n{'FAIL: ' + ', '.join(FAILURES) if FAILURES else 'all checks PASS'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
