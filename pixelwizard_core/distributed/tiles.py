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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from ..errors import ConfigError
from ..models.vae import WanVAE
from ..pipeline.decode_budget import choose_tiles, preset_tiles
from ..pipeline.runner import DecodeSettings
from ..pipeline.tiled_decode import AUTO_PATCHES, SCALE, BlendPlan, Tile, blend_plan

log = logging.getLogger("pixelwizard")

TileCallback = Callable[[int, int], None]  # (tile-frames done, total) on this rank


def plan_for_latent(latent: torch.Tensor, settings: DecodeSettings, *, budget_bytes: int | None = None,
                    vae_precision: str = "fp32") -> BlendPlan:
    """The blend plan of ``latent`` [B, 48, T, h, w] (arguments checked here, before any decoding).

    ``settings.num_patches == 0`` (automatic) must resolve to the same plan in every process that calls
    this (the parent and each rank), so it never reads the local device: without ``budget_bytes`` it is
    the reference's default for the latent's size (3 at 2K, 4 at 4K, else 1, along the width); with it,
    the fewest tiles of which ONE fits the budget in tile order, since each rank decodes its tiles one
    at a time (a caller passing it must give every process the same figure, e.g. the smallest rank's
    ``decode_budget.free_device_bytes``).
    """
    if not torch.is_tensor(latent) or latent.dim() != 5:
        shape = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
        raise ConfigError(f"tiled decode expects a latent [B, 48, T, h, w], got {shape}")
    latent_hw = tuple(latent.shape[-2:])
    num_patches, patch_dim = settings.num_patches, settings.patch_dim
    if isinstance(num_patches, int) and not isinstance(num_patches, bool) and num_patches == AUTO_PATCHES:
        if budget_bytes is None:
            choice = preset_tiles(latent_hw, vae_precision=vae_precision, overlap=settings.overlap, order="tile")
        else:
            choice = choose_tiles(latent_hw, budget_bytes // latent.shape[0], vae_precision=vae_precision,
                                  overlap=settings.overlap, order="tile")
        num_patches, patch_dim = choice.num_patches, choice.patch_dim
        log.debug("multi-process decode tiles (auto): %s", choice.describe())
    return blend_plan(latent_hw, num_patches, patch_dim, settings.overlap, settings.blend)


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
