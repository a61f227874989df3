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
NCCL (where torch has it: Linux CUDA builds) or N CPU processes with gloo. They stay alive between jobs
with their models resident, cached by file identity, so the second prompt loads nothing. Models are given
as :class:`~pixelwizard_core.pipeline.handles.ModelHandle` or as paths.

How the parent reaches its workers depends on the platform (:mod:`.pool_channel`). On Linux and macOS
(transport ``pipe``) each worker inherits one end of a private socket pair, and the workers rendezvous
through a TCP store the parent serves on 127.0.0.1 at a port the system picks (the listening socket is
bound before the store takes it, so there is no race and nothing listens on another address). On Windows
(transport ``portable``) each worker connects back to a listener on 127.0.0.1 that authenticates it with a
random key made for that start (passed in the worker's environment, never its command line), and the
rendezvous is a file store in the pool's private folder. Set ``PIXELWIZARD_POOL_TRANSPORT=portable`` to use
the portable transport anywhere (``pipe`` forces the POSIX one; unset or ``auto`` picks by platform). gloo
and NCCL are pinned to the loopback interface where it is named ``lo`` / ``lo0``.

Results come back as CPU tensors (large ones through files in /dev/shm, or the temporary folder where there
is none, see :mod:`.transport`). The code is split by concern: :mod:`.pool_processes` (starting, watching and
stopping the workers), :mod:`.pool_rpc` (jobs, replies, interrupts) and :mod:`.pool_stream` (assembling a
streamed decode's chunks).

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
  after the current step or tile; the call raises :class:`JobInterrupted` and the pool stays usable. A
  worker that has not stopped ``pool_rpc.SETTLE_S`` (5 s) later is taken as hung (a collective whose peer
  is gone never returns): every worker is killed, the call raises at once (Cancel never waits for a
  collective's 30-minute timeout), a warning says so, and the next call starts fresh workers.
* A job that raises on a worker (a bad file, a wrong input) fails the call with :class:`JobFailed`, which
  carries the worker's own message; when every worker ends the job and the process group is still in step
  (one tiny all-reduce), the workers stay, their models loaded.
* A worker that dies (killed, out of memory) or is left out of step fails the running call within about a
  second with a :class:`WorkerError`; the pool is then torn down (every worker stopped, nothing left
  holding GPU memory) and the next call starts fresh workers. A call that exceeds its timeout fails the
  same way (:class:`JobTimeout`).
* Each start removes the tensor folders of pools whose process is gone (killed with its workers, e.g. a
  host's process group that got SIGTERM), see :func:`.transport.reclaim_stale_folders`.
* ``shutdown()`` stops every worker; pools still running at interpreter exit are shut down by ``atexit``,
  and a worker whose parent disappears exits by itself.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..pipeline.anchors import Anchor
from ..pipeline.handles import ModelHandle
from ..pipeline.presets import StageSettings, check_stage
from ..pipeline.engine import DecodeSettings
from ..pipeline.first_frame import FirstFrame
from ..pipeline.stages import check_anchor_fits
from ..pipeline.text import TextConditioning
from .pool_channel import resolve_pool_backend
from .pool_processes import JobFailed, JobTimeout, LaunchConfig, Processes, WorkerError
from .pool_rpc import Progress, Replies, Rpc, StopCheck
from .pool_stream import STREAM_AHEAD as STREAM_AHEAD  # re-exported: callers read it from this module
from .pool_stream import FrameAssembler, chunk_frames, stream_chunks
from .session import JobInterrupted, ParallelConfig, check_model_degree
from .tiles import blend_tiles, needs_budget, plan_for_latent, resolve_settings

log = logging.getLogger("pixelwizard")

__all__ = ["WorkerPool", "PoolSpec", "WorkerError", "JobFailed", "JobTimeout", "JobInterrupted", "acquire",
           "shutdown_all", "parse_devices"]


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


class WorkerPool:
    """N worker processes that run the pipeline's stages together; see the module docstring.

    Args:
        devices: a number of workers (GPUs 0..N-1 with NCCL, or N CPU processes with gloo) or a list of
            GPU indices (with gloo: that many CPU processes).
        ulysses: sequence-parallel degree: 1, or the number of workers (must divide the heads: 24).
        dit_fsdp / t5_fsdp: shard the DiTs / the text encoder over the workers (FSDP2, one unit per block).
        backend: "auto" (NCCL where torch has it and CUDA is available, else gloo), "nccl" or "gloo" (CPU
            workers).
        threads: torch threads per worker (default: the machine's cores divided among the workers).
        timeout: default time limit of one call in seconds (None: no limit).
        start_timeout: how long the workers may take to start and join the process group.
    """

    def __init__(self, devices: int | Sequence[int] = 2, *, ulysses: int = 1, dit_fsdp: bool = False,
                 t5_fsdp: bool = False, backend: str = "auto", threads: int | None = None,
                 timeout: float | None = None, start_timeout: float = 300.0) -> None:
        self.backend = resolve_pool_backend(backend)
        self.device_ids = _device_ids(devices, self.backend)
        self.world_size = len(self.device_ids)
        self.parallel = ParallelConfig(ulysses, dit_fsdp, t5_fsdp)
        self.parallel.check(self.world_size)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.world_size)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.last_report: JobReport | None = None
        self._processes = Processes()
        self._rpc = Rpc(self._processes)
        self._job_lock = threading.Lock()  # one job at a time
        self._streaming: int | None = None  # the thread whose streamed decode holds the job lock
        _POOLS.add(self)

    # --- state -------------------------------------------------------------------------------
    @property
    def config(self) -> tuple:
        """What makes two pools interchangeable (see :func:`acquire`)."""
        return (tuple(self.device_ids), self.backend, self.parallel, self.threads)

    @property
    def alive(self) -> bool:
        return self._processes.alive

    @property
    def pids(self) -> list[int]:
        return self._processes.pids

    @property
    def _folder(self) -> Path | None:
        """The running workers' tensor folder (tests count the files in flight)."""
        return self._processes.folder

    @property
    def _store(self) -> object | None:
        """The rendezvous TCPStore served here (None when stopped, or with the portable transport)."""
        return self._processes.store

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
                  seed: int, first_frame: FirstFrame | None = None, **control) -> Anchor:
        """The LR anchor, sampled by all workers together (Ulysses and/or FSDP); ``first_frame``: a start
        image's latent kept as its first frame."""
        handle = as_handle(model, "lr")
        check_stage(settings, hr=False)
        if first_frame is not None:
            first_frame.check(settings.latent_shape)
        check_model_degree(handle.path, "lr", self.parallel.ulysses)
        job = {"handle": handle, "text": text, "settings": settings, "seed": seed, "first_frame": first_frame}
        return self._run("lr_anchor", job, **control)[0]

    def hr_latent(self, model: ModelHandle | str | Path, anchor: Anchor | torch.Tensor, text: TextConditioning,
                  settings: StageSettings, seed: int, first_frame: FirstFrame | None = None,
                  **control) -> torch.Tensor:
        """The HR latent [1, 48, T, H/16, W/16] float32 (CPU), sampled by all workers together;
        ``first_frame``: a start image at the HR size pinned as its first frame."""
        handle = as_handle(model, "hr")
        latent = anchor.latent if isinstance(anchor, Anchor) else anchor
        check_stage(settings, hr=True)
        check_anchor_fits(latent, settings)
        if first_frame is not None:
            first_frame.check(settings.latent_shape)
        check_model_degree(handle.path, "hr", self.parallel.ulysses)
        job = {"handle": handle, "anchor_latent": latent, "text": text, "settings": settings, "seed": seed,
               "first_frame": first_frame}
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
        if self._processes.workers:
            log.warning("a worker of %r had exited while idle; starting fresh workers", self)
            self._processes.teardown()
        started = time.perf_counter()
        try:
            self._processes.spawn(self._launch_config())
            self._collect(None, "start", None, None, self.start_timeout)
        except BaseException:
            self._processes.teardown()
            raise
        log.info("%r started in %.1f s", self, time.perf_counter() - started)

    def interrupt(self) -> None:
        """Ask the running job to stop after its current step or tile (no-op when idle)."""
        self._rpc.interrupt()

    def shutdown(self) -> None:
        """Stop every worker (a later job starts fresh ones)."""
        if not self._processes.workers:
            return
        self._processes.shutdown()
        log.info("%r shut down", self)

    # --- internals ---------------------------------------------------------------------------
    def _launch_config(self) -> LaunchConfig:
        return LaunchConfig(tuple(self.device_ids), self.backend, self.parallel, self.threads, self.start_timeout,
                            collective_timeout=max(self.start_timeout, self.timeout or 0.0, 1800.0))

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
        """Start the workers if needed and send them job ``name``; its id."""
        self.start()
        return self._rpc.open(name, kwargs)

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
            self._rpc.job = None
        self.last_report = JobReport(name, time.perf_counter() - started, infos)
        return results

    def _collect(self, job: int | None, name: str, on_step: Progress | None, should_stop: StopCheck | None,
                 timeout: float | None) -> tuple[list, list]:
        """Every worker's reply to ``job`` (None: the start-up 'ready'): see :class:`.pool_rpc.Replies`."""
        return Replies(self._rpc, job, name, on_step, should_stop, timeout).finish()

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
        control = {"on_step": on_step, "should_stop": should_stop, "timeout": timeout}
        with self._exclusive(streaming=True):
            settings = self._resolve(handle, latent, settings, control)
            if settings.order == "tile":  # no frame-order share fits a worker: whole tiles, cut into chunks
                video = self._whole_video(handle, latent, settings, control)
                yield from video.split(chunk_frames(latent.shape[2]), dim=2)
                return
            assembler = FrameAssembler(plan_for_latent(latent, settings))
            started, replies = time.perf_counter(), None
            try:
                job = self._open(name, {"handle": handle, "latent": latent, "settings": settings})
                replies = Replies(self._rpc, job, name, on_step, should_stop, timeout or self.timeout,
                                  on_part=assembler.keep)
                infos = yield from stream_chunks(self._rpc, replies, assembler, job, latent.shape[2])
                self.last_report = JobReport(name, time.perf_counter() - started, infos)
            finally:
                if replies is not None and replies.pending:  # the consumer stopped early (or this thread was hit)
                    self._rpc.abandon(replies)
                self._rpc.job = None


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
        backend = resolve_pool_backend(self.backend)
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


def running_pools() -> list[WorkerPool]:
    """The pools of this process whose workers are running."""
    return [pool for pool in list(_POOLS) if pool.alive]


def shutdown_all() -> None:
    """Stop the workers of every pool of this process."""
    for pool in list(_POOLS):
        try:
            pool.shutdown()
        except Exception as error:  # at exit, keep going
            log.warning("could not shut down %r: %s", pool, error)


atexit.register(shutdown_all)
