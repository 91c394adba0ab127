"""`ringlinear train → generate → info`, `tokenize`, `merge`, `convert` and `plot` end to end, --help, and
one-line errors for bad input."""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.checkpoint import load_tokenizer
from ringlinear.cli import build_parser, main
from ringlinear.data import train_tokenizer
from ringlinear.generate import generate
from ringlinear.rl.config import RLConfig
from ringlinear.train import TrainConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, head_dim=16, intermediate_size=128,
                   moe_intermediate_size=32, moe_shared_expert_intermediate_size=32)


def train_argv(out_dir) -> list[str]:
    return ["train", "--out-dir", str(out_dir), "--data", str(STDLIB / "json"), str(STDLIB / "email"),
            *[arg for key, value in SMALL_MODEL.items() for arg in ("--override", f"{key}={value}")],
            "--steps", "30", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "3",
            "--eval-interval", "10", "--eval-batches", "2", "--val-fraction", "0.1"]


def run(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(argv)
    return stdout.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    return out_dir, run(train_argv(out_dir))


@pytest.mark.slow
def test_train_reports_validation_bits_per_byte_and_a_sample(trained):
    out_dir, output = trained
    evals = [m for m in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in m]
    assert [m["step"] for m in evals] == [0, 10, 20, 30]
    assert f"validation: {evals[-1]['val_bpb']:.4f} bits per byte" in output
    sample = output.split("sample (a new file):\n\n", 1)[1]
    assert sample.strip()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out_dir / "checkpoint").iterdir()}


@pytest.mark.slow  # the trained fixture: a training run
def test_generate_prints_the_prompt_and_its_continuation(trained):
    model_dir = trained[0] / "checkpoint"
    output = run(["generate", "--model", str(model_dir), "--prompt", "def ", "--temperature", "0",
                  "--max-new-tokens", "40"])
    model, tokenizer = RingLinearForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir)
    prompt = [0] + tokenizer.encode("def ", add_special_tokens=False).ids  # a new document starts after EOS
    greedy = generate(model, [prompt], max_new_tokens=40, temperature=0.0, eos_token_ids=[0])[0]
    assert output == "def " + tokenizer.decode(greedy) + "\n"


@pytest.mark.slow  # the trained fixture: a training run
def test_generate_samples_are_seeded(trained):
    def sample(num_samples: int, seed: int) -> str:
        return run(["generate", "--model", str(trained[0] / "checkpoint"), "--prompt", "import ", "--max-new-tokens",
                    "20", "--top-k", "50", "--top-p", "0.9", "--num-samples", str(num_samples), "--seed", str(seed)])

    both = sample(2, seed=3)
    assert both.startswith("--- sample 1 ---\nimport ") and "\n--- sample 2 ---\nimport " in both
    assert sample(2, seed=3) == both
    assert both.split("--- sample 2 ---\n")[1] == sample(1, seed=4)  # sample i uses seed + i


@pytest.mark.slow  # the trained fixture: a training run
def test_info_of_a_checkpoint_and_of_the_presets(trained):
    assert "LLS " in run(["info", "--model", str(trained[0] / "checkpoint")])
    assert "LLLLSLLLLSLLLLSLLLLS " in run(["info", "--preset", "mini"])  # softmax layers 4, 9, 14, 19
    assert "LLLLLLLSLLLLLLLSLLLLLLLSLLLLLLLS+S " in run(["info", "--preset", "flash"])  # 7, 15, 23, 31; MTP


@pytest.mark.slow
def test_resume_through_the_cli(trained, capsys):
    out_dir, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(out_dir))
    assert exit_info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*train_argv(out_dir), "--steps", "40", "--resume"])
    assert "--steps 40: the wsd schedule of 30 steps would change the learning rate of step 26" in \
        capsys.readouterr().err
    steps_before = (out_dir / "metrics.jsonl").read_text().count('"loss"')
    output = run([*train_argv(out_dir), "--resume"])  # the run is complete: nothing left to train
    assert "validation:" in output
    assert (out_dir / "metrics.jsonl").read_text().count('"loss"') == steps_before


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("checkpoint")
    tokenizer = train_tokenizer(["def f(x):\n    return x\n"] * 10, SMALL_MODEL["vocab_size"])
    model = RingLinearForCausalLM(RingLinearConfig.preset("tiny", **SMALL_MODEL))
    model.save_pretrained(directory, tokenizer=tokenizer)
    return directory


