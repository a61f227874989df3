"""The worker pool over its portable transport (Windows' one: workers connect back to an authenticated
loopback listener, a file store for the rendezvous, tensor files read and then deleted), forced here with
``PIXELWIZARD_POOL_TRANSPORT=portable``: a representative part of tests/test_pool.py again (loopback only,
interrupts, a streamed decode stopped early, shutdown), results bit for bit those of the default transport,
worker deaths, and the platform choices (transport, backend) as units.

The whole of tests/test_pool.py also passes with the variable set in the environment."""

from __future__ import annotations

import os
import signal
import socket
import time
from multiprocessing import AuthenticationError, Pipe
from multiprocessing.connection import Client
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from test_pool import (  # noqa: F401  (fixtures and tests collected again here, over the portable transport)
    DECODE,
    HR,
    PROMPT,
    arrivals,
    children,
    long_latent,
    long_video,
    pool,
    single,
    test_interrupt_stops_within_a_step_and_the_pool_goes_on,
    test_only_loopback_listens,
    test_streamed_decode_stops_on_interrupt_and_when_closed,
    weights,
)

from pixelwizard_core.distributed import pool_processes, transport
from pixelwizard_core.distributed.pool import WorkerError, WorkerPool
from pixelwizard_core.distributed.pool_channel import KEY_ENV, PortableLauncher, resolve_pool_backend
from pixelwizard_core.distributed.pool_processes import Processes, Worker
from pixelwizard_core.distributed.transport import INLINE_BYTES, TRANSPORT_ENV, receive, send, transport_mode
from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline.presets import StageSettings


