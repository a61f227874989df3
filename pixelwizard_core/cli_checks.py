"""Every check of the command line's arguments, in one place, run before any model is loaded.

The commands call these before they open a model, so a bad value costs no load: NaN or infinite numbers,
out-of-range tile and quality settings, sizes no machine could hold, seeds torch cannot take, empty paths.
An explicit value is never replaced by a preset's (``--hr_steps 0`` is refused, not turned into 4).
Warnings (anchor geometry, a checkpoint named for another preset) are logged, never raised.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

import torch

from .download import default_models_dir
from .errors import ConfigError, PixelWizardError
from .io.video import read_image
from .loading.lora import LORA_FOLDER, LoraRef, parse_lora_arg
from .pipeline.decode_budget import check_overlap
from .pipeline.engine import DecodeSettings
from .pipeline.memory import GIB, dit_activation_bytes, weight_bytes
from .pipeline.presets import (HR_PRESETS, HR_STEP_RANGE, LR_DEFAULTS, StageSettings, check_frames, check_stage,
                               parse_resolution, preset_for_size, prompt_seeds)
from .pipeline.tile_plan import AUTO_PATCHES, SCALE, plan_tiles
from .system import launched_world_size

log = logging.getLogger("pixelwizard")

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 0 .. 2**64-1; the reference's seeds are int64
CRF_RANGE = (0, 51)  # libx264
# Sizes are capped by the memory model: a stage may need at most this many times what the largest
# preset's HR stage needs (room for DCI 4K, 5K and longer clips; nothing near a 100000x100000 mistake)
MEMORY_CAP_FACTOR = 2
ASPECT_TOLERANCE = 0.02  # anchors stretched by more than this (relative) get a warning
LR_STEP_RANGE = (1, 1000)  # as pipeline.presets.check_stage allows
PATH_OPTIONS = ("ckpt_dir", "dit", "text_encoder", "vae_path", "lr_ckpt", "hr_ckpt", "models", "prompt_file",
                "video_dir", "save_dir", "anchor_dir", "image")
LORA_FLAGS = {"lr": "lora", "hr": "hr_lora"}  # role -> its repeatable FILE[:STRENGTH] flag


# --- paths and numbers -----------------------------------------------------------------------------


def check_paths(args: argparse.Namespace) -> None:
    """Refuse an empty path (``--video_dir ""`` would write into the current folder; ``--dit ""`` would
    silently fall back to the models folder)."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and not str(value).strip():
            raise ConfigError(f"--{name} is empty: give a path, or leave the option out for its default")
    for name in ("anchors", "latents"):
        for value in getattr(args, name, None) or ():
            if not str(value).strip():
                raise ConfigError(f"an empty file name was given among the {name}: remove it or name a file")


def single_process(command: str) -> None:
    """``anchor``, ``upscale`` and ``decode`` run in one process: under torchrun every rank would run the whole
    command and write the same files."""
    if launched_world_size() > 1:
        raise ConfigError(f"{command} runs in one process: under torchrun every rank would write the same files; run "
                          "it without torchrun (generate is the command that splits its work over processes)")


def finite(flag: str, value: float) -> float:
    """``value`` unless it is NaN or infinite (comparisons with NaN are all False, so range checks pass it)."""
    if not math.isfinite(value):
        raise ConfigError(f"{flag} {value}: give a finite number")
    return value


def check_seed(flag: str, seed: int, *, highest_offset: int = 0) -> None:
    """A seed torch can take once the largest offset the run adds to it is added."""
    top = SEED_MAX - highest_offset
    if not 0 <= seed <= top:
        extra = f" (the run adds up to {highest_offset} to it)" if highest_offset else ""
        raise ConfigError(f"{flag} {seed}: give a seed from 0 to {top}{extra}, or -1 for a random one")


def check_base_seed(seed: int, prompts: int) -> None:
    """``--base_seed``: -1 (random) or a seed whose derived LR and HR seeds stay within int64."""
    if seed == -1:
        return
    offset = max(prompt_seeds(0, prompts))
    check_seed("--base_seed", seed, highest_offset=offset)


# --- add-ons: LoRAs and the start image ------------------------------------------------------------


def lora_refs(args: argparse.Namespace) -> dict[str, tuple[LoraRef, ...]]:
    """Each DiT role's LoRAs from ``--lora`` / ``--hr_lora``, every file found and its keys checked (header
    only) before any model loads; a bare name is looked for in the models folder's ``loras/``."""
    given = {role: getattr(args, flag, None) or [] for role, flag in LORA_FLAGS.items()}
    if not any(given.values()):
        return {}
    if getattr(args, "demo", False):
        raise ConfigError("--lora with --demo: the demo's tiny models take no Wan2.2-5B LoRA; leave out --demo to "
                          "use your models")
    root = Path(args.models).expanduser() if getattr(args, "models", None) else default_models_dir()
    refs = {}
    for role, texts in given.items():
        refs[role] = tuple(_lora(LORA_FLAGS[role], text, root / LORA_FOLDER) for text in texts)
    return refs