def config_json(**changes) -> str:
    """The small checkpoint's config.json with fields changed (None: left out)."""
    values = {**RingLinearConfig.preset("tiny", **SMALL_MODEL).to_dict(), **changes}
    return json.dumps({key: value for key, value in values.items() if value is not None})


# {tmp} is the test's folder, which holds ckpt/ (a small checkpoint), file, bad.txt (not UTF-8) and empty.txt;
# `files` are written there too.
@pytest.mark.parametrize("argv, message, files", [
    (["generate", "--model", "{tmp}/ckpt", "--device", "gpu"], "invalid --device 'gpu': expected cpu, cuda, cuda:N or "
     "auto", {}),
    (["align", "--model", "{tmp}/ckpt", "--device", "gpu"], "invalid --device 'gpu'", {}),
    (["serve", "--model", "{tmp}/ckpt", "--device", "gpu"], "invalid --device 'gpu'", {}),
    (["train", "--device", "gpu"], "invalid --device 'gpu'", {}),
    (["rl", "--device", "gpu"], "invalid --device 'gpu'", {}),
    (["info", "--model", "{tmp}/ckpt"], "{tmp}/ckpt/config.json: invalid config: rope_theta='10000': must be a number",
     {"ckpt/config.json": config_json(rope_theta="10000")}),
    (["info", "--model", "{tmp}/ckpt"], "config.json: invalid config: num_experts='16': must be an integer",
     {"ckpt/config.json": config_json(num_experts="16")}),
    (["generate", "--model", "{tmp}/ckpt"], "config.json: invalid config: partial_rotary_factor='half': must be a "
     "number", {"ckpt/config.json": config_json(partial_rotary_factor="half")}),
    (["info", "--model", "{tmp}/ckpt"], "config.json: invalid config: hidden_size=True: must be an integer",
     {"ckpt/config.json": config_json(hidden_size=True)}),
    (["train", "--override", "rope_theta=abc"], "invalid config: rope_theta='abc': must be a number", {}),
    (["generate", "--model", "{tmp}/ckpt"], "{tmp}/ckpt/config.json lacks vocab_size",
     {"ckpt/config.json": config_json(vocab_size=None)}),
    (["info", "--model", "{tmp}/ckpt"], "config.json is not valid JSON", {"ckpt/config.json": "{"}),
    (["generate", "--model", "{tmp}/ckpt"], "{tmp}/ckpt/tokenizer.json is not a valid tokenizer.json",
     {"ckpt/tokenizer.json": "{}"}),
    (["generate", "--model", "{tmp}/ckpt"], "tokenizer.json is not a valid tokenizer.json",
     {"ckpt/tokenizer.json": "garbage"}),
    (["tokenize", "--out", "{tmp}/tokens", "--data", str(STDLIB / "json"), "--tokenizer", "{tmp}/bad.txt"],
     "{tmp}/bad.txt is not a valid tokenizer.json", {}),
    (["generate", "--model", "{tmp}/ckpt", "--prompt", "ab\udcff"], "argument --prompt: not valid UTF-8 text (byte "
     "0xff at position 2)", {}),
    (["align", "--model", "{tmp}/ckpt", "--prompts", "{tmp}/bad.txt"], "{tmp}/bad.txt is not a UTF-8 text file", {}),
    (["align", "--model", "{tmp}/ckpt", "--prompts", "{tmp}/none.txt"], "{tmp}/none.txt: No such file or directory",
     {}),
    (["align", "--model", "{tmp}/ckpt", "--prompts", "{tmp}/empty.txt"], "--prompts {tmp}/empty.txt holds no prompt",
     {}),
    (["align", "--model", "{tmp}/ckpt", "--max-new-tokens", "0"], "invalid --max-new-tokens 0: must be >= 1", {}),
    (["align", "--model", "{tmp}/ckpt", "--out", "{tmp}/file"], "argument --out: {tmp}/file is a file, not a folder",
     {}),
    (["train", "--out-dir", "{tmp}/file"], "argument --out-dir: {tmp}/file is a file, not a folder", {}),
    (["rl", "--out-dir", "{tmp}/file"], "argument --out-dir: {tmp}/file is a file, not a folder", {}),
    (["tokenize", "--out", "{tmp}/file"], "argument --out: {tmp}/file is a file, not a folder", {}),
    (["merge", "--ckpts", "{tmp}/ckpt", "--out", "{tmp}/file"], "argument --out: {tmp}/file is a file", {}),
    (["convert", "--from-softmax", "{tmp}/ckpt", "--to", "{tmp}/file", "--layer-group-size", "2"],
     "argument --to: {tmp}/file is a file", {}),
    *[([command, "--model", "{tmp}/ckpt/config.json"], "argument --model: {tmp}/ckpt/config.json is a file: give the "
       "checkpoint folder that holds config.json", {}) for command in ("generate", "serve", "align", "info", "rl")],
    (["train", "--init-from", "{tmp}/ckpt/config.json"], "argument --init-from: {tmp}/ckpt/config.json is a file", {}),
    (["merge", "--ckpts", "{tmp}/ckpt", "{tmp}/ckpt/model.safetensors", "--out", "{tmp}/merged"],
     "argument --ckpts: {tmp}/ckpt/model.safetensors is a file", {}),
    (["convert", "--from-softmax", "{tmp}/nowhere", "--to", "{tmp}/hybrid", "--layer-group-size", "2"],
     "argument --from-softmax: no checkpoint directory at {tmp}/nowhere", {}),
    (["rl", "--model", "{tmp}/nowhere"], "argument --model: no checkpoint directory at {tmp}/nowhere", {}),
    (["train", "--data", "{tmp}/one.txt"], "one.txt is too short to hold out val_fraction=0.02 of it",
     {"one.txt": "x"}),
    (["tokenize", "--out", "{tmp}/tokens", "--data", str(STDLIB / "json"), "--vocab-size", "100"],
     "invalid vocab_size=100: a byte-level BPE has 256 byte tokens and <|endoftext|>, so at least 257 tokens", {}),
    (["tokenize", "--out", "{tmp}/tokens", "--val-fraction", "2"], "invalid val_fraction=2.0: must be in (0, 1)", {}),
    (["train", "--resume", "--out-dir", "{tmp}/old"], "{tmp}/old/train_config.json is not valid JSON",
     {"old/train_config.json": "{"}),
    (["train", "--tokenized", "{tmp}/tokens"], "{tmp}/tokens/meta.json is not the meta.json of a tokenized dataset",
     {"tokens/meta.json": "{}"}),
    (["plot", "{tmp}/old"], "{tmp}/old/metrics.jsonl line 2 is not JSON", {"old/metrics.jsonl": '{"step": 1}\n{"st'}),
    (["rl", "--out-dir", "{tmp}/old"], "{tmp}/old already holds an RL run; choose another --out-dir",
     {"old/metrics.jsonl": '{"step": 0}\n'}),
    (["serve", "--model", "{tmp}/ckpt", "--port", "99999"], "invalid --port 99999: must be in [0, 65535]", {}),
    (["serve", "--model", "{tmp}/ckpt", "--max-queued", "-1"], "invalid --max-queued -1: must be >= 0", {}),
    (["serve", "--model", "{tmp}/ckpt", "--speculative-config", '{{"method": "mtp", "num_speculative_tokens": 0}}'],
     "speculative_config.num_speculative_tokens must be an integer in [1, 63], got 0", {}),
    (["serve", "--model", "{tmp}/ckpt", "--speculative-config", '{{"method": "mtp", "num_speculative_tokens": 2}}'],
     "speculative_config.method 'mtp' needs MTP layers, but the checkpoint has num_nextn_predict_layers=0", {}),
    (["serve", "--model", "{tmp}/ckpt", "--speculative-config",
      '{{"method": "ngram", "num_speculative_tokens": 2, "speculative_token_tree": "[(0,), (0, 1)]"}}'],
     "speculative_config.speculative_token_tree: path (0, 1) has no better-ranked sibling (0, 0)", {}),
    (["serve", "--model", "{tmp}/ckpt", "--max-request-bytes", "0"], "invalid --max-request-bytes 0: must be >= 1", {}),
    (["serve", "--model", "{tmp}/ckpt", "--shutdown-timeout", "-1"], "invalid --shutdown-timeout -1.0: must be >= 0",
     {}),
    (["serve", "--model", "{tmp}/ckpt", "--prefix-snapshot-interval", "100"],
     "invalid --prefix-snapshot-interval 100: must be a positive multiple of the page size (64)", {}),
    (["serve", "--model", "{tmp}/ckpt", "--prefix-snapshot-share", "1"],
     "invalid --prefix-snapshot-share 1.0: must be in [0, 1)", {}),
    (["generate", "--model", "/no/such/dir"], "no checkpoint directory at /no/such/dir", {}),
    (["generate"], "the following arguments are required: --model", {}),
    (["serve", "--model", "/no/such/dir"], "no checkpoint directory at /no/such/dir", {}),
    (["info"], "one of the arguments --model --preset is required", {}),
    (["info", "--preset", "huge"], "invalid choice: 'huge'", {}),
    (["frobnicate"], "invalid choice: 'frobnicate'", {}),
    (["train", "--steps", "0"], "invalid steps=0: must be positive", {}),
    (["train", "--steps", "ten"], "invalid int value: 'ten'", {}),
    (["train", "--data", "/no/such/file.txt"], "no such file or folder: /no/such/file.txt", {}),
    (["train", "--override", "hidden_size"], "expected KEY=VALUE", {}),
    (["train", "--override", "hiden_size=64"], "unknown model config fields in model_overrides: ['hiden_size']", {}),
    (["train", "--override", "num_key_value_heads=3"], "num_key_value_heads=3: must divide num_attention_heads", {}),
])
def test_bad_input_is_one_line_without_traceback(argv, message, files, small_checkpoint, tmp_path, capsys):
    shutil.copytree(small_checkpoint, tmp_path / "ckpt")
    (tmp_path / "file").write_text("a file, not a folder\n")
    (tmp_path / "bad.txt").write_bytes(b"a prompt\n\xff\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if argv[0] in ("train", "rl") and "--out-dir" not in argv:
        argv = [*argv, "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    label = "ringlinear" if argv[0] == "frobnicate" else f"ringlinear {argv[0]}"  # the command's name, if any
    assert err.count("\n") == 1 and err.startswith(f"{label}: error: ") and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "align").exists()
    assert (tmp_path / "file").read_text() == "a file, not a folder\n"


@pytest.mark.slow  # a Python that imports torch
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    """`ringlinear info --preset mini | head -1`: the reader is gone before the output is written."""
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-m", "ringlinear.cli", "info", "--preset", "mini"], cwd=root,
                               env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    assert process.stderr.read().decode() == "" and process.wait() == 141


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--device", "cuda", "--out-dir", str(tmp_path)])
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    expected = {
        "train": {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)
                  if f.name != "model_overrides"} | {"--override", "--resume", "--no-tensorboard"},
        "generate": {"--model", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                     "--num-samples", "--device"},
        "serve": {"--model", "--host", "--port", "--api-key", "--served-model-name", "--max-num-seqs", "--max-queued",
                  "--max-request-bytes", "--shutdown-timeout", "--quantization", "--device",
                  "--enable-prefix-caching", "--no-enable-prefix-caching", "--prefix-snapshot-interval",
                  "--prefix-snapshot-share", "--speculative-config"},
        "info": {"--model", "--preset"},
        "tokenize": {"--data", "--out", "--vocab-size", "--tokenizer", "--val-fraction"},
        "merge": {"--ckpts", "--decay", "--out"},
        "convert": {"--from-softmax", "--to", "--layer-group-size", "--seed"},
        "plot": {"--out", "--metrics"},
        "align": {"--model", "--prompts", "--max-new-tokens", "--batch-invariant", "--out", "--seed", "--device"},
        "rl": {"--" + f.name.replace("_", "-") for f in dataclasses.fields(RLConfig)
               if f.name != "model_overrides"} | {"--override", "--no-batch-invariant"},
        "analyze": set(),  # its flags are those of `analyze memory` and `analyze flops` (tests/test_analysis.py)
        "sweep": {"--out-dir", "--quick", "--layer-group-sizes", "--data", "--device", "--seed", "--plot", "--json"},
    }
    assert set(commands) == set(expected)
    for name, command in commands.items():
        flags = {s for a in command._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        assert flags == expected[name]
        assert all(a.help for a in command._actions), name
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in expected[name])


