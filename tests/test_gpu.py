"""The model on CUDA with the Triton kernels, against itself on the PyTorch reference path.
Skipped without a GPU; run on one with `python -m pytest -q tests/test_gpu.py`."""

import pytest
import torch
import torch.nn.functional as F
from infer_helpers import tiny_model
from test_batch_invariant import check_engine_equals_training

from ringlinear import HybridCache, RingLinearConfig, RingLinearForCausalLM, SequenceContext
from ringlinear.infer import LLM, Engine, EngineConfig, SamplingParams
from ringlinear.infer.graphs import StepGraphs
from ringlinear.ops import lightning_attn, lightning_decode
from ringlinear.ops.attention import causal_attention
from ringlinear.ops.policy import COMPILE_MIN_ELEMENTS, KernelPolicy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model(dtype, **overrides):
    """Dense MLPs only: a routing choice flipped by one rounding would swamp the attention-kernel
    differences these tests look for."""
    torch.manual_seed(0)
    config = RingLinearConfig.preset("tiny", head_dim=128, num_attention_heads=4, hidden_size=512,
                                     **{"first_k_dense_replace": 6, **overrides})
    return RingLinearForCausalLM(config).to("cuda", dtype)


def test_varlen_flash_attention_matches_the_masked_reference():
    cu = torch.tensor([0, 100, 101, 357, 512], device="cuda")
    q = torch.randn(1, 512, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 512, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 512, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    o = causal_attention(q, k, v, 128**-0.5, cu_seqlens=cu)
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = causal_attention(*ref_inputs, 128**-0.5, cu_seqlens=cu)
    assert rel(o, ref) < 1e-2
    grad = torch.randn_like(ref)
    o.backward(grad.bfloat16())
    ref.backward(grad)
    for x, r in zip((q, k, v), ref_inputs):
        assert rel(x.grad, r.grad) < 2e-2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_prefill_then_decode_equals_the_full_forward(dtype, tol):
    m = model(dtype).eval()
    ids = torch.randint(0, m.config.vocab_size, (4, 300), device="cuda")
    with torch.no_grad():
        full = m(ids).logits
        cache = HybridCache(m.config, 4, 320, device="cuda", dtype=dtype)
        pieces = [m(ids[:, :257], context=cache).logits]
        pieces += [m(ids[:, t:t + 1], context=cache).logits for t in range(257, 300)]
    assert rel(torch.cat(pieces, 1), full) <= tol


def test_training_step_with_triton_matches_the_reference_path():
    m = model(torch.bfloat16).train()
    ids = torch.randint(0, m.config.vocab_size, (1, 1000), device="cuda")
    cu = torch.tensor([0, 1, 300, 300, 777, 1000], device="cuda")
    results = []
    for backend in ("triton", "torch"):
        m.zero_grad()
        out = m(ids, labels=ids, context=SequenceContext(cu, KernelPolicy(backend)))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss_t, grads_t), (loss_r, grads_r) = results
    assert abs(loss_t.item() - loss_r.item()) < 1e-2
    for name, g in grads_r.items():
        assert rel(grads_t[name], g) < 5e-2, name


def test_packed_documents_equal_separate_runs():
    m = model(torch.bfloat16).eval()
    lengths = [130, 1, 64, 400]
    docs = [torch.randint(0, m.config.vocab_size, (1, n), device="cuda") for n in lengths]
    cu = torch.tensor([0, 130, 131, 195, 595], device="cuda")
    with torch.no_grad():
        packed = m(torch.cat(docs, 1), context=SequenceContext(cu)).logits
        alone = torch.cat([m(d).logits for d in docs], 1)
    assert rel(packed, alone) < 2e-2


