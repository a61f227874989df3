"""The worker pool on CPU (2 gloo processes): results equal one process, models stay resident between
jobs, interrupt, worker death, timeout, shutdown, the streamed decode, and nothing listening beyond
loopback. Hung workers on Cancel and failed jobs that keep the pool: tests/test_pool_faults.py."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distributed import BUDGET_LATENT, budget_cases, handles, one_thread, relative_error, write_weights

from pixelwizard_core.distributed.pool import (
    STREAM_AHEAD,
    JobFailed,
    JobInterrupted,
    JobTimeout,
    WorkerError,
    WorkerPool,
)
from pixelwizard_core.distributed.pool_stream import FrameAssembler
from pixelwizard_core.distributed.tiles import resolve_settings
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline.handles import ModelHandle, load
from pixelwizard_core.pipeline.presets import StageSettings
from pixelwizard_core.pipeline.engine import DecodeSettings
from pixelwizard_core.pipeline.stages import hr_latent, lr_anchor
from pixelwizard_core.pipeline.tiled_decode import tiled_decode

LR = StageSettings(128, 64, 5, 3, 5.0, 5.0)
HR = StageSettings(256, 128, 5, 2, 5.5, 5.0)
DECODE = DecodeSettings(num_patches=3, overlap=1)
STREAM_FRAMES = 6  # latent frames of the streamed decode tests: more than STREAM_AHEAD + 2
PROMPT = "a red fox in snow"


def children() -> set[int]:
    """Live (not yet reaped) child processes of this process."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                found.add(int(entry))
    return found


def listening_addresses(pids: list[int]) -> set[str]:
    """'ip:port' (hex, as /proc/net shows them) of every TCP socket the processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                found.add(parts[1])
    return found


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, ModelHandle]:
    return handles(write_weights(tmp_path_factory.mktemp("pool_weights")))


@pytest.fixture(scope="module")
def pool():
    before = children()
    pool = WorkerPool(2, ulysses=2, dit_fsdp=True, t5_fsdp=True, backend="gloo", threads=1, timeout=120)
    yield pool
    pids = pool.pids
    pool.shutdown()
    assert not pool.alive and children() <= before
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


@pytest.fixture(scope="module")
def single(weights):
    """The same stages in this process, one thread like each worker."""
    cpu = torch.device("cpu")
    with one_thread():
        text = load(weights["text"], cpu).conditioning(PROMPT)
        anchor = lr_anchor(load(weights["lr"], cpu), text, LR, 100)
        latent = hr_latent(load(weights["hr"], cpu), anchor.latent, text, HR, 10000)
    return {"text": text, "anchor": anchor, "latent": latent}


def test_two_workers_equal_one_process_and_keep_their_models(pool, weights, single):
    """Ulysses 2 + FSDP over 2 processes: text, anchor, HR latent within 1e-5 of one process, the split
    decode equal to the one-process tiled decode; the second HR job loads nothing and repeats exactly."""
    steps = []
    text = pool.encode_text(weights["text"], PROMPT)
    assert pool.last_report.loaded == ["text"]
    assert torch.equal(text.positive, single["text"].positive) and torch.equal(text.negative, single["text"].negative)
    anchor = pool.lr_anchor(weights["lr"], text, LR, 100, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert relative_error(anchor.latent, single["anchor"].latent) <= 1e-5
    assert anchor.model == weights["lr"].identity and anchor.seed == 100
    latent = pool.hr_latent(weights["hr"], single["anchor"], text, HR, 10000)
    assert pool.last_report.loaded == ["hr"]
    assert relative_error(latent, single["latent"]) <= 1e-5

    again = pool.hr_latent(weights["hr"], single["anchor"], text, HR, 10000)
    assert pool.last_report.loaded == [] and all(info["loaded"] == [] for info in pool.last_report.ranks)
    assert torch.equal(again, latent)

    video = pool.decode(weights["vae"], latent, DECODE)
    with one_thread():
        expected = tiled_decode(load(weights["vae"], torch.device("cpu")), latent, num_patches=3, overlap=1)
    assert torch.equal(video, expected)


def test_a_start_image_anchor_on_the_pool_equals_one_process(pool, weights, single):
    """TI2V through the workers (Ulysses 2 + FSDP): the first frame crosses the transport, the anchor keeps it
    and equals one process's within 1e-5."""
    from pixelwizard_core.pipeline.first_frame import FirstFrame

    shape = LR.latent_shape
    first = FirstFrame(torch.randn(1, shape[0], 1, *shape[-2:], generator=torch.Generator().manual_seed(3)))
    anchor = pool.lr_anchor(weights["lr"], single["text"], LR, 100, first_frame=first)
    with one_thread():
        expected = lr_anchor(load(weights["lr"], torch.device("cpu")), single["text"], LR, 100, first_frame=first)
    assert torch.equal(anchor.latent[:, :, :1], first.latent)
    assert relative_error(anchor.latent, expected.latent) <= 1e-5


