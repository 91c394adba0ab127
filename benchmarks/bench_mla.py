"""MLA on one GPU: the paged latent decode kernel against its memory floor (the engine's throughput
with MLA: `bench_engine.py --models hybrid mla_hybrid all_softmax`).

    python benchmarks/bench_mla.py [--quick] [--out DIR]

One MLA layer's decode step at Ring-mini-like shapes (16 heads, latent 512 + rope 64, nope 128,
v 128, pages of 64 tokens scattered over the pool, bf16) for batches 1 to 128 at 4K and 32K context
and batch 8 at 128K: the Triton core (`latent_attention_triton`), the whole op
(`paged_latent_attention`: with the query absorption and the output projection), and the GQA
paged-attention kernel at Ring-mini's GQA shapes (4 KV heads of 128) on the same contexts. Each is
timed as CUDA-graph replays; the floor is the bytes it must move (the pages it reads, q and o) at
the copy bandwidth measured in the same run. A small case checks the kernel against the reference.
Every case records its error (an out-of-memory included) and the run goes on. `--quick` runs tiny
shapes as a smoke test. Results: stdout (tables last) and DIR/bench_mla.json (DIR: --out, else $OUT,
else .).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import time

import torch
from bench_engine import case, k, log

from ringlinear.ops.paged_attention.kernel import paged_attention_triton
from ringlinear.ops.paged_latent_attention import latent_attention_reference, paged_latent_attention
from ringlinear.ops.paged_latent_attention.kernel import latent_attention_triton
from ringlinear.ops.policy import KernelPolicy

FULL = dict(heads=16, rank=512, rope=64, nope=128, value=128, kv_heads=4, head_dim=128, page=64,
            cases=[(n, c) for c in (4096, 32768) for n in (1, 16, 64, 128)] + [(8, 131072)])
QUICK = dict(heads=4, rank=64, rope=32, nope=32, value=48, kv_heads=2, head_dim=64, page=16,
             cases=[(1, 1024), (8, 4096)])
REPLAYS = 20  # op calls per captured graph


def graph_seconds(fn, repeats: int = 5) -> float:
    """Seconds per call of `fn`: REPLAYS calls captured in one CUDA graph, the median replay."""
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / REPLAYS)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * 2**31 / graph_seconds(lambda: dst.copy_(src))


def paged_pool(batch: int, context: int, page: int, width: tuple[int, ...], seed: int = 0):
    """A cache pool [pages, page, *width] holding `batch` sequences of `context` tokens on scattered
    pages, their block tables and lengths."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    per_seq = -(-context // page)
    pages = batch * per_seq + 1
    pool = torch.randn(pages, page, *width, dtype=torch.bfloat16, device="cuda", generator=gen)
    tables = (torch.randperm(pages - 1, device="cuda", generator=gen)[:batch * per_seq] + 1)
    tables = tables.view(batch, per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    return pool, tables, lens, starts


def check_kernel(s: dict) -> dict:
    """The Triton core against the reference (fp32) on a small scattered case."""
    H, r, rope = s["heads"], s["rank"], s["rope"]
    pool, tables, lens, starts = paged_pool(4, 3000, s["page"], (r + rope,))
    lens = torch.tensor([1, 700, 2999, 3000], dtype=torch.int32, device="cuda")
    q = torch.randn(4, H, r + rope, dtype=torch.bfloat16, device="cuda")
    out = latent_attention_triton(q, pool, tables, lens, starts, 0.05, r, 1)
    ref = latent_attention_reference(q.float(), pool.float(), tables, lens, starts, 0.05, r)
    error = ((out.float() - ref).norm() / ref.norm()).item()
    if not error < 2e-2:
        raise AssertionError(f"the latent kernel is off its reference: relative error {error:.2e}")
    return {"relative_error_vs_reference": float(f"{error:.2e}")}


def latent_case(s: dict, batch: int, context: int, bandwidth: float) -> dict:
    H, r, rope, nope, v = s["heads"], s["rank"], s["rope"], s["nope"], s["value"]
    pool, tables, lens, starts = paged_pool(batch, context, s["page"], (r + rope,))
    q_absorbed = torch.randn(batch, H, r + rope, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(batch, H, nope + rope, dtype=torch.bfloat16, device="cuda")
    kv_b = torch.randn(H * (nope + v), r, dtype=torch.bfloat16, device="cuda") / r**0.5
    policy = KernelPolicy("triton")
    kernel = graph_seconds(lambda: latent_attention_triton(q_absorbed, pool, tables, lens, starts, 0.07, r, 1))
    op = graph_seconds(lambda: paged_latent_attention(q, pool, kv_b, tables, lens, starts, 0.07, 1, policy=policy))
    floor_bytes = 2 * (batch * context * (r + rope) + batch * H * (2 * r + rope))
    return {"batch": batch, "context": context, "kernel_us": round(kernel * 1e6, 1), "op_us": round(op * 1e6, 1),
            "floor_us": round(floor_bytes / bandwidth * 1e6, 1),
            "kernel_of_floor": round(floor_bytes / bandwidth / kernel, 3),
            "kernel_tb_per_s": round(floor_bytes / kernel / 1e12, 2)}


def gqa_case(s: dict, batch: int, context: int, bandwidth: float) -> dict:
    H, KV, D = s["heads"], s["kv_heads"], s["head_dim"]
    k_cache, tables, lens, starts = paged_pool(batch, context, s["page"], (KV, D))
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, H, D, dtype=torch.bfloat16, device="cuda")
    seconds = graph_seconds(lambda: paged_attention_triton(q, k_cache, v_cache, tables, lens, starts, D**-0.5, 1))
    floor_bytes = 2 * (batch * context * 2 * KV * D + 2 * batch * H * D)
    return {"batch": batch, "context": context, "kernel_us": round(seconds * 1e6, 1),
            "floor_us": round(floor_bytes / bandwidth * 1e6, 1),
            "kernel_of_floor": round(floor_bytes / bandwidth / seconds, 3)}


def bench_kernels(s: dict) -> dict:
    results: dict = {}
    bandwidth = copy_bandwidth()
    results["copy_tb_per_s"] = round(bandwidth / 1e12, 3)
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    case(results, "check", check_kernel, s)
    for batch, context in s["cases"]:
        case(results, f"mla_b{batch}_{k(context)}", latent_case, s, batch, context, bandwidth)
        case(results, f"gqa_b{batch}_{k(context)}", gqa_case, s, batch, context, bandwidth)
        gc.collect()
        torch.cuda.empty_cache()
    return results


def table(report: dict, s: dict) -> str:
    lines = []
    kernels = report.get("kernel", {})
    if kernels:
        lines += [(f"MLA decode kernel (bf16, {s['heads']} heads, latent {s['rank']} + rope {s['rope']}) vs GQA "
                   f"paged ({s['kv_heads']} x {s['head_dim']}); floor = bytes / {kernels.get('copy_tb_per_s')} TB/s"),
                  (f"{'batch':>6} {'context':>8} | {'MLA us':>8} {'op us':>8} {'floor':>8} {'of floor':>8} | "
                   f"{'GQA us':>8} {'floor':>8} {'of floor':>8}")]
        for batch, context in s["cases"]:
            m = kernels.get(f"mla_b{batch}_{k(context)}", {})
            g = kernels.get(f"gqa_b{batch}_{k(context)}", {})
            lines.append(f"{batch:>6} {k(context):>8} | {m.get('kernel_us', '-'):>8} {m.get('op_us', '-'):>8} "
                         f"{m.get('floor_us', '-'):>8} {m.get('kernel_of_floor', '-'):>8} | "
                         f"{g.get('kernel_us', '-'):>8} {g.get('floor_us', '-'):>8} {g.get('kernel_of_floor', '-'):>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of every part")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mla needs a CUDA GPU")
    s = QUICK if args.quick else FULL
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    report: dict = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
                             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_mla.json")

    def save() -> None:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    report["kernel"] = bench_kernels(s)
    save()
    log(f"results in {path}")
    print(table(report, s))


if __name__ == "__main__":
    main()
