"""The tiled VAE decode split across ranks: each rank decodes some tiles, one place blends them.

Tiles are independent decodes (``pipeline.tiled_decode``), so rank r decodes tiles r, r + N, r + 2N, ...
and returns each one already multiplied by its blend weights. Blending adds the weighted tiles into a
zero canvas in tile order and divides by the reference divisor when there is one: the same float
operations in the same order as the single-process ``tiled_decode``, so the result is bit-identical when
the convolutions run with the same number of CPU threads (CPU kernels round differently across thread
counts, by about 1e-6).

Two ways to decode a rank's tiles, as the single-process decode has two orders:

* :func:`decode_tiles`: one tile after the other, whole (all frames): one tile's causal cache on the
  device at a time, but the blending place must hold every tile of the whole video.
* :func:`decode_tiles_stream`: the rank's tiles in lockstep, one latent frame at a time (all of its
  tiles' caches stay on the device, like ``order="frame"``); the weighted pieces of each latent frame
  can be blended (:func:`blend_tiles` on one frame's pieces) and dropped as soon as every rank has sent
  them, so no place ever holds the whole video.

Choosing tiles and order from memory (:func:`choose_rank_tiles`, :func:`resolve_settings`): every rank
must use the same plan, so the launchers resolve the settings once, before the decode, from one figure:
the SMALLEST usable memory over the ranks (each rank's ``decode_budget.free_device_bytes`` less the VAE
weights not yet on its GPU), lowered to ``DecodeSettings.budget_bytes`` when that is set. A rank holds
``ceil(tiles / ranks)`` tiles, so in frame order its caches shrink with more tiles only until every rank
holds one; beyond that only tile order (one tile's cache per rank) helps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ..pipeline.memory import (
    GIB,
    PRECISION_BYTES,
    VAE_CACHE_BYTES_PER_LATENT_PIXEL,
    VAE_TRANSIENT_BF16_BYTES_PER_LATENT_PIXEL,
    VAE_TRANSIENT_FP32_BYTES_PER_LATENT_PIXEL,
)
from ..errors import ConfigError
from ..models.vae import WanVAE
from ..pipeline.decode_budget import (
    TileChoice,
    check_budget,
    choose_tiles,
    effective_budget,
    preset_tiles,
)
from ..pipeline.engine import DecodeSettings
from ..pipeline.tile_plan import AUTO_PATCHES, ORDERS, SCALE, Tile, plan_tiles
from ..pipeline.tiled_decode import BlendPlan, blend_plan

log = logging.getLogger("pixelwizard")

TileCallback = Callable[[int, int], None]  # (tile-frames done, total) on this rank


def rank_decode_bytes(latent_hw: tuple[int, int], num_patches: int | Sequence[int], patch_dim: str,
                      overlap: int | Sequence[int], *, order: str, vae_precision: str, world_size: int) -> int:
    """Device memory beyond the VAE weights of the busiest rank's share of a split decode (doctor's
    ``decode_bytes`` arithmetic, per rank).

    Round robin gives a rank at most ``ceil(tiles / world_size)`` tiles; the estimate takes that many of
    the LARGEST tiles. Order "frame" (:func:`decode_tiles_stream`) keeps all their causal caches on the
    device, order "tile" (:func:`decode_tiles`) one at a time; either way one tile decodes a latent frame
    at a time (the largest tile's transient) and its float32 piece and weighted copy (4 frames x 3
    channels) pass through the device. Unlike one process, no rank holds a blended frame: rank 0 blends
    on the host.
    """
    tiles = plan_tiles(latent_hw, num_patches, patch_dim, overlap)
    areas = sorted(((t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in tiles), reverse=True)
    held = areas[:math.ceil(len(areas) / max(world_size, 1))] if order == "frame" else areas[:1]
    half = PRECISION_BYTES[vae_precision] == 2
    caches = sum(held) * VAE_CACHE_BYTES_PER_LATENT_PIXEL // (2 if half else 1)
    transient = areas[0] * (VAE_TRANSIENT_BF16_BYTES_PER_LATENT_PIXEL if half
                            else VAE_TRANSIENT_FP32_BYTES_PER_LATENT_PIXEL)
    chunk = 4 * 3 * 4 * 2 * SCALE * SCALE * areas[0]
    return int(caches + transient + chunk)


def _is_auto(num_patches: object) -> bool:
    return isinstance(num_patches, int) and not isinstance(num_patches, bool) and num_patches == AUTO_PATCHES


def choose_rank_tiles(latent_hw: tuple[int, int], budget_bytes: int | None, world_size: int, *,
                      vae_precision: str, overlap: int | Sequence[int] = 3, order: str = "frame",
                      num_patches: int | Sequence[int] = AUTO_PATCHES, patch_dim: str = "w") -> TileChoice:
    """The tiles and order every rank of a ``world_size``-rank decode must use, within ``budget_bytes``
    per rank (the smallest rank's figure); ``estimated_bytes`` is :func:`rank_decode_bytes` of the choice.

    * ``budget_bytes`` None: the reference's tiles (``num_patches=0``) or the given ones, in ``order``.
    * ``num_patches=0``: the fewest tiles whose busiest rank fits in ``order`` (in frame order more tiles
      help until every rank holds one); when ``order="frame"`` and no layout fits in frame order, the
      fewest of which one tile fits in tile order; else ConfigError with what is needed and what to change.
      Layouts as ``decode_budget.candidates`` enumerates them (at equal count one axis before a grid).
    * explicit ``num_patches``: kept; only frame order falls back to tile order when the rank's share
      does not fit (logged), with a warning when even one tile does not.
    """
    ORDERS.check(order)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size {world_size!r}: a split decode needs 1 or more ranks")

    def estimate(patches: int | Sequence[int], dim: str, tile_order: str) -> int:
        return rank_decode_bytes(latent_hw, patches, dim, overlap, order=tile_order, vae_precision=vae_precision,
                                 world_size=world_size)

    if not _is_auto(num_patches):
        return _explicit(latent_hw, budget_bytes, world_size, num_patches, patch_dim, order, estimate)
    if budget_bytes is None:
        preset = preset_tiles(latent_hw, vae_precision=vae_precision, overlap=overlap, order=order)
        return TileChoice(preset.num_patches, preset.patch_dim, order, estimate(preset.num_patches, "w", order))
    return choose_tiles(latent_hw, budget_bytes, vae_precision=vae_precision, overlap=overlap, order=order,
                        estimate=estimate, world_size=world_size)


def _explicit(latent_hw: tuple[int, int], budget_bytes: int | None, world_size: int, num_patches: int | Sequence[int],
              patch_dim: str, order: str, estimate: Callable[[int | Sequence[int], str, str], int]) -> TileChoice:
    """Explicit tiles: kept, and frame order kept unless the rank's share does not fit."""
    wanted = estimate(num_patches, patch_dim, order)
    if budget_bytes is None or order == "tile" or wanted <= budget_bytes:
        return TileChoice(num_patches, patch_dim, order, wanted)
    fallback = estimate(num_patches, patch_dim, "tile")
    log.info("decode order frame -> tile: %s tile(s) (patch_dim %s) over %d rank(s) need about %.1f GiB per rank in "
             "frame order (all of a rank's tile caches at once), more than the %.1f GiB budget; one tile at a time "
             "needs about %.1f GiB", num_patches, patch_dim, world_size, wanted / GIB, budget_bytes / GIB,
             fallback / GIB)
    if fallback > budget_bytes:
        log.warning("even one tile of num_patches=%s (about %.1f GiB) exceeds the decode budget of %.1f GiB: the "
                    "decode may run out of memory; use more tiles, a bf16 VAE, or num_patches 0 (automatic)",
                    num_patches, fallback / GIB, budget_bytes / GIB)
    return TileChoice(num_patches, patch_dim, "tile", fallback)


def needs_budget(settings: DecodeSettings) -> bool:
    """Whether resolving ``settings`` may depend on memory (automatic tiles, or frame order that may fall
    back): only then do the ranks measure it. Depends on the settings alone, so every rank agrees."""
    return _is_auto(settings.num_patches) or settings.order == "frame"


def resolve_settings(latent: torch.Tensor, settings: DecodeSettings, *, world_size: int,
                     free_bytes: int | None = None, vae_precision: str = "fp32") -> DecodeSettings:
    """``settings`` with the tiles and order every rank of the split decode uses (:func:`choose_rank_tiles`),
    chosen within ``min(settings.budget_bytes, free_bytes)`` shared by the latent's batch. ``free_bytes``
    must be the same on every rank (the smallest rank's usable memory; None off CUDA). Logs the choice."""
    _check_latent(latent)
    budget = effective_budget(settings.budget_bytes, free_bytes)
    share = None if budget is None else budget // latent.shape[0]
    choice = choose_rank_tiles(tuple(latent.shape[-2:]), share, world_size, vae_precision=vae_precision,
                               overlap=settings.overlap, order=settings.order, num_patches=settings.num_patches,
                               patch_dim=settings.patch_dim)
    if _is_auto(settings.num_patches):
        log.info("decode tiles (auto, %d rank(s), %s): %s", world_size,
                 "no memory budget: the reference's defaults" if budget is None
                 else f"{budget / GIB:.1f} GiB per rank", choice.describe())
    return dataclasses.replace(settings, num_patches=choice.num_patches, patch_dim=choice.patch_dim,
                               order=choice.order)


def plan_for_latent(latent: torch.Tensor, settings: DecodeSettings, *, world_size: int = 1,
                    free_bytes: int | None = None, vae_precision: str = "fp32") -> BlendPlan:
    """The blend plan of ``latent`` [B, 48, T, h, w] (arguments checked here, before any decoding).

    ``settings.num_patches == 0`` (automatic) is resolved by :func:`resolve_settings`, which reads no
    device: every process that calls this with the same arguments gets the same plan. The launchers
    resolve the settings once (with the ranks' smallest free memory) and pass the resolved ones on.
    """
    _check_latent(latent)
    _check_settings(settings)
    if _is_auto(settings.num_patches):
        settings = resolve_settings(latent, settings, world_size=world_size, free_bytes=free_bytes,
                                    vae_precision=vae_precision)
    return blend_plan(tuple(latent.shape[-2:]), settings.num_patches, settings.patch_dim, settings.overlap,
                      settings.blend)


def _check_settings(settings: DecodeSettings) -> None:
    """What no plan checks: the order and the memory cap (checked before any worker starts)."""
    ORDERS.check(settings.order)
    check_budget(settings.budget_bytes)


def _check_latent(latent: object) -> None:
    if not torch.is_tensor(latent) or latent.dim() != 5:
        shape = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
        raise ConfigError(f"tiled decode expects a latent [B, 48, T, h, w], got {shape}")


def tiles_of_rank(num_tiles: int, rank: int, world_size: int) -> list[int]:
    """Round-robin: neighbouring tiles go to different ranks."""
    return list(range(rank, num_tiles, world_size))


def decode_tiles(vae: WanVAE, latent: torch.Tensor, plan: BlendPlan, indices: Iterable[int],
                 on_step: TileCallback | None = None) -> dict[int, torch.Tensor]:
    """Decode the tiles ``indices`` of ``latent``; each comes back weighted (piece * mask), float32,
    [B, 3, 4(T-1)+1, tile h, tile w] on the CPU. ``on_step`` runs after every latent frame of every
    tile; an exception raised there (an interrupt) stops the decode."""
    indices = list(indices)
    frames = latent.shape[2]
    total, done = frames * len(indices), 0
    out: dict[int, torch.Tensor] = {}
    for index in indices:
        tile, mask = plan.tiles[index], plan.masks[index].to(vae.device)
        expected = _pixel_size(tile)
        stream = vae.decode_stream(_tile_latent(latent, tile))
        chunks = []
        try:
            for piece in stream:
                _check_piece(piece, expected)
                chunks.append((piece * mask).cpu())  # the single-process decode's product, then to host
                del piece
                done += 1
                if on_step is not None:
                    on_step(done, total)
        finally:
            stream.close()  # frees this tile's causal cache before the next tile
        out[index] = torch.cat(chunks, dim=2)
    return out


def decode_tiles_stream(vae: WanVAE, latent: torch.Tensor, plan: BlendPlan, indices: Iterable[int],
                        on_step: TileCallback | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Decode the tiles ``indices`` of ``latent`` in lockstep; yields, per latent frame, every one of these
    tiles' weighted piece (piece * mask), float32 [B, 3, n, tile h, tile w] on the CPU (n = 1 for the
    first latent frame, 4 after), by tile index. The causal caches of all these tiles stay on the VAE's
    device between frames; closing the generator frees them. ``on_step`` runs after every tile of every
    latent frame; an exception raised there (an interrupt) stops the decode within the frame."""
    indices = list(indices)
    frames = latent.shape[2]
    total, done = frames * len(indices), 0
    masks = {index: plan.masks[index].to(vae.device) for index in indices}
    streams = {index: vae.decode_stream(_tile_latent(latent, plan.tiles[index])) for index in indices}
    try:
        for _ in range(frames):
            pieces = {}
            for index in indices:
                piece = next(streams[index])
                _check_piece(piece, _pixel_size(plan.tiles[index]))
                pieces[index] = (piece * masks[index]).cpu()  # as decode_tiles: the same float operations
                del piece
                done += 1
                if on_step is not None:
                    on_step(done, total)
            yield pieces
            del pieces
    finally:
        for stream in streams.values():
            stream.close()


def _tile_latent(latent: torch.Tensor, tile: Tile) -> torch.Tensor:
    return latent[..., tile.rows[0]:tile.rows[1], tile.cols[0]:tile.cols[1]]


def _pixel_size(tile: Tile) -> tuple[int, int]:
    rows, cols = tile.pixels()
    return rows.stop - rows.start, cols.stop - cols.start


def _check_piece(piece: torch.Tensor, expected: tuple[int, int]) -> None:
    if tuple(piece.shape[-2:]) != expected:
        raise ConfigError(f"the VAE decoded a tile of {tuple(piece.shape[-2:])} pixels where {SCALE}x its latent "
                          "size was expected; tiled decode supports the Wan2.2 VAE only")


def blend_tiles(plan: BlendPlan, pieces: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Video [B, 3, F, H, W] float32 (CPU) from every tile's weighted decode (whole, or of the same frames:
    one latent frame's pieces give that frame's chunk)."""
    missing = [i for i in range(len(plan.tiles)) if i not in pieces]
    if missing:
        raise ConfigError(f"tiles {missing} of {len(plan.tiles)} were not decoded")
    first = pieces[0]
    canvas = torch.zeros(*first.shape[:3], plan.height, plan.width, dtype=first.dtype)
    for index, tile in enumerate(plan.tiles):
        rows, cols = tile.pixels()
        canvas[..., rows, cols] += pieces[index]
    if plan.divisor is not None:
        canvas /= plan.divisor.cpu()
    return canvas
