"""The chunked linear cross-entropy against F.cross_entropy over the full logits."""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ringlinear.ops import cross_entropy
from ringlinear.ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy


def test_loss_and_gradients_equal_the_full_logits_ones(monkeypatch):
    monkeypatch.setattr(cross_entropy, "LOGITS_PER_CHUNK", 7 * 50)  # 7 rows a chunk: several chunks
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[[0, 8, 29]] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets)
    (2.5 * loss).backward()
    got = loss.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (2.5 * expected).backward()
    assert torch.allclose(got[0], expected, atol=1e-12)
    assert torch.allclose(got[1], hidden.grad, atol=1e-12)
    assert torch.allclose(got[2], weight.grad, atol=1e-12)


def test_no_gradient_work_without_grad(monkeypatch):
    """Without a gradient to take, each chunk costs one product (its logits), not the three that also
    make the gradients of the hidden states and the head; the loss is the same either way."""
    monkeypatch.setattr(cross_entropy, "LOGITS_PER_CHUNK", 2 * 10)  # 2 rows a chunk: 2 chunks of the 4 rows
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    targets = torch.tensor([1, 2, IGNORE_INDEX, 3])
    logits_flops = 2 * 4 * 8 * 10  # [4, 8] @ [8, 10]
    losses = []
    for grad, products in ((False, 1), (True, 3)):
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as flops:
            losses.append(linear_cross_entropy(hidden, weight, targets))
        assert flops.get_total_flops() == products * logits_flops
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(losses[0], expected) and torch.equal(losses[0], losses[1].detach())
