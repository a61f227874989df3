"""A toy problem with a known answer, trained through the real objective and trainer.

Data: 2-D points from 8 Gaussians (std 0.15) on a circle of radius 2, two per quadrant, stored as
"latents" [B, 2, 1, 1, 1]. The anchor is the quadrant's direction [B, 2, 1, 1, 1] (coarse layout, like the
LR anchor): conditioned on it, two modes remain; with the anchor zeroed (CFG dropout) all eight.

For this mixture the flow-matching velocity E[noise - x0 | x_t] is analytic, so the exact ODE flow map
noise -> data is computed with RK4 (the "many-step reference"). A 4-step sample of a model is scored
by its mean squared distance to the exact endpoint of the same noise and anchor.

The model (:class:`ToyShortcutNet`) has the HR model's interface ``model(x, t, context, dt=, anchor=)``
and the HR model's time embedding + pluggable step-size conditioning (``STEP_SIZE_CONDITIONINGS``), so
training it exercises exactly the code that trains ``WanHRDiT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..models.dit import DiTConfig
from ..models.hr import STEP_SIZE_CONDITIONINGS
from ..models.layers import FP32Linear, mlp, sinusoidal_embedding
from ..sampling import flow_schedule, make_solver
from .objective import ShortcutConfig, ShortcutObjective, TrainingBatch
from .trainer import OptimConfig, Trainer

MODES = 8
RADIUS = 2.0
MODE_STD = 0.15
CENTRES = torch.stack([RADIUS * torch.tensor([math.cos(a), math.sin(a)])
                       for a in (2 * math.pi * j / MODES + math.pi / MODES for j in range(MODES))]).double()
QUADRANT_OF_MODE = torch.arange(MODES) // 2


def quadrant_directions(quadrant: torch.Tensor) -> torch.Tensor:
    """[n] quadrant -> [n, 2] unit vector at its diagonal (the toy anchor)."""
    angle = math.pi / 4 + quadrant.double() * math.pi / 2
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def sample_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(points [n, 2] float64, quadrant [n])."""
    mode = torch.randint(MODES, (n,), generator=generator)
    points = CENTRES[mode] + MODE_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points, QUADRANT_OF_MODE[mode]


def _as_latent(points: torch.Tensor) -> torch.Tensor:
    return points.float().reshape(-1, 2, 1, 1, 1)


def exact_velocity(x: torch.Tensor, sigma: float, quadrant: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """E[noise - x0 | x_sigma] for x_sigma = (1 - sigma) x0 + sigma noise, x0 from the mixture restricted to
    the sample's quadrant (``conditional``) or all modes. Float64, [n, 2]."""
    alpha, var0 = 1.0 - sigma, MODE_STD ** 2
    tau2 = alpha ** 2 * var0 + sigma ** 2
    means = alpha * CENTRES                                        # [M, 2]
    diff = x[:, None, :] - means[None]                             # [n, M, 2]
    logits = -0.5 * diff.pow(2).sum(-1) / tau2                     # equal weights within the allowed set
    allowed = (QUADRANT_OF_MODE[None, :] == quadrant[:, None]) | ~conditional[:, None]
    weights = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=1)
    x0 = CENTRES[None] + (alpha * var0 / tau2) * diff              # E[x0 | x, mode]
    eps = (sigma / tau2) * diff                                    # E[noise | x, mode]
    return ((eps - x0) * weights[..., None]).sum(1)


def exact_flow(noise: torch.Tensor, quadrant: torch.Tensor, sigma_start: float, *, conditional: bool = True,
               steps: int = 400) -> torch.Tensor:
    """The ODE dx/dsigma = v(x, sigma) integrated from ``sigma_start`` to 0 with RK4 (float64)."""
    cond = torch.full(quadrant.shape, conditional)
    x = noise.double()
    h = -sigma_start / steps
    for i in range(steps):
        s = sigma_start + i * h
        k1 = exact_velocity(x, s, quadrant, cond)
        k2 = exact_velocity(x + 0.5 * h * k1, s + 0.5 * h, quadrant, cond)
        k3 = exact_velocity(x + 0.5 * h * k2, s + 0.5 * h, quadrant, cond)
        k4 = exact_velocity(x + h * k3, s + h, quadrant, cond)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


class ToyShortcutNet(nn.Module):
    """A residual MLP with the HR model's time embedding + step-size conditioning, on 2-D "latents"."""

    def __init__(self, hidden: int = 256, depth: int = 3, freq_dim: int = 64,
                 step_size_conditioning: str = "sinusoidal") -> None:
        super().__init__()
        config = DiTConfig(dim=hidden, freq_dim=freq_dim)
        self.config = config
        self.step_size_conditioning = step_size_conditioning
        self.time_embedding = mlp(freq_dim, hidden, nn.SiLU(), FP32Linear)
        self.dt_embedding = STEP_SIZE_CONDITIONINGS[step_size_conditioning](config)
        self.inp = nn.Linear(4, hidden)
        self.layers = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.modulation = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, dt: torch.Tensor,
                anchor: torch.Tensor) -> torch.Tensor:
        t, dt = t.float(), dt.float()
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t).float()) + self.dt_embedding(t, dt)
        h = self.inp(torch.cat([x.flatten(1), anchor.flatten(1)], dim=1).float())
        for layer, modulation in zip(self.layers, self.modulation):
            h = h + layer(h + modulation(torch.nn.functional.silu(e)))
        return self.out(h).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- training

