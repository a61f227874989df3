"""HR stage: ``hr_latent`` at each HR size, cond and uncond forwards one after the other as it runs them;
a step is both forwards plus the solver update.

Before the first HR stage, one HR step at the LR size loads the kernels (not measured). In the timing mode:
1 full-size warm-up step + the size's ``--hr-steps`` timed steps (default 2 at 2K and 0 at 4K, where one
step is 1 to 2 minutes and the first step, after the 2K run and the kernel warm-up, is the timing); other
modes: one step each, which is both their memory measurement and their step time. Under a budget, only the
steps whose predicted time fits are run (measured so far, scaled by FLOPs from the other size, or its FLOPs
at ``ASSUMED_TFLOPS`` before any).
"""

from __future__ import annotations

import math
from dataclasses import replace

from pixelwizard_core.pipeline.stages import hr_latent

from .config import SEED, HRSize, Mode, Setup
from .flops import dit_forward_flops
from .harness import Bench, run_steps, steady

ASSUMED_TFLOPS = 300.0  # used to predict the first HR step before any step was measured (bf16, CUDA)


def hr_step_flops(setup: Setup, size: HRSize) -> float:
    """FLOPs of one HR step: a cond and an uncond forward with the anchor injector."""
    return 2 * dit_forward_flops(setup.dit, setup.hr_settings(size).tokens, injector=True)


class HRStage:
    """The HR stages of a run; remembers step times (the slowest per size) to predict the next ones."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.step_seconds: dict[str, float] = {}
        self.warmed = False

    def predicted_step(self, size: HRSize) -> float:
        """Seconds of one HR step at ``size``: measured, or scaled by FLOPs from another size, or assumed."""
        if size.label in self.step_seconds:
            return self.step_seconds[size.label]
        setup = self.bench.setup
        for label, seconds in self.step_seconds.items():
            other = next(s for s in setup.sizes if s.label == label)
            return seconds * hr_step_flops(setup, size) / hr_step_flops(setup, other)
        return hr_step_flops(setup, size) / (ASSUMED_TFLOPS * 1e12) if self.bench.cuda else 0.0

    def _affordable(self, mode: Mode, size: HRSize, steps: int) -> int:
        """How many of ``steps`` fit the budget (0: recorded as skipped); a shortened run is noted."""
        bench, step = self.bench, self.predicted_step(size)
        affordable = int(bench.left() // step) if step > 0 and bench.left() != math.inf else steps
        if affordable < 1 and bench.over_budget(mode, ("hr", size.label), step):
            return 0
        if affordable < steps:
            bench.notes.append(f"{mode.key} HR {size.label}: {affordable} of {steps} steps run (time budget)")
        return min(affordable, steps)

    def _timing(self, size: HRSize, times: list[float]) -> dict:
        """The record's time figures from the seconds of each step run (the first a warm-up when several)."""
        settings = self.bench.setup.hr_settings(size)
        flops, per_step = hr_step_flops(self.bench.setup, size), steady(times)
        return dict(width=size.width, height=size.height, frames=settings.frames, tokens=settings.tokens,
                    step_seconds=times, warmup_seconds=times[0] if len(times) > 1 else None,
                    timed_steps=len(times) - 1, seconds_per_step=per_step,
                    timing_basis="median of the steps after the warm-up step" if len(times) > 1 else
                    "the single step run (after the kernel warm-up at the anchor size)",
                    flops_per_step=flops, tflops_per_second=flops / per_step / 1e12,
                    full_stage_seconds_extrapolated=per_step * settings.steps)

    def run(self, mode: Mode, size: HRSize, timed: int) -> None:
        bench = self.bench
        settings = bench.setup.hr_settings(size)
        steps = self._affordable(mode, size, min(1 + timed, settings.steps))
        if steps < 1:
            return
        lr = bench.setup.lr
        warm = None if self.warmed else replace(settings, width=lr.width, height=lr.height)

        def stage(record: dict) -> None:
            with bench.placed("hr", mode, record) as model:
                if warm is not None:  # load the kernels once, at the anchor's size (not measured)
                    run_steps(bench.meter, lambda cb: hr_latent(model, bench.anchor, bench.text, warm, SEED,
                                                                on_step=cb), 1)
                    self.warmed = True
                    bench.meter.free()
                text, anchor = bench.inputs(
                    record, lambda: (bench.text.to(bench.device), bench.anchor.to(bench.device)))
                times = run_steps(bench.meter, lambda cb: hr_latent(model, anchor, text, settings, SEED, on_step=cb),
                                  steps, f"{mode.key}: HR {size.label}")
            record.update(self._timing(size, times))
            record["activation_bytes_per_token"] = None  # filled in ``after`` once activations are known
            if mode.swap_blocks:
                record["swap_blocks"] = mode.swap_blocks

        def after(record: dict) -> None:
            record["activation_bytes_per_token"] = record["activations_bytes"] / settings.tokens
            self.step_seconds[size.label] = max(self.step_seconds.get(size.label, 0), record["seconds_per_step"])

        bench.measure(mode, ("hr", size.label), f"HR {size.label}", stage, ("seconds_per_step", "per step"), after)