def _lora(flag: str, text: str, folder: Path) -> LoraRef:
    try:
        return parse_lora_arg(text, [folder])
    except PixelWizardError as error:
        raise ConfigError(f"--{flag} {text}: {error}") from None


def start_image(args: argparse.Namespace) -> torch.Tensor | None:
    """``--image`` read and decoded now (a bad file stops the run before any load); ``--pin_image_hr`` needs it."""
    if getattr(args, "pin_image_hr", False) and not getattr(args, "image", None):
        raise ConfigError("--pin_image_hr pins the start image: give it with --image FILE")
    return read_image(args.image) if getattr(args, "image", None) else None


# --- stage settings --------------------------------------------------------------------------------


def lr_settings(args: argparse.Namespace) -> StageSettings:
    """The LR anchor stage's settings from ``--lr_size``, ``--frame_num``, ``--lr_*``, checked."""
    width, height, _ = _named("--lr_size", args.lr_size, parse_resolution, args.lr_size)
    _named("--frame_num", args.frame_num, check_frames, args.frame_num)
    settings = StageSettings(width, height, args.frame_num, args.lr_steps, args.lr_shift, args.lr_guide_scale,
                             args.sample_solver)
    check_sampling(settings, "lr", LR_STEP_RANGE)
    check_stage(settings, hr=False)  # what the library checks itself (a backstop here)
    check_memory_cap(settings, "--lr_size", batch=2)  # both CFG branches in one batch
    return settings


def hr_settings(args: argparse.Namespace, frames: int) -> StageSettings:
    """The HR stage's settings; the preset fills ``--hr_steps`` / ``--hr_shift`` only when they are not given."""
    width, height, preset = _named("--resolution", args.resolution, parse_resolution, args.resolution)
    steps = args.hr_steps if args.hr_steps is not None else (preset.steps if preset else 4)
    shift = args.hr_shift if args.hr_shift is not None else (preset.shift if preset else 5.5)
    settings = StageSettings(width, height, frames, steps, shift, args.hr_guide_scale, args.hr_solver)
    check_sampling(settings, "hr", HR_STEP_RANGE)
    check_stage(settings, hr=True)
    check_memory_cap(settings, "--resolution")
    return settings


def check_sampling(settings: StageSettings, stage: str, steps: tuple[int, int]) -> None:
    """Steps in range; shift and guidance scale finite, the shift positive, the scale at least 1."""
    low, high = steps
    if not low <= settings.steps <= high:
        raise ConfigError(f"--{stage}_steps {settings.steps} is outside {low}..{high}; leave it out for the default")
    if finite(f"--{stage}_shift", settings.shift) <= 0:
        raise ConfigError(f"--{stage}_shift {settings.shift}: give a positive number (the reference: 5.0 for the "
                          "anchor, 5.5 at 2K, 5.8 at 4K)")
    if finite(f"--{stage}_guide_scale", settings.cfg) < 1:
        raise ConfigError(f"--{stage}_guide_scale {settings.cfg}: give 1 or more (1 turns the unconditional pass "
                          "off; the reference uses 5.0)")


def _named(flag: str, value: object, check, *args: object):
    """``check(*args)``, its refusal prefixed with the option and value the user typed."""
    try:
        return check(*args)
    except ConfigError as error:
        raise ConfigError(f"{flag} {value}: {error}") from None


def _stage_bytes(settings: StageSettings, batch: int = 1) -> int:
    return weight_bytes("hr") + dit_activation_bytes(settings.tokens, batch=batch)


def check_memory_cap(settings: StageSettings, flag: str, *, batch: int = 1) -> None:
    """Refuse a size (and frame count) whose stage the memory model puts far beyond the largest preset's."""
    name, largest = max(HR_PRESETS.items(), key=lambda item: item[1].pixels)
    reference = _stage_bytes(StageSettings(largest.width, largest.height, LR_DEFAULTS.frames, 4, 5.0, 5.0))
    need = _stage_bytes(settings, batch)
    if need > MEMORY_CAP_FACTOR * reference:
        raise ConfigError(
            f"{flag} {settings.width}x{settings.height} with {settings.frames} frames: this stage would need about "
            f"{_amount(need)} of memory, while {name} ({largest.width}x{largest.height}, {LR_DEFAULTS.frames} "
            f"frames), the largest preset, needs {_amount(reference)}; sizes up to {MEMORY_CAP_FACTOR}x that are "
            "accepted. Choose a smaller size or fewer frames")


def _amount(size: int) -> str:
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / GIB:.1f} GiB"


# --- decode ----------------------------------------------------------------------------------------


