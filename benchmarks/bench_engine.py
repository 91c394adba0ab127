"""The inference engine on one GPU: the hybrid model (Ring-mini-linear-2.0 shapes, random bf16
weights) side by side with the same model made all-softmax (layer_group_size = 1) and, asked for, with
its softmax layers made MLA (`mla_hybrid`: the second generation's latent cache, 512 + 64 per token).

    python benchmarks/bench_engine.py [--quick] [--models hybrid all_softmax mla_hybrid] [--cases ...]
                                      [--decode-contexts N ...] [--no-warm-up] [--routing model|spread]
                                      [--out DIR] [--profile TOKENS]

For each model, built on the meta device and initialised on the GPU, one at a time:
- prefill throughput, batch 1, at 4K, 32K and 128K prompt tokens (the last is 131,071 tokens: the
  preset's context is 131,072 and one token is generated);
- decode throughput at 4K and 32K context (or --decode-contexts), at the largest batch the cache
  holds and at batch 64.
  The running sequences' contexts are placed in the cache as if prefilled (the pages and states
  hold zeros): a decode step costs the same whatever values it reads, and prefilling up to
  512 × 4K tokens per case would take minutes;
- time to first token and inter-token latency for 1 and 64 concurrent streams (1,024-token
  prompts, 64 new tokens, all arriving at once);
- a plain PyTorch generate loop (`ringlinear.generate.generate`: one request at a time, no
  graphs) at 4K context, against the engine's decode throughput at 4K and batch 64;
- multi-turn chat: 32 conversations of 8 turns, each turn adding a 512-token message to the
  history and 64 generated tokens: TTFT and prompt tokens computed, prefix cache on and off;
- GRPO-shaped sampling: 32 prompts of 512 tokens × n = 8 completions of 128 tokens, forked from one
  prefill against 256 separate requests (prefix cache off): prompt tokens computed and wall time.
`--routing spread` gives every model the same expert load (random routers do not: `spread_routing`).
The engine warms up (`Engine.warm_up`, timed) before the cases, as the server does, unless
`--no-warm-up`; `--cases streams` run first in a fresh process gives the TTFT users see at start-up.
Every case records its error (an out-of-memory included) and the run goes on. `--quick` runs the
same cases at tiny shapes, as a smoke test. Results: stdout (a table last) and
DIR/bench_engine.json (DIR: --out, else $OUT, else .).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, replace

import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM, SequenceContext
from ringlinear.generate import generate
from ringlinear.infer import Engine, EngineConfig, SamplingParams
from ringlinear.info import model_info
from ringlinear.model.moe import Router

T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


@dataclass
class Shapes:
    preset: str
    prefill: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_batch: int  # the fixed batch, besides the largest that fits
    streams: tuple[int, ...]
    stream_prompt: int
    stream_tokens: int
    plain_context: int
    chat: tuple[int, int, int, int]  # conversations, turns, message tokens, reply tokens
    grpo: tuple[int, int, int, int]  # prompts, n, prompt tokens, new tokens
    engine: dict


FULL = Shapes("mini", prefill=(4096, 32768, 131071), decode_contexts=(4096, 32768), decode_batch=64,
              streams=(1, 64), stream_prompt=1024, stream_tokens=64, plain_context=4096,
              chat=(32, 8, 512, 64), grpo=(32, 8, 512, 128),
              engine=dict(max_num_seqs=512, max_num_batched_tokens=16384, page_size=64, gpu_memory_utilization=0.9))
QUICK = Shapes("tiny", prefill=(256, 1024, 4000), decode_contexts=(256, 1024), decode_batch=8,
               streams=(1, 8), stream_prompt=128, stream_tokens=16, plain_context=256,
               chat=(4, 3, 64, 8), grpo=(4, 4, 64, 8),
               engine=dict(max_num_seqs=64, max_num_batched_tokens=2048, page_size=64, cache_memory=2 * 2**30))
DECODE_STEPS, DECODE_WARMUP, PLAIN_TOKENS = 32, 4, 32
CASES = ("prefill", "decode", "streams", "chat", "grpo", "plain")
MODELS = ("hybrid", "all_softmax", "mla_hybrid")
# the preset with its softmax layers made MLA (kv_lora_rank 512 + rope 64 = 576 values per token)
MLA_FIELDS = dict(kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                  architectures=["BailingMoeV2_5ForCausalLM"], model_type="bailing_hybrid")
QUICK_MLA_FIELDS = dict(MLA_FIELDS, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=48)
BURSTS = itertools.count()


def k(n: int) -> str:
    return f"{round(n / 1024)}K" if n >= 1024 else str(n)


def tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sync() -> None:
    torch.cuda.synchronize()


def model_config(name: str, shapes: Shapes) -> RingLinearConfig:
    config = RingLinearConfig.preset(shapes.preset)
    if name == "all_softmax":
        return config.replace(layer_group_size=1)
    if name == "mla_hybrid":
        return config.replace(**(QUICK_MLA_FIELDS if shapes.preset == "tiny" else MLA_FIELDS))
    return config


def build(config: RingLinearConfig) -> RingLinearForCausalLM:
    """Random bf16 weights, allocated and initialised on the GPU only."""
    with torch.device("meta"):
        model = RingLinearForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    model.tie_weights()
    model.init_weights()
    return model.eval()


def spread_routing(model: RingLinearForCausalLM) -> None:
    """Every router's choice replaced by a spread one: token t of a forward takes experts
    perm[(t·k + j) mod E] for j < k, each weighted routed_scaling_factor / k, so every expert gets the
    same load. Random weights route the all-softmax twin's correlated hidden states to a few dozen of
    256 experts and the hybrid's to nearly all (RESULTS.md), while trained routers spread tokens over
    most experts in both: this compares the two at equal expert work. Device ops only (graph-safe)."""
    c = model.config
    E, k = c.num_experts, c.num_experts_per_tok
    device = next(model.parameters()).device
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(0)).to(device)

    def spread(router, inputs, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        weights, experts = output
        slots = torch.arange(experts.numel(), device=device).view(experts.shape) % E
        return torch.full_like(weights, c.routed_scaling_factor / k), perm[slots].to(experts.dtype)

    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_hook(spread)


def case(results: dict, name: str, fn, *args) -> None:
    """Run one measurement; an error (out of memory included) is recorded and the run goes on. A
    case run again (e.g. `--cases streams streams`: the first burst after start-up, then warm) is
    recorded as NAME_again."""
    name = f"{name}_again" if name in results else name
    try:
        results[name] = fn(*args)
        log(f"  {name}: {results[name]}")
    except Exception as error:  # noqa: BLE001  (a benchmark reports every failure and carries on)
        oom = isinstance(error, torch.OutOfMemoryError)
        results[name] = {"error": "out of memory" if oom else repr(error)}
        log(f"  {name}: FAILED {results[name]['error']}")
        if not oom:
            traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()


# -- measurements ------------------------------------------------------------------------------

def finish(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


ROUTING_MAX_TOKENS = 32768  # prompts up to this long also count their experts (an untimed forward)


@torch.no_grad()
def experts_per_layer(engine: Engine, prompt: list[int]) -> float | None:
    """The mean number of distinct experts a prompt's tokens route to in each MoE layer, from an untimed
    forward: with random weights it depends on the model (a hybrid and its all-softmax twin spread
    the same tokens differently), and the grouped GEMMs' cost follows it."""
    gates = [m.gate for m in engine.model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    if not gates or len(prompt) > ROUTING_MAX_TOKENS:
        return None
    counts: list[int] = []
    hooks = [g.register_forward_hook(lambda _, __, out: counts.append(int(out[1].unique().numel()))) for g in gates]
    try:
        ids = torch.tensor([prompt], device=engine.device)
        engine.model(ids, context=SequenceContext(policy=engine.policy), logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return round(sum(counts) / len(counts), 1)


def prefill(engine: Engine, length: int) -> dict:
    prompt = tokens(length, engine.model.config.vocab_size, seed=length)  # a seed of its own: no cache hit
    engine.add_request("prefill", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    sync()
    start = time.perf_counter()
    finish(engine)
    sync()
    seconds = time.perf_counter() - start
    return {"tokens": length, "seconds": round(seconds, 4), "tokens_per_s": round(length / seconds),
            "experts_per_layer": experts_per_layer(engine, prompt)}


def largest_batch(engine: Engine, context: int) -> int:
    cache = engine.scheduler.cache
    pages = cache.pages_for(context + DECODE_WARMUP + DECODE_STEPS + 2)
    return min(engine.scheduler.max_num_seqs, cache.num_free_pages // pages)


def place(engine: Engine, batch: int, context: int, max_tokens: int) -> None:
    """`batch` running sequences at `context` tokens, as if prefilled: only each one's last prompt
    token is left, so every step is a decode. Each ends in a token of its own: identical sequences
    would all route to the same few experts, a decode step no server sees."""
    vocab = engine.model.config.vocab_size
    prompt = tokens(context, vocab)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, last in enumerate(tokens(batch, vocab, seed=1)):
        engine.add_request(f"decode-{i}", prompt + [last], params)
    for seq in list(engine.scheduler.waiting):
        engine.scheduler.admit(seq, len(seq.token_ids))
        seq.num_computed = context


def decode(engine: Engine, batch: int, context: int) -> dict:
    """Decode steps of `batch` sequences at `context` tokens, their contexts placed as if prefilled."""
    if batch > largest_batch(engine, context):
        return {"batch": batch, "context": context, "fits": False,
                "largest_batch": largest_batch(engine, context)}
    place(engine, batch, context, DECODE_WARMUP + DECODE_STEPS + 1)
    for _ in range(DECODE_WARMUP):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        engine.step()
    sync()
    seconds = time.perf_counter() - start
    engine.abort_all()
    return {"batch": batch, "context": context, "fits": True, "graphs": engine.runner.graphs is not None,
            "ms_per_step": round(1e3 * seconds / DECODE_STEPS, 3),
            "tokens_per_s": round(batch * DECODE_STEPS / seconds)}


def streams(engine: Engine, count: int, prompt_len: int, new_tokens: int) -> dict:
    """`count` requests arriving at once: time to first token and the gaps between tokens. Every
    burst has prompts of its own, so that a repeated burst finds none in the prefix cache."""
    vocab = engine.model.config.vocab_size
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    burst = next(BURSTS)
    prompts = [tokens(prompt_len, vocab, seed=10_000 * burst + i) for i in range(count)]
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"stream-{i}", prompt, params)
    times: dict[str, list[float]] = {}
    while engine.has_unfinished():
        outputs = engine.step()  # returns after sampling, which waits for the GPU
        now = time.perf_counter()
        for output in outputs:
            times.setdefault(output.request_id, []).append(now)
    ttft = sorted(t[0] - start for t in times.values())
    gaps = sorted(b - a for t in times.values() for a, b in zip(t, t[1:]))
    return {"streams": count, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "ttft_ms_median": round(1e3 * statistics.median(ttft), 2), "ttft_ms_max": round(1e3 * ttft[-1], 2),
            "itl_ms_median": round(1e3 * statistics.median(gaps), 3),
            "itl_ms_p90": round(1e3 * gaps[int(0.9 * (len(gaps) - 1))], 3),
            "experts_per_layer": experts_per_layer(engine, prompts[0])}


def chat(engine: Engine, conversations: int, turns: int, message: int, reply: int) -> dict:
    """Multi-turn conversations: each turn's prompt is the history (earlier prompts and replies) plus
    a new `message`-token message; all conversations send a turn at once, the next when all replied."""
    vocab = engine.model.config.vocab_size
    params = SamplingParams(max_tokens=reply, temperature=0, ignore_eos=True)
    histories = [[] for _ in range(conversations)]
    before, ttft = engine.stats(), []
    start = time.perf_counter()
    for turn in range(turns):
        sent = time.perf_counter()
        for i, history in enumerate(histories):
            history += tokens(message, vocab, seed=1000 * i + turn)
            engine.add_request(f"chat-{i}-{turn}", history, params)
        first: set[str] = set()
        while engine.has_unfinished():
            for output in engine.step():
                if output.request_id not in first:
                    first.add(output.request_id)
                    ttft.append(time.perf_counter() - sent)
                histories[int(output.request_id.split("-")[1])] += output.token_ids
    seconds = time.perf_counter() - start
    after = engine.stats()
    # turn t's prompt holds t + 1 messages and t replies
    sent_tokens = conversations * sum((t + 1) * message + t * reply for t in range(turns))
    return {"conversations": conversations, "turns": turns, "prompt_tokens_sent": sent_tokens,
            "prompt_tokens_computed": after["prompt_tokens"] - before["prompt_tokens"],
            "cache_hit_tokens": after["prefix_cache_hits"] - before["prefix_cache_hits"],
            "ttft_ms_median": round(1e3 * statistics.median(ttft), 2), "seconds": round(seconds, 2)}


def grpo(engine: Engine, prompts: int, n: int, prompt_len: int, new_tokens: int, forked: bool) -> dict:
    """`prompts` prompts × `n` sampled completions: one request with n each, or n separate requests."""
    vocab = engine.model.config.vocab_size
    before = engine.stats()
    sync()
    start = time.perf_counter()
    for i in range(prompts):
        prompt = tokens(prompt_len, vocab, seed=5000 + i)
        if forked:
            engine.add_request(f"grpo-{i}", prompt, SamplingParams(max_tokens=new_tokens, seed=i, n=n, ignore_eos=True))
        else:
            for j in range(n):
                engine.add_request(f"grpo-{i}-{j}", prompt, SamplingParams(max_tokens=new_tokens, seed=i + j,
                                                                           ignore_eos=True))
    finish(engine)
    sync()
    seconds = time.perf_counter() - start
    after = engine.stats()
    return {"prompts": prompts, "n": n, "forked": forked, "seconds": round(seconds, 3),
            "prompt_tokens_computed": after["prompt_tokens"] - before["prompt_tokens"],
            "tokens_per_s": round(prompts * n * new_tokens / seconds)}


def plain_loop(model: RingLinearForCausalLM, context: int) -> dict:
    """Decode throughput of `ringlinear.generate.generate` for one request: the time of
    PLAIN_TOKENS more tokens after the prefill and first token."""
    prompt = [tokens(context, model.config.vocab_size)]

    def seconds(new: int) -> float:
        sync()
        start = time.perf_counter()
        generate(model, prompt, max_new_tokens=new, temperature=0)
        sync()
        return time.perf_counter() - start

    seconds(2)  # warm-up
    decode_seconds = seconds(1 + PLAIN_TOKENS) - seconds(1)
    return {"context": context, "tokens": PLAIN_TOKENS, "tokens_per_s": round(PLAIN_TOKENS / decode_seconds, 1)}


def make_engine(model: RingLinearForCausalLM, options: dict, results: dict, warm_up: bool = True) -> Engine:
    """With CUDA graphs (if capturing fails, record why and go on without them), warmed up."""
    start = time.perf_counter()
    try:
        engine = Engine(model, None, EngineConfig(**options))
    except Exception as error:  # noqa: BLE001
        results["engine_error"] = repr(error)
        log(f"  engine with CUDA graphs failed ({error!r}); retrying without graphs")
        traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()
        engine = Engine(model, None, EngineConfig(**options, cuda_graphs=False))
    results["engine_start_s"] = round(time.perf_counter() - start, 2)
    if warm_up:
        results["warm_up_s"] = round(engine.warm_up(), 2)
        log(f"  warmed up in {results['warm_up_s']} s")
    return engine


def bench_model(name: str, config: RingLinearConfig, shapes: Shapes, cases: tuple[str, ...], warm_up: bool,
                routing: str = "model") -> dict:
    info = model_info(config)
    results: dict = {"layer_map": "".join("S" if k == "softmax" else "L" for k in config.layer_types),
                     "kv_bytes_per_token": info.kv_bytes_per_token,
                     "state_bytes_per_sequence": info.state_bytes_per_sequence}
    log(f"{name}: building {shapes.preset} (layer_group_size={config.layer_group_size})")
    model = build(config)
    if routing == "spread":
        spread_routing(model)
    results["weights_gib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)
    engine = make_engine(model, shapes.engine, results, warm_up)
    size = engine.scheduler.cache.size
    results["cache"] = {"slots": size.num_slots, "pages": size.num_pages, "page_size": size.page_size,
                        "snapshots": size.num_snapshots, "snapshot_interval": size.snapshot_interval,
                        "gib": round(engine.runner.cache.nbytes() / 2**30, 2), "max_model_len": engine.max_model_len,
                        "graphs": engine.runner.graphs is not None}
    log(f"  cache: {results['cache']}")
    for family in cases:  # in the order asked: the first runs right after start-up
        if family == "streams":
            for count in shapes.streams:
                case(results, f"streams_{count}", streams, engine, count, shapes.stream_prompt, shapes.stream_tokens)
        elif family == "prefill":
            for length in shapes.prefill:
                case(results, f"prefill_{length}", prefill, engine, length)
            engine.scheduler.cache.prefix_caching = False  # what taking the prefix cache's snapshots costs
            case(results, f"prefill_{shapes.prefill[1]}_no_prefix_cache", prefill, engine, shapes.prefill[1])
            engine.scheduler.cache.prefix_caching = True
        elif family == "decode":
            for context in shapes.decode_contexts:
                case(results, f"decode_{context}_largest", decode, engine, largest_batch(engine, context), context)
                case(results, f"decode_{context}_batch{shapes.decode_batch}", decode, engine, shapes.decode_batch,
                     context)
        elif family == "chat":
            for caching in (True, False):
                engine.scheduler.cache.prefix_caching = caching
                case(results, f"chat_cache_{'on' if caching else 'off'}", chat, engine, *shapes.chat)
            engine.scheduler.cache.prefix_caching = True
        elif family == "grpo":
            engine.scheduler.cache.prefix_caching = False  # forking alone against separate prefills
            for forked in (True, False):
                case(results, f"grpo_{'forked' if forked else 'separate'}", grpo, engine, *shapes.grpo, forked)
            engine.scheduler.cache.prefix_caching = True
        elif family == "plain":
            case(results, "plain_loop", plain_loop, model, shapes.plain_context)
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def profile_prefill(name: str, shapes: Shapes, length: int, routing: str = "model", rows: int = 30) -> None:
    """Model `name`'s prefill of `length` tokens under the PyTorch profiler, on stdout: the kernels that
    take the GPU's time, the ops that take the host's, and the GPU's busy time against the wall time."""
    from torch.profiler import ProfilerActivity, profile

    model = build(model_config(name, shapes))
    if routing == "spread":
        spread_routing(model)
    engine = make_engine(model, shapes.engine, {})
    prefill(engine, length)  # compiles the kernels
    log(f"unprofiled prefill: {prefill(engine, length)}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        log(f"profiled prefill: {prefill(engine, length)}")
    averages = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    log(f"{len(kernels)} GPU kernels, busy {sum(e.device_time for e in kernels) / 1e3:.2f} ms in all")
    print(averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=80))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows // 2, max_name_column_width=80))


# -- report ------------------------------------------------------------------------------------

def table(report: dict, shapes: Shapes) -> str:
    models = report["models"]
    hybrid, softmax = models.get("hybrid", {}), models.get("all_softmax", {})

    def value(results: dict, name: str, key: str) -> float | None:
        row = results.get(name, {})
        return row.get(key) if row.get("fits", True) else None

    def fmt(x, unit="") -> str:
        return "-" if x is None else f"{x:,.1f}{unit}" if isinstance(x, float) else f"{x:,}{unit}"

    rows = [("KV bytes / token", None, "kv_bytes_per_token", "softmax layers")]
    rows += [("prefill tok/s", f"prefill_{n}", "tokens_per_s", f"{k(n)}, batch 1") for n in shapes.prefill]
    for context in shapes.decode_contexts:
        rows.append(("decode tok/s", f"decode_{context}_largest", "tokens_per_s", f"{k(context)}, largest batch"))
        rows.append(("decode tok/s", f"decode_{context}_batch{shapes.decode_batch}", "tokens_per_s",
                     f"{k(context)}, batch {shapes.decode_batch}"))
    for count in shapes.streams:
        rows.append(("TTFT ms (median)", f"streams_{count}", "ttft_ms_median", f"{count} streams"))
        rows.append(("ITL ms (median)", f"streams_{count}", "itl_ms_median", f"{count} streams"))
    rows.append(("plain loop tok/s", "plain_loop", "tokens_per_s", f"{k(shapes.plain_context)}, batch 1"))
    # what the MoE computes in each: with random weights the same prompt spreads differently per model
    rows += [("experts / MoE layer", f"prefill_{n}", "experts_per_layer", f"prefill {k(n)}") for n in shapes.prefill
             if n <= ROUTING_MAX_TOKENS]
    rows.append(("experts / MoE layer", f"streams_{shapes.streams[0]}", "experts_per_layer",
                 f"stream prompt {k(shapes.stream_prompt)}"))
    names = list(models)
    lines = [f"{'measure':19s} {'case':22s} " + " ".join(f"{n.replace('_', '-'):>14s}" for n in names)
             + f" {'ratio':>7s}"]
    for label, name, key, what in rows:
        cells = {n: r.get(key) if name is None else value(r, name, key) for n, r in models.items()}
        if name is not None and name.endswith("largest"):
            what += " (" + " / ".join(str(r.get(name, {}).get("batch", "?")) for r in models.values()) + ")"
        a, b = cells.get("hybrid"), cells.get("all_softmax")
        ratio = "-" if a is None or b is None or not b or name is None or label.startswith("experts") else \
            f"{(a / b if 'tok/s' in label else b / a):.2f}x"
        lines.append(f"{label:19s} {what:22s} " + " ".join(f"{fmt(cells[n]):>14s}" for n in names) + f" {ratio:>7s}")
    engine_b = f"decode_{shapes.decode_contexts[0]}_batch{shapes.decode_batch}"
    for model_name, results in models.items():
        engine_rate, plain_rate = value(results, engine_b, "tokens_per_s"), value(results, "plain_loop", "tokens_per_s")
        if engine_rate and plain_rate:
            lines.append(f"engine / plain loop, {model_name}, batch {shapes.decode_batch}: "
                         f"{engine_rate / plain_rate:.1f}x")
    if hybrid and softmax:
        lines.append("ratio: hybrid over all-softmax for throughput, all-softmax over hybrid for latency "
                     "(> 1: the hybrid is better)")
    for model_name, results in models.items():
        if "warm_up_s" in results:
            lines.append(f"{model_name}: engine start {results['engine_start_s']} s, warm-up {results['warm_up_s']} s")
        for name in ("chat_cache_on", "chat_cache_off", "grpo_forked", "grpo_separate"):
            row = results.get(name)
            if row and "error" not in row:
                shown = {key: row[key] for key in ("ttft_ms_median", "prompt_tokens_computed", "cache_hit_tokens",
                                                   "prompt_tokens_sent", "seconds", "tokens_per_s") if key in row}
                lines.append(f"{model_name} {name}: " + ", ".join(f"{key} {value:,}" for key, value in shown.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of every case")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["hybrid", "all_softmax"],
                        help="which models to run, in this order (default: hybrid all_softmax)")
    parser.add_argument("--decode-contexts", type=int, nargs="+", help="decode contexts (default: 4K 32K)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="which case families to run, in this order (default: all)")
    parser.add_argument("--no-warm-up", action="store_true", help="skip Engine.warm_up (cases pay for compiling)")
    parser.add_argument("--engine", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="EngineConfig fields to change, e.g. prefix_snapshot_interval=512")
    parser.add_argument("--routing", choices=("model", "spread"), default="model",
                        help="spread: every expert the same load in every model (spread_routing), so that models "
                        "compare at equal expert work; model: the random routers' own choice")
    parser.add_argument("--profile", type=int, metavar="TOKENS",
                        help="only profile the first model's prefill of this many tokens and print its top kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_engine needs a CUDA GPU")
    shapes = QUICK if args.quick else FULL
    changes = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.engine)}
    shapes = replace(shapes, engine={**shapes.engine, **changes})
    if args.decode_contexts:
        shapes = replace(shapes, decode_contexts=tuple(args.decode_contexts))
    if args.profile:
        return profile_prefill(args.models[0], shapes, args.profile, args.routing)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    report = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "shapes": asdict(shapes),
                       "decode_steps": DECODE_STEPS, "cases": args.cases, "warm_up": not args.no_warm_up,
                       "routing": args.routing},
              "models": {}}
    path = os.path.join(args.out, "bench_engine.json")
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        config = model_config(name, shapes)
        try:
            report["models"][name] = bench_model(name, config, shapes, tuple(args.cases), not args.no_warm_up,
                                                 args.routing)
        except Exception as error:  # noqa: BLE001
            report["models"][name] = {"error": repr(error)}
            traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    log(f"results in {path}, {time.time() - T0:.0f} s in all\n")
    print(table(report, shapes))


if __name__ == "__main__":
    main()
