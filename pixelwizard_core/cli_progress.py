"""What the command line shows while it works: one bar per stage, log lines that never share a bar's line,
and the one line printed when a stop signal ends a run.

A bar is drawn only once its stage computes (after its model is loaded, so the load never counts into the
first step's rate) and always with its total: :class:`StageBar` is told ``started()`` by the driver when
the model is in place (:mod:`.pipeline.runner`) and draws with the total it was given, or else draws at
the first step, whose callback carries the total.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("pixelwizard")


def is_speaking_rank() -> bool:
    """Whether this process prints (under torchrun only rank 0 does)."""
    return os.environ.get("RANK", "0") == "0"


def leads_a_group(ulysses: int) -> bool:
    """Whether this process leads its group of ``ulysses`` consecutive torchrun ranks (the one that writes
    its group's files, so the one that says what a stop left of them)."""
    return int(os.environ.get("RANK", "0")) % max(ulysses, 1) == 0


class StageBar:
    """The progress bar of one stage: ``label`` (e.g. ``[1/3] HR 2560x1440``), counting ``unit``.

    ``total`` is known up front for the sampling stages (their steps); the decode's (tiles x latent frames)
    comes with its first step, and ``per`` then names the tile count in the label."""

    def __init__(self, label: str, unit: str, total: int | None = None, *, per: int | None = None) -> None:
        self.label, self.unit, self.total, self.per = label, unit, total, per
        self.bar: tqdm | None = None

    def started(self) -> None:
        """The stage's model is in place: draw now if the total is known."""
        if self.bar is None and self.total:
            self._draw(self.total)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self._draw(total)
        elif self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def _draw(self, total: int) -> None:
        label = self.label
        if self.per:  # the decode: total = latent frames x tiles
            tiles = max(1, total // self.per)
            label += f" ({tiles} tile{'s' if tiles > 1 else ''} x {self.per} latent frames)"
        self.bar = tqdm(desc=label, total=total, unit=self.unit, leave=False, dynamic_ncols=True,
                        disable=not is_speaking_rank())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def stage_bar(label: str, unit: str, total: int | None = None, *, per: int | None = None) -> Iterator[StageBar]:
    bar = StageBar(label, unit, total, per=per)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def logs_above_bars() -> Iterator[None]:
    """Route the console's log lines through tqdm, which clears the bars, prints the line and redraws them."""
    with logging_redirect_tqdm():
        yield


def item_label(position: int, count: int) -> str:
    """``[k/N]``: the same prefix for a prompt of ``generate`` and an anchor of ``upscale``."""
    return f"[{position}/{count}]"


# --- what a stopped run kept -----------------------------------------------------------------------


@dataclass
class RunRecord:
    """The files a run has finished and what it is doing, for the line printed when a signal stops it."""

    kept: list[Path] = field(default_factory=list)
    doing: str = "the preparations"

    def wrote(self, path: Path | str | None) -> None:
        if path is not None:
            self.kept.append(Path(path))

    def stopped_line(self, signal_name: str) -> str:
        """One line: which signal, during what, that the unfinished output was removed, what was kept."""
        if not self.kept:
            kept = "nothing was written"
        elif len(self.kept) <= 3:
            kept = "kept " + ", ".join(str(p) for p in self.kept)
        else:
            kept = f"kept {len(self.kept)} files: {self.kept[0]} ... {self.kept[-1]}"
        return f"stopped by {signal_name} during {self.doing}: unfinished outputs removed; {kept}"
