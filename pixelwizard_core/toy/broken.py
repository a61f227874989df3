"""Deliberately broken variants of the pipeline, each the kind of bug that still gives "a valid mp4".

Each is a context manager that swaps one function of the real pipeline for a wrong one, so the quality
checks (:func:`.evaluate.check`) can show that they catch it:

- ``cfg_sign_flipped``: guidance pushes away from the prompt, uncond + s (uncond - cond);
- ``anchor_not_injected``: the injector's control is never added (the HR model samples from text alone);
- ``anchor_wrong_grid``: the anchor is resized to the *latent* grid (H/16, W/16) instead of the token grid
  and cropped to fit, so its layout lands at the wrong place;
- ``decode_no_blend``: the tiles are pasted in order, each over the last, with no ramps (a naive stitch:
  each tile's edge, decoded without the context beyond it, lands in the picture).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F

from ..models.hr import AnchorInjector
from ..pipeline import loop, stages, tiled_decode


def _flipped_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    uncond = uncond.float()
    return uncond + scale * (uncond - cond.float())


def _no_control(self: AnchorInjector, anchor: torch.Tensor, t_features: torch.Tensor,
                dt_features: torch.Tensor) -> torch.Tensor:
    tokens = anchor.shape[2] * anchor.shape[3] * anchor.shape[4]
    dim = self.feature_norm.weight.shape[0]
    return torch.zeros(anchor.shape[0], tokens, dim, device=anchor.device)


def _latent_grid_anchor(latent: torch.Tensor, width: int, height: int) -> torch.Tensor:
    batch, channels, frames, h, w = latent.shape
    per_frame = latent.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, h, w).float()
    resized = F.interpolate(per_frame, size=(height // 16, width // 16), mode="bilinear", align_corners=False)
    cropped = resized[:, :, :height // 32, :width // 32]  # cut to the shape the model checks for
    return cropped.reshape(batch, frames, channels, height // 32, width // 32).permute(0, 2, 1, 3, 4)


def _pasted_axis_weights(ranges: Sequence[tuple[int, int]], length: int) -> list[torch.Tensor]:
    owner = torch.zeros(length, dtype=torch.long)
    for i, (start, _) in enumerate(ranges):
        owner[start:] = i
    return [(owner[start:stop] == i).float() for i, (start, stop) in enumerate(ranges)]


@contextlib.contextmanager
def cfg_sign_flipped() -> Iterator[None]:
    with mock.patch.object(loop, "classifier_free_guidance", _flipped_guidance):
        yield


@contextlib.contextmanager
def anchor_not_injected() -> Iterator[None]:
    with mock.patch.object(AnchorInjector, "forward", _no_control):
        yield


@contextlib.contextmanager
def anchor_wrong_grid() -> Iterator[None]:
    with mock.patch.object(stages, "resize_anchor", _latent_grid_anchor):
        yield


@contextlib.contextmanager
def decode_no_blend() -> Iterator[None]:
    with mock.patch.object(tiled_decode, "cosine_axis_weights", _pasted_axis_weights):
        yield


VARIANTS = {
    "cfg_sign_flipped": cfg_sign_flipped,
    "anchor_not_injected": anchor_not_injected,
    "anchor_wrong_grid": anchor_wrong_grid,
    "decode_no_blend": decode_no_blend,
}


@contextlib.contextmanager
def zero_step_size() -> Iterator[None]:
    """Not a bug but the baseline of the paper's claim: the HR model told dt = 0 at every step, i.e. its
    plain flow-matching velocity (what it was trained with on flow-matching batches)."""
    real = stages.flow_schedule

    def schedule(steps: int, shift: float):
        result = real(steps, shift)
        return dataclasses.replace(result, step_sizes=torch.zeros_like(result.step_sizes))

    with mock.patch.object(stages, "flow_schedule", schedule):
        yield
