"""The chunk-aligned Lightning kernel (batch-invariant mode) on one GPU: bit-identity, then speed.

    PYTHONPATH=$PWD python3 benchmarks/check_aligned.py [--recurrent FILE]

Bit-identity (bf16, H = 16, D = 128, Ring-mini-like decays): 64 sequences of 1 to 1,500 tokens are
run alone under an invariant kernel policy; then, for batches of 1 to 64 of them in a random order,
packed along T (`cu_seqlens`), right-padded in a [B, T] batch, and as the engine runs them
(`lightning_aligned` from random pool slots: a prefill piece of a random length, a second one starting
mid-chunk, then one decode call per token for the sequences still running). Every output must equal
the alone run's bit for bit, and the pool must end with the state at the last chunk's start.

Speed (median ms, triton.testing.do_bench): the aligned forward against the chunked fast forward
(B1 × T1K, B8 × T1K, B1 × T4K), and an aligned decode step (one token each, at mid-chunk positions,
against the state and partial-chunk pools) against the fast decode kernel (N = 1, 64, 256). With
`--recurrent FILE`, the recurrent kernel that aligned mode ran before is timed beside them: FILE is its
source, e.g. `git show 8ff779f:ringlinear/ops/lightning/recurrent.py > /tmp/recurrent.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from types import ModuleType

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from ringlinear.ops import lightning_attn
from ringlinear.ops.lightning import CHUNK, lightning_aligned
from ringlinear.ops.lightning.aligned import aligned_tile
from ringlinear.ops.lightning.chunk import lightning_attn_triton
from ringlinear.ops.lightning.decode import lightning_decode_triton
from ringlinear.ops.policy import KernelPolicy

ALIGNED = KernelPolicy(invariant=True)
H, D, DTYPE = 16, 128, torch.bfloat16
BATCHES = [1, 2, 3, 8, 17, 33, 64]
T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:5.1f}s]", *args, flush=True)


def decays() -> torch.Tensor:
    return -torch.linspace(2.0**-8, 0.7, H, device="cuda")


def ints(values) -> torch.Tensor:
    return torch.tensor(values, device="cuda")


def cumulative(lengths: list[int]) -> torch.Tensor:
    return ints([0, *torch.tensor(lengths).cumsum(0).tolist()])


@torch.no_grad()
def engine_run(xs: list[list[torch.Tensor]], lengths: list[int], g: torch.Tensor, rng: random.Random
               ) -> tuple[list[torch.Tensor], list[bool]]:
    """Each sequence's outputs as the engine computes them, and whether its pool rows ended as they must."""
    B = len(xs)
    state = torch.randn(B + 5, H, D, D, device="cuda")  # noise where a call must not read
    chunk_k, chunk_v = (torch.randn(B + 5, CHUNK, H, D, device="cuda").to(DTYPE) for _ in range(2))
    slots = ints(rng.sample(range(B + 5), B))
    state[slots] = 0
    done, outputs = [0] * B, [[] for _ in range(B)]

    def step(sizes: list[int]) -> None:
        members = [b for b in range(B) if sizes[b] > 0]
        if not members:
            return
        rows = [torch.cat([xs[b][i][0, done[b]:done[b] + sizes[b]] for b in members]) for i in range(3)]
        starts = cumulative([sizes[b] for b in members])
        o = lightning_aligned(*rows, g, state, chunk_k, chunk_v, slots[members], ints([done[b] for b in members]),
                              starts[:-1], starts[1:] - starts[:-1], policy=ALIGNED)
        for j, b in enumerate(members):
            outputs[b].append(o[int(starts[j]):int(starts[j + 1])])
            done[b] += sizes[b]

    step([rng.randint(0, n) for n in lengths])
    step([rng.randint(0, n - d) for n, d in zip(lengths, done)])
    while any(d < n for d, n in zip(done, lengths)):
        step([int(d < n) for d, n in zip(done, lengths)])
    pools_ok = []
    for b, n in enumerate(lengths):
        kept = n // CHUNK * CHUNK
        expected = (lightning_attn(*(x[:, :kept] for x in xs[b]), g, output_final_state=True, policy=ALIGNED)[1][0]
                    if kept else torch.zeros(H, D, D, device="cuda"))
        pools_ok.append(torch.equal(state[slots[b]], expected)
                        and torch.equal(chunk_k[slots[b], :n - kept], xs[b][1][0, kept:])
                        and torch.equal(chunk_v[slots[b], :n - kept], xs[b][2][0, kept:]))
    return [torch.cat(o) if o else xs[b][0][0, :0] for b, o in enumerate(outputs)], pools_ok


