"""Reinforcement learning on the inference engine's rollouts: GRPO or PPO-clip, one process.

A new model (no --model) is first taught the task's format by supervised fine-tuning on prompt +
answer, stopped once its greedy accuracy on training problems reaches `sft_target_accuracy`: the
demo starts RL from a model that is right some of the time, not from one that has already learnt
the task.

One step:
1. rollouts: prompts drawn from the task, `group_size` completions of each sampled by the engine
   (temperature 1), which records every token's log-probability, the stop token's included. Rounds
   of `prompts_per_step` prompts are drawn until the step holds `tokens_per_step` response tokens
   (C3PO's token budget); tokens past the budget are not trained on, so every step weighs the same;
2. rewards: the task's reward of each completion's text;
3. one trainer forward at the rollout weights: its log-probs (Eq. 6's behaviour policy, and the
   training–inference disparity logged every step), the entropy, PPO's values, and the reference
   model's log-probs when there is a KL term. With one minibatch this is the first update's own
   forward (its weights are still the rollout weights), so no extra forward is run;
4. advantages: group-normalised rewards (GRPO) or the reward minus the value (PPO, γ = λ = 1);
5. `epochs` passes of `minibatches` AdamW updates on the clipped surrogate (`loss.py`);
6. the new weights are copied into the engine's model.

With `batch_invariant` (the default) the trainer's forwards and the engine's steps run in
batch-invariant mode, so at the rollout weights the two give bit-identical log-probs and Eq. 5's
ratio starts at exactly 1.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from ..checkpoint import load_tokenizer
from ..config import RingLinearConfig
from ..infer import LLM, Engine, EngineConfig, SamplingParams
from ..infer.outputs import Completion
from ..model import RingLinearForCausalLM, SequenceContext
from ..ops.batch_invariant import numerics
from ..ops.policy import KernelPolicy
from ..ops.cross_entropy import IGNORE_INDEX
from ..sampling import token_logprobs
from ..train import build_optimizer, optimizer_step, resolve_device
from .config import RLConfig
from .loss import clipped_surrogate, group_advantages, kl_penalty, mismatch_weight
from .probe import PROB_GAP
from .rewards import SubprocessReward
from .tasks import EOS, ArithmeticTask, Problem, PromptsTask

@dataclass
class RLResult:
    model: RingLinearForCausalLM
    tokenizer: Tokenizer
    metrics: list[dict[str, float]]  # one per step (and its evaluation, where there was one)
    checkpoint_dir: Path
    sft: list[dict[str, float]] = field(default_factory=list)  # one per accuracy check of the fine-tuning


@dataclass
class Rollouts:
    """A step's rollouts as training tensors; position t of the [B, T - 1] tensors is the token at t + 1."""
    ids: Tensor  # [B, T] prompt + response, right-padded
    mask: Tensor  # [B, T - 1] a response token trained on
    logp_rollout: Tensor  # [B, T - 1] its log-prob under the engine
    rewards: Tensor  # [B]
    response_lengths: Tensor  # [B], the stop token included

    def select(self, rows: slice | Tensor) -> Rollouts:
        return Rollouts(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt or answer as a new document: after the end-of-text token, as in training."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def supervised_finetune(model: RingLinearForCausalLM, task: ArithmeticTask, tokenizer: Tokenizer,
                        config: RLConfig, accuracy: Callable[[], float] | None = None,
                        kernels: KernelPolicy = KernelPolicy()) -> list[dict[str, float]]:
    """Teach the format: cross-entropy on answer + EOS after the prompt, at a constant rate. Every
    `sft_check_interval` steps `accuracy()` is measured and the fine-tuning stops once it reaches
    `sft_target_accuracy`. Returns one record per check: step, mean loss since the last, accuracy."""
    rng = random.Random(config.seed + 2)  # not the rollouts' problems (seed), nor the evaluation's (seed + 1)
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, config.sft_lr, config.weight_decay, (config.beta1, config.beta2))
    eos, losses, log = tokenizer.token_to_id(EOS), [], []
    model.train()
    for step in range(1, config.sft_steps + 1):
        problems = [task.sample(rng) for _ in range(config.sft_batch_size)]
        prompts = [[eos] + encode(tokenizer, p.prompt) for p in problems]
        answers = [encode(tokenizer, p.answer) + [eos] for p in problems]
        ids, labels = _pad([p + a for p, a in zip(prompts, answers)], 0), _pad(
            [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)], IGNORE_INDEX)
        loss = model(ids.to(device), labels=labels.to(device), context=SequenceContext(policy=kernels),
                     return_logits=False).loss
        loss.backward()
        losses.append(loss.item())
        optimizer_step(model, optimizer, losses[-1], config.grad_clip, config.sft_bias_update_rate)
        if step % config.sft_check_interval and step < config.sft_steps:
            continue
        record = {"sft_step": step, "sft_loss": sum(losses) / len(losses)}
        losses = []
        if accuracy is not None:
            record["sft_accuracy"] = accuracy()
        log.append(record)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
        if record.get("sft_accuracy", 0.0) >= config.sft_target_accuracy:
            break
    return log


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def build_task(config: RLConfig) -> ArithmeticTask | PromptsTask:
    """The run's task: --prompts with its --reward, else arithmetic (a bad file or spec raises here)."""
    if config.prompts:
        return PromptsTask(config.prompts, SubprocessReward(config.reward, config.reward_timeout))
    return ArithmeticTask(config.digits, config.operators)


