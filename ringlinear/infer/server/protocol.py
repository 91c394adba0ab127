"""The OpenAI request bodies the server accepts, checked strictly (a wrong type is an error, not a
conversion), and their translation to `SamplingParams`. Unknown fields are ignored, as OpenAI's
own server does; known ones this server cannot honour are refused by name."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..params import InvalidRequest, SamplingParams


def _unicode(text: str) -> str:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can take."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationRequest(_Body):
    model: Text
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Text | None = None
    # Extensions under vLLM's names (the OpenAI client sends them through `extra_body`)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, seed=self.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            n=self.n)


class CompletionRequest(_GenerationRequest):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None  # vLLM's extension

    def prompt_logprobs_wanted(self) -> int | None:
        """The prompt log-probs to compute: vLLM's field, or echo's (of `logprobs`). An echo of 0
        tokens computes them too, since the engine then only scores the prompt."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            return self.logprobs or 0
        return None

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def check_supported(self) -> None:
        for name, ok in (("suffix", self.suffix is None), ("best_of", self.best_of in (None, 1))):
            if not ok:
                raise InvalidRequest(name, f"{name} is not supported")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def as_dict(self) -> dict:
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message = {"role": self.role, "content": content or ""}
        return message if self.name is None else {**message, "name": self.name}


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
