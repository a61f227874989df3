"""The one driver of every command-line run: text -> anchor -> HR latent -> tiled decode -> video file.

:class:`PixelWizard` runs the stages through a :class:`~.engine.Stages` (this process's, or every rank's
of a torchrun job: ``distributed/launch.py``) on the handles of a :class:`~.models.Models`, times each
stage and writes the outputs, so ``generate``, ``anchor``, ``upscale`` and ``decode`` are the same code
for one process and for many, and get the same result as one ``generate``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PixelWizardError
from ..io.video import PngSequenceWriter, VideoWriter
from ..system import peak_rss_bytes
from .anchors import Anchor
from .engine import DecodeSettings, LocalStages, StageControl, Stages
from .loop import StepCallback
from .models import Models
from .presets import StageSettings
from .text import TextConditioning

log = logging.getLogger("pixelwizard")


@dataclass
class StageStats:
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gib: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{name} {secs:.1f}s" + (f" ({self.peak_gib[name]:.1f} GiB)" if name in self.peak_gib else "")
                 for name, secs in self.seconds.items()]
        return ", ".join(parts)


class PixelWizard:
    """The two-stage pipeline over the models of one run, through ``stages`` (default: this process)."""

    def __init__(self, models: Models, stages: Stages | None = None) -> None:
        self.models = models
        self.stages = stages if stages is not None else LocalStages(models.open)
        self.stats = StageStats()

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files (in a multi-process run only rank 0 does)."""
        return self.stages.is_main

    def share(self, value: object) -> object:
        """``value`` as the main process has it."""
        return self.stages.share(value)

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

    def identity(self, role: str) -> str:
        """The identity of ``role``'s model for metadata (the same on every rank)."""
        return self.models.handle(role).identity

    def conditioning(self, prompt: str, negative_prompt: str | None = None) -> TextConditioning:
        with self._stage("text"):
            return self.stages.encode_text(self.models.handle("text"), prompt, negative_prompt)

    def anchor(self, text: TextConditioning, settings: StageSettings, seed: int,
               on_step: StepCallback | None = None) -> Anchor:
        with self._stage("lr"):
            return self.stages.lr_anchor(self.models.handle("lr"), text, settings, seed, StageControl(on_step))

    def upscale(self, anchor: Anchor, text: TextConditioning, settings: StageSettings, seed: int,
                on_step: StepCallback | None = None) -> torch.Tensor:
        with self._stage("hr"):
            return self.stages.hr_latent(self.models.handle("hr"), anchor, text, settings, seed,
                                         StageControl(on_step))

    def decode(self, latent: torch.Tensor, path: str | Path, settings: DecodeSettings, *,
               overwrite: bool = False, png_dir: str | Path | None = None,
               on_step: Callable[[int, int], None] | None = None) -> Path:
        """Tiled decode streamed chunk by chunk into an mp4 (written atomically) and PNG frames on request;
        the outputs are checked before any decoding, and an error drops the unfinished mp4."""
        with self._stage("decode"):
            writers = self._open_writers(path, settings, overwrite, png_dir)
            chunks = self.stages.decode_stream(self.models.handle("vae"), latent, settings, StageControl(on_step))
            if writers is None:  # not the main process: decode and send, write nothing
                with contextlib.closing(chunks):
                    for _ in chunks:
                        pass
                return Path(path)
            video, pngs = writers
            with video, contextlib.closing(chunks):
                for chunk in chunks:
                    video.append(chunk)
                    if pngs is not None:
                        pngs.append(chunk)
                    del chunk
            return Path(video.path)

    def _open_writers(self, path: str | Path, settings: DecodeSettings, overwrite: bool,
                      png_dir: str | Path | None) -> tuple[VideoWriter, PngSequenceWriter | None] | None:
        """The main process's writers, opened (outputs checked) before any decoding; a refusal is raised
        in every process, so none starts a decode the main one would never receive. None elsewhere."""
        writers, problem = None, None
        if self.is_main:
            try:
                video = VideoWriter(path, fps=settings.fps, crf=settings.crf, overwrite=overwrite)
                pngs = PngSequenceWriter(png_dir, overwrite=overwrite) if png_dir is not None else None
                writers = (video, pngs)
            except (PixelWizardError, OSError) as error:
                problem = error
        problem = self.share(problem)
        if problem is not None:
            raise problem
        return writers
