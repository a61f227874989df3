"""The stage API: the four stages every front end calls, and their one-process implementation.

A front end (the command line, the ComfyUI nodes, the torchrun driver) asks for a :class:`Stages` once
and calls it; whether the work runs here (:class:`LocalStages`), on a worker pool
(``distributed/pool_stages.py``) or on every rank of a torchrun job (``distributed/launch.py``) is the
implementation's business, so no front end branches on where it runs. Models are named by
:class:`~.handles.ModelHandle`; each implementation loads them from its model store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch

from .anchors import Anchor
from .decode_budget import preset_tiles
from .first_frame import FirstFrame
from .handles import ModelHandle
from .loop import PreviewCallback, StepCallback
from .memory import decode_bytes, dit_activation_bytes
from .presets import FPS, StageSettings
from .stages import hr_latent, lr_anchor
from .text import TextConditioning
from .tiled_decode import tiled_decode_stream


@dataclass(frozen=True)
class DecodeSettings:
    """Tiled decode and video output: reference defaults are 3 (2K) / 4 (4K) patches along width, overlap 3."""

    # 0 = automatic (tiled_decode_stream / decode_budget.py): the fewest tiles whose estimated memory fits
    # what is free on the VAE's device when the decode starts (then patch_dim is chosen too, and order
    # "frame" may fall back to "tile"); without a budget (CPU) the reference's 3 at 2K, 4 at 4K, else 1.
    # Multi-process decodes resolve 0 per rank's share of the tiles, from the smallest free memory over the
    # ranks, the same settings on every rank (distributed/tiles.py choose_rank_tiles).
    num_patches: int = 3
    patch_dim: str = "w"
    overlap: int = 3
    blend: str = "cosine"
    # "frame": all tiles in lockstep, frames streamed to the writer (no video-sized host buffer, every
    # tile's causal cache on the device); "tile": one tile at a time into a host canvas (the reference)
    order: str = "frame"
    fps: int = FPS
    crf: int = 10  # libx264 constant rate factor; 10 matches the reference's imageio quality 8
    # A cap in bytes on the decode memory (beyond the VAE weights) the automatic choice plans for, per GPU or
    # rank: min(cap, free memory); on a CPU the cap alone. None = the device's free memory only. Explicit
    # num_patches ignore it in one process; in several, order "frame" falls back to "tile" beyond it.
    budget_bytes: int | None = None


@dataclass(frozen=True)
class StageControl:
    """How a caller follows and stops a stage: ``on_step(done, total)`` after each step (raising from it
    stops the stage), ``on_preview(x0)`` with the current clean-latent estimate (where the work runs in
    this process), ``should_stop()`` polled while no step ends (a pool's parent; raise or return True)."""

    on_step: StepCallback | None = None
    on_preview: PreviewCallback | None = None
    should_stop: Callable[[], object] | None = None


NO_CONTROL = StageControl()


class Stages(Protocol):
    """The four stages. ``is_main``: this process receives the results that are written to files (only
    rank 0 of a torchrun job); ``share(value)``: the main process's ``value``, on every process."""

    is_main: bool

    def share(self, value: object) -> object: ...

    def encode_text(self, handle: ModelHandle, prompt: str, negative_prompt: str | None = None,
                    control: StageControl = NO_CONTROL) -> TextConditioning:
        """Both CFG branches' umT5 context, on the CPU."""

    def lr_anchor(self, handle: ModelHandle, text: TextConditioning, settings: StageSettings, seed: int,
                  control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None) -> Anchor:
        """The low-resolution anchor (its ``model`` records ``handle``'s file identity); ``first_frame``: a
        start image's latent kept as its first frame (TI2V)."""

    def hr_latent(self, handle: ModelHandle, anchor: Anchor, text: TextConditioning, settings: StageSettings,
                  seed: int, control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None
                  ) -> torch.Tensor:
        """The HR latent [1, 48, T, H/16, W/16] float32 on the CPU; ``first_frame``: a start image encoded
        at the HR size, pinned as its first frame (off by default; untested with the released weights)."""

    def decode_stream(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings,
                      control: StageControl = NO_CONTROL) -> Iterator[torch.Tensor]:
        """Decoded chunks [B, 3, n, H, W] in [-1, 1], n = 1 then 4 frames, in order, on the main process
        (nothing elsewhere); close the generator to stop early."""


# (handle, working bytes the stage needs beyond the weights) -> the model on its working device for a block
ModelOpener = Callable[[ModelHandle, int], ContextManager[object]]


def decode_working_bytes(latent: torch.Tensor, settings: DecodeSettings, vae_precision: str) -> int:
    """The decode's memory beyond the VAE weights with ``settings``' tiles (automatic: the reference's)."""
    height, width = latent.shape[-2] * 16, latent.shape[-1] * 16
    if settings.num_patches == 0 or not isinstance(settings.num_patches, int):
        return preset_tiles(tuple(latent.shape[-2:]), vae_precision=vae_precision, overlap=3).estimate
    return decode_bytes(width, height, num_patches=settings.num_patches, overlap=settings.overlap,
                        patch_dim=settings.patch_dim, order=settings.order, vae_precision=vae_precision)


class LocalStages:
    """The stages in this process, on the models ``open_model(handle, working_bytes)`` places on the working
    device for the duration of a stage (``Models.open`` for the command line, ``nodes/host.placed`` for
    ComfyUI, whose model manager makes room for the weights and ``working_bytes``: the activations of one
    CFG branch, or the decode's tiles, from the memory model)."""

    is_main = True

    def __init__(self, open_model: ModelOpener) -> None:
        self.open_model = open_model

    def share(self, value: object) -> object:
        return value

    def encode_text(self, handle: ModelHandle, prompt: str, negative_prompt: str | None = None,
                    control: StageControl = NO_CONTROL) -> TextConditioning:
        with self.open_model(handle, 0) as encoder:
            return encoder.conditioning(prompt, negative_prompt).to("cpu")

    def lr_anchor(self, handle: ModelHandle, text: TextConditioning, settings: StageSettings, seed: int,
                  control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None) -> Anchor:
        with self.open_model(handle, dit_activation_bytes(settings.tokens)) as dit:
            return lr_anchor(dit, text, settings, seed, model_id=handle.identity, on_step=control.on_step,
                             on_preview=control.on_preview, first_frame=first_frame)

    def hr_latent(self, handle: ModelHandle, anchor: Anchor, text: TextConditioning, settings: StageSettings,
                  seed: int, control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None
                  ) -> torch.Tensor:
        with self.open_model(handle, dit_activation_bytes(settings.tokens)) as model:
            return hr_latent(model, anchor.latent, text, settings, seed, on_step=control.on_step,
                             on_preview=control.on_preview, first_frame=first_frame)

    def decode_stream(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings,
                      control: StageControl = NO_CONTROL) -> Iterator[torch.Tensor]:
        working = decode_working_bytes(latent, settings, handle.precision)
        with self.open_model(handle, working) as vae:
            chunks = tiled_decode_stream(vae, latent, num_patches=settings.num_patches, patch_dim=settings.patch_dim,
                                         overlap=settings.overlap, blend=settings.blend, order=settings.order,
                                         on_step=control.on_step, budget_bytes=settings.budget_bytes)
            with contextlib.closing(chunks):
                yield from chunks