def toy_batches(batch_size: int, seed: int):
    """batches(step) -> TrainingBatch, a pure function of (seed, step)."""
    empty = torch.zeros(1, 1)

    def batches(step: int) -> TrainingBatch:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        points, quadrant = sample_data(batch_size, generator)
        return TrainingBatch(latent=_as_latent(points), context=torch.zeros(batch_size, 1, 1),
                             anchor=_as_latent(quadrant_directions(quadrant)), empty_context=empty)

    return batches


@dataclass(frozen=True)
class ToyRecipe:
    """Sizes and rates of a toy experiment (small enough for a CPU test)."""

    pretrain_steps: int = 1500
    finetune_steps: int = 1500
    batch_size: int = 256
    pretrain_lr: float = 2e-3
    finetune_lr: float = 5e-4
    hidden: int = 256
    shift: float = 5.0
    ema_decay: float = 0.0
    objective: ShortcutConfig = field(default_factory=lambda: ShortcutConfig(cfg_dropout=0.1))


def train_toy(model: ToyShortcutNet, config: ShortcutConfig, *, steps: int, lr: float, batch_size: int,
              seed: int, ema_decay: float = 0.0) -> Trainer:
    """Train ``model`` in place through :class:`Trainer` (AdamW, betas of the reference but beta1 0.9:
    the toy trains from scratch, where beta1 0 is slow)."""
    optim = OptimConfig(lr=lr, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0, ema_decay=ema_decay,
                        ema_start=0)
    trainer = Trainer(model, ShortcutObjective(config), optim, seed=seed)
    trainer.fit(toy_batches(batch_size, seed), steps, log_every=0)
    return trainer


def pretrain(recipe: ToyRecipe, seed: int, conditioning: str = "sinusoidal") -> ToyShortcutNet:
    """The starting point: plain flow matching only (dt = 0), like the reference's pre-shortcut model."""
    torch.manual_seed(seed)
    model = ToyShortcutNet(hidden=recipe.hidden, step_size_conditioning=conditioning)
    config = replace(recipe.objective, sc_rate=0.0, shift=recipe.shift)
    train_toy(model, config, steps=recipe.pretrain_steps, lr=recipe.pretrain_lr, batch_size=recipe.batch_size,
              seed=seed)
    return model


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, anchor: torch.Tensor, *, steps: int, shift: float,
           solver: str = "euler", zero_dt: bool = False) -> torch.Tensor:
    """``steps``-step sample from noise [n, 2] with the reference schedule; dt from the schedule (or 0)."""
    schedule = flow_schedule(steps, shift)
    stepper = make_solver(solver, schedule)
    x = _as_latent(noise)
    a = _as_latent(anchor)
    context = torch.zeros(x.shape[0], 1, 1)
    for i in range(steps):
        t = schedule.timesteps[i].float().expand(x.shape[0])
        dt = torch.zeros_like(t) if zero_dt else schedule.step_sizes[i].float().expand(x.shape[0])
        x = stepper.step(i, model(x, t, context, dt=dt, anchor=a), x)
    return x.reshape(-1, 2).double()


@dataclass(frozen=True)
class ToyEvaluation:
    flow_mse: float     # mean ||x_model - x_exact||^2 over the evaluation noises
    off_mode: float     # mean squared distance to the nearest mode centre (data: 2 * 0.15^2 = 0.045)


class ToyEvaluator:
    """Fixed noises, anchors and their exact flow endpoints (computed once)."""

    def __init__(self, count: int = 2048, seed: int = 12345, steps: int = 4, shift: float = 5.5) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.steps, self.shift = steps, shift
        self.noise = torch.randn(count, 2, generator=generator, dtype=torch.float64)
        self.quadrant = torch.randint(4, (count,), generator=generator)
        self.anchor = quadrant_directions(self.quadrant)
        sigma_start = float(flow_schedule(steps, shift).sigmas[0])
        self.exact = exact_flow(self.noise, self.quadrant, sigma_start)

    def __call__(self, model: nn.Module, *, solver: str = "euler", zero_dt: bool = False) -> ToyEvaluation:
        x = sample(model, self.noise, self.anchor, steps=self.steps, shift=self.shift, solver=solver,
                   zero_dt=zero_dt)
        nearest = torch.cdist(x, CENTRES).min(dim=1).values.pow(2).mean()
        return ToyEvaluation(float((x - self.exact).pow(2).sum(1).mean()), float(nearest))
