"""The pool's jobs on the wire (message formats in :mod:`.worker`): send a job to every worker, read the
replies as they arrive (progress, streamed parts, results, errors) while watching for deaths, the time
limit and stop requests, and interrupt a job or let a streamed one run further (credits).

One job runs at a time (the pool's job lock); :meth:`Rpc.interrupt` may come from any thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from ..errors import PixelWizardError
from .pool_processes import POLL_S, JobTimeout, Processes, Worker, WorkerError
from .session import JobInterrupted

log = logging.getLogger("pixelwizard")

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]


class Rpc:
    """Sends jobs, interrupts and credits to the workers of ``processes``."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.job: int | None = None  # the job running now
        self.interrupted: int | None = None  # the job interrupt() was last called for
        self._ids = itertools.count(1)

    def open(self, name: str, kwargs: dict) -> int:
        """Send job ``name`` to every (started) worker; its id, also in ``self.job`` until the caller clears it."""
        job = self.job = next(self._ids)
        for worker in self.processes.workers:
            try:
                self.processes.send(worker, ("job", job, name, kwargs))
            except OSError:  # it died since the pool looked
                self.processes.fail(worker, name, self.processes.exit_description(worker))
        return job

    def interrupt(self) -> None:
        """Ask the running job to stop after its current step or tile (no-op when idle)."""
        job = self.job
        if job is None:
            return
        self.interrupted = job  # a streamed decode yields nothing more, even chunks already here
        self._broadcast(("interrupt", job))

    def allow(self, job: int, limit: int) -> None:
        """Let the workers send the parts of ``job`` below ``limit``."""
        self._broadcast(("credit", job, limit))

    def _broadcast(self, message: tuple) -> None:
        for worker in self.processes.workers:
            try:
                self.processes.send(worker, message)
            except OSError:
                pass  # a dead worker is reported by the job's own polling

    def call_host(self, callback: Callable[[], object], honour_result: bool) -> BaseException | bool | None:
        """Run a host callback; an exception from it, or a true result when ``honour_result``
        (should_stop), interrupts the job."""
        try:
            stop = callback()
        except BaseException as error:  # re-raised once the workers have stopped
            self.interrupt()
            return error
        if honour_result and stop:
            self.interrupt()
            return True
        return None

    def abandon(self, replies: Replies) -> None:
        """Stop a job whose caller went away: interrupt it and read every worker's remaining messages
        (dropping their parts) until each has stopped, so the pool is ready for the next job. A worker
        that dies meanwhile tears the pool down; that is logged, not raised (the caller's own exception,
        if any, is the one that matters)."""
        replies.resume()
        replies.on_step = replies.should_stop = replies.on_part = None
        replies.raised = None
        self.interrupt()
        try:
            replies.finish()
        except JobInterrupted:
            pass
        except WorkerError as error:
            log.warning("while stopping an abandoned %s: %s", replies.name, error)


