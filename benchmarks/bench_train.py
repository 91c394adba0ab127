"""Training throughput on one GPU: a ~1B-parameter hybrid model against the same model all-softmax.

    python benchmarks/bench_train.py [--out DIR] [--steps 6]

One training step = forward with the LM loss under bf16 autocast (fp32 master weights), backward,
fused AdamW. Sequence lengths 4K, 8K, 16K (16K tokens per step) and 32K (one sequence). MFU counts
honestly: 6 × active non-embedding parameters per token (the routed experts actually used), the
LM head, and attention — causal softmax 2·T·D·H per token per layer forward, Lightning
(4·C·D + 4·D²)·H with chunk C = 64 — with backward = 2 × forward, over the H100's 989 TFLOP/s dense
bf16. Results: a table last and DIR/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.info import model_info

PEAK_FLOPS = 989e12
CASES = [(4096, 4), (8192, 2), (16384, 1), (32768, 1)]  # (sequence length, sequences per step)


def config(layer_group_size: int) -> RingLinearConfig:
    return RingLinearConfig.preset(
        "mini", vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_experts=32, num_experts_per_tok=4,
        n_group=4, topk_group=2, moe_intermediate_size=512, moe_shared_expert_intermediate_size=512,
        layer_group_size=layer_group_size, group_norm_size=4)


def flops_per_token(c: RingLinearConfig, seq_len: int) -> float:
    info = model_info(c)
    dense = 6 * (info.active_params - info.embedding_params) + 6 * c.hidden_size * c.vocab_size
    H, D = c.num_attention_heads, c.head_dim
    attention = 0.0
    for kind in c.layer_types:
        forward = 2 * seq_len * D * H if kind == "softmax" else (4 * 64 * D + 4 * D * D) * H
        attention += 3 * forward
    return dense + attention


def bench(c: RingLinearConfig, seq_len: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = RingLinearForCausalLM(c).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, c.vocab_size, (batch, seq_len), device="cuda")
    times = []
    try:
        for step in range(steps + 2):  # two warm-up steps compile the kernels
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        tokens = batch * seq_len
        return {"seq_len": seq_len, "batch": batch, "ms_per_step": 1e3 * seconds, "tokens_per_s": tokens / seconds,
                "mfu": flops_per_token(c, seq_len) * tokens / seconds / PEAK_FLOPS,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item()}
    except torch.cuda.OutOfMemoryError:
        return {"seq_len": seq_len, "batch": batch, "error": "out of memory"}
    except Exception as e:  # record and go on: one broken case must not lose the others
        traceback.print_exc()
        return {"seq_len": seq_len, "batch": batch, "error": repr(e)[:300]}
    finally:
        del model, optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_train.json")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (after 2 warm-up steps)")
    args = parser.parse_args()
    results = {}
    for name, group in (("hybrid", 4), ("all_softmax", 1)):
        c = config(group)
        info = model_info(c)
        print(f"{name}: {info.total_params / 1e9:.2f}B total, {info.active_params / 1e9:.2f}B active, "
              f"layers {info.layer_map}", flush=True)
        results[name] = [bench(c, seq_len, batch, args.steps) for seq_len, batch in CASES]
        for r in results[name]:
            print(" ", r, flush=True)
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
    print(f"\n{'seq':>6} {'hybrid tok/s':>13} {'MFU':>6} {'softmax tok/s':>14} {'MFU':>6} {'ratio':>6}")
    for h, s in zip(results["hybrid"], results["all_softmax"]):
        if "error" in h or "error" in s:
            print(f"{h['seq_len']:>6}  {h.get('error', '')} {s.get('error', '')}")
            continue
        print(f"{h['seq_len']:>6} {h['tokens_per_s']:>13,.0f} {h['mfu']:>6.1%} {s['tokens_per_s']:>14,.0f} "
              f"{s['mfu']:>6.1%} {h['tokens_per_s'] / s['tokens_per_s']:>5.2f}x")


if __name__ == "__main__":
    main()
