"""The trainer in one process: loss falls, exact resume after a kill (also one inside a save), the
schedules, the NaN guard and the expert-bias update."""

import copy
import dataclasses
import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from ringlinear import RingLinearConfig, RingLinearForCausalLM, SequenceContext
from ringlinear.data import PackedDocuments, load_dataset
from ringlinear.train import LearningRate, Stages, TrainConfig, Trainer, TrainingDiverged, build_optimizer, train
from ringlinear.train import checkpoint as checkpoint_module
from ringlinear.ops.policy import KernelPolicy
from ringlinear.train import evaluate
from ringlinear.train.checkpoint import checkpoint_dirs
from ringlinear.train.metrics import FlopCounter, SpikeDetector
from ringlinear.train.parallel import World, parallelize, process_group

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Lightning, Lightning, softmax; a dense first layer then MoE; one MTP layer.
SMALL_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, head_dim=16, intermediate_size=128,
                   moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_nextn_predict_layers=1)


def small_run(out_dir, **changes) -> TrainConfig:
    settings = dict(out_dir=str(out_dir), data=[str(STDLIB / "json"), str(STDLIB / "email")],
                    model_overrides=SMALL_MODEL, steps=8, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4,
                    warmup_steps=2, eval_interval=4, eval_batches=2, checkpoint_interval=3, val_fraction=0.1,
                    tensorboard=False)
    return TrainConfig(**{**settings, **changes})


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_validation_loss_falls_below_a_unigram_model(tmp_path):
    config = small_run(tmp_path, steps=100, batch_size=8, eval_interval=50, eval_batches=4, tensorboard=True,
                       model_overrides={**SMALL_MODEL, "num_nextn_predict_layers": 0})
    result = train(config)
    metrics = read_metrics(tmp_path)
    evals = [m for m in metrics if "val_bpb" in m]
    assert [m["step"] for m in evals] == [0, 50, 100]
    # Untrained, the model predicts nearly uniformly: about ln(vocab) nats per token.
    assert evals[0]["val_loss"] == pytest.approx(math.log(512), abs=0.3)
    # Trained, it beats the best context-free guess: token frequencies of the training split.
    counts = np.bincount(np.load(tmp_path / "data" / "train.npy"), minlength=512) + 1
    unigram = -np.log(counts / counts.sum())[np.load(tmp_path / "data" / "val.npy")].mean()
    assert evals[-1]["val_loss"] < unigram - 0.2
    assert evals[-1]["val_bpb"] < evals[1]["val_bpb"] < evals[0]["val_bpb"]
    assert result.val_bpb == evals[-1]["val_bpb"]
    # The exported model is the trained one: it validates to the same bits per byte.
    data = load_dataset(tmp_path / "data")
    rows = PackedDocuments(data.val.tokens, data.val.offsets, 0).spread(4 * 8, config.seq_len)
    exported = evaluate(result.model, rows, data.token_bytes, KernelPolicy())
    assert exported[1] == pytest.approx(result.val_bpb, rel=1e-6)
    steps = [m for m in metrics if "loss" in m]
    assert {"lr", "grad_norm", "tokens_per_s", "memory_gib", "tokens", "expert_load"} <= set(steps[-1])
    assert set(steps[-1]["expert_load"]["max_violation"]) == {"1", "2"}  # the MoE layers
    assert steps[-1]["tokens"] == 100 * 8 * 32
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> tuple[TrainConfig, list[dict]]:
    """An uninterrupted run: what the stopped and resumed ones must log."""
    config = small_run(tmp_path_factory.mktemp("whole"), grad_accum=2, keep_checkpoints=2)
    train(config)
    return config, read_metrics(config.out_dir)


def assert_same_steps(metrics: list[dict], reference: list[dict]) -> None:
    """Every record logged (a step run again after a resume too) equals the reference's of that step."""
    by_step = {(m["step"], "val_bpb" in m): m for m in reference}
    for m in metrics:
        expected = by_step[(m["step"], "val_bpb" in m)]
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "val_bpb", "expert_load"):
            assert m.get(key) == expected.get(key), (m["step"], key)
    assert {m["step"] for m in metrics} == {m["step"] for m in reference}


