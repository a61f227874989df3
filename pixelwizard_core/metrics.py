"""Detail metrics of the PixelWizard paper: mHD-MSE and mHD-LPIPS.

For each k in {3, 4, 5}, every frame (RGB in [0, 1]) is bilinearly downsampled by 2^k (to floor(H/2^k) x
floor(W/2^k), no antialiasing) and upsampled back to H x W; the score for k is the mean squared error
(or LPIPS, inputs mapped to [-1, 1]) between the frame and its round trip, over all frames and pixels.
The paper averages the three scores (``reduce="mean"``, the default); the reference's own metric script
(compute_metrics/quality_metric.py) prints their sum (``reduce="sum"``). A video with more fine detail
loses more in the round trip, so higher means more high-frequency detail.

mHD-LPIPS needs the ``lpips`` package and the AlexNet weights in torch's hub cache (it never downloads);
:class:`MetricUnavailable` says what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

SCALES = (3, 4, 5)
REDUCTIONS = ("mean", "sum")
CHUNK_FRAMES = 8  # frames per round trip: bounds memory for 4K videos
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what lpips(net="alex") asks torchvision for


class MetricUnavailable(ConfigError):
    """A metric needs a package or weights that are not installed."""


@dataclass
class DetailScore:
    """Per-scale scores (k -> value) and their reduction."""

    metric: str
    per_scale: dict[int, float]
    reduce: str = "mean"
    frames: int = 0
    size: tuple[int, int] = (0, 0)  # (height, width)
    extra: dict = field(default_factory=dict)

    @property
    def value(self) -> float:
        values = list(self.per_scale.values())
        return sum(values) / len(values) if self.reduce == "mean" else sum(values)

    def summary(self) -> str:
        parts = ", ".join(f"k={k}: {v:.6g}" for k, v in self.per_scale.items())
        return f"{self.metric} ({self.reduce} over k) = {self.value:.6g}  [{parts}]"


def frames_tensor(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Frames as float32 [F, 3, H, W] in [0, 1] from uint8 or float [F, H, W, 3] / [F, 3, H, W] (or one frame)."""
    x = torch.as_tensor(frames)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ConfigError(f"frames must be [F, H, W, 3] or [F, 3, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ConfigError(f"frames must be uint8 or floating point in [0, 1], got {x.dtype}")
    return x.float()


def _check(scales: Sequence[int], reduce: str, height: int, width: int) -> None:
    if reduce not in REDUCTIONS:
        raise ConfigError(f"reduce {reduce!r}: choose one of {', '.join(REDUCTIONS)}")
    if not scales or any(int(k) != k or k < 1 for k in scales):
        raise ConfigError(f"scales must be positive integers k (factor 2^k), got {list(scales)}")
    if min(height, width) < 2 ** max(scales):
        raise ConfigError(f"frames of {width}x{height} are too small for a 2^{max(scales)} downsample")


def round_trip(frames: torch.Tensor, k: int) -> torch.Tensor:
    """Bilinear down by 2^k (floor size) and back up, as the reference metric does."""
    height, width = frames.shape[-2:]
    small = (max(1, height // 2 ** k), max(1, width // 2 ** k))
    down = F.interpolate(frames, size=small, mode="bilinear", align_corners=False)
    return F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False)


def _chunks(frames: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, frames.shape[0], CHUNK_FRAMES):
        yield frames[start:start + CHUNK_FRAMES]


def hd_mse(frames: torch.Tensor | np.ndarray, *, scales: Sequence[int] = SCALES, reduce: str = "mean",
           device: str | torch.device = "cpu") -> DetailScore:
    """mHD-MSE of a video's frames (see the module docstring)."""
    sums, count, frame_count, size = {int(k): 0.0 for k in scales}, 0, 0, (0, 0)
    for chunk in _chunks(_with_frame_axis(frames)):
        chunk = frames_tensor(chunk).to(device)
        if not count:
            size = (int(chunk.shape[-2]), int(chunk.shape[-1]))
            _check(scales, reduce, *size)
        count += chunk.numel()
        frame_count += chunk.shape[0]
        for k in sums:
            sums[k] += float((round_trip(chunk, k) - chunk).double().pow(2).sum())
    return DetailScore("mHD-MSE", {k: s / count for k, s in sums.items()}, reduce, frame_count, size)


def _with_frame_axis(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(frames)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] == 0:
        raise ConfigError(f"frames must be a non-empty [F, H, W, 3] or [F, 3, H, W] tensor, got {tuple(x.shape)}")
    return x


def lpips_model(device: str | torch.device = "cpu", net: str = "alex"):
    """The LPIPS network, only from local files; MetricUnavailable when ``lpips`` or its weights are absent."""
    try:
        import lpips
    except ImportError:
        raise MetricUnavailable("mHD-LPIPS needs the 'lpips' package: pip install lpips (mHD-MSE works without it)") from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if net == "alex" and not weights.is_file():
        raise MetricUnavailable(
            f"mHD-LPIPS needs torchvision's AlexNet weights at {weights} and PixelWizard does not download them. "
            f"Fetch {ALEXNET_WEIGHTS} from the torchvision model zoo into that folder (or set TORCH_HOME), then "
            "run again.")
    return lpips.LPIPS(net=net, verbose=False).to(device).eval()


@torch.no_grad()
def hd_lpips(frames: torch.Tensor | np.ndarray, *, scales: Sequence[int] = SCALES, reduce: str = "mean",
             device: str | torch.device = "cpu", model=None) -> DetailScore:
    """mHD-LPIPS: LPIPS(frame, round trip) averaged over frames, per scale (see the module docstring)."""
    model = model if model is not None else lpips_model(device)
    sums, count, size = {int(k): 0.0 for k in scales}, 0, (0, 0)
    for chunk in _chunks(_with_frame_axis(frames)):
        chunk = frames_tensor(chunk).to(device)
        if not count:
            size = (int(chunk.shape[-2]), int(chunk.shape[-1]))
            _check(scales, reduce, *size)
        count += chunk.shape[0]
        for k in sums:
            sums[k] += float(model(chunk * 2 - 1, round_trip(chunk, k) * 2 - 1).sum())
    return DetailScore("mHD-LPIPS", {k: s / count for k, s in sums.items()}, reduce, count, size)


def video_scores(path: str | os.PathLike, *, scales: Sequence[int] = SCALES, reduce: str = "mean",
                 lpips: bool = False, device: str | torch.device = "cpu") -> list[DetailScore]:
    """mHD-MSE (and mHD-LPIPS when asked) of a video file or a tensor file holding ``frames``."""
    from .io.video import read_video

    source = Path(path)
    if source.suffix.lower() == ".safetensors":
        from .io.latents import load_tensor_file

        tensors, _ = load_tensor_file(source)
        if "frames" not in tensors:
            raise ConfigError(f"{source} has no 'frames' tensor (has {sorted(tensors)})")
        frames = tensors["frames"]
    else:
        frames = read_video(source)
    scores = [hd_mse(frames, scales=scales, reduce=reduce, device=device)]
    if lpips:
        scores.append(hd_lpips(frames, scales=scales, reduce=reduce, device=device))
    return scores
