"""``torchrun ... -m pixelwizard_core generate --ulysses_size N [--dit_fsdp] [--t5_fsdp]``.

Every rank runs the command. The stages go through :class:`.session.Session`, the code the pool's workers
run; this class only gives it the stage API of :class:`~pixelwizard_core.pipeline.runner.PixelWizard`, so
the CLI's generate loop is the same for one process and for many. Rank 0 encodes the prompt (all ranks
with ``--t5_fsdp``) and shares it, all ranks sample together, each decodes its tiles and sends them to
rank 0, which blends them and alone writes files. Works on one machine or several (torchrun's
``--nnodes`` / ``--rdzv_endpoint``); the GPU of a rank is its LOCAL_RANK.

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
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError, PixelWizardError
from ..io.video import PngSequenceWriter, VideoWriter
from ..pipeline.anchors import Anchor
from ..pipeline.handles import ModelHandle
from ..pipeline.loop import StepCallback
from ..pipeline.models import Models
from ..pipeline.presets import StageSettings
from ..pipeline.runner import DecodeSettings, PixelWizard
from ..pipeline.text import TextConditioning
from ..pipeline.tile_plan import ORDERS
from ..pipeline.tiled_decode import BlendPlan
from .session import ParallelConfig, Session, check_model_degree, init_process_group
from .tiles import blend_tiles, plan_for_latent

log = logging.getLogger("pixelwizard")



def launched_world_size() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class DistributedPixelWizard(PixelWizard):
    """PixelWizard's stages run by every rank of a torchrun job (see the module docstring)."""

    def __init__(self, models: Models, session: Session) -> None:
        super().__init__(models)
        self.session = session

    @classmethod
    def from_env(cls, models: Models, *, ulysses: int = 1, dit_fsdp: bool = False,
                 t5_fsdp: bool = False) -> "DistributedPixelWizard":
        """Join (or reuse) the process group torchrun set up; every option is checked before that."""
        world, rank = launched_world_size(), int(os.environ.get("RANK", "0"))
        config = ParallelConfig(ulysses, dit_fsdp, t5_fsdp)
        if world == 1 and ulysses > 1:
            raise ConfigError(f"--ulysses_size {ulysses} splits the work over {ulysses} processes: launch with "
                              f"torchrun --nproc_per_node {ulysses} -m pixelwizard_core generate ...")
        config.check(world)
        if dit_fsdp and models.block_swap:
            raise ConfigError(f"--block_swap {models.block_swap} with --dit_fsdp: FSDP already splits the DiTs' "
                              "weights over the GPUs; use one or the other")
        if models.files.lr is None and models.files.hr is None:
            raise ConfigError("multi-process generation loads weight files in every process; it cannot use --demo")
        for role in ("lr", "hr"):
            if models.files.path(role) is not None:
                check_model_degree(models.files.path(role), role, ulysses)
        device = models.device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        models.device = device
        if world > 1 and not dist.is_initialized():
            init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                               device=device)
            atexit.register(_destroy)
        if rank != 0:  # one rank speaks for all
            log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
        return cls(models, Session(config, device=device, t5_cpu=models.t5_cpu))

    @property
    def is_main(self) -> bool:
        return self.session.is_main

    def share(self, value: object) -> object:
        return self.session.share(value)

    def _handle(self, role: str) -> ModelHandle:
        return self.models.handle(role)  # the same handle one process would use, so the same identity

    def conditioning(self, prompt: str, negative_prompt: str | None = None) -> TextConditioning:
        with self._stage("text"):
            text = self.session.encode_text(self._handle("text"), prompt, negative_prompt)
            return self.session.share(text)

    def anchor(self, text: TextConditioning, settings: StageSettings, seed: int,
               on_step: StepCallback | None = None) -> Anchor:
        self.session.progress = on_step
        with self._stage("lr"):
            return self.session.lr_anchor(self._handle("lr"), text, settings, seed)

    def upscale(self, anchor: Anchor, text: TextConditioning, settings: StageSettings, seed: int,
                on_step: StepCallback | None = None) -> torch.Tensor:
        self.session.progress = on_step
        with self._stage("hr"):
            return self.session.hr_latent(self._handle("hr"), anchor.latent, text, settings, seed)

    def decode(self, latent: torch.Tensor, path: str | Path, settings: DecodeSettings, *,
               overwrite: bool = False, png_dir: str | Path | None = None, on_step: StepCallback | None = None
               ) -> Path:
        """Each rank decodes its tiles; rank 0 blends them and writes the mp4 (and PNG frames), streamed
        chunk by chunk for ``settings.order == "frame"`` (see the module docstring). Automatic tiles, and
        frame order that does not fit, are resolved first from the smallest rank's usable memory."""
        self.session.progress = on_step
        with self._stage("decode"):
            if settings.order not in ORDERS:
                raise ConfigError(f"decode order {settings.order!r}: choose one of {', '.join(ORDERS)} (frame "
                                  "streams the video to the files, tile decodes one whole tile at a time)")
            handle = self._handle("vae")
            # every rank: the same tiles and order, from the smallest rank's free memory (collective)
            settings = self.session.resolve_decode(handle, latent, settings)
            plan = plan_for_latent(latent, settings)
            writers = self._open_writers(path, settings, overwrite, png_dir)
            if settings.order == "tile":
                chunks = self._whole_tiles(handle, latent, settings, plan)
            else:
                chunks = self._streamed(handle, latent, settings, plan)
            if writers is None:  # not rank 0: decode and send, write nothing
                with contextlib.closing(chunks):
                    for _ in chunks:
                        pass
                return Path(path)
            video, pngs = writers
            with video, contextlib.closing(chunks):  # on an error: stop the other ranks, then drop the mp4
                for chunk in chunks:
                    video.append(chunk)
                    if pngs is not None:
                        pngs.append(chunk)
                    del chunk
            return Path(video.path)

    def _open_writers(self, path: str | Path, settings: DecodeSettings, overwrite: bool,
                      png_dir: str | Path | None) -> tuple[VideoWriter, PngSequenceWriter | None] | None:
        """Rank 0's writers, opened (outputs checked) before any decoding; a refusal is raised on every
        rank, so none starts a decode that rank 0 would never receive. None on the other ranks."""
        writers, problem = None, None
        if self.is_main:
            try:
                video = VideoWriter(path, fps=settings.fps, crf=settings.crf, overwrite=overwrite)
                pngs = PngSequenceWriter(png_dir, overwrite=overwrite) if png_dir is not None else None
                writers = (video, pngs)
            except (PixelWizardError, OSError) as error:
                problem = error
        problem = self.session.share(problem)
        if problem is not None:
            raise problem
        return writers

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
