"""Wan2.2 VAE (z_dim 48): 4x temporal and 16x16 spatial compression of RGB video.

Same network, state-dict names and chunked causal numerics as the official Wan2.2 ``vae2_2`` module,
written for memory-bounded inference:

* The causal history of every temporal convolution lives in a :class:`CausalCache` created for each
  encode/decode call and passed down the forward, never on the modules, so calls cannot leak into
  each other.
* No convolution or nearest upsample is ever issued on a tensor (input or output) of more than
  :data:`MAX_OP_ELEMENTS` elements: larger ones are split by frame and, when one frame is too large,
  into row/column tiles carrying the halo the kernel reads. Every output element is computed from
  exactly the same inputs, so the split result equals the unsplit one up to the accumulation order of
  the convolution backend.
* Decoding streams one latent frame at a time (:meth:`WanVAE.decode_stream`).

Encode and decode run without autograd and use in-place ops on tensors they have just created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

log = logging.getLogger("pixelwizard")

# PyTorch/cuDNN convolutions and nearest upsampling use int32 index math and need numel < 2**31 - 1.
# Half of that leaves a margin for backends that count bytes or padded buffers, and bounds the tile
# temporaries; up to 720p nothing is split (largest op about 0.7e9 elements). Module-level so that
# tests can lower it to force the splitting paths on tiny tensors.
MAX_OP_ELEMENTS: int = 2**30

# Frames of input history each temporal (kernel 3) convolution keeps between chunks.
CACHE_FRAMES = 2

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
# Size-limited convolution and upsampling


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _plan_tiles(frames: int, rows: int, cols: int, cost: Callable[[int, int, int], int]) -> tuple[int, int, int]:
    """Largest tile (output frames, rows, cols) whose cost fits MAX_OP_ELEMENTS.

    Fewer frames are tried first (no halo), then row bands of one frame, then column bands of one row.
    """
    limit = MAX_OP_ELEMENTS
    for f in range(frames, 0, -1):
        if cost(f, rows, cols) <= limit:
            return f, rows, cols
    for bands in range(2, rows + 1):
        r = -(-rows // bands)
        if cost(1, r, cols) <= limit:
            return 1, r, cols
    for bands in range(2, cols + 1):
        c = -(-cols // bands)
        if cost(1, 1, c) <= limit:
            return 1, 1, c
    raise ConfigError(
        f"MAX_OP_ELEMENTS={limit} is smaller than a single output pixel of a VAE convolution "
        f"({cost(1, 1, 1)} elements); raise it")


def _window(out0: int, out1: int, kernel: int, stride: int, pad_before: int, size: int) -> tuple[int, int, int, int]:
    """Input span [start, stop) clipped to [0, size) that outputs [out0, out1) read, and the zero padding
    (before, after) that stands in for the part outside the input."""
    start = out0 * stride - pad_before
    stop = (out1 - 1) * stride + kernel - pad_before
    return max(start, 0), min(stop, size), max(-start, 0), max(stop - size, 0)


def causal_conv3d(x: torch.Tensor, history: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor | None, front_pad: int, space_pad: int, time_stride: int = 1) -> torch.Tensor:
    """Conv3d over the frames [front_pad zero frames, history, x], zero padded by space_pad in H and W."""
    batch, channels, frames, height, width = x.shape
    kept = 0 if history is None else history.shape[2]
    out_channels, _, kt, kh, kw = weight.shape
    out_t = (front_pad + kept + frames - kt) // time_stride + 1
    out_h = height + 2 * space_pad - kh + 1
    out_w = width + 2 * space_pad - kw + 1

    def cost(f: int, r: int, c: int) -> int:
        return max(channels * ((f - 1) * time_stride + kt) * (r + kh - 1) * (c + kw - 1), out_channels * f * r * c)

    if batch * cost(out_t, out_h, out_w) <= MAX_OP_ELEMENTS:
        full = x if history is None else torch.cat([history, x], 2)
        if front_pad or space_pad:
            full = F.pad(full, (space_pad, space_pad, space_pad, space_pad, front_pad, 0))
        return F.conv3d(full, weight, bias, stride=(time_stride, 1, 1))

    tile_t, tile_h, tile_w = _plan_tiles(out_t, out_h, out_w, cost)
    log.debug("VAE conv3d %s split into tiles of %d frames x %d x %d", tuple(x.shape), tile_t, tile_h, tile_w)
    sources = [(history, front_pad), (x, front_pad + kept)] if history is not None else [(x, front_pad)]
    out = x.new_empty(batch, out_channels, out_t, out_h, out_w)
    for b in range(batch):
        for t0, t1 in _ranges(out_t, tile_t):
            first, last = t0 * time_stride, (t1 - 1) * time_stride + kt  # virtual frame span
            for r0, r1 in _ranges(out_h, tile_h):
                ra, rb, pad_top, pad_bottom = _window(r0, r1, kh, 1, space_pad, height)
                for c0, c1 in _ranges(out_w, tile_w):
                    ca, cb, pad_left, pad_right = _window(c0, c1, kw, 1, space_pad, width)
                    parts = [
                        src[b:b + 1, :, max(first, at) - at:min(last, at + src.shape[2]) - at, ra:rb, ca:cb]
                        for src, at in sources if max(first, at) < min(last, at + src.shape[2])
                    ]
                    tile = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
                    pads = (pad_left, pad_right, pad_top, pad_bottom, max(front_pad - first, 0), 0)
                    if any(pads):
                        tile = F.pad(tile, pads)
                    out[b:b + 1, :, t0:t1, r0:r1, c0:c1] = F.conv3d(tile, weight, bias, stride=(time_stride, 1, 1))
    return out


def _upsample2x(images: torch.Tensor) -> torch.Tensor:
    # Computed in float32 like the official module (nearest upsampling once lacked bfloat16 kernels).
    up = F.interpolate(images.float(), scale_factor=(2.0, 2.0), mode="nearest-exact")
    return up.to(images.dtype)


def _conv2d(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
            pad: tuple[int, int, int, int]) -> torch.Tensor:
    if len(set(pad)) == 1:  # symmetric: let the convolution pad, as nn.Conv2d(padding=p) does
        return F.conv2d(images, weight, bias, stride=stride, padding=pad[0])
    return F.conv2d(F.pad(images, pad), weight, bias, stride=stride)


def frame_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, stride: int = 1,
                 pad: tuple[int, int, int, int] = (0, 0, 0, 0), upsample: bool = False) -> torch.Tensor:
    """Conv2d applied to every frame of x [B, C, T, H, W], after a nearest-exact x2 upsample if asked.

    pad is (left, right, top, bottom) zero padding of the (upsampled) frame. Returns [B, C_out, T, H', W']
    (possibly a non-contiguous view).
    """
    batch, channels, frames, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    left, right, top, bottom = pad
    factor = 2 if upsample else 1
    in_h, in_w = height * factor, width * factor
    out_h = (in_h + top + bottom - kh) // stride + 1
    out_w = (in_w + left + right - kw) // stride + 1
    slack = 2 if upsample else 0  # an upsampled tile may start and end one row/column early/late

    def cost(f: int, r: int, c: int) -> int:
        rows_in, cols_in = (r - 1) * stride + kh + slack, (c - 1) * stride + kw + slack
        return max(f * channels * rows_in * cols_in, f * out_channels * r * c)

    if batch * cost(frames, out_h, out_w) <= MAX_OP_ELEMENTS:
        images = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        if upsample:
            images = _upsample2x(images)
        y = _conv2d(images, weight, bias, stride, pad)
        return y.view(batch, frames, out_channels, out_h, out_w).transpose(1, 2)

    tile_t, tile_h, tile_w = _plan_tiles(frames, out_h, out_w, cost)
    log.debug("VAE conv2d %s split into tiles of %d frames x %d x %d", tuple(x.shape), tile_t, tile_h, tile_w)
    out = x.new_empty(batch, out_channels, frames, out_h, out_w)
    for b in range(batch):
        for t0, t1 in _ranges(frames, tile_t):
            for r0, r1 in _ranges(out_h, tile_h):
                ra, rb, pad_top, pad_bottom = _window(r0, r1, kh, stride, top, in_h)
                for c0, c1 in _ranges(out_w, tile_w):
                    ca, cb, pad_left, pad_right = _window(c0, c1, kw, stride, left, in_w)
                    lo_r, lo_c = ra // factor, ca // factor
                    hi_r, hi_c = (rb - 1) // factor + 1, (cb - 1) // factor + 1
                    tile = x[b, :, t0:t1, lo_r:hi_r, lo_c:hi_c].transpose(0, 1)
                    if upsample:
                        off_r, off_c = ra - 2 * lo_r, ca - 2 * lo_c
                        tile = _upsample2x(tile)[:, :, off_r:off_r + rb - ra, off_c:off_c + cb - ca]
                    pads = (pad_left, pad_right, pad_top, pad_bottom)
                    if any(pads):
                        tile = F.pad(tile, pads)
                    y = F.conv2d(tile, weight, bias, stride=stride)
                    out[b, :, t0:t1, r0:r1, c0:c1] = y.transpose(0, 1)
    return out


def image_conv2d(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Unpadded conv2d of images [N, C, H, W] under the same size limit (frames of one batch item)."""
    y = frame_conv2d(images.unsqueeze(0).transpose(1, 2), weight, bias)
    return y.transpose(1, 2).squeeze(0)


