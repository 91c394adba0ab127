"""The policy objective: PPO's clipped surrogate over the tokens of the rollouts,

    L = −mean_t  w_t · min(r_t A_t, clip(r_t, 1 − ε, 1 + ε) A_t),    r_t = π_θ(y_t) / π_b(y_t),

where the behaviour probability π_b is the rollout engine's (Eq. 5 of the report: the distribution
the tokens were really drawn from; unbiased once training and inference are aligned) or the
trainer's own recomputation at the rollout weights (Eq. 6, as verl and OpenRLHF do). With Eq. 6 the
mismatch k_t = π_train(y_t; θ_old) / π_infer(y_t; θ_old) can be corrected by a detached weight w_t:
truncated importance sampling (min(k, C)) or IcePop (k inside [α, β], else 0: the token is masked).
"""

from __future__ import annotations

from torch import Tensor

RATIOS = ("rollout", "recompute")  # Eq. 5, Eq. 6
CORRECTIONS = ("none", "tis", "icepop")


def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """GRPO: each reward minus the mean of its group (consecutive `group_size` rollouts of one
    prompt), over the group's standard deviation; 0 for a group whose rewards are all equal."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True, correction=0) + 1e-6)).flatten()


def mismatch_weight(logp_train: Tensor, logp_rollout: Tensor, correction: str, cap: float = 2.0,
                    low: float = 0.5, high: float = 5.0) -> Tensor:
    """Per-token weight from k = π_train / π_infer at the rollout weights: min(k, cap) for "tis",
    k on [low, high] and 0 outside for "icepop". Detached."""
    k = (logp_train - logp_rollout).detach().exp()
    if correction == "tis":
        return k.clamp(max=cap)
    if correction == "icepop":
        return k * ((k >= low) & (k <= high))
    raise ValueError(f"correction must be one of {CORRECTIONS[1:]}, got {correction!r}")


def clipped_surrogate(logp: Tensor, logp_behaviour: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2,
                      weight: Tensor | None = None) -> Tensor:
    """The loss L above, a mean over the tokens where `mask` is set (all tensors of one shape)."""
    ratio = (logp - logp_behaviour).exp()
    surrogate = (ratio * advantages).minimum(ratio.clamp(1 - clip, 1 + clip) * advantages)
    if weight is not None:
        surrogate = surrogate * weight
    return -(surrogate * mask).sum() / mask.sum()


def kl_penalty(logp: Tensor, logp_reference: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked tokens of the k3 estimate of KL(π_θ ‖ π_ref): e^d − d − 1, d = log π_ref − log π_θ."""
    d = logp_reference - logp
    return ((d.exp() - d - 1) * mask).sum() / mask.sum()
