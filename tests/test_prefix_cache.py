"""Prefix caching of the hybrid cache, parallel sampling (n > 1) and prompt log-probs: every test
holds the engine against itself without the feature (cache off, separate requests) or against a
full forward of the model."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import tiny_model

from ringlinear.infer import Engine, EngineConfig, SamplingParams
from ringlinear.infer.cache import CacheManager, fixed_cache_size, page_hashes


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, 257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_of(model, prefix_caching: bool, **config) -> Engine:
    config = {"page_size": 4, "num_pages": 96, "max_num_batched_tokens": 64, "prefix_snapshot_interval": 8,
              **config}
    return Engine(model, None, EngineConfig(enable_prefix_caching=prefix_caching, **config))


def serve(engine: Engine, batches: list[list[tuple[str, list[int]]]], params: SamplingParams) -> dict:
    """Each batch of requests arrives together, after the previous one finished: request id ->
    (tokens, log-probs of the chosen tokens)."""
    results = {}
    for batch in batches:
        for request_id, prompt in batch:
            engine.add_request(request_id, prompt, params)
            results[request_id] = ([], [])
        while engine.has_unfinished():
            for output in engine.step():
                results[output.request_id][0].extend(output.token_ids)
                results[output.request_id][1].extend(lp.logprob for lp in output.logprobs or [])
    return results


SHARED = tokens(27, seed=0)  # ends inside a page (4 tokens) and between two snapshot positions (8)
CONVERSATION = [
    [("first", SHARED + tokens(5, 1))],
    [("same step a", SHARED + tokens(9, 2)), ("same step b", SHARED + tokens(3, 3))],  # a miss for both
    [("again", SHARED + tokens(5, 1)), ("longer", SHARED + tokens(5, 1) + tokens(13, 4))],
]


@pytest.mark.parametrize("budget, interval", [(64, 8), (16, 16)])
def test_cache_hits_give_the_tokens_of_misses(model, budget, interval):
    """Snapshot positions inside the chunks (rounds of Lightning calls), then 16-token chunks that
    end on them (their one call saves them)."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    config = {"max_num_batched_tokens": budget, "prefix_snapshot_interval": interval}
    cached_engine = engine_of(model, True, **config)
    cached = serve(cached_engine, CONVERSATION, params)
    plain = serve(engine_of(model, False, **config), CONVERSATION, params)
    for request_id, (ids, logprobs) in plain.items():
        assert cached[request_id][0] == ids, request_id
        assert torch.allclose(torch.tensor(cached[request_id][1]), torch.tensor(logprobs), atol=1e-5)
    stats = cached_engine.stats()
    assert stats["prefix_cache_queries"] == sum(len(p) for batch in CONVERSATION for _, p in batch)
    if interval == 16:  # back to 16 for the shared 27 tokens and "again"; "longer" finds 32
        assert stats["prefix_cache_hits"] == 16 + 16 + 16 + 32
        return
    # "same step a" and "b" find 24 tokens of "first" (their 27 shared, back to the snapshot at 24),
    # not each other's; "again" 24 of its 32 (one must be left to compute: 28, back to 24); "longer"
    # the 32 of "first"'s prompt
    assert stats["prefix_cache_hits"] == 24 + 24 + 24 + 32
    assert stats["snapshot_bytes"] > 0


def test_batch_invariant_hits_are_bit_identical(model):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    config = {"page_size": 16, "prefix_snapshot_interval": 16, "batch_invariant": True}
    cached_engine = engine_of(model, True, **config)
    cached = serve(cached_engine, CONVERSATION, params)
    plain = serve(engine_of(model, False, **config), CONVERSATION, params)
    assert cached == plain
    assert cached_engine.stats()["prefix_cache_hits"] > 0


