"""The inference engine on the CPU: its output equals the model's own greedy decode under
continuous batching, chunked prefill and preemption; its step logits equal a full forward; the
offline API, sampling options, aborts and the cache accounting."""

import pytest
import torch
import torch.nn.functional as F
from infer_helpers import byte_tokenizer, tiny_checkpoint, tiny_model

from ringlinear.generate import generate
from ringlinear.infer import LLM, Engine, EngineConfig, InvalidRequest, SamplingParams
from ringlinear.infer.cache import CacheManager, fixed_cache_size, size_cache
from ringlinear.infer.graphs import capture_sizes
from ringlinear.infer.scheduler import Scheduler, Sequence
from ringlinear.info import model_info
from ringlinear.ops.moe import grouped_glu_grouped_mm, grouped_glu_loop


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts_of(lengths, seed=1, vocab=257):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def run(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list[int]]:
    """Add each request at its step, step until everything finished; tokens by request id."""
    outputs: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
            outputs[request_id] = []
        for output in engine.step():
            outputs[output.request_id] += output.token_ids
        step += 1
    return outputs


def test_greedy_equals_generate_under_batching_chunking_and_preemption(model):
    lengths = [3, 45, 17, 70, 9, 28]
    prompts = prompts_of(lengths)
    new = 10
    expected = [generate(model, [p], max_new_tokens=new, temperature=0)[0] for p in prompts]
    greedy = SamplingParams(max_tokens=new, temperature=0)
    # 16-token steps chunk every prompt but the first; 24 pages of 4 tokens hold about 2 sequences.
    engine = Engine(model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, page_size=4,
                                              num_pages=24))
    arrivals = {0: [("0", prompts[0], greedy), ("1", prompts[1], greedy)], 2: [("2", prompts[2], greedy)],
                5: [("3", prompts[3], greedy), ("4", prompts[4], greedy)], 9: [("5", prompts[5], greedy)]}
    outputs = run(engine, arrivals)
    assert [outputs[str(i)] for i in range(len(prompts))] == expected
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["page_usage"] == stats["slot_usage"] == 0
    assert engine.scheduler.cache.num_free_pages == 24 and engine.scheduler.cache.num_free_slots == 4


def test_step_logits_equal_a_full_forward(model):
    """A step mixing decodes, a whole prompt and a prompt chunk gives the logits of full forwards."""
    prompts = prompts_of([6, 11, 30])
    engine = Engine(model, None, EngineConfig(max_num_batched_tokens=20, page_size=4, num_pages=64))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request("a", prompts[0], params)
    engine.add_request("b", prompts[1], params)
    engine.step()  # both prompts whole
    engine.add_request("c", prompts[2], params)
    captured = {}
    hook = model.lm_head.register_forward_hook(lambda module, args, logits: captured.update(logits=logits[0]))
    outputs = engine.step()  # a and b decode, c's first 18 tokens
    hook.remove()
    assert [o.request_id for o in outputs] == ["a", "b"]
    with torch.no_grad():
        for row, output in enumerate(outputs):
            seq = prompts[0 if output.request_id == "a" else 1]
            first = model(torch.tensor([seq])).logits[0, -1].argmax().item()
            full = model(torch.tensor([seq + [first]])).logits[0, -1]
            assert torch.allclose(captured["logits"][row], full, atol=1e-4, rtol=1e-4)
    while engine.has_unfinished():
        engine.step()