def test_recurrent_lightning_gives_a_sequence_the_same_bits_however_it_is_run():
    """Batch-invariant mode on the Triton kernels, at a real head size: each sequence alone equals it
    packed with the others, in a padded [B, T] batch, and as a prefill chunk then decode steps with
    the others (a shrinking decode batch) against a state pool; outputs and final states."""
    H, D, dtype = 16, 128, torch.bfloat16
    lengths = [1000, 1, 517, 64, 999, 250, 0, 731]
    gen = torch.Generator().manual_seed(0)
    seqs = [[torch.randn(1, n, H, D, generator=gen).to("cuda", dtype) for _ in range(3)] for n in lengths]
    g = -torch.linspace(0.02, 0.7, H, device="cuda")
    aligned = KernelPolicy(invariant=True)
    with torch.no_grad():
        alone = [lightning_attn(*x, g, output_final_state=True, policy=aligned) for x in seqs]
        runs = {}
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
        o, final = lightning_attn(*(torch.cat(xs, 1) for xs in zip(*seqs)), g, output_final_state=True, cu_seqlens=cu,
                                  policy=aligned)
        runs["packed"] = o[0].split(lengths), final
        T = max(lengths)
        o, final = lightning_attn(*(torch.cat([F.pad(x, (0, 0, 0, 0, 0, T - x.shape[1])) for x in xs])
                                    for xs in zip(*seqs)), g, output_final_state=True, policy=aligned)
        runs["[B, T]"] = [o[b, :n] for b, n in enumerate(lengths)], [f if n == T else None for f, n in
                                                                     zip(final, lengths)]
        # the engine: prefill the first halves packed from slots of a pool, then decode the rest
        pool = torch.zeros(len(lengths) + 3, H, D, D, device="cuda")
        slots = torch.arange(len(lengths), device="cuda") + 2
        prefill = [n // 2 for n in lengths]
        cu = torch.tensor([0, *torch.tensor(prefill).cumsum(0).tolist()], device="cuda")
        o, final = lightning_attn(*(torch.cat([x[:, :p] for x, p in zip(xs, prefill)], 1) for xs in zip(*seqs)),
                                  g, initial_state=pool[slots], output_final_state=True, cu_seqlens=cu, policy=aligned)
        pool[slots] = final
        outputs = [[o_n] for o_n in o[0].split(prefill)]
        for t in range(min(prefill), T):
            running = [b for b, (p, n) in enumerate(zip(prefill, lengths)) if p <= t < n]
            if not running:
                continue
            step = [torch.cat([seqs[b][i][0, t:t + 1] for b in running]) for i in range(3)]
            o = lightning_decode(*step, g, pool, slots[running], policy=aligned)
            for j, b in enumerate(running):
                outputs[b].append(o[j:j + 1])
        runs["prefill + decode"] = [torch.cat(x) for x in outputs], pool[slots]
    for name, (outs, finals) in runs.items():
        for b, ((o_alone, s_alone), o, s) in enumerate(zip(alone, outs, finals)):
            assert torch.equal(o, o_alone[0]), (name, b)
            assert s is None or torch.equal(s, s_alone[0]), (name, b)


@pytest.mark.parametrize("dtype,batch_size,step_tokens", [
    (dtype, batch, 16) for dtype in (torch.float32, torch.bfloat16) for batch in (1, 8, 64)] + [
    (torch.bfloat16, 256, 512)])
def test_aligned_engine_log_probs_equal_the_training_forward(batch_size, dtype, step_tokens, monkeypatch):
    """tests/test_batch_invariant.py's check on the GPU: Triton kernels, up to 64 sequences per step (256,
    arriving at once, in steps of 512 tokens: prompt chunks of many rows beside decodes, then decode steps of
    more than 64 sequences). In bf16 the decode steps replay CUDA graphs (captured in invariant mode: no host
    sync), padded to the captured sizes with rows that must leave the real rows' bits alone."""
    replayed = []
    run = StepGraphs.run
    monkeypatch.setattr(StepGraphs, "run", lambda self, plan, chunks, batch: replayed.append(
        (batch.num_seqs, sorted(self.shapes[()].graphs))) or run(self, plan, chunks, batch))
    lengths = [14, 13, 15, 12, 30, 29, 11, 10] if batch_size <= 8 else [10 + 7 * i % 25 for i in range(batch_size)]
    check_engine_equals_training(tiny_model(num_hidden_layers=3).to("cuda", dtype), batch_size, lengths, step_tokens,
                                 arrivals_per_step=256 if batch_size == 256 else 1)
    assert bool(replayed) == (dtype == torch.bfloat16)
    if dtype == torch.bfloat16 and batch_size >= 64:
        assert any(n not in sizes for n, sizes in replayed)  # some replays ran padding rows
    if batch_size == 256:
        assert max(n for n, _ in replayed) > 64


def test_aligned_steps_never_wait_for_the_host():
    """An aligned engine's forwards (prefill chunks beside decodes, then decodes; graphs off, so that
    every step runs the model) under CUDA's sync check: no kernel choice or launch size reads the
    device. The first step is let through: it checks each layer's decay once."""
    m = tiny_model(num_hidden_layers=3).to("cuda", torch.bfloat16)
    engine = Engine(m, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=24, page_size=16, num_pages=32,
                                          batch_invariant=True, cuda_graphs=False))
    forwards = []

    def strict(module, args):
        if forwards:
            torch.cuda.set_sync_debug_mode("error")

    def relaxed(module, args, output):
        torch.cuda.set_sync_debug_mode("default")
        forwards.append(args[0].shape[1])

    m.register_forward_pre_hook(strict)
    m.register_forward_hook(relaxed)
    prompts = [[5, 9, 2, 7, 1] * k for k in (1, 3, 8)]
    try:
        outputs = LLM(engine).generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(o.token_ids) == 8 for o in outputs)
    assert max(forwards) > 3 and min(forwards) < 3  # steps with prefill chunks, and decode-only steps


