"""Training the toy Wan2.2 VAE to reconstruct the world's clips.

The VAE's own encode/decode run without autograd (inference code); training runs the same network pieces
in the same chunk order (frame 0 alone, then 4 frames per encoder call; one latent frame per decoder call
with the causal cache) with gradients. The loss is L1 + MSE on pixels, weighted towards the object, plus a
small term that keeps the *normalised* latents (the fixed Wan2.2 channel mean/std tables) near zero mean
and unit variance, so the DiTs see latents of the scale the real ones do. Gaussian noise on the latent
before decoding makes the decoder tolerant of the DiTs' small errors.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from ..models.vae import WanVAE, denormalize_latent, normalize_latent
from ..models.vae_network import CausalCache, patchify, unpatchify
from ..models.vae_runner import encode_chunks
from .world import random_scene, render, to_model_video

log = logging.getLogger("pixelwizard")


def encode_with_grad(vae: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """Normalised latent of video [B, 3, 4n+1, H, W] in -1..1, differentiable."""
    moments = vae.conv1(encode_chunks(vae.encoder, patchify(video)))
    return normalize_latent(moments[:, :vae.config.z_dim])


def decode_with_grad(vae: WanVAE, latent: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, 4(T-1)+1, 16h, 16w] (not clamped) of a normalised latent, differentiable."""
    x = vae.conv2(denormalize_latent(latent))
    cache = CausalCache()
    frames = []
    for i in range(x.shape[2]):
        cache.first_chunk = i == 0
        frames.append(unpatchify(vae.decoder(x[:, :, i:i + 1], cache)))
    return torch.cat(frames, 2)


def _crop_around_object(clip: torch.Tensor, scene, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A crop x crop window of clip [F, H, W, 3] near the object (most windows would be background only)."""
    frames, height, width, _ = clip.shape
    if height <= crop and width <= crop:
        return clip
    cx, cy = scene.x * width, scene.y * height
    jitter = (torch.rand(2, generator=generator) - 0.5) * crop
    left = int(min(max(cx - crop / 2 + float(jitter[0]), 0), width - crop))
    top = int(min(max(cy - crop / 2 + float(jitter[1]), 0), height - crop))
    return clip[:, top:top + crop, left:left + crop]


def vae_batch(batch: int, shape: tuple[int, int, int], crop: int, generator: torch.Generator) -> torch.Tensor:
    """[B, 3, F, crop or H, crop or W] in -1..1: fresh random scenes rendered at ``shape`` (W, H, F), cropped."""
    width, height, frames = shape
    clips = []
    for _ in range(batch):
        scene = random_scene(generator, max(frames, 5))
        clip = render(scene, width, height, max(frames, 5))
        start = int(torch.randint(clip.shape[0] - frames + 1, (), generator=generator))
        clips.append(_crop_around_object(clip[start:start + frames], scene, crop, generator))
    return torch.cat([to_model_video(c) for c in clips])


def object_weights(video: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, F, H, W]: 1 + ``weight`` on and around the object (saturated pixels),
    normalised to mean 1. The object covers a few percent of a frame, and it is what the world is about."""
    rgb = (video + 1) / 2
    high, low = rgb.amax(1, keepdim=True), rgb.amin(1, keepdim=True)
    mask = ((high - low) / high.clamp_min(1e-6) > 0.35).float()
    near = F.max_pool3d(mask, (1, 5, 5), stride=1, padding=(0, 2, 2))
    weights = 1 + weight * near
    return weights / weights.mean()


def latent_stats_penalty(latent: torch.Tensor) -> torch.Tensor:
    """Mean over channels of mean^2 + log(std)^2 of the normalised latent (0 at zero mean, unit std)."""
    flat = latent.transpose(0, 1).flatten(1)
    return (flat.mean(1).pow(2) + flat.std(1).clamp_min(1e-4).log().pow(2)).mean()


def train_vae(vae: WanVAE, *, steps: int, lr: float, mix: tuple[tuple[int, int, int, int, int], ...], seed: int,
              latent_noise: float = 0.05, stats_weight: float = 0.02, object_weight: float = 10.0,
              decoder_only: bool = False) -> list[float]:
    """Train ``vae`` in place; step i renders fresh scenes as ``mix[i % len(mix)]`` says: (width, height,
    frames, batch, crop), the crop a square window around the object (whole frames when they fit; single
    frames are cheap and teach the spatial part). ``decoder_only``: the encoder stays fixed (so latents
    encoded before stay valid) and only the decoder learns. Returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    trained = [p for name, p in vae.named_parameters()
               if not decoder_only or name.startswith(("decoder.", "conv2."))]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    vae.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        width, height, frames, batch, crop = mix[step % len(mix)]
        video = vae_batch(batch, (width, height, frames), crop, generator)
        with torch.set_grad_enabled(not decoder_only):
            latent = encode_with_grad(vae, video)
        noise = torch.randn(latent.shape, generator=generator) * latent_noise
        recon = decode_with_grad(vae, latent + noise)
        error = recon - video
        weights = object_weights(video, object_weight)
        loss = (weights * (error.abs() + error.pow(2))).mean()
        if not decoder_only:
            loss = loss + stats_weight * latent_stats_penalty(latent)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            seconds = time.perf_counter() - start
            log.info("vae step %d/%d loss %.4f (%.0f s)", step + 1, steps, losses[-1], seconds)
    vae.eval()
    return losses
