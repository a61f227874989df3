"""The Wan2.2 VAE network (z_dim 48): causal convolutions, residual, attention and resampling blocks,
encoder, decoder and the 2x2 patchify, with the official ``vae2_2`` module's structure and state-dict names.

The causal history of every temporal convolution lives in a :class:`CausalCache` passed down the forward,
never on the modules, so calls cannot leak into each other; the loops that create one per call and feed the
network a chunk at a time are in :mod:`.vae_runner`. Convolutions go through the size-limited ops of
:mod:`.vae_split_ops`. Forwards run without autograd and use in-place ops on tensors they have just created.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import ConfigError
from .vae_split_ops import causal_conv3d, frame_conv2d, image_conv2d


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the Wan2.2 VAE; the defaults are the published Wan2.2_VAE.pth."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if self.attn_scales:
            raise ConfigError(
                f"VAEConfig.attn_scales={self.attn_scales!r}: the Wan2.2 VAE has attention only in its middle "
                "blocks; leave attn_scales empty")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"VAEConfig.temporal_downsample has {len(self.temporal_downsample)} entries; it needs one per "
                f"downsampling stage, len(dim_mult) - 1 = {len(self.dim_mult) - 1}")

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temporal_downsample))

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Same structure (stages, blocks, strides, z_dim 48) with narrow channels, for tests."""
        return cls(dim=4, dec_dim=4)


# --------------------------------------------------------------------------------------------------
# Per-call causal state

# Frames of input history each temporal (kernel 3) convolution keeps between chunks.
CACHE_FRAMES = 2


class CausalCache:
    """History of the causal convolutions for one encode or decode call.

    Each temporal convolution keeps the last CACHE_FRAMES frames of its input from the previous chunk,
    keyed by the module itself. `first_chunk` tells the decoder's temporal upsamplers that the chunk is
    the first latent frame (no temporal upsampling, one output frame).
    """

    def __init__(self) -> None:
        self.history: dict[nn.Module, torch.Tensor] = {}
        self.first_chunk = True


