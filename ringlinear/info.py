"""What a configuration costs: parameters (total and active per token), the layer map, cache memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RingLinearConfig
from .model import RingLinearForCausalLM


@dataclass
class ModelInfo:
    total_params: int
    active_params: int  # touched per token: shared weights + the k routed experts of each MoE layer
    embedding_params: int  # input embedding plus the LM head (one matrix if tied)
    layer_map: str  # one letter per layer: L = Lightning, S = softmax; MTP layers after '+'
    kv_bytes_per_token: int  # full-attention layers' cache per token of context, per sequence: GQA keys and
    # values, or MLA's normalised latent and rope key
    state_bytes_per_sequence: int  # linear layers' fp32 states per sequence, whatever its length

    def cache_bytes(self, context_tokens: int) -> int:
        return self.state_bytes_per_sequence + self.kv_bytes_per_token * context_tokens


def model_info(config: RingLinearConfig, cache_dtype: torch.dtype = torch.bfloat16) -> ModelInfo:
    with torch.device("meta"):
        model = RingLinearForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    active_experts = expert_params * config.num_experts_per_tok // config.num_experts
    embedding = sum(p.numel() for p in {model.model.word_embeddings.weight, model.lm_head.weight})
    letters = "".join("S" if config.is_softmax_layer(i) else "L" for i in range(config.num_hidden_layers))
    if config.num_nextn_predict_layers:
        letters += "+" + "S" * config.num_nextn_predict_layers
    softmax_layers = sum(config.is_softmax_layer(i) for i in range(config.num_hidden_layers))
    linear_layers = config.num_hidden_layers - softmax_layers
    D = config.head_dim
    per_layer = (config.kv_lora_rank + config.qk_rope_head_dim if config.attention_type == "mla"
                 else 2 * config.num_key_value_heads * D)
    kv_per_token = softmax_layers * per_layer * cache_dtype.itemsize
    state = linear_layers * config.num_attention_heads * D * D * 4
    return ModelInfo(total, total - expert_params + active_experts, embedding, letters, kv_per_token, state)


def format_count(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def format_bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(config: RingLinearConfig, cache_dtype: torch.dtype = torch.bfloat16) -> str:
    info = model_info(config, cache_dtype)
    all_softmax = model_info(config.replace(layer_group_size=1), cache_dtype)
    kind = config.attention_type.upper()
    lines = [
        f"parameters       {format_count(info.total_params)} total, "
        f"{format_count(info.active_params)} active per token, "
        f"{format_count(info.active_params - info.embedding_params)} without embedding and LM head",
    ]
    if config.num_nextn_predict_layers:  # model cards leave the MTP layers out of their counts
        main = model_info(config.replace(num_nextn_predict_layers=0), cache_dtype)
        lines.append(f"                 {format_count(main.total_params)} total, "
                     f"{format_count(main.active_params)} active without the MTP layers")
    lines += [
        f"layers           {info.layer_map}   (L = Lightning attention, S = softmax {kind}, + = MTP)",
        f"experts          {config.num_experts} routed, {config.num_experts_per_tok} per token in "
        f"{config.topk_group} of {config.n_group} groups, {config.num_shared_experts} shared; "
        f"first {config.first_k_dense_replace} layer(s) dense",
        f"cache / sequence {format_bytes(info.state_bytes_per_sequence)} of fp32 linear-attention state "
        f"+ {format_bytes(info.kv_bytes_per_token)} of {str(cache_dtype).removeprefix('torch.')} "
        f"{'latent + rope key' if config.attention_type == 'mla' else 'KV'} per token",
    ]
    for tokens in (4096, 32768, 131072):
        lines.append(f"  at {tokens // 1024:>3}K tokens  {format_bytes(info.cache_bytes(tokens)):>10}   "
                     f"(all-softmax: {format_bytes(all_softmax.cache_bytes(tokens))})")
    return "\n".join(lines)
