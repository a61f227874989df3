"""The shortcut training objective of the HR model: flow-matching and self-consistency batches.

One optimisation step is either all flow matching (FM: dt = 0, target noise - x0) or, with probability
``sc_rate``, all self-consistency (SC): the model at (x_T, T, dt) is regressed onto the mean of two
half steps of itself, v(x_T, T, dt/2) and v(x_mid, T - dt/2, dt/2), computed without gradient.
See :mod:`.schedule` for the samplers and weights. Every knob is a field of :class:`ShortcutConfig`,
so an ablation (uniform index sampling, no calibration, another beta or power) is one option.

The model is any callable ``model(x, t, context, dt=dt, anchor=anchor) -> velocity`` (``WanHRDiT``, or
the toy model of :mod:`.toy`), so the toy evidence runs exactly this code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import ConfigError
from .schedule import (
    CALIBRATION_REFERENCES,
    INDEX_SAMPLINGS,
    SpanReference,
    TrainingGrid,
    calibration_weights,
    index_probabilities,
    noise_span,
    sample_self_consistency,
)

TIMESTEP_WEIGHTINGS = ("bsmntw", "none")
LOSS_NORMALIZATIONS = ("weight_sum", "mean")
Model = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ShortcutConfig:
    """Options of the objective; the defaults are the reference trainer's."""

    shift: float = 5.0                      # training grid shift (reference: 5.0; 5.8 in its 4K config)
    sc_rate: float = 0.3                    # probability that a step is a self-consistency step
    t_anchors: tuple[float, ...] = (500.0, 600.0, 700.0, 800.0)
    dt_candidates: int = 6                  # K: dt = floor(T / 2^k), k = 0..K-1
    index_sampling: str = "exponential"     # or "uniform" over k
    beta: float = 0.7                       # p(k) ~ exp(-beta k)
    calibration_power: float = 0.5          # p of the noise-span weight; 0 turns calibration off
    calibration_clamp: tuple[float, float] = (0.1, 10.0)
    calibration_reference: str = "batch"    # mean span of the batch (reference) or a running mean
    timestep_weighting: str = "bsmntw"      # the reference's Gaussian-in-t weight, or "none"
    loss_normalization: str = "weight_sum"  # sum(w * mse) / sum(w) (reference) or mean(w * mse)
    sc_loss_weight: float = 1.0
    cfg_dropout: float = 0.1                # empty prompt and zeroed anchor, per sample

    def __post_init__(self) -> None:
        for name in ("sc_rate", "cfg_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
        checks = {"index_sampling": INDEX_SAMPLINGS, "calibration_reference": CALIBRATION_REFERENCES,
                  "timestep_weighting": TIMESTEP_WEIGHTINGS, "loss_normalization": LOSS_NORMALIZATIONS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not self.t_anchors or any(not 0 < t <= 1000 for t in self.t_anchors):
            raise ConfigError(f"t_anchors must be timesteps in (0, 1000], got {list(self.t_anchors)}")
        if self.dt_candidates < 1:
            raise ConfigError(f"dt_candidates must be >= 1 (the reference uses 6), got {self.dt_candidates}")
        if not math.isfinite(self.calibration_power) or not math.isfinite(self.beta):
            raise ConfigError("calibration_power and beta must be finite numbers")
        index_probabilities(self.dt_candidates, self.beta, self.index_sampling)
        calibration_weights(torch.ones(1), 1.0, 1.0, tuple(self.calibration_clamp))  # validates the clamp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingBatch:
    """One batch: clean HR latents, their text context and anchors, and the empty-prompt context."""

    latent: torch.Tensor         # [B, C, T, H, W] normalised clean latent (x0)
    context: torch.Tensor        # [B, rows, text_dim]
    anchor: torch.Tensor         # [B, C, T, H/2, W/2] LR anchor on the token grid
    empty_context: torch.Tensor  # [rows', text_dim] or [1, rows', text_dim]: the "" prompt for CFG dropout
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "TrainingBatch":
        return TrainingBatch(self.latent.to(device), self.context.to(device), self.anchor.to(device),
                             self.empty_context.to(device), self.info)


def _pad_rows(context: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows up to ``rows`` (the DiT zero-pads to text_len anyway, so this changes nothing)."""
    missing = rows - context.shape[-2]
    return context if missing <= 0 else F.pad(context, (0, 0, 0, missing))


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x.device)


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, 1, 1, ...] for broadcasting per-sample scalars."""
    return x.reshape(-1, *([1] * 4))


class ShortcutObjective:
    """Computes the loss of one step; holds the grid and the running state (span reference)."""

    def __init__(self, config: ShortcutConfig = ShortcutConfig(), device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.grid = TrainingGrid(config.shift).to(self.device)
        self.probabilities = index_probabilities(config.dt_candidates, config.beta, config.index_sampling)
        self.anchors = torch.tensor(config.t_anchors, dtype=torch.float32, device=self.device)
        self.span_reference = SpanReference(config.calibration_reference)

    # --- decisions ---------------------------------------------------------------------------
    def choose_self_consistency(self, generator: torch.Generator) -> bool:
        """Draw the branch; under torch.distributed every rank draws (keeping generators in step) and
        rank 0's draw is broadcast, so all ranks run the same number of forward passes (FSDP)."""
        u = torch.rand((), generator=generator, device=generator.device).reshape(1).to(self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            u = u.to(_collective_device())
            dist.broadcast(u, src=0)
        return bool(u.item() < self.config.sc_rate)

    def drop_conditions(self, batch: TrainingBatch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, anchor) with a ``cfg_dropout`` fraction of samples switched to "" and a zero anchor."""
        size = batch.latent.shape[0]
        drop = _rand((size,), generator, self.device) < self.config.cfg_dropout
        context, anchor = batch.context, batch.anchor
        if bool(drop.any()):
            empty = batch.empty_context.reshape(-1, *batch.empty_context.shape[-2:])[:1]
            rows = max(context.shape[1], empty.shape[1])
            context = torch.where(drop[:, None, None], _pad_rows(empty, rows).to(context.dtype),
                                  _pad_rows(context, rows))
            anchor = anchor * (~drop).to(anchor.dtype).reshape(-1, 1, 1, 1, 1)
        return context, anchor

    # --- loss ------------------------------------------------------------------------------------
    def loss(self, model: Model, batch: TrainingBatch, generator: torch.Generator,
             self_consistency: bool | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch and what to log. ``self_consistency`` forces the branch (tests)."""
        if self_consistency is None:
            self_consistency = self.choose_self_consistency(generator)
        batch = batch.to(self.device)
        context, anchor = self.drop_conditions(batch, generator)
        x0 = batch.latent.float()
        noise = _randn_like(x0, generator)
        if self_consistency:
            loss, logs = self._self_consistency(model, x0, noise, context, anchor, generator)
            return self.config.sc_loss_weight * loss, {"branch_sc": 1.0, "loss_sc": float(loss.detach()), **logs}
        loss, logs = self._flow_matching(model, x0, noise, context, anchor, generator)
        return loss, {"branch_sc": 0.0, "loss_fm": float(loss.detach()), **logs}

    def _flow_matching(self, model: Model, x0: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                       anchor: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        size = x0.shape[0]
        index = torch.randint(0, self.grid.points, (size,), generator=generator, device=generator.device)
        index = index.to(self.device)
        sigma = _per_sample(self.grid.sigmas[index])
        x_t = (1 - sigma) * x0 + sigma * noise
        zero_dt = torch.zeros(size, device=self.device)
        prediction = model(x_t, self.grid.timesteps[index], context, dt=zero_dt, anchor=anchor)
        weights = self._timestep_weights(index)
        return self._weighted(prediction, noise - x0, weights), {"t_mean": float(self.grid.timesteps[index].mean())}

    def _self_consistency(self, model: Model, x0: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                          anchor: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        grid, config = self.grid, self.config
        draw = sample_self_consistency(grid, x0.shape[0], anchors=self.anchors, candidates=config.dt_candidates,
                                       probabilities=self.probabilities, generator=generator)
        t, t_mid = grid.timesteps[draw.t_index], grid.timesteps[draw.mid_index]
        sigma, sigma_mid = grid.sigmas[draw.t_index], grid.sigmas[draw.mid_index]
        x_t = (1 - _per_sample(sigma)) * x0 + _per_sample(sigma) * noise
        half = torch.div(draw.dt, 2, rounding_mode="floor").float()
        with torch.no_grad():
            v1 = model(x_t, t, context, dt=half, anchor=anchor).float()
            x_mid = x_t + _per_sample(sigma_mid - sigma) * v1
            v2 = model(x_mid, t_mid, context, dt=half, anchor=anchor).float()
            target = 0.5 * (v1 + v2)
        prediction = model(x_t, t, context, dt=draw.dt.float(), anchor=anchor)
        span = noise_span(grid, draw)
        calibration = calibration_weights(span, self.span_reference(span), config.calibration_power,
                                          tuple(config.calibration_clamp))
        weights = self._timestep_weights(draw.t_index) * calibration
        logs = {"t_mean": float(t.mean()), "dt_mean": float(draw.dt.float().mean()),
                "k_mean": float(draw.k.float().mean()), "calibration_mean": float(calibration.mean())}
        return self._weighted(prediction, target, weights), logs

    def _timestep_weights(self, index: torch.Tensor) -> torch.Tensor:
        if self.config.timestep_weighting == "none":
            return torch.ones(index.shape, device=self.device)
        return self.grid.base_weights[index]

    def _weighted(self, prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        if self.config.loss_normalization == "weight_sum":
            return (mse * weights).sum() / weights.sum().clamp_min(1e-8)
        return (mse * weights).mean()

    # --- state for checkpoints --------------------------------------------------------------
    def state(self) -> dict[str, float]:
        return self.span_reference.state()

    def load_state(self, state: dict[str, float]) -> None:
        self.span_reference.load_state(state)


def _collective_device() -> torch.device:
    """Where tensors for collectives must live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
