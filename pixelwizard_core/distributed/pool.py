"""A persistent pool of torch.distributed worker processes that runs PixelWizard's stages for a parent
process (ComfyUI, or any Python program).

::

    pool = WorkerPool(devices=4, ulysses=4, dit_fsdp=True)     # nothing starts yet
    text = pool.encode_text(t5_file, "a red fox in snow")         # starts 4 workers, loads the T5
    anchor = pool.lr_anchor(dit_file, text, lr_settings, seed=100)
    latent = pool.hr_latent(hr_file, anchor, text, hr_settings, seed=10000)
    video = pool.decode(vae_file, latent, DecodeSettings(num_patches=4))   # tiles split over the 4
    for chunk in pool.decode_stream(vae_file, latent, DecodeSettings(num_patches=4)):
        writer.append(chunk)                                   # or streamed, a few frames at a time
    pool.shutdown()

Workers are separate interpreters (``python -m pixelwizard_core.distributed.worker``), one per GPU with
NCCL or N CPU processes with gloo. They rendezvous through a TCP store the parent serves on 127.0.0.1 at a
port the system picks (the listening socket is bound before the store takes it, so there is no race and
nothing listens on another address); gloo and NCCL are pinned to the loopback interface. They stay alive
between jobs with their models resident, cached by file identity, so the second prompt loads nothing.
Models are given as :class:`~pixelwizard_core.pipeline.handles.ModelHandle` or as paths.

Results come back as CPU tensors (large ones through files in /dev/shm, see :mod:`.transport`).

The two decodes mirror the single-process tiled decode's two orders. ``decode`` has each worker decode
its tiles one after the other, whole (one tile's cache on its GPU at a time), and blends the whole video
here: host memory holds every tile and the video (about 25 GB at 4K, 121 frames). ``decode_stream`` has
each worker decode its tiles in lockstep, latent frame by latent frame (all of its tiles' caches on its
GPU, as ``order="frame"``), and yields each chunk of 1 then 4 frames as soon as every tile's piece of it
has arrived; the workers run at most ``STREAM_AHEAD`` latent frames ahead of the consumer, so host memory
holds a few chunks whatever the video's length. Both give the same video.

Before either decode the parent resolves the tiles and order once and sends every worker the same
resolved settings: when they depend on memory (``num_patches=0``, or order "frame"), a small
``decode_budget`` job has each worker report its usable GPU memory after the VAE weights, and the
smallest (capped by ``DecodeSettings.budget_bytes``) decides (``tiles.resolve_settings``). ``decode``
chooses for whole tiles; ``decode_stream`` prefers frame order with the fewest tiles whose share on one
worker fits, and when none does it decodes whole tiles and yields the chunks of the video blended here.

Failure and control:

* ``interrupt()`` (or ``should_stop`` returning True, polled every 0.1 s while a job runs) stops the job
  after the current step or tile; the call raises :class:`JobInterrupted` and the pool stays usable.
* A worker that dies (killed, out of memory, exception) fails the running call within about a second with
  a :class:`WorkerError` that carries the worker's own message; the pool is then torn down (every worker
  stopped, nothing left holding GPU memory) and the next call starts fresh workers. A call that exceeds
  its timeout fails the same way (:class:`JobTimeout`).
* ``shutdown()`` stops every worker; pools still running at interpreter exit are shut down by ``atexit``,
  and a worker whose parent disappears exits by itself.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError, PixelWizardError
from ..pipeline.anchors import Anchor
from ..pipeline.handles import ModelHandle
from ..pipeline.presets import StageSettings, check_stage
from ..pipeline.runner import DecodeSettings
from ..pipeline.stages import check_anchor_fits
from ..pipeline.text import TextConditioning
from .session import JobInterrupted, ParallelConfig, check_model_degree, resolve_backend
from .tiles import blend_tiles, needs_budget, plan_for_latent, resolve_settings
from .transport import discard_files, receive, send, shared_folder

log = logging.getLogger("pixelwizard")

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]
POLL_S = 0.1
STOP_GRACE_S = 5.0
STREAM_AHEAD = 2  # latent frames a streamed decode's workers may send beyond the chunk last yielded

__all__ = ["WorkerPool", "PoolSpec", "WorkerError", "JobTimeout", "JobInterrupted", "acquire", "shutdown_all",
           "parse_devices"]


class WorkerError(PixelWizardError, RuntimeError):
    """A worker failed or died; the pool has been torn down (the next call starts a fresh one)."""

    def __init__(self, message: str, worker_traceback: str = "") -> None:
        super().__init__(message)
        self.worker_traceback = worker_traceback


class JobTimeout(WorkerError):
    """A job ran past its time limit; the pool has been torn down."""


@dataclass
class JobReport:
    """What the last job did on each rank: models it loaded, seconds, peak memory."""

    job: str
    seconds: float = 0.0
    ranks: list[dict] = field(default_factory=list)

    @property
    def loaded(self) -> list[str]:
        """Every model role any rank loaded during the job (empty when all were resident)."""
        return sorted({role for info in self.ranks for role in info.get("loaded", [])})


@dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    conn: Connection
    pid: int = 0


class WorkerPool:
    """N worker processes that run the pipeline's stages together; see the module docstring.

    Args:
        devices: a number of workers (GPUs 0..N-1 with NCCL, or N CPU processes with gloo) or a list of
            GPU indices (with gloo: that many CPU processes).
        ulysses: sequence-parallel degree: 1, or the number of workers (must divide the heads: 24).
        dit_fsdp / t5_fsdp: shard the DiTs / the text encoder over the workers (FSDP2, one unit per block).
        backend: "auto" (NCCL when CUDA is available, else gloo), "nccl" or "gloo" (CPU workers).
        threads: torch threads per worker (default: the machine's cores divided among the workers).
        timeout: default time limit of one call in seconds (None: no limit).
        start_timeout: how long the workers may take to start and join the process group.
    """

    def __init__(self, devices: int | Sequence[int] = 2, *, ulysses: int = 1, dit_fsdp: bool = False,
                 t5_fsdp: bool = False, backend: str = "auto", threads: int | None = None,
                 timeout: float | None = None, start_timeout: float = 300.0) -> None:
        self.backend = resolve_backend(backend)
        self.device_ids = _device_ids(devices, self.backend)
        self.world_size = len(self.device_ids)
        self.parallel = ParallelConfig(ulysses, dit_fsdp, t5_fsdp)
        self.parallel.check(self.world_size)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.world_size)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.last_report: JobReport | None = None
        self._workers: list[_Worker] = []
        self._store = self._listener = self._folder = None
        self._job_ids = itertools.count(1)
        self._job: int | None = None
        self._interrupted: int | None = None  # the job interrupt() was last called for
        self._job_lock = threading.Lock()  # one job at a time
        self._streaming: int | None = None  # the thread whose streamed decode holds the job lock
        self._send_lock = threading.Lock()  # interrupt() may come from another thread
        _POOLS.add(self)

    # --- state -------------------------------------------------------------------------------
    @property
    def config(self) -> tuple:
        """What makes two pools interchangeable (see :func:`acquire`)."""
        return (tuple(self.device_ids), self.backend, self.parallel, self.threads)

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(w.process.poll() is None for w in self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def __repr__(self) -> str:
        where = "cpu" if self.backend == "gloo" else f"cuda:{','.join(map(str, self.device_ids))}"
        state = "running" if self.alive else "stopped"
        return f"WorkerPool({self.world_size} x {where}, {self.backend}, {self.parallel}, {state})"

    # --- jobs --------------------------------------------------------------------------------
    def encode_text(self, model: ModelHandle | str | Path, prompt: str, negative_prompt: str | None = None,
                    **control) -> TextConditioning:
        """Context of both CFG branches (CPU): on worker 0, or on all of them with ``t5_fsdp``."""
        handle = as_handle(model, "text")
        return self._run("encode_text", {"handle": handle, "prompt": prompt, "negative_prompt": negative_prompt},
                         **control)[0]

    def lr_anchor(self, model: ModelHandle | str | Path, text: TextConditioning, settings: StageSettings,
                  seed: int, **control) -> Anchor:
        """The LR anchor, sampled by all workers together (Ulysses and/or FSDP)."""
        handle = as_handle(model, "lr")
        check_stage(settings, hr=False)
        check_model_degree(handle.path, "lr", self.parallel.ulysses)
        return self._run("lr_anchor", {"handle": handle, "text": text, "settings": settings, "seed": seed},
                         **control)[0]

    def hr_latent(self, model: ModelHandle | str | Path, anchor: Anchor | torch.Tensor, text: TextConditioning,
                  settings: StageSettings, seed: int, **control) -> torch.Tensor:
        """The HR latent [1, 48, T, H/16, W/16] float32 (CPU), sampled by all workers together."""
        handle = as_handle(model, "hr")
        latent = anchor.latent if isinstance(anchor, Anchor) else anchor
        check_stage(settings, hr=True)
        check_anchor_fits(latent, settings)
        check_model_degree(handle.path, "hr", self.parallel.ulysses)
        job = {"handle": handle, "anchor_latent": latent, "text": text, "settings": settings, "seed": seed}
        return self._run("hr_latent", job, **control)[0]

    def decode(self, model: ModelHandle | str | Path, latent: torch.Tensor,
               settings: DecodeSettings = DecodeSettings(), **control) -> torch.Tensor:
        """Tiled decode with the tiles split over the workers: video [B, 3, F, H, W] float32 in [-1, 1]
        (CPU), the single-process tiled decode's result (see :mod:`.tiles`). Each worker decodes its tiles
        one at a time, whole, whatever ``settings.order`` (so automatic tiles are chosen for tile order:
        the fewest of which one fits the smallest worker's free memory); the whole video and all tiles are
        in host memory here at the end (prefer :meth:`decode_stream` when the frames go to a file).
        Progress counts tile-frames of all workers."""
        handle = as_handle(model, "vae")
        settings = dataclasses.replace(settings, order="tile")
        plan_for_latent(latent, settings, world_size=self.world_size, vae_precision=handle.precision)  # checks
        with self._exclusive():
            settings = self._resolve(handle, latent, settings, control)
            return self._whole_video(handle, latent, settings, control)

    def decode_stream(self, model: ModelHandle | str | Path, latent: torch.Tensor,
                      settings: DecodeSettings = DecodeSettings(), **control) -> Iterator[torch.Tensor]:
        """The tiled decode streamed: yields chunks [B, 3, n, H, W] float32 in [-1, 1] (CPU) in frame order,
        n = 1 for the first latent frame and 4 after; concatenated they are :meth:`decode`'s video.

        Each worker decodes its tiles in lockstep, one latent frame at a time (the causal caches of all
        of its tiles stay on its GPU, as the single-process ``order="frame"``: one tile's with as many
        workers as tiles), and sends that frame's weighted pieces; a chunk is blended once every tile's
        piece of it is here, and the pieces are dropped. Host memory holds a few chunks at any time: the
        workers wait when they are ``STREAM_AHEAD`` latent frames ahead of the chunk last yielded (the time
        the consumer takes does not count against ``timeout``).

        Before that the workers report their free memory and the tiles and order are resolved for the
        smallest (:func:`.tiles.resolve_settings`, within ``settings.budget_bytes`` too). When no frame-order
        share fits one worker (or ``settings.order`` is "tile"), the workers decode whole tiles instead, as
        :meth:`decode` does, and the chunks are cut from the whole video blended here (host memory holds it).

        Arguments are checked now; the job starts at the first ``next`` and holds the pool until the
        generator ends: close it (or leave the ``for`` loop) to stop early, which interrupts the workers
        and leaves the pool ready for the next job. Interrupts, host cancels, worker deaths and timeouts
        end it as they end the other jobs."""
        handle = as_handle(model, "vae")
        plan_for_latent(latent, settings, world_size=self.world_size, vae_precision=handle.precision)  # checks
        return self._decode_chunks(handle, latent, settings, **control)

    def describe(self) -> list[dict]:
        """Per worker: its resident models with the parameters it holds, and its peak memory."""
        return self._run("describe", {})

    # --- control -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers now (jobs do it on demand); a no-op while they are running."""
        if self.alive:
            return
        if self._workers:
            log.warning("a worker of %r had exited while idle; starting fresh workers", self)
            self._teardown()
        if not hasattr(os, "fork"):
            raise ConfigError("the PixelWizard worker pool needs Linux or macOS (it passes sockets to its workers)")
        started = time.perf_counter()
        try:
            self._spawn()
            self._collect(None, "start", None, None, self.start_timeout)
        except BaseException:
            self._teardown()
            raise
        log.info("%r started in %.1f s", self, time.perf_counter() - started)

    def interrupt(self) -> None:
        """Ask the running job to stop after its current step or tile (no-op when idle)."""
        job = self._job
        if job is None:
            return
        self._interrupted = job  # a streamed decode yields nothing more, even chunks already here
        for worker in self._workers:
            try:
                self._send(worker, ("interrupt", job))
            except OSError:
                pass  # a dead worker is reported by the job itself

    def shutdown(self) -> None:
        """Stop every worker (a later job starts fresh ones)."""
        if not self._workers:
            return
        for worker in self._workers:
            try:
                self._send(worker, ("shutdown",))
            except OSError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self._workers:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._teardown()
        log.info("%r shut down", self)

    # --- internals ---------------------------------------------------------------------------
    def _spawn(self) -> None:
        self._folder = shared_folder()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(self.world_size)
        port = self._listener.getsockname()[1]
        self._store = dist.TCPStore("127.0.0.1", port, self.world_size + 1, is_master=True,
                                    timeout=timedelta(seconds=self.start_timeout), wait_for_workers=False,
                                    master_listen_fd=self._listener.fileno())
        self._listener.detach()  # the store owns the listening socket now and closes it when it goes
        env = _worker_environment(self.threads)
        for rank, device_id in enumerate(self.device_ids):
            parent_end, child_end = Pipe()
            process = subprocess.Popen([sys.executable, "-m", "pixelwizard_core.distributed.worker",
                                        str(child_end.fileno())], pass_fds=(child_end.fileno(),), env=env,
                                       stdin=subprocess.DEVNULL)
            child_end.close()
            worker = _Worker(rank, process, parent_end)
            self._workers.append(worker)
            self._send(worker, {
                "rank": rank, "world_size": self.world_size, "backend": self.backend, "port": port,
                "device": "cpu" if self.backend == "gloo" else f"cuda:{device_id}",
                "parallel": {"ulysses": self.parallel.ulysses, "dit_fsdp": self.parallel.dit_fsdp,
                             "t5_fsdp": self.parallel.t5_fsdp},
                "threads": self.threads, "folder": str(self._folder), "start_timeout": self.start_timeout,
                "collective_timeout": max(self.start_timeout, self.timeout or 0.0, 1800.0),
                "log_level": logging.getLogger("pixelwizard").getEffectiveLevel(),
            })

    def _send(self, worker: _Worker, message: object) -> None:
        with self._send_lock:
            send(worker.conn, message, self._folder)

    @contextlib.contextmanager
    def _exclusive(self, streaming: bool = False) -> Iterator[None]:
        """The job lock (one job at a time). A thread whose own streamed decode is still open would wait
        for itself forever: it is told instead."""
        if self._streaming == threading.get_ident():
            raise ConfigError("this thread still has a streamed decode of this worker pool open; finish it or "
                              "close it (leave its for loop) before starting another job on the pool")
        with self._job_lock:
            if streaming:
                self._streaming = threading.get_ident()
            try:
                yield
            finally:
                if streaming:
                    self._streaming = None

    def _open(self, name: str, kwargs: dict) -> int:
        """Start the workers if needed and send them job ``name``; its id (also in ``self._job``)."""
        self.start()
        job = self._job = next(self._job_ids)
        for worker in self._workers:
            try:
                self._send(worker, ("job", job, name, kwargs))
            except OSError:  # it died since start() looked
                self._fail(worker, name, self._exit_description(worker))
        return job

    def _run(self, name: str, kwargs: dict, **control) -> list:
        """Send one job to every worker; the results in rank order."""
        with self._exclusive():
            return self._run_held(name, kwargs, **control)

    def _run_held(self, name: str, kwargs: dict, *, on_step: Progress | None = None,
                  should_stop: StopCheck | None = None, timeout: float | None = None) -> list:
        """:meth:`_run` for a caller that holds the job lock already."""
        started = time.perf_counter()
        try:
            job = self._open(name, kwargs)
            results, infos = self._collect(job, name, on_step, should_stop, timeout or self.timeout)
        finally:
            self._job = None
        self.last_report = JobReport(name, time.perf_counter() - started, infos)
        return results

    def _resolve(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings, control: dict
                 ) -> DecodeSettings:
        """``settings`` resolved once here, so every worker decodes the same plan: when memory matters
        (:func:`.tiles.needs_budget`), each worker reports its usable memory beyond the VAE weights (a
        small job; None off CUDA) and the smallest is the budget. Needs the job lock."""
        free = None
        if needs_budget(settings):
            budgets = self._run_held("decode_budget", {"handle": handle}, **control)
            free = None if any(b is None for b in budgets) else min(budgets)
        return resolve_settings(latent, settings, world_size=self.world_size, free_bytes=free,
                                vae_precision=handle.precision)

    def _whole_video(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings, control: dict
                     ) -> torch.Tensor:
        """Every worker decodes its tiles whole (resolved ``settings``); the video blended here."""
        plan = plan_for_latent(latent, settings)
        results = self._run_held("decode_tiles", {"handle": handle, "latent": latent, "settings": settings}, **control)
        return blend_tiles(plan, {index: piece for part in results for index, piece in part.items()})

    def _decode_chunks(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings, *,
                       on_step: Progress | None = None, should_stop: StopCheck | None = None,
                       timeout: float | None = None) -> Iterator[torch.Tensor]:
        """The generator of :meth:`decode_stream`: the job runs while it is iterated."""
        name = "decode_stream"
        received: dict[int, dict[int, torch.Tensor]] = {}  # latent frame -> tile index -> weighted piece

        def keep(frame: int, pieces: dict[int, torch.Tensor]) -> None:
            received.setdefault(frame, {}).update(pieces)

        control = {"on_step": on_step, "should_stop": should_stop, "timeout": timeout}
        with self._exclusive(streaming=True):
            settings = self._resolve(handle, latent, settings, control)
            if settings.order == "tile":  # no frame-order share fits a worker: whole tiles, cut into chunks
                video = self._whole_video(handle, latent, settings, control)
                yield from video.split([1] + [4] * (latent.shape[2] - 1), dim=2)
                return
            plan = plan_for_latent(latent, settings)
            tiles = len(plan.tiles)
            started, replies = time.perf_counter(), None
            try:
                job = self._open(name, {"handle": handle, "latent": latent, "settings": settings})
                replies = _Replies(self, job, name, on_step, should_stop, timeout or self.timeout, on_part=keep)
                self._allow(job, STREAM_AHEAD)
                for frame in range(latent.shape[2]):
                    replies.wait_for(lambda: len(received.get(frame, ())) == tiles, f"latent frame {frame}")
                    chunk = blend_tiles(plan, received.pop(frame))
                    self._allow(job, frame + 1 + STREAM_AHEAD)
                    replies.hold()
                    yield chunk
                    replies.resume()
                    del chunk
                _, infos = replies.finish()
                self.last_report = JobReport(name, time.perf_counter() - started, infos)
            finally:
                if replies is not None and replies.pending:  # the consumer stopped early (or this thread was hit)
                    self._abandon(replies)
                self._job = None

    def _allow(self, job: int, limit: int) -> None:
        """Let the workers send the parts of ``job`` below ``limit`` (a dead worker is reported by polling)."""
        for worker in self._workers:
            try:
                self._send(worker, ("credit", job, limit))
            except OSError:
                pass

    def _abandon(self, replies: _Replies) -> None:
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

    def _collect(self, job: int | None, name: str, on_step: Progress | None, should_stop: StopCheck | None,
                 timeout: float | None) -> tuple[list, list]:
        """Every worker's reply to ``job`` (None: the start-up 'ready'): see :class:`_Replies`."""
        return _Replies(self, job, name, on_step, should_stop, timeout).finish()

    def _call_host(self, callback: Callable[[], object], honour_result: bool) -> BaseException | bool | None:
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

    def _dead_worker(self) -> _Worker | None:
        return next((w for w in self._workers if w.process.poll() is not None), None)

    def _fail(self, worker: _Worker, name: str, reason: str, worker_traceback: str = "") -> None:
        pid = worker.process.pid
        self._teardown()
        raise WorkerError(f"worker {worker.rank} (pid {pid}) failed during {name}: {reason}. The worker pool was "
                          "shut down; the next job starts fresh workers", worker_traceback)

    def _exit_description(self, worker: _Worker) -> str:
        try:
            code = worker.process.wait(2.0)
        except subprocess.TimeoutExpired:
            return "it closed its connection"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the kernel's out-of-memory killer sends it when host memory runs out)" if code == -9 else ""
            return f"it was killed by {name}{hint}"
        return f"it exited with code {code}"

    def _teardown(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL), reap it, and free the rendezvous and the files."""
        workers, self._workers = self._workers, []
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in workers:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.conn.close()
        self._store = self._listener = None  # closes the rendezvous' listening socket
        if self._folder is not None:
            discard_files(self._folder)
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class _Replies:
    """The workers' replies to one job (``job`` None: the start-up 'ready'), read as they arrive while
    watching for deaths, the time limit and stop requests. An exception raised by ``on_step`` or
    ``should_stop`` (a host's own way to cancel) interrupts the job; :meth:`finish` raises it once every
    worker has stopped. A streamed job's parts go to ``on_part(index, part)`` as they arrive."""

    def __init__(self, pool: WorkerPool, job: int | None, name: str, on_step: Progress | None,
                 should_stop: StopCheck | None, timeout: float | None,
                 on_part: Callable[[int, object], None] | None = None) -> None:
        self.pool, self.job, self.name, self.timeout = pool, job, name, timeout
        self.on_step, self.should_stop, self.on_part = on_step, should_stop, on_part
        self.results, self.infos = [None] * pool.world_size, [{}] * pool.world_size
        self.progress: dict[int, tuple] = {}
        self.pending = {w.conn: w for w in pool._workers}
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
            if self.raised is not None or self.pool._interrupted == self.job:
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
            self.raised = self.pool._call_host(self.should_stop, honour_result=True)

    def _poll(self) -> None:
        pool = self.pool
        self._ask_host()
        for conn in wait(list(self.pending), timeout=POLL_S):
            worker = self.pending[conn]
            try:
                message = receive(conn)
            except (EOFError, OSError):
                pool._fail(worker, self.name, pool._exit_description(worker))
            self._handle(worker, message)
        for worker in list(self.pending.values()):
            if worker.process.poll() is not None:
                pool._fail(worker, self.name, pool._exit_description(worker))
        if self.deadline is not None and time.monotonic() > self.deadline:
            pool._teardown()
            raise JobTimeout(f"{self.name} did not finish within {self.timeout:g} s; the worker pool was shut down "
                             "(the next job starts fresh workers); allow more time or use more GPUs")

    def _handle(self, worker: _Worker, message: tuple) -> None:
        kind, pool = message[0], self.pool
        if kind == "progress" and message[1] == self.job:
            self.progress[message[2]] = message[3:]
            if self.on_step is not None and self.raised is None:
                done, total = (sum(v[i] for v in self.progress.values()) for i in (0, 1))
                on_step = self.on_step
                self.raised = pool._call_host(lambda: on_step(done, total), honour_result=False)
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
            log.error("worker %d traceback:\n%s", worker.rank, message[4])
            dead = pool._dead_worker()
            if dead is not None:  # the root cause: the others only lost their peer
                pool._fail(dead, self.name, f"{pool._exit_description(dead)} (then worker {worker.rank}: "
                                            f"{message[3]})")
            pool._fail(worker, self.name, message[3], message[4])


def as_handle(model: ModelHandle | str | Path, role: str) -> ModelHandle:
    """A handle for ``role`` (paths get the defaults: bf16, the VAE in fp32), checked before any job."""
    if isinstance(model, ModelHandle):
        if model.role != role:
            raise ConfigError(f"a {model.role!r} model ({model.path}) was given where the {role!r} model is needed")
        return model
    return ModelHandle.for_file(role, model, **({"precision": "fp32"} if role == "vae" else {}))


def _device_ids(devices: int | Sequence[int], backend: str) -> list[int]:
    if isinstance(devices, bool) or not isinstance(devices, (int, Sequence)) or isinstance(devices, str):
        raise ConfigError(f"devices must be a number of workers or a list of GPU indices, got {devices!r}")
    ids = list(range(devices)) if isinstance(devices, int) else [int(d) for d in devices]
    if not ids:
        raise ConfigError(f"devices must name at least one worker, got {devices!r}")
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise ConfigError(f"GPU indices must be distinct and non-negative, got {ids}")
    if backend == "nccl" and max(ids) >= torch.cuda.device_count():
        raise ConfigError(f"GPU indices {ids} asked for, but {torch.cuda.device_count()} CUDA device(s) are visible")
    return ids


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((n for n in ("lo", "lo0") if n in names), None)


def _worker_environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    loopback = _loopback_interface()
    if loopback:  # collectives connect over loopback only
        env["GLOO_SOCKET_IFNAME"] = loopback
        env["NCCL_SOCKET_IFNAME"] = loopback
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a pool inside a torchrun job must not pick up the outer job's rendezvous
    return env


# --- shared pools ------------------------------------------------------------------------------

_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_shared: dict[str, WorkerPool] = {}
_shared_lock = threading.Lock()


def acquire(devices: int | Sequence[int] = 2, **options) -> WorkerPool:
    """The process-wide pool with this configuration: the running one when it matches, else a new one
    (a running pool of another configuration is shut down first, as both would hold the same GPUs)."""
    wanted = WorkerPool(devices, **options)
    with _shared_lock:
        current = _shared.get("pool")
        if current is not None and current.config == wanted.config:
            current.timeout = wanted.timeout
            return current
        if current is not None:
            current.shutdown()
        _shared["pool"] = wanted
        return wanted


@dataclass(frozen=True)
class PoolSpec:
    """A pool's configuration, checked when made, that starts nothing: what a ComfyUI socket carries.
    :meth:`acquire` gives the process-wide pool of this configuration when a job needs it."""

    devices: int | tuple[int, ...] = 2
    ulysses: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    backend: str = "auto"
    timeout: float | None = None

    def __post_init__(self) -> None:
        backend = resolve_backend(self.backend)
        ParallelConfig(self.ulysses, self.dit_fsdp, self.t5_fsdp).check(len(_device_ids(self.devices, backend)))

    def acquire(self) -> WorkerPool:
        return acquire(self.devices, ulysses=self.ulysses, dit_fsdp=self.dit_fsdp, t5_fsdp=self.t5_fsdp,
                       backend=self.backend, timeout=self.timeout)


def parse_devices(text: str) -> int | tuple[int, ...]:
    """"2" -> two workers (GPUs 0 and 1); "0,2,3" -> those GPU indices; refused with what to type."""
    text = text.strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return count
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"devices {text!r}: type a number of GPUs (e.g. 2) or a list of GPU indices "
                          "(e.g. 0,1,3)") from None


def shutdown_all() -> None:
    """Stop the workers of every pool of this process."""
    for pool in list(_POOLS):
        try:
            pool.shutdown()
        except Exception as error:  # at exit, keep going
            log.warning("could not shut down %r: %s", pool, error)


atexit.register(shutdown_all)
