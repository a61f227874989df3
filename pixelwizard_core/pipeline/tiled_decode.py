"""Tiled, cosine-blended, streamed VAE decode of large (2K/4K) latents.

The latent is cut into overlapping spatial tiles along width, height or both, planned exactly as the
reference plans them (pixelwizard_reference.md §6): with ``base = size // n``, piece ``i`` covers
``[base*i, base*(i+1))`` (the last one runs to the end), widened by ``overlap`` latent columns on each
interior side and clipped to the latent. Every tile is decoded by its own ``vae.decode_stream`` and the
decoded tiles are blended with per-pixel weights.

Blend modes:

* ``"cosine"`` (default): across each band that two neighbouring tiles share (``2 * overlap`` latent
  columns = ``32 * overlap`` pixels) one tile fades out along a raised cosine while the other fades in
  along its exact complement; the result is normalised and quantised to multiples of 2**-12, so every
  weight, every 2-D product and every sum is exact in float32 and the weights of each pixel sum to
  exactly 1 (no division afterwards). The quantum is 16x finer than one 8-bit output level.
* ``"reference"``: the reference's masks bit for bit: a ramp ``0.5 - 0.5*cos(pi*j/(L-1))`` of
  ``L = 16*overlap`` pixels on each interior edge only (so the two ramps of a shared band are adjacent,
  not superposed), ``canvas += piece*mask``, ``weight += mask``, then ``canvas / clamp(weight, 1e-6)``.
  The reference splits one axis only; for ``patch_dim="hw"`` its mask is the outer product of its
  per-axis masks.

Tiling is never exact: the VAE's middle attention block mixes every position of a frame, and the
convolutions see up to ``decoder_halo()`` = 276 pixels past a cut. The overlap only hides the seam.
Measured on the tiny random test VAE (tests/test_tiled_decode.py; latent 8x24, 3 tiles along w),
max |tiled - untiled| on a [-1, 1] scale: 0.305 with overlap 3 (mean 0.020), 0.623 with overlap 0
(mean 0.046); the same for both blends, whose means differ by 4%. Most of that error is away from the
seams (attention), so it says little about the real VAE, for which no figure is measured yet.

``num_patches=0`` picks the tiles from the memory free on the VAE's device (``decode_budget.py``).

Two orders, same output bit for bit:

* ``order="frame"`` (default, streaming): all tiles are decoded in lockstep, latent frame by latent
  frame; after one latent frame of every tile the blended output frames (1 for the first latent frame,
  4 after) are yielded, so the whole ``[frames, H, W]`` canvas never exists and only one tile's transient
  activations exist at a time. But the causal caches of ALL tiles persist on the VAE's device between
  latent frames (2 frames of input history per temporal convolution, at its resolution): together
  about what one untiled decode's cache takes, plus the overlaps. For the real Wan2.2 VAE in float32
  that is about 26 GiB at 2K and 59 GiB at 4K (half in bfloat16), against 9 / 15 GiB for one tile.
* ``order="tile"`` (the reference's memory profile): tiles are decoded one after the other, so only
  one tile's cache is on the device, and blended into a float32 canvas of the whole video in host
  memory (5 GiB at 2K, 11 GiB at 4K), whose frames are then yielded as CPU tensors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import ConfigError
from ..models.vae import WanVAE
from ..registry import Registry
from . import decode_budget
from .tile_plan import AUTO_PATCHES, ORDERS, SCALE, Tile, axis_ranges, per_axis

log = logging.getLogger("pixelwizard")

BLEND_MODES: Registry[str] = Registry("blend")
BLEND_MODES.register("cosine", "cosine ramps whose weights sum to 1")
BLEND_MODES.register("reference", "the reference's masks")
WEIGHT_BITS = 12  # cosine weights are multiples of 2**-12: products of two fit float32's 24-bit mantissa


@dataclass
class BlendPlan:
    """Per-tile pixel weights [h, w] (float32) and, in reference mode, the per-pixel divisor [H, W]."""

    tiles: list[Tile]
    masks: list[torch.Tensor]
    divisor: torch.Tensor | None
    height: int
    width: int

    def to(self, device: torch.device | str) -> "BlendPlan":
        divisor = None if self.divisor is None else self.divisor.to(device)
        return BlendPlan(self.tiles, [m.to(device) for m in self.masks], divisor, self.height, self.width)


# --------------------------------------------------------------------------------------------------
# Blend weights


def cosine_axis_weights(ranges: Sequence[tuple[int, int]], length: int) -> list[torch.Tensor]:
    """Per-piece weights along one axis (pixel ranges), complementary raised cosines over shared bands.

    Returned float32 weights are multiples of 2**-WEIGHT_BITS and sum to exactly 1 at every position.
    """
    raw = torch.zeros(len(ranges), length, dtype=torch.float64)
    for i, (start, stop) in enumerate(ranges):
        piece = torch.ones(stop - start, dtype=torch.float64)
        if i > 0:  # fade in across the band shared with the previous piece
            piece[:max(ranges[i - 1][1] - start, 0)] *= _rising(ranges[i - 1][1] - start)
        if i < len(ranges) - 1:  # fade out across the band shared with the next piece
            band = max(stop - ranges[i + 1][0], 0)
            if band:
                piece[-band:] *= _rising(band).flip(0)
        raw[i, start:stop] = piece
    total = raw.sum(0)
    if bool((total <= 0).any()):
        raise ConfigError(f"tiles {list(ranges)} leave pixels of an axis of {length} uncovered")
    # Quantise the running sum, not each weight: the differences are exact, non-negative and add up to 1.
    quantum = 2.0**WEIGHT_BITS
    cumulative = torch.round((raw / total).cumsum(0) * quantum)
    steps = torch.diff(cumulative, dim=0, prepend=torch.zeros(1, length, dtype=torch.float64)) / quantum
    return [steps[i, start:stop].float() for i, (start, stop) in enumerate(ranges)]


def _rising(length: int) -> torch.Tensor:
    """Raised cosine sampled at pixel centres: strictly between 0 and 1, and r[j] + r[L-1-j] = 1."""
    if length <= 0:
        return torch.ones(0, dtype=torch.float64)
    j = torch.arange(length, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(math.pi * (j + 0.5) / length)


def reference_axis_mask(size: int, ramp_length: int, leading: bool, trailing: bool) -> torch.Tensor:
    """The reference's 1-D mask of a piece (float32): ramps on its interior edges, computed as it does."""
    ramp_length = min(max(ramp_length, 0), size)
    mask = torch.ones(size, dtype=torch.float32)
    if ramp_length > 0:
        if ramp_length == 1:
            ramp = torch.zeros(1, dtype=torch.float32)
        else:
            t = torch.linspace(0, 1, steps=ramp_length, dtype=torch.float32)
            ramp = 0.5 - 0.5 * torch.cos(math.pi * t)
        if leading:
            mask[:ramp_length] *= ramp
        if trailing:
            mask[-ramp_length:] *= ramp.flip(0)
    return mask


