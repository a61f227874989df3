"""The one driver of every command-line run: text -> anchor -> HR latent -> tiled decode -> video file.

:class:`PixelWizard` runs the stages through a :class:`~.engine.Stages` (this process's, or every rank's
of a torchrun job: ``distributed/launch.py``) on the handles of a :class:`~.models.Models`, times each
stage and writes the outputs, so ``generate``, ``anchor``, ``upscale`` and ``decode`` are the same code
for one process and for many, and get the same result as one ``generate``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch

from ..errors import PixelWizardError
from ..io.video import PngSequenceWriter, VideoWriter
from ..system import peak_rss_bytes
from .anchors import Anchor
from .engine import DecodeSettings, LocalStages, StageControl, Stages
from .first_frame import FirstFrame, encode_first_frame
from .handles import ModelHandle
from .loop import StepCallback
from .models import Models
from .presets import StageSettings
from .text import TextConditioning

log = logging.getLogger("pixelwizard")


@dataclass
class StageStats:
    """Each stage's time and memory: ``peak_gib`` is the highest use during the stage (GPU: allocated;
    CPU: resident memory), ``added_gib`` how far above the stage's start that peak went."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_gib: dict[str, float] = field(default_factory=dict)
    added_gib: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return ", ".join(f"{name} {secs:.1f}s{self._memory(name)}" for name, secs in self.seconds.items())

    def _memory(self, name: str) -> str:
        if name not in self.peak_gib:
            return ""
        added = f", +{self.added_gib[name]:.1f}" if name in self.added_gib else ""
        return f" (peak {self.peak_gib[name]:.1f} GiB{added})"


class StageMemory:
    """The peak memory of one stage, not of the process so far.

    GPU: torch's peak counter, reset at the start. CPU on Linux: the kernel's peak resident size (VmHWM),
    reset at the start by writing 5 to /proc/self/clear_refs; elsewhere a thread samples the resident size
    every 20 ms (psutil), which can miss a spike shorter than that."""

    SAMPLE_SECONDS = 0.02

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.peak = 0
        self._sampler: threading.Thread | None = None
        self._done = threading.Event()

    def __enter__(self) -> "StageMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _rss()
            if not _reset_peak_rss():
                self.peak = self.start
                self._sampler = threading.Thread(target=self._sample, daemon=True, name="stage-memory")
                self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.SAMPLE_SECONDS):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        if self._sampler is not None:
            self._done.set()
            self._sampler.join()
            self.peak = max(self.peak, _rss())
        else:
            self.peak = _peak_rss_since_reset()


_STATUS = Path("/proc/self/status")


def _rss() -> int:
    try:
        import psutil
    except ImportError:
        return peak_rss_bytes()
    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident size of this process (Linux 4.0+); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _peak_rss_since_reset() > 0
    except OSError:
        return False


def _peak_rss_since_reset() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class PromptQueue(Protocol):
    """Where a run's items come from: in order in one process, from a counter shared by the groups of a
    torchrun job (``distributed/groups.py::SharedQueue``)."""

    group: int  # this process's group (0 in one process)

    def take(self) -> int:
        """The next item's 0-based index (called by the main process of each group)."""

    def agree(self, value: object) -> object:
        """``value`` as the run's first process has it (collective)."""

    def finish(self, ok: bool) -> None:
        """The run's items are done here (``ok``) or this process failed; wait for the others if any."""


class InOrder:
    """One group: the items one after the other."""

    group = 0

    def __init__(self) -> None:
        self.taken = 0

    def take(self) -> int:
        self.taken += 1
        return self.taken - 1

    def agree(self, value: object) -> object:
        return value

    def finish(self, ok: bool) -> None:
        pass


