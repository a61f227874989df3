"""Supervision of the pool's worker processes: start them and hand each its setup, send to them, notice
a death and say why, and stop and reap them (nothing may be left holding GPU memory).

Portable: processes are stopped with ``Popen.terminate`` / ``Popen.kill`` (no POSIX signal names), exit
codes are described whether or not the platform has signals, and the control connection and rendezvous
come from :mod:`.pool_channel`, which picks them per platform.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NoReturn

from ..errors import PixelWizardError
from .pool_channel import Launcher, open_launcher, serve_rendezvous
from .session import ParallelConfig
from .transport import (
    TRANSPORT_ENV,
    discard_files,
    reclaim_stale_folders,
    receive,
    send,
    shared_folder,
    transport_mode,
)

log = logging.getLogger("pixelwizard")

POLL_S = 0.1
STOP_GRACE_S = 5.0
HUNG_GRACE_S = 1.0  # a worker that ignored a stop request already: SIGKILL after this
WORKER_MODULE = "pixelwizard_core.distributed.worker"


class WorkerError(PixelWizardError, RuntimeError):
    """A worker failed or died. The pool has been torn down (the next call starts a fresh one), unless this
    is a :class:`JobFailed`."""

    def __init__(self, message: str, worker_traceback: str = "") -> None:
        super().__init__(message)
        self.worker_traceback = worker_traceback


class JobTimeout(WorkerError):
    """A job ran past its time limit; the pool has been torn down."""


class JobFailed(WorkerError):
    """A job raised on a worker (a bad file, a wrong input), and every worker came out of it in step: the
    workers keep running with their models loaded."""


@dataclass
class Worker:
    rank: int
    process: subprocess.Popen
    conn: Connection | None = None  # None until the worker has connected (portable transport)
    pid: int = 0


@dataclass(frozen=True)
class LaunchConfig:
    """What the workers of one start are told: the pool's configuration at the time it starts."""

    device_ids: tuple[int, ...]
    backend: str
    parallel: ParallelConfig
    threads: int
    start_timeout: float
    collective_timeout: float

    def setup(self, rank: int, rendezvous: dict, folder: Path) -> dict:
        """The first message a worker receives."""
        return {
            "rank": rank, "world_size": len(self.device_ids), "backend": self.backend, "rendezvous": rendezvous,
            "device": "cpu" if self.backend == "gloo" else f"cuda:{self.device_ids[rank]}",
            "parallel": {"ulysses": self.parallel.ulysses, "dit_fsdp": self.parallel.dit_fsdp,
                         "t5_fsdp": self.parallel.t5_fsdp},
            "threads": self.threads, "folder": str(folder), "start_timeout": self.start_timeout,
            "collective_timeout": self.collective_timeout,
            "log_level": logging.getLogger("pixelwizard").getEffectiveLevel(),
        }