@pytest.mark.slow
def test_tokenize_then_train_on_the_token_files_and_plot(tmp_path):
    output = run(["tokenize", "--data", str(STDLIB / "json"), "--out", str(tmp_path / "tokens"), "--vocab-size", "400",
                  "--val-fraction", "0.2"])
    assert f"ringlinear train --tokenized {tmp_path / 'tokens'}" in output
    argv = train_argv(tmp_path / "run")
    argv = argv[:argv.index("--data")] + argv[argv.index("--data") + 3:]  # the token files instead
    run([*argv, "--tokenized", str(tmp_path / "tokens"), "--steps", "4", "--eval-interval", "2", "--no-tensorboard",
         "--lr-schedule", "wsm", "--seq-len-stages", "2:64", "--batch-stages", "3:8", "--peak-tflops", "1"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [(m["batch_size"], m["seq_len"]) for m in steps] == [(4, 32), (4, 32), (4, 64), (8, 64)]
    assert [m["lr"] for m in steps[2:]] == [3e-3, 3e-3]  # WSM: constant after warmup
    assert all(0 < m["mfu"] < 1 for m in steps)  # model FLOPs / (time × 1 TFLOP/s)
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "data").exists()
    assert "wrote" in run(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "loss.png")])
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_merge_writes_the_weighted_average(tmp_path):
    from ringlinear.checkpoint import read_tensors
    from ringlinear.train.merge import merge_coefficients

    config = RingLinearConfig.preset("tiny", num_hidden_layers=2)
    dirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        RingLinearForCausalLM(config).save_pretrained(tmp_path / f"c{seed}")
        dirs.append(str(tmp_path / f"c{seed}"))
    output = run(["merge", "--ckpts", *dirs, "--decay", "cosine", "--out", str(tmp_path / "merged")])
    c = merge_coefficients(3, "cosine")
    assert output.splitlines()[0].split() == [f"{c[0]:.5f}", dirs[0]]
    merged, inputs = dict(read_tensors(tmp_path / "merged")), [dict(read_tensors(d)) for d in dirs]
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert torch.allclose(merged[name].double(), sum(cj * x[name].double() for cj, x in zip(c, inputs)), atol=1e-6)


def test_convert_a_ling_style_checkpoint(tmp_path):
    from ringlinear.convert import softmax_to_hybrid

    config = RingLinearConfig.preset("tiny", num_hidden_layers=4, layer_group_size=1)
    torch.manual_seed(0)
    source = RingLinearForCausalLM(config)
    source.save_pretrained(tmp_path / "ling")
    values = json.loads((tmp_path / "ling" / "config.json").read_text())
    del values["layer_group_size"]  # Ling 2.0 configs have none: all softmax
    (tmp_path / "ling" / "config.json").write_text(json.dumps(values))
    (tmp_path / "ling" / "tokenizer.json").write_text("{}")
    output = run(["convert", "--from-softmax", str(tmp_path / "ling"), "--to", str(tmp_path / "hybrid"),
                  "--layer-group-size", "2"])
    assert "LSLS" in output and "ringlinear train --init-from" in output
    converted = RingLinearForCausalLM.from_pretrained(tmp_path / "hybrid")
    expected = softmax_to_hybrid(source, layer_group_size=2)
    assert converted.config.layer_types == ["linear", "softmax", "linear", "softmax"]
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), expected.state_dict().values()))
    assert (tmp_path / "hybrid" / "tokenizer.json").read_text() == "{}"
