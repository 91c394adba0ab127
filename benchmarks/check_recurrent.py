"""The batch-invariant (recurrent) Lightning kernel on one GPU: bit-identity, then speed.

    python benchmarks/check_recurrent.py

Bit-identity (bf16, H = 16, D = 128, Ring-mini-like decays): 64 sequences of mixed lengths (1 to
1,500 tokens) are run alone under an invariant kernel policy; then, for batches of 1 to 64 of them in a
random order, packed along T (`cu_seqlens`), right-padded in a [B, T] batch, and as the engine runs
them (a packed prefill chunk of a random length from state-pool slots, then one decode call per
token for the sequences still running). Every output and final state must equal the alone run's bit
for bit. Speed (B = 8, T = 256 / 1,024 / 4,096): the recurrent kernel against the chunked Triton
forward and the PyTorch recurrent form it replaces (the invariant policy on the torch backend, as
aligned mode ran it); one decode step at N = 64 against the fast decode kernel and the PyTorch form. About 30 s on an
H100 (the first run adds Triton's compilation).
"""

from __future__ import annotations

import random
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from ringlinear.ops import lightning_attn, lightning_decode
from ringlinear.ops.lightning.chunk import lightning_attn_triton
from ringlinear.ops.lightning.decode import lightning_decode_triton
from ringlinear.ops.lightning.recurrent import lightning_decode_recurrent_triton, recurrent_config
from ringlinear.ops.batch_invariant import numerics
from ringlinear.ops.policy import KernelPolicy

ALIGNED = KernelPolicy(invariant=True)
ALIGNED_TORCH = KernelPolicy("torch", invariant=True)  # the PyTorch recurrent form the kernel replaced

H, D, DTYPE = 16, 128, torch.bfloat16
BATCHES = [1, 2, 3, 8, 17, 33, 64]
T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:5.1f}s]", *args, flush=True)


def decays() -> torch.Tensor:
    return -torch.linspace(2.0**-8, 0.7, H, device="cuda")


def random_qkv(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(1, n, H, D, generator=gen, device="cuda").to(DTYPE) for _ in range(3)]


def cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")


def mismatches(name: str, outs, finals, alone) -> list[str]:
    bad = []
    for b, (o, s, (o_ref, s_ref)) in enumerate(zip(outs, finals, alone)):
        if not torch.equal(o, o_ref[0]):
            delta = (o.float() - o_ref[0].float()).abs().max()
            bad.append(f"{name}: output of sequence {b} differs (max |Δ| {delta:.3g})")
        if s is not None and not torch.equal(s, s_ref[0]):
            bad.append(f"{name}: final state of sequence {b} differs")
    return bad


