"""RL: the Eq. 5 / Eq. 6 objectives and their corrections against hand computations, GRPO
advantages, user rewards in a subprocess with a time limit, the arithmetic task, a short run whose
reward rises, bit-identical trainer and engine log-probs in batch-invariant mode, a PPO step, and
`ringlinear rl` on a user's prompts and reward."""

import dataclasses
import json
import math
import os
import random
import time

import pytest
import torch
from infer_helpers import byte_tokenizer, tiny_model

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.cli import main
from ringlinear.rl.loss import clipped_surrogate, group_advantages, kl_penalty, mismatch_weight
from ringlinear.rl.rewards import SubprocessReward
from ringlinear.rl.tasks import ArithmeticTask, Problem, _held_out
from ringlinear.rl.trainer import RLConfig, RLTrainer, _pad, encode, supervised_finetune

# Three tokens; the third is masked out. Log-probs under the policy being trained, under the engine
# that sampled the tokens (rollout), and under the trainer at the rollout weights (recomputed).
LOGP = [-1.0, -0.5, -2.0]
ROLLOUT = [-1.2, -0.4, -2.0]
RECOMPUTED = [-1.1, -0.5, -1.0]
ADVANTAGES = [1.0, -1.0, 2.0]
MASK = [1.0, 1.0, 0.0]


def loss_and_grad(behaviour, weight=None):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    loss = clipped_surrogate(logp, torch.tensor(behaviour, dtype=torch.float64), torch.tensor(ADVANTAGES),
                             torch.tensor(MASK), clip=0.2, weight=weight)
    loss.backward()
    return loss.item(), logp.grad.tolist()


def test_eq5_uses_the_rollout_probabilities():
    # token 1: r = e^0.2 = 1.221 > 1.2 with A = +1, so the clipped term 1.2 counts (no gradient);
    # token 2: r = e^-0.1 = 0.905 inside [0.8, 1.2] with A = -1: -0.905.
    loss, grad = loss_and_grad(ROLLOUT)
    assert loss == pytest.approx(-(1.2 - math.exp(-0.1)) / 2, abs=1e-12)
    assert grad == pytest.approx([0.0, math.exp(-0.1) / 2, 0.0], abs=1e-12)


def test_eq6_uses_the_recomputed_probabilities():
    # token 1: r = e^0.1 = 1.105, unclipped: 1.105; token 2: r = e^0 = 1 with A = -1: -1.
    loss, grad = loss_and_grad(RECOMPUTED)
    assert loss == pytest.approx(-(math.exp(0.1) - 1) / 2, abs=1e-12)
    assert grad == pytest.approx([-math.exp(0.1) / 2, 0.5, 0.0], abs=1e-12)


def test_truncated_importance_sampling_and_icepop_weight_eq6():
    recomputed, rollout = torch.tensor(RECOMPUTED, dtype=torch.float64), torch.tensor(ROLLOUT, dtype=torch.float64)
    k = [math.exp(0.1), math.exp(-0.1), math.exp(1.0)]  # π_train / π_infer at the rollout weights
    tis = mismatch_weight(recomputed, rollout, "tis", cap=1.05)
    assert tis.tolist() == pytest.approx([1.05, k[1], 1.05], abs=1e-12)
    loss, _ = loss_and_grad(RECOMPUTED, tis)
    assert loss == pytest.approx(-(1.05 * math.exp(0.1) - k[1]) / 2, abs=1e-12)
    icepop = mismatch_weight(recomputed, rollout, "icepop", low=0.9, high=1.05)  # keeps token 2 only
    assert icepop.tolist() == pytest.approx([0.0, k[1], 0.0], abs=1e-12)
    loss, grad = loss_and_grad(RECOMPUTED, icepop)
    assert loss == pytest.approx(k[1] / 2, abs=1e-12) and grad[0] == 0.0


def test_group_advantages_and_kl():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert group_advantages(rewards, 4).tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0], abs=1e-5)
    logp, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    d = -0.5  # log π_ref - log π_θ of token 1; token 2 agrees
    assert kl_penalty(logp, reference, torch.ones(2)).item() == pytest.approx((math.exp(d) - d - 1) / 2)


def test_arithmetic_task_keeps_its_held_out_problems_apart():
    task = ArithmeticTask(digits=2, operators="+-*")
    rng = random.Random(0)
    train = {task.sample(rng).prompt for _ in range(2000)}
    held_out = {task.sample(rng, held_out=True).prompt for _ in range(200)}
    assert not train & held_out
    problem = Problem("12*34=", "408")
    assert task.reward(problem, "408") == 1.0 and task.reward(problem, "4080") == 0.0
    tokenizer = task.tokenizer()
    assert tokenizer.decode(tokenizer.encode("7-19=-12").ids) == "7-19=-12"


