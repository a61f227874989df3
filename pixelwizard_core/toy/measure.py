"""Measurements of a toy clip, without the prompt: what is there, how it moves, how sharp and steady it is.

The object is the set of saturated pixels (backgrounds are grey). From its mask per frame:

- **colour**: the palette colour nearest to the mean colour of the mask's core (eroded, so blur at the
  edge does not pull it towards the background);
- **shape**: fill ratio of the mask in its bounding box (square ~1.0, circle ~0.79, triangle ~0.5);
- **motion**: the centroid track from the first to the last frame, or "growing" when the area grows and
  the centroid stays; speed in pixels per frame;
- **sharpness**: the gradient-weighted mean colour gradient of the clip (0..1 per pixel): an edge of
  contrast c gives about c for a one-pixel edge and c/n for one spread over n pixels;
- **flicker**: mean absolute change between consecutive frames on background pixels (no object in either),
  0 for a steady clip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .world import COLOURS

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


def _erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    inverse = (~mask).float()[:, None]
    grown = F.max_pool2d(inverse, 2 * pixels + 1, stride=1, padding=pixels)
    return grown[:, 0] < 0.5


def _nearest_colour(rgb: torch.Tensor) -> str:
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    # compare chromaticity (colour divided by its brightness), so shading does not change the answer
    chroma = rgb / rgb.sum().clamp_min(1e-6)
    distances = (palette / palette.sum(1, keepdim=True) - chroma).pow(2).sum(1)
    return names[int(distances.argmin())]


def _fill_ratio(mask: torch.Tensor) -> float:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() < 4:
        return 0.0
    box = (ys.max() - ys.min() + 1).float() * (xs.max() - xs.min() + 1).float()
    return float(mask.sum() / box)


def classify_shape(fill: float) -> str:
    """Fill ratio -> shape (thresholds halfway between the ideal 0.5, 0.785 and 1.0)."""
    if fill >= 0.9:
        return "square"
    return "circle" if fill >= 0.64 else "triangle"


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
    mask = object_mask(clip)
    areas = mask.flatten(1).sum(1).float()
    if int(areas.min()) == 0:  # no object in some frame: nothing can be read
        return Measurement("none", "none", "none", 0.0, sharpness(clip), flicker(clip, mask),
                           float(areas.mean() / mask[0].numel()), 0.0, ())
    core = _erode(mask, 1)
    core = core if core.any() else mask
    colour = _nearest_colour(clip[core].mean(0))
    middle = mask.shape[0] // 2
    fill = _fill_ratio(mask[middle])
    centroids = _centroids(mask)
    motion, speed = _motion(centroids, areas)
    return Measurement(colour, classify_shape(fill), motion, speed, sharpness(clip), flicker(clip, mask),
                       float(areas.mean() / mask[0].numel()), fill, tuple(centroids))

