"""Rejection sampling of draft chains and trees: greedy requests emit what greedy decoding would, and
sampled ones follow the target's distribution: a bound of 0.05 on the total-variation distance over
the 16 outcomes of two tokens of a 4-token vocabulary in 2,500 trials (the noise is ~0.02), with
drafts 0.55 away from the target so that acceptances and rejections both happen often."""

import torch
from torch import Tensor

from ringlinear.infer.spec.rejection import accept_tree


def accept_chain(draft_tokens: Tensor, target_probs: Tensor, draft_probs: Tensor | None = None,
                 greedy: bool = False, generator: torch.Generator | None = None) -> list[int]:
    """A chain as `accept_tree`'s one-branch tree: k drafted tokens [k] after the last accepted one;
    target_probs [k+1, V] (row j: after j drafts); draft_probs [k, V] or None. Returns the emitted
    tokens: the accepted drafts, then one more."""
    k = draft_tokens.shape[0]
    tokens = torch.cat([draft_tokens.new_zeros(1), draft_tokens])
    probs = None if draft_probs is None else torch.cat([draft_probs[:1], draft_probs])
    path, token = accept_tree(list(range(-1, k)), tokens, target_probs, probs, greedy, generator)
    return [int(tokens[node]) for node in path] + [token]


V = 4
GEN = torch.Generator().manual_seed(0)


def table(*shape):
    return torch.softmax(2 * torch.randn(*shape, V, generator=GEN), -1)


# target and draft distributions after the paths (), (a,), (a, b)
P0, P1, P2 = table(), table(V), table(V, V)
Q0, Q1 = (0.5 * p + 0.5 * table(*p.shape[:-1]) for p in (P0, P1))  # half the target, half elsewhere


def two_level_tree(sampled: bool):
    """Root, two children, two grandchildren each: drawn i.i.d. from the draft (sampled) or its top 2."""
    def pick(q):
        return torch.multinomial(q, 2, replacement=True, generator=GEN) if sampled else q.topk(2).indices

    parents, tokens, target, draft = [-1], [0], [P0], [Q0]
    for a in pick(Q0).tolist():
        parents.append(0)
        tokens.append(a)
        target.append(P1[a])
        draft.append(Q0)
        node = len(parents) - 1
        for b in pick(Q1[a]).tolist():
            parents.append(node)
            tokens.append(b)
            target.append(P2[a, b])
            draft.append(Q1[a])
    return parents, torch.tensor(tokens), torch.stack(target), torch.stack(draft)


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def first_two_tokens(sampled: bool, trials: int) -> tuple[torch.Tensor, float]:
    """Counts of the (first, second) emitted tokens, a second drawn from the target where only one
    was emitted, and the mean number of accepted drafts."""
    counts, accepted = torch.zeros(V, V), 0
    for _ in range(trials):
        parents, tokens, target, draft = two_level_tree(sampled)
        path, token = accept_tree(parents, tokens, target, draft if sampled else None, generator=GEN)
        emitted = [int(tokens[n]) for n in path] + [token]
        if len(emitted) == 1:
            emitted.append(int(torch.multinomial(P1[emitted[0]], 1, generator=GEN)))
        counts[emitted[0], emitted[1]] += 1
        accepted += len(path)
    return counts, accepted / trials


def test_sampled_and_top_k_trees_emit_the_targets_distribution():
    truth = P0[:, None] * P1  # p(t1) p(t2 | t1)
    drafts = Q0[:, None] * Q1
    assert 0.5 * (drafts - truth).abs().sum() > 0.4  # sampling the drafts instead would fail the bound
    for sampled in (True, False):
        counts, mean_accepted = first_two_tokens(sampled, trials=2500)
        assert 0.5 < mean_accepted < 1.9  # acceptances and rejections both exercised
        assert total_variation(counts.flatten(), truth.flatten()) < 0.05


def test_a_chain_emits_the_targets_distribution():
    counts = torch.zeros(V, V)
    for _ in range(2500):
        a = int(torch.multinomial(Q0, 1, generator=GEN))
        b = int(torch.multinomial(Q1[a], 1, generator=GEN))
        emitted = accept_chain(torch.tensor([a, b]), torch.stack([P0, P1[a], P2[a, b]]), torch.stack([Q0, Q1[a]]),
                               generator=GEN)
        if len(emitted) == 1:
            emitted.append(int(torch.multinomial(P1[emitted[0]], 1, generator=GEN)))
        counts[emitted[0], emitted[1]] += 1
    assert total_variation(counts.flatten(), (P0[:, None] * P1).flatten()) < 0.05


def test_greedy_emits_the_targets_argmax_path():
    logits = torch.randn(8, 50, generator=GEN)
    best = logits.argmax(-1)
    # node 0 -> {1, 2}, 1 -> 3, 2 -> {4, 5}, 5 -> 6, 6 -> 7: nodes 2, 5, 6 follow the argmax, 7 does not
    parents = [-1, 0, 0, 1, 2, 2, 5, 6]
    tokens = torch.tensor([0, (best[0] + 1) % 50, best[0], 0, (best[2] + 1) % 50, best[2], best[5],
                           (best[6] + 1) % 50])
    assert accept_tree(parents, tokens, logits, greedy=True) == ([2, 5, 6], int(best[6]))
    chain = accept_chain(torch.tensor([best[0], best[1], 7]), logits[:4], greedy=True)
    assert chain == [int(best[0]), int(best[1])] + ([7, int(best[3])] if best[2] == 7 else [int(best[2])])
