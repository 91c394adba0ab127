"""Speculative decoding in the engine on the CPU: greedy output equals plain greedy output token for
token (random MTP weights, so most drafts are rejected; the n-gram drafter on repetitive output, so
many are accepted) under chunked prefill, continuous batching, preemption and penalised requests
decoding plainly beside; accepted tokens' log-probs bit-identical in batch-invariant mode; prefix-cache
snapshots at accepted positions; seeded sampling and the draft metrics."""

import pytest
import torch
from infer_helpers import tiny_model

from ringlinear.infer import Engine, EngineConfig, SamplingParams
from ringlinear.infer.metrics import Metrics
from ringlinear.infer.scheduler import Status
from ringlinear.infer.spec.tree import DraftTree

MTP = {"method": "mtp", "num_speculative_tokens": 3}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# trees: the MTP head's top 2 at the first two depths; the n-gram drafter's three best continuations
MTP_TREE = {**MTP, "num_speculative_tokens": 5, "speculative_token_tree": "[(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]"}
NGRAM_TREE = {**NGRAM, "num_speculative_tokens": 7,
              "speculative_token_tree": [[0], [1], [2], [0, 0], [1, 0], [0, 0, 0], [0, 0, 0, 0]]}


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=3, num_nextn_predict_layers=1)  # Lightning, Lightning, softmax; MTP


@pytest.fixture(scope="module")
def repetitive(model):
    """The same model whose LM head scores five tokens only: its output repeats itself."""
    copy = tiny_model(num_hidden_layers=3, num_nextn_predict_layers=1)
    with torch.no_grad():
        copy.lm_head.weight[5:] = 0
    return copy


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 257, (n,), generator=g).tolist() for n in lengths]


def serve(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list]:
    """Add each request at its step, step until all finished; (tokens, log-probs) by request id."""
    outputs: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
            outputs[request_id] = ([], [])
        for output in engine.step():
            outputs[output.request_id][0].extend(output.token_ids)
            outputs[output.request_id][1].extend(output.logprobs or [])
        step += 1
    return outputs


def record_paths(engine: Engine) -> list[list[int]]:
    """The accepted paths of every verify chunk the engine runs from now on."""
    paths, verify = [], engine.sampler.verify

    def recording(logits, verifies):
        verified = verify(logits, verifies)
        paths.extend(v.path for v in verified)
        return verified
    engine.sampler.verify = recording
    return paths


@pytest.mark.parametrize("method,shape", [("mtp", "chain"), ("ngram", "chain"), ("mtp", "tree"), ("ngram", "tree")])
def test_greedy_speculative_output_equals_plain_greedy_output(model, repetitive, method, shape):
    """Mixed steps of verify chunks, plain (penalised) decodes and prompt chunks, with preemption:
    chains, and trees whose accepted paths leave their first branch (their keys and values moved to
    consecutive positions, their Lightning state folded along the path)."""
    target = model if method == "mtp" else repetitive
    spec = {("mtp", "chain"): MTP, ("ngram", "chain"): NGRAM, ("mtp", "tree"): MTP_TREE,
            ("ngram", "tree"): NGRAM_TREE}[method, shape]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    prompts = prompts_of([7, 20, 12])
    arrivals = {0: [("a", prompts[0], greedy), ("b", prompts[1], greedy)], 3: [("c", prompts[2], penalised)]}
    # 12-token steps chunk the prompts; 11 pages of 4 tokens hold about 2 sequences: preemption
    config = {"max_num_seqs": 3, "max_num_batched_tokens": 12, "page_size": 4, "num_pages": 11}
    plain = serve(Engine(target, None, EngineConfig(**config)), arrivals)
    engine = Engine(target, None, EngineConfig(**config, speculative_config=spec))
    paths = record_paths(engine)
    speculative = serve(engine, arrivals)
    assert {r: t for r, (t, _) in speculative.items()} == {r: t for r, (t, _) in plain.items()}
    assert paths and all(path == sorted(path) for path in paths)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["page_usage"] == stats["slot_usage"] == 0
    assert engine.scheduler.cache.num_free_pages == 11
    drafts, accepted = stats["spec_draft_tokens"], stats["spec_accepted_tokens"]
    if method == "mtp":
        assert drafts > 15 and accepted < 0.2 * drafts  # random MTP weights: most drafts are rejected
    else:
        assert drafts > 10 and accepted > 0.4 * drafts


