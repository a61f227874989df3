"""Faults of the worker pool with real worker processes (2 gloo CPU workers): Cancel ends a job within
10 s even when a worker hangs (the parent kills the workers and says so, the next job starts fresh ones);
a job that raises on the workers keeps them and their loaded models; a pool left out of step after a
failure is restarted."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_distributed import handles, write_weights
from test_pool import children

from pixelwizard_core.distributed import pool_rpc
from pixelwizard_core.distributed.pool import JobFailed, JobInterrupted, WorkerError, WorkerPool
from pixelwizard_core.pipeline.handles import ModelHandle
from pixelwizard_core.pipeline.presets import StageSettings
from pixelwizard_core.pipeline.text import TextConditioning

pytestmark = pytest.mark.slow  # starts worker processes

LR = StageSettings(128, 64, 5, 2, 5.0, 5.0)
LONG = StageSettings(128, 64, 5, 1000, 5.0, 5.0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, ModelHandle]:
    return handles(write_weights(tmp_path_factory.mktemp("fault_weights")))


@pytest.fixture(scope="module")
def text(weights) -> TextConditioning:
    from pixelwizard_core.pipeline.handles import load

    return load(weights["text"], torch.device("cpu")).conditioning("a red fox in snow")


def test_cancel_ends_a_job_within_10_s_when_a_worker_hangs(weights, text, caplog):
    """No pool timeout (the Multi-GPU node's default): the parent waited for gloo's 30-minute collective
    timeout before."""
    before = children()
    pool = WorkerPool(2, backend="gloo", threads=1)
    cancel = threading.Event()
    asked: list[float] = []

    def hang_rank_1(done: int, total: int) -> None:
        if done == 1 and not cancel.is_set():
            os.kill(pool.pids[1], signal.SIGSTOP)  # rank 0 now waits for it in the next collective
            cancel.set()

    def should_stop() -> bool:
        if cancel.is_set() and not asked:
            asked.append(time.monotonic())
        return cancel.is_set()

    try:
        with caplog.at_level(logging.WARNING, logger="pixelwizard"):
            with pytest.raises(JobInterrupted, match=r"lr_anchor was cancelled; workers? .*did not end lr_anchor "
                                                     r"within 5 s .*the next job starts fresh workers"):
                pool.lr_anchor(weights["lr"], text, LONG, 1, on_step=hang_rank_1, should_stop=should_stop)
        assert time.monotonic() - asked[0] <= 10
        assert "every worker was stopped" in caplog.text
        assert not pool.alive and children() <= before
        assert len(pool.describe()) == 2 and pool.alive  # the next job starts fresh workers
    finally:
        pool.shutdown()  # kills a worker still stopped should the test fail


@pytest.fixture(scope="module")
def pool():
    before = children()
    pool = WorkerPool(2, backend="gloo", threads=1)
    yield pool
    pool.shutdown()
    assert children() <= before


def test_a_failed_job_keeps_the_workers_and_their_models(pool, weights, text, tmp_path):
    """Any exception in a worker tore the pool down before, so the next job loaded every model again."""
    first = pool.lr_anchor(weights["lr"], text, LR, 1)
    assert pool.last_report.loaded == ["lr"]
    pids = pool.pids
    with pytest.raises(JobFailed, match=r"failed during lr_anchor: .*The workers are still running, with "
                                        r"their models loaded"):
        pool.lr_anchor(weights["lr"], _narrow(text), LR, 1)
    assert pool.pids == pids and pool.alive

    gone = tmp_path / "t5.safetensors"  # fails on worker 0 only: worker 1 has no text encoder to load
    gone.write_bytes(Path(weights["text"].path).read_bytes())
    handle = ModelHandle.for_file("text", gone, precision="fp32")
    gone.unlink()
    with pytest.raises(JobFailed, match=r"worker 0 .*failed during encode_text: MissingFileError"):
        pool.encode_text(handle, "a fox")
    assert pool.pids == pids

    again = pool.lr_anchor(weights["lr"], text, LR, 1)
    assert pool.last_report.loaded == [] and pool.pids == pids  # no model loaded again
    assert torch.equal(again.latent, first.latent)


def test_a_pool_out_of_step_after_a_failure_is_restarted(pool, weights, text, monkeypatch):
    pool.start()
    pids = pool.pids
    monkeypatch.setattr(pool_rpc.Rpc, "in_step", lambda self, timeout=0: False)
    with pytest.raises(WorkerError, match=r"failed during lr_anchor: .*out of step afterwards.*shut down") as caught:
        pool.lr_anchor(weights["lr"], _narrow(text), LR, 1)
    assert not isinstance(caught.value, JobFailed)
    assert not pool.alive and not any(Path(f"/proc/{pid}").exists() for pid in pids)


def _narrow(text: TextConditioning) -> TextConditioning:
    """Context of the wrong width: every worker's DiT refuses it in the same place."""
    return TextConditioning(text.positive[..., :5], text.negative[..., :5], "", "")
