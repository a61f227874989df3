"""Shortcut training of the HR model (research baseline): objective, trainer, checkpoints, data.

Entry points: :class:`ShortcutConfig` / :class:`ShortcutObjective` (the loss), :class:`Trainer`
(AdamW, EMA, checkpoints, resume), :func:`build_training_model`, :class:`TrainingData`, and the
``train`` command in :mod:`.cli`. :mod:`.toy` is a problem with a known answer for evidence.
"""

from .objective import ShortcutConfig, ShortcutObjective, TrainingBatch
from .schedule import TrainingGrid, calibration_weights, dt_candidates, index_probabilities
from .trainer import OptimConfig, Trainer

__all__ = [
    "OptimConfig",
    "ShortcutConfig",
    "ShortcutObjective",
    "Trainer",
    "TrainingBatch",
    "TrainingGrid",
    "calibration_weights",
    "dt_candidates",
    "index_probabilities",
]
