"""Speculative decoding: what a trained MTP head accepts, and what a verify step costs.

    python benchmarks/bench_spec.py --checkpoint runs/tiny-mtp/checkpoint [--out DIR]   # trained (GPU if any)
    python benchmarks/bench_spec.py [--out DIR]                                          # GPU, Ring-mini shapes
    python benchmarks/bench_spec.py --quick [--out DIR]                                  # CPU smoke run

With `--checkpoint` (a model trained with an MTP layer, e.g. `ringlinear train --override
num_nextn_predict_layers=1`): prompts cut from the corpus's held-out files (the validation split of
the standard library, as the trainer splits it), generated greedily, plainly and with each drafter:
the MTP head as chains of k = 1, 2, 3 and as the tree TREE, and the n-gram drafter (code repeats
itself) as a chain and a tree. Per draft position (tree depth), the share of verify steps that
accepted a token there; the mean accepted drafts per verify step; tokens/s against plain decoding
at batch 1 (requests one after another) and 16 (all at once), the fastest of --repeats rounds (each
round runs every drafter once). Every speculative output is checked against the plain one, token
for token. On a shared CPU run it with OMP_NUM_THREADS=1: two threads fighting other processes made
every step 7x slower.

Without it: random weights at Ring-mini shapes (`--quick`: tiny ones, on the CPU), batches of
sequences whose contexts are placed in the cache as if prefilled (bench_engine's `decode`); each
step verifies a fixed draft tree per sequence (chains of k = 1-4 and the GPU_TREES shapes) and is
timed against a plain decode step (CUDA graphs on the GPU; verify steps run eagerly). From those,
decode tokens/s at a given per-token acceptance (`--acceptance`, or those the checkpoint run
measured, `--acceptance-from` its JSON): a chain of k whose drafts are each accepted with
probability a emits 1 + a + ... + a^k tokens a step. Then whole speculative steps with the model's MTP
layer drafting chains of 1 and 3 (random weights: every draft rejected), and the drafter's share of them.

Results: stdout (a table last) and DIR/bench_spec.json (DIR: --out, else $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from bench_engine import case, log, place

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.checkpoint import load_tokenizer
from ringlinear.data.corpus import split_documents, stdlib_documents
from ringlinear.infer import Engine, EngineConfig, SamplingParams
from ringlinear.infer.graphs import StepGraphs
from ringlinear.infer.spec.config import SpeculativeConfig
from ringlinear.infer.spec.drafting import Speculator
from ringlinear.infer.spec.tree import DraftTree, chain_paths, parse_paths, path_parents

TREE = "[(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]"  # the trained run's tree: top 2 at two depths, then 1
GPU_TREES = {"tree_2x3": "[(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0), (1, 0, 0)]",
             "tree_3x4": str([(0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (0, 0, 0), (0, 0, 1),
                              (0, 1, 0), (1, 0, 0), (0, 0, 0, 0), (0, 0, 1, 0), (1, 0, 0, 0)])}
PROMPT_TOKENS, NEW_TOKENS, BATCH_ONE_REQUESTS, BATCH = 128, 64, 4, 16
STEPS, WARMUP_STEPS = 16, 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_configs() -> dict[str, dict | None]:
    configs: dict[str, dict | None] = {"plain": None}
    for n in (1, 2, 3):
        configs[f"mtp_chain{n}"] = {"method": "mtp", "num_speculative_tokens": n}
    configs["mtp_tree"] = {"method": "mtp", "num_speculative_tokens": len(parse_paths(TREE, 63)),
                           "speculative_token_tree": TREE}
    ngram = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    configs["ngram_chain3"] = {**ngram, "num_speculative_tokens": 3}
    configs["ngram_tree"] = {**ngram, "num_speculative_tokens": len(parse_paths(TREE, 63)),
                             "speculative_token_tree": TREE}
    return configs


class VerifyLog:
    """Records each verify chunk's accepted path and the depth of the tree it verified."""

    def __init__(self, engine: Engine):
        self.steps: list[tuple[int, int]] = []  # (accepted drafts, tree depth)
        verify = engine.sampler.verify

        def recording(logits, verifies):
            verified = verify(logits, verifies)
            self.steps += [(len(v.path), max(DraftTree(chunk.drafts, chunk.draft_parents).depths()))
                           for (chunk, _), v in zip(verifies, verified)]
            return verified
        engine.sampler.verify = recording

    def summary(self) -> dict:
        if not self.steps:
            return {"verify_steps": 0}
        depth = max(d for _, d in self.steps)
        rates = [sum(a >= j for a, d in self.steps if d >= j) / max(1, sum(d >= j for _, d in self.steps))
                 for j in range(1, depth + 1)]
        return {"verify_steps": len(self.steps), "acceptance_by_position": [round(r, 3) for r in rates],
                "mean_accepted": round(sum(a for a, _ in self.steps) / len(self.steps), 3)}


