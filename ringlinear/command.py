"""Command-line plumbing shared by `ringlinear` and `python -m ringlinear.train` (torchrun): flags
made from a run config's fields, and a user error ending in one line instead of a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class RunFailed(RuntimeError):
    """A run that stopped itself for a reason the user can act on (the message says which)."""


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_override(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' with VALUE parsed as JSON when it is JSON (numbers, true, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def checkpoint_folder(path: str) -> str:
    """Type of a flag naming a checkpoint folder ('' = none): a folder that exists, not a file in it."""
    if path and Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path} is a file: give the checkpoint folder that holds config.json")
    if path and not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"no checkpoint directory at {path}")
    return path


def output_folder(path: str) -> str:
    """Type of a flag naming a folder to write into: new or a folder, not a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def utf8_text(text: str) -> str:
    """Type of a text flag: bytes that are not UTF-8 reach Python as lone surrogates, which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00  # the surrogate escape of an undecodable byte
        what = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"character {text[e.start]!r}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text ({what} at position {e.start})") from None
    return text


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, choices: dict[str, Sequence[str]],
                     types: dict[str, Callable[[str], Any]] | None = None) -> None:
    """One flag per field of a run config (a dataclass made with `train.config.setting`): --field-name
    with the field's help; lists take several values, booleans --x / --no-x, `model_overrides` is
    --override KEY=VALUE (repeatable); `choices` restricts the fields it names, `types` parses the
    values of the fields it names (default: the type of the field's default)."""
    types = types or {}
    for f in dataclasses.fields(config_class):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model_overrides":
            parser.add_argument("--override", dest=f.name, metavar="KEY=VALUE", type=parse_override, action="append",
                                default=list(default.items()),
                                help=f"{f.metadata['help']}, e.g. --override num_hidden_layers=4 "
                                "(repeatable; see config.json for the fields)")
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, metavar="PATH" if f.name == "data" else "STEP:VALUE", nargs="+",
                                default=[], help=f.metadata["help"])
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{f.metadata['help']} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, type=types.get(f.name, type(default)), default=default,
                                choices=choices.get(f.name),
                                help=f"{f.metadata['help']} (default: {default})")


def config_from_args(args: argparse.Namespace, config_class: type) -> Any:
    """The run config from the flags `add_config_flags` made of its fields."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    values["model_overrides"] = dict(values["model_overrides"])
    return config_class(**values)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
        command: Callable[[argparse.Namespace], None]) -> None:
    """Parse `argv` and run `command`; bad input, a missing or unusable file and a run that stopped
    itself end in one line on stderr (`PROG [COMMAND]: error: ...`) and exit 2, an interrupt in exit
    130, and a reader that closed the pipe (`| head`) in the silent exit 141 of a process killed by
    SIGPIPE."""
    args = parser.parse_args(argv)
    label = " ".join(filter(None, [parser.prog, getattr(args, "command", None)]))
    try:
        command(args)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(141)
    except (ValueError, OSError, RunFailed) as e:
        parser.exit(2, f"{label}: error: {_one_line(e)}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{label}: interrupted\n")


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split())