def test_logits_indices_select_positions(model):
    ids = torch.tensor([prompts_of([9])[0]])
    with torch.no_grad():
        full = model(ids).logits
        picked = model(ids, logits_indices=torch.tensor([2, 8])).logits
    assert torch.allclose(picked, full[:, [2, 8]], atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model(ids, logits_to_keep=1, logits_indices=torch.tensor([0]))


def test_offline_api_from_a_checkpoint(tmp_path):
    llm = LLM(tiny_checkpoint(tmp_path), max_num_seqs=4, page_size=8, num_pages=64)
    tokenizer = byte_tokenizer()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    results = llm.generate(["Hello, world", [5, 6, 7, 8]], params)
    assert [r.prompt_token_ids for r in results] == [tokenizer.encode("Hello, world").ids, [5, 6, 7, 8]]
    for r in results:
        assert len(r.token_ids) == 8 and r.finish_reason == "length"
        assert r.text == tokenizer.decode(r.token_ids)
        assert [lp.token_id for lp in r.logprobs] == r.token_ids
        assert all(len(lp.top) == 3 and lp.top[0][1] >= lp.logprob for lp in r.logprobs)
    single = llm.generate("Hello, world", params)  # one prompt: a string or a list of ids
    assert single[0].token_ids == results[0].token_ids
    with pytest.raises(InvalidRequest, match="empty"):
        llm.generate(["fine", ""], params)
    assert not llm.engine.has_unfinished()  # all or nothing


def test_seeded_sampling_ignores_the_batch_and_options_apply(model):
    engine = Engine(model, byte_tokenizer(), EngineConfig(page_size=8, num_pages=128))
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, min_p=0.05, seed=5, ignore_eos=True)
    prompt = prompts_of([7])[0]
    alone = run(engine, {0: [("x", prompt, seeded)]})["x"]
    others = [(str(i), p, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, repetition_penalty=1.3,
                                         presence_penalty=0.5, frequency_penalty=0.5))
              for i, p in enumerate(prompts_of([5, 9, 3], seed=2))]
    crowded = run(engine, {0: others[:2], 1: [("x", prompt, seeded)], 2: others[2:]})
    assert crowded["x"] == alone
    assert all(len(tokens) == 12 for tokens in crowded.values())
    heavy = SamplingParams(max_tokens=30, temperature=0, repetition_penalty=100.0, ignore_eos=True)
    tokens = run(engine, {0: [("r", prompt, heavy)]})["r"]
    assert len(set(tokens)) == len(tokens)  # a huge repetition penalty never repeats a token


