"""The training-time noise grid and the samplers of shortcut training: timesteps, step sizes, weights.

Facts from the reference trainer (research notes §10):

- Grid: 1000 points sigma_i = shift(1 - i/1000), i = 0..999 (sigma 1 down to shift(0.001); sigma 0 is not
  on it), timestep t_i = 1000 * sigma_i (a float). Noising x_t = (1 - sigma) x0 + sigma * noise, target
  v = noise - x0. Any timestep value is snapped to the nearest grid point.
- Base loss weight per grid point ("bsmntw"): exp(-2 ((t - 500) / 1000)^2), minus its minimum, scaled to
  sum to 1000 over the grid.
- Self-consistency (SC) samples: T uniform over anchors {500, 600, 700, 800}, snapped, grid index capped
  at 997; dt candidates floor(T / 2^k) for k = 0..K-1 (K = 6), at least 2 and even; k drawn with
  p(k) ~ exp(-beta k) (beta 0.7), which favours large steps; the midpoint T - dt/2 is snapped to the grid
  and never lies before T.
- Noise-span calibration: the weight of an SC sample is multiplied by (span / mean span)^p, clamped to
  [0.1, 10], with span = |sigma(T - dt) - sigma(T)| (both snapped) and the mean over the SC samples of the
  batch (p = 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..sampling import shift_sigmas

GRID_POINTS = 1000
INDEX_SAMPLINGS = ("exponential", "uniform")
CALIBRATION_REFERENCES = ("batch", "running")


@dataclass(frozen=True)
class SCDraw:
    """The grid positions of a batch of self-consistency samples (all [B])."""

    t_index: torch.Tensor    # int64 grid index of T
    k: torch.Tensor          # int64 candidate index (0 = the largest step)
    dt: torch.Tensor         # int64 even step size >= 2 on the 0..1000 scale
    mid_index: torch.Tensor  # int64 grid index of the midpoint T - dt/2
    end_index: torch.Tensor  # int64 grid index of T - dt (for the noise span)


class TrainingGrid:
    """The reference trainer's 1000-point flow-matching grid at time shift ``shift``."""

    def __init__(self, shift: float, points: int = GRID_POINTS) -> None:
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ConfigError(f"training shift must be a finite number > 0 (the reference uses 5.0 or 5.8), got {shift!r}")
        self.shift = float(shift)
        self.points = points
        unshifted = torch.linspace(1.0, 0.0, points + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift_sigmas(unshifted, self.shift).to(torch.float32)  # [points], decreasing
        self.timesteps = self.sigmas * points                                 # float32, same scale as dt
        weights = torch.exp(-2 * ((self.timesteps.double() - points / 2) / points) ** 2)
        weights = weights - weights.min()
        self.base_weights = (weights * (points / weights.sum())).to(torch.float32)

    def snap(self, timestep: torch.Tensor) -> torch.Tensor:
        """Index of the grid point nearest to each timestep value; on a tie the lower index, as the
        reference's argmin. A binary search, so large batches need no [batch, 1000] table."""
        ascending = self.timesteps.to(timestep.device).flip(0)
        t = timestep.float().reshape(-1)
        above = torch.searchsorted(ascending, t).clamp(0, self.points - 1)
        below = (above - 1).clamp_min(0)
        pick = torch.where((ascending[above] - t).abs() <= (ascending[below] - t).abs(), above, below)
        return (self.points - 1 - pick).reshape(timestep.shape)

    def to(self, device: torch.device | str) -> "TrainingGrid":
        self.sigmas, self.timesteps, self.base_weights = (
            t.to(device) for t in (self.sigmas, self.timesteps, self.base_weights))
        return self


def dt_candidates(timestep: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] step sizes floor(T / 2^k) for k = 0..count-1, made at least 2 and even (int64).

    T is rounded to an integer first, as the reference does with its float grid timesteps."""
    if count < 1:
        raise ConfigError(f"the number of step-size candidates must be >= 1 (the reference uses 6), got {count}")
    whole = timestep.float().round().long()
    divisors = 2 ** torch.arange(count, device=whole.device)
    dt = torch.div(whole[:, None], divisors[None, :], rounding_mode="floor").clamp_min(2)
    return (dt - dt % 2).clamp_min(2)


def index_probabilities(count: int, beta: float, sampling: str = "exponential") -> torch.Tensor:
    """p(k), k = 0..count-1: proportional to exp(-beta k) ("exponential") or 1/count ("uniform"), float64."""
    if sampling not in INDEX_SAMPLINGS:
        raise ConfigError(f"step-index sampling {sampling!r}: choose one of {', '.join(INDEX_SAMPLINGS)}")
    if sampling == "uniform":
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    if not math.isfinite(beta):
        raise ConfigError(f"beta must be a finite number (the reference uses 0.7), got {beta!r}")
    logits = -beta * torch.arange(count, dtype=torch.float64)
    return torch.softmax(logits, dim=0)


def sample_self_consistency(
    grid: TrainingGrid,
    batch: int,
    *,
    anchors: torch.Tensor,
    candidates: int,
    probabilities: torch.Tensor,
    generator: torch.Generator,
) -> SCDraw:
    """Draw T, k and dt for ``batch`` SC samples (the reference's procedure, see the module docstring)."""
    device = grid.timesteps.device
    pick = torch.randint(0, anchors.numel(), (batch,), generator=generator, device=generator.device).to(device)
    t_index = grid.snap(anchors.to(device)[pick]).clamp_max(grid.points - 3)
    t_value = grid.timesteps[t_index]
    k = torch.multinomial(probabilities.to(generator.device), batch, replacement=True, generator=generator).to(device)
    dt = dt_candidates(t_value, candidates).gather(1, k[:, None])[:, 0]
    mid_index = torch.maximum(grid.snap(t_value - 0.5 * dt.float()), t_index)
    end_index = grid.snap(t_value - dt.float())
    return SCDraw(t_index, k, dt, mid_index, end_index)


def noise_span(grid: TrainingGrid, draw: SCDraw) -> torch.Tensor:
    """|sigma(T - dt) - sigma(T)| per SC sample, both ends snapped to the grid (float32 [B])."""
    return (grid.sigmas[draw.end_index] - grid.sigmas[draw.t_index]).abs()


def calibration_weights(span: torch.Tensor, reference: torch.Tensor | float, power: float,
                        clamp: tuple[float, float] = (0.1, 10.0), eps: float = 1e-8) -> torch.Tensor:
    """(span / reference)^power clamped to ``clamp``; power 0 gives ones (calibration off)."""
    low, high = clamp
    if not 0 < low <= high:
        raise ConfigError(f"calibration clamp must satisfy 0 < min <= max (the reference uses 0.1, 10), got {clamp}")
    if power == 0:
        return torch.ones_like(span)
    ref = torch.as_tensor(reference, dtype=span.dtype, device=span.device).clamp_min(eps)
    return ((span.clamp_min(eps) / ref) ** power).clamp(low, high)


class SpanReference:
    """What a noise span is compared with: the mean over the batch's SC samples (the reference), or a
    running mean over training (so calibration also acts with one sample per batch, where the batch
    mean equals the sample and every weight is 1)."""

    def __init__(self, mode: str = "batch", momentum: float = 0.99) -> None:
        if mode not in CALIBRATION_REFERENCES:
            raise ConfigError(f"calibration reference {mode!r}: choose one of {', '.join(CALIBRATION_REFERENCES)}")
        self.mode = mode
        self.momentum = momentum
        self.running: float | None = None

    def __call__(self, span: torch.Tensor) -> torch.Tensor | float:
        batch_mean = span.mean().detach()
        if self.mode == "batch":
            return batch_mean
        value = float(batch_mean)
        self.running = value if self.running is None else self.momentum * self.running + (1 - self.momentum) * value
        return self.running

    def state(self) -> dict[str, float]:
        return {} if self.running is None else {"running": self.running}

    def load_state(self, state: dict[str, float]) -> None:
        self.running = state.get("running")