def _tail(x: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
    """The last CACHE_FRAMES frames of the stream [.., history, x] (fewer at the start of the stream)."""
    frames = x.shape[2]
    if frames > CACHE_FRAMES:
        return x[:, :, -CACHE_FRAMES:].clone()  # a copy, so the whole of x can be freed
    if frames == 1 and history is not None:
        return torch.cat([history[:, :, -1:], x], 2)
    return x  # x is never modified after it was fed to the convolution: no copy needed


# --------------------------------------------------------------------------------------------------
# Blocks


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only towards the past in time (zeros or the cached frames of the previous chunk)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        time_pad, height_pad, width_pad = (padding,) * 3 if isinstance(padding, int) else padding
        assert height_pad == width_pad, "the Wan VAE pads H and W alike"
        self.time_pad = 2 * time_pad  # all of it in front
        self.space_pad = height_pad

    def run(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve x preceded by `history` frames; zero frames fill the rest of the front padding."""
        kept = 0 if history is None else history.shape[2]
        return causal_conv3d(x, history, self.weight, self.bias, max(self.time_pad - kept, 0), self.space_pad,
                             self.stride[0])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if cache is None or self.time_pad == 0:
            return self.run(x)
        history = cache.history.get(self)
        cache.history[self] = _tail(x, history)
        return self.run(x, history)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gain (the official RMS_norm)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


def _norm_silu(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(norm(x), inplace=True)


class ResidualBlock(nn.Module):
    """[RMSNorm, SiLU, conv3x3x3, RMSNorm, SiLU, Dropout, conv3x3x3] + (1x1x1 conv or identity) shortcut."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Sequential only to keep the official key indices (0, 2, 3, 6); forward walks it by hand.
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(_norm_silu(norm1, x), cache)
        h = conv2(_norm_silu(norm2, h), cache)
        return h.add_(self.shortcut(x))  # shortcut last: its output is not held during the convolutions


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, _, height, _ = x.shape
        images = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        qkv = image_conv2d(images, self.to_qkv.weight, self.to_qkv.bias)
        # One head over the h*w tokens; q, k and v are consecutive thirds of the channels.
        q, k, v = rearrange(qkv, "n c h w -> n 1 (h w) c").contiguous().chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = rearrange(attended, "n 1 (h w) c -> n c h w", h=height)
        out = image_conv2d(attended, self.proj.weight, self.proj.bias)
        return rearrange(out, "(b t) c h w -> b c t h w", b=batch) + x


class Resample(nn.Module):
    """x2 spatial down/upsampling per frame, with an optional x2 temporal step (`time_conv`).

    upsample3d: a causal (3,1,1) conv to 2C channels whose halves become two consecutive frames (not on
    the first latent frame), then nearest-exact x2 and a 3x3 conv. downsample3d: bottom/right zero pad
    and a 3x3 stride-2 conv, then a (3,1,1) stride-2 conv over [last frame of the previous chunk, x]
    (skipped on the first chunk).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(f"Resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        # Sequential keeps the official key names (resample.1.*); forward uses the conv directly.
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        conv = self.resample[1]
        if self.mode.startswith("up"):
            if self.mode == "upsample3d" and not cache.first_chunk:
                x = self._double_frames(self.time_conv(x, cache))
            return frame_conv2d(x, conv.weight, conv.bias, pad=(1, 1, 1, 1), upsample=True)
        x = frame_conv2d(x, conv.weight, conv.bias, stride=2, pad=(0, 1, 0, 1))
        if self.mode == "downsample3d":
            previous = cache.history.get(self)
            cache.history[self] = x[:, :, -1:].clone()  # a copy: the caller adds into x in place
            if previous is not None:
                x = self.time_conv.run(x, previous)
        return x

    @staticmethod
    def _double_frames(y: torch.Tensor) -> torch.Tensor:
        """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: channel half 0 gives frame 2t, half 1 frame 2t+1."""
        return rearrange(y, "b (half c) t h w -> b c (t half) h w", half=2)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: fold (factor_t, factor_s, factor_s) blocks into channels, then average
    consecutive channel groups down to out_channels. Time is zero padded in front to a multiple of factor_t."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        folded = in_channels * factor_t * factor_s * factor_s
        assert folded % out_channels == 0
        self.group = folded // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        missing = -x.shape[2] % ft
        if missing:
            x = F.pad(x, (0, 0, 0, 0, missing, 0))
        folded = rearrange(x, "b c (t dt) (h dy) (w dx) -> b (c dt dy dx) t h w", dt=ft, dy=fs, dx=fs)
        # .mean(dim=2) on the contiguous grouped tensor, like the official code: einops.reduce would move the
        # group axis last, which can change the summation order
        return rearrange(folded, "b (o g) t h w -> b o g t h w", g=self.group).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut, inverse of AvgDown3D: repeat each channel, then unfold channel blocks into
    (factor_t, factor_s, factor_s) blocks of time and space. On the first chunk the first factor_t - 1
    frames are dropped (the first latent frame stands for one video frame)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        unfolded = out_channels * factor_t * factor_s * factor_s
        assert unfolded % in_channels == 0
        self.repeats = unfolded // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        y = x.repeat_interleave(self.repeats, dim=1)
        y = rearrange(y, "b (c dt dy dx) t h w -> b c (t dt) (h dy) (w dx)", dt=ft, dy=fs, dx=fs)
        return y[:, :, ft - 1:] if first_chunk else y

    def add_into(self, out: torch.Tensor, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """out += forward(x, first_chunk), one input frame at a time to bound the temporary."""
        drop = self.factor_t - 1 if first_chunk else 0
        for i in range(x.shape[2]):
            piece = self.forward(x[:, :, i:i + 1])
            start = i * self.factor_t - drop
            skip = max(-start, 0)
            out[:, :, start + skip:start + piece.shape[2]].add_(piece[:, :, skip:])
        return out


def _residual_stack(in_dim: int, out_dim: int, num_res_blocks: int, resample: str | None) -> nn.Sequential:
    """A stage's residual blocks, then its Resample (``resample`` mode, or None when it keeps the size)."""
    blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
    if resample is not None:
        blocks.append(Resample(out_dim, resample))
    return nn.Sequential(*blocks)


def _run_stack(stack: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for block in stack:
        x = block(x, cache)
    return x


class DownBlock(nn.Module):
    """Encoder stage: residual blocks (+ Resample down) plus an AvgDown3D shortcut (Down_ResidualBlock)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if spatial else 1)
        resample = ("downsample3d" if temporal else "downsample2d") if spatial else None
        self.downsamples = _residual_stack(in_dim, out_dim, num_res_blocks, resample)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return _run_stack(self.downsamples, x, cache).add_(self.avg_shortcut(x))


class UpBlock(nn.Module):
    """Decoder stage: residual blocks (+ Resample up) plus a DupUp3D shortcut when it upsamples (Up_ResidualBlock)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2)
                             if spatial else None)
        resample = ("upsample3d" if temporal else "upsample2d") if spatial else None
        self.upsamples = _residual_stack(in_dim, out_dim, num_res_blocks, resample)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = _run_stack(self.upsamples, x, cache)
        if self.avg_shortcut is None:
            return h
        return self.avg_shortcut.add_into(h, x, cache.first_chunk)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_channels, 3, padding=1))


class Encoder3d(nn.Module):
    """Patchified video chunk [B, 12, t, H/2, W/2] -> [B, 2*z_dim, latent frames, H/16, W/16]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            DownBlock(dims[i], dims[i + 1], config.num_res_blocks,
                      temporal=i < last and config.temporal_downsample[i], spatial=i != last)
            for i in range(len(config.dim_mult))])
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], config.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        first, attention, second = self.middle
        x = second(attention(first(x, cache)), cache)
        return self.head[2](_norm_silu(self.head[0], x), cache)


class Decoder3d(nn.Module):
    """One latent frame [B, z_dim, 1, h, w] -> patchified frames [B, 12, 1 or 4, 8h, 8w]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.dec_dim * m for m in (mult[-1], *reversed(mult))]
        last = len(mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = nn.Sequential(*[
            UpBlock(dims[i], dims[i + 1], config.num_res_blocks + 1,
                    temporal=i < last and config.temporal_upsample[i], spatial=i != last)
            for i in range(len(mult))])
        self.head = _head(dims[-1], 12)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        first, attention, second = self.middle
        x = second(attention(first(x, cache)), cache)
        for stage in self.upsamples:
            x = stage(x, cache)
        return self.head[2](_norm_silu(self.head[0], x), cache)


# --------------------------------------------------------------------------------------------------
# 2x2 spatial patches <-> channels (outside the encoder and decoder)


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] -> [B, 12, F, H/2, W/2]; channel c*4 + dx*2 + dy for pixel offset (dy, dx)."""
    return rearrange(video, "b c f (h dy) (w dx) -> b (c dx dy) f h w", dy=2, dx=2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of patchify: [B, 12, F, h, w] -> [B, 3, F, 2h, 2w]."""
    return rearrange(x, "b (c dx dy) f h w -> b c f (h dy) (w dx)", dy=2, dx=2)