def test_fused_chains_match_their_eager_ops():
    """Norms, RoPE, SwiGLU and PowLU compiled on large CUDA activations against the same functions run
    op by op (the torch backend's policy), forward and gradients; PowLU's gates reach ±64."""
    from ringlinear.model.layers import apply_rotary, rms_norm
    from ringlinear.ops.fused import glu

    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, D = COMPILE_MIN_ELEMENTS // 2048, 16, 128
    x = torch.randn(1, T, H * D, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn_like(x, requires_grad=True)
    weight = torch.rand(H * D, device="cuda", generator=g, dtype=torch.bfloat16)
    angles = torch.rand(1, T, 64, device="cuda", generator=g) * 100
    scales = torch.rand(T, device="cuda", generator=g)
    cases = {
        "rms_norm": lambda policy: rms_norm(x, weight, 1e-6, policy=policy),
        "gated group norm": lambda policy: rms_norm(x, weight, 1e-6, 4, gate, policy=policy),
        "rope": lambda policy: apply_rotary(x.view(1, T, H, D), angles.cos(), angles.sin(), policy=policy),
        "swiglu": lambda policy: glu(x[0], gate[0], scales, "silu", policy=policy),
        "powlu": lambda policy: glu(x[0], gate[0] * 16, scales, "powlu", policy=policy),
    }
    for name, run in cases.items():
        fused = run(KernelPolicy())
        grads = torch.autograd.grad(fused.float().square().sum(), (x, gate), allow_unused=True)
        eager = run(KernelPolicy("torch"))
        eager_grads = torch.autograd.grad(eager.float().square().sum(), (x, gate), allow_unused=True)
        assert rel(fused, eager) < 1e-2, name
        for a, b in zip(grads, eager_grads):
            assert (a is None) == (b is None) and (a is None or rel(a, b) < 2e-2), name


def test_the_torch_backend_runs_no_triton_kernel_and_no_grouped_gemm(monkeypatch):
    """EngineConfig(backend="torch") on CUDA is the PyTorch references: with every Triton entry point
    and torch._grouped_mm made to fail it still serves (greedy, bf16, MoE layers), as the fast engine does."""
    import ringlinear.ops.lightning.chunk as chunk
    import ringlinear.ops.lightning.decode as decode
    import ringlinear.ops.paged_attention.kernel as paged

    m = tiny_model().to("cuda", torch.bfloat16)
    prompts = [[5, 9, 2, 7, 1] * k for k in (1, 3, 8)]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def tokens(engine):
        return [c.token_ids for c in LLM(engine).generate(prompts, greedy)]

    fast = tokens(Engine(m, None, EngineConfig(max_num_seqs=4, page_size=16, num_pages=32)))

    def forbidden(*args, **kwargs):
        raise AssertionError("a fast kernel ran under the torch backend")

    for module, name in ((chunk, "lightning_attn_triton"), (decode, "lightning_decode_triton"),
                         (paged, "paged_attention_triton"), (torch, "_grouped_mm")):
        monkeypatch.setattr(module, name, forbidden)
    engine = Engine(m, None, EngineConfig(max_num_seqs=4, page_size=16, num_pages=32, backend="torch"))
    assert engine.runner.graphs is None
    reference = tokens(engine)
    assert all(len(t) == 8 for t in reference)
    # the same function, up to bf16 rounding (a greedy choice may flip; unrelated outputs agree 1 in 257)
    assert sum(a == b for x, y in zip(fast, reference) for a, b in zip(x, y)) >= 0.5 * sum(map(len, fast))


def test_packed_prefill_with_max_seqlen_needs_no_host_sync_and_can_be_captured():
    # what the engine's prefill calls: packed sequences continuing from states, final states out
    offsets = [0, 1, 300, 1000, 1000, 3000]
    cu = torch.tensor(offsets, device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(1, 3000, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = -torch.tensor([0.5, 0.1, 0.01, 0.001], device="cuda")
    h0 = torch.randn(5, 4, 128, 128, device="cuda")

    def prefill():
        return lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, max_seqlen=2000)

    expected = lightning_attn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)  # reads cu
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, ht = prefill()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(o, expected[0]) and torch.equal(ht, expected[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = prefill()
    q.copy_(torch.randn_like(q))
    graph.replay()
    fresh = prefill()
    assert torch.equal(captured[0], fresh[0]) and torch.equal(captured[1], fresh[1])


def test_draft_trees_on_the_triton_kernels_emit_the_plain_greedy_output():
    """Verify steps on CUDA (the tree verify and fold kernels, tree-masked paged attention, the
    accepted paths' keys and values moved): fp32, so that a verify row and a decode step, summed in
    different orders, pick the same argmax. A forced drafter's paths leave the first branch; the
    MTP head's top-k tree (random weights) is mostly rejected."""
    from test_spec_engine import MTP_TREE, ForcedTreeDrafter, prompts_of, record_paths, serve

    target = model(torch.float32, num_nextn_predict_layers=1, vocab_size=257)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = prompts_of([6, 40, 300, 17], seed=4)
    arrivals = {0: [(str(i), p, greedy) for i, p in enumerate(prompts[:3])], 2: [("3", prompts[3], greedy)]}
    config = {"max_num_seqs": 4, "max_num_batched_tokens": 256, "page_size": 16, "num_pages": 64}
    plain = {r: t for r, (t, _) in serve(Engine(target, None, EngineConfig(**config)), arrivals).items()}
    forced = Engine(target, None, EngineConfig(**config, speculative_config=MTP_TREE))
    forced.speculator = ForcedTreeDrafter(plain)
    paths = record_paths(forced)
    assert {r: t for r, (t, _) in serve(forced, arrivals).items()} == plain and [2, 4, 5] in paths
    mtp = Engine(target, None, EngineConfig(**config, speculative_config=MTP_TREE))
    assert {r: t for r, (t, _) in serve(mtp, arrivals).items()} == plain
    assert mtp.stats()["spec_draft_tokens"] > 0


@pytest.mark.parametrize("case", ["mtp chain", "forced tree", "forced tree, invariant", "ngram ragged"])
def test_verify_steps_replayed_from_cuda_graphs_give_the_eager_engines_output(case, monkeypatch):
    """bf16 with graphs: verify steps (every sequence verifying a tree of the configured shape) replay
    CUDA graphs, padded to the captured sizes, as decode steps do; the MTP drafter reads the replayed
    hidden states; the forced trees' accepted paths leave the first branch (the fold reads the graph's
    keys and values); n-gram chains of every length and a penalised request's plain decodes share
    steps padded to the configured chain. Greedy tokens equal those of the same engine without
    graphs; in invariant mode the log-probs of every token are the plain engine's bits."""
    from test_spec_engine import MTP, NGRAM, ForcedTreeDrafter, prompts_of, serve

    replayed = []
    run = StepGraphs.run
    monkeypatch.setattr(StepGraphs, "run", lambda self, plan, chunks, batch: replayed.append(
        (len(chunks), plan[0], {len(c.drafts) for c in chunks})) or run(self, plan, chunks, batch))
    target = model(torch.bfloat16, num_nextn_predict_layers=1, vocab_size=257)
    invariant, forced, ngram = case.endswith("invariant"), case.startswith("forced"), case.startswith("ngram")
    forced_spec = {**MTP, "num_speculative_tokens": 5, "speculative_token_tree": str(ForcedTreeDrafter.shape)}
    spec = forced_spec if forced else MTP
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
    prompts = prompts_of([6, 40, 300], seed=4)
    arrivals = {0: [(str(i), p, greedy) for i, p in enumerate(prompts)]}
    if ngram:  # five tokens scored: the output repeats, and n-gram chains of every length meet a penalised decode
        with torch.no_grad():
            target.lm_head.weight[5:] = 0
        spec = NGRAM
        arrivals[0][2] = ("2", prompts[2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0,
                                                          repetition_penalty=1.3))
    config = {"max_num_seqs": 4, "max_num_batched_tokens": 512, "page_size": 16, "num_pages": 64,
              "batch_invariant": invariant}
    plain = serve(Engine(target, None, EngineConfig(**config)), arrivals)
    outputs = {}
    for graphs in (True, False):
        engine = Engine(target, None, EngineConfig(**config, speculative_config=spec, cuda_graphs=graphs))
        if forced:
            engine.speculator = ForcedTreeDrafter({r: t for r, (t, _) in plain.items()})
        replayed.clear()
        outputs[graphs] = serve(engine, arrivals)
        verify_replays = [(n, lengths) for n, shape, lengths in replayed if shape]
        assert bool(verify_replays) == graphs and (not graphs or 3 in [n for n, _ in verify_replays])  # padded to 4
        assert not (graphs and ngram) or any(0 in lengths and len(lengths) > 1 for _, lengths in verify_replays)
        assert engine.stats()["spec_accepted_tokens"] > 0 or not (forced or ngram)
    assert {r: t for r, (t, _) in outputs[True].items()} == {r: t for r, (t, _) in outputs[False].items()}
    if invariant:
        for request_id, (tokens, logprobs) in plain.items():
            spec_tokens, spec_logprobs = outputs[True][request_id]
            assert spec_tokens == tokens
            assert torch.equal(torch.tensor([lp.logprob for lp in spec_logprobs]),
                               torch.tensor([lp.logprob for lp in logprobs]))


def test_fp8_engines_replay_decode_steps_from_cuda_graphs(monkeypatch):
    """A bf16 MoE model served with FP8 weights (quantized at load): the routed experts run as grouped FP8
    GEMMs, never the per-expert loop (a host sync), so decode steps replay CUDA graphs; greedy tokens equal
    the same engine's without graphs."""
    import ringlinear.ops.moe as moe

    def no_loop(*args, **kwargs):
        raise AssertionError("the FP8 experts' loop ran: e4m3 weights should take the grouped GEMMs")

    monkeypatch.setattr(moe, "grouped_glu_fp8", no_loop)
    replayed = []
    run = StepGraphs.run
    monkeypatch.setattr(StepGraphs, "run", lambda self, plan, chunks, batch: replayed.append(len(chunks))
                        or run(self, plan, chunks, batch))
    target = model(torch.bfloat16, first_k_dense_replace=1, vocab_size=257).eval()
    prompts = [[1 + (7 * i + n) % 250 for i in range(n)] for n in (5, 40, 200)]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    tokens = {}
    for graphs in (True, False):  # the first engine quantizes the model in place; the second serves it as it is
        replayed.clear()
        engine = Engine(target, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, page_size=16,
                                                   num_pages=64, quantization="fp8", cuda_graphs=graphs))
        assert (engine.runner.graphs is not None) == graphs
        tokens[graphs] = [out.token_ids for out in LLM(engine).generate(prompts, greedy)]
        assert bool(replayed) == graphs
    assert target.model.layers[1].mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("M,N,K", [(128, 512, 2048), (256, 2048, 512), (384, 640, 1536), (4096, 2048, 2048)])
def test_cublas_blockwise_fp8_matches_the_exact_product(M, N, K):
    """cuBLAS's blockwise recipes (`scaled_mm_blockwise`: the routed experts' shapes where their rows are a
    multiple of 128, an N of 5 blocks and a K of 12, a dense product) against the float64 product
    of the dequantized operands, beside the Triton GEMM, both rounded to bf16; the probe that lets the policy
    take cuBLAS passes, and a K that is not a multiple of 512 goes to Triton."""
    from ringlinear.ops.fp8 import dequantize
    from ringlinear.ops.fp8.gemm import scaled_mm_blockwise
    from ringlinear.ops.fp8.kernels import gemm_triton
    from ringlinear.ops.fp8.reference import quantize_blocks_reference, quantize_rows_reference
    from ringlinear.ops.policy import blockwise_scaled_mm_works, fp8_gemm_kernel

    if torch.cuda.get_device_capability() != (9, 0) or tuple(map(int, torch.version.cuda.split(".")[:2])) < (12, 9):
        pytest.skip("cuBLAS's blockwise FP8 needs Hopper and CUDA ≥ 12.9")
    assert blockwise_scaled_mm_works(torch.device("cuda"))
    a = torch.empty(128, 384, dtype=torch.float8_e4m3fn, device="cuda")
    assert fp8_gemm_kernel(KernelPolicy("triton"), a, a) == "triton"  # 3 K blocks: cuBLAS refuses them
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = torch.randn(M, K, device="cuda", generator=g), torch.randn(N, K, device="cuda", generator=g)
    qa, sa = quantize_rows_reference(a)
    for qb, sb in (quantize_blocks_reference(b), quantize_rows_reference(b)):
        exact = dequantize(qa, sa).double() @ dequantize(qb, sb).double().t()
        for name, gemm in (("cublas", scaled_mm_blockwise), ("triton", gemm_triton)):
            assert rel(gemm(qa, sa, qb, sb, torch.bfloat16), exact) < 4e-3, (name, sb.shape)  # bf16 rounding
