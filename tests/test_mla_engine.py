"""The engine with an MLA model (`tiny-mla`): the latent pages, and its output against the model's
own greedy decode under batching, chunked prefill and preemption (also with its MTP layer drafting),
against a float64 full forward (the absorbed attention against the decompressed form), against itself
without the prefix cache, and with parallel sampling's forks."""

import pytest
import torch
from infer_helpers import tiny_model
from test_engine import graph_and_eager_tokens, prompts_of, run
from test_prefix_cache import CONVERSATION, engine_of, serve, tokens
from test_spec_drafters import check_two_rounds_of_chain_drafts
from test_spec_engine import MTP, MTP_TREE, ForcedTreeDrafter, record_paths
from test_spec_engine import serve as serve_with_logprobs

from ringlinear.generate import generate
from ringlinear.infer import Engine, EngineConfig, SamplingParams
from ringlinear.info import model_info
from ringlinear.ops.paged_latent_attention import DECOMPRESS_MIN_QUERIES

SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_nextn_predict_layers": 0}
MTP_MODEL = {**SMALL, "num_nextn_predict_layers": 1}


@pytest.fixture(scope="module")
def model():
    return tiny_model(preset="tiny-mla", **SMALL)


def test_latent_pages_hold_the_latent_and_rope_key_per_token(model):
    engine = Engine(model, None, EngineConfig(max_num_seqs=2, page_size=4, num_pages=10))
    config, cache = model.config, engine.runner.cache
    assert cache.kv.shape == (2, 11, 4, config.kv_lora_rank + config.qk_rope_head_dim)  # layers 2 and 5
    per_token = cache.kv[:, 1:].numel() * cache.kv.element_size() // engine.runner.cache.size.capacity_tokens
    assert per_token == model_info(config, torch.float32).kv_bytes_per_token == 2 * (64 + 32) * 4
    with pytest.raises(ValueError, match="batch_invariant"):
        Engine(model, None, EngineConfig(batch_invariant=True, page_size=16, num_pages=10))


def test_greedy_equals_generate_under_batching_chunking_and_preemption(model):
    prompts = prompts_of([3, 45, 17, 70])
    new = 6
    expected = [generate(model, [p], max_new_tokens=new, temperature=0)[0] for p in prompts]
    greedy = SamplingParams(max_tokens=new, temperature=0)
    # 16-token steps chunk the longer prompts; 24 pages of 4 tokens hold about 2 sequences
    engine = Engine(model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=24))
    arrivals = {0: [("0", prompts[0], greedy), ("1", prompts[1], greedy)], 2: [("2", prompts[2], greedy)],
                4: [("3", prompts[3], greedy)]}
    outputs = run(engine, arrivals)
    assert [outputs[str(i)] for i in range(len(prompts))] == expected
    assert engine.stats()["preemptions"] > 0
    assert engine.scheduler.cache.num_free_pages == 24


def test_mtp_drafter_keeps_latents_and_drafts_as_the_layer_run_from_scratch():
    """The MTP layer is an MLA layer: the drafter's cache keeps its latent and rope key per verified
    position, and its drafts over two rounds are those of the layer rerun over everything it has seen."""
    model = tiny_model(preset="tiny-mla", **MTP_MODEL).double()
    config = model.config
    cache = check_two_rounds_of_chain_drafts(model)
    assert cache.keys.shape == (1, 23, config.kv_lora_rank)
    assert cache.values.shape == (1, 23, config.qk_rope_head_dim)


