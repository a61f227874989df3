"""Measurements of a toy clip, without the prompt: what is there, how it moves, how sharp and steady it is.

The object is the set of saturated pixels (backgrounds are grey). From its mask per frame:

- **colour**: the palette colour (by chromaticity) that most saturated pixels are nearest to; the object
  is then the saturated pixels of that colour (a fringe of another hue, e.g. a codec's or VAE's colour
  halo, is not part of it);
- **shape**: the ideal shape (circle, square, upward triangle) that, placed at the object's centroid with
  the object's area, overlaps the object best (intersection over union, summed over the frames); rounded
  corners or concave sides of a blurred square still overlap a square more than a circle;
- **motion**: the centroid track from the first to the last frame, or "growing" when the area grows and
  the centroid stays; speed in pixels per frame;
- **sharpness**: the gradient-weighted mean colour gradient of the clip (0..1 per pixel): an edge of
  contrast c gives about c for a one-pixel edge and c/n for one spread over n pixels;
- **flicker**: mean absolute change between consecutive frames on background pixels (no object in either),
  0 for a steady clip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .world import COLOURS, SHAPES

SATURATION_MIN = 0.35
VALUE_MIN = 0.2
GROWING_AREA_RATIO = 1.4


@dataclass(frozen=True)
class Measurement:
    colour: str
    shape: str
    motion: str
    speed: float            # centroid pixels per frame (or relative area gain per frame for "growing")
    sharpness: float        # 0..1, see the module docstring
    flicker: float          # mean |I_t - I_t-1| on the background
    coverage: float         # mean fraction of the frame the object covers
    fill: float             # fill ratio of the object in its bounding box (middle frame)
    centroids: tuple[tuple[float, float], ...]

    def matches(self, expected: dict[str, str]) -> dict[str, bool]:
        """Which of the prompt's colour, shape and motion this clip shows."""
        return {key: getattr(self, key) == value for key, value in expected.items()
                if key in ("colour", "shape", "motion")}

    def to_dict(self) -> dict:
        return asdict(self)


def object_mask(clip: torch.Tensor) -> torch.Tensor:
    """[F, H, W] bool: saturated, not too dark pixels of a clip [F, H, W, 3] in 0..1."""
    high, low = clip.amax(-1), clip.amin(-1)
    saturation = (high - low) / high.clamp_min(1e-6)
    return (saturation > SATURATION_MIN) & (high > VALUE_MIN)


def _palette_chroma() -> tuple[list[str], torch.Tensor]:
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    return names, palette / palette.sum(1, keepdim=True)


def _colour_index(rgb: torch.Tensor) -> torch.Tensor:
    """Index of the nearest palette colour by chromaticity (colour over brightness, so shading does not
    change the answer) for each pixel rgb [..., 3]."""
    _, chroma = _palette_chroma()
    own = rgb / rgb.sum(-1, keepdim=True).clamp_min(1e-6)
    return (own[..., None, :] - chroma).pow(2).sum(-1).argmin(-1)


def _fill_ratio(mask: torch.Tensor) -> float:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() < 4:
        return 0.0
    box = (ys.max() - ys.min() + 1).float() * (xs.max() - xs.min() + 1).float()
    return float(mask.sum() / box)


def classify_shape(fill: float) -> str:
    """Fill ratio -> shape (thresholds halfway between the ideal 0.5, 0.785 and 1.0): the rough reading of
    one mask; :func:`shape_scores` is what :func:`measure` uses."""
    if fill >= 0.9:
        return "square"
    return "circle" if fill >= 0.64 else "triangle"


