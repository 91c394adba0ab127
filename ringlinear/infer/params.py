"""Per-request sampling parameters and the error every invalid request raises."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_N = 128
INT64_END = 2**63  # integers the sampler puts in int64 tensors (top_k, seeds, token ids) stay below it


class InvalidRequest(ValueError):
    """A request the engine cannot serve; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # not included in the output
    ignore_eos: bool = False
    seed: int | None = None  # a seeded request draws the same tokens whatever shares its batch
    logprobs: int | None = None  # None: none; k: the chosen token's log-prob and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    n: int = 1  # completions of the prompt, forked from one prefill

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise InvalidRequest(name, f"{name} {rule}, got {getattr(self, name)!r}")

        def number(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

        def integer(name: str) -> bool:
            return isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)

        check("max_tokens", integer("max_tokens") and self.max_tokens >= (0 if self.prompt_logprobs is not None else 1),
              "must be an integer >= 1 (0 only with prompt log-probs)")
        check("temperature", number("temperature") and 0 <= self.temperature <= 100, "must be in [0, 100]")
        check("top_p", number("top_p") and 0 < self.top_p <= 1, "must be in (0, 1]")
        check("top_k", integer("top_k") and 0 <= self.top_k < INT64_END, "must be an integer in [0, 2^63) (0 = off)")
        check("min_p", number("min_p") and 0 <= self.min_p <= 1, "must be in [0, 1]")
        check("repetition_penalty", number("repetition_penalty") and 0 < self.repetition_penalty <= 100,
              "must be in (0, 100]")
        check("presence_penalty", number("presence_penalty") and -2 <= self.presence_penalty <= 2,
              "must be in [-2, 2]")
        check("frequency_penalty", number("frequency_penalty") and -2 <= self.frequency_penalty <= 2,
              "must be in [-2, 2]")
        check("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
              "must be a list of non-empty strings")
        check("stop_token_ids", isinstance(self.stop_token_ids, list)
              and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < INT64_END
                      for t in self.stop_token_ids), "must be a list of token ids")
        check("seed", self.seed is None or (integer("seed") and 0 <= self.seed < INT64_END), "must be in [0, 2^63)")
        for name in ("logprobs", "prompt_logprobs"):
            check(name, getattr(self, name) is None or (integer(name) and 0 <= getattr(self, name) <= MAX_LOGPROBS),
                  f"must be in [0, {MAX_LOGPROBS}]")
        check("n", integer("n") and 1 <= self.n <= MAX_N, f"must be an integer in [1, {MAX_N}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
