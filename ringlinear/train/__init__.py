"""Training: the single-device loop, its schedule, evaluation and checkpoints (and WSM merging)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate
from .schedule import WarmupStableDecay
from .trainer import TrainConfig, TrainResult, build_optimizer, resolve_device, train

__all__ = ["TrainConfig", "TrainResult", "WarmupStableDecay", "build_optimizer", "evaluate", "load_checkpoint",
           "resolve_device", "save_checkpoint", "train"]
