"""The stage API on a worker pool: what a ComfyUI node gets when its ``pool`` input is connected.

:class:`PoolStages` is a :class:`~pixelwizard_core.pipeline.engine.Stages` over a :class:`.pool.PoolSpec`:
the pool starts (or is reused) at the first stage, and every call is one pool job with the caller's
progress and Cancel. Live previews are not sent back from the workers (``on_preview`` is not called).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..pipeline.anchors import Anchor
from ..pipeline.engine import NO_CONTROL, DecodeSettings, StageControl
from ..pipeline.first_frame import FirstFrame
from ..pipeline.handles import ModelHandle
from ..pipeline.presets import StageSettings
from ..pipeline.text import TextConditioning
from .pool import PoolSpec, WorkerPool


def _control(control: StageControl) -> dict:
    return {"on_step": control.on_step, "should_stop": control.should_stop}


class PoolStages:
    """The stages on the workers of ``spec``'s pool; results come back to this process."""

    is_main = True

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec

    def share(self, value: object) -> object:
        return value

    def pool(self) -> WorkerPool:
        return self.spec.acquire()

    def encode_text(self, handle: ModelHandle, prompt: str, negative_prompt: str | None = None,
                    control: StageControl = NO_CONTROL) -> TextConditioning:
        return self.pool().encode_text(handle, prompt, negative_prompt, **_control(control))

    def lr_anchor(self, handle: ModelHandle, text: TextConditioning, settings: StageSettings, seed: int,
                  control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None) -> Anchor:
        return self.pool().lr_anchor(handle, text, settings, seed, first_frame, **_control(control))

    def hr_latent(self, handle: ModelHandle, anchor: Anchor, text: TextConditioning, settings: StageSettings,
                  seed: int, control: StageControl = NO_CONTROL, first_frame: FirstFrame | None = None
                  ) -> torch.Tensor:
        return self.pool().hr_latent(handle, anchor, text, settings, seed, first_frame, **_control(control))

    def decode_stream(self, handle: ModelHandle, latent: torch.Tensor, settings: DecodeSettings,
                      control: StageControl = NO_CONTROL) -> Iterator[torch.Tensor]:
        """Chunks in frame order; with order "tile" each worker decodes whole tiles and the chunks are cut
        from the whole video blended here (see :meth:`.pool.WorkerPool.decode_stream`)."""
        return self.pool().decode_stream(handle, latent, settings, **_control(control))
