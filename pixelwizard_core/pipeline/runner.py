"""PixelWizard end to end on loaded models: text -> anchor -> HR latent -> tiled decode -> video file.

Each method is one stage, so the CLI's ``anchor`` / ``upscale`` / ``decode`` commands, the ComfyUI
nodes and the worker pool can run the stages apart and get the same result as one ``generate``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io.video import PngSequenceWriter, VideoWriter
from ..system import peak_rss_bytes
from .anchors import Anchor
from .loop import StepCallback
from .models import Models
from .presets import FPS, StageSettings
from .stages import hr_latent, lr_anchor
from .text import TextConditioning
from .tiled_decode import tiled_decode_stream

log = logging.getLogger("pixelwizard")


@dataclass(frozen=True)
class DecodeSettings:
    """Tiled decode and video output: reference defaults are 3 (2K) / 4 (4K) patches along width, overlap 3."""

    # 0 = automatic (tiled_decode_stream / decode_budget.py): the fewest tiles whose estimated memory fits
    # what is free on the VAE's device when the decode starts (then patch_dim is chosen too, and order
    # "frame" may fall back to "tile"); without a budget (CPU) the reference's 3 at 2K, 4 at 4K, else 1.
    # Multi-process decodes resolve 0 per rank's share of the tiles, from the smallest free memory over the
    # ranks, the same settings on every rank (distributed/tiles.py choose_rank_tiles).
    num_patches: int = 3
    patch_dim: str = "w"
    overlap: int = 3
    blend: str = "cosine"
    # "frame": all tiles in lockstep, frames streamed to the writer (no video-sized host buffer, every
    # tile's causal cache on the device); "tile": one tile at a time into a host canvas (the reference)
    order: str = "frame"
    fps: int = FPS
    crf: int = 10  # libx264 constant rate factor; 10 matches the reference's imageio quality 8
    # A cap in bytes on the decode memory (beyond the VAE weights) the automatic choice plans for, per GPU or
    # rank: min(cap, free memory); on a CPU the cap alone. None = the device's free memory only. Explicit
    # num_patches ignore it in one process; in several, order "frame" falls back to "tile" beyond it.
    budget_bytes: int | None = None


@dataclass
class StageStats:
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gib: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{name} {secs:.1f}s" + (f" ({self.peak_gib[name]:.1f} GiB)" if name in self.peak_gib else "")
                 for name, secs in self.seconds.items()]
        return ", ".join(parts)


class PixelWizard:
    """The two-stage pipeline over a set of lazily loaded models."""

    is_main = True  # this process writes the files (in a multi-process run only rank 0 does)

    def __init__(self, models: Models) -> None:
        self.models = models
        self.stats = StageStats()

    def share(self, value: object) -> object:
        """``value`` as the main process has it (multi-process runs override this)."""
        return value

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Time a stage and record its peak memory (GPU: allocated; CPU: process peak RSS so far)."""
        cuda = self.models.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.models.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.seconds[name] = time.perf_counter() - start
            if cuda:
                self.stats.peak_gib[name] = torch.cuda.max_memory_allocated(self.models.device) / 2**30
            else:
                self.stats.peak_gib[name] = peak_rss_bytes() / 2**30

    def conditioning(self, prompt: str, negative_prompt: str | None = None) -> TextConditioning:
        with self._stage("text"), self.models.use("text") as encoder:
            return encoder.conditioning(prompt, negative_prompt).to("cpu")

    def anchor(self, text: TextConditioning, settings: StageSettings, seed: int,
               on_step: StepCallback | None = None) -> Anchor:
        with self._stage("lr"), self.models.use("lr") as dit:
            return lr_anchor(dit, text, settings, seed, model_id=self.models.files.identity("lr"), on_step=on_step)

    def upscale(self, anchor: Anchor, text: TextConditioning, settings: StageSettings, seed: int,
                on_step: StepCallback | None = None) -> torch.Tensor:
        with self._stage("hr"), self.models.use("hr") as model:
            return hr_latent(model, anchor.latent, text, settings, seed, on_step=on_step)

    def decode(self, latent: torch.Tensor, path: str | Path, settings: DecodeSettings, *,
               overwrite: bool = False, png_dir: str | Path | None = None,
               on_step: Callable[[int, int], None] | None = None) -> Path:
        """Tiled decode streamed frame by frame into an mp4 (written atomically), and PNG frames on request."""
        with self._stage("decode"), self.models.use("vae") as vae:
            pngs = PngSequenceWriter(png_dir, overwrite=overwrite) if png_dir is not None else None
            with VideoWriter(path, fps=settings.fps, crf=settings.crf, overwrite=overwrite) as writer:
                for chunk in tiled_decode_stream(vae, latent, num_patches=settings.num_patches,
                                                 patch_dim=settings.patch_dim, overlap=settings.overlap,
                                                 blend=settings.blend, order=settings.order, on_step=on_step,
                                                 budget_bytes=settings.budget_bytes):
                    writer.append(chunk)
                    if pngs is not None:
                        pngs.append(chunk)
            return Path(writer.path)
