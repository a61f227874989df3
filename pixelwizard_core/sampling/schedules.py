"""Flow-matching sampling schedules: the integer timesteps fed to the model, the float32 sigmas the
solver integrates over, and the even integer step sizes dt fed to the PixelWizard HR model.

The numbers reproduce the Wan2.2 FlowUniPC scheduler as the reference runs it (built with shift 1,
then ``set_timesteps(steps, shift=s)``):

- sigma_max is the top of the 1000-point training grid 1 - (1/1000 ... 1), stored in float32, so it is
  float32(0.999) = 0.99900001287..., not 0.999; sigma_min is 0;
- sigma = linspace(sigma_max, 0, steps + 1)[:-1] in float64, shifted s*sigma / (1 + (s - 1)*sigma);
- timesteps = int64 truncation of sigma' * 1000; sigmas = [sigma', 0] rounded to float32;
- dt_i = |t_i - t_{i+1}| with t_steps = 0, made even (dt - dt mod 2) and at least 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

TRAIN_TIMESTEPS = 1000
# Top of the training grid, as the scheduler stores it (float32), read back as a Python float.
SIGMA_MAX = float(torch.tensor(1.0 - 1.0 / TRAIN_TIMESTEPS, dtype=torch.float32))
MIN_STEP_SIZE = 2


@dataclass(frozen=True)
class Schedule:
    """One sampling run's grid. ``sigmas[i]`` is the noise level of the sample the model sees at step i;
    ``sigmas[steps]`` is 0 (the clean end)."""

    timesteps: torch.Tensor   # int64 [steps]: the integer t given to the model
    sigmas: torch.Tensor      # float32 [steps + 1], CPU, strictly decreasing, last 0
    step_sizes: torch.Tensor  # int64 [steps]: even dt >= 2 given to the HR model
    steps: int
    shift: float

    def __post_init__(self) -> None:
        n = self.steps
        expected = {"timesteps": (torch.int64, n), "sigmas": (torch.float32, n + 1), "step_sizes": (torch.int64, n)}
        for name, (dtype, length) in expected.items():
            value = getattr(self, name)
            if value.dtype != dtype or tuple(value.shape) != (length,):
                raise ConfigError(
                    f"Schedule.{name} must be a {dtype} tensor of shape [{length}] for {n} steps, "
                    f"got {value.dtype} {list(value.shape)}"
                )
        if self.sigmas[-1] != 0 or not bool((self.sigmas[1:] < self.sigmas[:-1]).all()):
            raise ConfigError(f"Schedule.sigmas must decrease strictly and end at 0, got {self.sigmas.tolist()}")


def _check_arguments(steps: int, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"steps must be an integer, got {steps!r} ({type(steps).__name__})")
    if not 1 <= steps <= TRAIN_TIMESTEPS:
        raise ConfigError(f"steps must be between 1 and {TRAIN_TIMESTEPS} (the training grid), got {steps}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ConfigError(f"shift must be a finite number > 0 (the reference uses 5.0 to 5.8), got {shift!r}")


def _unshifted_sigmas(steps: int) -> torch.Tensor:
    """linspace(SIGMA_MAX, 0, steps + 1)[:-1] in float64, computed as numpy does (start + i * step):
    torch.linspace uses another formula that can differ in the last bit and flip a truncated timestep."""
    step = (0.0 - SIGMA_MAX) / steps
    return torch.arange(steps, dtype=torch.float64) * step + SIGMA_MAX


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift s*sigma / (1 + (s - 1)*sigma), evaluated in the reference's operation order."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def quantize_step_sizes(timesteps: torch.Tensor) -> torch.Tensor:
    """Even integer dt per step: |t_i - t_{i+1}| (t after the last step is 0), minus its parity, >= 2.

    The reference rounds a float32 difference of integers; integer arithmetic gives the same values."""
    following = torch.cat([timesteps[1:], timesteps.new_zeros(1)])
    dt = (timesteps - following).abs()
    return (dt - dt % 2).clamp_min(MIN_STEP_SIZE)


def flow_schedule(steps: int, shift: float) -> Schedule:
    """The reference schedule for ``steps`` model evaluations at time shift ``shift``."""
    _check_arguments(steps, shift)
    shifted = shift_sigmas(_unshifted_sigmas(steps), float(shift))
    timesteps = (shifted * TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)
    if sigmas[0] >= 1:
        raise ConfigError(f"shift {shift} is too large: the first sigma rounds to 1 in float32; use a smaller shift")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ConfigError(f"{steps} steps at shift {shift} give repeated float32 sigmas; use fewer steps")
    return Schedule(timesteps, sigmas, quantize_step_sizes(timesteps), steps, float(shift))