@pytest.mark.slow
def test_kill_inside_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(whole_run, tmp_path, monkeypatch):
    config, whole = whole_run
    assert [p.name for p in checkpoint_dirs(Path(config.out_dir))] == ["step_000006", "step_000008"]  # keep 2

    stopped = dataclasses.replace(config, out_dir=str(tmp_path / "stopped"))
    real_export = checkpoint_module.export_model

    def die_in_the_second_save(model, directory, *args):
        if "step_000006" in str(directory):  # the DCP shards are written, the HF export is half done
            (directory / "model.safetensors").parent.mkdir(parents=True)
            (directory / "model.safetensors").write_bytes(b"partial")
            raise Killed
        return real_export(model, directory, *args)

    monkeypatch.setattr(checkpoint_module, "export_model", die_in_the_second_save)
    with pytest.raises(Killed):
        train(stopped)
    monkeypatch.undo()
    run = tmp_path / "stopped"
    assert (run / "checkpoints" / "step_000006.tmp").exists()
    assert [p.name for p in checkpoint_dirs(run)] == ["step_000003"]
    assert (run / "checkpoint").resolve() == (run / "checkpoints" / "step_000003" / "model").resolve()
    with pytest.raises(ValueError, match="already holds a run"):
        train(stopped)
    with pytest.raises(ValueError, match="lr: 0.003 in the run, 0.002 now"):
        train(dataclasses.replace(stopped, lr=2e-3), resume=True)
    train(stopped, resume=True)

    resumed = read_metrics(run)
    assert sum(m["step"] == 4 and "loss" in m for m in resumed) == 2  # steps 4-6 ran again after the kill
    assert_same_steps(resumed, whole)
    assert not (run / "checkpoints" / "step_000006.tmp").exists()
    a, b = (load_file(r / "checkpoint" / "model.safetensors") for r in (Path(config.out_dir), run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("expert_bias" in k and a[k].abs().max() > 0 for k in a)


@pytest.mark.slow
def test_a_run_killed_in_its_first_save_resumes_from_step_0(whole_run, tmp_path, monkeypatch, capsys):
    config, whole = whole_run
    stopped = dataclasses.replace(config, out_dir=str(tmp_path))

    def die_in_the_first_save(*args):  # the DCP shards of step 3 are written, the model is not
        raise Killed

    monkeypatch.setattr(checkpoint_module, "export_model", die_in_the_first_save)
    with pytest.raises(Killed):
        train(stopped)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003.tmp"]
    assert (tmp_path / "train_config.json").exists() and (tmp_path / "data" / "meta.json").exists()
    with pytest.raises(ValueError, match="already holds a run; add --resume to continue it"):
        train(stopped)
    capsys.readouterr()
    train(stopped, resume=True)
    assert f"no complete checkpoint in {tmp_path / 'checkpoints'}: the run starts again from step 0" in \
        capsys.readouterr().out
    resumed = read_metrics(tmp_path)
    assert [m["step"] for m in resumed if "loss" in m] == [1, 2, 3, *range(1, 9)]
    assert_same_steps(resumed, whole)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000006", "step_000008"]
    assert not (tmp_path / "checkpoints" / "step_000003.tmp").exists()


@pytest.mark.slow
def test_more_steps_extend_a_wsm_run_as_if_it_had_been_that_long(tmp_path):
    long = small_run(tmp_path / "long", steps=9, lr_schedule="wsm", eval_interval=3)
    train(long)
    short = dataclasses.replace(long, out_dir=str(tmp_path / "short"), steps=6)
    train(short)
    train(dataclasses.replace(short, steps=9), resume=True)
    extended = read_metrics(tmp_path / "short")
    assert [m["step"] for m in extended if "loss" in m] == list(range(1, 10))  # steps 7-9 continue from step 6
    assert_same_steps(extended, read_metrics(tmp_path / "long"))


@pytest.mark.slow
def test_more_steps_are_refused_once_the_wsd_decay_began(tmp_path):
    config = small_run(tmp_path, steps=6, decay_fraction=0.5, checkpoint_interval=3, keep_checkpoints=0,
                       eval_interval=100, model_overrides={**SMALL_MODEL, "num_nextn_predict_layers": 0})
    train(config)  # decays over steps 5 and 6: 0.0021, 0.0012
    with pytest.raises(ValueError, match=r"--steps 9: the wsd schedule of 6 steps would change the learning rate "
                                         r"of step 5, already taken, from 0\.0021 to 0\.003; .* --init-from"):
        train(dataclasses.replace(config, steps=9), resume=True)
    with pytest.raises(ValueError, match="--steps 5: the run has already taken 6 steps"):
        train(dataclasses.replace(config, steps=5), resume=True)
    shutil.rmtree(tmp_path / "checkpoints" / "step_000006")  # as if it had stopped at step 3, before the decay
    with process_group(torch.device("cpu")) as world:
        assert Trainer(dataclasses.replace(config, steps=9), world, resume=True).start == 3


def test_a_validation_split_shorter_than_a_row_stops_the_run_before_its_folder_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"validation: the split has \d+ tokens, fewer than seq_len=100000; give more "
                                         r"text, a larger --val-fraction or a smaller --seq-len"):
        train(small_run(tmp_path, seq_len=100000))
    assert not (tmp_path / "train_config.json").exists() and not (tmp_path / "checkpoints").exists()


def test_learning_rate_schedules():
    wsd = LearningRate("wsd", peak_lr=1.0, warmup_steps=10, total_steps=100, decay_steps=20, min_lr=0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 99: 0.145}
    assert {s: wsd(s) for s in expected} == pytest.approx(expected)
    # Warmup and decay overlapping: the lower one.
    short = LearningRate("wsd", peak_lr=1.0, warmup_steps=10, total_steps=12, decay_steps=10)
    assert [short(s) for s in (0, 5, 11)] == pytest.approx([0.1, 0.6, 0.1])
    cosine = LearningRate("cosine", peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert [cosine(s) for s in (4, 10, 60, 110)] == pytest.approx([0.5, 1.0, 0.55, 0.1])
    wsm = LearningRate("wsm", peak_lr=1.0, warmup_steps=10, total_steps=100, decay_steps=20, min_lr=0.1)
    assert [wsm(s) for s in (4, 9, 50, 99)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_batch_size_and_context_stages():
    config = small_run("unused", steps=10, batch_size=4, batch_stages=["6:8"], seq_len=32, seq_len_stages=["3:64"])
    stages = Stages(config)
    assert [(stages.batch_size(s), stages.seq_len(s)) for s in (0, 2, 3, 5, 6, 9)] == [
        (4, 32), (4, 32), (4, 64), (4, 64), (8, 64), (8, 64)]
    assert [stages.position(s) for s in (0, 1, 3, 4, 6, 7)] == [0, 128, 384, 640, 1152, 1664]
    # rows of 32 tokens from 0 (12 of them), then of 64 from 384, endless: 4 rows a step, 8 from step 6
    assert [stages.rows(s) for s in (0, 2, 3, 5, 6, 9)] == [
        (0, 0, 12), (0, 8, 12), (384, 0, None), (384, 8, None), (384, 12, None), (384, 36, None)]
    with pytest.raises(ValueError, match="STEP:VALUE"):
        small_run("unused", batch_stages=["6"])
    with pytest.raises(ValueError, match="after the last step"):
        small_run("unused", steps=5, seq_len_stages=["5:64"])


def test_model_flops_counted_by_hand():
    # layer 0: Lightning + dense MLP; layer 1: softmax + MoE (4 experts, 2 per token, 1 shared)
    config = RingLinearConfig.preset("tiny", vocab_size=100, hidden_size=8, num_hidden_layers=2, layer_group_size=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=4, group_norm_size=2,
                                     intermediate_size=16, num_experts=4, num_experts_per_tok=2, n_group=1,
                                     topk_group=1, moe_intermediate_size=4, moe_shared_expert_intermediate_size=4)
    norms = 8 + 2 * 4 + 8  # input, q and k, post-attention
    layer0 = norms + 8 * 24 + 8 * 8 + 8 + 8 * 8 + 3 * 8 * 16  # qkv (MHA), g_proj, g_norm, dense, MLP
    layer1 = norms + 8 * 16 + 8 * 8 + 4 * 8 + 2 * 3 * 8 * 4 + 3 * 8 * 4  # qkv (GQA), dense, router, 2 experts, shared
    per_token = 2 * (layer0 + layer1 + 8) + 2 * 8 * 100 + (4 * 64 * 4 + 4 * 4 * 4) * 2  # + final norm, head, Lightning
    softmax_per_pair = 2 * 4 * 2  # QKᵀ and PV over the causal pairs, 2 heads of 4
    documents = [3, 5]
    expected = 3 * (per_token * 8 + softmax_per_pair * (3 * 4 + 5 * 6))
    assert FlopCounter(config)(documents) == expected
    assert FlopCounter(config)([8]) > expected  # one long document has more pairs than two short ones


def test_loss_spikes_are_measured_against_the_recent_losses():
    detect = SpikeDetector(sigmas=4.0, window=20)
    assert [detect(3.0 + 0.01 * (i % 3)) for i in range(30)] == [None] * 30
    assert detect(3.5) == pytest.approx((3.5 - 3.01) / math.sqrt(2e-4 / 3), rel=0.02)  # std of 3.00/3.01/3.02
    assert detect(3.02) is None
    assert SpikeDetector(4.0, history=[1.0] * 5)(100.0) is None  # too little history to judge


def test_weight_decay_applies_to_matrices_only():
    model = RingLinearForCausalLM(small_run("unused").model_config())
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path, capsys):
    config = small_run(tmp_path, steps=6, checkpoint_interval=100, eval_interval=100, max_skipped_steps=3,
                       model_overrides={**SMALL_MODEL, "num_nextn_predict_layers": 0})
    with process_group(torch.device("cpu")) as world:
        trainer = Trainer(config, world)
        poisoned = {1, 2}  # forward calls (one per step here) whose layer-0 output is NaN
        calls = []

        def poison(module, inputs, output):
            if not module.training:  # validation
                return output
            calls.append(len(calls))
            return output * math.nan if calls[-1] in poisoned else output

        trainer.model.model.layers[0].register_forward_hook(poison)
        before = {}

        def remember(step):
            before[step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            return real_step(step)

        real_step, trainer.train_step = trainer.train_step, remember
        trainer.fit()
    metrics = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [bool(m.get("skipped")) for m in metrics] == [False, True, True, False, False, False]
    assert all(math.isfinite(m["loss"]) for m in metrics if not m.get("skipped"))
    for step in (1, 2):  # a skipped step changes no weight
        after = before[step + 1]
        assert all(torch.equal(before[step][n], after[n]) for n in after)
    assert "step 3: skipped" in capsys.readouterr().out

    with process_group(torch.device("cpu")) as world:
        trainer = Trainer(dataclasses.replace(config, out_dir=str(tmp_path / "diverged")), world)
        trainer.model.model.layers[0].register_forward_hook(lambda m, i, o: o * math.nan)
        with pytest.raises(TrainingDiverged, match="stopped at step 3: 3 steps in a row had a non-finite loss"):
            trainer.fit()


def test_expert_bias_follows_the_load_of_each_step(tmp_path):
    rate = 0.01
    config = small_run(tmp_path, steps=1, bias_update_rate=rate,
                       model_overrides={**SMALL_MODEL, "num_nextn_predict_layers": 0})
    trained = train(config).model
    # Recount the load of step 0 on the same initial model and rows, independently of the trainer.
    torch.manual_seed(config.seed)
    fresh = RingLinearForCausalLM(config.model_config()).train()
    data = load_dataset(tmp_path / "data")
    stream = PackedDocuments(data.train.tokens, data.train.offsets, 0, config.seed)
    batch = stream.batch(stream.row_starts(0, config.seq_len, range(4)), config.seq_len)
    fresh(batch.input_ids, labels=batch.input_ids, context=SequenceContext(batch.cu_seqlens))
    routers = list(zip(fresh.routers(), trained.routers()))
    assert len(routers) == 2
    for counted, updated in routers:
        load = counted.expert_load
        assert load.sum() == config.batch_size * config.seq_len * fresh.config.num_experts_per_tok
        error = torch.sign(load.mean() - load)
        assert torch.allclose(updated.expert_bias, rate * (error - error.mean()))
        assert updated.expert_bias.abs().max() > 0


class _CountProducts(TorchDispatchMode):
    """Counts the matrix products dispatched while it is on."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def gradients_and_backward_products(model, ids):
    logits = model(ids).logits
    loss = logits.logsumexp(-1).mean()
    with _CountProducts() as counter:
        loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, counter.count


@pytest.mark.parametrize("recompute", ["all", "elementwise"])
def test_recomputed_layers_give_the_plain_gradients_and_elementwise_recompute_keeps_the_products(recompute):
    """Activation checkpointing changes no gradient bit; recomputing only the elementwise ops reruns
    no matrix product in the backward (it keeps their outputs), recomputing all of a layer does."""
    torch.manual_seed(0)
    model = RingLinearForCausalLM(RingLinearConfig.preset("tiny", **SMALL_MODEL)).train()
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, plain_products = gradients_and_backward_products(copy.deepcopy(model), ids)
    world = World(rank=0, size=1, device=torch.device("cpu"))
    checkpointed = parallelize(copy.deepcopy(model), world, torch.float32, 1, recompute)
    grads, products = gradients_and_backward_products(checkpointed, ids)
    assert grads.keys() == plain.keys() and all(torch.equal(grads[name], g) for name, g in plain.items())
    assert products == plain_products if recompute == "elementwise" else products > plain_products
