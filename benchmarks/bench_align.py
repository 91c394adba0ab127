"""Training–inference alignment on one device: batch-invariant mode's bit-identity and its cost,
and the fast mode's disparity over long sequences.

    python benchmarks/bench_align.py [--quick] [--parts 123] [--prompt-tokens N] [--profile] [--out DIR]

1. Bit-identity: for batches of 1 to 256 sequences, the engine in batch-invariant mode generates
   after prompts of varied lengths (requests arriving one per step, prefill in chunks, decodes
   mixed in); the training forward in the same mode then runs every sequence alone and all of
   them in reversed batches (of up to 64). Each generated token's log-prob must be equal bit for bit. The fast
   mode's largest difference over the same tokens is given beside it, and for each mode how many
   decode steps replayed a CUDA graph (on a GPU in bf16 both modes capture them).
2. Cost: engine generation throughput (128-token prompts, or --prompt-tokens, prefilled in steps of
   up to 32K tokens, then 32 tokens decoded) at batch 1, 8, 64 and 256 (both modes: CUDA graphs and
   the Triton kernels), with the first (prefill) step's and the median decode step's wall time, and
   the training forward and forward + backward of 16 sequences of 256 tokens, in both modes.
   `--profile` adds a torch.profiler run of the first step (prompts prefilled, one token sampled) per
   mode at batch 1 and 256.
3. Fast-mode disparity: `ringlinear.rl.probe` without module hooks over sequences of 32K prompt
   tokens + 64 sampled ones: max |Δ log p|, the share of tokens whose probability differs by more
   than 0.8 (the report's Figure 12 metric), quantiles.

Models: the `mini` preset's shapes with random weights (bf16 on a GPU, fp32 on the CPU); parts 1
and 2 use its first --layers layers (default 5: four Lightning layers, then softmax), part 3 the
whole model. `--quick` runs every part at the `tiny` preset's shapes and small sizes (on the CPU
too). Results: stdout and DIR/bench_align.json (DIR: --out, else $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace

import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.infer import Engine, EngineConfig, SamplingParams
from ringlinear.model import SequenceContext
from ringlinear.ops.batch_invariant import numerics
from ringlinear.ops.policy import KernelPolicy
from ringlinear.rl.probe import probe
from ringlinear.sampling import token_logprobs

T0 = time.time()


@dataclass
class Sizes:
    preset: str
    layers: int
    batches: tuple[int, ...]  # part 1
    prompt_lengths: tuple[int, int]  # part 1: prompts drawn between these
    new_tokens: int
    cost_batches: tuple[int, ...]  # part 2
    cost_prompt: int
    cost_tokens: int
    train_shape: tuple[int, int]  # part 2: [B, T] of the training forward
    disparity_sequences: int  # part 3
    disparity_context: int
    disparity_tokens: int
    step_tokens: int


FULL = Sizes("mini", layers=5, batches=(1, 2, 4, 8, 16, 32, 64, 256), prompt_lengths=(16, 300), new_tokens=32,
             cost_batches=(1, 8, 64, 256), cost_prompt=128, cost_tokens=32, train_shape=(16, 256),
             disparity_sequences=4, disparity_context=32768, disparity_tokens=64, step_tokens=4096)
QUICK = Sizes("tiny", layers=3, batches=(1, 3, 8), prompt_lengths=(4, 40), new_tokens=8,
              cost_batches=(1, 8), cost_prompt=16, cost_tokens=8, train_shape=(8, 32),
              disparity_sequences=2, disparity_context=256, disparity_tokens=16, step_tokens=64)


def log(*args) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(config: RingLinearConfig, device: str) -> RingLinearForCausalLM:
    """Random weights, allocated and initialised on the device (bf16 on a GPU)."""
    with torch.device("meta"):
        model = RingLinearForCausalLM(config)
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32).to_empty(device=device)
    model.tie_weights()
    model.init_weights()
    return model.eval()


def prompts_of(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


MAX_STEP_TOKENS = 32768  # part 2's prefill steps: batch 256 of 128-token prompts in one


def make_engine(model, prompts, new_tokens, aligned, step_tokens=512) -> Engine:
    """An engine whose cache holds `prompts` and their continuations; CUDA graphs on a GPU in bf16."""
    page = 64
    return Engine(model, None, EngineConfig(
        max_num_seqs=len(prompts), max_num_batched_tokens=step_tokens, page_size=page,
        num_pages=sum(-(-(len(p) + new_tokens) // page) for p in prompts),
        max_model_len=max(map(len, prompts)) + new_tokens, batch_invariant=aligned))


def count_replays(engine) -> list[int]:
    """The sizes of the decode steps `engine` replays from CUDA graphs from now on (a list it appends to)."""
    replayed: list[int] = []
    graphs = engine.runner.graphs
    if graphs is not None:
        run = graphs.run
        graphs.run = lambda plan, chunks, batch: replayed.append(batch.num_seqs) or run(plan, chunks, batch)
    return replayed


def generate(engine, prompts, new_tokens, staggered=True, step_seconds: list[float] | None = None):
    """Sampled continuations and their engine log-probs; requests arrive one per step (staggered)
    or all at once. `step_seconds` gets each step's wall time (a step ends with its sampled tokens on
    the host, so the GPU has finished it)."""
    results = [[] for _ in prompts]

    def step() -> None:
        start = time.perf_counter()
        for out in engine.step():
            results[int(out.request_id)] += out.logprobs
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - start)

    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=new_tokens, seed=i, logprobs=0, ignore_eos=True))
        if staggered:
            step()
    while engine.has_unfinished():
        step()
    return results


def training_logprobs(model, sequences, first, aligned):
    """Log-probs of tokens first + 1 ... of each sequence under the training forward (one right-padded
    batch); logits only from position `first` on, turned into log-probs one sequence at a time
    (batch-invariant products and reductions run in fixed row blocks, so this splits nothing)."""
    device = next(model.parameters()).device
    T = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in sequences], device=device)
    policy = KernelPolicy(invariant=aligned)
    with torch.no_grad():
        logits = model(ids, context=SequenceContext(policy=policy),
                       logits_indices=torch.arange(first, T - 1, device=device)).logits
        with numerics(policy):
            return [token_logprobs(logits[b, :len(s) - 1 - first], ids[b, first + 1:len(s)], 0)[0].cpu()
                    for b, s in enumerate(sequences)]


TOGETHER = 64


def bit_identity(model, sizes: Sizes) -> dict:
    vocab = model.config.vocab_size
    results = {}
    for batch in sizes.batches:
        prompts = prompts_of(batch, *sizes.prompt_lengths, vocab, seed=batch)
        row = {}
        for aligned in (True, False):
            engine = make_engine(model, prompts, sizes.new_tokens, aligned)
            replayed = count_replays(engine)
            rollouts = generate(engine, prompts, sizes.new_tokens)
            sequences = [p + [lp.token_id for lp in r] for p, r in zip(prompts, rollouts)]
            engine = [torch.tensor([lp.logprob for lp in r]) for r in rollouts]
            first = min(map(len, prompts)) - 1  # the first position whose next token was generated
            alone = [training_logprobs(model, [s], len(p) - 1, aligned)[0] for p, s in zip(prompts, sequences)]
            # reversed, in batches of at most TOGETHER sequences (256 at once would hold 50 GB of fp32 logits)
            reversed_logprobs = [lp for i in range(0, batch, TOGETHER)
                                 for lp in training_logprobs(model, sequences[::-1][i:i + TOGETHER], first, aligned)]
            together = [t[len(p) - 1 - first:] for p, t in zip(prompts, reversed_logprobs[::-1])]
            gaps = [max((t - e).abs().max().item() for t in (a, m)) for e, a, m in zip(engine, alone, together)]
            # where the engine parts from the training forward: (sequence, first generated token that differs)
            parted = [(i, int((t != e).nonzero()[0])) for i, (e, a, m) in enumerate(zip(engine, alone, together))
                      for t in (a, m) if not torch.equal(t, e)]
            equal = not parted
            row["aligned" if aligned else "fast"] = {"bit_identical": equal, "max_abs_dlogp": max(gaps),
                                                     "parted_at": parted[:4], "graph_steps": len(replayed)}
        row["tokens"] = batch * sizes.new_tokens
        key = f"batch_{batch}"
        results[key if key not in results else f"{key}_again"] = row  # a repeat: does a warm GPU change it?
        log(f"  batch {batch}: {row}")
    return results


def timed(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` runs after a warm-up (kernel compilation, autotuning): one run
    of a short generation varies by ±20% between processes."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


PROFILED_BATCHES = (1, 256)


def profile_step(fn, path: str) -> None:
    """One run of `fn` under torch.profiler (after `timed`'s warm-up): on stdout its GPU kernels' count and
    busy time; in `path`.txt the ops with the most host time and the kernels with the most GPU time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    table = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    with open(f"{path}.txt", "w") as f:
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70) + "\n")
        if kernels:
            f.write(table.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70) + "\n")
    log(f"profile {os.path.basename(path)}: {len(kernels)} GPU kernels, busy "
        f"{sum(e.device_time for e in kernels) / 1e3:.2f} ms; tables in {path}.txt")