class Processes:
    """The running workers (none when stopped), their tensor folder and the rendezvous store."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.folder: Path | None = None
        self.store: object | None = None  # the TCPStore the workers rendezvous at (pipe transport)
        self.mode: str | None = None  # the transport of the running workers, fixed when they start
        self._send_lock = threading.Lock()  # interrupt() may send from another thread

    @property
    def alive(self) -> bool:
        return bool(self.workers) and all(w.process.poll() is None for w in self.workers)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def send(self, worker: Worker, message: object) -> None:
        """Raises OSError when the worker is gone."""
        with self._send_lock:
            send(worker.conn, message, self.folder, self.mode)

    def receive(self, conn: Connection) -> object:
        """The next message on a worker's connection (EOFError or OSError when the worker is gone)."""
        return receive(conn, self.mode)

    def spawn(self, config: LaunchConfig) -> None:
        """Start one worker per device and send each its setup once it is connected; a worker that dies
        first, or the start timeout, raises (tear down on any exception)."""
        mode = self.mode = transport_mode()
        reclaim_stale_folders()  # left by pools killed with their workers (nobody else removes them)
        self.folder = shared_folder()
        self.store, rendezvous = serve_rendezvous(mode, self.folder, len(config.device_ids), config.start_timeout)
        launcher = open_launcher(mode)
        try:
            command, env = [sys.executable, "-m", WORKER_MODULE], worker_environment(config.threads, mode)
            for rank in range(len(config.device_ids)):
                self.workers.append(Worker(rank, launcher.start(rank, command, env)))
            self._connect(launcher, config, rendezvous)
        finally:
            launcher.close()  # nothing listens once every worker is in (or the start failed)

    def _connect(self, launcher: Launcher, config: LaunchConfig, rendezvous: dict) -> None:
        waiting = {worker.rank: worker for worker in self.workers}
        deadline = time.monotonic() + config.start_timeout
        while waiting:
            arrived = launcher.accept(POLL_S)
            if arrived is None:
                self._check_waiting(waiting.values(), deadline, config.start_timeout)
                continue
            rank, conn = arrived
            worker = waiting.pop(rank, None)
            if worker is None:  # not a rank we wait for: cannot come from our own workers
                conn.close()
                continue
            worker.conn = conn
            try:
                self.send(worker, config.setup(rank, rendezvous, self.folder))
            except OSError:  # it died since it connected
                self.fail(worker, "start", self.exit_description(worker))

    def _check_waiting(self, waiting: Iterable[Worker], deadline: float, timeout: float) -> None:
        for worker in waiting:
            if worker.process.poll() is not None:
                self.fail(worker, "start", f"{self.exit_description(worker)} before connecting to the pool")
        if time.monotonic() > deadline:
            self.teardown()
            raise JobTimeout(f"the workers did not connect within {timeout:g} s; the worker pool was shut down")

    def dead_worker(self) -> Worker | None:
        return next((w for w in self.workers if w.process.poll() is not None), None)

    def fail(self, worker: Worker, name: str, reason: str, worker_traceback: str = "") -> NoReturn:
        """Tear the pool down and raise why ``worker`` failed during job ``name``."""
        pid = worker.process.pid
        self.teardown()
        raise WorkerError(f"worker {worker.rank} (pid {pid}) failed during {name}: {reason}. The worker pool was "
                          "shut down; the next job starts fresh workers", worker_traceback)

    def exit_description(self, worker: Worker) -> str:
        try:
            code = worker.process.wait(2.0)
        except subprocess.TimeoutExpired:
            return "it closed its connection"
        if code < 0:  # POSIX only: killed by signal -code
            return f"it was killed by {_signal_name(-code)}"
        return f"it exited with code {code}"

    def shutdown(self) -> None:
        """Ask every worker to exit, give them a moment, then stop whatever is left."""
        for worker in self.workers:
            try:
                if worker.conn is not None:
                    self.send(worker, ("shutdown",))
            except OSError:  # already gone
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self.workers:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.teardown()

    def teardown(self, grace: float = STOP_GRACE_S) -> None:
        """Stop every worker (terminate, then kill after ``grace`` seconds), reap it, and free the rendezvous
        and the files."""
        workers, self.workers = self.workers, []
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        deadline = time.monotonic() + grace
        for worker in workers:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            if worker.conn is not None:
                worker.conn.close()
        self.store = None  # closes the rendezvous' listening socket
        if self.folder is not None:
            discard_files(self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _signal_name(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    if number == getattr(signal, "SIGKILL", None):
        name += " (the kernel's out-of-memory killer sends it when host memory runs out)"
    return name


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((n for n in ("lo", "lo0") if n in names), None)


def worker_environment(threads: int, mode: str) -> dict[str, str]:
    """The parent's environment for a worker: this package importable, its threads, the transport, and
    collectives kept on the loopback interface."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    env[TRANSPORT_ENV] = mode  # the worker must read tensor files the way this parent does
    loopback = _loopback_interface()
    if loopback:  # collectives connect over loopback only
        env["GLOO_SOCKET_IFNAME"] = loopback
        env["NCCL_SOCKET_IFNAME"] = loopback
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a pool inside a torchrun job must not pick up the outer job's rendezvous
    return env
