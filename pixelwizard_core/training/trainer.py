"""The training loop: AdamW, gradient clipping, EMA, checkpoints and resume around the shortcut objective.

Every random draw of a run (branch, timesteps, step sizes, noise, CFG dropout, clip windows, degradation)
comes from one ``torch.Generator`` per rank that is saved in each checkpoint, and the data order is a
function of the step, so a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.hr import STEP_SIZE_CONDITIONING_KEY
from .checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    TrainingState,
    load_training_state,
    read_weights_into,
    save_checkpoint,
)
from .ema import EMA
from .objective import ShortcutObjective, TrainingBatch
from .sharding import World, full_tensor

log = logging.getLogger("pixelwizard")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and EMA options; defaults from the reference's 4K config (lr, betas, EMA) and its
    default config (weight decay), gradient clipping at 1.0 as its trainer does."""

    lr: float = 5e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0   # max gradient norm; 0 turns clipping off
    ema_decay: float = 0.99  # 0 turns EMA off
    ema_start: int = 10

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"AdamW betas must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip and weight_decay must be >= 0")


class Trainer:
    """Owns the optimiser, EMA and generator of one rank; ``train_step`` does one update."""

    def __init__(self, model: nn.Module, objective: ShortcutObjective, optim: OptimConfig = OptimConfig(), *,
                 seed: int = 0, world: World = World(), generator_device: torch.device | str = "cpu",
                 metadata: dict[str, Any] | None = None) -> None:
        self.model = model
        self.objective = objective
        self.optim_config = optim
        self.world = world
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.ema = EMA(optim.ema_decay, optim.ema_start)
        # one stream per rank (the reference seeds seed + rank): ranks see different t, dt and noise
        self.generator = torch.Generator(device=generator_device).manual_seed(seed * 1_000_003 + world.rank)
        self.step = 0
        self.metadata = {"optim": asdict(optim), **(metadata or {})}

    def train_step(self, batch: TrainingBatch) -> dict[str, float]:
        """One optimiser update; returns the logged values."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.objective.loss(self.model, batch, self.generator)
        loss.backward()
        if self.optim_config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.optim_config.grad_clip)
            logs["grad_norm"] = float(full_tensor(norm))
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        logs["loss"] = float(loss.detach())
        return logs

    def fit(self, batches: Callable[[int], TrainingBatch], steps: int, *, output_dir: str | Path | None = None,
            save_every: int = 0, keep_last: int = 0, export_pt: bool = False, log_every: int = 1,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """Train until ``steps`` updates in total; ``batches(step)`` gives the batch of a step. Saves every
        ``save_every`` steps and at the end when ``output_dir`` is set."""
        while self.step < steps:
            logs = self.train_step(batches(self.step))
            if on_step is not None:
                on_step(self.step, logs)
            if log_every and self.step % log_every == 0 and self.world.is_main:
                log.info("step %d | %s", self.step, " ".join(f"{k}={v:.5g}" for k, v in sorted(logs.items())))
            at_end = self.step == steps
            if output_dir is not None and ((save_every and self.step % save_every == 0) or at_end):
                self.save(output_dir, keep_last=keep_last, export_pt=export_pt)

    # --- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> TrainingState:
        return TrainingState(self.step, self.optimizer, self.generator, self.objective.state())

    def save(self, output_dir: str | Path, *, keep_last: int = 0, export_pt: bool = False) -> Path:
        metadata = {**self.metadata, "objective": self.objective.config.to_dict()}
        metadata.setdefault(STEP_SIZE_CONDITIONING_KEY, getattr(self.model, "step_size_conditioning", ""))
        return save_checkpoint(output_dir, self.model, self.ema.shadow, self._state(), rank=self.world.rank,
                               world_size=self.world.world_size, metadata=metadata, export_pt=export_pt,
                               keep_last=keep_last)

    def resume(self, folder: str | Path, *, load_weights: bool = True) -> int:
        """Load weights (unless the model was built from this checkpoint already), EMA, optimiser moments,
        generator and step from a checkpoint folder."""
        folder = Path(folder)
        if load_weights:
            read_weights_into(folder / MODEL_FILE, dict(self.model.state_dict()))
        if (folder / EMA_FILE).is_file():
            params = dict(self.model.named_parameters())
            shadow = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items() if p.requires_grad}
            full = dict(self.model.state_dict())
            read_weights_into(folder / EMA_FILE, {**full, **shadow})
            # frozen entries were read into the live weights again (same values); keep the shadows only
            self.ema.shadow = shadow
        state = self._state()
        load_training_state(folder, self.model, state, rank=self.world.rank, world_size=self.world.world_size)
        self.step = state.step
        self.objective.load_state(state.objective_state)
        if self.world.is_main:
            log.info("resumed from %s at step %d", folder, self.step)
        return self.step
