"""RL: the Eq. 5 / Eq. 6 objectives and their corrections against hand computations, GRPO
advantages, user rewards in a subprocess with a time limit, the arithmetic task, and a short run
whose reward rises."""

import math
import os
import random
import time

import pytest
import torch

from ringlinear.rl.loss import clipped_surrogate, group_advantages, kl_penalty, mismatch_weight
from ringlinear.rl.rewards import SubprocessReward
from ringlinear.rl.tasks import ArithmeticTask, Problem

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