@torch.no_grad()
def check_bit_identity() -> bool:
    rng = random.Random(0)
    gen = torch.Generator("cuda").manual_seed(0)
    g = decays()
    lengths = [1] + [rng.randint(1, 1500) for _ in range(63)]
    seqs = [random_qkv(n, gen) for n in lengths]
    alone = [lightning_attn(*x, g, output_final_state=True, policy=ALIGNED) for x in seqs]
    ok = True
    for B in BATCHES:
        order = rng.sample(range(len(seqs)), B)
        xs, ns, ref = [seqs[i] for i in order], [lengths[i] for i in order], [alone[i] for i in order]
        bad = []
        o, final = lightning_attn(*(torch.cat(x, 1) for x in zip(*xs)), g, output_final_state=True,
                                  cu_seqlens=cumulative(ns), policy=ALIGNED)
        bad += mismatches("packed", o[0].split(ns), final, ref)
        T = max(ns)
        o, final = lightning_attn(*(torch.cat([F.pad(x, (0, 0, 0, 0, 0, T - x.shape[1])) for x in column])
                                    for column in zip(*xs)), g, output_final_state=True, policy=ALIGNED)
        bad += mismatches("[B, T]", [o[b, :n] for b, n in enumerate(ns)],
                          [f if n == T else None for f, n in zip(final, ns)], ref)
        pool = torch.randn(B + 5, H, D, D, device="cuda")
        slots = torch.tensor(rng.sample(range(B + 5), B), device="cuda")
        pool[slots] = 0
        prefill = [rng.randint(0, n) for n in ns]
        o, final = lightning_attn(*(torch.cat([x[:, :p] for x, p in zip(column, prefill)], 1)
                                    for column in zip(*xs)), g, initial_state=pool[slots],
                                  output_final_state=True, cu_seqlens=cumulative(prefill), policy=ALIGNED)
        pool[slots] = final
        outputs = [[part] for part in o[0].split(prefill)]
        for t in range(min(prefill), T):
            running = [b for b, (p, n) in enumerate(zip(prefill, ns)) if p <= t < n]
            if running:
                step = [torch.cat([xs[b][i][0, t:t + 1] for b in running]) for i in range(3)]
                o = lightning_decode(*step, g, pool, slots[running], policy=ALIGNED)
                for j, b in enumerate(running):
                    outputs[b].append(o[j:j + 1])
        bad += mismatches("prefill + decode", [torch.cat(x) for x in outputs], pool[slots], ref)
        log(f"B = {B:2d} ({sum(ns):6d} tokens, lengths {min(ns)}-{max(ns)}): "
            f"{'bit-identical' if not bad else 'DIFFERS'} (packed, [B, T], prefill + decode)")
        for line in bad[:5]:
            log("   ", line)
        ok &= not bad
    return ok


def time_ms(fn, slow: bool = False) -> float:
    if not slow:
        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 2 * 1e3


@torch.no_grad()
def timings() -> list[tuple[str, float, float, float]]:
    gen = torch.Generator("cuda").manual_seed(1)
    g = decays()
    rows = []
    for T in (256, 1024, 4096):
        q, k, v = (torch.randn(8, T, H, D, generator=gen, device="cuda").to(DTYPE) for _ in range(3))

        def recurrent():
            lightning_attn(q, k, v, g, policy=ALIGNED)

        chunked = time_ms(lambda: lightning_attn_triton(q, k, v, g, None, None, False, None, None))
        def torch_recurrent():
            with numerics(ALIGNED_TORCH):  # its products in fixed blocks, as aligned mode ran it
                lightning_attn(q, k, v, g, policy=ALIGNED_TORCH)

        rows.append((f"forward B8 T{T}", time_ms(recurrent), chunked, time_ms(torch_recurrent, slow=True)))
        log(f"T = {T}: recurrent {rows[-1][1]:.3f} ms, chunked {chunked:.3f} ms, torch {rows[-1][3]:.1f} ms")
    q, k, v = (torch.randn(64, H, D, generator=gen, device="cuda").to(DTYPE) for _ in range(3))
    pool = torch.zeros(64, H, D, D, device="cuda")
    slots = torch.arange(64, device="cuda")

    def torch_decode():
        with numerics(ALIGNED_TORCH):
            lightning_decode(q, k, v, g, pool, slots, policy=ALIGNED_TORCH)

    rows.append(("decode N64", time_ms(lambda: lightning_decode_recurrent_triton(q, k, v, g, pool, slots)),
                 time_ms(lambda: lightning_decode_triton(q, k, v, g, pool, slots)), time_ms(torch_decode)))
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    config = recurrent_config(D)
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; recurrent tile BV={config.block_v}, "
        f"{config.num_warps} warps")
    ok = check_bit_identity()
    rows = timings()
    print(f"\n{'ms (median)':<18}{'recurrent':>11}{'chunked/fast':>14}{'torch recur.':>14}{'rec/chunk':>11}")
    for name, rec, fast, slow in rows:
        print(f"{name:<18}{rec:>11.3f}{fast:>14.3f}{slow:>14.2f}{rec / fast:>10.1f}x")
    print(f"\nbit-identity, batches {BATCHES}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
