"""The training loop: loss falls, resume is exact, the schedule, the expert-bias update."""

import dataclasses
import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ringlinear import RingLinearForCausalLM
from ringlinear.data import train_batch
from ringlinear.train import TrainConfig, WarmupStableDecay, build_optimizer, train
from ringlinear.train import trainer as trainer_module

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Lightning, Lightning, softmax; a dense first layer then MoE; one MTP layer.
SMALL_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, head_dim=16, intermediate_size=128,
                   moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_nextn_predict_layers=1)


def small_run(out_dir, **changes) -> TrainConfig:
    settings = dict(out_dir=str(out_dir), data=[str(STDLIB / "json"), str(STDLIB / "email")],
                    model_overrides=SMALL_MODEL, steps=8, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4,
                    warmup_steps=2, eval_interval=4, eval_batches=2, checkpoint_interval=3, val_fraction=0.1)
    return TrainConfig(**{**settings, **changes})


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]


def test_validation_loss_falls_below_a_unigram_model(tmp_path):
    config = small_run(tmp_path, steps=100, batch_size=8, eval_interval=50, eval_batches=4,
                       model_overrides={**SMALL_MODEL, "num_nextn_predict_layers": 0})
    result = train(config)
    evals = [m for m in read_metrics(tmp_path) if "val_bpb" in m]
    assert [m["step"] for m in evals] == [0, 50, 100]
    # Untrained, the model predicts nearly uniformly: about ln(vocab) nats per token.
    assert evals[0]["val_loss"] == pytest.approx(math.log(512), abs=0.3)
    # Trained, it beats the best context-free guess: token frequencies of the training split.
    counts = np.bincount(np.load(tmp_path / "data" / "train.npy"), minlength=512) + 1
    unigram = -np.log(counts / counts.sum())[np.load(tmp_path / "data" / "val.npy")].mean()
    assert evals[-1]["val_loss"] < unigram - 0.2
    assert evals[-1]["val_bpb"] < evals[1]["val_bpb"] < evals[0]["val_bpb"]
    assert result.val_bpb == evals[-1]["val_bpb"]
    reloaded = RingLinearForCausalLM.from_pretrained(result.checkpoint_dir)
    ids = torch.tensor([[0, 5, 9, 100]])
    assert torch.equal(reloaded(ids).logits, result.model(ids).logits)


class Killed(Exception):
    pass


def test_resume_after_a_stop_gives_the_same_losses(tmp_path, monkeypatch):
    config = small_run(tmp_path / "whole", grad_accum=2)
    train(config)
    whole = read_metrics(tmp_path / "whole")

    stopped = dataclasses.replace(config, out_dir=str(tmp_path / "stopped"))
    real_batch = trainer_module.train_batch

    def batch_then_die(tokens, seed, step, *args):
        if step == 4:  # in the middle of step 5, after the checkpoint of step 3
            raise Killed
        return real_batch(tokens, seed, step, *args)

    monkeypatch.setattr(trainer_module, "train_batch", batch_then_die)
    with pytest.raises(Killed):
        train(stopped)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="already holds a run"):
        train(stopped)
    with pytest.raises(ValueError, match="lr: 0.003 in the run, 0.002 now"):
        train(dataclasses.replace(stopped, lr=2e-3), resume=True)
    train(stopped, resume=True)

    resumed = read_metrics(tmp_path / "stopped")
    by_step = {(m["step"], "val_bpb" in m): m for m in whole}
    assert sum(m["step"] == 4 and "loss" in m for m in resumed) == 2  # step 4 ran again after the stop
    for m in resumed:
        reference = by_step[(m["step"], "val_bpb" in m)]
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "val_bpb"):
            assert m.get(key) == reference.get(key), (m["step"], key)
    assert {m["step"] for m in resumed} == {m["step"] for m in whole}
    assert "mtp_loss" in whole[1]
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint" / name) for run in ("whole", "stopped"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_warmup_stable_decay_values():
    schedule = WarmupStableDecay(peak_lr=1.0, warmup_steps=10, decay_steps=20, total_steps=100, min_lr=0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 99: 0.145}
    assert {s: schedule(s) for s in expected} == pytest.approx(expected)
    # Warmup and decay overlapping: the lower one.
    short = WarmupStableDecay(peak_lr=1.0, warmup_steps=10, decay_steps=10, total_steps=12)
    assert [short(s) for s in (0, 5, 11)] == pytest.approx([0.1, 0.6, 0.1])


def test_weight_decay_applies_to_matrices_only():
    model = RingLinearForCausalLM(small_run("unused").model_config())
    optimizer = build_optimizer(model, small_run("unused"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_expert_bias_follows_the_load_of_each_step(tmp_path):
    rate = 0.01
    config = small_run(tmp_path, steps=1, bias_update_rate=rate,
                       model_overrides={**SMALL_MODEL, "num_nextn_predict_layers": 0})
    trained = train(config).model
    # Recount the load of step 0 on the same initial model and batch, independently of the trainer.
    torch.manual_seed(config.seed)
    fresh = RingLinearForCausalLM(config.model_config()).train()
    batch = train_batch(np.load(tmp_path / "data" / "train.npy"), config.seed, 0, config.batch_size, config.seq_len)
    fresh(batch, labels=batch)
    routers = list(zip(fresh.routers(), trained.routers()))
    assert len(routers) == 2
    for counted, updated in routers:
        load = counted.expert_load
        assert load.sum() == config.batch_size * config.seq_len * fresh.config.num_experts_per_tok
        error = torch.sign(load.mean() - load)
        assert torch.allclose(updated.expert_bias, rate * (error - error.mean()))
        assert updated.expert_bias.abs().max() > 0
