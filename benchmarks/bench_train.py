"""Training throughput of the trainer: a ~1B-parameter hybrid model against the same model all-softmax.

    python benchmarks/bench_train.py [--out DIR] [--steps 4] [--seq-lens 2048 4096 ...]

Each case runs `Trainer.train_step` itself — FSDP2 with bf16 compute weights (so the MoE takes the
sync-free grouped GEMMs) and fp32 master weights and AdamW state, packed document-masked rows, the
chunked cross-entropy, clipping, the expert-bias update — on synthetic documents of exactly one row
each (random token ids), with the same number of tokens per step at every sequence length.
MFU = the trainer's model FLOPs (`ringlinear.train.metrics.FlopCounter`: 6 × active non-embedding
parameters, the LM head, causal softmax attention per document, Lightning's chunked form; no
recomputation) / (step time × the GPU's dense bf16 peak). The hybrid / all-softmax ratio against
sequence length gives the crossover: the shortest length where the hybrid trains faster. Results:
a table last and DIR/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from ringlinear import RingLinearConfig
from ringlinear.data import EOS, TokenSplit, train_tokenizer, write_dataset
from ringlinear.info import model_info
from ringlinear.train import TrainConfig, Trainer
from ringlinear.train.metrics import FlopCounter, peak_flops
from ringlinear.train.parallel import World, process_group, resolve_device

MODELS = {
    # ~0.9B total / 0.27B active: hidden 1024, 16 layers, 8 heads × 128, 32 experts top-4 + 1 shared
    "1b": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
               num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_experts=32, num_experts_per_tok=4,
               n_group=4, topk_group=2, moe_intermediate_size=512, moe_shared_expert_intermediate_size=512,
               group_norm_size=4),
    # for checking the script on a CPU
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, head_dim=16, intermediate_size=128,
                 moe_intermediate_size=32, moe_shared_expert_intermediate_size=32),
}


def synthetic_dataset(directory: Path, vocab_size: int, seq_len: int, documents: int) -> None:
    """Documents of seq_len - 1 random tokens (EOS last): packed with their EOS in front, one per row."""
    tokenizer = train_tokenizer(["ringlinear benchmark"], 300)  # only its EOS is used
    eos = tokenizer.token_to_id(EOS)
    rng = np.random.default_rng(0)

    def split(n: int) -> TokenSplit:
        docs = rng.integers(1, vocab_size, (n, seq_len - 1), dtype=np.int64)
        docs[:, -1] = eos
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        return TokenSplit(docs.reshape(-1).astype(dtype), np.arange(n + 1, dtype=np.int64) * (seq_len - 1))

    train, val = split(documents), split(1)
    summary = {"source": f"synthetic, {seq_len - 1}-token documents"}
    for name, data in (("train", train), ("val", val)):
        summary.update({f"{name}_files": len(data.offsets) - 1, f"{name}_tokens": len(data.tokens), f"{name}_bytes": 0})
    write_dataset(directory, tokenizer, train, val, summary)


def profile_step(trainer: Trainer, step: int, rows: int = 25) -> None:
    """One more step under the PyTorch profiler: the kernels that take the GPU's time, on stderr."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step(step)
    table = prof.key_averages().table(sort_by="self_device_time_total" if torch.cuda.is_available()
                                      else "self_cpu_time_total", row_limit=rows, max_name_column_width=70)
    print(table, file=sys.stderr, flush=True)


