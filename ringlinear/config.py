"""Model configuration with the field names of Hugging Face's `BailingMoeLinearV2Config`.

`config.json` files of the published Ring-linear checkpoints load unchanged; fields we do not use
(`auto_map`, quantization settings, ...) are kept in `extra` and written back on save.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORE_FUNCTIONS = ("sigmoid", "softmax")
ACTIVATIONS = ("silu", "powlu")  # the gate of every MLP and expert: SwiGLU, or PowLU (ops/fused.py)
ROPE_TYPES = ("default", "yarn")
# The two generations, told apart by the published architecture name: Ring-linear-2.0 (Lightning + GQA)
# and Ring-2.5 / Ling-2.6 (Lightning + MLA). Which full-attention module a layer gets follows from
# `kv_lora_rank` (set: MLA); the architecture name must agree with it.
ARCHITECTURES = {"BailingMoeLinearV2ForCausalLM": "gqa", "BailingMoeV2_5ForCausalLM": "mla"}

# Fields a config.json must give: they fix the weights' shapes, and the defaults (Ring-mini's) would
# quietly describe another model. Ring-linear files give all of them, Ling 2.0 files all but
# layer_group_size (they are all softmax: `ringlinear convert` supplies 1).
REQUIRED_IN_FILES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "num_experts", "num_shared_experts", "moe_intermediate_size",
                     "first_k_dense_replace", "layer_group_size")
# An MLA file must give these too: they fix the MLA layers' shapes (q_lora_rank may be absent: None).
REQUIRED_IN_MLA_FILES = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# What a file means without these, as in the Hugging Face configs: derived from the fields above.
FILE_DEFAULTS = {"head_dim": None, "moe_shared_expert_intermediate_size": None}


@dataclass
class RingLinearConfig:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120  # dense SwiGLU of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4  # softmax (GQA) layers only; linear layers are MHA
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    use_rmsnorm: bool = True
    use_bias: bool = False
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    # Mixture of experts
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = 512
    first_k_dense_replace: int = 1
    n_group: int = 8
    topk_group: int = 4
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    router_dtype: str = "fp32"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # Hybrid layout and linear attention
    layer_group_size: int = 5
    group_norm_size: int = 4  # number of groups of the output RMSNorm, not their width
    linear_silu: bool = False
    # Ours: 0 = decay scaled by layer as vLLM/SGLang/Megatron do (vLLM's BailingMoeV2_5 too), 1 = as
    # the HF remote code does (Ring-linear-2.0's and Ring-V2.5's modeling files alike).
    decay_layer_offset: int = 0
    # Multi-head latent attention (Ring-2.5 / Ling-2.6): set kv_lora_rank for MLA full-attention layers
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None  # None: one q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = True  # MLA rope dims rotate in adjacent pairs (GPT-J), else in halves (NeoX)
    # Multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    # Tokens and bookkeeping
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156892
    pad_token_id: int | None = 156892
    initializer_range: float = 0.006
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    use_cache: bool = True
    architectures: list[str] = field(default_factory=lambda: ["BailingMoeLinearV2ForCausalLM"])
    model_type: str = "bailing_moe_linear"
    transformers_version: str = "4.56.1"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    # -- derived quantities -------------------------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_type(self) -> str:
        """The full-attention layers' kind: "gqa" (Ring-linear-2.0) or "mla" (Ring-2.5 / Ling-2.6)."""
        return "gqa" if self.kv_lora_rank is None else "mla"

    @property
    def qk_head_dim(self) -> int:
        """Width of a query/key head in the full-attention layers."""
        return self.head_dim if self.kv_lora_rank is None else self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's scale of cos and sin (1 without scaling), as transformers' `_compute_yarn_parameters`."""
        s = self.rope_scaling
        if s is None or _rope_type(s) != "yarn":
            return 1.0
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        if s.get("mscale") and s.get("mscale_all_dim"):
            return yarn_mscale(s["factor"], s["mscale"]) / yarn_mscale(s["factor"], s["mscale_all_dim"])
        return yarn_mscale(s["factor"])

    @property
    def softmax_scale(self) -> float:
        """Scale of the full-attention scores: qk_head_dim^-½, times YaRN's mscale² for MLA with
        `mscale_all_dim` (as the Ring-V2.5 modeling file)."""
        scale = self.qk_head_dim ** -0.5
        s = self.rope_scaling
        if self.attention_type == "mla" and s is not None and s.get("mscale_all_dim"):
            scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
        return scale

    @property
    def shared_expert_intermediate_size(self) -> int:
        width = self.moe_shared_expert_intermediate_size or self.moe_intermediate_size
        return width * self.num_shared_experts

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def is_softmax_layer(self, layer_idx: int) -> bool:
        """Layer-group rule of the HF code: the last layer of each group, and every layer of the tail."""
        g, n = self.layer_group_size, self.num_hidden_layers
        return (layer_idx + 1) % g == 0 or layer_idx >= (n // g) * g

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def layer_types(self) -> list[str]:
        return ["softmax" if self.is_softmax_layer(i) else "linear" for i in range(self.num_hidden_layers)]

    # -- validation -----------------------------------------------------------------------------

    def _check_types(self) -> None:
        """Each field against its annotation, so that a wrong-typed config.json value or --override is
        named here rather than failing as a TypeError inside the model."""
        for name, annotation in _field_types().items():
            value = getattr(self, name)
            if not _has_type(value, annotation):
                raise ValueError(f"invalid config: {name}={value!r}: must be {_type_name(annotation)}")

    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"invalid config: {name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "layer_group_size", "group_norm_size",
                     "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if (self.num_attention_heads * self.head_dim) % self.group_norm_size:
            fail("group_norm_size", f"must divide num_attention_heads*head_dim="
                 f"{self.num_attention_heads * self.head_dim}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim % 2:
            fail("partial_rotary_factor", f"gives an odd rotary dim {self.rotary_dim}")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"must be one of {ACTIVATIONS}")
        if self.score_function not in SCORE_FUNCTIONS:
            fail("score_function", f"must be one of {SCORE_FUNCTIONS}")
        if self.num_experts < 1:
            fail("num_experts", "must be at least 1")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            fail("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            fail("n_group", f"must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            fail("topk_group", f"must be in [1, n_group={self.n_group}]")
        experts_per_group = self.num_experts // self.n_group
        if self.n_group > 1 and experts_per_group < 2:
            fail("n_group", "group-limited routing scores a group by its top-2 experts: "
                 "each group needs at least 2 experts")
        if self.n_group > 1 and self.topk_group * experts_per_group < self.num_experts_per_tok:
            fail("topk_group", f"the {self.topk_group} kept groups hold fewer experts than "
                 f"num_experts_per_tok={self.num_experts_per_tok}")
        if self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", "must be positive")
        if self.num_shared_experts < 0:
            fail("num_shared_experts", "must be >= 0")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.decay_layer_offset not in (0, 1):
            fail("decay_layer_offset", "must be 0 (vLLM/SGLang form) or 1 (HF remote-code form)")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be >= 0")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be positive")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        self._validate_mla()

    def _validate_rope_scaling(self) -> None:
        s = self.rope_scaling
        if _rope_type(s) not in ROPE_TYPES:
            raise ValueError(f"invalid config: rope_scaling={s!r}: rope_type must be one of {ROPE_TYPES}")
        if _rope_type(s) == "yarn":
            factor = s.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
                raise ValueError(f"invalid config: rope_scaling={s!r}: YaRN needs a number factor >= 1")

    def _validate_mla(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"invalid config: {name}={getattr(self, name)!r}: {why}")

        kind = ARCHITECTURES.get(self.architectures[0] if self.architectures else "")
        if kind is not None and kind != self.attention_type:
            fail("kv_lora_rank", f"{self.architectures[0]} has {kind.upper()} full attention: kv_lora_rank "
                 f"must be {'set' if kind == 'mla' else 'null'}")
        if self.attention_type == "gqa":
            return
        for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer in an MLA config (kv_lora_rank set)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even")
        if self.qk_rope_head_dim != self.rotary_dim:
            # the published code builds the MLA and the Lightning RoPE tables from one config
            fail("qk_rope_head_dim", f"must equal head_dim * partial_rotary_factor = {self.rotary_dim}")

    # -- (de)serialisation ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RingLinearConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **values}

    @classmethod
    def from_json_file(cls, path: str | Path, defaults: dict[str, Any] | None = None) -> RingLinearConfig:
        """The config of a config.json, which must give `REQUIRED_IN_FILES` unless `defaults` does; an
        error names the file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config file at {path}")
        values = read_json(path)
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object")
        values = {**FILE_DEFAULTS, **(defaults or {}), **values}
        required = REQUIRED_IN_FILES
        if ARCHITECTURES.get((values.get("architectures") or [""])[0]) == "mla":
            required += REQUIRED_IN_MLA_FILES
        missing = [name for name in required if name not in values]
        if missing:
            ling = " (an all-softmax Ling 2.0 checkpoint has none: make it hybrid with `ringlinear convert`)" \
                if "layer_group_size" in missing else ""
            raise ValueError(f"{path} lacks {', '.join(missing)}: a config.json must give the fields that fix "
                             f"the weights' shapes{ling}")
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RingLinearConfig:
        return cls.from_json_file(Path(directory, "config.json"))

    def replace(self, **changes: Any) -> RingLinearConfig:
        return dataclasses.replace(self, **changes)

    # -- presets --------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RingLinearConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def read_json(path: str | Path) -> Any:
    """The value of a JSON file; ValueError naming the file when it holds no JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RingLinearConfig)


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether a JSON-like value fits a field's annotation: ints are not bools, floats may be ints."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if annotation is Any:
        return True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def _type_name(annotation: Any) -> str:
    """'an integer', 'an integer, a list of integers or null', ... (JSON's words: a config is a file)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if origin is list:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
            type(None): "null"}[origin or annotation]


PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a laptop CPU in minutes; keeps every architectural feature (dense first layer,
    # grouped sigmoid routing, shared expert, GQA, group norm of several heads).
    "tiny": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rope_theta=10000.0, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=128, n_group=4, topk_group=2, layer_group_size=3,
        group_norm_size=2, eos_token_id=0, pad_token_id=0, bos_token_id=None, torch_dtype="float32",
        initializer_range=0.02,
    ),
    # The tiny model in the Ring-2.5 / Ling-2.6 form: MLA full attention (a low-rank query, value
    # heads narrower than the query/key heads) and one MTP layer on MLA.
    "tiny-mla": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        rope_theta=10000.0, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=128, n_group=4, topk_group=2, layer_group_size=3,
        group_norm_size=2, eos_token_id=0, pad_token_id=0, bos_token_id=None, torch_dtype="float32",
        initializer_range=0.02, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=32, qk_nope_head_dim=32,
        v_head_dim=48, num_nextn_predict_layers=1, architectures=["BailingMoeV2_5ForCausalLM"],
        model_type="bailing_hybrid",
    ),
    # Exactly Ring-mini-linear-2.0 (16.4B total, 1.4B active).
    "mini": dict(),
    # Ring-flash-linear-2.0 (104B total, 6.1B active).
    "flash": dict(
        hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, moe_intermediate_size=1024, moe_shared_expert_intermediate_size=1024,
        layer_group_size=8, num_nextn_predict_layers=1,
    ),
    # Ring-2.5-1T / Ling-2.5-1T: the defaults of transformers' BailingMoeV2_5Config (80 layers, 10 of
    # them MLA); rope_theta and mtp_loss_scaling_factor as the Ring-V2.5 configuration file.
    "ring-2.5-1t": dict(
        hidden_size=8192, intermediate_size=18432, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=64, head_dim=128, rope_theta=600000.0, moe_intermediate_size=2048,
        moe_shared_expert_intermediate_size=2048, first_k_dense_replace=4, layer_group_size=8,
        group_norm_size=8, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, initializer_range=0.02, mtp_loss_scaling_factor=0.0,
        architectures=["BailingMoeV2_5ForCausalLM"], model_type="bailing_hybrid",
    ),
    # Ling-2.6-flash (inclusionAI/Ling-2.6-flash): the Ling-flash-2.0 backbone (our "flash" shapes)
    # retrofitted to Lightning + MLA 7:1. Its model card: 32 layers, ~104B total and ~7.4B active
    # (without the MTP layer; Hugging Face's 107B counts it). The checkpoint's layout as the OsaurusAI
    # Ling-2.6-flash-JANGTQ card reads it: layer 0 dense (9216), MLA in layers 7, 15, 23 and 31, 256 + 1
    # experts top-8, one MTP layer (MLA), q_lora_rank 1536, 131K positions. kv_lora_rank and the head
    # dims (512; 64 rope = 128 × 0.5, 128 nope, 128 value) are the Ring-V2.5 configuration file's
    # defaults: the 104B / 7.4B do not tell them from near values (they weigh ~1M parameters each).
    "ling-2.6-flash": dict(
        hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, moe_intermediate_size=1024, moe_shared_expert_intermediate_size=1024,
        layer_group_size=8, num_nextn_predict_layers=1, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, architectures=["BailingMoeV2_5ForCausalLM"], model_type="bailing_hybrid",
    ),
}


def _rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature `0.1 · mscale · ln(factor) + 1` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes, the power law `2^(-8(h+1)/H)` (non-powers of two interleave the next one)."""
    if math.log2(num_heads).is_integer():
        start = 2 ** (-(2 ** -(math.log2(num_heads) - 3)))
        return [start ** (i + 1) for i in range(num_heads)]
    lower = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def lightning_log_decay(config: RingLinearConfig, layer_idx: int) -> list[float]:
    """Per-head log λ of a linear layer: `-s_h (1 - (l - offset)/(L - 1) + 1e-5)`."""
    layers = config.num_hidden_layers
    depth = 1.0 if layers <= 1 else 1 - (layer_idx - config.decay_layer_offset) / (layers - 1)
    return [-s * (depth + 1e-5) for s in alibi_slopes(config.num_attention_heads)]
