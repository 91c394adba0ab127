"""The MoE layer at Ring-mini's shapes on one GPU (256 experts of 2048 → 512, top-8 in 4 of 8 groups, one
shared expert), the measure the fused MoE path has to beat.

    python benchmarks/bench_moe.py [--tokens 1 64 4096 32768 131072] [--out DIR]

1. Routing (`ops.routing.route`): the Triton kernel (one program per token) against the PyTorch
   reference, checked (the same experts, weights within 1e-6) and timed from the router's logits.
2. The whole layer (`model.moe.MoE`, random bf16 weights, tokens of unit-variance hidden states):
   forward, and forward + backward, as today's path runs them (routing, the permutation, three
   torch._grouped_mm calls, SwiGLU, the weighted sum back in token order, the shared expert), with
   the active-expert count each token count gives.
Speed: `triton.testing.do_bench` medians (ms). Results: stdout (a table last) and DIR/bench_moe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from triton.testing import do_bench

from ringlinear import RingLinearConfig
from ringlinear.model.moe import MoE
from ringlinear.ops.policy import KernelPolicy
from ringlinear.ops.routing import route, route_reference

FAST = KernelPolicy("triton")


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def layer(config: RingLinearConfig) -> MoE:
    torch.manual_seed(0)
    moe = MoE(config).to("cuda")
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return moe.to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 32768, 131072])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    config = RingLinearConfig.preset("mini")
    moe = layer(config)
    routing, bias = moe.gate.routing, moe.gate.expert_bias
    results: dict = {"meta": {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__}, "rows": []}
    for n in args.tokens:
        x = torch.randn(n, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(n, config.num_experts, device="cuda") * 2
        weights, experts = route(logits, bias, routing, FAST)
        ref_weights, ref_experts = route_reference(logits, bias, routing)
        row = {"tokens": n, "same_experts": bool(torch.equal(experts, ref_experts)),
               "weights_max_diff": float((weights - ref_weights).abs().max()) if n else 0.0,
               "route_kernel_ms": bench(lambda: route(logits, bias, routing, FAST)),
               "route_reference_ms": bench(lambda: route_reference(logits, bias, routing))}
        with torch.no_grad():
            row["active_experts"] = int(moe.gate(x, FAST)[1].unique().numel())
            row["moe_forward_ms"] = bench(lambda: moe(x, FAST))
        xg = x.clone().requires_grad_()

        def forward_backward():
            moe(xg, FAST).float().square().mean().backward()
        row["moe_forward_backward_ms"] = bench(forward_backward)
        results["rows"].append(row)
        print(row, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_moe.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{results['meta']}")
    print("| tokens | active experts | route: kernel / reference ms | same experts | MoE fwd ms | MoE fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['tokens']} | {r['active_experts']} | {r['route_kernel_ms']:.3f} / {r['route_reference_ms']:.3f} | "
              f"{r['same_experts']} | {r['moe_forward_ms']:.3f} | {r['moe_forward_backward_ms']:.3f} |")


if __name__ == "__main__":
    main()
