"""The MoE layer at Ring-mini's shapes on one GPU (256 experts of 2048 → 512, top-8 in 4 of 8 groups, one
shared expert), the measure the fused MoE path has to beat.

    python benchmarks/bench_moe.py [--tokens 1 64 4096 32768 131072] [--out DIR]

1. Routing (`ops.routing.route`): the Triton kernel (one program per token) against the PyTorch
   reference, checked (the fraction of tokens whose expert set differs, weights within 1e-6) and timed
   from the router's logits.
2. The routed experts alone on the layer's own routing: today's path (`moe.dispatched_experts`: the
   permutation, three torch._grouped_mm calls, SwiGLU, the weighted sum back in token order) beside
   the fused kernels (`moe_kernels.fused_experts`), forward and forward + backward, with the largest
   difference of their outputs and of x's gradients relative to the largest magnitude.
3. The whole layer (`model.moe.MoE`, random bf16 weights, tokens of unit-variance hidden states) as
   the policy runs it (the fused experts): forward, and forward + backward, with the active-expert
   count each token count gives.
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
from ringlinear.ops.moe import dispatched_experts, routed_experts
from ringlinear.ops.policy import KernelPolicy, experts_kernel
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


def compare_experts(moe: MoE, x: torch.Tensor) -> dict:
    """Today's dispatched path against the fused kernels on the layer's routing of x: timings and the
    largest output and x-gradient differences relative to the largest magnitude (dispatched)."""
    e = moe.experts
    assert experts_kernel(FAST, x, e.gate_proj, e.up_proj, e.down_proj, token_order=True) == "fused"
    with torch.no_grad():
        weights, experts = moe.gate(x, FAST)
    params = (e.gate_proj, e.up_proj, e.down_proj)
    xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
    dy = torch.randn_like(x)
    row, outputs = {}, {}
    for name, path in (("grouped_mm", dispatched_experts), ("fused", routed_experts)):
        def run(tokens: torch.Tensor, scales: torch.Tensor, path=path) -> torch.Tensor:
            return path(tokens, scales, experts, *params, FAST, e.activation)

        def forward_backward(run=run) -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(run(xg, wg), (xg, wg, *params), dy)
        with torch.no_grad():
            row[f"experts_{name}_forward_ms"] = bench(lambda: run(x, weights))
            out = run(x, weights)
        row[f"experts_{name}_forward_backward_ms"] = bench(forward_backward)
        outputs[name] = out.float(), forward_backward()[0].float()

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max()) if b.numel() else 0.0
    (y, dx), (y_ref, dx_ref) = outputs["fused"], outputs["grouped_mm"]
    return row | {"experts_max_rel_diff": relative(y, y_ref), "experts_grad_max_rel_diff": relative(dx, dx_ref)}


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
        differ = (experts.sort(1).values != ref_experts.sort(1).values).any(1)
        row = {"tokens": n, "experts_differ": float(differ.float().mean()) if n else 0.0,
               "weights_max_diff": float((weights - ref_weights).abs().max()) if n else 0.0,
               "route_kernel_ms": bench(lambda: route(logits, bias, routing, FAST)),
               "route_reference_ms": bench(lambda: route_reference(logits, bias, routing))}
        row.update(compare_experts(moe, x))
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
    print("| tokens | active experts | route: kernel / reference ms | experts differ | experts fwd ms: grouped_mm / "
          "fused | experts fwd+bwd ms: grouped_mm / fused | max rel diff: out / dx | MoE fwd ms | MoE fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['tokens']} | {r['active_experts']} | {r['route_kernel_ms']:.3f} / {r['route_reference_ms']:.3f} | "
              f"{r['experts_differ']:.2%} | "
              f"{r['experts_grouped_mm_forward_ms']:.3f} / {r['experts_fused_forward_ms']:.3f} | "
              f"{r['experts_grouped_mm_forward_backward_ms']:.3f} / {r['experts_fused_forward_backward_ms']:.3f} | "
              f"{r['experts_max_rel_diff']:.1e} / {r['experts_grad_max_rel_diff']:.1e} | "
              f"{r['moe_forward_ms']:.3f} | {r['moe_forward_backward_ms']:.3f} |")

if __name__ == "__main__":
    main()
