"""Blockwise FP8 on one GPU: correctness of the quantize kernels and the FP8 GEMMs against the
references at full size, then bf16 against FP8 linear layers and experts, forward + backward.

    python benchmarks/bench_fp8.py [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/bench_fp8.py --quick   # the script itself, on a CPU

Correctness: the Triton quantize kernels (1×128, transposed 1×128, 128×128) bit for bit against
`ops/fp8/reference.py`; the Triton GEMM and torch._scaled_mm's blockwise recipes (where the probe
says they work) against the dequantize-then-fp32 reference; fp8_linear's output and gradients
against bf16's. Speed (`triton.testing.do_bench` medians): every linear shape of the 1b preset
(`bench_train.py`) and of Ring-mini at 8K tokens, and the routed experts of both (1b: 32 × 1024→512,
top-4; Ring-mini: 256 × 2048→512, top-8) through `grouped_glu`: bf16 is torch's GEMM /
torch._grouped_mm, FP8 quantizes activations and weights on every call (as training does); and the
experts' forward with e4m3 weights (serving), the expert loop of fp8_linear against the grouped FP8 GEMMs.
Results: stdout (a table last) and DIR/bench_fp8.json (DIR: --out, else $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ringlinear.ops.fp8 import fp8_gemm, fp8_linear, quantize_blocks, quantize_rows
from ringlinear.ops.fp8.gemm import scaled_mm_blockwise
from ringlinear.ops.fp8.kernels import gemm_triton
from ringlinear.ops.fp8.reference import gemm_reference, quantize_blocks_reference, quantize_rows_reference
from ringlinear.ops.moe import grouped_glu, grouped_glu_fp8
from ringlinear.ops.policy import KernelPolicy, blockwise_scaled_mm_works, experts_kernel, fp8_gemm_kernel

BF16, FP8 = KernelPolicy("triton"), KernelPolicy("triton", fp8=True)
# (name, tokens, in, out): the 1b preset (hidden 1024, 8 heads × 128, dense MLP 2816, shared expert 512)
# and Ring-mini (hidden 2048, 16 heads × 128, dense MLP 5120, shared expert 512)
LINEARS = [("1b qkv", 8192, 1024, 3072), ("1b dense", 8192, 1024, 1024), ("1b mlp up", 8192, 1024, 2816),
           ("1b mlp down", 8192, 2816, 1024), ("1b shared up", 8192, 1024, 512),
           ("mini qkv", 8192, 2048, 6144), ("mini dense", 8192, 2048, 2048), ("mini mlp up", 8192, 2048, 5120),
           ("mini mlp down", 8192, 5120, 2048)]
# (name, tokens, experts, top-k, hidden, inter)
EXPERTS = [("1b experts", 8192, 32, 4, 1024, 512), ("mini experts", 4096, 256, 8, 2048, 512)]
QUICK_LINEARS = [("quick", 200, 256, 384)]
QUICK_EXPERTS = [("quick experts", 64, 4, 2, 256, 128)]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of fn."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_quantize(M: int, K: int, device: torch.device) -> dict:
    x = (torch.randn(M, K, device=device) * torch.rand(M, 1, device=device) * 10).bfloat16()
    x[:, :128] = 0  # zero blocks
    same = {}
    for name, ours, ref in (("rows", quantize_rows(x, FP8), quantize_rows_reference(x)),
                            ("transposed", quantize_rows(x.t(), FP8), quantize_rows_reference(x.t())),
                            ("blocks", quantize_blocks(x, FP8), quantize_blocks_reference(x))):
        codes_equal = torch.equal(ours[0].view(torch.uint8), ref[0].view(torch.uint8))
        same[name] = bool(codes_equal and torch.equal(ours[1], ref[1]))
        if not same[name]:  # what differs, to find the cause: the scales, or the codes (and how)
            differ = ours[0].view(torch.uint8) != ref[0].view(torch.uint8)
            same[f"{name}_differing_scales"] = int((ours[1] != ref[1]).sum())
            same[f"{name}_differing_codes"] = int(differ.sum())
            if not codes_equal:
                i, j = (int(v) for v in differ.nonzero()[0])
                source = x.t() if name == "transposed" else x
                block = (i // 128 if name == "blocks" else i, j // 128)
                same[f"{name}_first"] = {
                    "x": float(source[i, j]), "ours": float(ours[0][i, j].float()),
                    "reference": float(ref[0][i, j].float()), "ours_scale": float(ours[1][block]),
                    "reference_scale": float(ref[1][block]),
                    "code_distance": int(ours[0][i, j].view(torch.uint8)) - int(ref[0][i, j].view(torch.uint8))}
    return same


def check_gemm(M: int, K: int, N: int, device: torch.device) -> dict:
    a, b = torch.randn(M, K, device=device).bfloat16(), torch.randn(N, K, device=device).bfloat16()
    qa, sa = quantize_rows(a, FP8)
    result = {}
    for recipe, (qb, sb) in (("1x128·128x128", quantize_blocks(b, FP8)), ("1x128·1x128", quantize_rows(b, FP8))):
        result["policy picks"] = fp8_gemm_kernel(FP8, qa, qb)
        ref = gemm_reference(qa, sa, qb, sb, torch.float32)
        result[f"triton {recipe}"] = rel(gemm_triton(qa, sa, qb, sb, torch.bfloat16), ref)
        if device.type == "cuda" and blockwise_scaled_mm_works(device):
            result[f"scaled_mm {recipe}"] = rel(scaled_mm_blockwise(qa, sa, qb, sb, torch.bfloat16), ref)
    return result


def check_linear(M: int, K: int, N: int, device: torch.device) -> dict:
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device=device) * K**-0.5).bfloat16().requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    grads = []
    for use_fp8 in (False, True):
        y = fp8_linear(x, w, policy=FP8) if use_fp8 else F.linear(x, w)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        grads.append((y, dx, dw))
    return {name: rel(fp8, bf16) for name, bf16, fp8 in zip(("y", "dx", "dw"), *grads)}


def bench_linear(M: int, K: int, N: int, device: torch.device) -> dict:
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device=device) * K**-0.5).bfloat16().requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    qx, sx = quantize_rows(x.detach(), FP8)
    qw, sw = quantize_blocks(w.detach(), FP8)

    def step(linear: Callable[[], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(linear(), (x, w), dy)

    flops = 2 * M * K * N
    times = {"bf16 gemm": timed(lambda: F.linear(x.detach(), w.detach()), device),
             "fp8 gemm": timed(lambda: fp8_gemm(qx, sx, qw, sw, torch.bfloat16, FP8), device),
             "quantize x": timed(lambda: quantize_rows(x.detach(), FP8), device),
             "bf16 fwd+bwd": timed(step(lambda: F.linear(x, w)), device),
             "fp8 fwd+bwd": timed(step(lambda: fp8_linear(x, w, policy=FP8)), device)}
    return {"ms": times, "gemm_tflops": {k: flops / times[k] / 1e9 for k in ("bf16 gemm", "fp8 gemm")},
            "speedup": times["bf16 fwd+bwd"] / times["fp8 fwd+bwd"]}


def bench_experts(tokens: int, E: int, k: int, hidden: int, inter: int, device: torch.device) -> dict:
    g = torch.Generator(device).manual_seed(0)
    rows = tokens * k
    counts = torch.bincount(torch.randint(0, E, (rows,), device=device, generator=g), minlength=E)
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    weights = [(torch.randn(E, n, m, device=device) * m**-0.5).bfloat16().requires_grad_()
               for n, m in ((inter, hidden), (inter, hidden), (hidden, inter))]
    scales = torch.rand(rows, device=device)
    dy = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)

    def step(policy: KernelPolicy) -> Callable[[], object]:
        return lambda: torch.autograd.grad(grouped_glu(x, *weights, counts, scales, policy), (x, *weights), dy)

    outs = [grouped_glu(x, *weights, counts, scales, p) for p in (BF16, FP8)]
    times = {"bf16 fwd+bwd": timed(step(BF16), device), "fp8 fwd+bwd": timed(step(FP8), device)}
    # serving: e4m3 weights with their 128×128 scales, forward only: the expert loop against the grouped GEMMs
    pairs = [[quantize_blocks(w_e, FP8) for w_e in w.detach().unbind()] for w in weights]
    codes = [torch.stack([q for q, _ in p]) for p in pairs]
    weight_scales = tuple(torch.stack([s for _, s in p]) for p in pairs)
    served = (x.detach(), *codes, counts, scales, BF16)
    assert experts_kernel(BF16, served[0], *codes) == "fp8_grouped"
    with torch.no_grad():
        loop, grouped = (fn(*served, weight_scales=weight_scales) for fn in (grouped_glu_fp8, grouped_glu))
        times["e4m3 loop fwd"] = timed(lambda: grouped_glu_fp8(*served, weight_scales=weight_scales), device)
        times["e4m3 grouped fwd"] = timed(lambda: grouped_glu(*served, weight_scales=weight_scales), device)
    return {"ms": times, "speedup": times["bf16 fwd+bwd"] / times["fp8 fwd+bwd"], "rel_err": rel(outs[1], outs[0]),
            "grouped_speedup": times["e4m3 loop fwd"] / times["e4m3 grouped fwd"],
            "grouped_vs_loop_rel_err": rel(grouped, loop)}


def run(name: str, fn: Callable[[], dict], results: dict) -> None:
    try:
        results[name] = fn()
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    except Exception:  # one failing case must not hide the others
        results[name] = {"error": traceback.format_exc(limit=3)}
        print(f"{name}: FAILED\n{results[name]['error']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="small shapes, to check the script (CPU: interpreter)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":  # the tests' patches make the interpreter compute as the GPU
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        import conftest  # noqa: F401
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    linears, experts = (QUICK_LINEARS, QUICK_EXPERTS) if args.quick else (LINEARS, EXPERTS)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "scaled_mm_blockwise": device.type == "cuda" and blockwise_scaled_mm_works(device)}
    print(json.dumps(info))
    results: dict = {"info": info}
    M, K, N = linears[0][1:]
    run("check quantize (bit-exact)", lambda: check_quantize(M, K + 64, device), results)
    run("check gemm (rel err vs reference)", lambda: check_gemm(M, K, N, device), results)
    run("check fp8_linear vs bf16 (rel err)", lambda: check_linear(M, K, N, device), results)
    for name, *shape in linears:
        run(name, lambda shape=shape: bench_linear(*shape, device), results)
    for name, *shape in experts:
        run(name, lambda shape=shape: bench_experts(*shape, device), results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_fp8.json"), "w") as f:
        json.dump(results, f, indent=2)

    print(f"\n{'case':16} {'bf16 gemm':>10} {'fp8 gemm':>10} {'TFLOP/s bf16/fp8':>17} {'quant x':>8} "
          f"{'bf16 f+b':>9} {'fp8 f+b':>9} {'speedup':>8} {'e4m3 loop':>10} {'e4m3 grp':>9}")
    for name, r in results.items():
        if name == "info" or name.startswith("check"):
            continue
        if "error" in r:
            print(f"{name:16} failed")
            continue
        ms = r["ms"]
        gemm = (f"{ms['bf16 gemm']:10.3f} {ms['fp8 gemm']:10.3f} "
                f"{r['gemm_tflops']['bf16 gemm']:8.0f}/{r['gemm_tflops']['fp8 gemm']:<8.0f} {ms['quantize x']:8.3f}"
                if "gemm_tflops" in r else f"{'':10} {'':10} {'':17} {'':8}")
        e4m3 = f" {ms['e4m3 loop fwd']:10.3f} {ms['e4m3 grouped fwd']:9.3f}" if "e4m3 loop fwd" in ms else ""
        print(f"{name:16} {gemm} {ms['bf16 fwd+bwd']:9.3f} {ms['fp8 fwd+bwd']:9.3f} {r['speedup']:7.2f}x{e4m3}")
    print("(milliseconds; f+b = forward + backward with FP8 quantization of activations, weights and gradients;\n"
          " e4m3 loop / grp = the experts' forward with e4m3 weights, expert loop / grouped FP8 GEMMs)")


if __name__ == "__main__":
    main()
