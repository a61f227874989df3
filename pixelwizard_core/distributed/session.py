"""One rank of a multi-process run: its process group, its resident models and the jobs it runs.

The same class serves the worker pool (a worker process per rank, jobs sent by the parent) and
``torchrun ... generate`` (every rank runs the command): both call the job methods below, so they run
the same code. Every rank calls every job; ranks that have nothing to do for a job return at once.

- Sequence parallel (``ulysses`` > 1, equal to the world size): the DiT forwards split their tokens over
  all ranks (``UlyssesGroup``); every rank ends each step with the whole latent.
- With a ``group`` (``torchrun`` with several groups of ranks, :mod:`.groups`) "all ranks" and "rank 0"
  mean the group's: its Ulysses all-to-all, FSDP mesh and CPU collectives use the group's process groups.
- FSDP (``dit_fsdp`` / ``t5_fsdp``): the DiTs / the text encoder are sharded over all ranks, one unit per
  block (:mod:`.fsdp`); every rank then runs every forward of that model.
- Without ``t5_fsdp`` only rank 0 loads and runs the text encoder.
- Decode: rank r decodes tiles r, r + N, ... (:mod:`.tiles`), whole (``decode_tiles``) or in lockstep,
  latent frame by latent frame (``decode_stream``, which the pool's worker sends on as it goes, and
  ``torchrun`` moves to rank 0 frame by frame with ``gather_stream``). Automatic tiles and the order are
  resolved once before, from the smallest rank's usable memory (``decode_budget``; ``resolve_decode``
  for torchrun, the pool's parent from every worker's ``decode_budget``).

Models stay resident between jobs in the model store (:mod:`~pixelwizard_core.pipeline.store`), keyed
by file identity and load options, so a second job with the same files loads nothing; a different file or
other load options (precision, compile) for a role replace that role's model.
Interrupts are agreed on by all ranks after every step (one tiny all-reduce), so no rank is left waiting
in a collective for a rank that stopped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError, PixelWizardError
from ..loading import load_t5_tokenizer
from ..loading.folders import resolve
from ..registry import Registry
from ..models.parallel import check_degree
from ..pipeline.anchors import Anchor
from ..system import peak_rss_bytes
from ..pipeline.memory import free_device_bytes
from ..pipeline.first_frame import FirstFrame
from ..pipeline.handles import PRECISIONS, ModelHandle
from ..pipeline.handles import load as load_handle
from ..pipeline.placement import module_of
from ..pipeline.store import ModelStore
from ..pipeline.presets import StageSettings
from ..pipeline.engine import DecodeSettings
from ..pipeline.stages import hr_latent, lr_anchor
from ..pipeline.text import TextConditioning, TextEncoder
from ..pipeline.tiled_decode import BlendPlan
from .groups import RankGroup
from .tiles import decode_tiles, decode_tiles_stream, needs_budget, plan_for_latent, resolve_settings, tiles_of_rank
from .ulysses import UlyssesGroup

log = logging.getLogger("pixelwizard")

COMPONENTS = {"text": "t5", "lr": "dit", "hr": "hr_dit", "vae": "vae"}
# Process-group backends: the pool, the Multi-GPU node and the CLI list these
BACKENDS: Registry[str] = Registry("backend")
BACKENDS.register("auto", "NCCL where torch has it and CUDA exists, else gloo")
BACKENDS.register("nccl", "GPUs on Linux")
BACKENDS.register("gloo", "CPU processes, and every platform")
Progress = Callable[[int, int], None]


class JobInterrupted(PixelWizardError):
    """A job was stopped on request (Cancel); the workers are still usable."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the work of one model call is split over the ranks."""

    ulysses: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    def check(self, world_size: int) -> None:
        """The Ulysses degree must be 1 or the number of ranks (there is no data-parallel split)."""
        if isinstance(self.ulysses, bool) or not isinstance(self.ulysses, int) or self.ulysses < 1:
            raise ConfigError(f"ulysses degree must be a positive integer, got {self.ulysses!r}")
        if self.ulysses not in (1, world_size):
            raise ConfigError(
                f"ulysses degree {self.ulysses} with {world_size} processes/GPUs: the sequence is split over every "
                f"rank, so use ulysses {world_size} (or 1 for FSDP and split decoding only)")