REWARDS = '''
import os

def exact(problem, completion):
    return float(completion.strip() == problem.answer)

def pid(problem, completion):
    return os.getpid()

def unit_tests(problem, completion):
    exec(completion + "\\n" + problem.answer, {})
    return 1.0

def hang(problem, completion):
    while True:
        pass
'''


@pytest.mark.slow
def test_user_rewards_run_in_a_subprocess_with_a_time_limit(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    problem = Problem("2+2=", "4")
    assert SubprocessReward(f"{path}:exact")(problem, " 4") == 1.0
    assert SubprocessReward(f"{path}:pid")(problem, "") not in (os.getpid(), 0.0)
    tests = Problem("def add(a, b):", "assert add(2, 3) == 5")
    reward = SubprocessReward(f"{path}:unit_tests")
    assert reward(tests, "def add(a, b):\n    return a + b") == 1.0
    assert reward(tests, "def add(a, b):\n    return a - b") == 0.0  # the assertion fails: the process exits 1
    start = time.perf_counter()
    assert SubprocessReward(f"{path}:hang", timeout=1.0, failure=-1.0)(problem, "") == -1.0
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="FILE.py:FUNCTION"):
        SubprocessReward("rewards")


# 1-digit addition: 100 problems, 94 of them for training. The default model learns it in ~60
# fine-tuning steps, so RL starts from a model that is right about two times in three. Above ~1e-4
# the RL updates' noise outweighs their signal on this small problem set.
ONE_DIGIT = dict(digits=1, sft_target_accuracy=0.7, sft_check_interval=5, prompts_per_step=16, group_size=8,
                 lr=5e-5, warmup_steps=2, eval_problems=100, seed=0)


def exact_reward(trainer: RLTrainer, problems: list[Problem]) -> torch.Tensor:
    """Per problem, the probability that a completion sampled at temperature 1 is the exact answer
    (answer + EOS): the expected reward, without the noise of sampling."""
    eos, tokenizer = trainer.eos, trainer.tokenizer
    prompts = [[eos] + encode(tokenizer, p.prompt) for p in problems]
    answers = [encode(tokenizer, p.answer) + [eos] for p in problems]
    with torch.no_grad():
        logp = trainer._forward(trainer.policy, _pad([p + a for p, a in zip(prompts, answers)], 0))[0]
    return torch.stack([logp[i, len(p) - 1:len(p) - 1 + len(a)].sum().exp()
                        for i, (p, a) in enumerate(zip(prompts, answers))])


