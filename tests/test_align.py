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


def test_align_command_writes_its_report_and_plot(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("def f(x):\n\nimport os\n")
    main(["align", "--model", str(checkpoint), "--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4",
          "--out", str(tmp_path / "out")])
    output = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "align.json").read_text())
    assert report["num_sequences"] == 2 and report["logprobs"]["tokens"] == 8
    assert f"first module whose outputs differ: {report['first_divergence'] or 'none'}" in output
    assert "|Δp| > 0.8" in output
    assert (tmp_path / "out" / "align.png").stat().st_size > 10_000