def generate_all(engine: Engine, prompts: list[list[int]], at_once: bool) -> tuple[list[list[int]], float]:
    """Greedy completions of `prompts` (all at once, or one request after another) and the seconds."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    for group in ([prompts] if at_once else [[p] for p in prompts]):
        for prompt in group:
            request_id = str(len(outputs))
            outputs[request_id] = []
            engine.add_request(request_id, prompt, params)
        while engine.has_unfinished():
            for output in engine.step():
                outputs[output.request_id].extend(output.token_ids)
    sync(engine.device)
    return list(outputs.values()), time.perf_counter() - start


def held_out_prompts(tokenizer, val_fraction: float, count: int) -> list[list[int]]:
    """`count` prompts of PROMPT_TOKENS tokens: windows of the held-out files, a file's next window
    once every file has given one."""
    _, val = split_documents(stdlib_documents(), val_fraction)
    ids = [tokenizer.encode(d.text).ids for d in val]
    prompts, window = [], 0
    while len(prompts) < count:
        fresh = [t[window * PROMPT_TOKENS:(window + 1) * PROMPT_TOKENS] for t in ids]
        prompts += [p for p in fresh if len(p) == PROMPT_TOKENS]
        window += 1
        if not any(len(t) > window * PROMPT_TOKENS for t in ids):
            break
    return prompts[:count]


def trained(checkpoint: str, repeats: int, results: dict) -> None:
    cuda = torch.cuda.is_available()
    model = RingLinearForCausalLM.from_pretrained(checkpoint, device="cuda" if cuda else "cpu",
                                                  dtype=torch.bfloat16 if cuda else None)
    tokenizer = load_tokenizer(checkpoint)
    run = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "train_config.json")
    val_fraction = json.load(open(run))["val_fraction"] if os.path.exists(run) else 0.02
    prompts = held_out_prompts(tokenizer, val_fraction, BATCH)
    results["setup"] = {"checkpoint": checkpoint, "prompts": len(prompts), "prompt_tokens": PROMPT_TOKENS,
                        "new_tokens": NEW_TOKENS, "threads": torch.get_num_threads(), "tree": TREE,
                        "repeats": repeats}
    log(f"{len(prompts)} held-out prompts of {PROMPT_TOKENS} tokens, {NEW_TOKENS} new each")
    for batch, group in ((1, prompts[:BATCH_ONE_REQUESTS]), (BATCH, prompts)):
        reference: list[list[int]] | None = None

        def measure(spec: dict | None, group=group, batch=batch) -> dict:
            nonlocal reference
            engine = Engine(model, None, EngineConfig(max_num_seqs=BATCH, page_size=16, num_pages=4096,
                                                      speculative_config=spec))
            verifies = VerifyLog(engine)
            outputs, seconds = generate_all(engine, group, at_once=batch > 1)
            reference = reference or outputs  # the plain run's, first
            stats = engine.stats()
            return {"tokens_per_s": round(sum(map(len, outputs)) / seconds, 1), "seconds": round(seconds, 2),
                    "equals_plain": outputs == reference, **verifies.summary(),
                    "draft_tokens": stats["spec_draft_tokens"], "accepted_tokens": stats["spec_accepted_tokens"]}

        runs: list[dict] = []
        for _ in range(repeats):  # every drafter once per round, so that all meet the same load
            runs.append({})
            for name, spec in spec_configs().items():
                case(runs[-1], f"batch{batch}_{name}", measure, spec)
        for name in spec_configs():
            timed = [run[f"batch{batch}_{name}"] for run in runs if "seconds" in run[f"batch{batch}_{name}"]]
            results[f"batch{batch}_{name}"] = (min(timed, key=lambda row: row["seconds"]) if timed
                                               else runs[0][f"batch{batch}_{name}"])
        plain = results[f"batch{batch}_plain"].get("tokens_per_s")
        for name in spec_configs():
            row = results[f"batch{batch}_{name}"]
            if plain and "tokens_per_s" in row:
                row["speedup"] = round(row["tokens_per_s"] / plain, 2)


# -- verify-step cost at serving shapes -------------------------------------------------------------

def step_cost(engine: Engine, batch: int, context: int, paths: tuple | None) -> dict:
    """ms per step of `batch` sequences verifying a tree of shape `paths` each (None: plain decode)."""
    place(engine, batch, context, 4 * (STEPS + WARMUP_STEPS) + 1)
    generator = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size

    def one_step() -> None:
        if paths is not None:
            trees = {seq: DraftTree(tuple(torch.randint(1, vocab, (len(paths),), generator=generator).tolist()),
                                    path_parents(paths)) for seq in engine.scheduler.running}
            engine.scheduler.set_drafts(trees)
        engine.step()

    for _ in range(WARMUP_STEPS):
        one_step()
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(STEPS):
        one_step()
    sync(engine.device)
    seconds = (time.perf_counter() - start) / STEPS
    engine.abort_all()
    return {"batch": batch, "context": context, "nodes": 0 if paths is None else len(paths),
            "ms_per_step": round(1e3 * seconds, 3)}


def mtp_step_cost(engine: Engine, batch: int, context: int, k: int) -> dict:
    """ms per step of `batch` sequences drafting a k-chain with the model's MTP layer (random weights: the
    drafts are rejected, so a step emits one token) and verifying it, and the share of it the drafter
    takes (its calls timed between syncs). The drafter's own keys start at the placed context."""
    engine.speculator = Speculator(SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": k}),
                                   engine.model, engine.policy)
    propose, drafting = engine.speculator.propose, [0.0]

    def timed(*args):
        sync(engine.device)
        start = time.perf_counter()
        drafts = propose(*args)
        sync(engine.device)
        drafting[0] += time.perf_counter() - start
        return drafts
    engine.speculator.propose = timed
    place(engine, batch, context, 4 * (STEPS + WARMUP_STEPS) + 1)
    try:
        for _ in range(WARMUP_STEPS):
            engine.step()
        sync(engine.device)
        drafting[0], start = 0.0, time.perf_counter()
        for _ in range(STEPS):
            engine.step()
        sync(engine.device)
        seconds = (time.perf_counter() - start) / STEPS
    finally:
        engine.abort_all()
        engine.speculator = None
    return {"batch": batch, "context": context, "nodes": k, "ms_per_step": round(1e3 * seconds, 3),
            "drafting_ms_per_step": round(1e3 * drafting[0] / STEPS, 3)}