def check_model_degree(path: str | Path, role: str, ulysses: int) -> None:
    """Refuse a Ulysses degree that does not divide the model's heads, from the file header alone."""
    if ulysses <= 1:
        return
    from ..loading import inspect_weights

    info = inspect_weights(resolve(path, COMPONENTS[role]), component=COMPONENTS[role])
    heads = info.config.get("num_heads")
    if heads:
        check_degree(int(heads), ulysses)


def init_process_group(backend: str, *, rank: int, world_size: int, store: dist.Store | None = None,
                       device: torch.device | None = None, timeout_s: float = 1800.0) -> None:
    """The default process group (env:// rendezvous when ``store`` is None, as torchrun sets up)."""
    kwargs = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": timedelta(seconds=timeout_s)}
    if store is not None:
        kwargs["store"] = store
    if device is not None and device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


class Session:
    """One rank: its models (cached by file identity) and the pipeline jobs. Needs an initialised
    default process group when the world has more than one rank."""

    def __init__(self, config: ParallelConfig = ParallelConfig(), *, device: torch.device | str = "cpu",
                 t5_cpu: bool = False, group: RankGroup | None = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        # rank and world size are the group's: every job below runs inside it (None: the whole world)
        self.group = group
        self.rank = group.rank if group else dist.get_rank() if distributed else 0
        self.world_size = len(group.ranks) if group else dist.get_world_size() if distributed else 1
        self.ranks = group.ranks if group else list(range(self.world_size))  # global rank of each group rank
        config.check(self.world_size)
        if config.t5_fsdp and t5_cpu:
            raise ConfigError("t5_fsdp shards the text encoder over the GPUs; it cannot also run on the CPU (t5_cpu)")
        self.config = config
        self.device = torch.device(device)
        self.t5_cpu = t5_cpu
        self.sp = UlyssesGroup(group.group if group else None) if config.ulysses > 1 else None
        self.mesh = self._mesh() if self.world_size > 1 and (config.dit_fsdp or config.t5_fsdp) else None
        # CPU collectives (interrupt agreement, tile gathering) need gloo whatever the main backend is
        self.cpu_group = None
        if group is not None:
            self.cpu_group = group.cpu_group
        elif self.world_size > 1:
            self.cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.should_stop: Callable[[], bool] = lambda: False
        self.progress: Progress | None = None
        self.store = ModelStore(one_per_role=True)  # a worker holds one model per role

    def _mesh(self):
        """FSDP's mesh: over the group's ranks, or (no group) over the world."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if self.group is not None:
            return DeviceMesh.from_group(self.group.group, self.device.type)
        return init_device_mesh(self.device.type, (self.world_size,))

    @property
    def is_main(self) -> bool:
        """Rank 0 of the group (of the world without groups): the rank that writes the outputs."""
        return self.rank == 0

    def _sharded(self, role: str) -> bool:
        if self.mesh is None:
            return False
        return self.config.t5_fsdp if role == "text" else self.config.dit_fsdp if role in ("lr", "hr") else False

    # --- models ------------------------------------------------------------------------------
    def _home(self, handle: ModelHandle) -> torch.device:
        if handle.role == "text" and self.t5_cpu:
            return torch.device("cpu")
        return self.device if self._sharded(handle.role) else handle.home(self.device)

    def _work_device(self, role: str) -> torch.device:
        return torch.device("cpu") if role == "text" and self.t5_cpu else self.device

    @property
    def loaded(self) -> list[str]:
        """Roles loaded since the last :meth:`reset_job`."""
        return self.store.loaded_roles

    def model(self, handle: ModelHandle) -> object:
        """The model of ``handle`` from the store: loaded on first use, kept while its file and load options
        (precision, compile, sharding) are unchanged; another file or options for a role replace it."""
        return self.store.get(handle, self._home(handle), sharded=self._sharded(handle.role), loader=self._load)

    def _load(self, handle: ModelHandle, home: torch.device) -> object:
        if not self._sharded(handle.role):
            return load_handle(handle, home)
        from .fsdp import load_sharded  # torch's FSDP costs almost a second to import: only when used

        dtype = PRECISIONS[handle.precision]
        if handle.role == "text":
            encoder = load_sharded(handle.path, "t5", self.mesh, dtype=dtype, device=self.device)
            return TextEncoder(encoder, load_t5_tokenizer(handle.path))
        if handle.compile and self.is_main:
            log.warning("%s: torch.compile is not applied to FSDP-sharded DiTs (their blocks gather their weights "
                        "from every GPU as they run); this model runs eagerly", handle.role)
        return load_sharded(handle.path, COMPONENTS[handle.role], self.mesh, dtype=dtype, device=self.device)

    def release(self, role: str | None = None) -> None:
        """Drop one resident model (or all of them) and free its memory."""
        self.store.release(role)

    @contextlib.contextmanager
    def _placed(self, handle: ModelHandle) -> Iterator[object]:
        """The model on its working device for the block; offloaded models go back to the CPU after,
        block-swapped DiTs stream their last blocks meanwhile (not when sharded: FSDP already splits
        the weights over the ranks, as it overrides offloading)."""
        sharded = self._sharded(handle.role)
        model = self.model(handle)
        swap = 0 if sharded else handle.swap_for(model)
        with self.store.use(handle, self._work_device(handle.role), home=self._home(handle), swap_blocks=swap,
                            sharded=sharded, loader=self._load) as placed:
            yield placed

    # --- control -----------------------------------------------------------------------------
    def reset_job(self) -> None:
        self.store.loaded_roles = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _stop_requested(self, agree: bool) -> bool:
        """This rank's stop flag, or (``agree``) whether any rank's is set: then all stop at the same step."""
        flag = bool(self.should_stop())
        if agree and self.world_size > 1:
            value = torch.tensor([int(flag)], dtype=torch.int32)
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.cpu_group)
            flag = bool(value.item())
        return flag

    def check_stop(self, what: str, agree: bool) -> None:
        if self._stop_requested(agree):
            raise JobInterrupted(f"{what}: interrupted")

    def _callback(self, what: str, *, agree: bool, report: bool) -> Progress:
        def on_step(done: int, total: int) -> None:
            if report and self.progress is not None:
                self.progress(done, total)
            if self._stop_requested(agree):
                raise JobInterrupted(f"{what} interrupted after step {done} of {total}")

        return on_step

    def memory(self) -> dict[str, float]:
        """Peak memory of this process: host resident set (MiB) and, on CUDA, allocated device memory."""
        info = {"peak_rss_mib": peak_rss_bytes() / 2**20}
        if self.device.type == "cuda":
            info["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return info

    # --- jobs --------------------------------------------------------------------------------
    def encode_text(self, handle: ModelHandle, prompt: str, negative_prompt: str | None = None
                    ) -> TextConditioning | None:
        """Both CFG branches' context (CPU), on rank 0 (every rank with ``t5_fsdp``); None elsewhere."""
        sharded = self._sharded("text")
        if not (sharded or self.is_main):
            return None
        self.check_stop("text encoding", agree=sharded)
        with self._placed(_role(handle, "text")) as encoder:
            return encoder.conditioning(prompt, negative_prompt).to("cpu")

    def lr_anchor(self, handle: ModelHandle, text: TextConditioning, settings: StageSettings, seed: int,
                  first_frame: FirstFrame | None = None) -> Anchor:
        """The LR anchor, sampled by every rank together (the same result on each); ``first_frame``: a
        start image's latent kept as its first frame."""
        self.check_stop("LR anchor", agree=True)
        with self._placed(_role(handle, "lr")) as dit:
            return lr_anchor(dit, text, settings, seed, model_id=handle.identity, sp=self.sp, first_frame=first_frame,
                             on_step=self._callback("LR anchor", agree=True, report=self.is_main))

    def hr_latent(self, handle: ModelHandle, anchor_latent: torch.Tensor, text: TextConditioning,
                  settings: StageSettings, seed: int, first_frame: FirstFrame | None = None) -> torch.Tensor:
        """The HR latent [1, 48, T, H/16, W/16] (CPU), sampled by every rank together."""
        self.check_stop("HR stage", agree=True)
        with self._placed(_role(handle, "hr")) as model:
            return hr_latent(model, anchor_latent, text, settings, seed, sp=self.sp, first_frame=first_frame,
                             on_step=self._callback("HR stage", agree=True, report=self.is_main))

    def decode_budget(self, handle: ModelHandle) -> int | None:
        """Memory this rank's decode may use beyond the VAE weights: ``decode_budget.free_device_bytes`` of its
        GPU less the VAE's weights not on it yet (loading the VAE, as the decode would); None off CUDA."""
        if self.device.type != "cuda":
            return None
        vae = module_of(self.model(_role(handle, "vae")))
        free = free_device_bytes(self.device)
        if free is None:
            return None
        away = sum(t.numel() * t.element_size() for t in (*vae.parameters(), *vae.buffers()) if t.device != self.device)
        return max(0, free - away)

    def smallest_decode_budget(self, handle: ModelHandle) -> int | None:
        """:meth:`decode_budget` of the rank that has least (None when any rank has none), on every rank: one
        all-reduce MIN of (budget or -1, -failed), so a rank that failed to measure stops the others too."""
        mine, failure = None, None
        try:
            mine = self.decode_budget(handle)
        except Exception as error:  # every rank must reach the all-reduce
            failure = error
        if self.world_size > 1:
            value = torch.tensor([-1 if mine is None else mine, -int(failure is not None)], dtype=torch.int64)
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.cpu_group)
            if failure is None and value[1].item() < 0:
                raise JobInterrupted("decode stopped before it started: another rank failed to load the VAE or "
                                     "read its free memory (see its log)")
            mine = None if value[0].item() < 0 else int(value[0].item())
        if failure is not None:
            raise failure
        return mine

    def resolve_decode(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings) -> DecodeSettings:
        """``settings`` resolved for this world (:func:`.tiles.resolve_settings`) within the smallest rank's
        usable memory and ``settings.budget_bytes``: the same on every rank. Collective (torchrun): every
        rank calls it with the same arguments."""
        free = self.smallest_decode_budget(handle) if needs_budget(settings) else None
        return resolve_settings(latent, settings, world_size=self.world_size, free_bytes=free,
                                vae_precision=handle.precision)

    def decode_tiles(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings
                     ) -> dict[int, torch.Tensor]:
        """This rank's tiles of the tiled decode, weighted, on the CPU (see :mod:`.tiles`). ``settings``
        should be resolved already (:meth:`resolve_decode`); automatic tiles left in them are resolved
        without reading memory (the reference's tiles, or within ``budget_bytes``)."""
        plan = plan_for_latent(latent, settings, world_size=self.world_size, vae_precision=handle.precision)
        indices = tiles_of_rank(len(plan.tiles), self.rank, self.world_size)
        if not indices:
            return {}
        self.check_stop("decode", agree=False)
        with self._placed(_role(handle, "vae")) as vae:
            return decode_tiles(vae, latent, plan, indices, self._callback("decode", agree=False, report=True))

    def decode_stream(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings
                      ) -> Iterator[dict[int, torch.Tensor]]:
        """This rank's tiles decoded in lockstep: per latent frame, {tile index: weighted piece} on the CPU
        (see :func:`.tiles.decode_tiles_stream`); nothing on a rank without tiles. The VAE stays placed
        while the generator runs; close it to free the tiles' caches. ``settings`` as :meth:`decode_tiles`."""
        plan = plan_for_latent(latent, settings, world_size=self.world_size, vae_precision=handle.precision)
        indices = tiles_of_rank(len(plan.tiles), self.rank, self.world_size)
        if not indices:
            return
        self.check_stop("decode", agree=False)
        with self._placed(_role(handle, "vae")) as vae:
            yield from decode_tiles_stream(vae, latent, plan, indices,
                                           self._callback("decode", agree=False, report=True))

    # --- moving results between ranks (torchrun; the pool's parent collects from each worker instead) ---
    def share(self, value: object, src: int = 0) -> object:
        """``value`` of rank ``src`` on every rank (CPU objects, over gloo)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def gather_tiles(self, pieces: dict[int, torch.Tensor], plan: BlendPlan, latent: torch.Tensor
                     ) -> dict[int, torch.Tensor]:
        """Every rank's weighted tiles on rank 0 (an empty dict elsewhere), sent tile by tile over gloo."""
        return self._gather(pieces, plan, latent.shape[0], 4 * (latent.shape[2] - 1) + 1)

    def _gather(self, pieces: dict[int, torch.Tensor], plan: BlendPlan, batch: int, frames: int
                ) -> dict[int, torch.Tensor]:
        """``pieces`` of ``frames`` output frames from every rank on rank 0, tile by tile in tile order (the
        owner of tile i is rank i mod world size); an empty dict on the other ranks."""
        if self.world_size == 1:
            return pieces
        if not self.is_main:
            for index in sorted(pieces):
                dist.send(pieces[index].contiguous(), dst=self.ranks[0], group=self.cpu_group)
            return {}
        gathered = dict(pieces)
        for index, tile in enumerate(plan.tiles):
            owner = index % self.world_size
            if owner == 0:
                continue
            rows, cols = tile.pixels()
            buffer = torch.empty(batch, 3, frames, rows.stop - rows.start, cols.stop - cols.start)
            dist.recv(buffer, src=self.ranks[owner], group=self.cpu_group)
            gathered[index] = buffer
        return gathered

    def gather_stream(self, pieces: Iterator[dict[int, torch.Tensor]], plan: BlendPlan, latent: torch.Tensor
                      ) -> Iterator[dict[int, torch.Tensor]]:
        """Yields, per latent frame, every tile's weighted piece of it on rank 0 ({tile index: piece}) and an
        empty dict elsewhere; ``pieces`` is this rank's :meth:`decode_stream`, closed with this generator.

        Before each frame's pieces move, the ranks agree (one tiny all-reduce) on going on: a rank whose
        decode stopped (interrupt) or failed, or whose consumer closed this generator early, stops every
        rank at the same latent frame, so none is left waiting in a send or receive. The stopped ranks
        raise :class:`JobInterrupted`, the rank that failed its own error."""
        frames = latent.shape[2]
        try:
            for frame in range(frames):
                mine, failure = {}, None
                try:
                    mine = next(pieces, {})  # {} on a rank without tiles
                except Exception as error:  # an interrupt or a failure: every rank must hear of it
                    failure = error
                if self._any_rank(failure is not None or bool(self.should_stop())):
                    if failure is not None:
                        raise failure
                    raise JobInterrupted(f"decode stopped at latent frame {frame} of {frames}: another rank "
                                         "was interrupted or failed (see its log)")
                gathered = self._gather(mine, plan, latent.shape[0], 1 if frame == 0 else 4)
                del mine
                try:
                    yield gathered
                except GeneratorExit:
                    if frame + 1 < frames:  # the others are decoding the next frame: stop them there
                        self._any_rank(True)
                    raise
                del gathered
        finally:
            pieces.close()

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank must call this the same number of times)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(value.item())

    def describe(self) -> dict:
        """Resident models (with the parameters this rank holds) and peak memory, for reports and tests."""
        from .fsdp import shard_stats

        models = {key.role: {"file": key.file.name, **shard_stats(module_of(m))} for key, m in self.store.entries()}
        return {"rank": self.rank, "world_size": self.world_size, "device": str(self.device), "models": models,
                **self.memory()}


def _role(handle: ModelHandle, role: str) -> ModelHandle:
    if handle.role != role:
        raise ConfigError(f"a {handle.role!r} model ({handle.path}) was given where the {role!r} model is needed")
    return handle
