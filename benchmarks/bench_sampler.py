"""The engine sampler's cost per step, fast mode against batch-invariant (aligned) mode.

    python benchmarks/bench_sampler.py [--vocab V] [--batches 1 8 64] [--repeats N]

A decode step ends in the sampler: the next token of each sequence (seeded requests, temperature 1,
no filters: what RL rollouts ask) and its log-prob, read back to the host. This times one call per
step from the logits [B, V] to the tokens on the host (so GPU and host time both count), in each
mode, and the parts of the invariant one: the log-softmax alone, through `numerics` (the torch
function mode) and called directly (on a GPU). Prints a table; runs on a GPU (on the CPU with small sizes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ringlinear.infer.params import SamplingParams
from ringlinear.infer.sampler import Sampler
from ringlinear.infer.scheduler import Sequence
from ringlinear.ops.batch_invariant import numerics
from ringlinear.ops.invariant_kernels import softmax
from ringlinear.ops.policy import KernelPolicy


def per_call(fn, repeats: int) -> float:
    """Median µs of `fn()` followed by a device sync, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=157184, help="columns of the logits (Ring-mini's vocabulary)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for batch in args.batches:
        logits = torch.randn(batch, args.vocab, device=device, generator=torch.Generator(device).manual_seed(0)) * 3
        seqs = [Sequence(str(i), [1, 2, 3], 3, SamplingParams(max_tokens=8, seed=i, logprobs=0), i,
                         torch.Generator(device).manual_seed(i)) for i in range(batch)]
        row = {"batch": batch}
        for name, policy in (("fast", KernelPolicy()), ("aligned", KernelPolicy(invariant=True))):
            sampler = Sampler(policy.resolve(device), device, seed=0)
            row[name] = per_call(lambda: sampler(logits, seqs), args.repeats)
        aligned = KernelPolicy(invariant=True).resolve(device)

        def through_mode():
            with numerics(aligned):
                return logits.log_softmax(-1)[:, 0].tolist()

        row["log_softmax fast"] = per_call(lambda: logits.log_softmax(-1)[:, 0].tolist(), args.repeats)
        row["log_softmax mode"] = per_call(through_mode, args.repeats)
        if aligned.triton(logits):  # the kernel itself (the CPU's torch backend has none)
            row["log_softmax direct"] = per_call(lambda: softmax(logits, log=True)[:, 0].tolist(), args.repeats)
        rows.append(row)
        print(row, flush=True)
    names = list(rows[0])
    print("\nµs per call (median), logits [B, " + f"{args.vocab}], the tokens read back")
    print("| " + " | ".join(names) + " |")
    print("|" + "---|" * len(names))
    for row in rows:
        print("| " + " | ".join(f"{row[n]:.0f}" if n != "batch" else str(row[n]) for n in names) + " |")


if __name__ == "__main__":
    main()
