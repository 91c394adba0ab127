"""Training: the trainer (one process, or many under torchrun with FSDP2), its schedules, validation,
checkpoints and metrics, and WSM checkpoint merging."""

from .config import TrainConfig
from .evaluate import evaluate
from .parallel import resolve_device
from .schedule import LearningRate, Stages
from .trainer import Trainer, TrainingDiverged, TrainResult, build_optimizer, train

__all__ = ["LearningRate", "Stages", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "build_optimizer",
           "evaluate", "resolve_device", "train"]