@pytest.mark.parametrize("spec", [MTP, MTP_TREE, "forced tree"])
def test_mtp_drafts_on_mla_keep_the_greedy_output(spec):
    """MTP chains and trees, verified several tokens a step on the latent pages and mostly rejected
    (random weights), and trees whose accepted paths leave the first branch (their latents move to
    consecutive positions), leave the model's own greedy decode unchanged under batching, chunking and
    preemption."""
    model = tiny_model(preset="tiny-mla", **MTP_MODEL)
    prompts = prompts_of([7, 20, 12])
    new = 12
    expected = [generate(model, [p], max_new_tokens=new, temperature=0)[0] for p in prompts]
    greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=0)
    arrivals = {0: [("0", prompts[0], greedy), ("1", prompts[1], greedy)], 3: [("2", prompts[2], greedy)]}
    config = dict(max_num_seqs=3, max_num_batched_tokens=12, page_size=4, num_pages=11)
    plain = serve_with_logprobs(Engine(model, None, EngineConfig(**config)), arrivals)
    engine = Engine(model, None, EngineConfig(**config, speculative_config=MTP if spec == MTP else MTP_TREE))
    if spec == "forced tree":
        engine.speculator = ForcedTreeDrafter({str(i): tokens for i, tokens in enumerate(expected)})
    paths = record_paths(engine)
    outputs = serve_with_logprobs(engine, arrivals)
    assert [outputs[str(i)][0] for i in range(len(prompts))] == expected
    for request_id, (_, logprobs) in plain.items():  # a verify row's numbers are its decode step's
        spec_logprobs = torch.tensor([lp.logprob for lp in outputs[request_id][1]])
        assert torch.allclose(spec_logprobs, torch.tensor([lp.logprob for lp in logprobs]), atol=1e-4)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["spec_draft_tokens"] > 15
    assert spec != "forced tree" or [2, 4, 5] in paths
    assert engine.scheduler.cache.num_free_pages == 11


@pytest.mark.parametrize("lengths, step_tokens", [((21, 6), 16), ((300, 150), 160)])
def test_engine_steps_equal_the_decompressed_full_forward(model, lengths, step_tokens):
    """Prefill chunks, a whole prompt beside them and decodes give the logits of the training forward
    (keys and values decompressed into heads). Short chunks attend in the absorbed form (the float64
    comparison of the two forms is test_paged_latent_attention's); chunks of DECOMPRESS_MIN_QUERIES
    tokens or more decompress their context (the second case: a's two chunks, the second after a
    cached prefix, then b's last 130 tokens beside a's decodes)."""
    assert step_tokens < DECOMPRESS_MIN_QUERIES or min(step_tokens, lengths[0] - step_tokens) >= DECOMPRESS_MIN_QUERIES
    prompts = {"a": prompts_of([lengths[0]])[0], "b": prompts_of([lengths[1]], seed=2)[0]}
    engine = Engine(model, None, EngineConfig(max_num_batched_tokens=step_tokens, page_size=4,
                                              num_pages=sum(lengths) // 4 + 8))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    captured = []
    hook = model.lm_head.register_forward_hook(lambda module, args, logits: captured.append(logits[0]))
    engine.add_request("a", prompts["a"], params)
    assert engine.step() == []  # a's first 16 tokens
    engine.add_request("b", prompts["b"], params)
    compared = 0
    while engine.has_unfinished():
        outputs = engine.step()  # a's last tokens and b (whole, or its first part), then decodes
        step_logits = captured[-1]
        for row, output in enumerate(outputs):
            with torch.no_grad():
                full = model(torch.tensor([prompts[output.request_id]])).logits[0, -1]
            assert ((step_logits[row] - full).norm() / full.norm()).item() < 1e-5
            prompts[output.request_id] = prompts[output.request_id] + output.token_ids
            compared += 1
    hook.remove()
    assert compared == 6


def test_prefix_cache_hits_give_the_tokens_of_misses(model):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    cached_engine = engine_of(model, True)
    cached = serve(cached_engine, CONVERSATION, params)
    plain = serve(engine_of(model, False), CONVERSATION, params)
    for request_id, (ids, logprobs) in plain.items():
        assert cached[request_id][0] == ids, request_id
        assert torch.allclose(torch.tensor(cached[request_id][1]), torch.tensor(logprobs), atol=1e-5)
    assert cached_engine.stats()["prefix_cache_hits"] > 0


def test_parallel_samples_fork_the_partial_latent_page(model):
    prompt = tokens(13, 5)  # ends inside a page of 4: the forks copy it
    engine = engine_of(model, False)
    engine.add_request("r", prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True, n=3))
    forked: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while engine.has_unfinished():
        for output in engine.step():
            forked[output.index] += output.token_ids
    assert engine.stats()["prompt_tokens"] == len(prompt)
    for index in range(3):  # completion i is the request seeded seed + i
        alone = SamplingParams(max_tokens=6, temperature=1.0, seed=7 + index, ignore_eos=True)
        assert forked[index] == serve(engine_of(model, False), [[("s", prompt)]], alone)["s"][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager():
    """On the GPU: the Triton latent kernel (split keys) replayed from CUDA graphs gives the tokens of
    eager steps."""
    graphs, eager = graph_and_eager_tokens(tiny_model(preset="tiny-mla", **SMALL).to("cuda", torch.bfloat16))
    assert graphs == eager
