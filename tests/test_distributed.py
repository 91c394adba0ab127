"""Two gloo processes with FSDP2 train exactly as one process does with the same global batch, and one
process resumes their sharded checkpoint."""

import dataclasses
import json
import os
import shutil
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from ringlinear.data import prepare_dataset
from ringlinear.train import TrainConfig, train
from test_train import read_metrics, small_run


def _process(rank: int, world_size: int, port: int, settings: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a 2-core machine: more threads only wait for each other
    sys.stdout = open(os.devnull, "w")
    train(TrainConfig(**settings))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    data = tmp_path / "data"
    prepare_dataset(data, small_run("unused").data, 512, 0.1)
    one = small_run(tmp_path / "one", steps=4, eval_interval=4, checkpoint_interval=2, grad_accum=2,
                    tokenized=str(data), data=[])
    train(one)
    # Each process takes one of the two micro-batches; activation checkpointing changes no number.
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"), grad_accum=1, activation_checkpointing=1)
    mp.start_processes(_process, args=(2, _free_port(), dataclasses.asdict(two)), nprocs=2, start_method="spawn")

    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4, 4]
    for x, y in zip(a, b):
        for key in ("loss", "lm_loss", "mtp_loss", "val_loss", "val_bpb"):
            assert (key in x) == (key in y)
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], key)
        assert x.get("expert_load") == y.get("expert_load")  # the load is summed over the processes
    # Each process wrote its own shards; the exported model holds all of them.
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "step_000004").glob("*.distcp")} == {
        "__0_0.distcp", "__1_0.distcp"}
    w1, w2 = (load_file(tmp_path / run / "checkpoint" / "model.safetensors") for run in ("one", "two"))
    assert w1.keys() == w2.keys()
    for name in w1:  # Adam divides by √v: rounding in a gradient near 0 moves its weight a little
        assert torch.allclose(w1[name], w2[name], atol=1e-4), (name, (w1[name] - w2[name]).abs().max())
        if "expert_bias" in name:
            assert torch.equal(w1[name], w2[name])  # every process applied the same summed load
    assert json.loads((tmp_path / "two" / "checkpoints" / "step_000004" / "trainer_state.json").read_text())[
        "tokens"] == 4 * 4 * 32

    # One process resumes the two processes' sharded checkpoint of step 2 and goes on as they did.
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_000004")
    train(two, resume=True)
    resumed = read_metrics(tmp_path / "two")[len(b):]
    assert [m["step"] for m in resumed] == [3, 4, 4]
    for x, y in zip(resumed, b[-3:]):
        for key in ("loss", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], key)


@pytest.mark.slow  # a Python that imports torch
def test_a_torchrun_worker_imports_only_what_training_needs():
    """`torchrun -m ringlinear.train` runs train/cli.py in every process: neither the inference engine
    nor RL (nor FastAPI) is imported there."""
    import subprocess

    code = ("import sys, ringlinear.train.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith(('ringlinear.infer', 'ringlinear.rl', 'fastapi'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "ringlinear.train", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert help_text.startswith("usage: python -m ringlinear.train") and "--resume" in help_text
