"""Solvers for the flow ODE dx/dsigma = v(x, sigma), stepped from sigma_0 (noise) to 0 (clean).

A solver is built per run from a Schedule and called once per step, in order:
``x = solver.step(i, v_i, x)``, where v_i is the (guided) velocity the model predicted at x and sigma_i.
Samples are float32; the per-step scalars are 0-dim float32 CPU tensors, mixed into the (possibly CUDA)
tensor arithmetic in the same order as the reference scheduler so its trajectory is reproduced to
float32 rounding.

- ``unipc``: UniPC multistep for flow matching as Wan2.2 and PixelWizard run it (bh2, order 2, data
  prediction x0 = x - sigma*v, corrector UniC after every step but the first, order 1 on the last step).
  The last step lands on sigma 0, where the update reduces to the x0 prediction x - sigma*v.
- ``euler``: x + (sigma_{i+1} - sigma_i) * v.
- ``shortcut``: the PixelWizard paper's update x - (dt_i / 1000) * v with the quantised even dt the HR
  model is conditioned on. It differs from Euler because dt comes from the truncated integer timesteps,
  made even: the 2K schedule moves 0.056, 0.096, 0.198, 0.646 instead of the sigma gaps 0.0572, 0.0967,
  0.1991, 0.6468, so it does not end exactly at sigma 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..registry import Registry
from .schedules import TRAIN_TIMESTEPS, Schedule

Tensor = torch.Tensor
UNIPC_ORDER = 2
PREDICTOR_RHO = 0.5  # UniP-2 weight of the first divided difference (fixed, not solved)


class Solver(ABC):
    """Common checks; subclasses implement ``_update`` on float32 tensors."""

    name: ClassVar[str]
    needs_dt: ClassVar[bool] = False  # only for a model conditioned on the step size (the HR model)

    def __init__(self, schedule: Schedule) -> None:
        if not isinstance(schedule, Schedule):
            raise ConfigError(f"a solver needs a Schedule (see flow_schedule), got {type(schedule).__name__}")
        self.schedule = schedule

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def step(self, index: int, velocity: Tensor, sample: Tensor) -> Tensor:
        """The sample at sigma_{index+1}, from ``sample`` at sigma_index and the velocity predicted there."""
        self._check(index, velocity, sample)
        return self._update(index, velocity.float(), sample.float())

    def _check(self, index: int, velocity: Tensor, sample: Tensor) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.steps:
            raise ConfigError(f"step index must be an integer in [0, {self.steps}), got {index!r}")
        if not (velocity.is_floating_point() and sample.is_floating_point()):
            raise ConfigError(f"velocity and sample must be floating tensors, got {velocity.dtype} and {sample.dtype}")
        if velocity.shape != sample.shape:
            raise ConfigError(f"velocity {list(velocity.shape)} and sample {list(sample.shape)} must have one shape")

    @abstractmethod
    def _update(self, index: int, velocity: Tensor, sample: Tensor) -> Tensor: ...


class EulerSolver(Solver):
    """First-order step along the sigma grid."""

    name = "euler"

    def _update(self, index: int, velocity: Tensor, sample: Tensor) -> Tensor:
        sigmas = self.schedule.sigmas
        return sample + (sigmas[index + 1] - sigmas[index]) * velocity


class ShortcutSolver(Solver):
    """First-order step of length dt_i / 1000 (the step size the HR model was told), not the sigma gap."""

    name = "shortcut"
    needs_dt = True  # its step length is the dt the HR model was told

    def _update(self, index: int, velocity: Tensor, sample: Tensor) -> Tensor:
        span = self.schedule.step_sizes[index].to(torch.float32) / TRAIN_TIMESTEPS
        return sample - span * velocity


@dataclass(frozen=True)
class UniPCInterval:
    """Scalars of one step sigma_i -> sigma_{i+1} (0-dim float32 CPU tensors).

    With lambda = ln(1 - sigma) - ln(sigma): h = lambda_{i+1} - lambda_i, phi = expm1(-h). For bh2 the
    weight B(h) of the higher-order terms equals phi, so ``alpha_phi`` serves both."""

    order: int                        # predictor order: 1 on the first and last step, else 2
    h: Tensor
    ratio: Tensor                     # sigma_{i+1} / sigma_i
    alpha_phi: Tensor                 # (1 - sigma_{i+1}) * phi
    r: Tensor | None                  # (lambda_{i-1} - lambda_i) / h, order 2 only
    corrector_rho: Tensor | None      # UniC weights applied at sigma_{i+1}; None after the last step

    @property
    def neg_alpha_phi(self) -> Tensor:
        """Weight of the x0 prediction in the order-1 update (1 on a final step to sigma 0)."""
        return -self.alpha_phi


def _log_snr(sigma: Tensor) -> Tensor:
    alpha = 1 - sigma
    return torch.log(alpha) - torch.log(sigma)


def _corrector_rho(order: int, h: Tensor, r: Tensor | None) -> Tensor:
    """UniC-p weights: 0.5 for p = 1; for p = 2 the solution of [[1, 1], [r, 1]] rho = b (bh2)."""
    if order == 1:
        return torch.tensor([0.5], dtype=torch.float32)
    neg_h = -h
    b_h = torch.expm1(neg_h)
    k1 = b_h / neg_h - 1
    k2 = k1 / neg_h - 0.5
    rhs = torch.stack([k1 * 1 / b_h, k2 * 2 / b_h])
    lhs = torch.tensor([[1.0, 1.0], [float(r), 1.0]], dtype=torch.float32)
    return torch.linalg.solve(lhs, rhs).to(torch.float32)


def unipc_intervals(schedule: Schedule) -> tuple[UniPCInterval, ...]:
    """Every step's UniPC scalars, computed as the reference scheduler computes them."""
    sigmas = schedule.sigmas.cpu()
    lambdas = [_log_snr(sigmas[i]) for i in range(schedule.steps + 1)]
    intervals = []
    for i in range(schedule.steps):
        # warm-up (one stored x0 at step 0) and lower_order_final (order 1 on the last step)
        order = min(UNIPC_ORDER, i + 1, schedule.steps - i)
        h = lambdas[i + 1] - lambdas[i]
        r = (lambdas[i - 1] - lambdas[i]) / h if order == 2 else None
        rho = _corrector_rho(order, h, r) if i + 1 < schedule.steps else None
        alpha_phi = (1 - sigmas[i + 1]) * torch.expm1(-h)
        intervals.append(UniPCInterval(order, h, sigmas[i + 1] / sigmas[i], alpha_phi, r, rho))
    return tuple(intervals)