def cost(model, sizes: Sizes, profile_dir: str | None = None) -> dict:
    vocab, device = model.config.vocab_size, next(model.parameters()).device
    results = {}
    for batch in sizes.cost_batches:
        prompts = prompts_of(batch, sizes.cost_prompt, sizes.cost_prompt, vocab, seed=0)
        for aligned in (False, True):
            engine = make_engine(model, prompts, sizes.cost_tokens, aligned,
                                 step_tokens=min(batch * sizes.cost_prompt, MAX_STEP_TOKENS))
            mode = "aligned" if aligned else "fast"
            seconds = timed(lambda: generate(engine, prompts, sizes.cost_tokens, staggered=False))
            results[f"engine_batch{batch}_{mode}_tok_s"] = round(batch * sizes.cost_tokens / seconds, 1)
            # where a generation's time goes: its first step (every prompt prefilled, when they fit one
            # step) and the median decode step
            steps: list[float] = []
            generate(engine, prompts, sizes.cost_tokens, staggered=False, step_seconds=steps)
            results[f"engine_batch{batch}_{mode}_first_step_ms"] = round(1e3 * steps[0], 2)
            results[f"engine_batch{batch}_{mode}_decode_step_ms"] = round(1e3 * statistics.median(steps[1:]), 3)
            if profile_dir is not None and batch in PROFILED_BATCHES:  # the first step: prefill, one token
                profile_step(lambda: generate(engine, prompts, 1, staggered=False),
                             os.path.join(profile_dir, f"first_step_batch{batch}_{mode}"))
    B, T = sizes.train_shape
    ids = torch.randint(1, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    for aligned in (False, True):
        mode = "aligned" if aligned else "fast"
        context = SequenceContext(policy=KernelPolicy(invariant=aligned))

        def forward():
            with torch.no_grad():
                model(ids, context=context)

        def forward_backward():
            logits = model(ids, context=context).logits
            logits.float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)

        results[f"train_forward_{mode}_s"] = round(timed(forward), 4)
        results[f"train_forward_backward_{mode}_s"] = round(timed(forward_backward), 4)
    for key in [k for k in results if k.endswith("_fast_tok_s")]:
        aligned_tok_s = results[key.replace("fast", "aligned")]
        results[key.replace("_fast_tok_s", "_slowdown")] = round(results[key] / aligned_tok_s, 2)
    for name in ("train_forward", "train_forward_backward"):
        results[f"{name}_slowdown"] = round(results[f"{name}_aligned_s"] / results[f"{name}_fast_s"], 2)
    return results