class Replies:
    """The workers' replies to one job (``job`` None: the start-up 'ready'), read as they arrive while
    watching for deaths, the time limit and stop requests. An exception raised by ``on_step`` or
    ``should_stop`` (a host's own way to cancel) interrupts the job; :meth:`finish` raises it once every
    worker has stopped. A streamed job's parts go to ``on_part(index, part)`` as they arrive."""

    def __init__(self, rpc: Rpc, job: int | None, name: str, on_step: Progress | None,
                 should_stop: StopCheck | None, timeout: float | None,
                 on_part: Callable[[int, object], None] | None = None) -> None:
        self.rpc, self.processes = rpc, rpc.processes
        self.job, self.name, self.timeout = job, name, timeout
        self.on_step, self.should_stop, self.on_part = on_step, should_stop, on_part
        world_size = len(self.processes.workers)
        self.results, self.infos = [None] * world_size, [{}] * world_size
        self.progress: dict[int, tuple] = {}
        self.pending = {w.conn: w for w in self.processes.workers}
        self.interrupted: list[str] = []
        self.raised: BaseException | bool | None = None  # True: should_stop asked; an exception: a callback raised
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._held: float | None = None

    def poll(self) -> None:
        """Handle what arrives within ``POLL_S``. A dead worker or the time limit tears the pool down and
        raises (then nothing is pending any more)."""
        try:
            self._poll()
        except WorkerError:
            self.pending.clear()
            raise

    def finish(self) -> tuple[list, list]:
        """Wait for every worker's reply; the results and reports in rank order."""
        while self.pending:
            self.poll()
        if self.raised is not None and not isinstance(self.raised, bool):
            raise self.raised
        if self.interrupted:
            raise JobInterrupted(f"{self.name} was interrupted ({self.interrupted[0]}); the worker pool is still "
                                 "running")
        return self.results, self.infos

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        """Poll until ``ready()``; when a stop was asked or every worker has ended without it, wait for
        the others to stop and raise why."""
        self._ask_host()
        while True:
            if self.raised is not None or self.rpc.interrupted == self.job:
                self.finish()
                raise JobInterrupted(f"{self.name} was interrupted; the worker pool is still running")
            if ready():
                return
            if not self.pending:
                self.finish()
                raise PixelWizardError(f"the workers ended {self.name} without sending {what}; please report this")
            self.poll()

    def hold(self) -> None:
        """The caller has the job's output: its time does not count against the time limit."""
        self._held = time.monotonic()

    def resume(self) -> None:
        if self._held is not None and self.deadline is not None:
            self.deadline += time.monotonic() - self._held
        self._held = None

    def _ask_host(self) -> None:
        if self.should_stop is not None and self.raised is None:
            self.raised = self.rpc.call_host(self.should_stop, honour_result=True)

    def _poll(self) -> None:
        processes = self.processes
        self._ask_host()
        for conn in wait(list(self.pending), timeout=POLL_S):
            worker = self.pending[conn]
            try:
                message = processes.receive(conn)
            except (EOFError, OSError):
                processes.fail(worker, self.name, processes.exit_description(worker))
            self._handle(worker, message)
        for worker in list(self.pending.values()):
            if worker.process.poll() is not None:
                processes.fail(worker, self.name, processes.exit_description(worker))
        if self.deadline is not None and time.monotonic() > self.deadline:
            processes.teardown()
            raise JobTimeout(f"{self.name} did not finish within {self.timeout:g} s; the worker pool was shut down "
                             "(the next job starts fresh workers); allow more time or use more GPUs")

    def _handle(self, worker: Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "progress" and message[1] == self.job:
            self._progress(message[2], message[3:])
        elif kind == "piece" and message[1] == self.job:
            if self.on_part is not None:
                self.on_part(message[3], message[4])
        elif kind == "ready" and self.job is None:
            worker.pid = message[2]
            del self.pending[worker.conn]
        elif kind in ("done", "interrupted") and message[1] == self.job:
            if kind == "done":
                self.results[worker.rank], self.infos[worker.rank] = message[3], message[4]
            else:
                self.interrupted.append(message[3])
            del self.pending[worker.conn]
        elif kind == "error":
            self._error(worker, message[3], message[4])

    def _progress(self, rank: int, counts: tuple) -> None:
        """Report the sum over the workers; a host callback that raises interrupts the job."""
        self.progress[rank] = counts
        if self.on_step is not None and self.raised is None:
            done, total = (sum(v[i] for v in self.progress.values()) for i in (0, 1))
            on_step = self.on_step
            self.raised = self.rpc.call_host(lambda: on_step(done, total), honour_result=False)

    def _error(self, worker: Worker, message: str, worker_traceback: str) -> None:
        log.error("worker %d traceback:\n%s", worker.rank, worker_traceback)
        processes = self.processes
        dead = processes.dead_worker()
        if dead is not None:  # the root cause: the others only lost their peer
            processes.fail(dead, self.name, f"{processes.exit_description(dead)} (then worker {worker.rank}: "
                                            f"{message})")
        processes.fail(worker, self.name, message, worker_traceback)
