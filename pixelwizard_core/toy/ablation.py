"""The paper's ablation on the toy world: HR models trained with different shortcut objectives, each
sampled with 2, 4 and 8 HR steps from ground-truth anchors, scored against the ground-truth clips.

A validation item is a scene never seen in training (another seed): its HR clip is the truth, its 4x
area-downsampled clip, VAE-encoded, is the anchor (as in training). The HR stage is the pipeline's own
:func:`~..pipeline.stages.hr_latent` (UniPC, CFG, dt from the schedule); the clip is decoded whole. Scores:

- ``content``: fraction of clips whose measured colour, shape and motion all match the scene;
- ``centroid_px``: mean distance between measured and true object centroids (HR pixels);
- ``sharpness``: measured sharpness over that of the VAE's reconstruction of the true clip (1 = as sharp
  as the VAE can be; lower = blurrier);
- ``mae``: mean absolute pixel error against the VAE's reconstruction of the true clip.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..models.hr import WanHRDiT
from ..models.vae import WanVAE
from ..pipeline.anchors import Anchor
from ..pipeline.stages import hr_latent
from ..pipeline.text import TextEncoder
from .evaluate import hr_settings
from .measure import measure
from .models import SIZES
from .recipe import ToyData, ToyRecipe, downsample_clip, export_hr, new_hr_dit, shortcut_hr_dit
from .world import Scene, dataset, from_model_video, render, to_model_video

VALIDATION_SEED = 10_000  # scenes of another seed than any training run's


@dataclass
class Item:
    scene: Scene
    truth: torch.Tensor          # VAE reconstruction of the true clip [F, H, W, 3]
    centroids: tuple             # true centroids (from the rendered clip)
    anchor: torch.Tensor         # anchor latent [1, 48, T, h/16, w/16]


@torch.no_grad()
def validation_items(vae: WanVAE, count: int, seed: int = VALIDATION_SEED) -> list[Item]:
    items = []
    factor = SIZES.hr_width // SIZES.lr_width
    for scene in dataset(count, seed, SIZES.frames):
        clip = render(scene, SIZES.hr_width, SIZES.hr_height, SIZES.frames)
        truth = from_model_video(vae.decode(vae.encode(to_model_video(clip))))
        anchor = vae.encode(to_model_video(downsample_clip(clip, factor)))
        items.append(Item(scene, truth, measure(clip).centroids, anchor))
    return items


def _centroid_error(measured: tuple, truth: tuple) -> float:
    if len(measured) != len(truth):
        return float(SIZES.hr_height)  # no object found: as far off as the frame is high
    return statistics.fmean(((a - c) ** 2 + (b - d) ** 2) ** 0.5 for (a, b), (c, d) in zip(measured, truth))


@torch.no_grad()
def score(model: WanHRDiT, vae: WanVAE, text: TextEncoder, items: list[Item], steps: int, seed: int = 0,
          cfg: float | None = None) -> dict[str, float]:
    """Mean scores of ``model`` at ``steps`` HR steps over ``items`` (one noise seed per item)."""
    settings = hr_settings(steps) if cfg is None else hr_settings(steps, cfg=cfg)
    rows = []
    for i, item in enumerate(items):
        anchor = Anchor.from_latent(item.anchor, model="validation")
        latent = hr_latent(model, anchor.latent, text.conditioning(item.scene.prompt), settings, seed + i)
        clip = from_model_video(vae.decode(latent))
        m = measure(clip)
        rows.append({
            "content": float((m.colour, m.shape, m.motion) == (item.scene.colour, item.scene.shape, item.scene.motion)),
            "centroid_px": _centroid_error(m.centroids, item.centroids),
            "sharpness": m.sharpness / max(measure(item.truth).sharpness, 1e-6),
            "mae": float((clip - item.truth).abs().mean()),
        })
    return {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}


def spread(values: list[float]) -> str:
    """"mean ± std" (std 0 for one value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


SCORES = ("content", "centroid_px", "sharpness", "mae")


def table(results: dict[str, dict[int, list[dict[str, float]]]], keys: tuple[str, ...] = SCORES) -> str:
    """Markdown table: one row per (variant, steps), mean ± std over the runs (training/noise seeds)."""
    lines = ["| variant | HR steps | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for variant, by_steps in results.items():
        for steps, runs in sorted(by_steps.items()):
            cells = [spread([run[k] for run in runs]) for k in keys]
            lines.append(f"| {variant} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The paper's shortcut objective and its ablations: each trains the same steps from the same flow-matching
# start (the recipe's ``hr_fm``), differing only in the named options.
VARIANTS = {
    "exponential+calibration": {},
    "uniform+calibration": {"index_sampling": "uniform"},
    "exponential, no calibration": {"calibration_power": 0.0},
}


def train_variants(cache: str | Path, output: str | Path, recipe: ToyRecipe = ToyRecipe(),
                   names: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Path]:
    """Shortcut-train one HR model per variant from ``cache``'s data and ``hr_fm`` (written by
    ``train-toy --cache``); write each as an HR file in ``output``. Returns name -> file."""
    import torch

    cache, output = Path(cache), Path(output)
    data = ToyData(**torch.load(cache / "hr_data.pt", weights_only=True))
    start = new_hr_dit(0)
    start.load_state_dict(torch.load(cache / "hr_fm.pt", weights_only=True))
    files = {}
    for name in names:
        config = replace(recipe.shortcut, **VARIANTS[name])
        if not VARIANTS[name] and (cache / "hr_sc.pt").is_file():  # the recipe's own run: the same seeds
            model = new_hr_dit(0)
            model.load_state_dict(torch.load(cache / "hr_sc.pt", weights_only=True))
        else:
            model = shortcut_hr_dit(start, data, recipe, config)
        files[name] = export_hr(output / f"hr_{name.replace(' ', '_').replace(',', '').replace('+', '_')}.safetensors",
                                model, {"variant": name, "shortcut": config.to_dict()})
    return files
