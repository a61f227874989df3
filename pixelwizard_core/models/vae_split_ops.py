"""Size-limited convolution and upsampling for the Wan2.2 VAE.

No convolution or nearest upsample is ever issued on a tensor (input or output) of more than
:data:`MAX_OP_ELEMENTS` elements: larger ones are split by frame and, when one frame is too large, into
row/column tiles carrying the halo the kernel reads. Every output element is computed from exactly the
same inputs, so the split result equals the unsplit one up to the accumulation order of the convolution
backend.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange

from ..errors import ConfigError

log = logging.getLogger("pixelwizard")

# PyTorch/cuDNN convolutions and nearest upsampling use int32 index math and need numel < 2**31 - 1.
# Half of that leaves a margin for backends that count bytes or padded buffers, and bounds the tile
# temporaries; up to 720p nothing is split (largest op about 0.7e9 elements). Read at every call, so that
# tests and benches can lower it to force the splitting paths on tiny tensors.
MAX_OP_ELEMENTS: int = 2**30

Span = tuple[int, int]
Cost = Callable[[int, int, int], int]


def _ranges(total: int, step: int) -> list[Span]:
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _tile_grid(batch: int, sizes: tuple[int, int, int], tile: tuple[int, int, int]) -> Iterator[tuple]:
    """(batch item, frame span, row span, column span) of every output tile, columns fastest."""
    return itertools.product(range(batch), *(_ranges(size, step) for size, step in zip(sizes, tile)))


def _plan_tiles(frames: int, rows: int, cols: int, cost: Cost) -> tuple[int, int, int]:
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


# --------------------------------------------------------------------------------------------------
# Causal 3-D convolution


def causal_conv3d(x: torch.Tensor, history: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor | None, front_pad: int, space_pad: int, time_stride: int = 1) -> torch.Tensor:
    """Conv3d over the frames [front_pad zero frames, history, x], zero padded by space_pad in H and W."""
    batch, channels, frames, height, width = x.shape
    kept = 0 if history is None else history.shape[2]
    out_channels, _, kt, kh, kw = weight.shape
    out_shape = ((front_pad + kept + frames - kt) // time_stride + 1,
                 height + 2 * space_pad - kh + 1, width + 2 * space_pad - kw + 1)

    def cost(f: int, r: int, c: int) -> int:
        return max(channels * ((f - 1) * time_stride + kt) * (r + kh - 1) * (c + kw - 1), out_channels * f * r * c)

    if batch * cost(*out_shape) <= MAX_OP_ELEMENTS:
        full = x if history is None else torch.cat([history, x], 2)
        if front_pad or space_pad:
            full = F.pad(full, (space_pad, space_pad, space_pad, space_pad, front_pad, 0))
        return F.conv3d(full, weight, bias, stride=(time_stride, 1, 1))

    tile = _plan_tiles(*out_shape, cost)
    log.debug("VAE conv3d %s split into tiles of %d frames x %d x %d", tuple(x.shape), *tile)
    # Where history and x start in the virtual frame stream [front_pad zero frames, history, x].
    sources = [(history, front_pad), (x, front_pad + kept)] if history is not None else [(x, front_pad)]
    out = x.new_empty(batch, out_channels, *out_shape)
    for b, (t0, t1), (r0, r1), (c0, c1) in _tile_grid(batch, out_shape, tile):
        first, last = t0 * time_stride, (t1 - 1) * time_stride + kt  # virtual frame span
        ra, rb, pad_top, pad_bottom = _window(r0, r1, kh, 1, space_pad, height)
        ca, cb, pad_left, pad_right = _window(c0, c1, kw, 1, space_pad, width)
        piece = _stream_frames(sources, b, first, last, slice(ra, rb), slice(ca, cb))
        pads = (pad_left, pad_right, pad_top, pad_bottom, max(front_pad - first, 0), 0)
        if any(pads):
            piece = F.pad(piece, pads)
        out[b:b + 1, :, t0:t1, r0:r1, c0:c1] = F.conv3d(piece, weight, bias, stride=(time_stride, 1, 1))
    return out


def _stream_frames(sources: list[tuple[torch.Tensor, int]], b: int, first: int, last: int,
                   rows: slice, cols: slice) -> torch.Tensor:
    """Frames [first, last) of the virtual stream for batch item b, less the leading zero frames."""
    parts = [
        src[b:b + 1, :, max(first, at) - at:min(last, at + src.shape[2]) - at, rows, cols]
        for src, at in sources if max(first, at) < min(last, at + src.shape[2])
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


# --------------------------------------------------------------------------------------------------
# Per-frame 2-D convolution (with optional nearest x2 upsample)


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
    out_h = (height * factor + top + bottom - kh) // stride + 1
    out_w = (width * factor + left + right - kw) // stride + 1
    slack = 2 if upsample else 0  # an upsampled tile may start and end one row/column early/late

    def cost(f: int, r: int, c: int) -> int:
        rows_in, cols_in = (r - 1) * stride + kh + slack, (c - 1) * stride + kw + slack
        return max(f * channels * rows_in * cols_in, f * out_channels * r * c)

    if batch * cost(frames, out_h, out_w) <= MAX_OP_ELEMENTS:
        images = rearrange(x, "b c t h w -> (b t) c h w")
        if upsample:
            images = _upsample2x(images)
        y = _conv2d(images, weight, bias, stride, pad)
        return rearrange(y, "(b t) c h w -> b c t h w", b=batch)

    tile = _plan_tiles(frames, out_h, out_w, cost)
    log.debug("VAE conv2d %s split into tiles of %d frames x %d x %d", tuple(x.shape), *tile)
    out = x.new_empty(batch, out_channels, frames, out_h, out_w)
    for b, (t0, t1), (r0, r1), (c0, c1) in _tile_grid(batch, (frames, out_h, out_w), tile):
        ra, rb, pad_top, pad_bottom = _window(r0, r1, kh, stride, top, height * factor)
        ca, cb, pad_left, pad_right = _window(c0, c1, kw, stride, left, width * factor)
        piece = _upsampled_window(x[b, :, t0:t1], ra, rb, ca, cb, factor)
        pads = (pad_left, pad_right, pad_top, pad_bottom)
        if any(pads):
            piece = F.pad(piece, pads)
        y = F.conv2d(piece, weight, bias, stride=stride)
        out[b, :, t0:t1, r0:r1, c0:c1] = rearrange(y, "t c h w -> c t h w")
    return out


def _upsampled_window(frames: torch.Tensor, ra: int, rb: int, ca: int, cb: int, factor: int) -> torch.Tensor:
    """Rows [ra, rb) and columns [ca, cb) of the frames [C, T, H, W] upsampled by factor (1 or 2), as
    images [T, C, rb - ra, cb - ca]; only the source pixels they come from are upsampled."""
    lo_r, lo_c = ra // factor, ca // factor
    hi_r, hi_c = (rb - 1) // factor + 1, (cb - 1) // factor + 1
    images = rearrange(frames[:, :, lo_r:hi_r, lo_c:hi_c], "c t h w -> t c h w")
    if factor == 1:
        return images
    off_r, off_c = ra - 2 * lo_r, ca - 2 * lo_c
    return _upsample2x(images)[:, :, off_r:off_r + rb - ra, off_c:off_c + cb - ca]


def image_conv2d(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Unpadded conv2d of images [N, C, H, W] under the same size limit (frames of one batch item)."""
    y = frame_conv2d(rearrange(images, "n c h w -> 1 c n h w"), weight, bias)
    return rearrange(y, "1 c n h w -> n c h w")