def blend_plan(latent_hw: tuple[int, int], num_patches: int | Sequence[int] = 3, patch_dim: str = "w",
               overlap: int | Sequence[int] = 3, blend: str = "cosine") -> BlendPlan:
    """Tiles and their pixel weights (on CPU) for a latent of spatial size (h, w)."""
    BLEND_MODES.check(blend)
    # Weights are built per axis by position index: two pieces of an axis can cover the same range.
    row_ranges, col_ranges = axis_ranges(latent_hw, num_patches, patch_dim, overlap)
    tiles = [Tile(rows, cols) for rows in row_ranges for cols in col_ranges]
    grid = [(r, c) for r in range(len(row_ranges)) for c in range(len(col_ranges))]
    height, width = latent_hw[0] * SCALE, latent_hw[1] * SCALE
    if blend == "cosine":
        row_w = cosine_axis_weights([(a * SCALE, b * SCALE) for a, b in row_ranges], height)
        col_w = cosine_axis_weights([(a * SCALE, b * SCALE) for a, b in col_ranges], width)
        masks = [row_w[r][:, None] * col_w[c][None, :] for r, c in grid]
        return BlendPlan(tiles, masks, None, height, width)
    ov_h, ov_w = per_axis(overlap, "overlap", patch_dim)
    masks, divisor = [], torch.zeros(height, width, dtype=torch.float32)
    for tile, (r, c) in zip(tiles, grid):
        rows, cols = tile.pixels()
        mask_h = reference_axis_mask(rows.stop - rows.start, ov_h * SCALE, r > 0, r < len(row_ranges) - 1)
        mask_w = reference_axis_mask(cols.stop - cols.start, ov_w * SCALE, c > 0, c < len(col_ranges) - 1)
        mask = mask_h[:, None] * mask_w[None, :]
        divisor[rows, cols] += mask
        masks.append(mask)
    return BlendPlan(tiles, masks, divisor.clamp_min(1e-6), height, width)


