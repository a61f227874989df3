"""Wan2.2 VAE (z_dim 48): 4x temporal and 16x16 spatial compression of RGB video.

Same network, state-dict names and chunked causal numerics as the official Wan2.2 ``vae2_2`` module,
written for memory-bounded inference. This module is the public face: :class:`WanVAE` (encode/decode on
normalised latents, input checks) and the latent normalisation. The rest lives in

* :mod:`.vae_network` - the blocks, encoder and decoder (:class:`VAEConfig`, :class:`CausalCache`);
* :mod:`.vae_runner` - the per-call chunk loops: encode 4 frames at a time, decode streamed one latent
  frame at a time (:meth:`WanVAE.decode_stream`), :func:`decoder_cache_elements`, :func:`decoder_halo`;
* :mod:`.vae_split_ops` - convolutions and upsampling kept under :data:`MAX_OP_ELEMENTS` elements.

Encode and decode run without autograd.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..errors import ConfigError
from .vae_network import CausalConv3d, Decoder3d, Encoder3d, VAEConfig, patchify
from .vae_runner import decode_frames, decoder_cache_elements, decoder_halo, encode_chunks

# Re-exported for the callers of this module.
__all__ = [
    "LATENT_MEAN", "LATENT_STD", "VAEConfig", "WanVAE", "decoder_cache_elements", "decoder_halo",
    "denormalize_latent", "normalize_latent",
]

# Per-channel statistics of the raw latents (official Wan2_2_VAE); latents are normalised with them.
LATENT_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


# --------------------------------------------------------------------------------------------------
# Latent normalisation


def _latent_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=device)
    # The official code stores 1/std and multiplies by it (encode) or divides by it (decode).
    inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32, device=device)
    return mean, inv_std


def _channel_view(stats: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    if latent.dim() not in (4, 5) or latent.shape[-4] != len(LATENT_MEAN):
        raise ConfigError(
            f"expected a latent [B, {len(LATENT_MEAN)}, T, H, W] or [{len(LATENT_MEAN)}, T, H, W], "
            f"got shape {tuple(latent.shape)}")
    return stats.view(-1, 1, 1, 1)


def normalize_latent(mu: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent (mu) -> normalised latent, float32: (mu - mean) * (1 / std)."""
    mean, inv_std = _latent_stats(mu.device)
    return (mu.float() - _channel_view(mean, mu)) * _channel_view(inv_std, mu)


def denormalize_latent(z: torch.Tensor) -> torch.Tensor:
    """Normalised latent -> raw VAE latent, float32: z / (1 / std) + mean."""
    mean, inv_std = _latent_stats(z.device)
    return z.float() / _channel_view(inv_std, z) + _channel_view(mean, z)


# --------------------------------------------------------------------------------------------------
# The model


class WanVAE(nn.Module):
    """The Wan2.2 VAE. Inputs and outputs of encode/decode use normalised latents (LATENT_MEAN/STD)."""

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (F = 4n+1; H, W multiples of 16) -> normalised latent mu
        [B, z_dim, (F-1)//4 + 1, H/16, W/16] float32. Frame 0 is encoded alone, then 4 frames per call."""
        self._check_video(video)
        x = patchify(video.to(self.device, self.dtype))
        moments = self.conv1(encode_chunks(self.encoder, x))
        return normalize_latent(moments[:, :self.config.z_dim])

    def decode_stream(self, latent: torch.Tensor,
                      on_frame: Callable[[int, int], None] | None = None) -> Iterator[torch.Tensor]:
        """Decode one latent frame at a time: yields float32 frames [B, 3, n, 16h, 16w] in [-1, 1], n = 1 for
        the first latent frame and 4 after it. on_frame(done, total) runs after each latent frame; an
        exception raised there stops the decode. Inputs are checked now, before the first frame."""
        self._check_latent(latent)
        return self._stream(latent, on_frame)

    def _stream(self, latent: torch.Tensor, on_frame: Callable[[int, int], None] | None) -> Iterator[torch.Tensor]:
        # conv2 runs at the first frame request, after decode_stream's checks; no_grad never spans a yield
        # (see decode_frames)
        with torch.no_grad():
            x = self.conv2(denormalize_latent(latent.to(self.device)).to(self.dtype))
        yield from decode_frames(self.decoder, x, on_frame)

    def decode(self, latent: torch.Tensor, on_frame: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Normalised latent [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 16h, 16w] float32 in [-1, 1]."""
        stream = self.decode_stream(latent, on_frame)
        batch, _, frames, height, width = latent.shape
        video = torch.empty(batch, 3, 4 * (frames - 1) + 1, height * 16, width * 16, device=self.device)
        done = 0
        for chunk in stream:
            video[:, :, done:done + chunk.shape[2]] = chunk
            done += chunk.shape[2]
        return video

    def _check_video(self, video: torch.Tensor) -> None:
        if not torch.is_tensor(video) or video.dim() != 5:
            shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
            raise ConfigError(f"VAE encode expects a video tensor [B, 3, F, H, W], got {shape}")
        _, channels, frames, height, width = video.shape
        if channels != 3:
            raise ConfigError(
                f"VAE encode expects 3 colour channels at dim 1, got {channels} (shape {tuple(video.shape)})")
        if frames % 4 != 1:
            raise ConfigError(f"VAE encode needs 4n+1 frames (1, 5, ..., 121), got {frames}; trim or pad the video")
        if height % 16 or width % 16 or height == 0 or width == 0:
            raise ConfigError(f"VAE encode needs height and width that are multiples of 16, got {height}x{width}")
        if not video.is_floating_point():
            raise ConfigError(f"VAE encode expects floating-point pixels in [-1, 1], got dtype {video.dtype}")

    def _check_latent(self, latent: torch.Tensor) -> None:
        z_dim = self.config.z_dim
        if not torch.is_tensor(latent) or latent.dim() != 5:
            shape = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
            raise ConfigError(f"VAE decode expects a latent [B, {z_dim}, T, h, w], got {shape}")
        if latent.shape[1] != z_dim:
            raise ConfigError(
                f"VAE decode expects {z_dim} latent channels at dim 1, got {latent.shape[1]} "
                f"(shape {tuple(latent.shape)}); is this a Wan2.2 TI2V-5B latent?")
        if min(latent.shape[2:]) == 0:
            raise ConfigError(f"VAE decode got an empty latent, shape {tuple(latent.shape)}")
        if not latent.is_floating_point():
            raise ConfigError(f"VAE decode expects a floating-point latent, got dtype {latent.dtype}")