def decode_settings(args: argparse.Namespace, latent_hw: tuple[int, int] | None = None) -> DecodeSettings:
    """Tiles, overlap, quality and budget, checked against the latent's size (h, w) when it is known."""
    if not CRF_RANGE[0] <= args.crf <= CRF_RANGE[1]:
        raise ConfigError(f"--crf {args.crf}: libx264 takes {CRF_RANGE[0]} (best) to {CRF_RANGE[1]} (worst); "
                          "10 matches the reference, 18 is usually visually lossless")
    if args.num_patches < 0:
        raise ConfigError(f"--num_patches {args.num_patches}: give 0 (automatic) or a tile count of 1 or more")
    if args.overlap < 0:
        raise ConfigError(f"--overlap {args.overlap}: give 0 or more latent columns (16 pixels each)")
    budget = finite("--decode_budget_gib", getattr(args, "decode_budget_gib", 0.0))
    if budget < 0:
        raise ConfigError(f"--decode_budget_gib {budget}: give 0 (no cap: the GPU's free memory) or a number of GiB")
    if latent_hw is not None:
        check_tiles(latent_hw, args.num_patches, args.patch_dim, args.overlap)
    return DecodeSettings(args.num_patches, args.patch_dim, args.overlap, args.blend, args.decode_order,
                          crf=args.crf, budget_bytes=int(budget * GIB) if budget else None)


def check_tiles(latent_hw: tuple[int, int], num_patches: int, patch_dim: str, overlap: int) -> None:
    """The tile layout fits the latent: at most one tile per latent position, an overlap below a tile's share."""
    if num_patches == AUTO_PATCHES:
        check_overlap(overlap)
        if overlap >= min(latent_hw):
            raise ConfigError(f"--overlap {overlap} is as wide as the whole latent ({latent_hw[1] * SCALE}x"
                              f"{latent_hw[0] * SCALE} pixels); use a few latent columns (the reference's 3)")
        return
    try:
        plan_tiles(latent_hw, num_patches, patch_dim, overlap)
    except ConfigError as error:
        raise ConfigError(f"--num_patches {num_patches} --patch_dim {patch_dim} --overlap {overlap}: {error}") from None
    split = [length for length, dim in zip(latent_hw, "hw") if dim in patch_dim]
    share = min(length // num_patches for length in split)
    if num_patches > 1 and overlap >= share:
        raise ConfigError(f"--overlap {overlap} is not smaller than a tile's share ({share} latent positions with "
                          f"--num_patches {num_patches}); use a smaller overlap or fewer tiles")


def hr_latent_hw(settings: StageSettings) -> tuple[int, int]:
    return settings.height // SCALE, settings.width // SCALE


# --- warnings: geometry and checkpoint identity ----------------------------------------------------


def warn_anchor_geometry(anchor_size: tuple[int, int], hr: StageSettings, label: str) -> bool:
    """Warn when the anchor would be stretched to the HR size by more than 2% (whether it warned)."""
    aw, ah = anchor_size
    mismatch = abs(math.log((aw / ah) / (hr.width / hr.height)))
    # The reference pairs its 448x256 anchor with every preset: 4K's 3840x2144 (2160 rounded down to a
    # multiple of 32) is 2.3% off it by design, so that pairing is not worth a warning.
    reference_pair = (aw, ah) == (LR_DEFAULTS.width, LR_DEFAULTS.height) and any(
        (p.width, p.height) == (hr.width, hr.height) for p in HR_PRESETS.values())
    if mismatch <= ASPECT_TOLERANCE or reference_pair:
        return False
    log.warning("%s: the anchor is %dx%d (aspect %.3f) but the HR size is %dx%d (aspect %.3f): it will be stretched "
                "by %.1f%%; make the anchor with a --lr_size of the HR aspect ratio, or choose a matching --resolution",
                label, aw, ah, aw / ah, hr.width, hr.height, hr.width / hr.height, 100 * (math.exp(mismatch) - 1))
    return True


_PRESET_TOKEN = re.compile(r"(?<![a-z0-9])(\d+k)(?![a-z0-9])", re.IGNORECASE)


def checkpoint_preset(path: str | Path) -> str | None:
    """The preset a checkpoint's file name or folder names ("2k" for ``PixelWizard/2k/model.pt`` or
    ``pixelwizard_2K.safetensors``), if exactly one known preset is named."""
    parts = Path(path).parts[-2:]
    found = {m.lower() for part in parts for m in _PRESET_TOKEN.findall(part)} & set(HR_PRESETS)
    return found.pop() if len(found) == 1 else None


def warn_checkpoint_preset(hr_ckpt: str | Path | None, hr: StageSettings) -> bool:
    """Warn when the HR checkpoint's name says one preset and the size is another's: the 2K and 4K checkpoints
    have identical keys, so their names are all there is to tell them apart (whether it warned)."""
    if not hr_ckpt:
        return False
    named = checkpoint_preset(hr_ckpt)
    try:
        wanted = preset_for_size(hr.width, hr.height).checkpoint
    except ConfigError:
        return False  # larger than every preset: no checkpoint is made for it anyway
    if named is None or named == wanted:
        return False
    log.warning("--hr_ckpt %s is named for %s, but %dx%d is served by the %s checkpoint; the two have the same keys "
                "and nothing else tells them apart: pass %s/model.pt (download %s), or ignore this if you mean it",
                hr_ckpt, named, hr.width, hr.height, wanted, wanted, wanted)
    return True