def test_each_worker_holds_half_of_the_sharded_blocks(pool, weights, single):
    pool.hr_latent(weights["hr"], single["anchor"], single["text"], HR, 10000)
    reports = pool.describe()
    assert [r["rank"] for r in reports] == [0, 1]
    for role in ("hr", "text"):
        held = [r["models"][role]["block_local"] for r in reports]
        total = reports[0]["models"][role]["block_total"]
        assert sum(held) == total and all(abs(h / total - 0.5) < 0.01 for h in held), (role, held, total)


def test_only_loopback_listens(pool):
    """The rendezvous store (in this process) and gloo's sockets (in the workers) listen on 127.0.0.1 only;
    with the portable transport (a file store, a listener closed once the workers are in) this process
    listens on nothing."""
    pool.start()
    parent, workers = listening_addresses([os.getpid()]), listening_addresses(pool.pids)
    if pool._store is None:
        assert not parent, parent
    else:
        store_port = f":{pool._store.port:04X}"
        assert any(a.endswith(store_port) for a in parent), parent
    assert workers
    loopback = ("0100007F:", "0000000000000000FFFF00000100007F:")  # 127.0.0.1, as IPv4 and IPv4-mapped IPv6
    assert all(a.startswith(loopback) for a in parent | workers), parent | workers


