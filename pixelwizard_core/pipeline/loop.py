"""The denoising loop shared by both stages: noise, schedule, guided velocity, solver steps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sampling import Schedule, classifier_free_guidance, make_solver

# (step done, total steps); raising from it stops the loop (interrupt)
StepCallback = Callable[[int, int], None]
# the current estimate of the clean latent (x - sigma * v, float32, on the device): for live previews
PreviewCallback = Callable[[torch.Tensor], None]
# (latent batch [B, ...], context batch [B, rows, dim], step index) -> velocity [B, ...]
ModelCall = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# the latent after each solver step -> the latent the next step starts from (a kept first frame put back)
Constraint = Callable[[torch.Tensor], torch.Tensor]


def make_noise(shape: tuple[int, ...], seed: int, device: torch.device | str) -> torch.Tensor:
    """Standard normal float32 noise [1, *shape] from a generator of its own on ``device``, one draw."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((1, *shape), generator=generator, device=device, dtype=torch.float32)


def guided_velocity(
    call: ModelCall,
    x: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    index: int,
    cfg: float,
    batch_cfg: bool,
) -> torch.Tensor:
    """Classifier-free guided velocity; cfg 1 skips the unconditional pass."""
    if cfg == 1.0:
        return call(x, positive, index)
    if batch_cfg:
        cond, uncond = call(torch.cat([x, x]), torch.cat([positive, negative]), index).chunk(2)
    else:
        cond, uncond = call(x, positive, index), call(x, negative, index)
    return classifier_free_guidance(cond, uncond, cfg)


@torch.no_grad()
def denoise(
    call: ModelCall,
    noise: torch.Tensor,
    schedule: Schedule,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    cfg: float,
    solver: str,
    batch_cfg: bool = False,
    on_step: StepCallback | None = None,
    on_preview: PreviewCallback | None = None,
    constraint: Constraint | None = None,
) -> torch.Tensor:
    """Integrate the flow from ``noise`` along ``schedule``; returns the clean latent (float32).
    ``constraint``: applied to the start and after every step (the TI2V first frame, as the official loop).

    Nothing in the loop waits for the device (sigmas and solver coefficients are CPU numbers); only a
    preview callback that reads its tensor does."""
    stepper = make_solver(solver, schedule)
    x = noise if constraint is None else constraint(noise)
    for index in range(schedule.steps):
        velocity = guided_velocity(call, x, positive, negative, index, cfg, batch_cfg)
        if on_preview is not None:
            on_preview(x - float(schedule.sigmas[index]) * velocity)
        x = stepper.step(index, velocity, x)
        if constraint is not None:
            x = constraint(x)
        if on_step is not None:
            on_step(index + 1, schedule.steps)
    return x
