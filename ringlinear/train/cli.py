"""The `train` command's flags and run, shared by `ringlinear train` and the torchrun entry point
`python -m ringlinear.train`, which imports nothing beyond training."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..command import Parser, add_config_flags, checkpoint_folder, config_from_args, output_folder, run
from ..config import PRESETS
from .config import TrainConfig
from .trainer import TrainResult, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, TrainConfig, {"preset": sorted(PRESETS)},
                     {"init_from": checkpoint_folder, "out_dir": output_folder})
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its last checkpoint (from step 0 if it stopped before "
                        "one was complete); give the settings it started with (the losses then equal those of an "
                        "uninterrupted run), or a larger --steps where the learning rates of the steps taken stay the "
                        "same (wsm; wsd before its decay)")


def run_training(args: argparse.Namespace) -> TrainResult:
    """Train, then print the validation result and where the model is (main process)."""
    result = train(config_from_args(args, TrainConfig), resume=args.resume)
    if result.model is not None:
        print(f"\nvalidation: {result.val_bpb:.4f} bits per byte")
        print(f"model saved in {result.checkpoint_dir}; sample it with: "
              f"ringlinear generate --model {result.checkpoint_dir} --prompt 'def '")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = Parser(prog="python -m ringlinear.train",
                    description="`ringlinear train` in each process of a torchrun launch: torchrun --nproc-per-node N "
                    "-m ringlinear.train [train flags].")
    add_arguments(parser)
    run(parser, argv, run_training)