class ForcedTreeDrafter:
    """Trees whose first branch at every depth is wrong and whose second is the plain engine's next
    token: every accepted path leaves the first branch, so its keys and values move and its
    Lightning state folds along nodes that are not consecutive."""
    needs_hidden_states = False
    # (0,) wrong, (1,) right; under it (1, 0) wrong, (1, 1) right, then (1, 1, 0) right
    shape = [(0,), (1,), (1, 0), (1, 1), (1, 1, 0)]

    def __init__(self, reference: dict[str, list[int]]):
        self.reference = reference

    def propose(self, output, hidden, accepted):
        drafts = {}
        for chunk in output.chunks:
            seq = chunk.seq
            if not chunk.sample or seq.status != Status.RUNNING or seq.params.penalised:
                continue
            right = self.reference[seq.request_id][len(seq.output_ids):][:3]
            if len(right) == 3:
                wrong = [(t + 1) % 257 for t in right]
                drafts[seq] = DraftTree((wrong[0], right[0], wrong[1], right[1], right[2]), (0, 0, 2, 2, 4))
        return drafts


def test_accepted_paths_off_the_first_branch_leave_the_cache_as_plain_decoding_does(model):
    """Greedy output equals plain greedy output when every accepted path skips rejected siblings,
    beside plain decodes and prompt chunks, under preemption; then a follow-up request reads the
    prefix cache those paths registered."""
    greedy = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    prompts = prompts_of([6, 17, 11], seed=4)
    arrivals = {0: [("a", prompts[0], greedy), ("b", prompts[1], greedy)], 2: [("c", prompts[2], greedy)]}
    config = {"max_num_seqs": 3, "max_num_batched_tokens": 16, "page_size": 4, "num_pages": 14,
              "prefix_snapshot_interval": 8}
    plain_engine = Engine(model, None, EngineConfig(**config))
    plain = {r: t for r, (t, _) in serve(plain_engine, arrivals).items()}
    engine = Engine(model, None, EngineConfig(**config, speculative_config=MTP_TREE))
    engine.speculator = ForcedTreeDrafter(plain)
    paths = record_paths(engine)
    assert {r: t for r, (t, _) in serve(engine, arrivals).items()} == plain
    assert engine.stats()["preemptions"] > 0
    assert [2, 4, 5] in paths and all(path[:1] in ([], [2]) for path in paths)
    follow_up = prompts[1] + plain["b"] + [3, 4]
    for e in (plain_engine, engine):
        e.speculator = None
    again = [serve(e, {0: [("d", follow_up, greedy)]})["d"][0] for e in (plain_engine, engine)]
    assert again[0] == again[1] and engine.stats()["prefix_cache_hits"] >= 24  # into the generated tokens


@pytest.mark.parametrize("forced_tree", [False, True], ids=["chain", "tree"])
def test_batch_invariant_accepted_tokens_logprobs_are_bit_identical(repetitive, forced_tree):
    """Verify chains and trees run the invariant kernels of a decode (a tree token: of its root path's
    decode): the log-probs of every token, accepted draft or not, are the plain engine's bits. The
    trees are ForcedTreeDrafter's, whose accepted paths leave the first branch at every step."""
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, logprobs=0)
    prompts = prompts_of([9, 21], seed=2)
    arrivals = {0: [("a", prompts[0], params)], 1: [("b", prompts[1], params)]}
    config = {"max_num_seqs": 2, "max_num_batched_tokens": 16, "page_size": 16, "num_pages": 8, "batch_invariant": True}
    plain = serve(Engine(repetitive, None, EngineConfig(**config)), arrivals)
    engine = Engine(repetitive, None, EngineConfig(**config, speculative_config=MTP_TREE if forced_tree else NGRAM))
    if forced_tree:
        engine.speculator = ForcedTreeDrafter({r: tokens for r, (tokens, _) in plain.items()})
    paths = record_paths(engine)
    speculative = serve(engine, arrivals)
    assert engine.stats()["spec_accepted_tokens"] >= 4
    assert not forced_tree or [2, 4, 5] in paths
    for request_id, (tokens, logprobs) in plain.items():
        spec_tokens, spec_logprobs = speculative[request_id]
        assert spec_tokens == tokens
        assert torch.equal(torch.tensor([lp.logprob for lp in spec_logprobs]),
                           torch.tensor([lp.logprob for lp in logprobs]))


