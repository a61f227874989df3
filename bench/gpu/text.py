"""Text stage: ``TextEncoder.encode`` of the prompt and the negative prompt (text_len tokens each, one
batch; random token ids, so nothing is tokenized). 1 warm-up + ``--text-runs`` timed encodes."""

from __future__ import annotations

import statistics
import time

from .config import Mode
from .harness import Bench


def run_text(bench: Bench, mode: Mode) -> None:
    if bench.over_budget(mode, ("text",)):
        return

    def stage(record: dict) -> None:
        with bench.placed("text", mode, record) as encoder:
            bench.inputs(record, lambda: None)  # the token ids are made with the model
            times = []
            for _ in range(1 + bench.args.text_runs):
                bench.meter.sync()
                start = time.perf_counter()
                context = encoder.encode(["prompt", "negative prompt"])
                bench.meter.sync()
                times.append(time.perf_counter() - start)
                del context
        record.update(tokens=[2, bench.setup.t5.text_len], warmup_seconds=times[0], run_seconds=times[1:],
                      seconds_per_encode=statistics.median(times[1:]))

    bench.measure(mode, ("text",), "text", stage, ("seconds_per_encode", "per encode"))
