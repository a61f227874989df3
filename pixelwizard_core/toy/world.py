"""The toy world: one coloured shape moving on a plain or two-tone background, described by a prompt.

A scene is a :class:`Scene` (shape, colour, background, motion, start position, size); its prompt comes
from a one-rule grammar ("a red circle moving left on a dark background", "a blue square growing on a
split background") and :func:`parse_prompt` reads it back. :func:`render` draws a clip at any size from
the same scene (coordinates are fractions of the frame), antialiased by a one-pixel signed-distance ramp,
so the LR and HR versions of a scene agree. Everything is a pure function of its arguments and a seed.

Backgrounds are achromatic and objects saturated, so the measurements (:mod:`.measure`) find the object
by saturation alone, without knowing the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.18, 0.75, 0.25),
    "blue": (0.2, 0.35, 0.9),
    "yellow": (0.9, 0.82, 0.15),
}
# grey levels; "split" is dark on the left half and light on the right half
BACKGROUNDS: dict[str, tuple[float, float]] = {
    "dark": (0.12, 0.12),
    "gray": (0.5, 0.5),
    "light": (0.86, 0.86),
    "split": (0.12, 0.86),
}
MOTIONS = ("left", "right", "up", "down", "growing")
# per-frame displacement in fractions of the frame height (x and y use the same unit: shapes stay round)
SPEED = 0.05
GROWTH = 0.12     # relative radius gain per frame for "growing"
RADIUS = 0.17     # object radius as a fraction of the frame height
WORDS = ("a", "moving", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, *MOTIONS)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    motion: str
    x: float = 0.5        # start centre, fraction of the width
    y: float = 0.5        # start centre, fraction of the height
    radius: float = RADIUS

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS),
                              ("motion", MOTIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"toy scene {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")

    @property
    def prompt(self) -> str:
        verb = "growing" if self.motion == "growing" else f"moving {self.motion}"
        return f"a {self.colour} {self.shape} {verb} on a {self.background} background"


def parse_prompt(prompt: str) -> dict[str, str]:
    """The shape, colour, background and motion a grammar prompt names (missing ones are left out)."""
    words = prompt.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for word in words:
        for key, table in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS), ("motion", MOTIONS)):
            if word in table and key not in found:
                found[key] = word
    return found


def scene_from_prompt(prompt: str, x: float = 0.5, y: float = 0.5) -> Scene:
    """The scene a prompt describes (centred unless told), for reference renders of a prompt."""
    found = parse_prompt(prompt)
    missing = [k for k in ("shape", "colour", "background", "motion") if k not in found]
    if missing:
        raise ConfigError(f"prompt {prompt!r} does not name a {', '.join(missing)} of the toy world")
    return Scene(found["shape"], found["colour"], found["background"], found["motion"], x, y)


def travel(frames: int) -> float:
    """How far (fraction of the height) an object moves over a clip of ``frames`` frames."""
    return SPEED * (frames - 1)


def random_scene(generator: torch.Generator, frames: int, aspect: float = 2.0) -> Scene:
    """A scene with every factor uniform and a start position that keeps the object inside the frame."""
    def pick(options) -> str:
        options = tuple(options)
        return options[int(torch.randint(len(options), (), generator=generator))]

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    motion = pick(MOTIONS)
    radius = RADIUS * uniform(0.85, 1.15)
    span = travel(frames)
    margin = radius * 1.1
    x_low, x_high = margin / aspect, 1 - margin / aspect          # x in fractions of the width
    y_low, y_high = margin, 1 - margin
    dx, dy = {"left": (-span / aspect, 0), "right": (span / aspect, 0), "up": (0, -span),
              "down": (0, span)}.get(motion, (0.0, 0.0))
    if motion == "growing":  # room for the final size
        grown = radius * (1 + GROWTH) ** (frames - 1) * 1.05
        x_low, x_high, y_low, y_high = grown / aspect, 1 - grown / aspect, grown, 1 - grown
    x = uniform(max(x_low, x_low - dx), min(x_high, x_high - dx))
    y = uniform(max(y_low, y_low - dy), min(y_high, y_high - dy))
    return Scene(pick(SHAPES), pick(COLOURS), pick(BACKGROUNDS), motion, x, y, radius)


# ---------------------------------------------------------------------------------------------- rendering

def _signed_distance(shape: str, px: torch.Tensor, py: torch.Tensor, radius: float) -> torch.Tensor:
    """Signed distance (negative inside) to the shape centred at 0, in the units of px, py."""
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - radius
    if shape == "square":
        side = radius * 0.89  # about the circle's area
        return torch.maximum(px.abs(), py.abs()) - side
    # an upward triangle (equilateral, circumradius 1.25 r): the largest signed distance to its 3 edges
    r = radius * 1.25
    distances = []
    for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        nx, ny = math.cos(angle), math.sin(angle)  # outward normals of the edges (y grows downwards)
        distances.append(px * nx + py * ny - r / 2)
    return torch.stack(distances).amax(0)


def object_state(scene: Scene, frame: int, aspect: float) -> tuple[float, float, float]:
    """(centre x, centre y, radius) at ``frame``, all in fractions of the frame height."""
    cx, cy, radius = scene.x * aspect, scene.y, scene.radius
    step = {"left": (-SPEED, 0.0), "right": (SPEED, 0.0), "up": (0.0, -SPEED), "down": (0.0, SPEED)}
    dx, dy = step.get(scene.motion, (0.0, 0.0))
    if scene.motion == "growing":
        radius = radius * (1 + GROWTH) ** frame
    return cx + dx * frame, cy + dy * frame, radius


def render(scene: Scene, width: int, height: int, frames: int) -> torch.Tensor:
    """The clip [frames, height, width, 3] float32 in 0..1."""
    aspect = width / height
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / height
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    left, right = BACKGROUNDS[scene.background]
    background = torch.where(px < aspect / 2, torch.tensor(left), torch.tensor(right))
    colour = torch.tensor(COLOURS[scene.colour])
    out = torch.empty(frames, height, width, 3)
    for f in range(frames):
        cx, cy, radius = object_state(scene, f, aspect)
        sdf = _signed_distance(scene.shape, px - cx, py - cy, radius) * height  # in pixels
        alpha = (0.5 - sdf).clamp(0, 1)[..., None]
        out[f] = alpha * colour + (1 - alpha) * background[..., None]
    return out


def to_model_video(clip: torch.Tensor) -> torch.Tensor:
    """[F, H, W, 3] in 0..1 -> [1, 3, F, H, W] in -1..1 (the VAE's input)."""
    return (clip * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)


def from_model_video(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] in -1..1 -> [F, H, W, 3] in 0..1."""
    return ((video[0].permute(1, 2, 3, 0).float() + 1) / 2).clamp(0, 1)


def dataset(count: int, seed: int, frames: int) -> list[Scene]:
    """``count`` random scenes, a pure function of the seed."""
    generator = torch.Generator().manual_seed(seed)
    return [random_scene(generator, frames) for _ in range(count)]
