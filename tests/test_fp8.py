"""Blockwise FP8: quantization against a float64 definition, the Triton kernels (through the interpreter
on a CPU) against the references, and the FP8 linear layer's forward and backward."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import INTERPRET
from infer_helpers import tiny_checkpoint
from safetensors.torch import load_file
from test_train import read_metrics, small_run

from ringlinear import RingLinearForCausalLM
from ringlinear.infer import LLM, EngineConfig, SamplingParams
from ringlinear.ops.fp8 import (
    E4M3,
    dequantize,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_linear,
    quantize_blocks,
    quantize_rows,
)
from ringlinear.ops.fp8.reference import (
    gemm_reference,
    quantize_blocks_reference,
    quantize_rows_reference,
    to_e4m3,
)
from ringlinear.ops.moe import routed_experts
from ringlinear.ops.policy import KernelPolicy, experts_kernel, fp8_gemm_kernel, fp8_grouped_gemm_kernel
from ringlinear.train import train
from ringlinear.train.config import PRECISIONS

DEVICE = "cpu" if INTERPRET else "cuda"
# fp32 products of the codes: exact but for fp32 rounding through the interpreter; Hopper's FP8 tensor-core
# products keep about 14 bits while they accumulate a 128-wide block (DeepSeek-V3 §3.3.2), and the kernels
# promote each block to fp32, so the error is one block's (measured 5e-5 to 1.3e-4 on the H200)
GEMM_TOLERANCE = 1e-6 if INTERPRET else 5e-4
TORCH, TRITON = KernelPolicy("torch", fp8=True), KernelPolicy("triton", fp8=True)


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """float64 v rounded to the nearest e4m3 value, ties to even, saturated at ±448: steps of 2^(e-3) in
    the binade [2^e, 2^(e+1)), and 2^-9 below the smallest normal 2^-6."""
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    step = torch.exp2(exponent - 3)
    return (torch.round(v / step) * step).clamp(-448, 448)  # torch.round: half to even


def quantize64(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, in float64: blocks of `rows` × 128 (partial blocks at the ends), scale = fp32(amax/448)
    (1 for a zero block), code = e4m3(fp32(x / scale)) — both divisions correctly rounded to fp32, as the
    kernels compute them. Returns the codes' values and the scales, both float64."""
    M, K = x.shape
    x = x.double()
    codes, scales = torch.empty_like(x), torch.empty(-(-M // rows), -(-K // 128), dtype=torch.float64)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = x[i * rows:(i + 1) * rows, j * 128:(j + 1) * 128]
            scale = (block.abs().max() / 448).float().double()
            scale = scale if scale > 0 else torch.tensor(1.0, dtype=torch.float64)
            scales[i, j] = scale
            codes[i * rows:(i + 1) * rows, j * 128:(j + 1) * 128] = round_e4m3((block / scale).float().double())
    return codes, scales


def sample(M: int, K: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Normal values with outliers, a zero block, and a block mixing a large value with tiny ones (so
    that codes fall into e4m3's subnormal range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(2 * torch.randn(M, 1, generator=g))
    x[:128, :128] = 0
    x[-1, -5:] = torch.tensor([1e3, 1e-3, -3e-4, 2e-5, 7e-6])
    return x.to(dtype)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_e4m3_saturates_and_rounds_to_even():
    x = torch.tensor([449.0, 470.0, 500.0, -1e6, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10])
    assert to_e4m3(x, torch.tensor(1.0)).float().tolist() == [448, 448, 448, -448, 1.0, 1.25, 0, 2.0**-8]


@pytest.mark.parametrize("shape", [(130, 300), (3, 384)])
def test_reference_quantization_is_the_float64_definition(shape):
    x = sample(*shape)
    for (q, s), rows in ((quantize_rows_reference(x), 1), (quantize_blocks_reference(x), 128)):
        codes, scales = quantize64(x, rows)
        assert q.dtype == E4M3 and torch.equal(s.double(), scales) and torch.equal(q.double(), codes)
        assert s[0, 0] == 1 and (q[:128, :128].float() == 0).all()  # the zero block: scale 1, codes 0
    q, s = quantize_rows_reference(x)
    assert rel(dequantize(q, s), x) < 0.04


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kernels_match_the_reference(dtype):
    x = sample(130, 300, dtype).to(DEVICE)
    for ours, ref in ((quantize_rows(x, TRITON), quantize_rows_reference(x)),
                      (quantize_rows(x.t(), TRITON), quantize_rows_reference(x.t())),  # transposed, read in place
                      (quantize_blocks(x, TRITON), quantize_blocks_reference(x))):
        assert torch.equal(ours[1], ref[1]) and torch.equal(ours[0].view(torch.uint8), ref[0].view(torch.uint8))


def test_quantize_kernels_round_where_a_cast_could_round_otherwise():
    """Values whose e4m3 rounding carries into the next binade (124.5 -> 128, 7.9 -> 8), one just above a
    midpoint that a cast through fp16 would round to the tie's even side (1.0625 + 2^-12 -> 1.125), a
    subnormal, the largest code and signed zeros; 448 in the block makes its scale 1."""
    edge = torch.tensor([448.0, 124.5, -124.5, 7.9, 1.0625 + 2.0**-12, -(1.0625 + 2.0**-12), 3 * 2.0**-10, -0.0,
                         -2.0**-12, 0.0])
    x = torch.zeros(2, 128)
    x[:, :edge.numel()] = edge
    q, s = quantize_rows(x.to(DEVICE), TRITON)
    assert s.tolist() == [[1.0], [1.0]]
    assert q[0, :edge.numel()].float().tolist() == [448, 128, -128, 8, 1.125, -1.125, 2.0**-8, 0, 0, 0]
    assert torch.equal(q.view(torch.uint8).cpu(), quantize_rows_reference(x)[0].view(torch.uint8))


@pytest.mark.parametrize("b_blocks", [128, 1])
def test_gemm_kernel_matches_the_reference(b_blocks):
    a, b = sample(70, 300, seed=1).to(DEVICE), sample(200, 300, seed=2).to(DEVICE)
    qa, sa = quantize_rows(a, TORCH)
    qb, sb = quantize_blocks(b, TORCH) if b_blocks == 128 else quantize_rows(b, TORCH)
    exact = dequantize(qa, sa).double() @ dequantize(qb, sb).double().t()
    assert rel(gemm_reference(qa, sa, qb, sb, torch.float32), exact) < 1e-6
    assert fp8_gemm_kernel(TRITON, qa, qb) == ("triton" if INTERPRET else fp8_gemm_kernel(TRITON, qa, qb))
    assert rel(fp8_gemm(qa, sa, qb, sb, torch.float32, TRITON), exact) < GEMM_TOLERANCE
    assert rel(fp8_gemm(qa, sa, qb, sb, torch.bfloat16, TRITON), exact) < 4e-3


@pytest.mark.parametrize("policy", [TORCH, TRITON], ids=["torch", "triton"])
def test_fp8_linear_forward_and_backward(policy):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 75, 256, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(160, 256, generator=g) * 0.05).to(DEVICE).requires_grad_()
    bias = torch.randn(160, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(2, 75, 160, generator=g).to(DEVICE)
    y = fp8_linear(x, w, bias, policy=policy)
    y.backward(dy)
    rows, dy2 = x.detach().reshape(-1, 256), dy.reshape(-1, 160)

    def product(a, a_rows, b, b_rows):  # a @ bᵀ of the operands as quantized by the recipe, in float64
        qa, sa = quantize_rows(a, TORCH)
        qb, sb = quantize_rows(b, TORCH) if b_rows == 1 else quantize_blocks(b, TORCH)
        return dequantize(qa, sa).double() @ dequantize(qb, sb).double().t()

    tolerance = 1e-6 if policy is TORCH else GEMM_TOLERANCE
    assert rel(y - bias, product(rows, 1, w.detach(), 128).view_as(y)) < tolerance
    assert rel(x.grad.reshape(-1, 256), product(dy2, 1, w.detach().t(), 128)) < tolerance  # dgrad: dy per 1×128, wᵀ
    assert rel(w.grad, product(dy2.t(), 1, rows.t(), 1)) < tolerance  # wgrad: both along the tokens
    assert torch.allclose(bias.grad, dy2.sum(0), rtol=1e-5, atol=1e-5)
    # and all of it close to the exact layer: FP8's relative error is a few percent
    exact = torch.nn.functional.linear(rows.double(), w.detach().double())
    assert rel(y - bias, exact.view_as(y)) < 0.05
    assert rel(w.grad, dy2.double().t() @ rows.double()) < 0.05


def test_e4m3_weights_multiply_as_stored():
    x, w = sample(9, 256, seed=4), sample(130, 256, seed=5) * 0.01
    qw, sw = quantize_blocks(w, TORCH)
    assert torch.equal(fp8_linear(x, qw, weight_scale=sw, policy=TORCH), fp8_linear(x, w, policy=TORCH))
    with pytest.raises(ValueError, match="weight_scale"):
        fp8_linear(x, qw, policy=TORCH)


def test_fp8_and_invariant_are_exclusive():
    with pytest.raises(ValueError, match="fp8"):
        KernelPolicy(invariant=True, fp8=True)


def test_fp8_training_tracks_bf16(tmp_path):
    """A few steps of a small model, on the references: FP8's losses stay within a percent of the
    full-precision run's, and the checkpoint keeps its fp32 master weights."""
    runs = {p: train(small_run(tmp_path / p, precision=p, steps=6, eval_interval=6)) for p in PRECISIONS}
    losses = {p: [m["loss"] for m in read_metrics(tmp_path / p) if "loss" in m] for p in PRECISIONS}
    learned = {p: losses[p][0] - losses[p][-1] for p in PRECISIONS}
    assert len(losses["fp8"]) == 6 and learned["bf16"] > 0.02 and learned["fp8"] > 0.5 * learned["bf16"]
    for bf16, fp8 in zip(losses["bf16"], losses["fp8"]):
        assert abs(fp8 - bf16) < 0.01 * bf16
    assert losses["fp8"] != losses["bf16"]  # the products did change
    assert abs(runs["fp8"].val_bpb - runs["bf16"].val_bpb) < 0.01 * runs["bf16"].val_bpb
    assert next(runs["fp8"].model.parameters()).dtype == torch.float32


def test_fp8_serving_tracks_bf16_and_fp8_checkpoints_round_trip(tmp_path):
    """`quantization="fp8"` converts a bf16-or-fp32 checkpoint at load: greedy tokens and log-probs close to
    the unquantized engine's. Saved, the FP8 model is a checkpoint in vLLM's block-FP8 layout that loads
    back as FP8, bit for bit."""
    checkpoint = tiny_checkpoint(tmp_path / "full")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    prompts = ["def main():\n    return", [5, 6, 7, 8, 9, 10]]
    engines = {q: LLM(checkpoint, max_num_seqs=2, page_size=8, num_pages=32, quantization=q) for q in ("none", "fp8")}
    full, fp8 = (engines[q].generate(prompts, params) for q in ("none", "fp8"))
    for a, b in zip(full, fp8):  # the log-probs of the full-precision engine's tokens under both models
        ids, tokens = torch.tensor([a.prompt_token_ids + a.token_ids]), torch.tensor(a.token_ids)[:, None]
        with torch.no_grad():
            logprobs = [e.engine.model(ids.to(e.engine.device)).logits[0, len(a.prompt_token_ids) - 1:-1]
                        .log_softmax(-1).cpu().gather(-1, tokens) for e in engines.values()]
        assert torch.allclose(logprobs[0][:, 0], torch.tensor([lp.logprob for lp in a.logprobs]), atol=1e-4)
        # a random tiny model, six layers of FP8 rounding: within 3% of the log-probs (about -4.6 each)
        assert (logprobs[1] - logprobs[0]).abs().max() < 0.15 and not torch.equal(logprobs[1], logprobs[0])
        assert len(b.token_ids) == 6 and b.logprobs[0].logprob <= 0
    model = engines["fp8"].engine.model
    model.save_pretrained(tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    expert = "model.layers.1.mlp.experts.3.up_proj"
    assert stored[f"{expert}.weight"].dtype == E4M3 and stored[f"{expert}.weight_scale_inv"].shape == (1, 2)
    assert stored["model.layers.0.attention.dense.weight_scale_inv"].dtype == torch.float32
    assert stored["lm_head.weight"].dtype == stored["model.word_embeddings.weight"].dtype == torch.float32
    loaded = RingLinearForCausalLM.from_pretrained(tmp_path / "fp8")
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), loaded.state_dict().items()):  # ours on the GPU
        assert ours.dtype == theirs.dtype and torch.equal(ours.cpu().view(torch.uint8), theirs.view(torch.uint8)), name
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4").validate()


def e4m3_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights [E, N, K] as serving stores them: codes [E, N, K] and 128×128 scales [E, ·, ·]."""
    pairs = [quantize_blocks(w_e, TORCH) for w_e in w.unbind()]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


@pytest.mark.parametrize("policy", [TORCH, TRITON], ids=["torch", "triton"])
def test_grouped_gemm_multiplies_each_experts_rows_by_its_weights(policy):
    """Uneven experts: two empty ones (one last), one of 130 rows (two row tiles), and the others starting
    off the 128-row grid; K and N not multiples of 128."""
    counts = torch.tensor([130, 0, 1, 127, 40, 0])
    K, N = 200, 192
    a = sample(int(counts.sum()), K, seed=6).to(DEVICE)
    qa, sa = quantize_rows(a, TORCH)
    qb, sb = e4m3_experts(torch.randn(len(counts), N, K, generator=torch.Generator().manual_seed(7)).to(DEVICE))
    sizes = counts.tolist()
    exact = torch.cat([dequantize(q, s).double() @ dequantize(w, ws).double().t()
                       for q, s, w, ws in zip(qa.split(sizes), sa.split(sizes), qb, sb)])
    assert fp8_grouped_gemm_kernel(policy, qa) == ("reference" if policy is TORCH else "triton")
    out = fp8_grouped_gemm(qa, sa, qb, sb, counts.to(DEVICE), torch.float32, policy)
    assert out.shape == (a.shape[0], N)
    tolerance = 1e-6 if policy is TORCH else GEMM_TOLERANCE
    for rows, want in zip(out.split(sizes), exact.split(sizes)):  # each expert alone: none can hide in the sum
        if rows.shape[0]:
            assert rel(rows, want) < tolerance
    empty = fp8_grouped_gemm(qa[:0], sa[:0], qb, sb, torch.zeros_like(counts).to(DEVICE), torch.float32, policy)
    assert empty.shape == (0, N)


@pytest.mark.parametrize("activation", ["silu", "powlu"])
def test_grouped_fp8_experts_give_the_expert_loops_numbers(activation):
    """routed_experts with e4m3 weights: without autograd the grouped FP8 GEMMs, with it the expert loop of
    fp8_linear. Both quantize each row per 1×128 block alone and add the same 128-wide block products in
    the same order, so only the summation inside a block's product could differ: the interpreter's
    (numpy's) gives the same bits for the loop's tiles and the grouped ones (observed: equal), and a GPU's
    FP8 MMA keeps a block's partial sums at about 14 bits (GEMM_TOLERANCE), which the bf16 rounding of the
    products and h's requantization could turn into a few bf16 ulps."""
    g = torch.Generator().manual_seed(8)
    tokens, E, k, hidden, inter = 140, 6, 2, 256, 128
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, torch.bfloat16)
    # expert 0 takes every token (two row tiles), expert 3 none; the others' rows start off the tile grid
    experts = torch.stack([torch.zeros(tokens, dtype=torch.long),
                           torch.tensor([1, 2, 4, 5])[torch.randint(0, 4, (tokens,), generator=g)]], 1).to(DEVICE)
    weights = (torch.rand(tokens, k, generator=g) + 0.5).to(DEVICE)
    full = [(torch.randn(E, n, m, generator=g) * m**-0.5).to(DEVICE)
            for n, m in ((inter, hidden), (inter, hidden), (hidden, inter))]
    codes, weight_scales = zip(*map(e4m3_experts, full))
    policy = KernelPolicy("triton")
    with torch.no_grad():
        assert experts_kernel(policy, x, *codes, token_order=True) == "fp8_grouped"
        grouped = routed_experts(x, weights, experts, *codes, policy, activation, weight_scales)
        with pytest.raises(ValueError, match="weight_scales"):
            routed_experts(x, weights, experts, *codes, policy, activation)
    x_grad = x.clone().requires_grad_()
    assert experts_kernel(policy, x_grad, *codes, token_order=True) == "fp8_loop"
    loop = routed_experts(x_grad, weights, experts, *codes, policy, activation, weight_scales)
    assert grouped.dtype == torch.bfloat16 and grouped.shape == x.shape
    assert torch.equal(grouped, loop) if INTERPRET else rel(grouped, loop) < 1e-2
    # and both close to the experts of the dequantized weights in fp32, without FP8 activations
    dequantized = [torch.stack([dequantize(q, s) for q, s in zip(q_e, s_e)]) for q_e, s_e in zip(codes, weight_scales)]
    exact = routed_experts(x.float(), weights, experts, *dequantized, KernelPolicy("torch"), activation)
    assert rel(grouped, exact) < 0.06  # x and h rounded to e4m3 (3 mantissa bits): 4.3% observed


def test_e4m3_experts_take_the_grouped_gemms_on_triton_without_autograd():
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    codes, master = torch.zeros(2, 128, 128, dtype=E4M3), torch.zeros(2, 128, 128, dtype=torch.bfloat16)
    triton = KernelPolicy("triton")
    for policy, weights, kernel in ((triton, codes, "fp8_grouped"), (TRITON, codes, "fp8_grouped"),
                                    (TRITON, master, "fp8_loop"),  # training FP8: quantized on every call
                                    (KernelPolicy("torch"), codes, "fp8_loop"),
                                    (KernelPolicy(), codes, "fp8_loop"),  # "auto" on the CPU: the torch backend
                                    (KernelPolicy("triton", invariant=True), codes, "fp8_loop")):
        for token_order in (False, True):
            assert experts_kernel(policy, x, weights, token_order=token_order) == kernel
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, requires_grad=False)  # all it reads
    assert experts_kernel(KernelPolicy(), cuda, codes, token_order=True) == "fp8_grouped"
    trained = x.clone().requires_grad_()
    assert experts_kernel(triton, trained, codes) == "fp8_loop"
    with torch.no_grad():  # a leaf that asks for gradients, in a forward that makes none
        assert experts_kernel(triton, trained, codes) == "fp8_grouped"
    assert fp8_grouped_gemm_kernel(triton, codes[0]) == "triton"
    assert fp8_grouped_gemm_kernel(KernelPolicy(), codes[0]) == "reference"