def test_padded_verify_steps_give_the_rows_of_the_step_as_scheduled(repetitive):
    """What the verify graphs replay on a GPU, run eagerly: steps mixing plain decodes (a penalised
    request drafts nothing) and n-gram chains of any length, laid out by `pad_step` as sequences of the
    configured chain (placeholders after each one's own rows, and a padding sequence), give every row of
    the step the logits of the step as scheduled; the placeholders' keys and values go to the scratch page."""
    from ringlinear.infer.context import PagedContext
    from ringlinear.infer.graphs import fits_shape, pad_step, shape_batch
    from ringlinear.infer.spec.tree import path_parents

    engine = Engine(repetitive, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=64, page_size=4,
                                                   num_pages=40, speculative_config=NGRAM))
    cache, shape = engine.runner.cache, path_parents(engine.config.speculative_config.paths)
    capacity = cache.size.max_pages_per_seq * cache.page_size
    padded_logits, kinds = [], []

    def padded_forward(output, batch):
        chunks = output.chunks
        if not any(c.drafts for c in chunks) or not fits_shape(chunks, shape, capacity):
            return
        size = len(chunks) + 1
        padded = pad_step(chunks, batch, shape, size, cache.page_size)
        step = shape_batch({name: torch.from_numpy(v) for name, v in padded.inputs.items()}, shape, size)
        with torch.no_grad():
            logits = repetitive(step.input_ids[None], context=PagedContext(cache, step, engine.policy)).logits[0]
        padded_logits.append(logits[torch.from_numpy(padded.real_rows)])
        kinds.append({len(c.drafts) for c in chunks})

    engine.runner.register_step_hook(padded_forward)
    execute, real_logits = engine.runner.execute, []

    def recording(output, hidden_states=False):
        result = execute(output, hidden_states)
        if len(real_logits) < len(padded_logits):
            real_logits.append(result.logits)
        return result
    engine.runner.execute = recording
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    prompts = prompts_of([7, 20, 12])
    arrivals = {0: [("a", prompts[0], greedy), ("b", prompts[1], greedy), ("c", prompts[2], penalised)]}
    plain = serve(Engine(repetitive, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=64, page_size=4,
                                                        num_pages=40)), arrivals)
    assert serve(engine, arrivals) == plain  # the placeholders' keys and values touched no sequence's pages
    assert len(padded_logits) == len(real_logits) > 3
    assert any(0 in k and len(k) > 2 for k in kinds)  # plain decodes beside chains of two lengths
    for padded, real in zip(padded_logits, real_logits):
        torch.testing.assert_close(padded, real, rtol=1e-4, atol=1e-4)


def test_prefix_cache_keeps_only_accepted_tokens(repetitive):
    """A follow-up request (prompt + completion + more) hits the pages and snapshots that accepted
    drafts reached, and continues as the plain engine does."""
    first = prompts_of([9], seed=3)[0]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    config = {"max_num_seqs": 2, "max_num_batched_tokens": 32, "page_size": 4, "num_pages": 40,
              "prefix_snapshot_interval": 8}
    results = []
    for spec in (None, NGRAM):
        engine = Engine(repetitive, None, EngineConfig(**config, speculative_config=spec))
        completion = serve(engine, {0: [("a", first, params)]})["a"][0]
        follow_up = first + completion + [7, 8, 9]
        results.append((completion, serve(engine, {0: [("b", follow_up, params)]})["b"][0]))
        assert engine.stats()["prefix_cache_hits"] >= 24  # a snapshot inside the generated tokens
    assert results[0] == results[1]


@pytest.mark.parametrize("spec", [MTP, MTP_TREE], ids=["chain", "tree"])
def test_seeded_sampling_is_reproducible_and_counts_drafts(model, spec):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=5, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = Engine(model, None, EngineConfig(max_num_seqs=2, page_size=4, num_pages=32, speculative_config=spec))
        runs.append(serve(engine, {0: [("a", prompts_of([6])[0], params)]})["a"][0])
    assert runs[0] == runs[1] and len(runs[0]) == 10
    metrics = Metrics()
    metrics.update(engine.stats())
    text = metrics.render().decode()
    drafts = engine.stats()["spec_draft_tokens"]
    assert drafts > 0 and f"ringlinear_spec_decode_num_draft_tokens_total {float(drafts)}" in text
    assert "ringlinear_spec_decode_num_accepted_tokens_total" in text


def test_bad_speculative_configs_fail_at_start_up(model):
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        Engine(tiny_model(num_hidden_layers=3), None, EngineConfig(num_pages=8, speculative_config=MTP))
    with pytest.raises(ValueError, match="speculative_config.num_speculative_tokens must be"):
        Engine(model, None, EngineConfig(num_pages=8, speculative_config='{"method": "mtp", "num_speculative_tokens": 64}'))
