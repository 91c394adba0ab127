"""`ringlinear analyze` and `ringlinear sweep`: decode bytes and FLOPs against hand counts for two
small configs, the power-law fit on synthetic data, and a sweep of tiny real runs."""

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ringlinear import RingLinearConfig
from ringlinear.analysis import flops, memory, softmax_twin, sweep
from ringlinear.analysis.memory import decode_bytes, decode_weights, expected_experts
from ringlinear.analysis.sweep import (
    Budget,
    Grid,
    PowerLaw,
    analyse,
    fit_power_law,
    run_sweep,
)
from ringlinear.cli import main

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Both: hidden 8, head_dim 4, vocab 100, experts of 3·8·4 = 96 parameters, norms of a layer 8 + 4 + 4 + 8 = 24.
# A: layer 0 Lightning + dense MLP, layer 1 softmax GQA (2 query heads, 1 KV head) + MoE (4 experts, 2 per token).
A = RingLinearConfig.preset("tiny", vocab_size=100, hidden_size=8, num_hidden_layers=2, layer_group_size=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=4, group_norm_size=2,
                            intermediate_size=16, num_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                            moe_intermediate_size=4, moe_shared_expert_intermediate_size=4)
# B: LLS, every layer MoE (1 of 4 experts), softmax with 2 KV heads, tied embeddings, an MTP layer (not served).
B = A.replace(num_hidden_layers=3, layer_group_size=3, num_key_value_heads=2, num_experts_per_tok=1,
              first_k_dense_replace=0, tie_word_embeddings=True, num_nextn_predict_layers=1)


def test_weights_a_decode_step_reads_counted_by_hand():
    lightning_dense = 24 + 8 * 24 + 8 * 8 + 8 + 8 * 8 + 3 * 8 * 16  # qkv (MHA), g_proj, g_norm, dense, MLP
    softmax_moe_a = 24 + 8 * 16 + 8 * 8 + 4 * 8 + 96  # qkv (GQA), dense, router, shared expert
    head = 8 + 100 * 8  # final norm, LM head (the input embedding: one row per sequence)
    assert decode_weights(A) == memory.DecodeWeights(lightning_dense + softmax_moe_a + head, 96, 1, 8)
    lightning_moe = 24 + 8 * 24 + 8 * 8 + 8 + 8 * 8 + 4 * 8 + 96
    softmax_moe_b = 24 + 8 * 24 + 8 * 8 + 4 * 8 + 96  # qkv of 2 + 2 + 2 heads
    assert decode_weights(B) == memory.DecodeWeights(2 * lightning_moe + softmax_moe_b + head, 96, 3, 8)
    assert decode_weights(softmax_twin(B)).always == 3 * softmax_moe_b + head


def test_expected_distinct_experts():
    assert expected_experts(4, 2, 1) == 2  # one token: its k
    assert expected_experts(4, 2, 3) == 4 * (1 - 0.5**3)
    assert expected_experts(256, 8, 10_000) == pytest.approx(256)


def test_decode_bytes_counted_by_hand():
    # A at batch 3: 3.5 distinct experts expected, 3 embedding rows; one softmax layer's K and V of one
    # 4-wide head in bf16 (16 bytes a token) over 7 pages of 16 for 100 tokens, plus the new token's;
    # one Lightning layer's fp32 [2, 4, 4] state read and written.
    [row] = decode_bytes(A, [100], batch=3, page_size=16)
    assert row.weights == (1888 + 3.5 * 96 + 3 * 8) * 2 / 3
    assert (row.kv, row.state) == ((7 * 16 + 1) * 16, 2 * 2 * 4 * 4 * 4)
    [twin] = decode_bytes(softmax_twin(A), [100], batch=3, page_size=16)
    assert (twin.weights, twin.kv, twin.state) == ((1752 + 3.5 * 96 + 3 * 8) * 2 / 3, (7 * 16 + 1) * 32, 0)
    # B at batch 1 (one expert per MoE layer, the MTP layer not read): 3 pages of 4 for 10 tokens.
    [row] = decode_bytes(B, [10], batch=1, page_size=4)
    assert (row.weights, row.kv, row.state) == ((2176 + 3 * 96 + 8) * 2, 13 * 32, 2 * 2 * 2 * 16 * 4)
    [twin] = decode_bytes(softmax_twin(B), [10], batch=1, page_size=4)
    assert (twin.weights, twin.kv, twin.total) == ((2032 + 3 * 96 + 8) * 2, 13 * 96, 4656 + 1248)