def _template(shape: str, px: torch.Tensor, py: torch.Tensor, area: float) -> torch.Tensor:
    """Mask of the ideal ``shape`` of ``area`` pixels centred at 0 (px, py: pixel offsets)."""
    if shape == "circle":
        return px * px + py * py <= area / math.pi
    if shape == "square":
        half = area ** 0.5 / 2
        return (px.abs() <= half) & (py.abs() <= half)
    radius = (4 * area / 3 ** 0.5) ** 0.5 / 3 ** 0.5   # circumradius of the equilateral triangle
    edges = [px * math.cos(angle) + py * math.sin(angle) <= radius / 2  # y grows downwards: apex up
             for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    return edges[0] & edges[1] & edges[2]


def shape_scores(mask: torch.Tensor, centroids: list[tuple[float, float]]) -> dict[str, float]:
    """Shape -> intersection over union of the object mask [F, H, W] with that ideal shape placed at each
    frame's centroid with the frame's object area, summed over the frames."""
    height, width = mask.shape[1:]
    scores = dict.fromkeys(SHAPES, 0.0)
    for frame, (cx, cy) in zip(mask, centroids):
        area = float(frame.sum())
        # a window holding the object and every template (the triangle reaches 0.88 sqrt(area) out)
        rows, cols = torch.nonzero(frame, as_tuple=True)
        reach = 0.9 * area ** 0.5 + 2
        top = max(0, min(int(cy - reach), int(rows.min())))
        bottom = min(height, max(int(cy + reach) + 1, int(rows.max()) + 1))
        left = max(0, min(int(cx - reach), int(cols.min())))
        right = min(width, max(int(cx + reach) + 1, int(cols.max()) + 1))
        frame = frame[top:bottom, left:right]
        ys = torch.arange(top, bottom, dtype=torch.float32)[:, None]
        xs = torch.arange(left, right, dtype=torch.float32)[None, :]
        for shape in SHAPES:
            ideal = _template(shape, xs - cx, ys - cy, area)
            union = float((ideal | frame).sum())
            scores[shape] += float((ideal & frame).sum()) / max(union, 1.0)
    return scores


def _centroids(mask: torch.Tensor) -> list[tuple[float, float]]:
    height, width = mask.shape[1:]
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    out = []
    for frame in mask.float():
        total = frame.sum().clamp_min(1.0)
        out.append((float((frame * xs).sum() / total), float((frame * ys).sum() / total)))
    return out


def _motion(centroids: list[tuple[float, float]], areas: torch.Tensor) -> tuple[str, float]:
    frames = len(centroids)
    dx = centroids[-1][0] - centroids[0][0]
    dy = centroids[-1][1] - centroids[0][1]
    ratio = float(areas[-1] / areas[0].clamp_min(1.0))
    distance = (dx * dx + dy * dy) ** 0.5 / max(frames - 1, 1)
    if ratio > GROWING_AREA_RATIO:  # a moving object keeps its area (scenes keep it inside the frame)
        return "growing", (ratio ** (1 / max(frames - 1, 1))) - 1
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), distance
    return ("down" if dy > 0 else "up"), distance


def sharpness(clip: torch.Tensor) -> float:
    """Gradient-weighted mean gradient, sum(g^2) / sum(g), g the per-pixel colour gradient magnitude: an
    edge of contrast c spread over n pixels gives c / n whatever its length; faint noise weighs little."""
    gx = (clip[:, :, 1:] - clip[:, :, :-1]).abs().amax(-1)[:, :-1]
    gy = (clip[:, 1:] - clip[:, :-1]).abs().amax(-1)[:, :, :-1]
    grad = torch.maximum(gx, gy).double()
    return float(grad.pow(2).sum() / grad.sum().clamp_min(1e-9))


def flicker(clip: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute frame-to-frame change on pixels that are background in both frames."""
    if clip.shape[0] < 2:
        return 0.0
    background = ~(_dilate(mask[1:], 2) | _dilate(mask[:-1], 2))
    change = (clip[1:] - clip[:-1]).abs().mean(-1)
    return float((change * background).sum() / background.sum().clamp_min(1))


def _dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    return F.max_pool2d(mask.float()[:, None], 2 * pixels + 1, stride=1, padding=pixels)[:, 0] > 0.5


def measure(clip: torch.Tensor) -> Measurement:
    """All measurements of a clip [F, H, W, 3] float in 0..1."""
    clip = clip.float().clamp(0, 1)
    saturated = object_mask(clip)
    names, _ = _palette_chroma()
    nearest = _colour_index(clip)
    counts = torch.bincount(nearest[saturated], minlength=len(names))
    dominant = int(counts.argmax())
    mask = saturated & (nearest == dominant)
    areas = mask.flatten(1).sum(1).float()
    if int(areas.min()) == 0:  # no object in some frame: nothing can be read
        return Measurement("none", "none", "none", 0.0, sharpness(clip), flicker(clip, saturated),
                           float(areas.mean() / mask[0].numel()), 0.0, ())
    centroids = _centroids(mask)
    motion, speed = _motion(centroids, areas)
    scores = shape_scores(mask, centroids)
    fill = _fill_ratio(mask[mask.shape[0] // 2])
    return Measurement(names[dominant], max(scores, key=scores.get), motion, speed, sharpness(clip),
                       flicker(clip, saturated), float(areas.mean() / mask[0].numel()), fill, tuple(centroids))
