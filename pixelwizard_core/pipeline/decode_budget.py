"""Decode tiles chosen from a memory budget: ``num_patches=0`` ("auto") in the tiled decode.

:func:`choose_tiles` returns the fewest tiles whose estimated working memory
(:func:`pixelwizard_core.pipeline.memory.decode_bytes`, BENCHMARKS.md "Peak memory estimate") fits a budget. The
candidates, in order of preference:

1. frame order (streaming, every tile's causal cache on the device): 1 tile; then n tiles along the
   longer axis and grids of r x c tiles, fewest tiles first (at equal count a single axis before a grid,
   then the smaller estimate);
2. only when none of those fits (and frame order was asked for): the same in tile order, which keeps one
   tile's cache on the device and the whole video's canvas in host memory.

In frame order more tiles stop helping early: the caches of all tiles add up to about one untiled
decode's whatever the count, only the transient of the largest tile shrinks. That is why tile order is
the last resort rather than "more tiles".

Smallest tile: a tile's own share of an axis (``length // n`` latent positions, before the overlaps are
added) must be at least ``max(MIN_TILE_LATENT, 2 * overlap)``. ``2 * overlap`` keeps the two blend bands
of a tile apart, so every pixel is shared by at most two tiles along an axis; ``MIN_TILE_LATENT`` = 16
(256 pixels) is about the decoder's convolution reach past a cut (``decoder_halo()`` = 276 pixels), below
which most of a tile would be border, and it caps the re-decoded overlap at 2 * 3 / 16 = 37.5% extra
work per tile with the default overlap 3.

:func:`free_device_bytes` is the budget on CUDA; on other devices there is none and "auto" means the
reference's defaults (:func:`preset_tiles`). A user's cap (``DecodeSettings.budget_bytes``, the CLI's
``--decode_budget_gib``) lowers the budget to ``min(cap, free)``, and is the budget by itself on a CPU.

Multi-process decodes choose per rank from the same figures (``distributed/tiles.py``
:func:`~pixelwizard_core.distributed.tiles.choose_rank_tiles`): there a rank holds only its share of the
tiles, so in frame order more tiles DO help, down to one tile per rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .memory import GIB, HEADROOM_BYTES, HEADROOM_FRACTION, decode_bytes, free_device_bytes, vae_precision_of
from .presets import HR_PRESETS
from .tile_plan import AUTO_PATCHES, ORDERS, SCALE

log = logging.getLogger("pixelwizard")

__all__ = ["AUTO_PATCHES", "MIN_TILE_LATENT", "TileChoice", "auto_tiles", "candidates", "check_budget", "choose_tiles",
           "effective_budget", "free_device_bytes", "layouts", "max_patches", "min_tile", "preset_tiles",
           "vae_precision_of"]

MIN_TILE_LATENT = 16  # latent positions (256 pixels): see the module docstring


@dataclass(frozen=True)
class TileChoice:
    """Tiles for a decode: arguments of ``tiled_decode_stream`` and the estimate they were chosen by."""

    num_patches: int | tuple[int, int]
    patch_dim: str
    order: str
    estimated_bytes: int

    @property
    def count(self) -> int:
        if isinstance(self.num_patches, tuple):
            return self.num_patches[0] * self.num_patches[1]
        return self.num_patches

    def describe(self) -> str:
        if self.count == 1:
            layout = "1 tile (untiled)"
        elif self.patch_dim == "hw":
            layout = f"{self.num_patches[0]}x{self.num_patches[1]} grid of tiles"
        else:
            layout = f"{self.num_patches} tiles along {'width' if self.patch_dim == 'w' else 'height'}"
        return f"{layout}, {self.order} order, about {self.estimated_bytes / GIB:.1f} GiB"


def min_tile(overlap: int) -> int:
    """Smallest share of an axis one tile may get, in latent positions (see the module docstring)."""
    return max(MIN_TILE_LATENT, 2 * overlap)


def max_patches(length: int, overlap: int) -> int:
    """Most tiles an axis of ``length`` latent positions may be cut into (``length // n >= min_tile``)."""
    return max(1, length // min_tile(overlap))


def layouts(latent_hw: tuple[int, int], overlap: int) -> Iterator[tuple[int | tuple[int, int], str]]:
    """(num_patches, patch_dim) of every allowed layout: 1 tile, the longer axis, then grids."""
    height, width = latent_hw
    yield 1, "w"
    long_dim, long_len = ("w", width) if width >= height else ("h", height)
    for n in range(2, max_patches(long_len, overlap) + 1):
        yield n, long_dim
    for rows in range(2, max_patches(height, overlap) + 1):
        for cols in range(2, max_patches(width, overlap) + 1):
            yield (rows, cols), "hw"


def check_overlap(overlap: object) -> None:
    """Automatic tiles need one int overlap (the layouts are enumerated for both axes alike)."""
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ConfigError(f"automatic tiles (num_patches=0) need one overlap of 0 or more latent positions for "
                          f"both axes, got {overlap!r}; give an int, or choose num_patches yourself")


# (num_patches, patch_dim, order) -> estimated bytes of a decode with those tiles
Estimate = Callable[[int | tuple[int, int], str, str], int]


def candidates(latent_hw: tuple[int, int], *, vae_precision: str, overlap: int = 3, order: str = "frame",
               estimate: Estimate | None = None) -> list[TileChoice]:
    """Every allowed choice, most preferred first (see the module docstring). ``estimate``: the memory of
    one choice; default: one process's decode (``memory.decode_bytes``)."""
    ORDERS.check(order)
    check_overlap(overlap)
    if estimate is None:
        height, width = latent_hw[0] * SCALE, latent_hw[1] * SCALE

        def estimate(num_patches: int | tuple[int, int], patch_dim: str, tile_order: str) -> int:
            return decode_bytes(width, height, num_patches=num_patches, overlap=overlap, patch_dim=patch_dim,
                                order=tile_order, vae_precision=vae_precision)

    ranked = []
    for rank, tile_order in enumerate(("frame", "tile") if order == "frame" else ("tile",)):
        for num_patches, patch_dim in layouts(latent_hw, overlap):
            choice = TileChoice(num_patches, patch_dim, tile_order, estimate(num_patches, patch_dim, tile_order))
            ranked.append(((rank, choice.count, patch_dim == "hw", choice.estimated_bytes), choice))
    ranked.sort(key=lambda pair: pair[0])
    return [choice for _, choice in ranked]


def choose_tiles(latent_hw: tuple[int, int], budget_bytes: int, *, vae_precision: str, overlap: int = 3,
                 order: str = "frame", estimate: Estimate | None = None, world_size: int = 1) -> TileChoice:
    """The fewest tiles whose estimated decode memory (beyond the VAE weights) is at most ``budget_bytes``.

    ``order="frame"`` prefers frame order and falls back to tile order; ``order="tile"`` stays in tile
    order. ``estimate`` and ``world_size``: for a decode split over processes (the budget is then per
    process). Raises ConfigError, with the smallest estimate, when nothing fits.
    """
    options = candidates(latent_hw, vae_precision=vae_precision, overlap=overlap, order=order, estimate=estimate)
    for choice in options:
        if choice.estimated_bytes <= budget_bytes:
            return choice
    smallest = min(options, key=lambda c: c.estimated_bytes)
    raise ConfigError(_no_fit_message(latent_hw, budget_bytes, smallest, vae_precision, overlap, world_size))


def _no_fit_message(latent_hw: tuple[int, int], budget: int, smallest: TileChoice, vae_precision: str,
                    overlap: int, world_size: int) -> str:
    fixes = []
    if vae_precision == "fp32":
        fixes.append("a bf16 VAE (--vae_dtype bf16, or VAE precision bf16: about half the memory)")
    fixes += ["freeing device memory (offload the other models, close other programs using the GPU)",
              (f"more, smaller tiles than automatic tiling allows (it keeps tiles at least "
               f"{min_tile(overlap) * SCALE} pixels wide): set --num_patches yourself, e.g. a grid with patch_dim "
               "hw in decode order tile"),
              "a smaller resolution"]
    split, where = (f" split over {world_size} processes", "on each process") if world_size > 1 else ("", "of device memory")
    return (f"the VAE decode of a {latent_hw[1] * SCALE}x{latent_hw[0] * SCALE} video{split} needs at least "
            f"{smallest.estimated_bytes / GIB:.1f} GiB {where} beyond the VAE weights ({smallest.describe()}), "
            f"but only {max(budget, 0) / GIB:.1f} GiB is usable (the smallest free memory, or the decode budget "
            "you set). Try " + "; or ".join(fixes))


def preset_tiles(latent_hw: tuple[int, int], *, vae_precision: str = "fp32", overlap: int = 3,
                 order: str = "frame") -> TileChoice:
    """The reference's tiles without a budget: the tile count of the largest preset whose area the video
    reaches (3 at 2K, 4 at 4K; 1 below 2K), along the width, at most ``max_patches`` of it."""
    check_overlap(overlap)
    area = latent_hw[0] * latent_hw[1] * SCALE * SCALE
    reached = [p for p in HR_PRESETS.values() if p.width * p.height <= area]
    count = max(reached, key=lambda p: p.width * p.height).decode_patches if reached else 1
    count = min(count, max_patches(latent_hw[1], overlap))
    estimate = decode_bytes(latent_hw[1] * SCALE, latent_hw[0] * SCALE, num_patches=count, overlap=overlap,
                            patch_dim="w", order=order, vae_precision=vae_precision)
    return TileChoice(count, "w", order, estimate)


def check_budget(budget_bytes: object) -> int | None:
    """A user's cap on decode memory (``DecodeSettings.budget_bytes``): None, or bytes >= 0."""
    if budget_bytes is None:
        return None
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ConfigError(f"decode memory budget {budget_bytes!r}: give a number of bytes (0 or more), or None to use "
                          "the device's free memory (--decode_budget_gib 0)")
    return budget_bytes


def effective_budget(cap_bytes: int | None, free_bytes: int | None) -> int | None:
    """The budget a decode chooses its tiles by: the smaller of a user's cap and the device's free memory,
    either alone where the other is None (no cap; no budget on a CPU), None where both are."""
    known = [value for value in (check_budget(cap_bytes), free_bytes) if value is not None]
    return min(known) if known else None


def auto_tiles(latent_hw: tuple[int, int], device: torch.device | str, *, vae_precision: str, overlap: int = 3,
               order: str = "frame", batch: int = 1, cap_bytes: int | None = None) -> TileChoice:
    """Tiles for a decode on ``device`` now: :func:`choose_tiles` within :func:`free_device_bytes` (shared by
    the ``batch`` videos decoded together), or within ``cap_bytes`` when that is smaller (on a CPU: the cap
    alone), or :func:`preset_tiles` where there is no budget at all. Logs the choice."""
    free = free_device_bytes(device)
    budget = effective_budget(cap_bytes, free)
    if budget is None:
        choice = preset_tiles(latent_hw, vae_precision=vae_precision, overlap=overlap, order=order)
        log.info("decode tiles (auto, no memory budget on %s: the reference's defaults): %s",
                 torch.device(device), choice.describe())
        return choice
    capped = free is None or budget < free
    try:
        choice = choose_tiles(latent_hw, budget // max(batch, 1), vae_precision=vae_precision, overlap=overlap,
                              order=order)
    except ConfigError as error:
        where = (f"the decode budget you set, {budget / GIB:.1f} GiB (--decode_budget_gib)"
                 if capped else f"usable memory on {torch.device(device)}: free plus PyTorch's reusable cache, less "
                                f"a margin of {HEADROOM_BYTES / GIB:.1f} GiB and {HEADROOM_FRACTION:.0%}")
        raise ConfigError(f"{error}. ({where[0].upper()}{where[1:]}"
                          + (f", shared by a batch of {batch}" if batch > 1 else "") + ")") from None
    log.info("decode tiles (auto, %.1f GiB %s on %s): %s", budget / GIB, "allowed by the decode budget" if capped
             else "usable", torch.device(device), choice.describe())
    return choice
