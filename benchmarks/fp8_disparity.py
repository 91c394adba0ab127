"""FP8 serving's log-prob disparity against bf16: teacher-forced log-probs of held-out windows under a
checkpoint's bf16 weights, then under the same weights quantized to blockwise e4m3 (`quantize_weights`,
what `--quantization fp8` does at load).

    python benchmarks/fp8_disparity.py CHECKPOINT TOKENIZED [--device cuda|cpu]

TOKENIZED: a folder of `ringlinear tokenize` (or a train run's data/); its val.npy gives 32 windows of
256 tokens spread over the split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ringlinear import RingLinearForCausalLM, SequenceContext
from ringlinear.model.fp8 import quantize_weights
from ringlinear.ops.policy import KernelPolicy
from ringlinear.sampling import token_logprobs

WINDOWS, WINDOW_TOKENS = 32, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("tokenized")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    val_path = Path(args.tokenized, "val.npy")
    if not val_path.exists():
        parser.error(f"no val.npy in {args.tokenized}")
    device = torch.device(args.device)
    try:
        model = RingLinearForCausalLM.from_pretrained(args.checkpoint, device=device, dtype=torch.bfloat16).eval()
        val = np.load(val_path)
    except (OSError, ValueError) as error:  # a missing checkpoint, a bad config, a file that is not an array
        parser.error(str(error).splitlines()[0])
    if val.ndim != 1 or len(val) <= WINDOW_TOKENS:
        parser.error(f"{val_path} must hold more than {WINDOW_TOKENS} token ids in one dimension")
    starts = np.linspace(0, len(val) - WINDOW_TOKENS - 1, WINDOWS).astype(int)
    ids = torch.tensor(np.stack([val[s:s + WINDOW_TOKENS + 1] for s in starts]).astype(np.int64), device=device)
    policy = KernelPolicy("triton" if device.type == "cuda" else "torch").resolve(device)

    @torch.no_grad()
    def logprobs() -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(ids[:, :-1], context=SequenceContext(policy=policy)).logits.flatten(0, 1)
        return token_logprobs(logits, ids[:, 1:].flatten(), 0)[0].float(), logits.argmax(-1)

    bf16, bf16_greedy = logprobs()
    quantize_weights(model, policy)
    fp8, fp8_greedy = logprobs()
    gap = (fp8 - bf16).abs()
    print(f"tokens {gap.numel()}, mean log-prob bf16 {bf16.mean():.4f} fp8 {fp8.mean():.4f}; |Δ log-prob| mean "
          f"{gap.mean():.4f}, p99 {gap.quantile(0.99):.4f}, max {gap.max():.4f}; greedy tokens equal "
          f"{(bf16_greedy == fp8_greedy).float().mean():.4f}")


if __name__ == "__main__":
    main()
