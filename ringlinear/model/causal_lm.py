"""The Ring-linear causal language model: a pre-norm stack of Lightning and softmax layers with
dense-then-MoE MLPs, optional multi-token-prediction (MTP) layers, and an untied fp32 LM head.

Module names equal the checkpoint names of the published models (`model.word_embeddings`,
`model.layers.{i}.attention.query_key_value`, ...); only the routed experts are stacked here and
split into `mlp.experts.{e}.*` on disk (`weights.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from ..checkpoint import DTYPES, save_tensors
from ..config import RingLinearConfig
from ..ops.batch_invariant import numerics
from ..ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from .attention import LightningAttention, SoftmaxAttention
from .context import AttentionContext, SequenceContext
from .fp8 import is_fp8_checkpoint, quantize_weights
from .layers import MLP, Linear, RMSNorm, RotaryEmbedding
from .mla import MultiLatentAttention
from .moe import Experts, MoE, Router
from .weights import checkpoint_tensors, load_weights


def full_attention(config: RingLinearConfig) -> type[SoftmaxAttention | MultiLatentAttention]:
    """The full-attention module of the config's generation: GQA (Ring-linear-2.0) or MLA (Ring-2.5)."""
    return {"gqa": SoftmaxAttention, "mla": MultiLatentAttention}[config.attention_type]


class DecoderLayer(nn.Module):
    def __init__(self, config: RingLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = full_attention(config)(config, layer_idx) if config.is_softmax_layer(layer_idx) \
            else LightningAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                          config.intermediate_size, config.hidden_act)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], context: AttentionContext) -> Tensor:
        policy = context.policy
        h = h + self.attention(self.input_layernorm(h, policy), rope, context)
        return h + self.mlp(self.post_attention_layernorm(h, policy), policy)


