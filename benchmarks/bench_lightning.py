"""Lightning attention kernels on one GPU: full-size correctness, then speed side by side with
flash-linear-attention (fla 0.6.0), flood's seg_la and PyTorch SDPA, against the measured hardware floor.

    python benchmarks/bench_lightning.py [--commit SHA] [--out DIR] [--seg-la FILE] [--only prefill|tree]

Correctness: our kernels and fla's `chunk_simple_gla` against the float64 chunked reference, at the
benchmark shapes (bf16, H = 16, D = 128, Ring-mini layer-0 decays, λ from 0.49 to 0.996), with initial
and final states, gradients, varlen with 1-token and empty sequences, and the decode step.
Speed: `triton.testing.do_bench` medians; the decode step replayed from CUDA graphs. The floor of
each op is max(FLOPs / measured bf16 GEMM rate, bytes / measured copy bandwidth).
Prefill: what the engine calls, `lightning_attn` on packed sequences from a fresh state with the
final states out and the longest length given (no host sync), beside flood's `seg_la_fwd` (loaded
from --seg-la, a copy of alipay/PainlessInferenceAcceleration's flood/flood/ops/seg_la.py kept out
of the repository; default .baseline/seg_la.py) and fla with cu_seqlens. Each is timed twice:
do_bench (device time between events, the L2 flushed before each call) and back to back (wall time
per call of 200 calls in a row, then one sync: what a host-bound caller sees).
Tree verify: N sequences each verifying a 16-token draft tree (TREE_PARENTS) over its prefix state,
no state written: `lightning_tree_verify` beside seg_la's tree-mask kernel (`meta.mask`), both
against the float64 quadratic reference; then the fold of a 4-token accepted path into the states.
Timed as a verify step runs them, replayed from a CUDA graph (and eagerly back to back).
Results go to stdout (tables last) and to DIR/bench_lightning.json (DIR: --out, else $OUT, else .).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from ringlinear.config import alibi_slopes
from ringlinear.ops import lightning_attn, lightning_decode
from ringlinear.ops.lightning import (lightning_attn_chunked, lightning_decode_reference, lightning_tree_fold,
                                      lightning_tree_verify)
from ringlinear.ops.lightning.tree_reference import lightning_tree_verify_quadratic
from ringlinear.ops.tree import tree_ancestors
from ringlinear.ops.lightning.chunk import KernelConfig, _chunk_kernel, _local_state_kernel, lightning_attn_triton
from ringlinear.ops.lightning.decode import _decode_kernel, lightning_decode_triton

H, D = 16, 128
SHAPES = [(16, 4096), (4, 16384), (1, 65536)]
# packed prefill batches: name -> sequence lengths
PREFILL = {"B1x1K": [1024], "B1x4K": [4096], "B1x16K": [16384], "B1x64K": [65536], "B8x4K": [4096] * 8,
           "16 mixed 256-4K": torch.randint(256, 4097, (16,), generator=torch.Generator().manual_seed(0)).tolist()}
DECODE_BATCHES = [1, 64, 256]
# a 16-token draft tree: the root, 3 children, 2 under each, then one under each of those (depth 3)
TREE_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9]
TREE_SEQS = [16, 64]
# (block_v, num_warps, fwd_stages, bwd_stages, local_stages); the first is the default for bf16 at D = 128
CONFIGS = [KernelConfig(64, 4, 3, 2, 3), KernelConfig(64, 4, 2, 2, 3), KernelConfig(64, 4, 3, 2, 2),
           KernelConfig(64, 4, 3, 2, 4), KernelConfig(64, 8, 2, 2, 3), KernelConfig(128, 8, 2, 2, 3),
           KernelConfig(32, 4, 3, 2, 3)]
T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bench(fn, warmup=25, rep=100) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


class Report:
    def __init__(self, out_dir: str, meta: dict):
        self.path = os.path.join(out_dir, "bench_lightning.json")
        self.data = {"meta": meta, "ceilings": {}, "checks": [], "timings": [], "kernels": []}

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)

    def check(self, name: str, err: float, tol: float):
        ok = err <= tol
        self.data["checks"].append(dict(name=name, rel_err=err, tol=tol, ok=ok))
        log(f"check {name:58s} rel {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")

    def time(self, op: str, shape: str, variant: str, ms: float, flops: float, bytes_: float, floor_ms: float,
             baseline_ms: float | None = None):
        row = dict(op=op, shape=shape, variant=variant, ms=ms, tflops=flops / ms / 1e9, tbps=bytes_ / ms / 1e9,
                   floor_ms=floor_ms, x_floor=ms / floor_ms,
                   speedup_vs_fla=None if baseline_ms is None else baseline_ms / ms)
        self.data["timings"].append(row)
        sp = "" if baseline_ms is None else f"  {baseline_ms / ms:5.2f}x fla"
        log(f"time {op:8s} {shape:10s} {variant:34s} {ms * 1e3:9.1f} us {row['tflops']:6.1f} TFLOP/s "
            f"{row['tbps']:5.2f} TB/s {row['x_floor']:5.2f}x floor{sp}")
        self.save()
        return ms


def ceilings(rep: Report) -> tuple[float, float]:
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / bench(lambda: y.copy_(x)) / 1e9  # TB/s, bytes read + written
    del x, y
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    peak = 2 * 8192**3 / bench(lambda: a @ b) / 1e9  # TFLOP/s
    rep.data["ceilings"] = dict(copy_tbps=bw, bf16_gemm_tflops=peak)
    log(f"ceilings: copy {bw:.2f} TB/s, bf16 GEMM 8192^3 {peak:.0f} TFLOP/s")
    return bw, peak


def log_decay() -> torch.Tensor:
    return -torch.tensor(alibi_slopes(H), device="cuda") * (1 + 1e-5)  # layer 0 of Ring-mini


def qkv(B, T, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(requires_grad)
            for _ in range(3)]


def reference(q, k, v, g, h0, offsets=None):
    """float64 chunked reference (per sequence for varlen)."""
    q, k, v = (x.double() for x in (q, k, v))
    h0 = None if h0 is None else h0.double()
    if offsets is None:
        return lightning_attn_chunked(q, k, v, g.double(), None, h0)
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        o, f = lightning_attn_chunked(q[:, a:b], k[:, a:b], v[:, a:b], g.double(), None,
                                      None if h0 is None else h0[n:n + 1])
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, 1), torch.cat(finals)


def check_chunk(rep: Report, fla, B: int, T: int, offsets: list[int] | None = None):
    """Forward, final state and all gradients against float64; the forward against fla too."""
    name = f"B{B}xT{T}" if offsets is None else f"varlen N={len(offsets) - 1}"
    g = log_decay()
    N = B if offsets is None else len(offsets) - 1
    cu = None if offsets is None else torch.tensor(offsets, device="cuda", dtype=torch.int32)
    q, k, v = qkv(B, T, requires_grad=True, seed=1)
    h0 = (0.1 * torch.randn(N, H, D, D, device="cuda")).requires_grad_()
    o, ht = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad([o, ht], [q, k, v, h0], [do, dht])
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, h0)]
    ro, rh = reference(*leaves[:3], g, leaves[3], offsets)
    ref_grads = torch.autograd.grad([ro, rh], leaves, [do.double(), dht.double()])
    rep.check(f"fwd o      {name}", rel(o, ro), 5e-3)
    rep.check(f"fwd final  {name}", rel(ht, rh), 5e-3)
    for n_, a, b in zip(("dq", "dk", "dv", "dh0"), grads, ref_grads):
        rep.check(f"bwd {n_:6s} {name}", rel(a, b), 5e-3)
    if fla is not None:
        fo, fh = fla.chunk_simple_gla(q.detach(), k.detach(), v.detach(), g_gamma=g, scale=D**-0.5,
                                      initial_state=h0.detach(), output_final_state=True,
                                      cu_seqlens=None if cu is None else cu.long())
        rep.check(f"fla o vs float64 {name}", rel(fo, ro), 5e-3)
        rep.check(f"fla final vs float64 {name}", rel(fh, rh), 5e-3)
        rep.check(f"ours o vs fla {name}", rel(o, fo), 1e-2)
        rep.check(f"ours final vs fla {name}", rel(ht, fh), 1e-2)


def check_decode(rep: Report, fla):
    N, pool = 64, 160
    g = log_decay()
    q, k, v = (torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(pool, H, D, D, device="cuda")
    slots = torch.randperm(pool, device="cuda")[:N]
    ref_state = state.double()
    ref_o = lightning_decode_reference(q.double(), k.double(), v.double(), g, ref_state, slots)
    before = state.clone()
    o = lightning_decode(q, k, v, g, state, slots)
    rep.check("decode o (N=64, slots scattered in a pool of 160)", rel(o, ref_o), 5e-3)
    rep.check("decode state", rel(state, ref_state), 1e-6)
    untouched = torch.ones(pool, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    rep.check("decode slots outside `slots` untouched", float(not torch.equal(state[untouched], before[untouched])), 0)
    if fla is not None:
        fo, _ = fla.fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=g, scale=D**-0.5,
                                               initial_state=before[slots], output_final_state=True)
        rep.check("decode ours vs fla fused_recurrent", rel(o, fo[:, 0]), 1e-2)


def chunk_costs(B: int, T: int, bw: float, peak: float) -> dict:
    """FLOPs (tensor-core work of the chunked algorithm, C = 64, causal half of the intra-chunk
    products) and fewest bytes, forward and forward + backward (three more scans)."""
    tokens_heads = B * T * H
    fwd_flops = tokens_heads * (4 * D * D + 2 * 64 * D)
    elems = B * T * H * D * 2  # bytes of one bf16 [B, T, H, D] tensor
    fwd_bytes, fb_bytes = 4 * elems, 4 * elems + 7 * elems  # + bwd reads q, k, v, do, writes dq, dk, dv
    return dict(fwd=(fwd_flops, fwd_bytes, max(fwd_flops / peak / 1e9, fwd_bytes / bw / 1e9)),
                fwdbwd=(4 * fwd_flops, fb_bytes, max(4 * fwd_flops / peak / 1e9, fb_bytes / bw / 1e9)))


def time_chunk(rep: Report, fla, B: int, T: int, bw: float, peak: float) -> dict:
    shape = f"B{B}xT{T // 1024}K"
    g = log_decay()
    costs = chunk_costs(B, T, bw, peak)
    q, k, v = qkv(B, T, requires_grad=True)
    do = torch.randn_like(q)
    out = {}

    def fwd(**kw):
        return lambda: lightning_attn_triton(q, k, v, g, None, None, False, None, None, **kw)

    def fwdbwd(**kw):
        def step():
            o, _ = lightning_attn_triton(q, k, v, g, None, None, False, None, None, **kw)
            o.backward(do)
        return step

    def t(op, variant, fn, base=None):
        flops, bytes_, floor = costs[op]
        ms = bench(fn) if op == "fwd" else do_bench(fn, warmup=25, rep=100, grad_to_none=[q, k, v],
                                                     return_mode="median")
        return rep.time(op, shape, variant, ms, flops, bytes_, floor, base)

    with torch.no_grad():
        fla_fwd = None
        if fla is not None:
            fla_fwd = t("fwd", "fla chunk_simple_gla", lambda: fla.chunk_simple_gla(q, k, v, g_gamma=g, scale=D**-0.5))
        out["fwd"] = t("fwd", "ours (default)", fwd(), fla_fwd)
        t("fwd", "ours via lightning_attn()", lambda: lightning_attn(q, k, v, g), fla_fwd)
        for cfg in CONFIGS:
            t("fwd", f"ours BV{cfg.block_v} w{cfg.num_warps} s{cfg.fwd_stages} local s{cfg.local_stages}",
              fwd(config=cfg), fla_fwd)
        for seg in sorted(s for s in {2048, 4096, 8192, T} if s <= T):
            t("fwd", f"ours seg_len {seg}" + (" (no split)" if seg == T else ""), fwd(seg_len=seg), fla_fwd)
        out["fwd_repeat"] = t("fwd", "ours (default, again)", fwd(), fla_fwd)
        out["fla_fwd"] = fla_fwd
    fla_fb = None
    if fla is not None:
        def fla_step():
            o, _ = fla.chunk_simple_gla(q, k, v, g_gamma=g, scale=D**-0.5)
            o.backward(do)
        fla_fb = t("fwdbwd", "fla chunk_simple_gla", fla_step)
    out["fwdbwd"] = t("fwdbwd", "ours (default)", fwdbwd(), fla_fb)
    for cfg in (KernelConfig(64, 4, 3, 3, 3), KernelConfig(64, 4, 3, 2, 2), KernelConfig(64, 8, 2, 2, 3)):
        t("fwdbwd", f"ours BV{cfg.block_v} w{cfg.num_warps} s{cfg.fwd_stages}/{cfg.bwd_stages} local s{cfg.local_stages}",
          fwdbwd(config=cfg), fla_fb)
    t("fwdbwd", "ours seg_len T (no split)", fwdbwd(seg_len=T), fla_fb)
    out["fla_fwdbwd"] = fla_fb
    out["sdpa"] = time_sdpa(rep, B, T, peak)
    return out


def time_sdpa(rep: Report, B: int, T: int, peak: float) -> float | None:
    """The softmax layer a linear one replaces: causal GQA, 16 query / 4 kv heads, forward."""
    try:
        with torch.no_grad():
            q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, 4, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            flops = 4 * B * H * T * T * D / 2
            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    except Exception:
        log(f"SDPA B{B}xT{T} failed:\n{traceback.format_exc()}")
        return None
    return rep.time("sdpa", f"B{B}xT{T // 1024}K", "SDPA causal GQA 16q/4kv fwd", ms, flops,
                    (2 * H + 8) * B * T * D * 2, flops / peak / 1e9)


def load_seg_la(path: str | None):
    """flood's seg_la module from a file, or None (with the reason logged)."""
    if not path or not os.path.exists(path):
        log(f"seg_la: no file {path!r}; its columns stay empty")
        return None
    spec = importlib.util.spec_from_file_location("seg_la", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def back_to_back(fn, calls: int = 200) -> float:
    """ms per call of `calls` calls in a row and one sync at the end: max(host, device) time."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def prefill_inputs(lengths: list[int]):
    offsets = [0] + torch.tensor(lengths).cumsum(0).tolist()
    q, k, v = qkv(1, offsets[-1], seed=2)
    return offsets, torch.tensor(offsets, device=q.device, dtype=torch.int32), q, k, v


def seg_la_call(seg_la, q, k, v, g, offsets, cu):
    """seg_la_fwd on packed [tokens, H, D] from fresh states (s_scales 0) into a state cache of N slots."""
    N = len(offsets) - 1
    lengths = cu[1:] - cu[:-1]
    meta = SimpleNamespace(batch_size=N, max_q_length=max(b - a for a, b in itertools.pairwise(offsets)),
                           q_offsets=cu[:-1].contiguous(), q_lengths=lengths,
                           s_offsets=torch.arange(N, device=q.device, dtype=torch.int32),
                           s_scales=torch.zeros(N, device=q.device, dtype=torch.int32), mask=None)
    s = torch.empty(N, H, D, D, device=q.device)
    decay_scales = (-g).contiguous()

    def call():
        return seg_la.seg_la_fwd(q[0], k[0], v[0], s, decay_scales, meta, softmax_scale=D**-0.5)
    return call, s


def check_prefill(rep: Report, fla, seg_la):
    """The prefill calls (fresh state, final state out) against float64: ours with and without
    max_seqlen, seg_la and fla, on a packed batch of mixed lengths."""
    lengths = [1000, 1, 2500, 64, 333]
    offsets, cu, q, k, v = prefill_inputs(lengths)
    g = log_decay()
    ro, rh = reference(q, k, v, g, None, offsets)
    with torch.no_grad():
        for name, kw in (("max_seqlen given", {"max_seqlen": max(lengths)}), ("offsets read", {})):
            o, ht = lightning_attn(q, k, v, g, output_final_state=True, cu_seqlens=cu, **kw)
            rep.check(f"prefill o     ours, {name}", rel(o, ro), 5e-3)
            rep.check(f"prefill final ours, {name}", rel(ht, rh), 5e-3)
        if seg_la is not None:
            call, s = seg_la_call(seg_la, q, k, v, g, offsets, cu)
            rep.check("seg_la prefill o vs float64", rel(call(), ro[0]), 5e-3)
            rep.check("seg_la prefill final vs float64", rel(s, rh), 5e-3)
        if fla is not None:
            fo, fh = fla.chunk_simple_gla(q, k, v, g_gamma=g, scale=D**-0.5, output_final_state=True,
                                          cu_seqlens=cu.long())
            rep.check("fla prefill o vs float64", rel(fo, ro), 5e-3)
            rep.check("fla prefill final vs float64", rel(fh, rh), 5e-3)


def time_prefill(rep: Report, fla, seg_la, name: str, lengths: list[int], bw: float, peak: float) -> dict:
    offsets, cu, q, k, v = prefill_inputs(lengths)
    g = log_decay()
    longest = max(lengths)
    T = offsets[-1]
    flops, bytes_, floor = chunk_costs(1, T, bw, peak)["fwd"]
    calls = {"ours": lambda: lightning_attn(q, k, v, g, output_final_state=True, cu_seqlens=cu, max_seqlen=longest),
             "ours, offsets read (host sync)": lambda: lightning_attn(q, k, v, g, output_final_state=True,
                                                                      cu_seqlens=cu)}
    if seg_la is not None:
        calls["seg_la"] = seg_la_call(seg_la, q, k, v, g, offsets, cu)[0]
    if fla is not None:
        calls["fla"] = lambda: fla.chunk_simple_gla(q, k, v, g_gamma=g, scale=D**-0.5, output_final_state=True,
                                                    cu_seqlens=cu.long())
    if len(lengths) == 1:  # the segment plan and configs at B = 1
        for seg in sorted(seg for seg in {256, 512, 1024, 2048, 4096, 8192, T} if T // 16 <= seg <= T):
            calls[f"ours seg_len {seg}"] = lambda seg=seg: lightning_attn_triton(q, k, v, g, None, None, True, cu,
                                                                                  longest, seg_len=seg)
        for cfg in CONFIGS[1:4] + CONFIGS[6:]:
            calls[f"ours BV{cfg.block_v} w{cfg.num_warps} s{cfg.fwd_stages} local s{cfg.local_stages}"] = (
                lambda cfg=cfg: lightning_attn_triton(q, k, v, g, None, None, True, cu, longest, config=cfg))
    out = {}
    with torch.no_grad():
        for variant, fn in calls.items():
            ms = rep.time("prefill", name, variant, bench(fn), flops, bytes_, floor)
            wall = back_to_back(fn)
            rep.data["timings"][-1]["back_to_back_ms"] = wall
            log(f"      back to back: {wall * 1e3:9.1f} us per call")
            out[variant] = (ms, wall)
    out["floor"] = floor
    return out


def tree_inputs(N: int):
    """N trees of TREE_PARENTS packed along T, random prefix states in a pool of N + 1 slots (slot n + 1)."""
    m = len(TREE_PARENTS)
    q, k, v = (x[0] for x in qkv(1, N * m, seed=3))
    device = q.device
    query_start = torch.arange(0, N * m + 1, m, device=device)
    ancestors, depth = tree_ancestors(torch.tensor(TREE_PARENTS * N, device=device), query_start, m)
    pool = torch.randn(N + 1, H, D, D, device=device, generator=torch.Generator(device).manual_seed(4)) * 0.1
    slots = torch.arange(1, N + 1, device=device, dtype=torch.int32)
    return q, k, v, pool, slots, ancestors, depth, query_start


def seg_la_tree_call(seg_la, q, k, v, g, pool, ancestors, N: int):
    """seg_la_fwd with a tree mask: [N, m, m] ancestors-or-self, from the prefix states (s_scales 1)."""
    m = len(TREE_PARENTS)
    bits = (ancestors.view(N, m)[..., None] >> torch.arange(m, device=q.device)) & 1
    s = pool[1:].clone()
    meta = SimpleNamespace(batch_size=N, max_q_length=m, mask=bits.to(torch.int32).contiguous(),
                           q_offsets=torch.arange(0, N * m, m, device=q.device, dtype=torch.int32),
                           q_lengths=torch.full((N,), m, device=q.device, dtype=torch.int32),
                           s_offsets=torch.arange(N, device=q.device, dtype=torch.int32),
                           s_scales=torch.ones(N, device=q.device, dtype=torch.int32))
    decay_scales = (-g).contiguous()
    return lambda: seg_la.seg_la_fwd(q, k, v, s, decay_scales, meta, softmax_scale=D**-0.5)


def time_tree(rep: Report, seg_la, N: int, bw: float) -> dict:
    """Tree verify of N 16-token trees (ours, seg_la) checked against float64, timed; the fold of a 4-token path."""
    m = len(TREE_PARENTS)
    q, k, v, pool, slots, ancestors, depth, query_start = tree_inputs(N)
    g = log_decay()
    ref = lightning_tree_verify_quadratic(*(x.double() for x in (q, k, v)), g.double(), pool.double(), slots,
                                          ancestors, depth, query_start)
    calls = {"ours": lambda: lightning_tree_verify(q, k, v, g, pool, slots, ancestors, depth, query_start, m)}
    if seg_la is not None:
        calls["seg_la"] = seg_la_tree_call(seg_la, q, k, v, g, pool, ancestors, N)
    bytes_ = 4 * N * m * H * D * 2 + N * H * D * D * 4  # q, k, v, o once and the prefix states read
    flops = N * H * (2 * m * m * D * 2 + 2 * m * D * D)
    floor = bytes_ / bw / 1e9
    out = {"floor": floor}
    with torch.no_grad():
        for variant, fn in calls.items():
            rep.check(f"tree verify N{N} {variant} vs float64", rel(fn(), ref), 5e-3)
            # as a verify step runs them: 16 layers' calls replayed from one CUDA graph (no launch overhead)
            ms = rep.time("tree verify", f"N{N}x{m}", variant, graph_time(lambda i, fn=fn: fn(), 16), flops,
                          bytes_, floor)
            out[variant] = (ms, back_to_back(fn))
        path = torch.tensor([[0, 1, 4, 10]], device=q.device) + torch.arange(0, N * m, m, device=q.device)[:, None]
        counts = torch.full((N,), 4, device=q.device)
        fold_pool = pool.clone()

        def fold():
            lightning_tree_fold(k, v, g, fold_pool, slots, path, counts)
        fold_bytes = 2 * N * H * D * D * 4
        ms = rep.time("tree fold", f"N{N}x4", "ours", graph_time(lambda i: fold(), 16), 0, fold_bytes,
                      fold_bytes / bw / 1e9)
        out["fold"] = (ms, back_to_back(fold))
        out["fold floor"] = fold_bytes / bw / 1e9
    return out


def graph_time(step, layers: int) -> float:
    """Per-step time of `layers` decode steps (one per layer's state pool) replayed from one CUDA graph."""
    for i in range(layers):
        step(i)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            step(i)
    return bench(graph.replay) / layers


def time_decode(rep: Report, fla, N: int, bw: float, peak: float) -> dict:
    g = log_decay()
    state_bytes = N * H * D * D * 4
    layers = min(64, max(2, math.ceil(200e6 / state_bytes)))  # > 4x the 50 MB L2 in flight per replay
    pools = [torch.randn(N, H, D, D, device="cuda") * 0.1 for _ in range(layers)]
    slots = [torch.randperm(N, device="cuda") for _ in range(layers)]
    xs = [[torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)] for _ in range(layers)]
    bytes_ = 2 * state_bytes + 4 * N * H * D * 2
    flops = 4 * N * H * D * D
    floor = bytes_ / bw / 1e9
    shape = f"B{N}"
    out = {}
    with torch.no_grad():
        fla_ms = fla_1 = None
        if fla is not None:
            def fla_step(i):
                q, k, v = xs[i]
                fla.fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=g, scale=D**-0.5,
                                               initial_state=pools[i], output_final_state=True)
            fla_ms = rep.time("decode", shape, f"fla fused_recurrent, graph of {layers}", graph_time(fla_step, layers),
                              flops, bytes_, floor)
            fla_1 = rep.time("decode", shape, "fla fused_recurrent, graph of 1", graph_time(fla_step, 1), flops,
                             bytes_, floor)

        def ours(i):
            q, k, v = xs[i]
            lightning_decode(q, k, v, g, pools[i], slots[i])

        def ours_block(block_v):
            def step(i):
                q, k, v = xs[i]
                lightning_decode_triton(q, k, v, g, pools[i], slots[i], block_v=block_v)
            return step
        out["decode"] = rep.time("decode", shape, f"ours, graph of {layers}", graph_time(ours, layers), flops,
                                 bytes_, floor, fla_ms)
        out["decode_1"] = rep.time("decode", shape, "ours, graph of 1", graph_time(ours, 1), flops, bytes_, floor,
                                   fla_1)
        for bv in (8, 16, 32, 64, 128):
            rep.time("decode", shape, f"ours BV{bv}, graph of {layers}", graph_time(ours_block(bv), layers), flops,
                     bytes_, floor, fla_ms)
        out["fla_decode"], out["fla_decode_1"] = fla_ms, fla_1
    return out