def test_interrupt_stops_within_a_step_and_the_pool_goes_on(pool, weights, single):
    pool.start()
    pids = pool.pids
    seen = []

    def on_step(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            pool.interrupt()

    settings = StageSettings(128, 64, 5, 40, 5.0, 5.0)
    with pytest.raises(JobInterrupted, match=r"after step (\d+) of 40") as caught:
        pool.lr_anchor(weights["lr"], single["text"], settings, 7, on_step=on_step)
    stopped = int(__import__("re").search(r"after step (\d+)", str(caught.value)).group(1))
    # asked when step 2 was reported: the step running then completes, the next one does not start
    # (one more is allowed for the message crossing a finished step); never the remaining 37
    assert 2 <= stopped <= 4 and max(seen) <= 4
    assert pool.pids == pids and pool.alive
    latent = pool.hr_latent(weights["hr"], single["anchor"], single["text"], HR, 10000)
    assert relative_error(latent, single["latent"]) <= 1e-5

    asked = []
    with pytest.raises(JobInterrupted):  # the host's cancel flag, polled by the pool
        pool.lr_anchor(weights["lr"], single["text"], settings, 7, on_step=lambda d, t: asked.append(d),
                       should_stop=lambda: bool(asked))
    assert pool.pids == pids and max(asked) < 40

    class HostCancel(Exception):
        pass

    def cancel_from_progress(done: int, total: int) -> None:  # e.g. a host's "raise if interrupted" call
        raise HostCancel

    with pytest.raises(HostCancel):  # raised once the workers have stopped, not while they still run
        pool.lr_anchor(weights["lr"], single["text"], settings, 7, on_step=cancel_from_progress)
    assert pool.pids == pids
    assert pool.hr_latent(weights["hr"], single["anchor"], single["text"], HR, 10000).shape == latent.shape


def test_invalid_degree_is_refused_before_any_worker_starts(weights):
    pool = WorkerPool(3, ulysses=3, backend="gloo")  # 3 does not divide the test model's 2 heads
    text = None
    with pytest.raises(ConfigError, match="use one of 1, 2 "):
        pool.hr_latent(weights["hr"], torch.zeros(1, 48, 2, 4, 8), text, HR, 0)
    assert not pool.alive and pool.pids == []
    with pytest.raises(ConfigError, match="use ulysses 2"):
        WorkerPool(2, ulysses=3, backend="gloo")
    with pytest.raises(ConfigError, match="a 'vae' model"):
        WorkerPool(2, backend="gloo").hr_latent(weights["vae"], torch.zeros(1, 48, 2, 4, 8), text, HR, 0)


def test_dead_worker_fails_the_job_quickly_then_a_fresh_pool_runs(weights, single, tmp_path):
    """A killed worker fails the running job with a clear error in seconds and leaves no process; the next
    job starts fresh workers; a worker's own exception comes back as its message; a timeout tears down."""
    before = children()
    pool = WorkerPool(2, backend="gloo", threads=1)
    long_run = StageSettings(128, 64, 5, 1000, 5.0, 5.0)

    def kill_rank_1(done: int, total: int) -> None:
        if done == 1:
            os.kill(pool.pids[1], signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker 1 \(pid \d+\) failed during lr_anchor: it was killed by SIGKILL"):
        pool.lr_anchor(weights["lr"], single["text"], long_run, 1, on_step=kill_rank_1)
    assert time.monotonic() - start < 30
    assert children() <= before and not pool.alive

    moved = tmp_path / "gone.pt"
    moved.write_bytes(Path(weights["hr"].path).read_bytes())
    handle = ModelHandle.for_file("hr", moved, precision="fp32")
    moved.unlink()  # the file disappears after the graph was built
    with pytest.raises(JobFailed, match="failed during hr_latent: MissingFileError: .*gone.pt does not exist"):
        pool.hr_latent(handle, single["anchor"], single["text"], HR, 0)
    assert pool.alive  # every worker raised the same: they stay (tests/test_pool_faults.py)
    pool.shutdown()
    assert children() <= before

    start = time.monotonic()
    with pytest.raises(JobTimeout, match="did not finish within 1.5 s"):
        pool.lr_anchor(weights["lr"], single["text"], long_run, 1, timeout=1.5)
    assert time.monotonic() - start < 30 and children() <= before

    stream = pool.decode_stream(weights["vae"], torch.randn(1, 48, STREAM_FRAMES, 8, 16), DECODE)
    next(stream)
    os.kill(pool.pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker 0 \(pid \d+\) failed during decode_stream: it was killed"):
        list(stream)
    assert time.monotonic() - start < 30 and children() <= before and not pool.alive
    pool.shutdown()


@pytest.fixture(scope="module")
def long_latent() -> torch.Tensor:
    return torch.randn(1, 48, STREAM_FRAMES, 8, 16, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def long_video(weights, long_latent) -> torch.Tensor:
    """The single-process tiled decode of ``long_latent``, one thread like each worker."""
    with one_thread():
        return tiled_decode(load(weights["vae"], torch.device("cpu")), long_latent, num_patches=3, overlap=1)


@pytest.fixture
def arrivals(monkeypatch) -> list[tuple[int, int]]:
    """(latent frame, pieces) of every streamed part the parent has read, in order of arrival."""
    seen, keep = [], FrameAssembler.keep

    def record(self: FrameAssembler, frame: int, pieces: dict) -> None:
        seen.append((frame, len(pieces)))
        keep(self, frame, pieces)

    monkeypatch.setattr(FrameAssembler, "keep", record)
    return seen


def test_streamed_decode_equals_the_whole_decode_and_comes_before_the_end(pool, weights, long_latent, long_video,
                                                                          arrivals):
    """Chunks of 1 then 4 frames whose concatenation is bit for bit the whole pool decode and the
    one-process tiled decode; the first chunk comes while the workers still work, and they stop
    STREAM_AHEAD latent frames ahead of the consumer (each piece sent and not yet received is a file)."""
    steps, chunks = [], []
    tiles, total = 3, 3 * STREAM_FRAMES
    with contextlib.closing(pool.decode_stream(weights["vae"], long_latent, DECODE,
                                               on_step=lambda d, t: steps.append((d, t)))) as stream:
        chunks.append(next(stream))
        assert steps[-1][0] < total  # a chunk before the workers' last progress
        sent_ahead = wait_for_pieces(pool, arrivals, tiles * STREAM_AHEAD)
        time.sleep(0.3)  # time to run further ahead, if they did not wait for the consumer
        assert sent_ahead == tiles * STREAM_AHEAD == pieces_ahead(pool, arrivals)
        chunks.extend(stream)
    assert [c.shape[2] for c in chunks] == [1] + [4] * (STREAM_FRAMES - 1)
    assert all(c.dtype == torch.float32 and c.shape[-2:] == (128, 256) for c in chunks)
    assert pool.last_report.job == "decode_stream" and steps[-1] == (total, total)
    assert not list(pool._folder.glob("t*.bin"))
    streamed = torch.cat(chunks, dim=2)
    assert torch.equal(streamed, long_video)
    assert torch.equal(pool.decode(weights["vae"], long_latent, DECODE), long_video)


def pieces_ahead(pool: WorkerPool, arrivals: list[tuple[int, int]]) -> int:
    """Pieces of latent frames after the first that the workers have sent: tensor files not yet received,
    plus pieces the parent read before the first chunk was complete (a one-tile worker may send its second
    frame before a two-tile worker has sent its first; the parent reads nothing while the consumer has a chunk)."""
    return len(list(pool._folder.glob("t*.bin"))) + sum(count for frame, count in arrivals if frame > 0)


def wait_for_pieces(pool: WorkerPool, arrivals: list[tuple[int, int]], count: int, limit_s: float = 20.0) -> int:
    """:func:`pieces_ahead`, once there are ``count`` (or more), or after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while (found := pieces_ahead(pool, arrivals)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def test_streamed_decode_stops_on_interrupt_and_when_closed(pool, weights, long_latent, long_video, arrivals):
    """Interrupt, Cancel polled by the pool, and a consumer that stops early: each stops the workers
    within about a latent frame, leaves no thread or tensor file behind, and the same workers run the
    next job."""
    pool.start()
    pids, threads = pool.pids, threading.active_count()
    steps = []
    stream = pool.decode_stream(weights["vae"], long_latent, DECODE, on_step=lambda d, t: steps.append(d))
    with pytest.raises(JobInterrupted, match="decode_stream was interrupted"):
        for index, _ in enumerate(stream):
            pool.interrupt()
    assert index == 0 and max(steps) < 3 * STREAM_FRAMES and pool.pids == pids

    taken = []
    with pytest.raises(JobInterrupted):
        for chunk in pool.decode_stream(weights["vae"], long_latent, DECODE, should_stop=lambda: bool(taken)):
            taken.append(chunk)
    assert len(taken) == 1 and pool.pids == pids

    arrivals.clear()  # the parts of the jobs above
    stream = pool.decode_stream(weights["vae"], long_latent, DECODE)
    try:
        first = next(stream)
        with pytest.raises(ConfigError, match="still has a streamed decode of this worker pool open"):
            pool.describe()  # would wait for itself forever
        wait_for_pieces(pool, arrivals, 3 * STREAM_AHEAD)  # the workers wait for the consumer: closing must reach them
    finally:
        stream.close()
    assert torch.equal(first, long_video[:, :, :1])
    assert threading.active_count() == threads and pool.pids == pids and pool.alive
    assert not list(pool._folder.glob("t*.bin"))  # every piece sent was received (and its file removed)
    assert torch.equal(torch.cat(list(pool.decode_stream(weights["vae"], long_latent, DECODE)), dim=2), long_video)


def test_decode_to_video_node_streams_from_the_pool(pool, weights, long_latent, long_video):
    """The decode nodes' chunk source with a pool: frame order streams the workers' chunks, tile order has
    the workers decode whole tiles and cuts the video blended here into the same chunks; both are the
    local decode's frames."""
    from nodes.decode import _stream
    from pixelwizard_core.models.vae import denormalize_latent

    wan, spec = SimpleNamespace(vae=weights["vae"]), SimpleNamespace(acquire=lambda: pool)
    raw = {"samples": denormalize_latent(long_latent)}
    chunks = list(_stream(wan, raw, 3, "w", 1, "cosine", "frame", spec))
    assert len(chunks) == STREAM_FRAMES and pool.last_report.job == "decode_stream"
    whole = list(_stream(wan, raw, 3, "w", 1, "cosine", "tile", spec))
    assert len(whole) == STREAM_FRAMES and pool.last_report.job == "decode_tiles"
    assert torch.equal(torch.cat(chunks, dim=2), torch.cat(whole, dim=2))
    assert (torch.cat(whole, dim=2) - long_video).abs().max() <= 1e-5  # the latent went through the node's conversion


def test_decode_budget_is_resolved_once_for_every_worker(pool, weights, monkeypatch):
    """With a ``budget_bytes`` cap the parent asks the workers for their memory (a ``decode_budget`` job; none
    on CPU, so the cap decides), resolves the tiles and order once and sends every worker those settings:
    the streamed decode keeps frame order with 2 tiles (one per worker), or decodes 3 whole tiles when no
    frame-order share fits; ``decode`` chooses for whole tiles. Each equals the one-process decode."""
    latent = torch.randn(*BUDGET_LATENT, generator=torch.Generator().manual_seed(7))
    cases, sent, opened = budget_cases(), [], pool._open
    monkeypatch.setattr(pool, "_open", lambda name, kwargs: sent.append((name, kwargs.get("settings")))
                        or opened(name, kwargs))
    vae = load(weights["vae"], torch.device("cpu"))
    for case, job, count in (("frame", "decode_stream", 2), ("tile", "decode_tiles", 3)):
        sent.clear()
        chunks = list(pool.decode_stream(weights["vae"], latent, cases[case]))
        assert [name for name, _ in sent] == ["decode_budget", job] and pool.last_report.job == job
        settings = sent[1][1]
        assert settings == resolve_settings(latent, cases[case], world_size=2)
        assert (settings.num_patches, settings.patch_dim, settings.order) == (count, "w", case)
        assert [c.shape[2] for c in chunks] == [1, 4]
        with one_thread():
            expected = tiled_decode(vae, latent, num_patches=count, overlap=1)
        assert torch.equal(torch.cat(chunks, dim=2), expected)
        if case == "frame":  # the whole-tile decode: tile order, the fewest tiles of which one fits
            sent.clear()
            video = pool.decode(weights["vae"], latent, cases[case])
            assert [(name, s.num_patches if s else None, s.order if s else None) for name, s in sent] == \
                [("decode_budget", None, None), ("decode_tiles", 2, "tile")]
            assert torch.equal(video, expected)
    with pytest.raises(ConfigError, match="decode memory budget -5"):  # refused before any job
        pool.decode_stream(weights["vae"], latent, DecodeSettings(num_patches=3, budget_bytes=-5))