# --------------------------------------------------------------------------------------------------
# Per-call causal state


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
        batch, channels, frames, height, width = x.shape
        images = self.norm(x.transpose(1, 2).reshape(batch * frames, channels, height, width))
        qkv = image_conv2d(images, self.to_qkv.weight, self.to_qkv.bias)
        tokens = qkv.reshape(batch * frames, 1, channels * 3, height * width).permute(0, 1, 3, 2).contiguous()
        q, k, v = tokens.chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.squeeze(1).permute(0, 2, 1).reshape(batch * frames, channels, height, width)
        out = image_conv2d(attended, self.proj.weight, self.proj.bias)
        return out.view(batch, frames, channels, height, width).transpose(1, 2) + x


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
        batch, channels2, frames, height, width = y.shape
        halves = y.view(batch, 2, channels2 // 2, frames, height, width).permute(0, 2, 3, 1, 4, 5)
        return halves.reshape(batch, channels2 // 2, frames * 2, height, width)


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
        batch, channels, frames, height, width = x.shape
        blocks = x.reshape(batch, channels, frames // ft, ft, height // fs, fs, width // fs, fs)
        blocks = blocks.permute(0, 1, 3, 5, 7, 2, 4, 6)  # channel-major: (c, dt, dy, dx)
        blocks = blocks.reshape(batch, self.out_channels, self.group, frames // ft, height // fs, width // fs)
        return blocks.mean(dim=2)


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
        batch, _, frames, height, width = x.shape
        y = x.repeat_interleave(self.repeats, dim=1)
        y = y.view(batch, self.out_channels, ft, fs, fs, frames, height, width).permute(0, 1, 5, 2, 6, 3, 7, 4)
        y = y.reshape(batch, self.out_channels, frames * ft, height * fs, width * fs)
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


class DownBlock(nn.Module):
    """Encoder stage: residual blocks (+ Resample down) plus an AvgDown3D shortcut (Down_ResidualBlock)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if spatial else 1)
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = x
        for block in self.downsamples:
            h = block(h, cache)
        return h.add_(self.avg_shortcut(x))


class UpBlock(nn.Module):
    """Decoder stage: residual blocks (+ Resample up) plus a DupUp3D shortcut when it upsamples (Up_ResidualBlock)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2)
                             if spatial else None)
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = x
        for block in self.upsamples:
            h = block(h, cache)
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


def decoder_halo(config: VAEConfig) -> int:
    """Output pixels next to a cut edge that a decode of a cropped latent can get wrong (conv receptive field).

    Every 3x3(x3) convolution widens the affected band by one column at its resolution and every x2
    upsample doubles it; the unpatchify doubles it once more. 276 pixels (17.25 latent columns) for the
    Wan2.2 structure, whatever the channel widths. The middle attention block is NOT included: it mixes
    all positions of a frame, so no finite overlap makes a tiled decode exact.
    """
    band = 1 + 2 * 2  # decoder.conv1, two convolutions in each middle residual block
    for i in range(len(config.dim_mult)):
        band += 2 * (config.num_res_blocks + 1)
        if i != len(config.dim_mult) - 1:
            band = 2 * band + 1  # nearest x2, then the 3x3 convolution
    band += 1  # head convolution
    return 2 * band


def decoder_cache_elements(config: VAEConfig, latent_hw: tuple[int, int]) -> int:
    """Elements of the decoder's causal caches once it streams (after a few latent frames) for a latent of
    ``latent_hw``: exact, counted on the meta device (no memory, no compute). Bytes: times the element size."""
    with torch.device("meta"):
        model = WanVAE(config)
    x = torch.empty(1, config.z_dim, 3, *latent_hw, device="meta")
    cache = CausalCache()
    with torch.no_grad():
        for i in range(3):
            cache.first_chunk = i == 0
            model.decoder(x[:, :, i:i + 1], cache)
    return sum(t.numel() for t in cache.history.values())


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] -> [B, 12, F, H/2, W/2]; channel c*4 + dx*2 + dy for pixel offset (dy, dx)."""
    batch, channels, frames, height, width = video.shape
    x = video.reshape(batch, channels, frames, height // 2, 2, width // 2, 2)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(batch, channels * 4, frames, height // 2, width // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of patchify: [B, 12, F, h, w] -> [B, 3, F, 2h, 2w]."""
    batch, channels, frames, height, width = x.shape
    y = x.reshape(batch, channels // 4, 2, 2, frames, height, width)
    return y.permute(0, 1, 4, 5, 3, 6, 2).reshape(batch, channels // 4, frames, height * 2, width * 2)


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
        cache = CausalCache()
        latents = []
        for start, stop in [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((x.shape[2] - 1) // 4)]:
            latents.append(self.encoder(x[:, :, start:stop], cache))
            cache.first_chunk = False
        del cache
        moments = self.conv1(torch.cat(latents, 2))
        return normalize_latent(moments[:, :self.config.z_dim])

    def decode_stream(self, latent: torch.Tensor,
                      on_frame: Callable[[int, int], None] | None = None) -> Iterator[torch.Tensor]:
        """Decode one latent frame at a time: yields float32 frames [B, 3, n, 16h, 16w] in [-1, 1], n = 1 for
        the first latent frame and 4 after it. on_frame(done, total) runs after each latent frame; an
        exception raised there stops the decode. Inputs are checked now, before the first frame."""
        self._check_latent(latent)
        return self._stream(latent, on_frame)

    def _stream(self, latent: torch.Tensor, on_frame: Callable[[int, int], None] | None) -> Iterator[torch.Tensor]:
        # no_grad per step, not as a decorator: torch's generator wrapper keeps the last yielded frames alive
        # while suspended (in frame order that is one piece per tile, 0.2 GiB at 2K, 0.4 GiB at 4K)
        with torch.no_grad():
            x = self.conv2(denormalize_latent(latent.to(self.device)).to(self.dtype))
        total = x.shape[2]
        cache = CausalCache()
        for i in range(total):
            cache.first_chunk = i == 0
            with torch.no_grad():
                decoded = [unpatchify(self.decoder(x[:, :, i:i + 1], cache)).float().clamp_(-1.0, 1.0)]
            if on_frame is not None:
                on_frame(i + 1, total)
            yield decoded.pop()  # no reference kept while suspended: the consumer's copy is the only one

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