class MTPLayer(DecoderLayer):
    """Predicts one token further: mixes the embedding of the next token with the previous depth's
    hidden state (`eh_proj([enorm(e); hnorm(h)])`), then runs a decoder block."""

    def __init__(self, config: RingLinearConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Linear(2 * hidden, hidden, bias=False)
        self.final_layernorm = RMSNorm(hidden, config.rms_norm_eps)

    def forward(self, embedded: Tensor, h: Tensor, rope: tuple[Tensor, Tensor],
                context: AttentionContext) -> Tensor:
        policy = context.policy
        x = self.eh_proj(torch.cat([self.enorm(embedded, policy), self.hnorm(h, policy)], dim=-1), policy)
        return super().forward(x, rope, context)


class RingLinearModel(nn.Module):
    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.config = config
        L = config.num_hidden_layers
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        # MTP layers follow the main ones in `layers`, as in the checkpoints (model.layers.{L+i}).
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(L)]
            + [MTPLayer(config, L + i) for i in range(config.num_nextn_predict_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.layers[: self.config.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.layers[self.config.num_hidden_layers:])


@dataclass
class CausalLMOutput:
    logits: Tensor | None  # [B, T, V] fp32 (the last `logits_to_keep` positions if that was set)
    loss: Tensor | None = None  # lm_loss + mtp_loss_scaling_factor * mtp_loss: what training minimises
    lm_loss: Tensor | None = None  # mean next-token cross-entropy (nats)
    mtp_loss: Tensor | None = None  # mean over MTP depths of their cross-entropy
    hidden_states: Tensor | None = None  # final hidden states after `model.norm`


class RingLinearForCausalLM(nn.Module):
    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.config = config
        self.model = RingLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head if the config says so (again after to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Experts):
                for param in module.parameters():
                    nn.init.normal_(param, std=std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.expert_bias.zero_()
                module.expert_load.zero_()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, config: RingLinearConfig | None = None
                        ) -> RingLinearForCausalLM:
        """The model of `config` (default: `directory/config.json`) with the checkpoint's weights, in
        eval mode. `dtype` defaults to the config's `torch_dtype`; the routers' `expert_bias` stays fp32. A
        block-FP8 checkpoint (`quantization_config`, `fp8.py`) keeps its e4m3 weights and scales."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {directory}")
        config = config or RingLinearConfig.from_pretrained(directory)
        with torch.device("meta"):  # no initialisation: every tensor is read from the checkpoint
            model = cls(config)
        model = model.to_empty(device=device).to(dtype or DTYPES.get(config.torch_dtype, torch.float32))
        model.tie_weights()
        if is_fp8_checkpoint(config):
            quantize_weights(model)  # the e4m3 layout, filled by load_weights
        load_weights(model, directory)
        return model.eval()

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 5 * 2**30,
                        tokenizer: Tokenizer | None = None) -> None:
        """Write config.json, the weights (sharded above `max_shard_bytes`) and the tokenizer if given."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = self.model.word_embeddings.weight.dtype  # not the e4m3 of FP8 weights
        self.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).save(directory)
        save_tensors(checkpoint_tensors(self), directory, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(str(directory / "tokenizer.json"))

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, context: AttentionContext | None = None,
                logits_to_keep: int = 0, logits_indices: Tensor | None = None,
                return_logits: bool = True) -> CausalLMOutput:
        """input_ids [B, T]. `labels` [B, T] are the input ids themselves (shifted here; -100 is
        ignored). `context` decides how attention runs and with which kernels: by default whole
        sequences (`SequenceContext()`), `SequenceContext(cu_seqlens)` for documents packed along T
        (B = 1; kept apart, no token predicted across a boundary), a cache for inference. Logits are
        computed for every position, the last `logits_to_keep`, or the positions `logits_indices`
        along T (e.g. the last token of each sequence packed in one step), or not at all with
        `return_logits=False` (training: the losses come from the hidden states, one chunk of fp32
        logits at a time)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        if logits_to_keep > 0 and logits_indices is not None:
            raise ValueError("pass logits_to_keep or logits_indices, not both")
        context = context or SequenceContext()
        with numerics(context.policy):  # the generic ops' batch-invariant forms, if the policy asks
            return self._forward(input_ids, labels, context, logits_to_keep, logits_indices, return_logits)

    def _forward(self, input_ids: Tensor, labels: Tensor | None, context: AttentionContext, logits_to_keep: int,
                 logits_indices: Tensor | None, return_logits: bool) -> CausalLMOutput:
        policy = context.policy
        B, T = input_ids.shape
        embeds = self.model.word_embeddings(input_ids)
        rope = self.model.rotary(context.positions(B, T, input_ids.device))
        h = embeds
        for layer in self.model.decoder_layers:
            h = layer(h, rope, context)
        h = self.model.norm(h, policy)
        context.advance(T)
        if logits_indices is not None:
            kept = h[:, logits_indices]
        else:
            kept = h if logits_to_keep <= 0 else h[:, -logits_to_keep:]
        logits = self.lm_head(kept).float() if return_logits else None
        if labels is None:
            return CausalLMOutput(logits=logits, hidden_states=h)

        documents = (context.document_ids(T, input_ids.device) if isinstance(context, SequenceContext)
                     else torch.zeros(T, dtype=torch.long, device=input_ids.device))
        lm_loss = _shifted_cross_entropy(h, self.lm_head.weight, labels, documents, shift=1)
        mtp_losses, h_prev, ids = [], h, input_ids
        for depth, layer in enumerate(self.model.mtp_layers, start=1):
            ids = torch.roll(ids, shifts=-1, dims=1)  # token t + depth at position t
            h_prev = layer(self.model.word_embeddings(ids), h_prev, rope, context)
            mtp_hidden = layer.final_layernorm(h_prev, policy)
            mtp_losses.append(_shifted_cross_entropy(mtp_hidden, self.lm_head.weight, labels, documents,
                                                     shift=depth + 1))
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else None
        loss = lm_loss if mtp_loss is None else lm_loss + self.config.mtp_loss_scaling_factor * mtp_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, hidden_states=h)


def _shifted_cross_entropy(hidden: Tensor, head: Tensor, labels: Tensor, documents: Tensor, shift: int) -> Tensor:
    """Mean cross-entropy of predicting labels[t + shift] from hidden[t] through the LM head, within a
    document only."""
    T = labels.shape[1]
    targets = torch.full_like(labels, IGNORE_INDEX)
    same_document = documents[shift:] == documents[:-shift] if shift < T else documents[:0].bool()
    targets[:, : T - shift] = labels[:, shift:].masked_fill(~same_document, IGNORE_INDEX)
    count = (targets != IGNORE_INDEX).sum()
    return linear_cross_entropy(hidden.flatten(0, 1), head, targets.flatten()) / count
