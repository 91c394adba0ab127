"""Verifiable tasks: problems drawn on the fly, a part of them held out for evaluation, and the
reward of a completion.

A reward is a plain callable `reward(problem, completion) -> float`. `ArithmeticTask` scores the
exact answer in-process; a `PromptsTask` reads problems from a JSON-lines file and scores them with
a user's reward, which runs in a subprocess (`rewards.SubprocessReward`).
"""

from __future__ import annotations

import json
import operator
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # what the reward checks the completion against (the result, or tests to run)


Reward = Callable[[Problem, str], float]


def _held_out(key: str, fraction: float) -> bool:
    """A fixed, seed-independent share of all problems (by a hash of their key) is for evaluation."""
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


class ArithmeticTask:
    """`a+b=` → `c` for operands of `digits` digits (zero-padded) and the operators in `operators`
    (+, -, *); reward 1 for the exact result, else 0."""

    alphabet = "0123456789+-*="
    functions = {"+": operator.add, "-": operator.sub, "*": operator.mul}

    def __init__(self, digits: int = 2, operators: str = "+", held_out: float = 0.1):
        if digits < 1 or not operators or set(operators) - set("+-*"):
            raise ValueError(f"arithmetic needs digits >= 1 and operators among '+-*', got {digits}, {operators!r}")
        self.digits, self.operators, self.fraction = digits, operators, held_out

    def sample(self, rng: random.Random, held_out: bool = False) -> Problem:
        while True:
            a, b, op = rng.randrange(10 ** self.digits), rng.randrange(10 ** self.digits), rng.choice(self.operators)
            prompt = f"{a:0{self.digits}d}{op}{b:0{self.digits}d}="  # fixed width: digits line up
            if _held_out(prompt, self.fraction) == held_out:
                return Problem(prompt, str(self.functions[op](a, b)))

    @staticmethod
    def reward(problem: Problem, completion: str) -> float:
        return float(completion.strip() == problem.answer)

    def tokenizer(self) -> Tokenizer:
        """One token per character, and EOS = 0."""
        tokenizer = Tokenizer(models.WordLevel({EOS: 0, **{c: i + 1 for i, c in enumerate(self.alphabet)}},
                                               unk_token=EOS))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
        tokenizer.decoder = decoders.Fuse()
        tokenizer.add_special_tokens([EOS])
        return tokenizer


class PromptsTask:
    """Problems from a JSON-lines file of {"prompt": ..., "answer": ...}; `held_out` of them (by a
    hash of the prompt) are for evaluation. `reward` scores them."""

    def __init__(self, path: str | Path, reward: Reward, held_out: float = 0.1):
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        try:
            problems = [Problem(str(row["prompt"]), str(row["answer"])) for row in map(json.loads, lines)]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: every line must be a JSON object with 'prompt' and 'answer' ({e})") from None
        self.splits = {split: [p for p in problems if _held_out(p.prompt, held_out) == split] for split in (False, True)}
        if not all(self.splits.values()):
            raise ValueError(f"{path}: {len(problems)} problems leave a split empty; give more")
        self.reward = reward

    def sample(self, rng: random.Random, held_out: bool = False) -> Problem:
        return rng.choice(self.splits[held_out])
