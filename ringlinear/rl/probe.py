"""Training–inference alignment probe (report §5.2.1): the same tokens through the training forward
(whole sequences in one batch) and the inference engine (prefill, then decode, in steps whose mix
of requests changes as they arrive one per step and their prompts are cut into chunks).

Forward hooks on every module record each token's output in both runs; the report gives per
module the largest absolute and the relative difference, the first module (in the order the
training forward finishes them) whose outputs differ, and the differences of the generated tokens'
log-probabilities, with the report's Figure 12 metric: the fraction of tokens whose probability
differs by more than 0.8.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..infer import Engine, EngineConfig, SamplingParams
from ..infer.context import StepBatch
from ..infer.scheduler import SchedulerOutput
from ..model import RingLinearForCausalLM, SequenceContext
from ..ops.batch_invariant import numerics
from ..ops.policy import KernelPolicy
from ..sampling import token_logprobs

Key = tuple[int, int]  # (sequence, position)
PROB_GAP = 0.8
# `ringlinear align`'s prompts when none are given: code, as the default training corpus is
DEFAULT_PROMPTS = ["def __init__(self, ", "import os\nimport sys\n", "class Stack:\n    ", "for i in range(",
                   "    return self.", "if __name__ == ", "# Copyright", "try:\n    "]


@dataclass
class ModuleDiff:
    name: str
    max_abs: float  # max |engine - train| over the tokens both runs computed
    rel: float  # ||engine - train|| / ||train||


@dataclass
class AlignmentReport:
    batch_invariant: bool
    num_sequences: int
    num_tokens: int  # in the training forward
    modules: list[ModuleDiff]  # in the order the training forward finishes them
    logprob_diffs: list[float]  # train - engine, for every generated token
    prob_diffs: list[float]  # |p_train - p_engine|

    @property
    def first_divergence(self) -> str | None:
        return next((m.name for m in self.modules if m.max_abs > 0), None)

    def summary(self) -> dict[str, float]:
        gaps = torch.tensor(self.logprob_diffs, dtype=torch.float64).abs()
        quantiles = gaps.quantile(torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
        return {"tokens": len(gaps), "max_abs_dlogp": gaps.max().item(), "mean_abs_dlogp": gaps.mean().item(),
                "p50_abs_dlogp": quantiles[0], "p90_abs_dlogp": quantiles[1], "p99_abs_dlogp": quantiles[2],
                "identical_fraction": (gaps == 0).double().mean().item(),
                "prob_gap_fraction": sum(d > PROB_GAP for d in self.prob_diffs) / len(self.prob_diffs)}

    def to_json(self) -> dict:
        return {"batch_invariant": self.batch_invariant, "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens, "first_divergence": self.first_divergence,
                "logprobs": self.summary(), "modules": [asdict(m) for m in self.modules],
                "logprob_diffs": self.logprob_diffs}

    def table(self) -> str:
        width = max([len(m.name) for m in self.modules] + [6])
        lines = [f"{'module':<{width}}  {'max |Δ|':>10}  {'‖Δ‖/‖x‖':>10}"]
        first = self.first_divergence
        for m in self.modules:
            mark = "  <- first divergence" if m.name == first else ""
            lines.append(f"{m.name:<{width}}  {m.max_abs:10.3e}  {m.rel:10.3e}{mark}")
        s = self.summary()
        lines += ["", f"{s['tokens']} generated tokens: |Δ log p| max {s['max_abs_dlogp']:.3e}, mean "
                  f"{s['mean_abs_dlogp']:.3e}, p50 {s['p50_abs_dlogp']:.3e}, p90 {s['p90_abs_dlogp']:.3e}, "
                  f"p99 {s['p99_abs_dlogp']:.3e}; identical {100 * s['identical_fraction']:.1f}%; "
                  f"|Δp| > {PROB_GAP}: {100 * s['prob_gap_fraction']:.2f}%",
                  f"first module whose outputs differ: {first or ('none' if self.modules else 'not recorded')}"]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Divergence of each decoder layer's output, attention and MLP; histogram of |Δ log p|."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_name = {m.name: m.max_abs for m in self.modules}
        layers = sorted({int(m.name.split(".")[2]) for m in self.modules if m.name.startswith("model.layers.")})
        fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 4))
        largest = 0.0
        for suffix, label in (("", "layer output"), (".attention", "attention"), (".mlp", "MLP / MoE")):
            values = [by_name.get(f"model.layers.{i}{suffix}", math.nan) for i in layers]
            largest = max([largest] + [v for v in values if math.isfinite(v)])
            ax.plot(layers, values, "o-", label=label)
        ax.set_yscale("symlog", linthresh=1e-12)  # 0 (bit-identical) on the same axis as 1e-7
        ax.set_ylim(0, 3 * largest if largest > 0 else 1e-6)  # differences are never negative
        ax.set(xlabel="layer", ylabel="max |engine - training|", title="divergence by layer", xticks=layers)
        ax.legend()
        gaps = [abs(d) for d in self.logprob_diffs]
        nonzero = [g for g in gaps if g > 0]
        if nonzero:
            low = math.floor(math.log10(min(nonzero)))
            hist.hist(nonzero, bins=[10 ** (low + i / 4) for i in range(4 * (1 - low) + 1)])
            hist.set_xscale("log")
        else:
            hist.text(0.5, 0.5, "every log-prob bit-identical", ha="center", va="center", transform=hist.transAxes)
            hist.set(xticks=[], yticks=[])
        hist.set(xlabel="|Δ log p| of a generated token", ylabel="tokens",
                 title=f"{len(gaps) - len(nonzero)} of {len(gaps)} tokens identical")
        fig.suptitle(f"training forward vs engine ({'batch-invariant' if self.batch_invariant else 'fast'} mode)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


class _Recorder:
    """Forward hooks that keep each token's output of every module, keyed by (sequence, position)."""

    def __init__(self, model: RingLinearForCausalLM, hooks: bool = True):
        self.runs: dict[str, dict[str, dict[Key, Tensor]]] = {"engine": defaultdict(dict), "train": defaultdict(dict)}
        self.order: list[str] = []  # modules in the order the training forward finishes them
        self.run: str | None = None
        self.tokens: list[Key] = []  # the keys of the forward's tokens, in the order of its rows
        self.logit_tokens: list[Key] = []  # the keys of the rows that get logits
        self.layout: tuple[int, int] | None = None  # training forward: [B, T]
        self.handles = [module.register_forward_hook(self._hook(name))
                        for name, module in model.named_modules() if name and hooks]

    def _hook(self, name: str):
        def record(module, args, output):
            # tuples: the first tensor (the router's weights, RoPE's cos)
            outputs = output if isinstance(output, tuple) else (output,)
            tensor = next((t for t in outputs if isinstance(t, Tensor)), None)
            if self.run is None or tensor is None or not tensor.is_floating_point():
                return
            rows = self._rows(tensor)
            if rows is None:
                return
            keys, values = rows
            store = self.runs[self.run][name]
            for key, value in zip(keys, values.detach().float().cpu().unbind()):
                store[key] = value
            if self.run == "train" and name not in self.order:
                self.order.append(name)
        return record

    def _rows(self, t: Tensor) -> tuple[list[Key], Tensor] | None:
        """The output's token rows and their keys: [B, T, ...] or [B·T, ...] (rows flattened inside the
        MoE), or the rows that get logits."""
        n, n_logits = len(self.tokens), len(self.logit_tokens)
        B, T = self.layout or (1, n)  # an engine step is one packed row
        if t.dim() >= 2 and t.shape[:2] == (B, T):
            return self.tokens, t.flatten(0, 1)
        if t.dim() >= 2 and t.shape[:2] == (B, n_logits // B):
            return self.logit_tokens, t.flatten(0, 1)
        if t.shape[0] == n:
            return self.tokens, t
        return None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def probe(model: RingLinearForCausalLM, prompts: list[list[int]], max_new_tokens: int = 16,
          aligned: bool = False, step_tokens: int = 32, seed: int = 0, record_modules: bool = True) -> AlignmentReport:
    """Generate `max_new_tokens` (sampled, temperature 1) after each prompt with the engine, then run
    prompt + generated tokens through the training forward, both in batch-invariant mode if
    `aligned`. `step_tokens` bounds an engine step, so longer prompts are prefilled in chunks.
    Without `record_modules` only the log-probs are compared (no hooks: long sequences, and the
    engine's decode steps may replay CUDA graphs)."""
    page = 16
    lengths = [len(p) + max_new_tokens for p in prompts]
    engine = Engine(model, None, EngineConfig(
        max_num_seqs=len(prompts), max_num_batched_tokens=step_tokens, page_size=page, cuda_graphs=not record_modules,
        num_pages=sum(-(-n // page) for n in lengths), max_model_len=max(lengths), batch_invariant=aligned, seed=seed))
    recorder = _Recorder(model, record_modules)
    try:
        engine_logprobs = _engine_run(engine, recorder, prompts, max_new_tokens, seed)
        sequences = [p + [lp.token_id for lp in lps] for p, lps in zip(prompts, engine_logprobs)]
        train_logprobs = _training_run(model, recorder, sequences, [len(p) for p in prompts], engine.policy)
    finally:
        recorder.remove()
    diffs = [(t - e.logprob, abs(math.exp(t) - math.exp(e.logprob)))
             for lps, train in zip(engine_logprobs, train_logprobs) for e, t in zip(lps, train)]
    modules = []
    for name in recorder.order:
        engine_rows, train_rows = recorder.runs["engine"][name], recorder.runs["train"][name]
        keys = [key for key in train_rows if key in engine_rows]
        if keys:
            a, b = torch.stack([engine_rows[k] for k in keys]), torch.stack([train_rows[k] for k in keys])
            delta = (a.double() - b.double())
            modules.append(ModuleDiff(name, delta.abs().max().item(),
                                      (delta.norm() / b.double().norm().clamp_min(1e-300)).item()))
    return AlignmentReport(aligned, len(prompts), sum(map(len, sequences)), modules,
                           [d for d, _ in diffs], [p for _, p in diffs])


def _engine_run(engine: Engine, recorder: _Recorder, prompts: list[list[int]], max_new_tokens: int,
                seed: int) -> list[list]:
    """Requests arrive one per step; each step's rows are keyed for the hooks by the runner's step hook."""
    def key_rows(output: SchedulerOutput, batch: StepBatch) -> None:
        starts, positions = batch.query_start.tolist(), batch.positions.tolist()
        recorder.tokens = [(int(chunk.seq.request_id), positions[i]) for n, chunk in enumerate(output.chunks)
                           for i in range(starts[n], starts[n + 1])]
        recorder.logit_tokens = [recorder.tokens[i] for i in batch.logits_indices.tolist()]

    handle = engine.runner.register_step_hook(key_rows)
    recorder.run, recorder.layout = "engine", None
    logprobs: list[list] = [[] for _ in prompts]
    step = 0
    try:
        while step < len(prompts) or engine.has_unfinished():
            if step < len(prompts):
                engine.add_request(str(step), prompts[step], SamplingParams(
                    max_tokens=max_new_tokens, seed=seed + step, logprobs=0, ignore_eos=True))
            for output in engine.step():
                logprobs[int(output.request_id)] += output.logprobs
            step += 1
    finally:
        handle.remove()
        recorder.run = None
    return logprobs


def _training_run(model: RingLinearForCausalLM, recorder: _Recorder, sequences: list[list[int]],
                  prompt_lengths: list[int], kernels: KernelPolicy) -> list[list[float]]:
    """One right-padded [B, T] forward; logits only at the positions that predict generated tokens."""
    B, T = len(sequences), max(map(len, sequences))
    device = next(model.parameters()).device
    ids = torch.tensor([s + [0] * (T - len(s)) for s in sequences], device=device)
    first = min(prompt_lengths) - 1  # the first position whose next token was generated
    recorder.run, recorder.layout = "train", (B, T)
    recorder.tokens = [(b, t) for b in range(B) for t in range(T)]
    recorder.logit_tokens = [(b, t) for b in range(B) for t in range(first, T - 1)]
    logits = model(ids, context=SequenceContext(policy=kernels),
                   logits_indices=torch.arange(first, T - 1, device=device)).logits
    targets = ids[:, first + 1:]
    with numerics(kernels):
        logp = token_logprobs(logits.flatten(0, 1), targets.flatten(), 0)[0].view(B, -1)
    recorder.run = None
    return [logp[b, n - 1 - first:len(s) - 1 - first].tolist() for b, (s, n) in enumerate(zip(sequences, prompt_lengths))]
