"""Hugging Face-layout checkpoints: `config.json`, safetensors (one file or shards with
`model.safetensors.index.json`) and `tokenizer.json`. No pickle anywhere.

Names on disk are those of the published Ring-linear checkpoints; the only difference from our
module tree is that routed experts are stored one by one (`mlp.experts.{e}.gate_proj.weight`) and
stacked here (`mlp.experts.gate_proj` [E, ...]).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import RingLinearConfig
from .model import RingLinearForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Aliases some engines write for the routing bias.
_ALIASES = {"e_score_correction_bias": "expert_bias"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model it claims to hold."""


def to_checkpoint_tensors(model: RingLinearForCausalLM) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, tensor) for every persistent tensor, experts split one by one."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        stacked = _STACKED.match(name)
        if stacked:
            prefix, proj = stacked.groups()
            for e, weight in enumerate(tensor.unbind(0)):
                yield f"{prefix}.{e}.{proj}.weight", weight
        else:
            yield name, tensor


def save_model(model: RingLinearForCausalLM, directory: str | Path, max_shard_bytes: int = 5 * 2**30,
               tokenizer=None) -> None:
    """Write config.json, the weights (sharded above `max_shard_bytes`) and the tokenizer if given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    model.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).save(directory)
    save_tensors(to_checkpoint_tensors(model), directory, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))


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


def _canonical(name: str) -> str:
    head, _, last = name.rpartition(".")
    return f"{head}.{_ALIASES.get(last, last)}" if last in _ALIASES else name


def load_state(model: RingLinearForCausalLM, directory: str | Path) -> None:
    """Copy the checkpoint's tensors into `model`, checking names and shapes first."""
    reader = CheckpointReader(directory)
    files = reader.files
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    E = model.config.num_experts
    # Expected checkpoint names -> (our tensor, expert index or None)
    expected: dict[str, tuple[Tensor, int | None]] = {}
    for name, tensor in state.items():
        stacked = _STACKED.match(name)
        if stacked:
            prefix, proj = stacked.groups()
            expected.update({f"{prefix}.{e}.{proj}.weight": (tensor, e) for e in range(E)})
        else:
            expected[name] = (tensor, None)
    present = {_canonical(name): name for name in files}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {reader.directory} does not match the model of its config.json: "
            f"{len(missing)} missing weights {_preview(missing)}, {len(unexpected)} unexpected weights "
            f"{_preview(unexpected)}")
    with reader:
        for stored in reader.names():
            _copy_into(expected[_canonical(stored)], reader[stored], stored, files[stored])


def _copy_into(destination: tuple[Tensor, int | None], source: Tensor, stored: str, path: Path) -> None:
    target, expert = destination
    want = target.shape if expert is None else target.shape[1:]
    if source.shape != want:
        raise CheckpointError(f"{stored} in {path.name} has shape {list(source.shape)}, "
                              f"the model expects {list(want)}")
    with torch.no_grad():
        (target if expert is None else target[expert]).copy_(source)


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config: RingLinearConfig | None = None) -> RingLinearForCausalLM:
    """Build the model of `config` (default: `directory/config.json`) without initialising it, then
    load its weights. `dtype` defaults to the config's `torch_dtype`; the routers' `expert_bias`
    stays fp32."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    config = config or RingLinearConfig.from_pretrained(directory)
    dtype = dtype or DTYPES.get(config.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = RingLinearForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    load_state(model, directory)
    return model.eval()


def load_tokenizer(directory: str | Path):
    """The `tokenizers.Tokenizer` saved beside a checkpoint."""
    from tokenizers import Tokenizer
    path = Path(directory, "tokenizer.json")
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return Tokenizer.from_file(str(path))
