"""Training data: a folder (or a list file) of HR clips and/or latent files, read into batches.

- **Latent files** (``.safetensors``, e.g. written with ``save_tensor_file(..., kind=TRAINING_EXAMPLE_KIND)``):
  tensor ``latent`` [48, T, H/16, W/16] (a leading batch dimension of 1 is accepted), ``anchor`` (the LR
  latent at any size; resized per frame to the token grid H/32, W/32), optional ``context`` (umT5 rows
  [rows, 4096]); metadata ``prompt``, encoded with the text encoder when ``context`` is absent.
- **Clips** (``.mp4``, ``.mov``, ``.mkv``, ``.webm``, ``.avi``) with the prompt in a ``.txt`` of the same
  name: ``frames`` frames from a random start, scaled to cover ``width`` x ``height`` and centre-cropped,
  VAE-encoded; the anchor is synthesised by :func:`.degrade.synthesize_anchor`.

A list file (``.txt``) names one item per line (relative to the list's folder); ``#`` starts a comment.
The sample order is a pure function of the seed and the step, so a resumed run reads the same batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingFileError
from ..io.latents import load_tensor_file
from ..io.video import read_video
from ..loading.readers import read_safetensors_header, sniff_container
from ..pipeline.stages import resize_anchor
from .degrade import DegradeConfig, synthesize_anchor
from .objective import TrainingBatch

log = logging.getLogger("pixelwizard")

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
LATENT_SUFFIXES = (".safetensors",)
TRAINING_EXAMPLE_KIND = "pixelwizard.training_example"


@dataclass(frozen=True)
class ClipSettings:
    """Size of the HR training clips, in pixels and frames."""

    width: int
    height: int
    frames: int

    def __post_init__(self) -> None:
        if self.width % 32 or self.height % 32 or self.width <= 0 or self.height <= 0:
            raise ConfigError(f"training size {self.width}x{self.height} must be positive multiples of 32")
        if self.frames < 1 or self.frames % 4 != 1:
            raise ConfigError(f"training clips need 4n+1 frames (e.g. 69, 81, 89), got {self.frames}")


def discover(path: str | Path) -> list[Path]:
    """The items of a data folder (sorted) or of a list file, checked to exist."""
    root = Path(path).expanduser()
    if root.is_dir():
        items = sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES + LATENT_SUFFIXES)
    elif root.is_file() and root.suffix.lower() == ".txt":
        lines = [line.split("#", 1)[0].strip() for line in root.read_text(encoding="utf-8").splitlines()]
        items = [(root.parent / line).expanduser() for line in lines if line]
        missing = [str(p) for p in items if not p.is_file()]
        if missing:
            raise MissingFileError(f"{root} lists {len(missing)} missing file(s), e.g. {', '.join(missing[:3])}")
    else:
        raise MissingFileError(f"training data {str(root)!r} is neither a folder nor a .txt list of files")
    if not items:
        raise ConfigError(f"no training items in {root}: expected {', '.join(VIDEO_SUFFIXES + LATENT_SUFFIXES)} files")
    unknown = [p.name for p in items if p.suffix.lower() not in VIDEO_SUFFIXES + LATENT_SUFFIXES]
    if unknown:
        raise ConfigError(f"{root} lists files of unknown kind: {', '.join(unknown[:3])}")
    return items


def sample_order(step: int, batch_size: int, count: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Item indices of this rank's batch at ``step``: epochs are seeded permutations of all items,
    consumed ``batch_size * world_size`` at a time (rank r takes the r-th slice)."""
    start = (step * world_size + rank) * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, count)
        permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(permutation[offset]))
    return indices


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _prompt_of_clip(path: Path) -> str:
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        raise MissingFileError(f"clip {path} has no prompt: write it to {sidecar}")
    return sidecar.read_text(encoding="utf-8").strip()