class UniPCSolver(Solver):
    """UniPC-2 (bh2) in data prediction; must be stepped 0, 1, 2, ... (it keeps two x0 predictions)."""

    name = "unipc"

    def __init__(self, schedule: Schedule) -> None:
        super().__init__(schedule)
        self.intervals = unipc_intervals(schedule)
        self.reset()

    def reset(self) -> None:
        """Forget the history, to sample again from step 0."""
        self._next_index = 0
        self._x0_newest: Tensor | None = None
        self._x0_older: Tensor | None = None
        self._last_sample: Tensor | None = None

    def _update(self, index: int, velocity: Tensor, sample: Tensor) -> Tensor:
        if index != self._next_index:
            raise ConfigError(f"UniPC steps must run in order: expected step {self._next_index}, got {index}")
        # x0 comes from the sample as given, before the corrector moves it
        x0 = sample - self.schedule.sigmas[index] * velocity
        if index > 0:
            sample = self._correct(self.intervals[index - 1], x0)
        self._x0_older, self._x0_newest = self._x0_newest, x0
        self._last_sample = sample
        self._next_index = index + 1
        return self._predict(self.intervals[index], sample)

    def _correct(self, interval: UniPCInterval, x0: Tensor) -> Tensor:
        """UniC: redo the previous step from its start with the x0 predicted at its end."""
        m0 = self._x0_newest
        base = interval.ratio * self._last_sample - interval.alpha_phi * m0
        rho = interval.corrector_rho
        change = rho[-1] * (x0 - m0)
        if interval.order == 2:
            change = rho[0] * ((self._x0_older - m0) / interval.r) + change
        return base - interval.alpha_phi * change

    def _predict(self, interval: UniPCInterval, sample: Tensor) -> Tensor:
        """UniP: exponential-integrator step in x0, plus the divided difference at order 2."""
        m0 = self._x0_newest
        out = interval.ratio * sample - interval.alpha_phi * m0
        if interval.order == 2:
            out = out - interval.alpha_phi * (PREDICTOR_RHO * ((self._x0_older - m0) / interval.r))
        return out


# The registry, default first; the CLI, the sampler nodes and the presets take their choices from it.
SOLVERS: Registry[type[Solver]] = Registry("solver")
for _solver in (UniPCSolver, EulerSolver, ShortcutSolver):
    SOLVERS.register(_solver.name, _solver)


def solver_choices(hr: bool) -> tuple[str, ...]:
    """Solvers a stage may use: every one for the HR stage; for the LR stage those that need no step size
    told to the model (the base DiT is not conditioned on dt)."""
    return tuple(name for name, cls in SOLVERS.items() if hr or not cls.needs_dt)


def make_solver(name: str, schedule: Schedule) -> Solver:
    """The solver called ``name`` (one of :data:`SOLVERS`) for ``schedule``."""
    key = name.strip().lower() if isinstance(name, str) else name
    return SOLVERS.get(key)(schedule)
