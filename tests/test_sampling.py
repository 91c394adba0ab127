"""The sampling extensions the engine uses: min-p, penalties, per-row generators, log-probs."""

import math

import torch

from ringlinear.sampling import apply_penalties, filter_logits, sample, token_logprobs


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_most_likely():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 2))
    kept = torch.isfinite(filter_logits(logits, min_p=torch.tensor([0.3, 0.0])))
    assert kept.tolist() == [[True, True, True, False, False], [True] * 5]  # 0.15 >= 0.3 * 0.5 > 0.1


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    seen = torch.tensor([[True, True, True, False]])  # token 1 only in the prompt
    out = apply_penalties(logits, counts, seen, repetition=2.0, presence=0.5, frequency=0.25)
    assert torch.allclose(out, torch.tensor([[2.0 / 2 - 0.5 - 0.5, -1.0 * 2, 0.5 / 2 - 0.5 - 0.25, 3.0]]))
    assert torch.equal(apply_penalties(logits, counts, seen), logits)  # defaults are off


def test_row_generators_make_a_row_independent_of_its_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    alone = [sample(logits[2:3], 1.0, row_generators={0: torch.Generator().manual_seed(9)}).item()
             for _ in range(3)]
    together = [sample(logits, 1.0, generator=torch.Generator().manual_seed(i),
                       row_generators={2: torch.Generator().manual_seed(9)})[2].item() for i in range(3)]
    assert alone == together and len(set(alone)) == 1


def test_filters_off_as_numbers_skip_the_sort_and_draw_the_same_tokens():
    """The sampler passes the filters (and a temperature all rows share) as numbers when no request sets
    one: the same draws as per-row tensors of the defaults (which sort the vocabulary and filter nothing)."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    assert filter_logits(logits) is logits
    off = torch.zeros(6, dtype=torch.long), torch.ones(6), torch.zeros(6)
    assert torch.equal(filter_logits(logits, *off), logits)
    for seed in range(5):
        for temperature in (0.8, 1.0):  # as a number too: no greedy rows' argmax, and at 1 no division
            numbers = sample(logits, temperature, 0, 1.0, torch.Generator().manual_seed(seed), min_p=0.0)
            tensors = sample(logits, torch.full((6,), temperature), off[0], off[1],
                             torch.Generator().manual_seed(seed), min_p=off[2])
            assert torch.equal(numbers, tensors)


def test_exponential_race_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.log().expand(20000, 4), temperature=1.0, top_k=3, generator=g)
    freq = torch.bincount(draws, minlength=4) / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015)


def test_token_logprobs_are_the_unprocessed_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    chosen, top, ids = token_logprobs(logits, torch.tensor([0, 2]), 2)
    expected = logits.log_softmax(-1)
    assert torch.allclose(chosen, expected[[0, 1], [0, 2]])
    assert ids.tolist() == [[1, 0], [2, 0]] and torch.allclose(top[0], expected[0, [1, 0]])
    assert math.isclose(top[1, 0].exp().item() + 2 * math.exp(expected[1, 0].item()), 1.0, rel_tol=1e-6)
