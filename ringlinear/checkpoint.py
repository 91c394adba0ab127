"""Hugging Face-layout checkpoint folders: safetensors (one file or shards with
`model.safetensors.index.json`) read and written by name, and `tokenizer.json`. No pickle anywhere.

This module knows files, not models: which tensor names a Ring-linear model has, and how routed
experts are split on disk, is the model's own business (`ringlinear.model.weights`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model it claims to hold."""


def save_tensors(named_tensors: Iterable[tuple[str, Tensor]], directory: Path,
                 max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as model.safetensors, or as shards plus model.safetensors.index.json. Each
    shard is written as soon as it is full, so a stream of tensors never sits in memory whole."""
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = directory / f"model-{len(written) + 1:05d}.safetensors.partial"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(directory / SINGLE_FILE)
        return
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        filename = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / filename)
        weight_map.update({name: filename for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class CheckpointReader:
    """The tensors of a checkpoint directory by name; each safetensors file is opened once."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = _checkpoint_files(self.directory)  # tensor name -> file
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def __getitem__(self, name: str) -> Tensor:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open(path).__enter__()
        try:
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {name} from {path}: {e}") from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensors(directory: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Every (checkpoint name, tensor) of a checkpoint directory."""
    with CheckpointReader(directory) as reader:
        for name in reader.names():
            yield name, reader[name]


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Map of checkpoint tensor name -> the safetensors file that holds it."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {e!r}") from None
        files = {name: directory / filename for name, filename in weight_map.items()}
        for path in set(files.values()):
            if not path.exists():
                raise CheckpointError(f"{index_path} names {path.name}, which does not exist")
        return files
    single = directory / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: it is not a valid safetensors file ({e})") from None


def load_tokenizer(directory: str | Path):
    """The `tokenizers.Tokenizer` saved beside a checkpoint."""
    from .data.tokenizer import read_tokenizer
    path = Path(directory, "tokenizer.json")
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return read_tokenizer(path)
