"""The one harness every stage runs through: step timing with the device synchronised, memory by stage
(weights, inputs, peak) through the meter, out-of-memory and error capture, the time budget, the result
records and the JSON and markdown files.

Memory of a stage: weights are what is allocated once the stage's model is placed (in ``gpu`` mode that is
every model); inputs what the stage's inputs add once put on the device; peak the largest allocated during
the stage (placing the model included); activations = peak - weights - inputs.

Timing: the meter's ``sync`` (``torch.cuda.synchronize``) around every step; steps last seconds, so host
clocks suffice. Stages are stopped after a few steps (an exception from the step callback): the memory of
a step is that of every step, and the full stage is extrapolated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from .config import GIB, Mode, Setup
from .meters import CudaMeter, HostMeter, Meter
from .models import ModelPool, dit_inputs, warm_host_process
from .progress import log
from .report import render


class _Stop(Exception):
    """Raised from a step callback to end a stage after the steps that were asked for."""


def intervals(start: float, stamps: list[float]) -> list[float]:
    """Seconds between consecutive time stamps, the first counted from ``start``."""
    return [b - a for a, b in zip([start, *stamps[:-1]], stamps)]


def steady(times: list[float]) -> float:
    """The median of the times after the first (a warm-up), or the only time there is."""
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def run_steps(meter: Meter, run: Callable[[Callable[[int, int], None]], object], steps: int, label: str = "") -> list[float]:
    """Seconds of each of the first ``steps`` steps of ``run(on_step)`` (device synchronised); each step is
    logged when ``label`` is given."""
    stamps: list[float] = []

    def on_step(done: int, total: int) -> None:
        meter.sync()
        stamps.append(time.perf_counter())
        if label:
            log(f"{label}: step {done}/{steps} {stamps[-1] - (stamps[-2] if len(stamps) > 1 else start):.2f} s")
        if done >= steps:
            raise _Stop

    meter.sync()
    start = time.perf_counter()
    try:
        run(on_step)
    except _Stop:
        pass
    return intervals(start, stamps)


class Bench:
    """Runs stages through the meter and the model pool, keeps every figure in ``self.results`` and writes
    the JSON after each stage. ``self.text`` and ``self.anchor`` are the DiT stages' inputs (host)."""

    def __init__(self, args: argparse.Namespace, setup: Setup, device: torch.device) -> None:
        self.args, self.setup, self.device = args, setup, device
        self.cuda = device.type == "cuda"
        if not self.cuda:
            warm_host_process(setup)
        self.meter = CudaMeter(device) if self.cuda else HostMeter()
        self.pool = ModelPool(setup, device, self.meter, args.attention, args.compile)
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.data: dict = {}
        self.start = time.perf_counter()
        self.text, self.anchor = dit_inputs(setup)  # made after the CPU meter's start: counted as host memory

    # --- budget and records -----------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if not self.args.budget_s else self.args.budget_s - self.elapsed()

    def store(self, mode: Mode, path: tuple[str, ...], record: dict) -> None:
        node = self.results.setdefault(mode.key, {"mode": asdict(mode)})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = record
        self.save()

    def save(self) -> None:
        self.data["results"] = self.results
        self.data["notes"] = self.notes
        self.data["budget"] = {"seconds": self.args.budget_s or None, "elapsed_seconds": round(self.elapsed(), 1),
                               "skipped": self.skipped}
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.data, indent=2, default=str))

    def finish(self) -> None:
        """Save the JSON one last time, print the tables, and write them next to the JSON as X.md."""
        self.save()
        text = render(self.data)
        print(text)
        if self.args.out:
            Path(self.args.out).with_suffix(".md").write_text(text + "\n")
            log(f"wrote {self.args.out} and {Path(self.args.out).with_suffix('.md')}")

    def over_budget(self, mode: Mode, path: tuple[str, ...], predicted: float = 0.0) -> bool:
        """Record the stage as skipped when its predicted seconds do not fit what is left of the budget."""
        if self.left() > predicted:
            return False
        reason = f"time budget: predicted {predicted:.0f} s, {max(self.left(), 0):.0f} s left"
        self.store(mode, path, {"status": "skipped", "reason": reason})
        self.skipped.append(f"{mode.key} {' '.join(path)}: {reason}")
        log(f"{mode.key}: {' '.join(path)} skipped ({reason})")
        return True

    # --- modes ------------------------------------------------------------------------------------
    def enter(self, mode: Mode) -> bool:
        """Place every model as ``mode`` keeps it; False (and the mode marked "oom") when they do not fit."""
        try:
            self.pool.enter(mode)
            return True
        except (torch.cuda.OutOfMemoryError, MemoryError) as error:
            message = str(error).splitlines()[0][:300]
        self.pool.evacuate()
        note = f"{mode.key}: the models do not fit on the device together ({message}); its stages are skipped"
        self.notes.append(note)
        log(note)
        self.results.setdefault(mode.key, {"mode": asdict(mode)})["status"] = "oom"
        return False

    # --- one stage --------------------------------------------------------------------------------
    def measure(self, mode: Mode, path: tuple[str, ...], name: str, stage: Callable[[dict], None],
                per: tuple[str, str], after: Callable[[dict], None] | None = None) -> dict:
        """Run ``stage(record)`` guarded, then ``after(record)`` if it succeeded; store and log the record.
        ``per`` is the record's time key and its unit, for the log line."""
        record = self._guarded(f"{mode.key}: {name}", stage)
        if record["status"] == "ok" and after is not None:
            after(record)
        self.store(mode, path, record)
        self._log_stage(mode, name, record, *per)
        return record

    @contextlib.contextmanager
    def placed(self, role: str, mode: Mode, record: dict) -> Iterator[object]:
        """The stage's model placed by the pool; on a normal exit the record's peak is the stage's, placing
        the model included (the inputs reset the meter's peak, so placing it is read here)."""
        self.meter.reset_peak()
        with self.pool.use(role, mode, record) as model:
            placement_peak = self.meter.peak()
            yield model
            record["peak_bytes"] = max(self.meter.peak(), placement_peak)

    def inputs(self, record: dict, make: Callable[[], object]) -> object:
        """Record weights (allocated once placed), create the inputs on the device, record their bytes, and
        restart the peak there."""
        self.meter.sync()
        record["weights_bytes"] = self.meter.allocated()
        made = make()
        self.meter.sync()
        record["inputs_bytes"] = self.meter.allocated() - record["weights_bytes"]
        self.meter.reset_peak()
        return made

    def _guarded(self, label: str, stage: Callable[[dict], None]) -> dict:
        """Run one stage; an out-of-memory error (or any other) becomes the record's status."""
        record: dict = {"status": "ok"}
        self.meter.free()
        self.meter.reset_peak()
        start = time.perf_counter()
        try:
            stage(record)
        except (torch.cuda.OutOfMemoryError, MemoryError) as error:
            record.update(status="oom", oom_allocated_bytes=self.meter.allocated(), peak_bytes=self.meter.peak(),
                          message=str(error).splitlines()[0][:300])
            requested = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(error))
            record["oom_requested"] = requested.group(1) if requested else None
            log(f"{label}: OOM at {record['oom_allocated_bytes'] / GIB:.1f} GiB allocated "
                f"(+{record['oom_requested']} requested)")
        except Exception as error:  # noqa: BLE001 - any other failure is reported and the run goes on
            record.update(status="error", message=f"{type(error).__name__}: {error}"[:500])
            traceback.print_exc(file=sys.stderr)
            log(f"{label}: ERROR {record['message']}")
        record["seconds"] = time.perf_counter() - start
        self.meter.free()
        record["allocated_after_bytes"] = self.meter.allocated()
        if record["status"] == "ok":
            record["activations_bytes"] = record["peak_bytes"] - record["weights_bytes"] - record["inputs_bytes"]
            record["reserved_peak_bytes"] = self.meter.reserved_peak()
        return record

    def _log_stage(self, mode: Mode, name: str, record: dict, time_key: str, unit: str) -> None:
        if record["status"] != "ok":
            return
        extra = f", caches {record['caches_bytes'] / GIB:.2f} GiB" if "caches_bytes" in record else ""
        log(f"{mode.key}: {name}: weights {record['weights_bytes'] / GIB:.2f} GiB, peak {record['peak_bytes'] / GIB:.2f}"
            f" GiB{extra}, {record[time_key]:.3f} s {unit}")