@torch.no_grad()
def check_bit_identity() -> bool:
    rng = random.Random(0)
    gen = torch.Generator("cuda").manual_seed(0)
    g = decays()
    lengths = [1] + [rng.randint(1, 1500) for _ in range(63)]
    seqs = [[torch.randn(1, n, H, D, generator=gen, device="cuda").to(DTYPE) for _ in range(3)] for n in lengths]
    alone = [lightning_attn(*x, g, policy=ALIGNED)[0][0] for x in seqs]
    ok = True
    for B in BATCHES:
        order = rng.sample(range(len(seqs)), B)
        xs, ns, ref = [seqs[i] for i in order], [lengths[i] for i in order], [alone[i] for i in order]
        runs = {}
        o, _ = lightning_attn(*(torch.cat(x, 1) for x in zip(*xs)), g, cu_seqlens=cumulative(ns), policy=ALIGNED)
        runs["packed"] = o[0].split(ns)
        T = max(ns)
        o, _ = lightning_attn(*(torch.cat([F.pad(x, (0, 0, 0, 0, 0, T - x.shape[1])) for x in column])
                                for column in zip(*xs)), g, policy=ALIGNED)
        runs["[B, T]"] = [o[b, :n] for b, n in enumerate(ns)]
        runs["engine"], pools_ok = engine_run(xs, ns, g, rng)
        bad = [f"{name}: sequence {b} differs" for name, outs in runs.items()
               for b, (o, r) in enumerate(zip(outs, ref)) if not torch.equal(o, r)]
        bad += [f"engine: pool rows of sequence {b} differ" for b, good in enumerate(pools_ok) if not good]
        log(f"B = {B:2d} ({sum(ns):6d} tokens, lengths {min(ns)}-{max(ns)}): "
            f"{'bit-identical' if not bad else 'DIFFERS'} (packed, [B, T], engine pieces + decode)")
        for line in bad[:5]:
            log("   ", line)
        ok &= not bad
    return ok


def load_recurrent(path: str) -> ModuleType:
    """The removed recurrent kernel, from its source file, as a module of the package (its imports are relative)."""
    spec = importlib.util.spec_from_file_location("ringlinear.ops.lightning.recurrent_removed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


@torch.no_grad()
def timings(recurrent: ModuleType | None) -> list[tuple[str, float, float, float | None]]:
    gen = torch.Generator("cuda").manual_seed(1)
    g = decays()
    rows = []
    for B, T in ((1, 1024), (8, 1024), (1, 4096)):
        q, k, v = (torch.randn(B, T, H, D, generator=gen, device="cuda").to(DTYPE) for _ in range(3))
        aligned = ms(lambda: lightning_attn(q, k, v, g, policy=ALIGNED))
        fast = ms(lambda: lightning_attn_triton(q, k, v, g, None, None, False, None, None))
        old = None if recurrent is None else ms(
            lambda: recurrent.lightning_attn_recurrent_triton(q, k, v, g, None, None, False, None, None))
        rows.append((f"forward B{B} T{T}", aligned, fast, old))
    for N in (1, 64, 256):
        q, k, v = (torch.randn(N, H, D, generator=gen, device="cuda").to(DTYPE) for _ in range(3))
        state = torch.randn(N, H, D, D, generator=gen, device="cuda")
        chunk_k, chunk_v = (torch.randn(N, CHUNK, H, D, generator=gen, device="cuda").to(DTYPE) for _ in range(2))
        slots, one = torch.arange(N, device="cuda"), torch.ones(N, dtype=torch.long, device="cuda")
        positions = torch.randint(0, CHUNK - 1, (N,), generator=gen, device="cuda")  # no chunk completes
        aligned = ms(lambda: lightning_aligned(q, k, v, g, state, chunk_k, chunk_v, slots, positions, slots, one,
                                               policy=ALIGNED))
        fast = ms(lambda: lightning_decode_triton(q, k, v, g, state, slots))
        old = None if recurrent is None else ms(
            lambda: recurrent.lightning_decode_recurrent_triton(q, k, v, g, state, slots))
        rows.append((f"decode N{N}", aligned, fast, old))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recurrent", metavar="FILE", help="the removed recurrent kernel's source, timed beside")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    block_v, num_warps = aligned_tile(D, DTYPE)
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; aligned tile BV={block_v}, {num_warps} warps")
    ok = check_bit_identity()
    rows = timings(None if args.recurrent is None else load_recurrent(args.recurrent))
    print(f"\n{'ms (median)':<20}{'aligned':>10}{'fast':>10}{'recurrent':>11}{'aligned/fast':>14}")
    for name, aligned, fast, old in rows:
        print(f"{name:<20}{aligned:>10.4f}{fast:>10.4f}{'-' if old is None else f'{old:.4f}':>11}"
              f"{aligned / fast:>13.2f}x")
    print(f"\nbit-identity, batches {BATCHES}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
