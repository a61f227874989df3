"""Tile geometry of the decode: how a latent is cut into overlapping tiles, as the reference cuts it.

Below both the tiled decode (which blends the tiles) and the memory model (which prices them), so
neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import Registry

SCALE = 16  # Wan2.2 VAE: 8x in the decoder, 2x in the unpatchify
# Closed lists of the decode's options, name -> description (the CLI's help and the nodes' tooltips)
PATCH_DIMS: Registry[str] = Registry("patch_dim")
PATCH_DIMS.register("w", "tiles side by side along the width")
PATCH_DIMS.register("h", "tiles stacked along the height")
PATCH_DIMS.register("hw", "a grid of tiles over both")
ORDERS: Registry[str] = Registry("decode order")
ORDERS.register("frame", "all tiles in lockstep, frames streamed to the files")
ORDERS.register("tile", "one whole tile at a time into a video in host memory, as the reference")
AUTO_PATCHES = 0  # num_patches that asks for tiles chosen from free memory (decode_budget.py)
# "frame": all tiles in lockstep, frames streamed (every tile's causal cache on the device); "tile": one
# tile at a time into a host canvas (the reference). See tiled_decode.py.


@dataclass(frozen=True)
class Tile:
    """One tile in latent coordinates: rows [r0, r1) and columns [c0, c1)."""

    rows: tuple[int, int]
    cols: tuple[int, int]

    def pixels(self, scale: int = SCALE) -> tuple[slice, slice]:
        """(row slice, column slice) of the tile in the decoded frame."""
        return slice(self.rows[0] * scale, self.rows[1] * scale), slice(self.cols[0] * scale, self.cols[1] * scale)


def split_axis(length: int, num_patches: int, overlap: int) -> list[tuple[int, int]]:
    """Latent ranges [start, stop) of ``num_patches`` pieces of an axis of ``length``, as the reference cuts."""
    base = length // num_patches
    ranges = []
    for i in range(num_patches):
        start = base * i
        stop = length if i == num_patches - 1 else base * (i + 1)
        if i > 0:
            start = max(0, start - overlap)
        if i < num_patches - 1:
            stop = min(length, stop + overlap)
        ranges.append((start, stop))
    return ranges


def per_axis(value: int | Sequence[int], name: str, patch_dim: str) -> tuple[int, int]:
    """(height, width) values of num_patches / overlap for a patch_dim."""
    if patch_dim == "hw":
        pair = (value, value) if isinstance(value, int) else tuple(value)
        if len(pair) != 2:
            raise ConfigError(f"{name} for patch_dim='hw' must be one int or (height, width), got {value!r}")
    elif not isinstance(value, int):
        raise ConfigError(f"{name} must be an int for patch_dim={patch_dim!r}, got {value!r}")
    else:
        pair = (value, 1 if name == "num_patches" else 0) if patch_dim == "h" else \
            (1 if name == "num_patches" else 0, value)
    for v in pair:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{name} must be integer(s), got {value!r}")
    return pair  # type: ignore[return-value]


def plan_tiles(latent_hw: tuple[int, int], num_patches: int | Sequence[int] = 3, patch_dim: str = "w",
               overlap: int | Sequence[int] = 3) -> list[Tile]:
    """Tiles (row-major) for a latent of spatial size (h, w); validates the arguments.

    ``patch_dim`` is ``"w"``, ``"h"`` or ``"hw"`` (a grid; then ``num_patches`` and ``overlap`` may be
    (height, width) pairs). ``overlap`` is in latent columns (16 pixels each) added on each interior side.
    """
    row_ranges, col_ranges = axis_ranges(latent_hw, num_patches, patch_dim, overlap)
    return [Tile(rows, cols) for rows in row_ranges for cols in col_ranges]


def axis_ranges(latent_hw: tuple[int, int], num_patches: int | Sequence[int], patch_dim: str,
                 overlap: int | Sequence[int]) -> list[list[tuple[int, int]]]:
    PATCH_DIMS.check(patch_dim)
    counts = per_axis(num_patches, "num_patches", patch_dim)
    overlaps = per_axis(overlap, "overlap", patch_dim)
    axis_ranges = []
    for axis, length, n, ov in zip(("height", "width"), latent_hw, counts, overlaps):
        if n < 1:
            raise ConfigError(f"num_patches must be at least 1, got {n} along {axis} (only a decode's "
                              "num_patches=0, one int, means automatic tiles)")
        if n > length:
            raise ConfigError(
                f"num_patches={n} along {axis} is more than the latent's {length} {axis} positions "
                f"({length * SCALE} pixels); use at most {length} patches (a few hundred pixels each is typical)")
        if ov < 0:
            raise ConfigError(f"overlap must be 0 or more latent positions, got {ov} along {axis}")
        axis_ranges.append(split_axis(length, n, ov))
    return axis_ranges