@pytest.mark.parametrize("config, body, chunk, per_pair, twin_body, twin_per_pair, prefill_from, decode_from", [
    # body: 2 × active non-embedding parameters + 4·D²·H per Lightning layer; chunk: 4·64·D·H per Lightning layer
    (A, 2 * (736 + 536 + 8) + 4 * 16 * 2, 4 * 64 * 4 * 2, 2 * 4 * 2, 2 * (600 + 536 + 8), 2 * 2 * 4 * 2, 153, 13),
    (B, 2 * (2 * 576 + 504 + 8) + 2 * 4 * 16 * 2, 2 * 4 * 64 * 4 * 2, 2 * 4 * 2, 2 * (3 * 504 + 8), 3 * 2 * 4 * 2,
     145, 9),
])
def test_flops_per_token_counted_by_hand(config, body, chunk, per_pair, twin_body, twin_per_pair, prefill_from,
                                         decode_from):
    head = 2 * 8 * 100
    result = flops.report(config, [1, 12, 1000])
    for side, b, c, p in (("hybrid", body, chunk, per_pair), ("softmax", twin_body, 0, twin_per_pair)):
        for row in result[side]:
            n = row["context"]
            assert row["prefill"] == pytest.approx(((b + c) * n + head + p * n * (n + 1)) / n, rel=1e-12)
            assert row["decode"] == b + head + 2 * p * n
    # the gap closes by the saved attention pairs: A: 2448 - 16(n + 1) < 0 from n = 153; 400 - 32n < 0 from n = 13
    assert result["crossover"] == {"prefill": prefill_from, "decode": decode_from}


def test_first_context_below_of_affine_costs():
    assert flops.first_context_below(lambda n: 10 + n, lambda n: 2 * n) == 11
    assert flops.first_context_below(lambda n: 1.0, lambda n: 2.0) == 1
    assert flops.first_context_below(lambda n: 10 + 2 * n, lambda n: n) is None