# --------------------------------------------------------------------------------------------------
# Decoding


def tiled_decode_stream(vae: WanVAE, latent: torch.Tensor, num_patches: int | Sequence[int] = 3,
                        patch_dim: str = "w", overlap: int | Sequence[int] = 3, blend: str = "cosine",
                        on_step: Callable[[int, int], None] | None = None,
                        order: str = "frame", budget_bytes: int | None = None) -> Iterator[torch.Tensor]:
    """Decode a normalised latent [B, 48, T, h, w] tile by tile; yields blended frames in order.

    ``num_patches=0`` chooses the tiles automatically (:mod:`.decode_budget`): the fewest whose estimated
    memory fits what is free on the VAE's device now (CUDA), or the reference's defaults where there is
    no budget (CPU: 3 at 2K, 4 at 4K, else 1, along the width). Then ``patch_dim`` is chosen too (the
    given one is ignored), ``overlap`` must be one int, and ``order="frame"`` may fall back to "tile"
    when no frame-order tiling fits; the choice is logged. ``budget_bytes`` caps the memory the automatic
    choice may plan for (min(cap, free); on a CPU the cap alone); it is ignored for explicit tiles.

    Each yielded chunk is float32 [B, 3, n, 16h, 16w] in [-1, 1] (n = 1 for the first latent frame, 4
    after), on the VAE's device for ``order="frame"`` and on the CPU for ``order="tile"`` (see the module
    docstring for their memory). ``on_step(done, total)`` runs after every tile of every latent frame
    (total = T * tiles); an exception raised there (an interrupt) stops the decode and frees its state.
    Arguments are checked now, before any decoding.
    """
    _check_latent(latent)
    ORDERS.check(order)
    if isinstance(num_patches, int) and not isinstance(num_patches, bool) and num_patches == AUTO_PATCHES:
        num_patches, patch_dim, order = _auto(vae, latent, overlap, order, budget_bytes)
    plan = blend_plan(tuple(latent.shape[-2:]), num_patches, patch_dim, overlap, blend)
    streams = []
    for tile in plan.tiles:
        streams.append(vae.decode_stream(latent[..., tile.rows[0]:tile.rows[1], tile.cols[0]:tile.cols[1]]))
    log.info("tiled VAE decode: %d tiles (%s, overlap %s, %s blend, %s order) of latent %s", len(plan.tiles),
             patch_dim, overlap, blend, order, tuple(latent.shape))
    if order == "tile":
        return _tile_by_tile(streams, plan.to(vae.device), latent.shape[2], on_step)
    return _lockstep(streams, plan.to(vae.device), latent.shape[2], on_step)


def _check_latent(latent: torch.Tensor) -> None:
    if not torch.is_tensor(latent) or latent.dim() != 5:
        shape = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
        raise ConfigError(f"tiled decode expects a latent [B, 48, T, h, w], got {shape}")