def expected_tokens(k_drafts: int, acceptance: float) -> float:
    """Tokens a chain of k emits a step when each draft is accepted with probability `acceptance`."""
    return sum(acceptance ** j for j in range(k_drafts + 1))


def serving(quick: bool, acceptance: float, results: dict) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    preset, context, batches = ("tiny", 256, (1, 4)) if quick else ("mini", 4096, (1, 16, 64))
    config = RingLinearConfig.preset(preset).replace(num_nextn_predict_layers=1)  # an MTP layer to draft with
    if device.type == "cuda":
        from bench_engine import build
        model = build(config)
    else:
        torch.manual_seed(0)
        model = RingLinearForCausalLM(config).eval()
    options = {"max_num_seqs": max(batches), "page_size": 64, "max_num_batched_tokens": 4096}
    options.update({"num_pages": max(batches) * (context // 64 + 8)} if device.type == "cpu" else {})
    engine = Engine(model, None, EngineConfig(**options))
    shapes = {"plain": None, **{f"chain{n}": chain_paths(n) for n in range(1, 5)},
              **{name: parse_paths(tree, 63) for name, tree in GPU_TREES.items()}}
    if engine.runner.graphs is not None:  # capture every verify shape (an engine captures its drafter's one)
        runner = engine.runner
        runner.graphs = None
        runner.graphs = StepGraphs(model, runner.cache, options["max_num_seqs"], engine.policy,
                                   [()] + [path_parents(p) for p in shapes.values() if p is not None],
                                   options["max_num_batched_tokens"])
    results["setup"] = {"preset": preset, "context": context, "device": str(device), "acceptance": acceptance,
                        "graphs": engine.runner.graphs is not None}
    for batch in batches:
        for name, paths in shapes.items():
            case(results, f"batch{batch}_{name}", step_cost, engine, batch, context, paths)
        for k in (1, 3):
            case(results, f"batch{batch}_mtp_drafting_chain{k}", mtp_step_cost, engine, batch, context, k)
        plain = results[f"batch{batch}_plain"].get("ms_per_step")
        for name, paths in shapes.items():
            row = results[f"batch{batch}_{name}"]
            if plain and "ms_per_step" in row and paths is not None:  # (mtp rows: see drafting_ms_per_step)
                row["cost_vs_decode"] = round(row["ms_per_step"] / plain, 2)
                if name.startswith("chain"):
                    emitted = expected_tokens(len(paths), acceptance)
                    row["tokens_per_s_at_acceptance"] = round(batch * emitted / row["ms_per_step"] * 1e3)
                    row["speedup_at_acceptance"] = round(emitted / row["cost_vs_decode"], 2)
        if plain:
            results[f"batch{batch}_plain"]["tokens_per_s"] = round(batch / plain * 1e3)


def table(report: dict) -> str:
    lines = []
    for part, rows in report.items():
        if part == "meta":
            continue
        lines.append(f"\n{part}: {json.dumps(rows.get('setup', {}))}")
        for name, row in rows.items():
            if name == "setup":
                continue
            keys = ("tokens_per_s", "speedup", "mean_accepted", "acceptance_by_position", "equals_plain",
                    "ms_per_step", "drafting_ms_per_step", "cost_vs_decode", "speedup_at_acceptance", "error")
            lines.append(f"  {name:<20} " + "  ".join(f"{key}={row[key]}" for key in keys if key in row))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a trained checkpoint with MTP layers: measure acceptance on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke run")
    parser.add_argument("--acceptance", type=float, default=0.6, help="per-token acceptance for the projection")
    parser.add_argument("--acceptance-from", help="bench_spec.json of a --checkpoint run: use its MTP chain-1 rate")
    parser.add_argument("--repeats", type=int, default=3, help="--checkpoint runs: timings are the fastest of these")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    report: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                             "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick
                             else "cpu"}}
    acceptance = args.acceptance
    if args.acceptance_from:
        measured = json.load(open(args.acceptance_from))["trained"]
        acceptance = measured["batch1_mtp_chain1"]["acceptance_by_position"][0]
    if args.checkpoint:
        report["trained"] = {}
        trained(args.checkpoint, args.repeats, report["trained"])
    if args.quick or not args.checkpoint:
        report["serving"] = {}
        serving(args.quick, acceptance, report["serving"])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_spec.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    log(f"results in {path}")
    print(table(report))


if __name__ == "__main__":
    main()
