"""A worker process of the pool: ``python -m pixelwizard_core.distributed.worker FD`` (POSIX) or
``... worker --connect 127.0.0.1:PORT --rank N`` (Windows, or the forced portable transport).

FD is this end of a private socket pair to the parent; with ``--connect`` the worker connects back to the
parent's loopback listener and authenticates with the key in ``PIXELWIZARD_POOL_KEY`` (see
:mod:`.pool_channel`). The first message is the setup (rank, world size, device, backend, rendezvous,
parallel options); the worker joins the process group (over the parent's TCP store on 127.0.0.1, or a file
store in the pool's folder), says ``ready``, then runs jobs until told to shut down.

A reader thread receives everything the parent sends: jobs go to the main thread, interrupts and
credits are recorded at once (the running job checks interrupts after every step and tile).

When the parent disappears the connection closes and the worker exits by itself, so it never outlives
the ComfyUI / CLI process. Console interrupts (Ctrl-C, and Ctrl-Break on Windows) are the parent's to
handle: the worker ignores them and is stopped by its parent.

A streamed job (``decode_stream``) sends its result in parts as it goes: ``("piece", job, rank, index,
part)`` for part 0, 1, ... (a latent frame's weighted tile pieces), then ``done`` with no result. The
parent lets it run only a few parts ahead of what its consumer has taken: ``("credit", job, limit)``
allows parts below ``limit``, and a worker that reaches the limit waits (still answering interrupts),
so the parent holds a bounded number of parts however long the video and however slow its consumer.

Replies: ``("ready", rank, pid)``, ``("progress", job, rank, done, total)``,
``("piece", job, rank, index, part)``, ``("done", job, rank, result, info)``,
``("interrupted", job, rank, message)`` and ``("error", job, rank, message, traceback)``.

A job that raises is reported and the worker waits for the next one, its models still loaded; the parent
decides whether the pool is still usable. The ``sync`` job, which the parent sends after such a failure,
is answered here: an all-reduce of ones over every rank, the world size when the group is in step.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from .pool_channel import connect_to_parent, join_rendezvous
from .session import JobInterrupted, ParallelConfig, Session, init_process_group
from .transport import receive, send

log = logging.getLogger("pixelwizard")

JOBS = ("encode_text", "lr_anchor", "hr_latent", "decode_budget", "decode_tiles", "decode_stream", "describe")
STREAMED = ("decode_stream",)  # their job method returns an iterator of parts, sent one by one
CREDIT_POLL_S = 0.5
CONSOLE_SIGNALS = ("SIGINT", "SIGBREAK")  # sent to the whole console group; SIGBREAK exists on Windows only


class Channel:
    """The socket to the parent: sends from the main thread, a reader thread for everything incoming."""

    def __init__(self, conn: Connection, folder: Path) -> None:
        self.conn, self.folder = conn, folder
        self.jobs: queue.Queue = queue.Queue()
        self.interrupted: set[int] = set()
        self.closing = False
        self._lock = threading.Lock()
        self._credit = (None, 0)  # (job, parts it may send): only the latest, jobs run one at a time
        self._changed = threading.Condition()

    def start_reader(self) -> None:
        threading.Thread(target=self._read, name="pixelwizard-pool-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                message = receive(self.conn)
                if message[0] == "interrupt":
                    with self._changed:
                        self.interrupted.add(message[1])
                        self._changed.notify_all()
                elif message[0] == "credit":
                    with self._changed:
                        self._credit = (message[1], message[2])
                        self._changed.notify_all()
                else:
                    self.jobs.put(message)
                    if message[0] == "shutdown":
                        return
        except (EOFError, OSError):
            if not self.closing:  # the parent is gone: nobody can use our results, and nobody may wait on us
                shutil.rmtree(self.folder, ignore_errors=True)  # it cannot clean up its tensor folder now
                os._exit(3)
        except BaseException:  # an unreadable message: die visibly rather than leave the parent waiting
            log.exception("the pool worker could not read a message from its parent")
            os._exit(4)

    def send(self, message: tuple) -> None:
        with self._lock:
            send(self.conn, message, self.folder)

    def wait_credit(self, job: int, part: int) -> None:
        """Block until the parent allows ``part`` of ``job``; raises JobInterrupted when it is interrupted
        meanwhile (the parent's consumer stopped, or Cancel)."""
        with self._changed:
            while not (self._credit[0] == job and part < self._credit[1]):
                if job in self.interrupted:
                    raise JobInterrupted(f"interrupted before sending part {part}")
                self._changed.wait(CREDIT_POLL_S)


def send_parts(channel: Channel, job: int, rank: int, parts: Iterator[object]) -> None:
    """Send each part of a streamed job as soon as the parent allows it; closing ``parts`` at the end
    (or on an interrupt) frees what the job holds (the tiles' caches)."""
    try:
        for index, part in enumerate(parts):
            channel.wait_credit(job, index)
            channel.send(("piece", job, rank, index, part))
            del part  # not kept while the next part is decoded
    finally:
        close = getattr(parts, "close", None)
        if close is not None:
            close()


def _cpu_seconds() -> float:
    times = os.times()  # portable: user + system CPU time of this process
    return times.user + times.system


def in_step(session: Session) -> int:
    """The ``sync`` job: the sum of one per rank, which only comes back (as the world size) when every rank
    reaches this all-reduce as its next collective."""
    if session.device.type == "cuda":  # a failed kernel can leave the device unusable: raise here, not next job
        torch.ones(1, device=session.device).add_(1)
        torch.cuda.synchronize(session.device)
    if session.world_size == 1:
        return 1
    value = torch.ones(1, dtype=torch.int64)
    dist.all_reduce(value, group=session.cpu_group)
    return int(value.item())


WORKER_JOBS = {"sync": in_step}  # answered here, not by the session


def _call(session: Session, channel: Channel, job: int, name: str, kwargs: dict) -> object:
    if name in WORKER_JOBS:
        return WORKER_JOBS[name](session)
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}")
    result = getattr(session, name)(**kwargs)
    if name in STREAMED:
        send_parts(channel, job, session.rank, result)
        return None
    return result