class RLTrainer:
    def __init__(self, config: RLConfig, task: ArithmeticTask | PromptsTask | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        # the kernels of the trainer's forwards; the engine resolves the same from its config
        self.kernels = KernelPolicy(invariant=config.batch_invariant).resolve(self.device)
        self.rng = random.Random(config.seed)
        torch.manual_seed(config.seed)
        self.task = task or build_task(config)
        self.policy, self.tokenizer = self._initial_policy()
        self.eos = self.tokenizer.token_to_id(EOS)
        engine = Engine(copy.deepcopy(self.policy).eval(), None, EngineConfig(
            max_num_seqs=config.prompts_per_step * config.group_size, max_num_batched_tokens=4096, page_size=16,
            max_model_len=config.max_prompt_tokens + config.max_new_tokens, batch_invariant=config.batch_invariant,
            seed=config.seed))
        self.llm = LLM(engine)
        eval_rng = random.Random(config.seed + 1)
        self.eval_set = [self.task.sample(eval_rng, held_out=True) for _ in range(config.eval_problems)]
        self.sft: list[dict[str, float]] = []
        if not config.model:  # a new model: teach it the format, measured on training problems
            check_rng = random.Random(config.seed + 3)
            check_set = [self.task.sample(check_rng) for _ in range(config.eval_problems)]

            def train_accuracy() -> float:
                self.sync()
                return self.accuracy(check_set)

            self.sft = supervised_finetune(self.policy, self.task, self.tokenizer, config, train_accuracy,
                                           replace(self.kernels, invariant=False))  # no log-probs to match
            self.sync()
        self.reference = copy.deepcopy(self.policy).eval() if config.kl_coef > 0 else None
        hidden = self.policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1).to(self.device) if config.algorithm == "ppo" else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.trained = nn.ModuleList([self.policy] + ([self.value_head] if self.value_head is not None else []))
        self.optimizer = build_optimizer(self.trained, config.lr, config.weight_decay, (config.beta1, config.beta2))

    def _initial_policy(self) -> tuple[RingLinearForCausalLM, Tokenizer]:
        c = self.config
        if c.model:
            model = RingLinearForCausalLM.from_pretrained(c.model, device=self.device)
            return model.train(), load_tokenizer(c.model)
        tokenizer = self.task.tokenizer()
        model_config = RingLinearConfig.preset(c.preset, **{
            "vocab_size": tokenizer.get_vocab_size(), "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "float32",
            **c.model_overrides})
        return RingLinearForCausalLM(model_config).to(self.device).train(), tokenizer

    def sync(self) -> None:
        """Copy the policy's weights (and the routers' expert bias) into the engine's model."""
        self.llm.engine.model.load_state_dict(self.policy.state_dict())

    # -- one step -------------------------------------------------------------------------------

    def rollouts(self) -> Rollouts:
        c = self.config
        problems: list[Problem] = []
        completions: list[Completion] = []
        while not problems or sum(_response_length(x) for x in completions) < c.tokens_per_step:
            drawn = [self.task.sample(self.rng) for _ in range(c.prompts_per_step)]
            # a group is one request: its completions are forked from one prefill of the prompt
            params = [SamplingParams(max_tokens=c.max_new_tokens, logprobs=0, seed=self.rng.randrange(2**62),
                                     n=c.group_size) for _ in drawn]
            completions += self.llm.generate([[self.eos] + encode(self.tokenizer, p.prompt) for p in drawn], params)
            problems += [p for p in drawn for _ in range(c.group_size)]
        texts = [self.tokenizer.decode(x.token_ids) for x in completions]
        with ThreadPoolExecutor() as pool:  # a subprocess reward waits outside the GIL
            rewards = list(pool.map(self.task.reward, problems, texts))
        responses = [x.token_ids + ([x.stop_logprob.token_id] if x.stop_logprob else []) for x in completions]
        logps = [[lp.logprob for lp in x.logprobs] + ([x.stop_logprob.logprob] if x.stop_logprob else [])
                 for x in completions]
        prompts = [x.prompt_token_ids for x in completions]
        ids = _pad([p + r for p, r in zip(prompts, responses)], 0)
        mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
        logp_rollout = torch.zeros(mask.shape, dtype=torch.float32)
        budget = c.tokens_per_step or math.inf
        for b, (p, lp) in enumerate(zip(prompts, logps)):
            kept = int(max(0, min(len(lp), budget)))
            budget -= kept
            mask[b, len(p) - 1:len(p) - 1 + kept] = True
            logp_rollout[b, len(p) - 1:len(p) - 1 + len(lp)] = torch.tensor(lp)
        return Rollouts(ids, mask, logp_rollout, torch.tensor(rewards), torch.tensor([len(r) for r in responses]))

    def _forward(self, model: RingLinearForCausalLM, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probs [B, T - 1] of each next token, the logits and the hidden states before them."""
        out = model(ids, context=SequenceContext(policy=self.kernels))
        logits = out.logits[:, :-1]
        with numerics(self.kernels):  # the engine's sampler takes its log-probs the same way
            logp = token_logprobs(logits.flatten(0, 1), ids[:, 1:].flatten(), 0)[0].view(ids.shape[0], -1)
        return logp, logits, out.hidden_states[:, :-1]

    def step(self, step: int) -> dict[str, float]:
        c = self.config
        lr = c.lr * min(1.0, (step + 1) / (c.warmup_steps + 1))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        batch = self.rollouts()
        t1 = time.perf_counter()
        metrics = {"reward": batch.rewards.mean().item(),
                   "response_length": batch.response_lengths.float().mean().item()}
        # GRPO normalises over whole groups, the rows past the token budget included; those rows train
        # on nothing, so they are dropped before any forward (and can leave no minibatch empty).
        group_adv = group_advantages(batch.rewards, c.group_size) if self.value_head is None else None
        kept = batch.mask.any(1)
        batch = batch.select(kept)
        ids, mask = batch.ids.to(self.device), batch.mask.to(self.device)
        logp_rollout = batch.logp_rollout.to(self.device)
        # With one minibatch the first update's forward runs at the rollout weights over the whole batch:
        # it is the behaviour forward too (kept with its graph for the update).
        first = self._forward(self.policy, ids) if c.minibatches == 1 else None
        with torch.no_grad():
            behaviour_forward = self._forward(self.policy, ids) if first is None else (t.detach() for t in first)
            logp_old, logits, hidden = behaviour_forward
            logp_all = logits.float().log_softmax(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)[mask].mean()
            logp_reference = None if self.reference is None else self._forward(self.reference, ids)[0]
            rewards = batch.rewards.to(self.device)
            if group_adv is not None:
                advantages = group_adv[kept].to(self.device)[:, None].expand_as(mask)
            else:
                advantages = rewards[:, None] - self.value_head(hidden)[..., 0]
                advantages = (advantages - advantages[mask].mean()) / (advantages[mask].std() + 1e-6)
        metrics.update(trained_tokens=int(mask.sum()), entropy=entropy.item(),
                       **_disparity(logp_old, logp_rollout, mask))
        behaviour = logp_rollout if c.ratio == "rollout" else logp_old
        weight = None if c.correction == "none" else mismatch_weight(logp_old, logp_rollout, c.correction, c.tis_cap,
                                                                    c.icepop_low, c.icepop_high)
        rows = ids.shape[0]
        bounds = [round(i * rows / c.minibatches) for i in range(c.minibatches + 1)]
        for _ in range(c.epochs):
            for start, end in zip(bounds, bounds[1:]):
                part = slice(start, end)
                if start == end:  # fewer rows than minibatches
                    continue
                last = part
                logp, _, hidden = first if first is not None else self._forward(self.policy, ids[part])
                first = None
                loss = clipped_surrogate(logp, behaviour[part], advantages[part], mask[part], c.clip,
                                         None if weight is None else weight[part])
                if self.reference is not None:
                    loss = loss + c.kl_coef * kl_penalty(logp, logp_reference[part], mask[part])
                if self.value_head is not None:
                    error = (self.value_head(hidden)[..., 0] - rewards[part, None]) ** 2
                    loss = loss + c.value_coef * 0.5 * (error * mask[part]).sum() / mask[part].sum()
                loss.backward()
                outcome = optimizer_step(self.trained, self.optimizer, loss.item(), c.grad_clip, c.bias_update_rate)
        self.sync()
        ratio = (logp.detach() - behaviour[last]).exp()[mask[last]]
        metrics.update(lr=lr, loss=loss.item(), grad_norm=outcome.grad_norm, skipped=not outcome.applied,
                       clip_fraction=((ratio - 1).abs() > c.clip).float().mean().item(), rollout_s=t1 - t0,
                       update_s=time.perf_counter() - t1)
        if self.reference is not None:
            metrics["kl"] = kl_penalty(logp_old, logp_reference, mask).item()
        return metrics

    def evaluate(self) -> float:
        """Greedy accuracy (mean reward) on the held-out problems."""
        return self.accuracy(self.eval_set)

    def accuracy(self, problems: list[Problem]) -> float:
        """Mean reward of the engine's greedy completions."""
        params = SamplingParams(max_tokens=self.config.max_new_tokens, temperature=0)
        completions = self.llm.generate([[self.eos] + encode(self.tokenizer, p.prompt) for p in problems], params)
        texts = [self.tokenizer.decode(x.token_ids) for x in completions]
        with ThreadPoolExecutor() as pool:
            return sum(pool.map(self.task.reward, problems, texts)) / len(problems)


def _response_length(completion: Completion) -> int:
    return len(completion.token_ids) + (completion.stop_logprob is not None)


def _disparity(logp_train: Tensor, logp_rollout: Tensor, mask: Tensor) -> dict[str, float]:
    """Training–inference disparity over the trained tokens, at the rollout weights."""
    gap = (logp_train - logp_rollout)[mask]
    prob_gap = (logp_train.exp() - logp_rollout.exp())[mask].abs()
    return {"max_abs_dlogp": gap.abs().max().item(), "mean_abs_dlogp": gap.abs().mean().item(),
            "identical_fraction": (gap == 0).float().mean().item(),
            "prob_gap_fraction": (prob_gap > PROB_GAP).float().mean().item()}


def train_rl(config: RLConfig) -> RLResult:
    start = time.perf_counter()
    out = Path(config.out_dir)
    task = build_task(config)  # a bad task, prompts file or reward stops the run before its folder is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    trainer = RLTrainer(config, task)
    if trainer.sft:
        (out / "sft_metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in trainer.sft))
    history: list[dict[str, float]] = []
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(config.steps + 1):
            metrics: dict[str, float] = {"step": step}
            if step % config.eval_interval == 0 or step == config.steps:
                metrics["eval_accuracy"] = trainer.evaluate()
            if step < config.steps:
                metrics.update(trainer.step(step))
            history.append(metrics)
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                           if k in ("step", "eval_accuracy", "reward", "response_length", "entropy", "max_abs_dlogp",
                                    "prob_gap_fraction", "clip_fraction")), flush=True)
    checkpoint = out / "checkpoint"
    trainer.policy.eval().save_pretrained(checkpoint, tokenizer=trainer.tokenizer)
    sft_steps = trainer.sft[-1]["sft_step"] if trainer.sft else 0
    plot_rewards(history, out / "reward.png", sft_steps=sft_steps)
    evaluated = [m["eval_accuracy"] for m in history if "eval_accuracy" in m]
    start_from = f"after {sft_steps} fine-tuning steps" if sft_steps else "at the start"
    print(f"held-out greedy accuracy: {evaluated[0]:.3f} {start_from}, {evaluated[-1]:.3f} after {config.steps} "
          f"{config.algorithm.upper()} steps; {time.perf_counter() - start:.0f} s in all")
    return RLResult(trainer.policy, trainer.tokenizer, history, checkpoint, trainer.sft)


def plot_rewards(history: list[dict[str, float]], path: Path, sft_steps: int = 0, smooth: int = 5) -> None:
    """Training reward per step (and its mean over `smooth` steps) and held-out greedy accuracy at
    the evaluations. A step's reward and evaluation are both of the weights before its update."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    trained = [m for m in history if "reward" in m]
    steps, rewards = [m["step"] for m in trained], [m["reward"] for m in trained]
    ax.plot(steps, rewards, color="tab:blue", alpha=0.35, label="training reward (sampled, T = 1)")
    if len(rewards) >= smooth:
        means = [sum(rewards[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(rewards))]
        ax.plot(steps[smooth - 1:], means, color="tab:blue", label=f"training reward, mean of {smooth} steps")
    evaluated = [m for m in history if "eval_accuracy" in m]
    ax.plot([m["step"] for m in evaluated], [m["eval_accuracy"] for m in evaluated], "o-", color="tab:orange",
            label="held-out accuracy (greedy)")
    start = f" after {sft_steps} fine-tuning steps" if sft_steps else ""
    ax.set(xlabel="RL step", ylabel="reward / accuracy", ylim=(0, 1), title=f"RL on the engine's rollouts{start}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
