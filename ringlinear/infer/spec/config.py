"""`SpeculativeConfig`: vLLM's `speculative_config` dict, checked field by field against the model."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Literal

from ...config import RingLinearConfig
from ...ops.tree import MAX_TREE_TOKENS
from .tree import Path, chain_paths, parse_paths

METHODS = ("mtp", "ngram")
# a verify step is one tree per sequence: the last token and its drafts
MAX_SPECULATIVE_TOKENS = MAX_TREE_TOKENS - 1


@dataclass(frozen=True)
class SpeculativeConfig:
    method: Literal["mtp", "ngram"]
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None  # ngram: the shortest suffix looked up (default: prompt_lookup_max)
    prompt_lookup_max: int | None = None  # ngram: the longest (default: prompt_lookup_min, else 5 as vLLM)
    # a draft tree instead of a chain, as vLLM's field: paths of child ranks, "[(0,), (1,), (0, 0)]"
    # (`spec.tree`); num_speculative_tokens is then its number of nodes
    speculative_token_tree: tuple[Path, ...] | list | str | None = None

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"speculative_config.{name} {rule}, got {getattr(self, name)!r}")

        def integer(name: str) -> bool:
            return isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)

        if self.method not in METHODS:
            fail("method", f"must be one of {', '.join(map(repr, METHODS))}")
        if not integer("num_speculative_tokens") or not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            fail("num_speculative_tokens", f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}]")
        if self.speculative_token_tree is not None:
            paths = parse_paths(self.speculative_token_tree, MAX_SPECULATIVE_TOKENS)
            object.__setattr__(self, "speculative_token_tree", paths)
            if len(paths) != self.num_speculative_tokens:
                fail("num_speculative_tokens", f"must be the number of nodes of speculative_token_tree ({len(paths)})")
        lookups = ("prompt_lookup_min", "prompt_lookup_max")
        if self.method != "ngram":
            for name in lookups:
                if getattr(self, name) is not None:
                    fail(name, "is a setting of method 'ngram' only")
            return
        low = self.prompt_lookup_min if self.prompt_lookup_min is not None else self.prompt_lookup_max
        high = self.prompt_lookup_max if self.prompt_lookup_max is not None else low
        object.__setattr__(self, "prompt_lookup_min", 5 if low is None else low)
        object.__setattr__(self, "prompt_lookup_max", 5 if high is None else high)
        for name in lookups:
            if not integer(name) or getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            fail("prompt_lookup_min", f"must be <= prompt_lookup_max={self.prompt_lookup_max}")

    @property
    def paths(self) -> tuple[Path, ...]:
        """The shape every draft tree fills: the given tree, else a chain of num_speculative_tokens."""
        return self.speculative_token_tree or chain_paths(self.num_speculative_tokens)

    @classmethod
    def parse(cls, value: dict[str, Any] | str) -> SpeculativeConfig:
        """From vLLM's dict, or its JSON text (`--speculative-config '{"method": "mtp", ...}'`)."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise ValueError(f"speculative_config.{name} is required")
        return cls(**value)

    def check_model(self, config: RingLinearConfig) -> None:
        """The model can draft this way: MTP needs the checkpoint's MTP layers."""
        if self.method == "mtp" and config.num_nextn_predict_layers < 1:
            raise ValueError("speculative_config.method 'mtp' needs MTP layers, but the checkpoint has "
                             "num_nextn_predict_layers=0 (train with --override num_nextn_predict_layers=1, "
                             "or use method 'ngram')")