@pytest.fixture(scope="module", autouse=True)
def portable_transport():
    """Every pool of this module starts with the portable transport (set before the module's pool starts)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRANSPORT_ENV, "portable")
        yield


def test_portable_results_equal_the_default_transport(pool, weights, single, long_latent, monkeypatch):
    """Text, HR latent and a decode whose latent and tiles cross as tensor files: bit for bit the same over
    the portable transport (this module's pool) and the default one (a second pool)."""

    def jobs(workers: WorkerPool) -> list[torch.Tensor]:
        text = workers.encode_text(weights["text"], PROMPT)
        latent = workers.hr_latent(weights["hr"], single["anchor"], text, HR, 10000)
        return [text.positive, text.negative, latent, workers.decode(weights["vae"], long_latent, DECODE)]

    portable = jobs(pool)
    assert pool._processes.mode == "portable" and pool._store is None
    monkeypatch.setenv(TRANSPORT_ENV, "pipe")  # read when a pool starts: this module's pool keeps its own
    default = WorkerPool(2, ulysses=2, dit_fsdp=True, t5_fsdp=True, backend="gloo", threads=1, timeout=120)
    try:
        expected = jobs(default)
        assert default._processes.mode == "pipe" and default._store is not None
    finally:
        default.shutdown()
    assert long_latent.numel() * 4 > INLINE_BYTES and portable[3].numel() * 4 > INLINE_BYTES  # files both ways
    for ours, theirs in zip(portable, expected):
        assert torch.equal(ours, theirs)


def test_portable_workers_get_the_key_in_their_environment_not_their_command_line(pool):
    pool.start()
    for pid in pool.pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        key = environ[KEY_ENV.encode()]
        assert b"--connect" in argv and len(key) == 64 and not any(key in arg for arg in argv)


def test_a_dead_worker_fails_the_job_and_fresh_workers_start(weights, single):
    """A killed worker fails the running job within seconds with its cause and leaves no process; the next
    job starts fresh workers (portable transport)."""
    before = children()
    workers = WorkerPool(2, backend="gloo", threads=1)

    def kill_rank_1(done: int, total: int) -> None:
        if done == 1:
            os.kill(workers.pids[1], signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker 1 \(pid \d+\) failed during lr_anchor: it was killed by SIGKILL"):
        workers.lr_anchor(weights["lr"], single["text"], StageSettings(128, 64, 5, 1000, 5.0, 5.0), 1,
                          on_step=kill_rank_1)
    assert time.monotonic() - start < 30 and children() <= before and not workers.alive
    text = workers.encode_text(weights["text"], PROMPT)
    assert torch.equal(text.positive, single["text"].positive) and workers.alive
    workers.shutdown()
    assert children() <= before and not workers.alive


@pytest.mark.parametrize("mode", ["pipe", "portable"])
def test_a_worker_that_dies_at_start_fails_the_start(mode, monkeypatch):
    """A worker that cannot even start (here: no such module) is reported, not waited for until the timeout."""
    before = children()
    monkeypatch.setenv(TRANSPORT_ENV, mode)
    monkeypatch.setattr(pool_processes, "WORKER_MODULE", "pixelwizard_core.distributed.no_such_worker")
    workers = WorkerPool(2, backend="gloo", threads=1, start_timeout=60)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker \d \(pid \d+\) failed during start: it exited with code 1"):
        workers.start()
    assert time.monotonic() - start < 30 and not workers.alive and children() <= before


def test_portable_listener_refuses_a_wrong_key_and_stops_listening_when_closed():
    launcher = PortableLauncher()
    try:
        with pytest.raises(AuthenticationError):
            Client(launcher.address, authkey=b"not the pool's key")
        conn = Client(launcher.address, authkey=launcher._key)
        conn.send_bytes(b"1")  # a worker's first message: its rank
        rank, accepted = launcher.accept(10.0)
        accepted.send_bytes(b"setup")
        assert rank == 1 and conn.recv_bytes() == b"setup"
        conn.close()
        accepted.close()
    finally:
        launcher.close()
    with pytest.raises(OSError):
        socket.create_connection(launcher.address, timeout=1.0).close()


def _open_in_this_process(path: Path) -> bool:
    """Whether a descriptor or a memory mapping of this process refers to ``path``."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("mode", ["pipe", "portable"])
def test_tensor_files_are_read_before_they_are_deleted_with_the_portable_transport(mode, tmp_path, monkeypatch):
    """Windows cannot delete a file that is open or mapped: the portable receiver reads the file into memory
    and closes it before deleting it, where the default one maps it and deletes it while mapped."""
    open_at_unlink, unlink = [], os.unlink

    def watched_unlink(path: str) -> None:
        open_at_unlink.append(_open_in_this_process(Path(path)))
        unlink(path)

    a, b = Pipe()
    big = torch.randn(3, INLINE_BYTES // 4).to(torch.bfloat16)  # 1.5x the inline limit: through a file
    send(a, {"big": big, "small": torch.arange(4)}, tmp_path, mode)
    assert len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr(transport.os, "unlink", watched_unlink)
    got = receive(b, mode)
    assert torch.equal(got["big"], big) and got["big"].dtype == torch.bfloat16 and torch.equal(got["small"],
                                                                                                torch.arange(4))
    assert open_at_unlink == [mode == "pipe"] and list(tmp_path.iterdir()) == []


def test_transport_is_chosen_by_platform_unless_forced(monkeypatch):
    for value, platform, expected in (("", "linux", "pipe"), ("auto", "darwin", "pipe"), ("", "win32", "portable"),
                                      ("portable", "linux", "portable"), (" Pipe ", "linux", "pipe")):
        monkeypatch.setenv(TRANSPORT_ENV, value)
        monkeypatch.setattr(transport.sys, "platform", platform)
        assert transport_mode() == expected, (value, platform)
    monkeypatch.setattr(transport.sys, "platform", "win32")
    monkeypatch.setenv(TRANSPORT_ENV, "pipe")
    with pytest.raises(ConfigError, match="Windows lacks"):
        transport_mode()
    monkeypatch.setenv(TRANSPORT_ENV, "sockets")
    with pytest.raises(ConfigError, match="use one of auto, pipe, portable"):
        transport_mode()


def test_nccl_only_where_torch_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)  # a Windows or macOS build with a GPU
    assert resolve_pool_backend("auto") == "gloo"
    with pytest.raises(ConfigError, match="this torch build has no NCCL"):
        resolve_pool_backend("nccl")
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert resolve_pool_backend("auto") == resolve_pool_backend("nccl") == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_pool_backend("auto") == "gloo"
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        resolve_pool_backend("nccl")
    with pytest.raises(ConfigError, match="choose one of auto, nccl, gloo"):
        resolve_pool_backend("mpi")


def test_exit_descriptions_need_no_particular_signal():
    """Exit codes are described whatever signals the platform has (Windows has no SIGKILL)."""
    def described(code: int) -> str:
        return Processes().exit_description(Worker(0, SimpleNamespace(wait=lambda timeout: code)))

    assert described(3) == "it exited with code 3"
    assert described(-signal.SIGTERM) == "it was killed by SIGTERM"
    assert described(-signal.SIGKILL).startswith("it was killed by SIGKILL (the kernel's out-of-memory killer")
    assert described(-200) == "it was killed by signal 200"
