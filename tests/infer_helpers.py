"""A tiny checkpoint for the engine and server tests: a random `tiny`-preset model (or another preset) whose vocabulary
is a byte-level tokenizer's (id 0 = <|endoftext|> = EOS, then the 256 bytes), and a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ringlinear import RingLinearConfig, RingLinearForCausalLM

EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {EOS: 0, **{char: i + 1 for i, char in enumerate(sorted(alphabet))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def tiny_model(seed: int = 0, preset: str = "tiny", **overrides) -> RingLinearForCausalLM:
    torch.manual_seed(seed)
    config = RingLinearConfig.preset(preset, vocab_size=257, **overrides)
    return RingLinearForCausalLM(config).eval()


def tiny_checkpoint(directory: Path, chat_template: bool = True) -> Path:
    tiny_model().save_pretrained(directory, tokenizer=byte_tokenizer())
    if chat_template:
        (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE,
                                                                     "eos_token": EOS}))
    return directory
