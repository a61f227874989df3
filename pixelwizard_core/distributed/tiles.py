"""The tiled VAE decode split across ranks: each rank decodes some tiles, one place blends them.

Tiles are independent decodes (``pipeline.tiled_decode``), so rank r decodes tiles r, r + N, r + 2N, ...
and returns each one already multiplied by its blend weights. Blending adds the weighted tiles into a
zero canvas in tile order and divides by the reference divisor when there is one: the same float
operations in the same order as the single-process ``tiled_decode``, so the result is bit-identical when
the convolutions run with the same number of CPU threads (CPU kernels round differently across thread
counts, by about 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import ConfigError
from ..models.vae import WanVAE
from ..pipeline.runner import DecodeSettings
from ..pipeline.tiled_decode import SCALE, BlendPlan, blend_plan

TileCallback = Callable[[int, int], None]  # (tile-frames done, total) on this rank


def plan_for_latent(latent: torch.Tensor, settings: DecodeSettings) -> BlendPlan:
    """The blend plan of ``latent`` [B, 48, T, h, w] (arguments checked here, before any decoding)."""
    if not torch.is_tensor(latent) or latent.dim() != 5:
        shape = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
        raise ConfigError(f"tiled decode expects a latent [B, 48, T, h, w], got {shape}")
    return blend_plan(tuple(latent.shape[-2:]), settings.num_patches, settings.patch_dim, settings.overlap,
                      settings.blend)


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
        rows, cols = tile.pixels()
        expected = (rows.stop - rows.start, cols.stop - cols.start)
        stream = vae.decode_stream(latent[..., tile.rows[0]:tile.rows[1], tile.cols[0]:tile.cols[1]])
        chunks = []
        try:
            for piece in stream:
                if tuple(piece.shape[-2:]) != expected:
                    raise ConfigError(
                        f"the VAE decoded a tile of {tuple(piece.shape[-2:])} pixels where {SCALE}x its latent "
                        "size was expected; tiled decode supports the Wan2.2 VAE only")
                chunks.append((piece * mask).cpu())  # the single-process decode's product, then to host
                del piece
                done += 1
                if on_step is not None:
                    on_step(done, total)
        finally:
            stream.close()  # frees this tile's causal cache before the next tile
        out[index] = torch.cat(chunks, dim=2)
    return out


def blend_tiles(plan: BlendPlan, pieces: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Video [B, 3, F, H, W] float32 (CPU) from every tile's weighted decode."""
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
