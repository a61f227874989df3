"""3D rotary position embedding of the Wan DiT.

Head dim 128 = 64 complex pairs, split 22 (frames) / 21 (height) / 21 (width); each axis uses
theta^(-2i/d_axis) with its own d_axis (44, 42, 42) and integer positions. The official code rotates in
complex128; we build the angle tables in float64 (tiny: 1024 x 64) and rotate in float32, which stays
within 1e-6 relative of the complex128 result and never makes a float64 tensor of sequence length.
"""

from __future__ import annotations

import torch

MAX_POSITIONS = 1024
THETA = 10000.0


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs given to (frames, height, width): 22/21/21 for head_dim 128."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _axis_angles(positions: torch.Tensor, pairs: int) -> torch.Tensor:
    exponents = torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=positions.device) / (2 * pairs)
    return torch.outer(positions.to(torch.float64), 1.0 / torch.pow(THETA, exponents))


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, head_dim/2] float32 for the tokens of a (frames, height, width) grid, F-H-W order.

    cos/sin are taken per axis in float64 (at most 1024 rows) and only then broadcast over the grid,
    so nothing of sequence length is ever float64.
    """
    if max(grid) > MAX_POSITIONS:
        raise ValueError(f"token grid {grid} exceeds the {MAX_POSITIONS} RoPE positions of the Wan DiT")
    f, h, w = grid
    axes = [_axis_angles(torch.arange(n, device=device), pairs) for n, pairs in zip(grid, axis_pairs(head_dim))]
    views = ((f, 1, 1, -1), (1, h, 1, -1), (1, 1, w, -1))

    def over_grid(fn) -> torch.Tensor:
        parts = [fn(angles).float().view(shape).expand(f, h, w, -1) for angles, shape in zip(axes, views)]
        return torch.cat(parts, dim=-1).reshape(f * h * w, -1)

    return over_grid(torch.cos), over_grid(torch.sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of ``x`` [B, L, N, D] by cos/sin [L, D/2]; float32 result."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2)
