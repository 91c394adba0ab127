"""Softmax -> hybrid conversion, the starting point of Ring-linear's continued pre-training (report §4).

An all-softmax (Ling-2.0 style GQA) model becomes a hybrid one: every layer the new layout makes
linear keeps its QKV projection expanded from GQA to MHA by repeating each KV head for the query
heads that shared it, keeps its norms and output projection, and gets a freshly initialised output
gate (`g_proj`) and group norm (`g_norm`). Everything else is copied unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import INDEX_FILE
from .config import RingLinearConfig
from .model import RingLinearForCausalLM


def expand_gqa_to_mha(qkv: Tensor, heads: int, kv_heads: int) -> Tensor:
    """[(H + 2 KV) D, ...] fused projection -> [3 H D, ...] with K/V head j repeated for query heads
    j·H/KV ... (j+1)·H/KV - 1, the heads that attended to it."""
    q, k, v = qkv.unflatten(0, (heads + 2 * kv_heads, -1)).split([heads, kv_heads, kv_heads])
    repeat = heads // kv_heads
    return torch.cat([q, k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)]).flatten(0, 1)


def source_config(directory: str | Path) -> RingLinearConfig:
    """Config of a softmax checkpoint; Ling-2.0 configs have no `layer_group_size`: all softmax."""
    return RingLinearConfig.from_json_file(Path(directory, "config.json"), defaults={"layer_group_size": 1})


@torch.no_grad()
def softmax_to_hybrid(source: RingLinearForCausalLM, layer_group_size: int, seed: int = 0) -> RingLinearForCausalLM:
    config = source.config
    if any(not config.is_softmax_layer(i) for i in range(config.num_hidden_layers)):
        raise ValueError("the source model must be all-softmax (layer_group_size=1), got layer map "
                         + "".join("S" if config.is_softmax_layer(i) else "L"
                                   for i in range(config.num_hidden_layers)))
    target_config = config.replace(layer_group_size=layer_group_size)
    parameter = next(source.parameters())
    torch.manual_seed(seed)
    with torch.device(parameter.device):
        target = RingLinearForCausalLM(target_config).to(parameter.dtype)
    H, KV = config.num_attention_heads, config.num_key_value_heads
    target_state = target.state_dict()
    for name, tensor in source.state_dict().items():
        layer = _layer_index(name)
        if layer is not None and not target_config.is_softmax_layer(layer) and "query_key_value" in name:
            tensor = expand_gqa_to_mha(tensor, H, KV)
        target_state[name].copy_(tensor)
    return target.eval()


def convert_checkpoint(source: str | Path, target: str | Path, layer_group_size: int, seed: int = 0) -> RingLinearConfig:
    """`softmax_to_hybrid` from checkpoint folder to checkpoint folder, in the source's dtype; the
    tokenizer and other files beside the weights are copied."""
    source, target = Path(source), Path(target)
    model = RingLinearForCausalLM.from_pretrained(source, config=source_config(source))
    hybrid = softmax_to_hybrid(model, layer_group_size, seed)
    hybrid.save_pretrained(target)
    for extra in source.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", INDEX_FILE):
            shutil.copy(extra, target / extra.name)
    return hybrid.config


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None
