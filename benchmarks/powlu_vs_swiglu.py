"""SwiGLU against PowLU (issue 18): the tiny preset trained on the standard library with each gate,
the same budget and seeds, then validation bits per byte and the largest activations.

    python benchmarks/powlu_vs_swiglu.py [--out DIR] [--steps 200] [--batch-size 4] [--seeds 0 1]

Every run is an ordinary `ringlinear train` run (`--override hidden_act=silu|powlu --seed S --steps N
--batch-size B`) in DIR/ACT-seedS; the first tokenizes the corpus and the others read its files.
After training, the final checkpoint runs the trainer's validation windows (eval_batches × batch_size
rows of seq_len tokens spread over the held-out files) with forward hooks that keep, over all of them:
- glu: max |act(gate(x)) · up(x)|, the product PowLU changes, at the input of `down_proj` of every
  dense MLP and shared expert (the routed experts compute it inside one grouped GEMM);
- ffn: max |output| of every layer's MLP or MoE block (what the FFN adds to the residual stream);
- hidden: max |hidden state| after every decoder layer (the residual stream).
Results: a table last and DIR/powlu_vs_swiglu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ringlinear.model import RingLinearForCausalLM, SequenceContext
from ringlinear.model.layers import MLP
from ringlinear.ops.policy import KernelPolicy
from ringlinear.train import TrainConfig, Trainer
from ringlinear.train.parallel import process_group, resolve_device

ACTIVATIONS = ("silu", "powlu")
MEASURES = ("glu", "ffn", "hidden")


@contextmanager
def largest_activations(model: RingLinearForCausalLM) -> Iterator[dict[str, float]]:
    """Hooks that keep each MEASURES' max |value| over every forward run inside the block."""
    largest = dict.fromkeys(MEASURES, 0.0)

    def keep(name: str, tensor: torch.Tensor) -> None:
        largest[name] = max(largest[name], tensor.detach().abs().max().item())

    handles = []
    for layer in model.model.decoder_layers:
        handles.append(layer.register_forward_hook(lambda module, args, out: keep("hidden", out)))
        handles.append(layer.mlp.register_forward_hook(lambda module, args, out: keep("ffn", out)))
        for mlp in layer.mlp.modules():
            if isinstance(mlp, MLP):
                handles.append(mlp.down_proj.register_forward_pre_hook(lambda module, args: keep("glu", args[0])))
    try:
        yield largest
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure(model: RingLinearForCausalLM, trainer: Trainer) -> dict[str, float]:
    model.eval()
    policy = KernelPolicy().resolve(next(model.parameters()).device)
    with largest_activations(model) as largest:
        for batch in trainer.val_batches:
            model(batch.input_ids, context=SequenceContext(batch.cu_seqlens, policy), return_logits=False)
    return largest


def run(out: Path, activation: str, seed: int, steps: int, batch_size: int, tokenized: Path | None) -> dict:
    config = TrainConfig(out_dir=str(out / f"{activation}-seed{seed}"), steps=steps, batch_size=batch_size, seed=seed,
                         model_overrides={"hidden_act": activation}, tokenized=str(tokenized or ""),
                         tensorboard=False)
    with process_group(resolve_device(config.device)) as world:
        trainer = Trainer(config, world)
        result = trainer.fit()
        largest = measure(result.model, trainer)
    return {"activation": activation, "seed": seed, "steps": steps, "batch_size": batch_size,
            "val_bpb": result.val_bpb, **largest}


def table(rows: list[dict]) -> str:
    lines = ["| gate | seed | val bits/byte | max glu | max ffn | max hidden |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['activation']} | {r['seed']} | {r['val_bpb']:.4f} | {r['glu']:.2f} | {r['ffn']:.2f} | "
                     f"{r['hidden']:.2f} |")
    for activation in ACTIVATIONS:
        mine = [r for r in rows if r["activation"] == activation]
        if len(mine) > 1:
            mean = {key: statistics.mean(r[key] for r in mine) for key in ("val_bpb", *MEASURES)}
            lines.append(f"| {activation} | mean | {mean['val_bpb']:.4f} | {mean['glu']:.2f} | {mean['ffn']:.2f} | "
                         f"{mean['hidden']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/powlu_vs_swiglu"))
    # 4 runs in ~20 min on 2 shared CPU cores (the default tiny run is 300 steps of 8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    rows, tokenized = [], None
    for seed in args.seeds:
        for activation in ACTIVATIONS:
            rows.append(run(args.out, activation, seed, args.steps, args.batch_size, tokenized))
            tokenized = tokenized or args.out / f"{activation}-seed{seed}" / "data"
            (args.out / "powlu_vs_swiglu.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