def kernel_resources(rep: Report):
    """Registers, spills and shared memory of every compiled variant (from Triton's cache)."""
    for fn in (_chunk_kernel, _local_state_kernel, _decode_kernel):
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                kernel = kernel.result() if hasattr(kernel, "result") else kernel
                md = kernel.metadata
                consts = getattr(getattr(kernel, "src", None), "constexprs", None) or {}
                names = {fn.arg_names[k[0]]: v for k, v in consts.items()
                         if isinstance(k, tuple) and fn.arg_names[k[0]].isupper() and fn.arg_names[k[0]] != "H"}
                row = dict(kernel=fn.__name__, regs=kernel.n_regs, spills=kernel.n_spills, shared=md.shared,
                           warps=md.num_warps, stages=md.num_stages, constexprs=str(names))
                rep.data["kernels"].append(row)
                log(f"kernel {fn.__name__:20s} regs {kernel.n_regs:3d} spills {kernel.n_spills:3d} "
                    f"smem {md.shared:6d} warps {md.num_warps} stages {md.num_stages} {names}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--seg-la", default=".baseline/seg_la.py", help="flood's seg_la.py (baseline)")
    parser.add_argument("--only", choices=("all", "prefill", "tree"), default="all",
                        help="prefill / tree: those checks and timings alone")
    args = parser.parse_args()
    try:
        import fla
        fla_version = getattr(fla, "__version__", "?")
        import fla.ops.simple_gla as fla_ops
    except Exception as e:  # noqa: BLE001 - the baselines are optional; say why they are absent
        fla_ops, fla_version = None, f"unavailable ({e!r})"
    props = torch.cuda.get_device_properties(0)
    import triton
    meta = dict(date=time.strftime("%Y-%m-%d"), device=props.name, sms=props.multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, fla=fla_version, commit=args.commit)
    rep = Report(args.out, meta)
    log(meta)
    bw, peak = ceilings(rep)
    seg_la = load_seg_la(args.seg_la)

    lengths = [1, 0, 20000, 3, 40000, 5532, 0]
    offsets = [0] + [sum(lengths[:i + 1]) for i in range(len(lengths))]
    summary, prefill, trees = {}, {}, {}
    sections = [(f"tree N{N}", lambda N=N: trees.__setitem__(N, time_tree(rep, seg_la, N, bw))) for N in TREE_SEQS]
    if args.only != "tree":
        sections += [("check prefill", lambda: check_prefill(rep, fla_ops, seg_la))]
        sections += [(f"prefill {name}", lambda name=name, lengths=lengths: prefill.__setitem__(
            name, time_prefill(rep, fla_ops, seg_la, name, lengths, bw, peak))) for name, lengths in PREFILL.items()]
    if args.only == "all":
        sections += [(f"check B{B}xT{T}", lambda B=B, T=T: check_chunk(rep, fla_ops, B, T)) for B, T in SHAPES]
        sections += [("check varlen", lambda: check_chunk(rep, fla_ops, 1, offsets[-1], offsets)),
                     ("check decode", lambda: check_decode(rep, fla_ops))]
        sections += [(f"decode B{N}", lambda N=N: summary.__setitem__(f"B{N}", time_decode(rep, fla_ops, N, bw,
                                                                                            peak)))
                     for N in DECODE_BATCHES]
        sections += [(f"chunk B{B}xT{T}", lambda B=B, T=T: summary.__setitem__((B, T), time_chunk(rep, fla_ops, B, T,
                                                                                                    bw, peak)))
                     for B, T in SHAPES]
    for name, run in sections:  # one failing section must not hide the others' results
        try:
            run()
        except Exception:
            log(f"section {name} FAILED:\n{traceback.format_exc()}")
            rep.data.setdefault("failures", []).append(name)
        torch.cuda.empty_cache()
    kernel_resources(rep)
    rep.save()

    print_summary(rep, summary, bw, peak)
    print_prefill(prefill)
    print_trees(trees)