def bench(world: World, model: str, layer_group_size: int, seq_len: int, tokens_per_step: int, steps: int,
          activation_checkpointing: int, work: Path, profile: bool = False) -> dict:
    batch = max(1, tokens_per_step // seq_len)
    result = {"seq_len": seq_len, "batch": batch}
    overrides = {**MODELS[model], "layer_group_size": layer_group_size}
    data = work / f"data_{seq_len}"
    if not data.exists():
        synthetic_dataset(data, overrides["vocab_size"], seq_len, batch * (steps + 3))
    config = TrainConfig(out_dir=str(work / f"run_{layer_group_size}_{seq_len}"), preset="mini",
                         model_overrides=overrides, tokenized=str(data), steps=steps + 3, batch_size=batch,
                         seq_len=seq_len, eval_batches=1, checkpoint_interval=10**9, eval_interval=10**9,
                         activation_checkpointing=activation_checkpointing, tensorboard=False, lr=1e-4, min_lr=0.0,
                         warmup_steps=0, device=str(world.device))
    try:
        trainer = Trainer(config, world)
        flops, times = FlopCounter(trainer.model.config), []
        for step in range(steps + 2):  # two warm-up steps compile the kernels
            t0 = time.perf_counter()
            metrics = trainer.train_step(step)  # ends with a device synchronisation
            if step >= 2:
                times.append(time.perf_counter() - t0)
        if profile:
            profile_step(trainer, steps + 2)
        del trainer
        seconds = statistics.median(times)
        peak = peak_flops(0.0, world.device)
        step_flops = flops([seq_len] * batch)
        result.update(ms_per_step=1e3 * seconds, tokens_per_s=batch * seq_len / seconds,
                      tflops=step_flops / seconds / 1e12, mfu=step_flops / seconds / peak if peak else None,
                      peak_gib=metrics["memory_gib"], loss=metrics["loss"])
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    except Exception as e:  # record and go on: one broken case must not lose the others
        traceback.print_exc()
        result["error"] = repr(e)[:300]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def crossover(hybrid: list[dict], softmax: list[dict]) -> str:
    """Where the hybrid's tokens/s overtakes the all-softmax model's, interpolated in log2(length)."""
    points = [(math.log2(h["seq_len"]), h["tokens_per_s"] / s["tokens_per_s"]) for h, s in zip(hybrid, softmax)
              if "error" not in h and "error" not in s]
    if not points:
        return "no case ran"
    if points[0][1] >= 1:
        return f"hybrid faster already at {2 ** points[0][0]:.0f} (the shortest length measured)"
    for (x0, r0), (x1, r1) in zip(points, points[1:]):
        if r0 < 1 <= r1:
            return f"about {2 ** (x0 + (1 - r0) / (r1 - r0) * (x1 - x0)):,.0f} tokens"
    return f"not reached by {2 ** points[-1][0]:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_train.json")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case (after 2 warm-up steps)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--activation-checkpointing", type=int, default=0, help="as the trainer's flag")
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="print the profiler's top kernels of one more step "
                        "of each case")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work, process_group(resolve_device(args.device)) as world:
        for name, group in (("hybrid", 4), ("all_softmax", 1)):
            info = model_info(RingLinearConfig.preset("mini", **MODELS[args.model], layer_group_size=group))
            print(f"{name}: {info.total_params / 1e9:.2f}B total, {info.active_params / 1e9:.2f}B active, "
                  f"layers {info.layer_map}", file=sys.stderr, flush=True)
            results[name] = [bench(world, args.model, group, seq_len, args.tokens_per_step, args.steps,
                                   args.activation_checkpointing, Path(work), args.profile)
                             for seq_len in args.seq_lens]
            for r in results[name]:
                print(" ", r, file=sys.stderr, flush=True)
    where = crossover(results["hybrid"], results["all_softmax"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "args": vars(args), "results": results,
                   "crossover": where}, f, indent=1)
    print(f"\n{'seq':>6} {'batch':>5} {'hybrid tok/s':>13} {'MFU':>6} {'GiB':>5} {'softmax tok/s':>14} {'MFU':>6} "
          f"{'GiB':>5} {'ratio':>6}")
    for h, s in zip(results["hybrid"], results["all_softmax"]):
        if "error" in h or "error" in s:
            print(f"{h['seq_len']:>6} {h['batch']:>5}  {h.get('error', '')} {s.get('error', '')}")
            continue
        mfu = [f"{r['mfu']:>6.1%}" if r["mfu"] is not None else f"{'-':>6}" for r in (h, s)]
        print(f"{h['seq_len']:>6} {h['batch']:>5} {h['tokens_per_s']:>13,.0f} {mfu[0]} {h['peak_gib']:>5.1f} "
              f"{s['tokens_per_s']:>14,.0f} {mfu[1]} {s['peak_gib']:>5.1f} {h['tokens_per_s'] / s['tokens_per_s']:>5.2f}x")
    print(f"crossover (hybrid faster than all-softmax): {where}")


if __name__ == "__main__":
    main()