class PixelWizard:
    """The two-stage pipeline over the models of one run, through ``stages`` (default: this process).

    A stage's ``on_step`` may have a ``started()`` method: it is called when the stage's model is in place
    and the computing starts (this process's stages; others report their first step only), so a progress
    bar never counts a model load."""

    def __init__(self, models: Models, stages: Stages | None = None, queue: PromptQueue | None = None) -> None:
        self.models = models
        self.stages = stages if stages is not None else LocalStages(self._open)
        self.queue = queue if queue is not None else InOrder()
        self.stats = StageStats()
        self._progress: object = None  # the running stage's on_step

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files (in a multi-process run only rank 0 does)."""
        return self.stages.is_main

    def share(self, value: object) -> object:
        """``value`` as the main process has it."""
        return self.stages.share(value)

    def agree(self, value: object) -> object:
        """``value`` as the first process of the whole run has it (every group of a torchrun job)."""
        return self.share(self.queue.agree(value))

    def take(self, count: int, choose: Callable[[int], object]) -> tuple[int, object] | None:
        """The next of ``count`` items for this process (its group): the main process takes indices from the
        queue until ``choose(index)`` gives something other than None (None: skip it), and shares the index
        with what was chosen; None once the queue is past the last item. A refusal while choosing is raised
        in every process of the group."""
        picked, problem = None, None
        if self.is_main:
            try:
                picked = self._pick(count, choose)
            except (PixelWizardError, OSError) as error:
                problem = error
        picked, problem = self.share((picked, problem))
        if problem is not None:
            raise problem
        return picked

    def _pick(self, count: int, choose: Callable[[int], object]) -> tuple[int, object] | None:
        while (index := self.queue.take()) < count:
            chosen = choose(index)
            if chosen is not None:
                return index, chosen
        return None

    @contextlib.contextmanager
    def _stage(self, name: str, on_step: object = None) -> Iterator[None]:
        """Time a stage and record its own peak memory (:class:`StageMemory`)."""
        memory = StageMemory(self.models.device)
        self._progress = on_step
        start = time.perf_counter()
        try:
            with memory:
                yield
        finally:
            self._progress = None
            self.stats.seconds[name] = time.perf_counter() - start
            self.stats.peak_gib[name] = memory.peak / 2**30
            self.stats.added_gib[name] = max(0, memory.peak - memory.start) / 2**30

    @contextlib.contextmanager
    def _open(self, handle: ModelHandle, working_bytes: int = 0) -> Iterator[object]:
        """``Models.open``, saying what is loaded first, and telling the stage's progress once the model is
        in place (so the load is not counted as computing)."""
        if not handle.is_in_memory and not self.models.holds(handle.role):
            log.info("loading %s model %s%s", handle.role, handle.path, _size_text(handle.path))
        with self.models.open(handle, working_bytes) as model:
            started = getattr(self._progress, "started", None)
            if callable(started):
                started()
            yield model

    def identity(self, role: str) -> str:
        """The identity of ``role``'s model for metadata (the same on every rank)."""
        return self.models.handle(role).identity

    def conditioning(self, prompt: str, negative_prompt: str | None = None) -> TextConditioning:
        with self._stage("text"):
            return self.stages.encode_text(self.models.handle("text"), prompt, negative_prompt)

    def first_frame(self, image: torch.Tensor, width: int, height: int) -> FirstFrame:
        """A start image [H, W, 3] (0..1) VAE-encoded at ``width`` x ``height`` (TI2V): the main process's
        encoding, shared, so every rank pins the same latent."""
        frame = None
        if self.is_main:
            with self._stage("image"), self._open(self.models.handle("vae")) as vae:
                frame = encode_first_frame(vae, image, width, height)
        return self.share(frame)

    def anchor(self, text: TextConditioning, settings: StageSettings, seed: int,
               on_step: StepCallback | None = None, first_frame: FirstFrame | None = None) -> Anchor:
        with self._stage("lr", on_step):
            return self.stages.lr_anchor(self.models.handle("lr"), text, settings, seed, StageControl(on_step),
                                         first_frame=first_frame)

    def upscale(self, anchor: Anchor, text: TextConditioning, settings: StageSettings, seed: int,
                on_step: StepCallback | None = None, first_frame: FirstFrame | None = None) -> torch.Tensor:
        """``first_frame``: a start image encoded at the HR size, pinned as the HR latent's first frame."""
        with self._stage("hr", on_step):
            return self.stages.hr_latent(self.models.handle("hr"), anchor, text, settings, seed,
                                         StageControl(on_step), first_frame=first_frame)

    def decode(self, latent: torch.Tensor, path: str | Path, settings: DecodeSettings, *,
               overwrite: bool = False, png_dir: str | Path | None = None,
               on_step: Callable[[int, int], None] | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
        """Tiled decode streamed chunk by chunk into an mp4 (written atomically, ``metadata`` in its comment tag)
        and PNG frames on request; the outputs are checked before any decoding, and an error drops the
        unfinished mp4."""
        with self._stage("decode", on_step):
            writers = self._open_writers(path, settings, overwrite, png_dir, metadata)
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

    def _open_writers(self, path: str | Path, settings: DecodeSettings, overwrite: bool, png_dir: str | Path | None,
                      metadata: Mapping[str, Any] | None) -> tuple[VideoWriter, PngSequenceWriter | None] | None:
        """The main process's writers, opened (outputs checked) before any decoding; a refusal is raised
        in every process, so none starts a decode the main one would never receive. None elsewhere."""
        writers, problem = None, None
        if self.is_main:
            try:
                video = VideoWriter(path, fps=settings.fps, crf=settings.crf, overwrite=overwrite, metadata=metadata)
                pngs = PngSequenceWriter(png_dir, overwrite=overwrite) if png_dir is not None else None
                writers = (video, pngs)
            except (PixelWizardError, OSError) as error:
                problem = error
        problem = self.share(problem)
        if problem is not None:
            raise problem
        return writers


def _size_text(path: str) -> str:
    """" (10.0 GB)" for a file, "" for a folder or a missing path."""
    try:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
    except OSError:
        size = 0
    if not size:
        return ""
    return f" ({size / 1e9:.1f} GB)" if size >= 1e9 else f" ({size / 1e6:.1f} MB)"
