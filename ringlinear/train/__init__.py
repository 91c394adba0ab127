"""Training: the trainer (one process, or many under torchrun with FSDP2), its schedules, validation,
checkpoints and metrics, and WSM checkpoint merging."""

from .config import TrainConfig
from .evaluate import evaluate
from .optimizer import StepOutcome, build_optimizer, optimizer_step
from .parallel import resolve_device
from .schedule import LearningRate, Stages
from .trainer import Trainer, TrainingDiverged, TrainResult, train

__all__ = ["LearningRate", "Stages", "StepOutcome", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged",
           "build_optimizer", "evaluate", "optimizer_step", "resolve_device", "train"]
