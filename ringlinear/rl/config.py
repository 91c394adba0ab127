"""Everything that defines an RL run; the CLI's `rl` flags are made from these fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import PRESETS
from ..train.config import setting
from .loss import CORRECTIONS, RATIOS

ALGORITHMS = ("grpo", "ppo")


# The tiny preset made smaller for a CPU: 4 layers (Lightning, softmax, Lightning, softmax), width 128,
# 8 experts, 1.7M parameters. At a fine-tuning rate of 1e-3 it learns 2-digit addition abruptly: greedy
# accuracy stays near 5% for 150 to 550 steps (depending on the seed), then rises to ~80% within ~100.
SMALL = dict(hidden_size=128, num_hidden_layers=4, layer_group_size=2, head_dim=32, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=384, moe_intermediate_size=128,
             moe_shared_expert_intermediate_size=128, num_experts=8, n_group=2, topk_group=1,
             max_position_embeddings=64)


@dataclass
class RLConfig:
    """Everything that defines an RL run; saved as `rl_config.json` in the run folder."""

    out_dir: str = setting("runs/rl", "run folder: rl_config.json, metrics.jsonl, reward.png, checkpoint/")
    model: str = setting("", "checkpoint folder to start from (config.json, safetensors, tokenizer.json); "
                         "none: a new --preset model taught the task's format by --sft-steps of fine-tuning")
    preset: str = setting("tiny", "preset of a new model")
    model_overrides: dict[str, Any] = setting(SMALL, "model config fields of a new model changed from the preset")
    digits: int = setting(2, "arithmetic task: operands of up to this many digits")
    operators: str = setting("+", "arithmetic task: the operators drawn, among +-*")
    prompts: str = setting("", "JSON-lines file of {\"prompt\", \"answer\"} to train on instead of the "
                           "arithmetic task (needs --model and --reward)")
    reward: str = setting("", "FILE.py:FUNCTION(problem, completion) -> float scoring --prompts, run in a "
                          "subprocess per completion")
    reward_timeout: float = setting(10.0, "seconds a --reward process may run before it scores 0")
    sft_steps: int = setting(1000, "most supervised fine-tuning steps of a new model on prompt + answer")
    sft_target_accuracy: float = setting(0.3, "stop fine-tuning once greedy accuracy on training problems "
                                         "reaches this, leaving the rest to RL (1: run all --sft-steps)")
    sft_check_interval: int = setting(10, "fine-tuning steps between checks of that accuracy")
    sft_batch_size: int = setting(64, "problems per fine-tuning step")
    sft_lr: float = setting(1e-3, "fine-tuning learning rate, constant (at 3e-3 the default model does not learn)")
    algorithm: str = setting("grpo", "grpo (group-normalised advantages) or ppo (PPO-clip with a value head)")
    steps: int = setting(60, "RL steps (rollouts, then updates)")
    prompts_per_step: int = setting(32, "prompts per round of rollouts")
    group_size: int = setting(8, "completions per prompt")
    tokens_per_step: int = setting(0, "response tokens trained on per step: rounds of rollouts are drawn until "
                                   "they are reached, the rest is cut (0: one round)")
    max_new_tokens: int = setting(8, "most tokens per completion")
    max_prompt_tokens: int = setting(64, "longest prompt (sizes the engine's cache)")
    ratio: str = setting("rollout", "importance ratio against the rollout engine's log-probs (Eq. 5) or the "
                         "trainer's recomputed ones (Eq. 6): rollout or recompute")
    correction: str = setting("none", "with --ratio recompute: none, tis (truncated importance sampling) or "
                              "icepop (mask tokens whose train/infer probability ratio is outside the band)")
    clip: float = setting(0.2, "PPO clip range epsilon")
    tis_cap: float = setting(2.0, "tis: cap C of the train/infer probability ratio")
    icepop_low: float = setting(0.5, "icepop: lower edge of the kept band")
    icepop_high: float = setting(5.0, "icepop: upper edge of the kept band")
    kl_coef: float = setting(0.0, "weight of the KL penalty to the starting model (0: none)")
    value_coef: float = setting(0.5, "ppo: weight of the value loss")
    epochs: int = setting(1, "passes over a step's rollouts")
    minibatches: int = setting(1, "updates per pass")
    lr: float = setting(1e-4, "RL learning rate (AdamW)")
    warmup_steps: int = setting(10, "steps of linear learning-rate warmup: a fresh AdamW's first updates move "
                                "every weight by the full rate, which a freshly fine-tuned model does not survive")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)")
    sft_bias_update_rate: float = setting(1e-3, "step of the aux-loss-free expert-bias update after each "
                                          "fine-tuning step, as in pre-training")
    bias_update_rate: float = setting(0.0, "step of the expert-bias update after each RL optimizer step; 0 keeps the "
                                      "routing bias fixed, so the rollouts and every update of a step choose experts "
                                      "with the same bias")
    batch_invariant: bool = setting(True, "trainer and engine in batch-invariant mode (bit-identical log-probs)")
    eval_interval: int = setting(10, "greedy accuracy on held-out problems every this many steps (and at the "
                                 "first and last)")
    eval_problems: int = setting(200, "held-out problems per evaluation")
    seed: int = setting(0, "seed of the new model, the problems and the sampling")
    device: str = setting("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")

    def __post_init__(self) -> None:
        rules = [(name, getattr(self, name) > 0, "must be positive") for name in (
            "steps", "prompts_per_step", "group_size", "max_new_tokens", "max_prompt_tokens", "clip", "epochs",
            "minibatches", "lr", "eval_interval", "eval_problems", "sft_batch_size", "sft_lr", "reward_timeout",
            "sft_check_interval")]
        rules += [(name, getattr(self, name) >= 0, "must be >= 0")
                  for name in ("sft_steps", "warmup_steps", "tokens_per_step", "kl_coef", "value_coef", "grad_clip",
                               "weight_decay", "sft_bias_update_rate", "bias_update_rate")]
        rules += [
            ("algorithm", self.algorithm in ALGORITHMS, f"must be one of {ALGORITHMS}"),
            ("ratio", self.ratio in RATIOS, f"must be one of {RATIOS}"),
            ("correction", self.correction in CORRECTIONS, f"must be one of {CORRECTIONS}"),
            ("correction", self.correction == "none" or self.ratio == "recompute",
             "weights Eq. 6's ratio: it needs --ratio recompute"),
            ("group_size", self.algorithm != "grpo" or self.group_size > 1, "must be at least 2 for grpo"),
            ("icepop_high", self.icepop_low < self.icepop_high, "must exceed icepop_low"),
            ("sft_target_accuracy", 0 < self.sft_target_accuracy <= 1, "must be in (0, 1]"),
            ("preset", self.preset in PRESETS, f"must be one of {sorted(PRESETS)}"),
            ("prompts", not self.prompts or (self.model and self.reward), "needs --model and --reward"),
            ("reward", not self.reward or self.prompts, "scores --prompts: give them too"),
        ]
        for name, ok, requirement in rules:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: {requirement}")