@pytest.mark.slow
def test_a_short_grpo_run_raises_the_reward(tmp_path):
    """Fine-tuning stops at 70% greedy accuracy; 15 GRPO steps (batch-invariant, as by default) then
    raise the expected reward over all training problems without losing greedy accuracy.
    Deterministic (fixed seed, CPU). When written, with one request per rollout (groups are forked
    from one prefill now, with other seeds): 0.463 -> 0.528, accuracy 0.777 -> 0.809; controls: with a
    learning rate of 1e-12 the reward stayed at 0.463, with random rewards it fell to 0.342."""
    trainer = RLTrainer(RLConfig(out_dir=str(tmp_path), steps=15, **ONE_DIGIT))
    assert trainer.sft[-1]["sft_accuracy"] >= 0.7 and trainer.sft[-1]["sft_step"] < 200
    problems = [Problem(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    problems = [p for p in problems if not _held_out(p.prompt, trainer.task.fraction)]
    reward_before, accuracy_before = exact_reward(trainer, problems).mean().item(), trainer.accuracy(problems)
    rewards = [trainer.step(step)["reward"] for step in range(15)]
    reward_after, accuracy_after = exact_reward(trainer, problems).mean().item(), trainer.accuracy(problems)
    assert reward_after > reward_before + 0.04, (reward_before, reward_after, rewards)
    assert accuracy_after > accuracy_before, (accuracy_before, accuracy_after, rewards)


def _length_reward(problem: Problem, completion: str) -> float:
    """Rewards that differ within every group, whatever the model knows."""
    return float(len(completion) % 2)


@pytest.mark.parametrize("minibatches", [1, 2])
@pytest.mark.slow
def test_batch_invariant_rollout_logprobs_equal_the_trainers(tmp_path, minibatches):
    """Eq. 5's ratio starts at exactly 1: at every step the trainer's log-probs of the sampled tokens
    equal the engine's bit for bit, which also shows that the engine got the updated weights. With
    one minibatch they come from the update's own forward, with two from a separate one."""
    trainer = RLTrainer(RLConfig(out_dir=str(tmp_path), digits=1, sft_steps=0, prompts_per_step=4, group_size=4,
                                 minibatches=minibatches, lr=1e-3, warmup_steps=0))
    trainer.task.reward = _length_reward
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    for step in range(2):
        metrics = trainer.step(step)
        assert metrics["max_abs_dlogp"] == 0.0 and metrics["identical_fraction"] == 1.0, metrics
        assert metrics["trained_tokens"] > 0 and metrics["grad_norm"] > 0
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    engine = trainer.llm.engine.model.state_dict()
    assert all(torch.equal(engine[k], after[k]) for k in after)


def test_ppo_trains_its_value_head_within_a_token_budget(tmp_path):
    """A budget of 5 tokens leaves most rollouts untrained and fewer rows than minibatches: they are
    dropped, not turned into empty minibatches (a 0/0 loss)."""
    trainer = RLTrainer(RLConfig(out_dir=str(tmp_path), algorithm="ppo", digits=1, sft_steps=0, prompts_per_step=4,
                                 group_size=2, epochs=2, minibatches=4, tokens_per_step=5, lr=1e-3, warmup_steps=0))
    trainer.task.reward = lambda problem, completion: 1.0 + _length_reward(problem, completion)  # never 0 = value
    metrics = trainer.step(0)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["trained_tokens"] == 5 and metrics["max_abs_dlogp"] == 0.0
    assert trainer.value_head.weight.abs().sum() > 0  # zero-initialised, then trained on reward - value
    assert all(p.isfinite().all() for p in trainer.policy.parameters())


CHECKS = '''
def ends_with_digit(problem, completion):
    return float(completion[-1:].isdigit())
'''


@pytest.mark.slow
def test_rl_command_on_a_users_prompts_and_reward(tmp_path, capsys):
    """`ringlinear rl --model DIR --prompts FILE --reward FILE.py:FUNCTION` writes its config, metrics,
    reward curve and the trained checkpoint; the reward runs in its own process."""
    model_dir = tmp_path / "model"
    tiny_model(num_hidden_layers=3).save_pretrained(model_dir, tokenizer=byte_tokenizer())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} + {i} =", "answer": str(2 * i)}) + "\n" for i in range(30)))
    (tmp_path / "checks.py").write_text(CHECKS)
    out = tmp_path / "run"
    main(["rl", "--model", str(model_dir), "--prompts", str(prompts),
          "--reward", f"{tmp_path / 'checks.py'}:ends_with_digit", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
          "--eval-problems", "4", "--tokens-per-step", "12", "--ratio", "recompute", "--correction", "icepop",
          "--kl-coef", "0.1", "--out-dir", str(out)])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2] and "eval_accuracy" in lines[0] and "eval_accuracy" in lines[2]
    assert all(m["trained_tokens"] == 12 and m["max_abs_dlogp"] == 0.0 and m["kl"] >= 0 for m in lines[:2])
    assert json.loads((out / "rl_config.json").read_text())["correction"] == "icepop"
    assert (out / "reward.png").stat().st_size > 10_000 and (out / "checkpoint" / "config.json").exists()
    assert not (out / "sft_metrics.jsonl").exists()
    assert "held-out greedy accuracy" in capsys.readouterr().out


def test_fine_tuning_balances_the_experts_and_rl_keeps_the_routing_bias(tmp_path):
    """Fine-tuning moves the expert bias by each step's load, as pre-training does (recounted here from
    the routers' own choices); RL steps leave the bias alone (bias_update_rate 0, the default) yet
    reset the load every step, and move it when asked."""
    config = RLConfig(out_dir=str(tmp_path), digits=1, sft_steps=1, sft_batch_size=8, prompts_per_step=2,
                      group_size=2, warmup_steps=0, eval_problems=4)
    task = ArithmeticTask(digits=1)
    tokenizer = task.tokenizer()
    model = RingLinearForCausalLM(RingLinearConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size(),
                                                          **config.model_overrides))
    chosen = {router: [] for router in model.routers()}
    for router, picks in chosen.items():
        router.register_forward_hook(lambda module, args, output, picks=picks: picks.append(output[1].flatten()))
    supervised_finetune(model, task, tokenizer, config)
    assert len(chosen) == 3  # the MoE layers
    for router, picks in chosen.items():
        [experts] = picks  # one fine-tuning forward
        load = torch.bincount(experts, minlength=model.config.num_experts).float()
        sign = torch.sign(load.mean() - load)
        assert torch.equal(router.expert_bias, config.sft_bias_update_rate * (sign - sign.mean()))
        assert router.expert_bias.abs().max() > 0 and router.expert_load.sum() == 0

    trainer = RLTrainer(dataclasses.replace(config, sft_steps=0))
    trainer.task.reward = _length_reward
    routers = trainer.policy.routers()
    for router in routers:
        router.expert_bias.uniform_(-1e-3, 1e-3)
    trainer.sync()
    biases = [router.expert_bias.clone() for router in routers]
    trainer.step(0)
    assert all(torch.equal(r.expert_bias, b) and r.expert_load.sum() == 0 for r, b in zip(routers, biases))
    trainer.config.bias_update_rate = 1e-2
    trainer.step(1)
    assert all(not torch.equal(r.expert_bias, b) and r.expert_load.sum() == 0 for r, b in zip(routers, biases))
