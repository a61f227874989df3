"""The two PixelWizard stages: the LR anchor (50 steps at 448x256) and the HR shortcut stage (4 steps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..errors import ConfigError
from ..models.dit import WanDiT
from ..models.hr import WanHRDiT
from ..models.parallel import SequenceParallel
from ..sampling import flow_schedule
from .anchors import Anchor
from .first_frame import FirstFrame
from .memory import dit_activation_bytes, free_device_bytes
from .loop import PreviewCallback, StepCallback, denoise, make_noise
from .presets import LATENT_CHANNELS, StageSettings, check_size, check_stage, latent_frames
from .text import TextConditioning


def _device(model: torch.nn.Module) -> torch.device:
    return model.patch_embedding.weight.device


def cfg_batch_fits(tokens: int, free_bytes: int | None) -> bool | None:
    """Whether both CFG branches fit in one batch: the estimated activations of a batch-2 forward
    (doctor's measured bytes per token) within ``free_bytes``; None when there is no budget (CPU)."""
    if free_bytes is None:
        return None
    return dit_activation_bytes(tokens, batch=2) <= free_bytes


def _batch_cfg(choice: bool | None, default: bool, tokens: int, device: torch.device,
               sp: SequenceParallel | None) -> bool:
    """An explicit choice, else batch when it fits the device's free memory now (the model is placed).
    Sequence-parallel ranks keep the default: each must take the same branch or the collectives hang."""
    if choice is not None:
        return choice
    if sp is not None:
        return default
    fits = cfg_batch_fits(tokens, free_device_bytes(device))
    return default if fits is None else fits


def lr_anchor(
    dit: WanDiT,
    text: TextConditioning,
    settings: StageSettings,
    seed: int,
    *,
    model_id: str = "",
    batch_cfg: bool | None = None,
    on_step: StepCallback | None = None,
    on_preview: PreviewCallback | None = None,
    sp: SequenceParallel | None = None,
    first_frame: FirstFrame | None = None,
) -> Anchor:
    """Sample the low-resolution anchor with the base DiT or the PixelWizard LR model (``sp``: tokens split
    over a sequence-parallel group, every rank calls this and gets the whole anchor). ``batch_cfg``: run
    both CFG branches as one batch; None: when it fits the GPU's free memory (on a CPU: yes).
    ``first_frame``: a start image's latent kept as latent frame 0 (TI2V, :mod:`.first_frame`)."""
    check_stage(settings, hr=False)
    if first_frame is not None:
        first_frame.check(settings.latent_shape)
    device = _device(dit)
    batch_cfg = _batch_cfg(batch_cfg, True, settings.tokens, device, sp)
    schedule = flow_schedule(settings.steps, settings.shift)
    timesteps = schedule.timesteps.to(device=device, dtype=torch.float32)

    def call(x: torch.Tensor, context: torch.Tensor, index: int) -> torch.Tensor:
        return dit(x, _step_timesteps(timesteps[index], x, first_frame), context, sp=sp)

    text = text.to(device)
    latent = denoise(call, make_noise(settings.latent_shape, seed, device), schedule, text.positive, text.negative,
                     cfg=settings.cfg, solver=settings.solver, batch_cfg=batch_cfg, on_step=on_step,
                     on_preview=on_preview, constraint=None if first_frame is None else first_frame.constraint(device))
    return Anchor(latent=latent.cpu(), prompt=text.prompt, negative_prompt=text.negative_prompt, seed=seed,
                  width=settings.width, height=settings.height, frames=settings.frames, steps=settings.steps,
                  shift=settings.shift, cfg=settings.cfg, solver=settings.solver, model=model_id)


def _step_timesteps(t: torch.Tensor, x: torch.Tensor, first_frame: FirstFrame | None) -> torch.Tensor:
    """The step's timestep per sample [B], or per token [B, L] with a kept first frame (its tokens at 0)."""
    if first_frame is None:
        return t.expand(x.shape[0])
    return FirstFrame.token_timesteps(t, tuple(x.shape[1:])).expand(x.shape[0], -1)


def resize_anchor(latent: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize of each anchor frame to the HR token grid (H/32, W/32), as the reference does."""
    batch = latent.shape[0]
    per_frame = rearrange(latent, "b c t h w -> (b t) c h w").float()
    resized = F.interpolate(per_frame, size=(height // 32, width // 32), mode="bilinear", align_corners=False)
    return rearrange(resized, "(b t) c h w -> b c t h w", b=batch)


def check_anchor_fits(anchor_latent: torch.Tensor, settings: StageSettings) -> None:
    """The anchor must be a 48-channel latent with as many latent frames as the HR video."""
    if anchor_latent.dim() != 5 or anchor_latent.shape[:2] != (1, LATENT_CHANNELS):
        raise ConfigError(f"anchor latent has shape {tuple(anchor_latent.shape)}; expected [1, 48, T, h, w]")
    if anchor_latent.shape[2] != latent_frames(settings.frames):
        raise ConfigError(
            f"anchor has {anchor_latent.shape[2]} latent frames ({4 * (anchor_latent.shape[2] - 1) + 1} video frames) "
            f"but the HR stage was asked for {settings.frames} frames; the HR frame count follows the anchor"
        )


def hr_latent(
    model: WanHRDiT,
    anchor_latent: torch.Tensor,
    text: TextConditioning,
    settings: StageSettings,
    seed: int,
    *,
    batch_cfg: bool | None = None,
    on_step: StepCallback | None = None,
    on_preview: PreviewCallback | None = None,
    sp: SequenceParallel | None = None,
    first_frame: FirstFrame | None = None,
) -> torch.Tensor:
    """Sample the HR latent [1, 48, T, H/16, W/16] from pure noise, guided by the anchor in both CFG branches
    (``sp`` as in :func:`lr_anchor`; ``batch_cfg`` too, but on a CPU the branches run one after the other).
    ``first_frame``: a start image encoded at the HR size, pinned as latent frame 0 the way the anchor stage
    keeps it (untested with the released HR weights, which were not trained with it)."""
    check_stage(settings, hr=True)
    check_anchor_fits(anchor_latent, settings)
    if first_frame is not None:
        first_frame.check(settings.latent_shape)
    if not isinstance(model, WanHRDiT):
        raise ConfigError("the HR stage needs the PixelWizard HR model (2k/model.pt or 4k/model.pt), not a base DiT")
    device = _device(model)
    batch_cfg = _batch_cfg(batch_cfg, False, settings.tokens, device, sp)
    schedule = flow_schedule(settings.steps, settings.shift)
    timesteps = schedule.timesteps.to(device=device, dtype=torch.float32)
    step_sizes = schedule.step_sizes.to(device=device, dtype=torch.float32)
    anchor = resize_anchor(anchor_latent.to(device), settings.width, settings.height)

    def call(x: torch.Tensor, context: torch.Tensor, index: int) -> torch.Tensor:
        batch = x.shape[0]
        return model(x, _step_timesteps(timesteps[index], x, first_frame), context,
                     dt=step_sizes[index].expand(batch), anchor=anchor.expand(batch, -1, -1, -1, -1), sp=sp)

    text = text.to(device)
    return denoise(call, make_noise(settings.latent_shape, seed, device), schedule, text.positive, text.negative,
                   cfg=settings.cfg, solver=settings.solver, batch_cfg=batch_cfg, on_step=on_step,
                   on_preview=on_preview,
                   constraint=None if first_frame is None else first_frame.constraint(device)).cpu()


def anchor_from_video(vae, frames: torch.Tensor, width: int, height: int, prompt: str = "") -> Anchor:
    """Anchor from existing footage: frames [F, H, W, 3] in 0..1 are cut to the longest 4k+1 prefix,
    resized to ``width`` x ``height`` and encoded with the VAE (normalised latent)."""
    check_size(width, height)
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ConfigError(f"expected video frames [F, H, W, 3], got {tuple(frames.shape)}")
    count = (frames.shape[0] - 1) // 4 * 4 + 1
    video = rearrange(frames[:count], "f h w c -> f c h w").float()
    video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    video = rearrange((video * 2 - 1).clamp(-1, 1), "f c h w -> 1 c f h w")
    return Anchor.from_latent(vae.encode(video.to(vae.device)).cpu(), model="video", prompt=prompt)
