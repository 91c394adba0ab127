"""Chat templates: the Jinja template of a checkpoint's `tokenizer_config.json`, rendered in
Jinja's sandbox (a template is code that came with the model)."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .params import InvalidRequest


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token_text(value) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"])
        environment.globals["raise_exception"] = _raise
        self.source, self.template = source, environment.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_directory(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of `directory/tokenizer_config.json`, or None when there is none."""
        path = Path(directory, "tokenizer_config.json")
        if not path.exists():
            return None
        config = json.loads(path.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise InvalidRequest("messages", f"the chat template rejected the messages: {e}") from None
