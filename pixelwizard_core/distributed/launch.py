"""``torchrun ... -m pixelwizard_core generate --ulysses_size N [--dit_fsdp] [--t5_fsdp]``.

Every rank runs the command. The stages go through :class:`.session.Session`, the code the pool's workers
run; :class:`TorchrunStages` gives it the stage API (:class:`~pixelwizard_core.pipeline.engine.Stages`),
so the command line's one driver (:class:`~pixelwizard_core.pipeline.runner.PixelWizard`) runs the same
loop for one process and for many. Rank 0 encodes the prompt (all ranks
with ``--t5_fsdp``) and shares it, all ranks sample together, each decodes its tiles and sends them to
rank 0, which blends them and alone writes files. Works on one machine or several (torchrun's
``--nnodes`` / ``--rdzv_endpoint``); the GPU of a rank is its LOCAL_RANK.

Groups (:mod:`.groups`): N processes with ``--ulysses_size U`` form N / U groups of U ranks; each group
takes the next prompt from a counter shared through torchrun's store, and "rank 0" above is the group's
first rank, its leader, the only process of the group that touches the output folder. One group (U = N)
is the run described above.

The decode follows ``--decode_order`` as the single-process decode does. ``frame`` (the default) streams:
each rank decodes its tiles in lockstep, latent frame by latent frame (all of its tiles' causal caches on
its GPU), sends that frame's weighted pieces to rank 0, and rank 0 blends the chunk (1 output frame, then
4) and appends it to the files at once, so its host memory holds about one chunk whatever the length.
``tile`` decodes each tile whole (one tile's cache on the GPU at a time); rank 0 then holds every tile
and the whole video in host memory (about 25 GB at 4K, 121 frames). Both write the same frames.

Memory: before decoding, the ranks agree (one all-reduce MIN) on the smallest usable GPU memory, after the
VAE weights, and every rank resolves ``--num_patches 0`` and the order from it (``tiles.choose_rank_tiles``):
frame order with the fewest tiles whose share on one GPU fits, else tile order with the fewest tiles of
which one fits; an explicit ``--num_patches`` only falls back from frame to tile order. ``--decode_budget_gib``
caps that figure per GPU (and is the figure on CPU processes, which have none).

Example: ``torchrun --nproc_per_node 8 -m pixelwizard_core generate --ulysses_size 8 --dit_fsdp --t5_fsdp
--ckpt_dir Wan2.2-TI2V-5B --lr_ckpt PixelWizard/lr/model.pt --hr_ckpt PixelWizard/2k/model.pt --prompt ...``
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..pipeline.anchors import Anchor
from ..pipeline.engine import NO_CONTROL, DecodeSettings, StageControl
from ..pipeline.first_frame import FirstFrame
from ..pipeline.handles import ModelHandle
from ..pipeline.models import Models
from ..pipeline.presets import StageSettings
from ..pipeline.runner import PixelWizard
from ..pipeline.text import TextConditioning
from ..pipeline.tile_plan import ORDERS
from ..pipeline.tiled_decode import BlendPlan
from ..system import launched_world_size
from .groups import SharedQueue, check_groups, describe, form_groups
from .session import ParallelConfig, Session, check_model_degree, init_process_group
from .tiles import blend_tiles, plan_for_latent

log = logging.getLogger("pixelwizard")


def rank_device(requested: torch.device, world_size: int) -> torch.device:
    """The device rule: in one process an explicit ``--device cuda:N`` wins; under torchrun with more than
    one rank each rank takes ``cuda:$LOCAL_RANK`` (an index among the visible devices)."""
    if requested.type != "cuda" or world_size == 1:
        return requested
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def from_env(models: Models, *, ulysses: int = 1, dit_fsdp: bool = False, t5_fsdp: bool = False) -> PixelWizard:
    """The driver for this rank: joins (or reuses) the process group torchrun set up; every option is
    checked before that."""
    world, rank = launched_world_size(), int(os.environ.get("RANK", "0"))
    config = ParallelConfig(ulysses, dit_fsdp, t5_fsdp)
    if world == 1 and ulysses > 1:
        raise ConfigError(f"--ulysses_size {ulysses} splits the work over {ulysses} processes: launch with "
                          f"torchrun --nproc_per_node {ulysses} -m pixelwizard_core generate ...")
    groups = check_groups(world, ulysses, dit_fsdp or t5_fsdp)
    if dit_fsdp and models.compile_blocks:
        raise ConfigError("--compile with --dit_fsdp: the sharded DiTs run eagerly (their blocks gather their "
                          "weights from every GPU as they run); use one or the other")
    if dit_fsdp and models.block_swap:
        raise ConfigError(f"--block_swap {models.block_swap} with --dit_fsdp: FSDP already splits the DiTs' "
                          "weights over the GPUs; use one or the other")
    if models.files.lr is None and models.files.hr is None:
        raise ConfigError("multi-process generation loads weight files in every process; it cannot use --demo")
    for role in ("lr", "hr"):
        if models.files.path(role) is not None:
            check_model_degree(models.files.path(role), role, ulysses)
    device = rank_device(models.device, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    models.device = device
    if world > 1 and not dist.is_initialized():
        init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                           device=device)
        atexit.register(_destroy)
    if rank % ulysses:  # one rank per group speaks for it
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    if groups == 1:  # one group: the whole world, as before groups existed
        return PixelWizard(models, TorchrunStages(Session(config, device=device, t5_cpu=models.t5_cpu)))
    group = form_groups(ulysses)
    log.info("%d processes in %d groups of %d: this is %s", world, groups, ulysses, describe(group))
    session = Session(config, device=device, t5_cpu=models.t5_cpu, group=group)
    return PixelWizard(models, TorchrunStages(session), queue=SharedQueue(group))


class TorchrunStages:
    """The stages run by every rank of a torchrun job (see the module docstring): rank 0 receives the
    results; the others take part in the collectives."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @property
    def is_main(self) -> bool:
        return self.session.is_main

    def share(self, value: object) -> object:
        return self.session.share(value)

    def encode_text(self, handle: ModelHandle, prompt: str, negative_prompt: str | None = None,
                    control: StageControl = NO_CONTROL) -> TextConditioning:
        return self.session.share(self.session.encode_text(handle, prompt, negative_prompt))

    def lr_anchor(self, handle: ModelHandle, text: TextConditioning, settings: StageSettings, seed: int,
                  control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None) -> Anchor:
        self.session.progress = control.on_step
        return self.session.lr_anchor(handle, text, settings, seed, first_frame)

    def hr_latent(self, handle: ModelHandle, anchor: Anchor, text: TextConditioning, settings: StageSettings,
                  seed: int, control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None
                  ) -> torch.Tensor:
        self.session.progress = control.on_step
        return self.session.hr_latent(handle, anchor.latent, text, settings, seed, first_frame)

    def decode_stream(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings,
                      control: StageControl = NO_CONTROL) -> Iterator[torch.Tensor]:
        """Each rank decodes its tiles; rank 0 blends them and yields the chunks (streamed for order
        "frame"). Automatic tiles, and frame order that does not fit, are resolved first from the
        smallest rank's usable memory (collective)."""
        ORDERS.check(settings.order)
        self.session.progress = control.on_step
        settings = self.session.resolve_decode(handle, latent, settings)
        plan = plan_for_latent(latent, settings)
        if settings.order == "tile":
            return self._whole_tiles(handle, latent, settings, plan)
        return self._streamed(handle, latent, settings, plan)

    def _whole_tiles(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings,
                     plan: BlendPlan) -> Iterator[torch.Tensor]:
        """Order "tile": every tile decoded whole and sent to rank 0, which blends the whole video and
        yields its chunks; nothing elsewhere."""
        mine = self.session.decode_tiles(handle, latent, settings)
        pieces = self.session.gather_tiles(mine, plan, latent)
        del mine
        if not self.is_main:
            return
        video = blend_tiles(plan, pieces)
        del pieces
        yield from video.split([1] + [4] * (latent.shape[2] - 1), dim=2)  # the streamed decode's chunks

    def _streamed(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings,
                  plan: BlendPlan) -> Iterator[torch.Tensor]:
        """Order "frame": per latent frame, every rank's pieces of it blended on rank 0 and yielded (1 output
        frame, then 4); nothing elsewhere. blend_tiles adds the same products in the same tile order
        pixel by pixel, so the chunks are the whole-tile path's video cut by frames, bit for bit."""
        frames = self.session.gather_stream(self.session.decode_stream(handle, latent, settings), plan, latent)
        with contextlib.closing(frames):
            for pieces in frames:
                if not self.is_main:
                    continue
                chunk = blend_tiles(plan, pieces)
                del pieces
                yield chunk
                del chunk


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