def test_stops(model):
    engine = Engine(model, byte_tokenizer(), EngineConfig(page_size=8, num_pages=64))
    prompt = prompts_of([5])[0]
    free = generate(model, [prompt], max_new_tokens=12, temperature=0)[0]
    eos = SamplingParams(max_tokens=12, temperature=0)
    engine.model.config.eos_token_id = free[4]
    try:
        engine.scheduler.eos_token_ids = {free[4]}
        assert run(engine, {0: [("e", prompt, eos)]})["e"] == free[:free.index(free[4])]
    finally:
        engine.model.config.eos_token_id = 0
    engine.scheduler.eos_token_ids = {0}
    by_token = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[free[6]])
    assert run(engine, {0: [("t", prompt, by_token)]})["t"] == free[:free.index(free[6])]
    text = byte_tokenizer().decode(free)
    stop = text[5:7]
    engine.add_request("s", prompt, SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
    pieces, reason = [], None
    while engine.has_unfinished():
        for output in engine.step():
            pieces.append(output.text)
            reason = output.finish_reason
    assert "".join(pieces) == text[:text.index(stop)] and reason == "stop"


def test_abort_frees_the_cache_and_bad_requests_are_named(model):
    engine = Engine(model, None, EngineConfig(page_size=4, num_pages=32, max_num_seqs=3))
    engine.add_request("a", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats()["running"] == 2
    engine.abort("a")
    engine.abort("nonexistent")
    assert engine.stats()["running"] == 1 and engine.scheduler.cache.num_free_slots == 2
    assert engine.abort_all() == ["b"] and engine.scheduler.cache.num_free_pages == 32 and not engine.has_unfinished()
    for prompt, params, field in [([], SamplingParams(), "prompt"), ([1, 10**6], SamplingParams(), "prompt"),
                                  ("text", SamplingParams(), "prompt"),  # no tokenizer
                                  ([1] * 128, SamplingParams(), "prompt"),  # the whole context
                                  ([1] * 100, SamplingParams(max_tokens=29), "max_tokens"),
                                  ([1], SamplingParams(stop=["x"]), "stop")]:
        with pytest.raises(InvalidRequest) as error:
            engine.add_request("bad", prompt, params)
        assert error.value.param == field
    with pytest.raises(InvalidRequest) as error:
        SamplingParams(top_p=0)
    assert error.value.param == "top_p"


def test_cache_sizing_and_capture_sizes():
    config = tiny_model().config
    info = model_info(config, torch.float32)
    memory = 10 * info.state_bytes_per_sequence + 100 * 16 * info.kv_bytes_per_token
    size = size_cache(config, torch.float32, memory, max_num_seqs=10, page_size=16, max_model_len=4096)
    assert (size.num_slots, size.num_pages) == (10, 100)
    assert size_cache(config, torch.float32, memory, 1000, page_size=16, max_model_len=4096).num_slots < 1000
    capped = size_cache(config, torch.float32, memory, max_num_seqs=2, page_size=16, max_model_len=64)
    assert (capped.num_slots, capped.num_pages) == (2, 8)  # two sequences of 64 tokens use no more
    with pytest.raises(ValueError, match="cannot hold"):
        size_cache(config, torch.float32, info.state_bytes_per_sequence, 1, page_size=16, max_model_len=4096)
    sizes = capture_sizes(512)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 512 and sizes == sorted(set(sizes))
    assert all(b <= 1.25 * a for a, b in zip(sizes[6:], sizes[7:]))  # from 32 on
    assert capture_sizes(100)[-1] == 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_experts_equal_the_loop(dtype):
    g = torch.Generator().manual_seed(0)
    E, hidden, inter = 5, 32, 16
    gate, up = (torch.randn(E, inter, hidden, generator=g).to(dtype) for _ in range(2))
    down = torch.randn(E, hidden, inter, generator=g).to(dtype)
    counts = torch.tensor([3, 0, 7, 1, 0])
    x = torch.randn(int(counts.sum()), hidden, generator=g).to(dtype)
    scales = torch.rand(len(x), generator=g)
    loop = grouped_glu_loop(x, gate, up, down, counts, scales)
    grouped = grouped_glu_grouped_mm(x, gate, up, down, counts, scales)
    first = F.linear(F.silu(F.linear(x[:3], gate[0])) * F.linear(x[:3], up[0]), down[0]) * scales[:3, None]
    assert torch.allclose(loop[:3].float(), first.float(), rtol=2e-2, atol=2e-2 * first.float().abs().max().item())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grouped.float(), loop.float(), rtol=tol, atol=tol * loop.float().abs().max().item())


def graph_and_eager_tokens(model) -> list[dict[str, list[int]]]:
    """The greedy tokens of the same requests on a GPU engine with CUDA graphs, then without."""
    prompts = prompts_of([5, 33, 12, 60, 2])
    results = []
    for graphs in (True, False):
        engine = Engine(model, None, EngineConfig(max_num_seqs=8, page_size=16, num_pages=64, cuda_graphs=graphs))
        assert (engine.runner.graphs is not None) == graphs
        greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        results.append(run(engine, {0: [(str(i), p, greedy) for i, p in enumerate(prompts)]}))
    return results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager():
    graphs, eager = graph_and_eager_tokens(tiny_model().to("cuda", torch.bfloat16))
    assert graphs == eager


def test_scheduler_preempts_the_newest_and_resumes_it_first():
    cache = CacheManager(fixed_cache_size(num_slots=4, num_pages=6, page_size=4, max_model_len=24))
    scheduler = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=[0], watermark=0.0)
    seqs = [Sequence(str(i), [1] * 8, 8, SamplingParams(), arrival=i) for i in range(3)]

    def chunks(output):
        return [(chunk.seq, chunk.num_tokens) for chunk in output.chunks]

    for seq in seqs[:2]:
        scheduler.add(seq)
    output = scheduler.schedule()
    assert chunks(output) == [(seqs[0], 8), (seqs[1], 8)]  # 4 of the 6 pages
    assert output.changes.new_slots == [1, 2] and len(output.changes.new_pages) == 4
    scheduler.update(output, [2, 2], [None, None])  # both prompts done, one token sampled each
    scheduler.add(seqs[2])
    output = scheduler.schedule()
    assert chunks(output) == [(seqs[0], 1), (seqs[1], 1)]  # a page each; none left to admit seqs[2]
    assert scheduler.waiting == [seqs[2]]
    for _ in range(4):  # decode until the next token needs a 4th page
        scheduler.update(output, [3] * len(output.sampled), [None] * len(output.sampled))
        output = scheduler.schedule()
    assert chunks(output) == [(seqs[0], 1)]  # seqs[1], the newest running, made room
    assert scheduler.waiting == [seqs[1], seqs[2]] and seqs[1].num_computed == 0 and scheduler.num_preemptions == 1
    [finished] = scheduler.update(output, [0], [None])  # an end-of-text token finishes seqs[0]
    assert finished.finish_reason == "stop" and seqs[0].status.value == "finished"
    output = scheduler.schedule()
    assert chunks(output) == [(seqs[1], 13), (seqs[2], 8)]  # recomputed whole, before the newer one
    assert cache.num_free_slots == 2 and cache.num_free_pages == 0