def test_hits_survive_eviction_pressure(model):
    """With pages for about two sequences, cached pages are evicted for new ones and found again
    once recomputed; preemption recomputes from the cache."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [SHARED + tokens(10, 10 + i) for i in range(6)] + [tokens(40, 20), SHARED + tokens(2, 30)]
    batches = [[(str(i), p)] for i, p in enumerate(prompts)] + [[("x", prompts[0]), ("y", prompts[1])]]
    cached_engine = engine_of(model, True, num_pages=24, num_snapshots=3)
    cached = serve(cached_engine, batches, params)
    plain = serve(engine_of(model, False, num_pages=24), batches, params)
    assert {k: v[0] for k, v in cached.items()} == {k: v[0] for k, v in plain.items()}
    cache = cached_engine.scheduler.cache
    assert cache.num_hit_tokens > 0 and cache.num_snapshots_used == 3
    assert cache.num_free_pages == 24 and cache.num_free_slots == cache.size.num_slots


def test_cache_manager_shares_counts_and_evicts_pages():
    cache = CacheManager(fixed_cache_size(num_slots=3, num_pages=4, page_size=2, max_model_len=16, num_snapshots=1,
                                          snapshot_interval=4), prefix_caching=True)
    ids = [5, 6, 7, 8, 9]
    hashes = page_hashes(ids, 2, 2, [])
    assert page_hashes(ids, 2, 2, hashes[:1]) == hashes  # a chain: extending it gives the same
    assert page_hashes([5, 6, 7, 0], 2, 2, [])[0] == hashes[0] != page_hashes([5, 6, 7, 0], 2, 2, [])[1]
    a = cache.allocate_slot()
    cache.reserve(a, 5)
    cache.register(a, hashes, 0)
    assert cache.snapshot(hashes[1]) == 0 and cache.snapshot(hashes[1]) is None  # one per prefix
    cache.take_changes()
    hit = cache.find_prefix(hashes, len(ids))
    assert (hit.num_tokens, hit.snapshot, hit.num_reclaimed) == (4, 0, 0)
    b = cache.allocate_slot()
    cache.take_prefix(b, hashes, hit, len(ids))
    changes = cache.take_changes()
    assert changes.restored == [(b, 0)] and [page for _, _, page in changes.new_pages] == [1, 2]
    cache.free(a)  # pages 1 and 2 stay held by b; page 3 (unhashed) is free
    assert cache.num_free_pages == 2
    cache.free(b)  # now cached, evictable: a new sequence may take every page
    assert cache.num_free_pages == 4 and cache.find_prefix(hashes, len(ids)).num_reclaimed == 2
    c = cache.allocate_slot()
    assert cache.reserve(c, 8) == 8  # evicts both cached pages
    assert cache.find_prefix(hashes, len(ids)).num_tokens == 0


def test_parallel_sampling_forks_one_prefill(model):
    prompt = tokens(13, 5)
    sampled = SamplingParams(max_tokens=7, temperature=1.0, seed=7, ignore_eos=True)
    forked_engine = engine_of(model, False)
    forked_engine.add_request("r", prompt, SamplingParams(max_tokens=7, temperature=1.0, seed=7, ignore_eos=True,
                                                          n=3))
    forked: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while forked_engine.has_unfinished():
        for output in forked_engine.step():
            forked[output.index] += output.token_ids
    assert forked_engine.stats()["prompt_tokens"] == len(prompt)  # one prefill for the three
    for index in range(3):  # completion i is the request seeded seed + i
        alone = serve(engine_of(model, False), [[("s", prompt)]],
                      SamplingParams(**{**vars(sampled), "seed": 7 + index}))["s"][0]
        assert forked[index] == alone
    assert len({tuple(t) for t in forked.values()}) == 3
    cache = forked_engine.scheduler.cache
    assert cache.num_free_pages == 96 and cache.num_free_slots == cache.size.num_slots


def test_forks_without_a_slot_wait_and_compute_alone(model):
    engine = engine_of(model, True, max_num_seqs=4)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, n=3)
    for request_id, prompt in (("a", tokens(9, 6)), ("b", tokens(11, 7))):
        engine.add_request(request_id, prompt, params)
    results: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            results.setdefault((output.request_id, output.index), []).extend(output.token_ids)
    assert len(results) == 6
    for request_id in "ab":  # greedy: the three completions agree
        assert results[request_id, 0] == results[request_id, 1] == results[request_id, 2]


def test_prompt_logprobs_equal_a_full_forward(model):
    prompt = tokens(30, 8)
    with torch.no_grad():
        logp = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    engine = engine_of(model, True, max_num_batched_tokens=12)  # the prompt in three chunks
    for max_tokens in (0, 2):
        engine.add_request(str(max_tokens), prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                   prompt_logprobs=2, n=1 + max_tokens // 2))
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        firsts = [o for o in outputs if o.prompt_logprobs is not None]
        assert len(firsts) == 1 + max_tokens // 2  # each completion gets them once, with its first output
        values = firsts[0].prompt_logprobs
        assert values[0] is None and len(values) == len(prompt)
        for position, value in enumerate(values[1:]):
            assert value.token_id == prompt[position + 1]
            assert abs(value.logprob - logp[position, prompt[position + 1]].item()) < 1e-4
            assert [t for t, _ in value.top] == logp[position].topk(2).indices.tolist()
        if max_tokens == 0:
            assert outputs[-1].token_ids == [] and outputs[-1].finish_reason == "length"