def print_trees(trees: dict):
    print("\n| tree verify, 16-token trees | seg_la | ours | floor | fold of a 4-token path | fold floor |")
    print("|---|---|---|---|---|---|")
    for N, r in trees.items():
        cells = [r.get(v, (float("nan"), float("nan"))) for v in ("seg_la", "ours", "fold")]
        print(f"| N = {N} | {cells[0][0] * 1e3:.1f} ({cells[0][1] * 1e3:.1f}) | {cells[1][0] * 1e3:.1f} "
              f"({cells[1][1] * 1e3:.1f}) | {r['floor'] * 1e3:.1f} | {cells[2][0] * 1e3:.1f} ({cells[2][1] * 1e3:.1f}) "
              f"| {r['fold floor'] * 1e3:.1f} |")
    print("us: per call replayed from a CUDA graph of 16 calls (back to back, eager, per call)")


def print_prefill(prefill: dict):
    print("\n| prefill (fresh state, final state out) | seg_la | fla | ours | ours, offsets read | floor |")
    print("|---|---|---|---|---|---|")
    for name, r in prefill.items():
        cells = [r.get(v, (float("nan"), float("nan"))) for v in ("seg_la", "fla", "ours", "ours, offsets read (host sync)")]
        print(f"| {name} | " + " | ".join(f"{ms:.3f} ({wall:.3f})" for ms, wall in cells) + f" | {r['floor']:.3f} |")
    print("ms: do_bench median (back to back, per call)")


