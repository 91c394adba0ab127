"""Kernels behind the model, each with a readable PyTorch reference beside it."""

from .lightning import lightning_attn, lightning_decode

__all__ = ["lightning_attn", "lightning_decode"]