def _read_latent_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a PixelWizard tensor file (checksummed) or a plain safetensors file."""
    _, raw_metadata = read_safetensors_header(path)
    if "pixelwizard.format" in raw_metadata:
        return load_tensor_file(path)
    from safetensors.torch import load_file

    return load_file(str(path)), dict(raw_metadata)


def _video_tensor(path: Path, clip: ClipSettings, generator: torch.Generator) -> torch.Tensor:
    """[1, 3, frames, height, width] in [-1, 1]: a random window, scaled to cover, centre-cropped."""
    frames = read_video(path)  # [F, H, W, 3] uint8
    if frames.shape[0] < clip.frames:
        raise ConfigError(f"clip {path} has {frames.shape[0]} frames; training needs {clip.frames}")
    start = int(torch.randint(frames.shape[0] - clip.frames + 1, (), generator=generator, device=generator.device))
    x = frames[start:start + clip.frames].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    scale = max(clip.height / x.shape[2], clip.width / x.shape[3])
    size = (max(clip.height, round(x.shape[2] * scale)), max(clip.width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - clip.height) // 2, (size[1] - clip.width) // 2
    x = x[:, :, top:top + clip.height, left:left + clip.width]
    return x.permute(1, 0, 2, 3).unsqueeze(0).clamp(-1, 1)


def check_items(items: list[Path], *, have_vae: bool, have_text: bool, have_clip: bool, have_empty: bool,
                cfg_dropout: float) -> None:
    """Everything the items will need, from file headers only, so a run fails before loading models."""
    videos = [p for p in items if _is_video(p)]
    if videos and not (have_vae and have_clip):
        raise ConfigError(f"{len(videos)} clip(s) (e.g. {videos[0].name}) need the VAE (--vae_path) and a "
                          "training size (--width, --height, --frames)")
    if videos and not have_text:
        raise ConfigError("clips have text prompts, so the umT5 text encoder is needed (--text_encoder)")
    for path in videos:
        _prompt_of_clip(path)
    for path in (p for p in items if not _is_video(p)):
        if sniff_container(path) != "safetensors":
            raise ConfigError(f"{path} is not a safetensors file")
        infos, _ = read_safetensors_header(path)
        if "latent" not in infos or "anchor" not in infos:
            raise ConfigError(f"latent file {path} must hold tensors 'latent' and 'anchor' (has {sorted(infos)})")
        if "context" not in infos and not have_text:
            raise ConfigError(f"{path} has no 'context' tensor, so its prompt needs the text encoder (--text_encoder)")
    if cfg_dropout > 0 and not (have_empty or have_text):
        raise ConfigError("classifier-free dropout needs the empty prompt's context: pass --text_encoder or "
                          "--empty_context FILE (a tensor file with 'context'), or set --cfg_dropout 0")


class TrainingData:
    """Reads items into :class:`TrainingBatch` es; the VAE and text encoder are used when items need them."""

    def __init__(self, items: list[Path], *, vae: torch.nn.Module | None = None, text_encoder=None,
                 empty_context: torch.Tensor | None = None, clip: ClipSettings | None = None,
                 degrade: DegradeConfig = DegradeConfig(), cfg_dropout: float = 0.1) -> None:
        self.items = items
        self.vae = vae
        self.text_encoder = text_encoder
        self.clip = clip
        self.degrade = degrade
        check_items(items, have_vae=vae is not None, have_text=text_encoder is not None, have_clip=clip is not None,
                    have_empty=empty_context is not None, cfg_dropout=cfg_dropout)
        self.empty_context = self._empty_context(empty_context)

    def __len__(self) -> int:
        return len(self.items)

    def _empty_context(self, given: torch.Tensor | None) -> torch.Tensor:
        if given is not None:
            return given.reshape(-1, given.shape[-1]).float()
        if self.text_encoder is not None:
            return self.text_encoder.encode([""])[0].float().cpu()
        return torch.zeros(1, 1)  # never used: cfg_dropout is 0 (checked above)

    def example(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent [1, 48, T, H, W], context [1, rows, dim], anchor [1, 48, T, H/2, W/2]) of one item."""
        path = self.items[index]
        if _is_video(path):
            video = _video_tensor(path, self.clip, generator)
            with torch.no_grad():
                latent = self.vae.encode(video).float().cpu()
                anchor = synthesize_anchor(self.vae, video, self.degrade, generator).float().cpu()
            return latent, self._encode(_prompt_of_clip(path)), anchor
        tensors, metadata = _read_latent_file(path)
        latent = tensors["latent"].float()
        latent = latent if latent.dim() == 5 else latent.unsqueeze(0)
        anchor = tensors["anchor"].float()
        anchor = anchor if anchor.dim() == 5 else anchor.unsqueeze(0)
        anchor = resize_anchor(anchor, latent.shape[-1] * 16, latent.shape[-2] * 16)
        if "context" in tensors:
            context = tensors["context"].float()
            context = context if context.dim() == 3 else context.unsqueeze(0)
        else:
            context = self._encode(str(metadata.get("prompt", "")))
        return latent, context, anchor

    def _encode(self, prompt: str) -> torch.Tensor:
        return self.text_encoder.encode([prompt]).float().cpu()

    def batch(self, indices: list[int], generator: torch.Generator) -> TrainingBatch:
        examples = [self.example(i, generator) for i in indices]
        shapes = {tuple(e[0].shape) for e in examples}
        if len(shapes) > 1:
            raise ConfigError(f"items of one batch have different latent shapes {sorted(shapes)}; use --batch_size 1 "
                              "or items of one size")
        rows = max(e[1].shape[1] for e in examples)
        contexts = [F.pad(e[1], (0, 0, 0, rows - e[1].shape[1])) for e in examples]
        return TrainingBatch(latent=torch.cat([e[0] for e in examples]), context=torch.cat(contexts),
                             anchor=torch.cat([e[2] for e in examples]), empty_context=self.empty_context,
                             info={"items": [self.items[i].name for i in indices]})