def run_job(session: Session, channel: Channel, message: tuple) -> None:
    _, job, name, kwargs = message
    rank = session.rank
    session.reset_job()
    session.should_stop = lambda: job in channel.interrupted
    session.progress = lambda done, total: channel.send(("progress", job, rank, done, total))
    start, cpu = time.perf_counter(), _cpu_seconds()
    try:
        result = _call(session, channel, job, name, kwargs)
    except JobInterrupted as error:
        channel.send(("interrupted", job, rank, str(error)))
        return
    except BaseException as error:  # reported; the worker stays for the next job unless the parent stops it
        log.error("job %s failed on rank %d: %s", name, rank, error)
        channel.send(("error", job, rank, f"{type(error).__name__}: {error}", traceback.format_exc()))
        return
    finally:
        channel.interrupted.discard(job)
    info = {"loaded": list(session.loaded), "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu_seconds() - cpu, **session.memory()}
    channel.send(("done", job, rank, result, info))


def _join(setup: dict, device: torch.device) -> Session:
    store = join_rendezvous(setup["rendezvous"], setup["world_size"], setup["start_timeout"])
    init_process_group(setup["backend"], rank=setup["rank"], world_size=setup["world_size"], store=store,
                       device=device, timeout_s=setup["collective_timeout"])
    return Session(ParallelConfig(**setup["parallel"]), device=device)


def _ignore_console_interrupts() -> None:
    """Ctrl-C (and Ctrl-Break) reach every process of the console; the parent handles them and stops us."""
    for name in CONSOLE_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def main(argv: list[str]) -> int:
    _ignore_console_interrupts()
    conn = connect_to_parent(argv)
    setup = receive(conn)
    logging.basicConfig(level=setup["log_level"], stream=sys.stderr,
                        format=f"[pixelwizard worker {setup['rank']}] %(message)s")
    if setup["threads"]:
        torch.set_num_threads(setup["threads"])
    device = torch.device(setup["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    channel = Channel(conn, Path(setup["folder"]))
    channel.start_reader()
    try:
        session = _join(setup, device)
    except BaseException as error:  # tell the parent why, instead of just vanishing
        channel.send(("error", None, setup["rank"], f"{type(error).__name__}: {error}", traceback.format_exc()))
        return 1
    channel.send(("ready", setup["rank"], os.getpid()))
    while True:
        message = channel.jobs.get()
        if message[0] == "shutdown":
            break
        run_job(session, channel, message)
    channel.closing = True
    session.release()
    dist.destroy_process_group()
    conn.close()
    return 0


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # everything is released; skip interpreter teardown (seconds of C++ destructors)
