"""The memory-mode profile: which stages run in which mode, in what order, and in which process.

* ``gpu``: every model stays on the device (``home`` = device);
* ``offload``: only the stage's model is on the device (``home`` = "cpu");
* ``block_swap_N``: as offload, and the DiTs stream their last N blocks from pinned host memory
  (``swap_blocks`` = N; one mode per ``--swap-blocks`` value). Block swap changes the DiT stages only, so
  the text and decode stages are not run again in these modes (the JSON points at offload's).

Under a budget what matters most runs first, and the HR stages of the later modes at the larger sizes run
last. On the CPU each mode runs in a fresh process (``--isolate``), whose memory stands for the device's;
block swap there streams from the same memory, so its figures only show that the code runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from .config import HRSize, Mode
from .decode import DecodeStage
from .harness import Bench
from .hr import HRStage
from .lr import run_lr
from .meters import HOST_MALLOC_ENV
from .progress import log
from .text import run_text

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_benchmark.py"  # the entry point a child process runs
SAME_AS_OFFLOAD = {"status": "same_as", "same_as": "offload",
                   "reason": "block swap streams DiT blocks only; text encoder and VAE are placed as in offload"}


def run_plan(bench: Bench, modes: list[Mode], timing: str) -> None:
    """Everything, most important first: the timing mode and offload fully, block swap at the first size,
    then the HR stages of the other modes at the other sizes, as far as the budget goes."""
    args, setup = bench.args, bench.setup
    hr, decode = HRStage(bench), DecodeStage(bench)
    steps_for = {s.label: args.hr_steps[min(i, len(args.hr_steps) - 1)] for i, s in enumerate(setup.sizes)}
    bench.pool.build_all(modes[0])
    deferred: list[tuple[Mode, HRSize]] = []
    for mode in [m for m in modes if not m.swap_blocks]:
        if not bench.enter(mode):
            continue
        run_text(bench, mode)
        run_lr(bench, mode)
        for i, size in enumerate(setup.sizes):
            if mode.key == timing:
                hr.run(mode, size, steps_for[size.label])
            elif i == 0:
                hr.run(mode, size, 0)
            else:
                deferred.append((mode, size))
            for order in args.orders:
                decode.run(mode, size, order)
    for mode in [m for m in modes if m.swap_blocks]:
        if not bench.enter(mode):
            continue
        bench.store(mode, ("text",), dict(SAME_AS_OFFLOAD))
        for size in setup.sizes:
            for order in args.orders:
                bench.store(mode, ("decode", size.label, order), dict(SAME_AS_OFFLOAD))
        run_lr(bench, mode)
        for i, size in enumerate(setup.sizes):
            if mode.key == timing or i == 0:
                hr.run(mode, size, steps_for[size.label] if mode.key == timing else 0)
            else:
                deferred.append((mode, size))
    for mode, size in deferred:
        if bench.enter(mode):
            hr.run(mode, size, 0)


def run_isolated(bench: Bench, modes: list[Mode], timing: str) -> None:
    """One fresh process per mode (the CPU's emulated device memory: each process holds what its mode keeps
    on the device, and every mode starts from the same process state); their results merged here."""
    args = bench.args
    for mode in modes:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "mode.json"
            extra = ["--modes", mode.name, "--timing-mode", timing, "--isolate", "off", "--out", str(out)]
            if mode.swap_blocks:
                extra += ["--swap-blocks", str(mode.swap_blocks)]
            if args.budget_s:  # what is left of the whole run's budget
                extra += ["--budget-s", str(max(bench.left(), 1.0))]
            env = dict(os.environ, **HOST_MALLOC_ENV)
            log(f"{mode.key}: in its own process")
            done = subprocess.run([sys.executable, str(SCRIPT), *args.argv, *extra], env=env,
                                  stdout=subprocess.DEVNULL, check=False)
            child = json.loads(out.read_text()) if out.exists() else {}
        if mode.key in child.get("results", {}):
            bench.results[mode.key] = child["results"][mode.key]
            bench.notes += child.get("notes", [])
            bench.skipped += child.get("budget", {}).get("skipped", [])
        else:
            bench.results[mode.key] = {"mode": asdict(mode), "status": "error",
                                       "message": f"its process ended with exit code {done.returncode}"}
        bench.save()