def _auto(vae: WanVAE, latent: torch.Tensor, overlap: int | Sequence[int], order: str, budget_bytes: int | None
          ) -> tuple[int | tuple[int, int], str, str]:
    """(num_patches, patch_dim, order) chosen for this latent on the VAE's device, now."""
    choice = decode_budget.auto_tiles(tuple(latent.shape[-2:]), vae.device,
                                      vae_precision=decode_budget.vae_precision_of(vae.dtype), overlap=overlap,
                                      order=order, batch=latent.shape[0], cap_bytes=budget_bytes)
    return choice.num_patches, choice.patch_dim, choice.order


def _lockstep(streams: list[Iterator[torch.Tensor]], plan: BlendPlan, latent_frames: int,
              on_step: Callable[[int, int], None] | None) -> Iterator[torch.Tensor]:
    total, done = latent_frames * len(streams), 0
    try:
        for _ in range(latent_frames):
            out = None
            for tile, mask, stream in zip(plan.tiles, plan.masks, streams):
                piece = next(stream)
                rows, cols = tile.pixels()
                if piece.shape[-2:] != (rows.stop - rows.start, cols.stop - cols.start):
                    raise ConfigError(
                        f"the VAE decoded a tile of {tuple(piece.shape[-2:])} pixels where "
                        f"{SCALE}x its latent size was expected; tiled decode supports the Wan2.2 VAE only")
                if out is None:
                    out = piece.new_zeros(*piece.shape[:3], plan.height, plan.width)
                # piece * mask, then add: the reference's order of float operations (no fused multiply-add)
                out[..., rows, cols] += piece * mask
                del piece
                done += 1
                if on_step is not None:
                    on_step(done, total)
            if plan.divisor is not None:
                out /= plan.divisor
            yield out
            del out
    finally:
        for stream in streams:
            stream.close()


def _tile_by_tile(streams: list[Iterator[torch.Tensor]], plan: BlendPlan, latent_frames: int,
                  on_step: Callable[[int, int], None] | None) -> Iterator[torch.Tensor]:
    total, done = latent_frames * len(streams), 0
    canvas = None
    divisor = None if plan.divisor is None else plan.divisor.cpu()
    try:
        for tile, mask, stream in zip(plan.tiles, plan.masks, streams):
            rows, cols = tile.pixels()
            start = 0
            for piece in stream:
                if canvas is None:
                    frames = 4 * (latent_frames - 1) + 1
                    canvas = torch.zeros(*piece.shape[:2], frames, plan.height, plan.width)
                stop = start + piece.shape[2]
                canvas[:, :, start:stop, rows, cols] += (piece * mask).cpu()  # same float ops as "frame"
                start = stop
                del piece
                done += 1
                if on_step is not None:
                    on_step(done, total)
            stream.close()  # frees this tile's cache before the next tile starts
        start = 0
        for length in [1] + [4] * (latent_frames - 1):
            chunk = canvas[:, :, start:start + length]
            yield chunk / divisor if divisor is not None else chunk.clone()
            start += length
    finally:
        for stream in streams:
            stream.close()


def tiled_decode(vae: WanVAE, latent: torch.Tensor, num_patches: int | Sequence[int] = 3, patch_dim: str = "w",
                 overlap: int | Sequence[int] = 3, blend: str = "cosine",
                 on_step: Callable[[int, int], None] | None = None, order: str = "frame") -> torch.Tensor:
    """The whole tiled decode in memory: video [B, 3, 4(T-1)+1, 16h, 16w] float32 on the VAE's device
    (see tiled_decode_stream)."""
    _check_latent(latent)
    batch, _, frames, height, width = latent.shape
    # allocated first, so that automatic tiles (num_patches=0) see its memory as taken
    video = torch.empty(batch, 3, 4 * (frames - 1) + 1, height * SCALE, width * SCALE, device=vae.device)
    stream = tiled_decode_stream(vae, latent, num_patches, patch_dim, overlap, blend, on_step, order)
    done = 0
    for chunk in stream:
        video[:, :, done:done + chunk.shape[2]] = chunk
        done += chunk.shape[2]
    return video
