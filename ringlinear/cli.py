"""`ringlinear train | tokenize | merge | convert | plot | generate | serve | info | align | rl | analyze |
sweep`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .analysis import CONTEXTS, check_contexts
from .checkpoint import load_tokenizer
from .command import (Parser, add_config_flags, checkpoint_folder, config_from_args, output_folder, parse_override, run,
                      utf8_text)
from .config import PRESETS, RingLinearConfig
from .infer import EngineConfig
from .infer.async_engine import MAX_QUEUED
from .infer.limits import MAX_REQUEST_BYTES, SHUTDOWN_TIMEOUT
from .infer.spec.config import SpeculativeConfig
from .info import describe
from .model import RingLinearForCausalLM
from .model.fp8 import QUANTIZATIONS
from .rl.config import RLConfig
from .train.cli import add_arguments as add_train_arguments
from .train.cli import run_training
from .train.config import TrainConfig
from .train.merge import DECAYS
from .train.parallel import resolve_device

# Sampling defaults of `generate`, also used for the sample that ends `train`.
MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED = 200, 0.8, 0, 0.95, 0


def stream_samples(model, tokenizer, prompt: str, num_samples: int = 1,
                   max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE, top_k: int = TOP_K,
                   top_p: float = TOP_P, seed: int = SEED) -> None:
    """Print `prompt` and its continuations (sample i uses seed + i) as the inference engine makes
    them. Each starts a new document: the prompt follows the end-of-text token, as every document in
    training."""
    from .infer import Engine, SamplingParams

    prompt_ids = model.config.eos_token_ids[:1] + tokenizer.encode(prompt, add_special_tokens=False).ids
    length = len(prompt_ids) + max_new_tokens
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=1, max_model_len=length, page_size=16,
                                                   num_pages=-(-length // 16)))
    for i in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(prompt, end="", flush=True)
        if max_new_tokens:
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed + i)
            engine.add_request(str(i), prompt_ids, params)
        while engine.has_unfinished():
            for output in engine.step():
                print(output.text, end="", flush=True)
        print()


def _train(args: argparse.Namespace) -> None:
    result = run_training(args)
    if result.model is not None:  # the main process
        print("sample (a new file):\n")
        stream_samples(result.model, result.tokenizer, "", seed=args.seed)


def _tokenize(args: argparse.Namespace) -> None:
    from .data import prepare_dataset

    data = prepare_dataset(args.out, args.data, args.vocab_size, args.val_fraction, args.tokenizer)
    print(data.describe())
    print(f"written to {args.out}; train on it with: ringlinear train --tokenized {args.out}")


def _merge(args: argparse.Namespace) -> None:
    from .train.merge import merge_checkpoints

    coefficients = merge_checkpoints(args.ckpts, args.out, args.decay)
    for checkpoint, c in zip(args.ckpts, coefficients):
        print(f"{c:8.5f}  {checkpoint}")
    print(f"merged ({args.decay} decay) into {args.out}")


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    config = convert_checkpoint(args.from_softmax, args.to, args.layer_group_size, args.seed)
    print(describe(config))
    print(f"hybrid checkpoint written to {args.to}; continue pre-training it with: "
          f"ringlinear train --init-from {args.to}")


def _plot(args: argparse.Namespace) -> None:
    from .train.plot import plot_runs

    plot_runs(args.runs, args.out, args.metrics)
    print(f"wrote {args.out}")


def _generate(args: argparse.Namespace) -> None:
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise ValueError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    model = RingLinearForCausalLM.from_pretrained(args.model, device=resolve_device(args.device))
    tokenizer = load_tokenizer(args.model)
    stream_samples(model, tokenizer, args.prompt, args.num_samples, args.max_new_tokens, args.temperature,
                   args.top_k, args.top_p, args.seed)


def _serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"invalid --port {args.port}: must be in [0, 65535]")
    if args.max_queued < 0:
        raise ValueError(f"invalid --max-queued {args.max_queued}: must be >= 0")
    if args.max_request_bytes < 1:
        raise ValueError(f"invalid --max-request-bytes {args.max_request_bytes}: must be >= 1")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"invalid --shutdown-timeout {args.shutdown_timeout}: must be >= 0")
    page = EngineConfig.page_size
    if args.prefix_snapshot_interval is not None and (args.prefix_snapshot_interval < 1
                                                      or args.prefix_snapshot_interval % page):
        raise ValueError(f"invalid --prefix-snapshot-interval {args.prefix_snapshot_interval}: must be a positive "
                         f"multiple of the page size ({page})")
    if not 0 <= args.prefix_snapshot_share < 1:
        raise ValueError(f"invalid --prefix-snapshot-share {args.prefix_snapshot_share}: must be in [0, 1)")
    speculative = None if args.speculative_config is None else SpeculativeConfig.parse(args.speculative_config)
    from .infer.server import serve  # FastAPI and uvicorn load only to serve

    serve(args.model, args.host, args.port, args.api_key, args.served_model_name, args.max_queued,
          args.max_request_bytes, args.shutdown_timeout, device=resolve_device(args.device),
          max_num_seqs=args.max_num_seqs, quantization=args.quantization,
          enable_prefix_caching=args.enable_prefix_caching, prefix_snapshot_interval=args.prefix_snapshot_interval,
          prefix_snapshot_share=args.prefix_snapshot_share, speculative_config=speculative)


def _info(args: argparse.Namespace) -> None:
    config = RingLinearConfig.from_pretrained(args.model) if args.model else RingLinearConfig.preset(args.preset)
    print(describe(config))


def _align(args: argparse.Namespace) -> None:
    from .data.corpus import text_file
    from .rl.probe import DEFAULT_PROMPTS, probe

    if args.max_new_tokens < 1:
        raise ValueError(f"invalid --max-new-tokens {args.max_new_tokens}: must be >= 1")
    texts = [line for line in text_file(Path(args.prompts)).splitlines() if line.strip()] if args.prompts \
        else DEFAULT_PROMPTS
    if not texts:
        raise ValueError(f"--prompts {args.prompts} holds no prompt (one per line)")
    model = RingLinearForCausalLM.from_pretrained(args.model, device=resolve_device(args.device))
    tokenizer = load_tokenizer(args.model)
    prompts = [model.config.eos_token_ids[:1] + tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    report = probe(model, prompts, args.max_new_tokens, args.batch_invariant, seed=args.seed)
    print(report.table())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "align.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    report.plot(out / "align.png")
    print(f"wrote {out / 'align.json'} and {out / 'align.png'}")


def _rl(args: argparse.Namespace) -> None:
    from .rl.trainer import train_rl

    config = config_from_args(args, RLConfig)
    if Path(config.out_dir, "metrics.jsonl").exists():  # train_rl would write over that run's results
        raise ValueError(f"{config.out_dir} already holds an RL run; choose another --out-dir")
    resolve_device(config.device)  # a device that cannot be used stops the run before its folder is made
    result = train_rl(config)
    print(f"model saved in {result.checkpoint_dir}; reward curve in {Path(config.out_dir) / 'reward.png'}")


def _analysed_config(args: argparse.Namespace) -> RingLinearConfig:
    overrides = dict(args.override)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(RingLinearConfig)} - {"extra"})
    if unknown:
        raise ValueError(f"unknown model config fields in --override: {unknown}")
    base = RingLinearConfig.from_pretrained(args.model) if args.model else RingLinearConfig.preset(args.preset)
    return base.replace(**overrides)


def _analyze(args: argparse.Namespace) -> None:
    from .analysis import flops, memory

    check_contexts(args.contexts)
    config = _analysed_config(args)
    if args.analysis == "memory":
        module, result = memory, memory.report(config, args.contexts, args.batch, args.page_size)
    else:
        device = resolve_device(args.device) if args.measure else None
        module, result = flops, flops.report(config, args.contexts, device, args.measure_max)
    module.plot(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else f"{module.table(result)}\nwrote {args.plot}")


def _sweep(args: argparse.Namespace) -> None:
    from .analysis import sweep

    resolve_device(args.device)  # a device that cannot be used stops the sweep before its first run
    grid = sweep.QUICK if args.quick else sweep.FULL
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():  # stdout: the JSON
        runs = sweep.run_sweep(args.out_dir, grid, args.layer_group_sizes, args.data, args.device, args.seed)
    result = sweep.analyse(runs)
    plot = args.plot or str(Path(args.out_dir) / "sweep.png")
    sweep.plot(result, plot)
    Path(args.out_dir, "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json
          else f"{sweep.table(result)}\nwrote {plot} and {Path(args.out_dir) / 'sweep.json'}")


def _add_analyze(commands: argparse._SubParsersAction) -> None:
    from .analysis.sweep import LAYER_GROUP_SIZES
    from .infer.engine import EngineConfig as Engine

    ana = commands.add_parser("analyze", help="decode memory access and FLOPs per token by context length",
                              description="The report's analyses for a config against its all-softmax twin "
                              "(layer_group_size=1): bytes a decode step moves per token (memory) and FLOPs per "
                              "token of prefill and decode (flops), as a table and a log-log PNG.")
    kinds = ana.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS", help="memory or flops")
    mem = kinds.add_parser("memory", help="bytes read and written per generated token: weights, KV pages, states",
                           description="Per context length, the bytes one decode step moves per generated token: the "
                           "weights it touches (the expected distinct routed experts of B uniformly routed tokens), "
                           "the KV pages of the softmax layers, the Lightning states read and written (bf16 weights "
                           "and KV, fp32 states).")
    flo = kinds.add_parser("flops", help="FLOPs per token of prefill and decode, and where the hybrid's are fewer",
                           description="Per context length, forward FLOPs per token of a prefill and of a decode "
                           "step (the trainer's FlopCounter), the context from which the hybrid needs fewer than "
                           "its twin, and with --measure the prefill seconds per token on this device.")
    for parser, plot in ((mem, "memory.png"), (flo, "flops.png")):
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--preset", choices=sorted(PRESETS), default="mini", help="a built-in preset (default: mini)")
        which.add_argument("--model", metavar="DIR", type=checkpoint_folder, help="checkpoint folder holding config.json")
        parser.add_argument("--override", metavar="KEY=VALUE", type=parse_override, action="append", default=[],
                            help="a config field changed, e.g. --override layer_group_size=8 (repeatable)")
        parser.add_argument("--contexts", metavar="N", type=int, nargs="+", default=list(CONTEXTS),
                            help="context lengths in tokens (default: 1K, 2K, ..., 1M)")
        parser.add_argument("--plot", default=plot, metavar="FILE", help=f"PNG to write (default: {plot})")
        parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of the table")
    mem.add_argument("--batch", type=int, default=1, help="sequences decoded per step (default: 1)")
    mem.add_argument("--page-size", type=int, default=Engine.page_size,
                     help=f"tokens per KV page (default: the engine's {Engine.page_size})")
    flo.add_argument("--measure", action="store_true", help="also time a batch-1 prefill of both models (random "
                     "weights) at the contexts up to --measure-max")
    flo.add_argument("--measure-max", type=int, default=8192, help="longest context --measure runs (default: 8192)")
    flo.add_argument("--device", default="auto", help="device of --measure: cpu, cuda, cuda:N or auto (default: auto)")
    ana.set_defaults(run=_analyze)

    swp = commands.add_parser("sweep", help="train a grid of hybrid ratios and budgets and fit loss against compute",
                              description="Train small models of the tiny preset's kind (8 layers) for each layer "
                              "group size G (M = G - 1 linear layers per softmax layer) and each compute budget "
                              "(width and steps), each an ordinary training run in its own folder under --out-dir "
                              "(a finished run is not redone, a stopped one resumes), then fit bits per byte = E + "
                              "A·C^(-α) over training FLOPs C per G, print the table and plot the fits.")
    swp.add_argument("--out-dir", default="runs/sweep", type=output_folder, metavar="DIR",
                     help="folder of the runs, the tokenized corpus (data/), sweep.json and sweep.png "
                     "(default: runs/sweep)")
    swp.add_argument("--quick", action="store_true", help="the 2-core-CPU grid: widths 64/96/128, 50/100/200 steps of "
                     "8 × 128 tokens (about 15 minutes); default: widths 128-384, 500-4000 steps of 16 × 512 (a GPU)")
    swp.add_argument("--layer-group-sizes", metavar="G", type=int, nargs="+", default=list(LAYER_GROUP_SIZES),
                     help="layer group sizes to train (default: 1 2 4 8, i.e. M = 0, 1, 3, 7)")
    swp.add_argument("--data", metavar="PATH", nargs="+", default=[],
                     help="text files or folders (default: the Python standard library's .py files)")
    swp.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: auto)")
    swp.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    swp.add_argument("--plot", metavar="FILE", help="PNG to write (default: OUT_DIR/sweep.png)")
    swp.add_argument("--json", action="store_true", help="print the results as JSON (the runs' output goes to stderr)")
    swp.set_defaults(run=_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ringlinear", description="Ring-linear hybrid linear-attention MoE language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser(
        "train", help="train a model (default: the tiny preset on this Python's standard library)",
        description="Train a model. With no flags: the tiny preset on the standard library's .py files for a "
        "few minutes on a CPU, then the validation bits per byte and a sample. On several processes: "
        "torchrun --nproc-per-node N -m ringlinear.train [these flags] (FSDP2; gloo on CPUs, NCCL on GPUs).")
    add_train_arguments(train_parser)
    train_parser.set_defaults(run=_train)

    tok = commands.add_parser("tokenize", help="tokenize text once into memory-mapped token files for training",
                              description="Split the corpus by file into training and validation documents, train "
                              "a byte-level BPE tokenizer (or use --tokenizer) and write the token streams with their "
                              "document index, for `ringlinear train --tokenized DIR`.")
    tok.add_argument("--data", metavar="PATH", nargs="+", default=[],
                     help="text files or folders (default: the Python standard library's .py files)")
    tok.add_argument("--out", required=True, metavar="DIR", type=output_folder, help="folder to write")
    tok.add_argument("--vocab-size", type=int, default=RingLinearConfig.preset("tiny").vocab_size,
                     help="tokens of the BPE tokenizer to train; at most the model's vocab_size (default: the tiny "
                     "preset's)")
    tok.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json (e.g. a pretrained model's) "
                     "instead of training one")
    tok.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                     help=f"fraction of the files held out for validation; of a single file, the fraction of its "
                     f"text at its end (default: {TrainConfig.val_fraction})")
    tok.set_defaults(run=_tokenize)

    mrg = commands.add_parser("merge", help="WSM: average checkpoints with weights that emulate a learning-rate decay",
                              description="Merge checkpoints taken at equal intervals of a constant-learning-rate "
                              "run (--lr-schedule wsm) into one whose weights equal those the chosen decay over the "
                              "same interval would give (c_k = w_k, c_j = w_j - w_{j+1}, c_0 = 1 - w_1).")
    mrg.add_argument("--ckpts", required=True, nargs="+", metavar="DIR", type=checkpoint_folder,
                     help="checkpoint folders in the Hugging Face layout, oldest first (e.g. "
                     "runs/x/checkpoints/step_*/model)")
    mrg.add_argument("--decay", choices=sorted(DECAYS), default="1-sqrt", help="decay shape (default: 1-sqrt)")
    mrg.add_argument("--out", required=True, metavar="DIR", type=output_folder,
                     help="folder for the merged checkpoint")
    mrg.set_defaults(run=_merge)

    cnv = commands.add_parser("convert", help="turn an all-softmax (Ling 2.0 style) checkpoint into a hybrid one",
                              description="Make every layer the hybrid layout makes linear a Lightning layer: its "
                              "QKV expanded from GQA to MHA by repeating K/V heads, g_proj and g_norm newly "
                              "initialised; everything else copied. The start of continued pre-training.")
    cnv.add_argument("--from-softmax", required=True, metavar="DIR", type=checkpoint_folder,
                     help="all-softmax checkpoint folder")
    cnv.add_argument("--to", required=True, metavar="DIR", type=output_folder, help="folder for the hybrid checkpoint")
    cnv.add_argument("--layer-group-size", required=True, type=int,
                     help="G: G-1 linear layers then one softmax layer per group")
    cnv.add_argument("--seed", type=int, default=0, help="seed of the new g_proj weights (default: 0)")
    cnv.set_defaults(run=_convert)

    plt = commands.add_parser("plot", help="plot the loss curves of runs to a PNG",
                              description="One panel per metric of metrics.jsonl, one line per run.")
    plt.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (--out-dir of train)")
    plt.add_argument("--out", default="loss.png", metavar="FILE", help="PNG to write (default: loss.png)")
    plt.add_argument("--metrics", nargs="+", default=["loss", "val_bpb"],
                     help="metrics to plot (default: loss val_bpb)")
    plt.set_defaults(run=_plot)

    gen = commands.add_parser("generate", help="continue a prompt with a trained model, streaming the text",
                              description="Continue a prompt, printing the text as it is produced. Generation "
                              "stops at the end-of-text token or after --max-new-tokens.")
    gen.add_argument("--model", required=True, metavar="DIR", type=checkpoint_folder,
                     help="checkpoint folder (config.json, safetensors, tokenizer.json), e.g. runs/tiny/checkpoint")
    gen.add_argument("--prompt", default="", type=utf8_text,
                     help="text to continue (default: empty, i.e. the start of a new file)")
    gen.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                     help=f"most tokens to generate per sample (default: {MAX_NEW_TOKENS})")
    gen.add_argument("--temperature", type=float, default=TEMPERATURE,
                     help=f"sampling temperature; 0 = greedy (default: {TEMPERATURE})")
    gen.add_argument("--top-k", type=int, default=TOP_K,
                     help=f"sample among the k most likely tokens; 0 = all (default: {TOP_K})")
    gen.add_argument("--top-p", type=float, default=TOP_P,
                     help=f"sample among the most likely tokens that hold this probability mass; 1 = all "
                     f"(default: {TOP_P})")
    gen.add_argument("--seed", type=int, default=SEED, help=f"random seed; sample i uses seed + i (default: {SEED})")
    gen.add_argument("--num-samples", type=int, default=1,
                     help="continuations to generate, one after the other (default: 1)")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    gen.set_defaults(run=_generate)

    srv = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a checkpoint: /v1/completions and /v1/chat/completions "
                              "(streamed or not), /v1/models, vLLM's /tokenize and /detokenize, /health and "
                              "Prometheus /metrics.")
    srv.add_argument("--model", required=True, metavar="DIR", type=checkpoint_folder,
                     help="checkpoint folder (config.json, safetensors, tokenizer.json; tokenizer_config.json's "
                     "chat_template for /v1/chat/completions)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health and "
                     "/metrics (default: no key)")
    srv.add_argument("--served-model-name", metavar="NAME", nargs="+", help="the model's names in requests, the "
                     "first in responses (default: --model as given, e.g. runs/tiny/checkpoint, or its folder's "
                     "name, e.g. checkpoint)")
    srv.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                     help=f"requests running at once (default: {EngineConfig.max_num_seqs})")
    srv.add_argument("--max-queued", type=int, default=MAX_QUEUED,
                     help=f"requests waiting beyond those; more get 503 (default: {MAX_QUEUED})")
    srv.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                     help=f"largest request body; larger ones get 413 (default: {MAX_REQUEST_BYTES})")
    srv.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT,
                     help=f"seconds requests in flight get to finish after SIGTERM or SIGINT before they are ended "
                     f"(default: {SHUTDOWN_TIMEOUT:g})")
    srv.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="reuse the KV pages and Lightning-state snapshots of cached prompt prefixes (default: on)")
    srv.add_argument("--prefix-snapshot-interval", type=int, metavar="TOKENS",
                     help="tokens between two Lightning-state snapshots of a cached prefix, a multiple of the page "
                     "size (default: 16 pages, 1024 tokens)")
    srv.add_argument("--prefix-snapshot-share", type=float, default=EngineConfig.prefix_snapshot_share,
                     help="share of the cache memory for those snapshots "
                     f"(default: {EngineConfig.prefix_snapshot_share})")
    srv.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                     help="fp8: the linear layers and experts in blockwise FP8 (e4m3, 128x128 weight scales), "
                     "converted at load; a checkpoint of FP8 weights (quantization_config) loads as FP8 anyway "
                     "(default: none)")
    srv.add_argument("--speculative-config", metavar="JSON",
                     help='speculative decoding, as vLLM: \'{"method": "mtp", "num_speculative_tokens": 3}\' (the '
                     'checkpoint\'s MTP layers draft) or \'{"method": "ngram", "num_speculative_tokens": 3, '
                     '"prompt_lookup_max": 4}\' (default: off)')
    srv.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    srv.set_defaults(run=_serve)

    info = commands.add_parser("info", help="parameters, layer map and cache memory of a model",
                               description="Parameters (total and active per token), the layer map and the "
                               "inference cache memory of a checkpoint or a preset.")
    which = info.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="DIR", type=checkpoint_folder, help="checkpoint folder holding config.json")
    which.add_argument("--preset", choices=sorted(PRESETS), help="a built-in preset")
    info.set_defaults(run=_info)

    aln = commands.add_parser("align", help="compare the training forward and the inference engine module by module",
                              description="Generate after each prompt with the engine (prefill in chunks, decode, "
                              "requests arriving one per step), run the same tokens through the training forward, "
                              "and report per module the largest and the relative difference, the first module "
                              "whose outputs differ, and the generated tokens' log-prob differences; writes "
                              "align.json and align.png (divergence by layer).")
    aln.add_argument("--model", required=True, metavar="DIR", type=checkpoint_folder,
                     help="checkpoint folder with tokenizer.json")
    aln.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: a few lines of Python)")
    aln.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default: 32)")
    aln.add_argument("--batch-invariant", action="store_true",
                     help="run both in batch-invariant mode (expected: bit-identical)")
    aln.add_argument("--out", default="align", metavar="DIR", type=output_folder,
                     help="folder for align.json and align.png (default: align)")
    aln.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i uses seed + i (default: 0)")
    aln.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    aln.set_defaults(run=_align)

    rl = commands.add_parser("rl", help="GRPO / PPO on the engine's rollouts (default: arithmetic from scratch)",
                             description="Reinforcement learning on rollouts sampled by the inference engine, with "
                             "the weights copied back into it after every step. With no flags: a small model is "
                             "taught the format of 2-digit addition by fine-tuning, then GRPO raises its held-out "
                             "accuracy; metrics.jsonl and reward.png go to --out-dir.")
    add_config_flags(rl, RLConfig, {"preset": sorted(PRESETS)}, {"model": checkpoint_folder, "out_dir": output_folder})
    rl.set_defaults(run=_rl)
    _add_analyze(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    run(parser, argv, lambda args: args.run(args))


if __name__ == "__main__":
    main()