def disparity(model, sizes: Sizes) -> dict:
    prompts = prompts_of(sizes.disparity_sequences, sizes.disparity_context, sizes.disparity_context,
                         model.config.vocab_size, seed=1)
    report = probe(model, prompts, sizes.disparity_tokens, aligned=False, step_tokens=sizes.step_tokens,
                   record_modules=False)
    return report.summary()


def positive(text: str) -> int:
    """argparse type: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def parts(text: str) -> str:
    if not text or set(text) - set("123"):
        raise argparse.ArgumentTypeError(f"must be digits of 1, 2 and 3 (e.g. 12), got {text!r}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and sizes (runs on the CPU too)")
    parser.add_argument("--layers", type=positive, help="layers of the model of parts 1 and 2 (default: 5, quick: 3)")
    parser.add_argument("--parts", type=parts, default="123", help="which parts to run (default: 123)")
    parser.add_argument("--batches", type=positive, nargs="+",
                        help="batch sizes of part 1 (default: 1 2 4 ... 64 256)")
    parser.add_argument("--prompt-tokens", type=positive, help="prompt length of part 2's engine cases (default: "
                        "128, quick: 16)")
    parser.add_argument("--profile", action="store_true", help="part 2: profile the first step of each mode at "
                        f"batch {' and '.join(map(str, PROFILED_BATCHES))} (a summary on stdout, tables in DIR)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.batches:
        sizes = replace(sizes, batches=tuple(args.batches))
    if args.prompt_tokens is not None:
        sizes = replace(sizes, cost_prompt=args.prompt_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        raise SystemExit("the full sizes need a GPU; --quick runs on the CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = {"meta": {"device": name,
                       "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "sizes": asdict(sizes)}}
    path = os.path.join(args.out, "bench_align.json")
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:  # after every part: a run cut short keeps what it measured
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    config = RingLinearConfig.preset(sizes.preset)
    if "1" in args.parts or "2" in args.parts:
        short = config.replace(num_hidden_layers=args.layers or sizes.layers)
        log(f"model of parts 1-2: {sizes.preset}, layers {''.join(k[0].upper() for k in short.layer_types)}")
        model = build(short, device)
        if "1" in args.parts:
            report["bit_identity"] = bit_identity(model, sizes)
            save()
        if "2" in args.parts:
            report["cost"] = cost(model, sizes, args.out if args.profile else None)
            log(f"  cost: {report['cost']}")
            save()
        del model
    if "3" in args.parts:
        log(f"part 3: {sizes.preset}, {sizes.disparity_sequences} x {sizes.disparity_context} tokens")
        report["disparity"] = disparity(build(config, device), sizes)
        log(f"  disparity: {report['disparity']}")
        save()
    print(json.dumps(report, indent=1))
    log(f"results in {path}")


if __name__ == "__main__":
    main()
