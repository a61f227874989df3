"""The pool's jobs on the wire (message formats in :mod:`.worker`): send a job to every worker, read the
replies as they arrive (progress, streamed parts, results, errors) while watching for deaths, the time
limit and stop requests, and interrupt a job or let a streamed one run further (credits).

One job runs at a time (the pool's job lock); :meth:`Rpc.interrupt` may come from any thread.

Once a job is interrupted (Cancel) or a worker reports an error, every worker has ``SETTLE_S`` seconds to
end the job. One that does not (stuck in a collective whose peer left, or in a kernel that never returns)
is not waited for: every worker is stopped, the caller hears why, and the next job starts fresh workers.
When all of them end it, a worker's error keeps the pool: one tiny all-reduce (the ``sync`` job) shows
that the process group is still in step, and the workers stay with their models loaded.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from ..errors import PixelWizardError
from .pool_processes import HUNG_GRACE_S, POLL_S, JobFailed, JobTimeout, Processes, Worker, WorkerError
from .session import JobInterrupted

log = logging.getLogger("pixelwizard")

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]
# After Cancel or a worker's error, how long the other workers may take to end the job (a step or a tile
# frame) before they count as hung; with HUNG_GRACE_S to kill them, Cancel ends every job within 10 s.
SETTLE_S = 5.0
SYNC_JOB = "sync"  # answered by worker.py itself: an all-reduce of ones, the world size when in step


class Rpc:
    """Sends jobs, interrupts and credits to the workers of ``processes``."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.job: int | None = None  # the job running now
        self.interrupted: int | None = None  # the job interrupt() was last called for
        self.interrupted_at = 0.0  # when (time.monotonic)
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
        if self.interrupted != job:
            self.interrupted_at = time.monotonic()  # set first: a reader that sees the job sees the time
        self.interrupted = job  # a streamed decode yields nothing more, even chunks already here
        self._broadcast(("interrupt", job))

    def in_step(self, timeout: float = SETTLE_S) -> bool:
        """Whether the idle workers' process group is still in step (after a job that failed on some of
        them): every worker answers the ``sync`` all-reduce within ``timeout`` with the world size. The job
        running before is the current one again afterwards."""
        job = self.job
        try:
            sync = self.open(SYNC_JOB, {})
            results, _ = Replies(self, sync, SYNC_JOB, None, None, timeout).finish()
        except (WorkerError, JobInterrupted) as error:
            log.warning("the worker pool is out of step after a failed job: %s", error)
            return False
        finally:
            self.job = job
        return all(value == len(results) for value in results)

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
    worker has stopped. A streamed job's parts go to ``on_part(index, part)`` as they arrive. A worker's
    error interrupts the others; :meth:`finish` raises it once all have ended the job (see the module
    docstring for what happens to the pool)."""

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
        self.errors: list[tuple[Worker, str, str]] = []  # (worker, message, traceback) of workers that raised
        self.errors_at = 0.0
        self.raised: BaseException | bool | None = None  # True: should_stop asked; an exception: a callback raised
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._held: float | None = None

    def poll(self) -> None:
        """Handle what arrives within ``POLL_S``. A dead worker, a hung one or the time limit tears the
        pool down and raises (then nothing is pending any more)."""
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
        if self.errors:
            self._raise_error()
        if self.interrupted:
            raise JobInterrupted(f"{self.name} was interrupted ({self.interrupted[0]}); the worker pool is still "
                                 "running")
        return self.results, self.infos

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        """Poll until ``ready()``; when a stop was asked, a worker failed or every worker has ended without
        it, wait for the others to stop and raise why."""
        self._ask_host()
        while True:
            if self.raised is not None or self.errors or self.rpc.interrupted == self.job:
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
            except pickle.UnpicklingError as error:
                processes.fail(worker, self.name, f"it sent a message this process refuses to read ({error})")
            self._handle(worker, message)
        for worker in list(self.pending.values()):
            if worker.process.poll() is not None:
                processes.fail(worker, self.name, processes.exit_description(worker))
        self._check_settled()
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
            self._error(worker, message[1], message[3], message[4])

    def _progress(self, rank: int, counts: tuple) -> None:
        """Report the sum over the workers; a host callback that raises interrupts the job."""
        self.progress[rank] = counts
        if self.on_step is not None and self.raised is None:
            done, total = (sum(v[i] for v in self.progress.values()) for i in (0, 1))
            on_step = self.on_step
            self.raised = self.rpc.call_host(lambda: on_step(done, total), honour_result=False)

    def _error(self, worker: Worker, job: int | None, message: str, worker_traceback: str) -> None:
        """A worker's job raised. Fatal at the start, in the ``sync`` check, or when a worker died (the root
        cause: the others only lost their peer); otherwise the others are asked to stop and the error waits
        for them (:meth:`finish`)."""
        log.error("worker %d traceback:\n%s", worker.rank, worker_traceback)
        processes = self.processes
        dead = processes.dead_worker()
        if dead is not None:
            processes.fail(dead, self.name, f"{processes.exit_description(dead)} (then worker {worker.rank}: "
                                            f"{message})")
        if job is None or job != self.job or self.name == SYNC_JOB:
            processes.fail(worker, self.name, message, worker_traceback)
        if not self.errors:
            self.errors_at = time.monotonic()
            self.rpc.interrupt()  # the others may be waiting for this worker: stop them at their next check
        self.errors.append((worker, message, worker_traceback))
        self.pending.pop(worker.conn, None)

    def _raise_error(self) -> None:
        """Every worker has ended the job and some raised: keep the pool when it is still in step."""
        worker, message, worker_traceback = self.errors[0]
        if len(self.processes.workers) == 1 or self.rpc.in_step():
            raise JobFailed(f"worker {worker.rank} (pid {worker.process.pid}) failed during {self.name}: {message}. "
                            "The workers are still running, with their models loaded", worker_traceback)
        self.processes.fail(worker, self.name, f"{message}; the workers were out of step afterwards",
                            worker_traceback)

    def _check_settled(self) -> None:
        """After Cancel or a worker's error, stop the workers that have not ended the job in SETTLE_S."""
        started = self.errors_at if self.errors else None
        if self.job is not None and self.rpc.interrupted == self.job:
            started = min(started or self.rpc.interrupted_at, self.rpc.interrupted_at)
        if not self.pending or started is None or time.monotonic() - started < SETTLE_S:
            return
        hung = ", ".join(f"{w.rank} (pid {w.process.pid})" for w in self.pending.values())
        plural = "s" if len(self.pending) > 1 else ""
        self.pending.clear()
        self.processes.teardown(grace=HUNG_GRACE_S)
        what = (f"worker{plural} {hung} did not end {self.name} within {SETTLE_S:g} s (stuck in a collective or a "
                "kernel), so every worker was stopped; the next job starts fresh workers")
        if self.errors:
            worker, message, worker_traceback = self.errors[0]
            raise WorkerError(f"worker {worker.rank} (pid {worker.process.pid}) failed during {self.name}: "
                              f"{message}; then {what}", worker_traceback)
        log.warning("cancelling %s: %s", self.name, what)
        if isinstance(self.raised, BaseException):
            raise self.raised
        raise JobInterrupted(f"{self.name} was cancelled; {what}")