def test_analyze_cli_table_json_plot_and_errors(tmp_path, capsys):
    for analysis, flags in (("memory", {"--batch", "--page-size"}), ("flops", {"--measure", "--measure-max", "--device"})):
        with pytest.raises(SystemExit):
            main(["analyze", analysis, "--help"])
        text = capsys.readouterr().out
        assert all(f in text for f in {"--preset", "--model", "--override", "--contexts", "--plot", "--json"} | flags)
    main(["analyze", "memory", "--preset", "tiny", "--contexts", "1024", "1048576", "--batch", "64",
          "--plot", str(tmp_path / "m.png")])
    out = capsys.readouterr().out
    assert "LLSLLS" in out and "1M |" in out and (tmp_path / "m.png").stat().st_size > 10_000
    main(["analyze", "flops", "--preset", "tiny", "--override", "layer_group_size=2", "--contexts", "4096", "--json",
          "--plot", str(tmp_path / "f.png")])
    result = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in result["hybrid"]] == [4096] and result["crossover"]["prefill"] > 1
    for argv, message in [(["memory", "--batch", "0"], "invalid --batch 0: must be >= 1"),
                          (["flops", "--contexts", "0"], "invalid --contexts [0]"),
                          (["flops", "--override", "hiden_size=8"], "unknown model config fields in --override"),
                          (["memory", "--override", "num_key_value_heads=3"], "num_key_value_heads=3: must divide"),
                          (["flops", "--measure", "--measure-max", "10"], "--measure-max 10 is below every context"),
                          (["memory", "--model", str(tmp_path / "none")], "no checkpoint directory")]:
        with pytest.raises(SystemExit) as exit_info:
            preset = [] if "--model" in argv else ["--preset", "tiny"]
            main(["analyze", *argv, *preset, "--plot", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_measured_prefill_seconds(tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    A.replace(max_position_embeddings=256).save(small)
    main(["analyze", "flops", "--model", str(small), "--contexts", "16", "64", "--measure", "--device", "cpu",
          "--json", "--plot", str(tmp_path / "f.png")])
    result = json.loads(capsys.readouterr().out)
    assert all(r["prefill_seconds"] > 0 for side in ("hybrid", "softmax") for r in result[side])
    assert result["crossover"]["measured_prefill"] in (16, 64, None) and result["device"] == "cpu"


def test_fit_recovers_a_power_law():
    C = np.geomspace(1e12, 1e16, 4)
    law = fit_power_law(list(C), list(PowerLaw(1.5, 60.0, 0.2)(C)))
    assert (law.E, law.A, law.alpha) == pytest.approx((1.5, 60.0, 0.2), rel=1e-4)
    with pytest.raises(ValueError, match="needs 3 or more different budgets"):
        fit_power_law([1e12, 1e12, 1e13], [3.0, 2.9, 2.5])


def test_analyse_finds_where_a_hybrid_falls_below_softmax():
    # 2 + 100·x < 1.8 + 200·x' with x = C^-0.2: below from x = 0.002, C = 0.002^-5 = 3.125e13
    laws = {1: PowerLaw(2.0, 100.0, 0.2), 4: PowerLaw(1.8, 200.0, 0.2), 8: PowerLaw(2.5, 100.0, 0.2)}
    runs = [{"layer_group_size": g, "linear_per_softmax": g - 1, "hidden_size": 64, "steps": 1, "flops": c,
             "val_bpb": float(law(c))} for g, law in laws.items() for c in (1e12, 1e13, 1e14, 1e15)]
    result = analyse(runs)
    assert result["fits"][4]["alpha"] == pytest.approx(0.2, rel=1e-4)
    assert result["below_softmax_from"][4] == pytest.approx(3.125e13, rel=0.02)
    assert result["below_softmax_from"][8] is None
    assert "M = 3 (G = 4)" in sweep.table(result) and "never below" in sweep.table(result)


TINY = Grid((Budget(32, 2, 1, 2), Budget(32, 2, 1, 3), Budget(32, 2, 1, 4)), batch_size=2, seq_len=16,
            vocab_size=300, num_hidden_layers=2, checkpoints=1)


def test_a_tiny_sweep_trains_each_run_once(tmp_path, capsys, monkeypatch):
    data = [str(STDLIB / "json")]
    runs = run_sweep(tmp_path, TINY, [2], data, "cpu", seed=0)
    assert [(r["layer_group_size"], r["steps"]) for r in runs] == [(2, 2), (2, 3), (2, 4)]
    for r in runs:
        metrics = [json.loads(line) for line in Path(r["run_dir"], "metrics.jsonl").read_text().splitlines()]
        assert r["val_bpb"] == metrics[-1]["val_bpb"] and r["flops"] == sum(m["flops"] for m in metrics if "flops" in m)
        assert (Path(r["run_dir"]) / "checkpoint").exists()
    assert runs[0]["flops"] < runs[1]["flops"] < runs[2]["flops"]
    monkeypatch.setattr(sweep, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert run_sweep(tmp_path, TINY, [2], data, "cpu", seed=0) == runs
    assert capsys.readouterr().out.count("already finished") == 3
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run_sweep(tmp_path, TINY, [2], data, "cpu", seed=1)
    assert math.isfinite(analyse(runs)["fits"][2]["E"])
