"""LR anchors synthesised from HR clips by the reference trainer's degradation.

Per batch (one draw for all frames, so the anchor stays temporally consistent): area-downsample the HR
frames by a factor f ~ U(8, 16), bilinear-resize to 256x448, Gaussian blur with a kernel size drawn from
{7, 9} and sigma ~ U(3, 4.3); optionally add pixel noise (the reference's code for that is broken, so it
is off by default). The blurred frames are VAE-encoded and the latent is bilinear-resized per frame to the
HR token grid (H/32, W/32), the grid the anchor has at inference (the reference resized to the latent
grid H/16, W/16 in training; how its model then reached the token grid is not recorded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..pipeline.stages import resize_anchor


@dataclass(frozen=True)
class DegradeConfig:
    """Degradation options; the defaults are the reference trainer's (commit 35014d68)."""

    down_range: tuple[float, float] = (8.0, 16.0)
    size: tuple[int, int] = (256, 448)           # (height, width) of the degraded frames
    blur_kernels: tuple[int, ...] = (7, 9)
    blur_sigma_range: tuple[float, float] = (3.0, 4.3)
    noise_prob: float = 0.0
    noise_max: float = 0.1

    def __post_init__(self) -> None:
        low, high = self.down_range
        if not 1.0 <= low <= high:
            raise ConfigError(f"down-sampling range must satisfy 1 <= min <= max (reference 8, 16), got {self.down_range}")
        if any(k < 1 or k % 2 == 0 for k in self.blur_kernels) or not self.blur_kernels:
            raise ConfigError(f"blur kernel sizes must be odd and positive (reference 7, 9), got {self.blur_kernels}")
        if not 0 < self.blur_sigma_range[0] <= self.blur_sigma_range[1]:
            raise ConfigError(f"blur sigma range must satisfy 0 < min <= max (reference 3, 4.3), got {self.blur_sigma_range}")
        if any(s % 16 for s in self.size):
            raise ConfigError(f"degraded size {self.size} must be multiples of 16 (the VAE's stride)")


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, float32."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).float()


def gaussian_blur(images: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] with reflect padding (as torchvision's gaussian_blur)."""
    taps = gaussian_kernel(size, sigma).to(images.device, images.dtype)
    channels, pad = images.shape[1], size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, taps.reshape(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, taps.reshape(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def degrade_frames(frames: torch.Tensor, config: DegradeConfig, generator: torch.Generator) -> torch.Tensor:
    """[N, 3, H, W] HR frames in [-1, 1] -> [N, 3, *config.size] degraded frames (one draw for all N)."""
    if frames.dim() != 4:
        raise ConfigError(f"degrade_frames expects frames [N, 3, H, W], got {tuple(frames.shape)}")
    factor = _uniform(*config.down_range, generator)
    kernel = config.blur_kernels[int(torch.randint(len(config.blur_kernels), (), generator=generator,
                                                   device=generator.device))]
    sigma = _uniform(*config.blur_sigma_range, generator)
    noisy = float(torch.rand((), generator=generator, device=generator.device)) < config.noise_prob
    level = _uniform(0.0, config.noise_max, generator)
    height, width = frames.shape[-2:]
    small = (max(1, int(height / factor)), max(1, int(width / factor)))
    x = F.interpolate(frames.float(), size=small, mode="area")
    x = F.interpolate(x, size=config.size, mode="bilinear", align_corners=False)
    x = gaussian_blur(x, kernel, sigma)
    if noisy:
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        x = x + level * noise
    return x


@torch.no_grad()
def synthesize_anchor(vae: torch.nn.Module, video: torch.Tensor, config: DegradeConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """HR video [B, 3, F, H, W] in [-1, 1] -> anchor latent [B, 48, T, H/32, W/32] (token grid)."""
    batch, channels, frames, height, width = video.shape
    if height % 32 or width % 32:
        raise ConfigError(f"HR clip size {width}x{height} must be multiples of 32 (VAE 16 x DiT patch 2)")
    per_frame = video.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    low = degrade_frames(per_frame, config, generator)
    low = low.reshape(batch, frames, channels, *config.size).permute(0, 2, 1, 3, 4)
    return resize_anchor(vae.encode(low), width, height)
