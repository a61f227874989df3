"""LR anchor stage: ``lr_anchor`` at the LR size, both CFG branches in one batch as it runs them. A step is
the guided velocity (one batched forward) plus the solver update; 1 warm-up + ``--lr-steps`` timed steps."""

from __future__ import annotations

import statistics

from pixelwizard_core.pipeline.stages import lr_anchor

from .config import SEED, Mode
from .flops import dit_forward_flops
from .harness import Bench, run_steps


def run_lr(bench: Bench, mode: Mode) -> None:
    settings = bench.setup.lr
    if bench.over_budget(mode, ("lr",)):
        return

    def stage(record: dict) -> None:
        with bench.placed("lr", mode, record) as dit:
            text = bench.inputs(record, lambda: bench.text.to(bench.device))
            times = run_steps(bench.meter, lambda cb: lr_anchor(dit, text, settings, SEED, on_step=cb),
                              1 + bench.args.lr_steps)
        tokens = settings.tokens
        flops = dit_forward_flops(bench.setup.dit, tokens, batch=2)
        per_step = statistics.median(times[1:])
        record.update(width=settings.width, height=settings.height, frames=settings.frames, tokens=tokens,
                      batch=2, warmup_seconds=times[0], step_seconds=times[1:], seconds_per_step=per_step,
                      flops_per_step=flops, full_stage_seconds_extrapolated=per_step * settings.steps)
        record["tflops_per_second"] = flops / per_step / 1e12

    bench.measure(mode, ("lr",), "LR", stage, ("seconds_per_step", "per step"))