def print_summary(rep: Report, summary: dict, bw: float, peak: float):
    checks, meta = rep.data["checks"], rep.data["meta"]
    ours = [c["rel_err"] for c in checks if not c["name"].startswith("fla")]
    print(f"\nchecks: {sum(c['ok'] for c in checks)}/{len(checks)} ok; worst of ours: rel err {max(ours, default=0):.2e}; "
          f"failed sections: {rep.data.get('failures', [])}")
    print(f"ceilings: copy {bw:.2f} TB/s, bf16 GEMM {peak:.0f} TFLOP/s; {meta['device']}, torch {meta['torch']}, "
          f"triton {meta['triton']}, fla {meta['fla']}, commit {meta['commit']}")
    print("\n| op | shape | fla | ours | speedup (target) | floor | ours / floor |")
    print("|---|---|---|---|---|---|---|")
    for B, T in SHAPES:
        r, name = summary.get((B, T)), f"B{B}xT{T // 1024}K"
        if r is None:
            continue
        costs = chunk_costs(B, T, bw, peak)
        for op, key, target in (("fwd", "fwd", 3.0), ("fwd+bwd", "fwdbwd", 2.0)):
            f, o, fl = r[f"fla_{key}"], r[key], costs[key][2]
            sp = f"{f / o:.2f}x" if f else "-"
            print(f"| {op} | {name} | {f or float('nan'):.3f} ms | {o:.3f} ms | {sp} ({target:.0f}x) | {fl:.3f} ms | "
                  f"{o / fl:.1f} |")
        if r["sdpa"]:
            print(f"| SDPA causal GQA fwd | {name} | | {r['sdpa']:.3f} ms | | | |")
    for N in DECODE_BATCHES:
        r = summary.get(f"B{N}")
        if r is None:
            continue
        bytes_ = 2 * N * H * D * D * 4 + 4 * N * H * D * 2
        f, o, fl = r["fla_decode"], r["decode"], bytes_ / bw / 1e9
        sp = f"{f / o:.2f}x" if f else "-"
        print(f"| decode step (graph) | B{N} | {(f or float('nan')) * 1e3:.1f} us | {o * 1e3:.1f} us = "
              f"{bytes_ / o / 1e9:.2f} TB/s | {sp} (1.1x) | {fl * 1e3:.1f} us | {o / fl:.2f} |")


if __name__ == "__main__":
    main()
