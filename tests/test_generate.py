import pytest
import torch

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.generate import generate
from ringlinear.sampling import filter_logits, sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RingLinearForCausalLM(RingLinearConfig.preset("tiny")).eval()


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_equals_argmax_over_full_forwards(model):
    prompts = [[5, 9, 200, 7], [1, 2, 3, 4], [42, 43]]
    out = generate(model, prompts, max_new_tokens=6, temperature=0)
    assert out == [greedy_without_cache(model, p, 6) for p in prompts]


def test_sampling_is_reproducible_with_a_seed(model):
    a = generate(model, [[1, 2, 3]] * 3, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(model, [[1, 2, 3]] * 3, max_new_tokens=8, temperature=1.0, seed=7)
    assert a == b and len({tuple(x) for x in a}) > 1  # rows of one batch draw differently


def test_stops_at_eos(model):
    greedy = greedy_without_cache(model, [1, 2, 3], 6)
    out = generate(model, [[1, 2, 3]], max_new_tokens=6, temperature=0, eos_token_ids=[greedy[3]])
    assert out == [greedy[:greedy.index(greedy[3])]]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[3, 4]], max_new_tokens=5, temperature=0)
    assert generate(model, [[3, 4]], max_new_tokens=5, temperature=2.0, top_k=1, seed=0) == greedy
    assert generate(model, [[3, 4]], max_new_tokens=5, temperature=2.0, top_p=1e-6, seed=0) == greedy


def test_filter_logits_keeps_top_k_and_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    kept = filter_logits(logits, top_k=torch.tensor([2, 0, 0]), top_p=torch.tensor([1.0, 0.8, 0.85]))
    finite = torch.isfinite(kept)
    assert finite.tolist() == [[True, True, False, False, False],
                               [True, True, True, False, False],  # 0.5 + 0.2 < 0.8: one more
                               [True, True, True, False, False]]  # 0.85 reached exactly at the 3rd
    assert torch.equal(kept[finite], logits[finite])


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.log().expand(20000, 3), temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=3) / 20000
    assert torch.allclose(freq, probs, atol=0.015)


def test_bad_generation_input(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]])
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        generate(model, [[1, 99999]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=-1)
