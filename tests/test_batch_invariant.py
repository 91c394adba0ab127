"""Batch-invariant mode: the engine's log-probs (chunked prefill, decode, preemption, other requests
in the step) equal the training forward's bit for bit, whatever else is in either batch; and the
mode computes the same function as the fast path."""

import pytest
import torch
from infer_helpers import tiny_model

from ringlinear import SequenceContext
from ringlinear.infer import Engine, EngineConfig, SamplingParams
from ringlinear.ops.batch_invariant import numerics
from ringlinear.ops.policy import KernelPolicy
from ringlinear.sampling import token_logprobs

ALIGNED = KernelPolicy(invariant=True)

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=3)  # Lightning, Lightning + MoE, softmax + MoE


def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 257, (n,), generator=g).tolist() for n in lengths]


def engine_rollouts(model, prompts, batch_size, step_tokens=16, arrivals_per_step=1):
    """Tokens and log-probs of sampled continuations; requests arrive `arrivals_per_step` a step, steps of
    `step_tokens` chunk the prompts, and 5 pages of 16 tokens for 8 sequences force preemption."""
    engine = Engine(model, None, EngineConfig(max_num_seqs=batch_size, max_num_batched_tokens=step_tokens, page_size=16,
                                              num_pages=5 if batch_size == 8 else max(64, 4 * batch_size),
                                              batch_invariant=True))
    results = {i: [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=NEW_TOKENS, seed=i, logprobs=0, ignore_eos=True))
        if (i + 1) % arrivals_per_step:
            continue
        for output in engine.step():
            results[int(output.request_id)] += output.logprobs
    while engine.has_unfinished():
        for output in engine.step():
            results[int(output.request_id)] += output.logprobs
    if batch_size == 8:
        assert engine.stats()["preemptions"] > 0
    return [([lp.token_id for lp in r], torch.tensor([lp.logprob for lp in r])) for r in results.values()]


def training_logprobs(model, sequences):
    """Log-probs of every token after the first, from one right-padded [B, T] training forward."""
    T = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in sequences], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids, context=SequenceContext(policy=ALIGNED)).logits[:, :-1]
        with numerics(ALIGNED):
            logp = token_logprobs(logits.flatten(0, 1), ids[:, 1:].flatten(), 0)[0].view(len(sequences), T - 1)
    return [logp[b, :len(s) - 1].cpu() for b, s in enumerate(sequences)]


@pytest.mark.parametrize("batch_size", [1, 3, pytest.param(8, marks=pytest.mark.slow)])
def test_engine_log_probs_equal_the_training_forward_bit_for_bit(model, batch_size):
    check_engine_equals_training(model, batch_size, [14, 13, 15, 12, 30, 29, 11, 10][:max(batch_size, 2)])


def test_steps_of_many_rows_keep_the_training_forwards_bits(model):
    """24 sequences in steps of 96 tokens: every product runs over several of the torch backend's 16-row
    blocks, and a step holds all the sequences' decodes or prompt chunks beside them."""
    check_engine_equals_training(model, 24, [10 + 7 * i % 25 for i in range(24)], step_tokens=96)


def check_engine_equals_training(model, batch_size, prompt_lengths, step_tokens=16, arrivals_per_step=1):
    """Engine rollouts of prompts of these lengths with `batch_size` sequences at most per step (and
    `step_tokens` tokens, `arrivals_per_step` new requests); then their log-probs from training forwards
    of each sequence alone and of all of them in one padded batch with other sequences around
    (tests/test_gpu.py runs it on CUDA)."""
    prompts = prompts_of(prompt_lengths, seed=8)
    rollouts = engine_rollouts(model, prompts, batch_size, step_tokens, arrivals_per_step)
    sequences = [p + tokens for p, (tokens, _) in zip(prompts, rollouts)]
    others = [p + [1, 2, 3] for p in prompts_of([9, 50, 14], seed=99)]
    alone = [training_logprobs(model, [s])[0] for s in sequences]
    mixed = training_logprobs(model, others[:1] + sequences[::-1] + others[1:])[1:-2][::-1]
    for prompt, (_, engine_logp), a, m in zip(prompts, rollouts, alone, mixed):
        assert torch.equal(a[len(prompt) - 1:], engine_logp)
        assert torch.equal(m[len(prompt) - 1:], engine_logp)


def test_the_mode_computes_the_same_function(model):
    """Logits of a batch and of packed documents agree with the fast path to fp32 rounding."""
    ids = torch.randint(1, 257, (2, 37), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, 20, 37])
    with torch.no_grad():
        fast = [model(ids).logits, model(ids[:1], context=SequenceContext(cu_seqlens)).logits]
        invariant = [model(ids, context=SequenceContext(policy=ALIGNED)).logits,
                     model(ids[:1], context=SequenceContext(cu_seqlens, ALIGNED)).logits]
    for a, b in zip(invariant, fast):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_a_products_bits_do_not_follow_its_operands_layout():
    """A lone decode query against a key block (keys [T, KB, KV, D] gathered, then heads moved
    forward): with T = 1 a reshape keeps the strided view, with more queries it copies. BLAS picks
    its kernel by the layout, so the blocks must be made contiguous for the bits to agree."""
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(5, 16, 1, 64, generator=g), torch.randn(5, 16, 16, 64, generator=g).transpose(1, 2)
    with numerics(ALIGNED):
        together = q @ keys.transpose(-1, -2)
        alone = [q[t:t + 1] @ keys[t:t + 1].transpose(-1, -2) for t in range(5)]
    assert all(torch.equal(a[0], together[t]) for t, a in enumerate(alone))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_takes_the_lower_index_of_equal_values_and_sorts(dtype, largest):
    """The invariant topk against a Python stable sort of each row: values drawn from a few, so that
    most are tied, with -0.0 beside +0.0 (equal), infinities and fp32 subnormals; over either dim, and
    a row alone equals it among the others."""
    pool = torch.tensor([0.0, -0.0, 1.5, -1.5, 2.0, float("inf"), float("-inf"), 3e-40, -3e-40])
    x = pool[torch.randint(0, len(pool), (6, 200), generator=torch.Generator().manual_seed(1))].to(dtype)

    def reference(row: list[float], k: int) -> list[int]:
        return sorted(range(len(row)), key=lambda i: (-row[i] if largest else row[i], i))[:k]

    with numerics(ALIGNED):
        none = x.topk(0, largest=largest)
        rows, columns = x.topk(30, largest=largest), torch.topk(x, 4, dim=0, largest=largest)
        alone = [x[r:r + 1].topk(30, largest=largest) for r in range(6)]
    assert none.values.shape == none.indices.shape == (6, 0) and none.indices.dtype == torch.long
    for r in range(6):
        expected = reference(x[r].tolist(), 30)
        assert rows.indices[r].tolist() == expected and torch.equal(rows.values[r], x[r, expected])
        assert torch.equal(alone[r].indices[0], rows.indices[r])
    for c in range(200):
        assert columns.indices[:, c].tolist() == reference(x[:, c].tolist(), 4)


def test_topk_puts_nan_where_a_stable_sort_does():
    x = torch.tensor([[1.0, float("nan"), -float("nan"), float("inf"), 0.0, -0.0, float("nan")]])
    for largest in (True, False):
        with numerics(ALIGNED):
            top = x.topk(7, largest=largest)
        values, indices = x.sort(descending=largest, stable=True)
        assert torch.equal(top.indices, indices) and top.values.isnan().equal(values.isnan())
