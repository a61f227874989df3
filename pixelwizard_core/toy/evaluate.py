"""The real pipeline on the toy models, measured: what a prompt gives, and whether it is right.

:func:`toy_pipeline` opens the shipped files through the project's loaders (:class:`~..pipeline.models.
Models`); :func:`generate` runs text -> LR anchor -> HR stage -> tiled decode through the stage API, as
``generate`` does, and measures the HR clip and the decoded anchor (:mod:`.measure`). :func:`check`
compares a result with its prompt: colour, shape and motion, the HR clip following the anchor's layout
(centroid track), and no visible tile seam. :mod:`.broken` holds deliberately broken variants.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..pipeline.engine import DecodeSettings
from ..pipeline.models import ModelFiles, Models
from ..pipeline.presets import StageSettings
from ..pipeline.runner import PixelWizard
from .measure import Measurement, measure
from .models import (HR_CFG, HR_SHIFT, HR_STEPS, LR_CFG, LR_SHIFT, LR_STEPS, OVERLAP, SIZES, TILES, WEIGHTS_DIR,
                     weight_paths)
from .world import from_model_video, parse_prompt
# Tolerances of :func:`check`: centroids in HR pixels of a 384x192 clip (the object's radius is about
# 33 px); the seam in mean absolute change between columns (0..1 pixel values; blended tiles of the
# shipped models stay under 0.004, tiles pasted over each other make steps of 0.03-0.07)
ANCHOR_TOLERANCE_PX = 18.0
SEAM_TOLERANCE = 0.01

TEST_PROMPTS = (
    "a red circle moving right on a dark background",
    "a blue square moving left on a light background",
    "a yellow triangle moving down on a gray background",
    "a green circle moving up on a split background",
    "a red square growing on a gray background",
)


def lr_settings(steps: int = LR_STEPS, cfg: float = LR_CFG) -> StageSettings:
    return StageSettings(SIZES.lr_width, SIZES.lr_height, SIZES.frames, steps, LR_SHIFT, cfg, "unipc")


def hr_settings(steps: int = HR_STEPS, cfg: float = HR_CFG, solver: str = "unipc",
                shift: float = HR_SHIFT) -> StageSettings:
    return StageSettings(SIZES.hr_width, SIZES.hr_height, SIZES.frames, steps, shift, cfg, solver)


def decode_settings(blend: str = "cosine") -> DecodeSettings:
    return DecodeSettings(num_patches=TILES, overlap=OVERLAP, blend=blend)


def toy_pipeline(folder: str | Path = WEIGHTS_DIR, *, hr_file: str | Path | None = None) -> PixelWizard:
    """The pipeline over the toy files in ``folder`` (CPU, float32), loaded by the project's loaders."""
    paths = weight_paths(folder)
    files = ModelFiles(text_encoder=paths["text"], vae=paths["vae"], lr=paths["lr"],
                       hr=Path(hr_file) if hr_file else paths["hr"])
    files.check_kinds("text", "vae", "lr", "hr")
    return PixelWizard(Models(files, device="cpu", dtype=torch.float32, vae_dtype=torch.float32))


@dataclass
class ToyResult:
    prompt: str
    hr: torch.Tensor                   # [F, H, W, 3] in 0..1
    anchor: torch.Tensor               # [F, h, w, 3] in 0..1 (the anchor decoded whole)
    measured: Measurement
    anchor_measured: Measurement
    whole: torch.Tensor                # [F, H, W, 3]: the HR latent decoded whole (the seam check's reference)
    latent: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def decode_frames(pw: PixelWizard, latent: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """The tiled decode of the stage API, frames collected: [F, H, W, 3] in 0..1."""
    chunks = pw.stages.decode_stream(pw.models.handle("vae"), latent, settings)
    with contextlib.closing(chunks):
        video = torch.cat([chunk.float().cpu() for chunk in chunks], dim=2)
    return from_model_video(video)


def decode_whole(pw: PixelWizard, latent: torch.Tensor) -> torch.Tensor:
    """A latent (an anchor, or an HR latent for the seam check's reference) decoded untiled: [F, H, W, 3]."""
    with pw.models.use("vae") as vae:
        return from_model_video(vae.decode(latent.to(vae.device)).cpu())


def generate(pw: PixelWizard, prompt: str, seed: int = 0, *, hr: StageSettings | None = None,
             lr: StageSettings | None = None, decode: DecodeSettings | None = None,
             anchor=None) -> ToyResult:
    """One prompt through the two stages and the tiled decode; ``anchor`` reuses a given LR anchor."""
    text = pw.conditioning(prompt)
    if anchor is None:
        anchor = pw.anchor(text, lr or lr_settings(), seed)
    latent = pw.upscale(anchor, text, hr or hr_settings(), seed + 9900)
    frames = decode_frames(pw, latent, decode or decode_settings())
    anchor_clip = decode_whole(pw, anchor.latent)
    return ToyResult(prompt, frames, anchor_clip, measure(frames), measure(anchor_clip), decode_whole(pw, latent),
                     latent, {"anchor": anchor})


# ---------------------------------------------------------------------------------------------- checks

def anchor_distance(result: ToyResult) -> float:
    """Mean distance (HR pixels) between the HR clip's and the anchor's object centroids, frame by frame."""
    hr, lr = result.measured.centroids, result.anchor_measured.centroids
    if not hr or not lr or len(hr) != len(lr):
        return float("inf")
    scale = result.hr.shape[2] / result.anchor.shape[2]
    distances = [((hx - (lx + 0.5) * scale + 0.5) ** 2 + (hy - (ly + 0.5) * scale + 0.5) ** 2) ** 0.5
                 for (hx, hy), (lx, ly) in zip(hr, lr)]
    return sum(distances) / len(distances)


def _column_jumps(clip: torch.Tensor) -> torch.Tensor:
    """[W - 1]: mean absolute change from each pixel column to the next."""
    return (clip[:, :, 1:] - clip[:, :, :-1]).abs().mean(dim=(0, 1, 3))


def seam_step(tiled: torch.Tensor, whole: torch.Tensor) -> float:
    """The largest step between neighbouring columns that the tiled decode has and the whole decode of the
    same latent has not (about 0 when tiles blend; a tile edge pasted over its neighbour shows as a step).
    Measured against the whole decode, a content edge (the split background) is not taken for a seam."""
    return float((_column_jumps(tiled) - _column_jumps(whole)).max())


def check(result: ToyResult) -> dict[str, bool]:
    """Which quality checks a result passes: prompt content, anchor layout, seamless decode."""
    expected = parse_prompt(result.prompt)
    passed = result.measured.matches(expected)
    passed["follows_anchor"] = anchor_distance(result) <= ANCHOR_TOLERANCE_PX
    passed["seamless"] = seam_step(result.hr, result.whole) <= SEAM_TOLERANCE
    return passed


def summary(result: ToyResult) -> dict:
    m = result.measured
    return {"prompt": result.prompt, "colour": m.colour, "shape": m.shape, "motion": m.motion,
            "speed": round(m.speed, 2), "sharpness": round(m.sharpness, 3), "flicker": round(m.flicker, 4),
            "anchor_px": round(anchor_distance(result), 1), "seam": round(seam_step(result.hr, result.whole), 4),
            "checks": check(result)}
