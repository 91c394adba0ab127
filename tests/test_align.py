"""The alignment probe: nothing differs in batch-invariant mode; a bf16 Lightning state planted in
the engine is found at the first module after the Lightning core; `ringlinear align` writes its
report and plot."""

import json

import pytest
import torch
from infer_helpers import tiny_checkpoint, tiny_model

from ringlinear.cli import main
from ringlinear.infer.context import PagedContext
from ringlinear.rl.probe import probe


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=3)


PROMPTS = [torch.randint(1, 257, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 40, 17)]


def test_batch_invariant_mode_leaves_nothing_to_find(model):
    report = probe(model, PROMPTS, max_new_tokens=6, aligned=True)
    assert report.first_divergence is None and len(report.modules) > 40
    assert report.summary()["identical_fraction"] == 1.0 and len(report.logprob_diffs) == 18


def test_a_planted_bf16_state_is_found_where_it_enters(model, monkeypatch):
    """The engine keeps its Lightning states in bf16 (rounded after every step): layer 0's
    projections agree, and its output norm, the first module after the Lightning core, parts."""
    lightning = PagedContext.lightning

    def bf16_state(self, layer_idx, q, k, v, log_decay):
        o = lightning(self, layer_idx, q, k, v, log_decay)
        states = self.cache.states[self.cache.linear_index[layer_idx]]
        states.copy_(states.to(torch.bfloat16))
        return o

    monkeypatch.setattr(PagedContext, "lightning", bf16_state)
    report = probe(model, PROMPTS, max_new_tokens=6, aligned=True)
    assert report.first_divergence == "model.layers.0.attention.g_norm"
    diffs = {m.name: m.max_abs for m in report.modules}
    assert diffs["model.layers.0.attention.query_key_value"] == 0 and diffs["lm_head"] > 0
    assert report.summary()["max_abs_dlogp"] > 0


@pytest.mark.slow
def test_align_command_writes_its_report_and_plot(tmp_path, capsys):
    """`ringlinear align`: in batch-invariant mode every module and every log-prob agrees exactly; in
    fast mode the summary, the first divergence and the table are those of the per-module and
    per-token differences it saved."""
    checkpoint = tiny_checkpoint(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("def f(x):\n\nimport os\n")
    reports = {}
    for mode in ("aligned", "fast"):
        main(["align", "--model", str(checkpoint), "--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4",
              "--out", str(tmp_path / mode), *(["--batch-invariant"] if mode == "aligned" else [])])
        reports[mode] = json.loads((tmp_path / mode / "align.json").read_text()), capsys.readouterr().out
        assert (tmp_path / mode / "align.png").stat().st_size > 10_000
    aligned, output = reports["aligned"]
    layers = {f"model.layers.{i}" for i in range(6)}  # the tiny preset's decoder layers
    assert aligned["num_sequences"] == 2 and aligned["logprobs"]["tokens"] == 8
    assert layers <= {m["name"] for m in aligned["modules"]} and all(m["max_abs"] == 0 for m in aligned["modules"])
    assert aligned["logprob_diffs"] == [0.0] * 8 and aligned["first_divergence"] is None
    assert "identical 100.0%" in output and "\nfirst module whose outputs differ: none\n" in output

    fast, output = reports["fast"]
    gaps = [abs(d) for d in fast["logprob_diffs"]]
    assert len(gaps) == 8 and fast["logprobs"]["max_abs_dlogp"] == max(gaps)
    assert abs(fast["logprobs"]["mean_abs_dlogp"] - sum(gaps) / 8) < 1e-12
    assert fast["logprobs"]["identical_fraction"] == sum(g == 0 for g in gaps) / 8
    first = next((m["name"] for m in fast["modules"] if m["max_abs"] > 0), None)
    assert fast["first_divergence"] == first
    rows = {line.split()[0]: float(line.split()[1]) for line in output.splitlines()
            if line.startswith(("model.", "lm_head"))}
    assert rows.keys() == {m["name"] for m in fast["modules"]}
    assert all(abs(rows[m["name"]] - m["max_abs"]) <= 1e-3 * m["max_abs"] for m in fast["modules"])
