"""The reference's settings: LR anchor defaults, HR presets, sizes, seeds and the default negative prompt."""

from __future__ import annotations

import math

import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import Registry

# Wan2.2's default negative prompt (wan/configs/shared_config.py), used whenever none is given.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

SIZE_MULTIPLE = 32  # VAE 16x16 times the DiT's 2x2 patch
LATENT_CHANNELS = 48
FPS = 24


@dataclass(frozen=True)
class StageSettings:
    """How one stage samples: size in pixels, frames, steps, shift, guidance scale, solver."""

    width: int
    height: int
    frames: int
    steps: int
    shift: float
    cfg: float
    solver: str = "unipc"

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[48, T, H/16, W/16] of a video with these settings."""
        return (LATENT_CHANNELS, latent_frames(self.frames), self.height // 16, self.width // 16)

    @property
    def tokens(self) -> int:
        return latent_frames(self.frames) * (self.height // 32) * (self.width // 32)


LR_DEFAULTS = StageSettings(width=448, height=256, frames=121, steps=50, shift=5.0, cfg=5.0)


@dataclass(frozen=True)
class HRPreset:
    """An HR size with the reference's settings for it and the checkpoint trained for it."""

    width: int
    height: int
    steps: int
    shift: float
    decode_patches: int
    checkpoint: str  # key of its HR checkpoint in the download table (download.MODEL_FILES)

    @property
    def pixels(self) -> int:
        return self.width * self.height


# The registry: the CLI's --resolution, the HR sampler node's combo, doctor's table and the download
# command's items all list these. A new preset is one entry here plus its checkpoint's download entry.
HR_PRESETS: Registry[HRPreset] = Registry("HR preset")
HR_PRESETS.register("2k", HRPreset(width=2560, height=1440, steps=4, shift=5.5, decode_patches=3, checkpoint="2k"))
HR_PRESETS.register("4k", HRPreset(width=3840, height=2144, steps=4, shift=5.8, decode_patches=4, checkpoint="4k"))


def preset_for_size(width: int, height: int) -> HRPreset:
    """The preset whose checkpoint serves ``width`` x ``height``: the one of that size, else the smallest
    preset with at least as many pixels. Larger than every preset: ConfigError (never another preset's
    checkpoint silently)."""
    exact = [p for p in HR_PRESETS.values() if (p.width, p.height) == (width, height)]
    covering = exact or sorted((p for p in HR_PRESETS.values() if p.pixels >= width * height),
                               key=lambda p: p.pixels)
    if not covering:
        largest = max(HR_PRESETS.items(), key=lambda item: item[1].pixels)
        raise ConfigError(f"no PixelWizard HR checkpoint is made for {width}x{height}: the largest preset is "
                          f"{largest[0]} ({largest[1].width}x{largest[1].height}); choose a size up to that, or "
                          "give an HR checkpoint yourself (--hr_ckpt)")
    return covering[0]
HR_STEP_RANGE = (2, 8)
HR_CFG = 5.0


def latent_frames(frames: int) -> int:
    """Latent frames of a video of ``frames`` frames (4k+1)."""
    return (frames - 1) // 4 + 1


def check_frames(frames: int) -> None:
    if frames < 1 or frames % 4 != 1:
        raise ConfigError(f"frame count {frames} is not of the form 4k+1 (e.g. 81, 121): the VAE packs 4 frames per latent frame")


def check_size(width: int, height: int) -> None:
    if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ConfigError(
            f"size {width}x{height} is not a multiple of {SIZE_MULTIPLE} in both dimensions; "
            f"try {floor_size(width)}x{floor_size(height)}"
        )


def floor_size(value: int) -> int:
    """The multiple of 32 at or below ``value`` (never more memory than asked for): 2160 -> 2144."""
    return max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)


def parse_resolution(resolution: str) -> tuple[int, int, HRPreset | None]:
    """'2k', '4k' or 'WxH' (also 'W*H') -> (width, height, preset or None)."""
    key = resolution.strip().lower()
    if key in HR_PRESETS:
        preset = HR_PRESETS[key]
        return preset.width, preset.height, preset
    match = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", key)
    if not match:
        raise ConfigError(f"resolution {resolution!r} is neither a preset ({', '.join(HR_PRESETS)}) nor WIDTHxHEIGHT")
    width, height = int(match.group(1)), int(match.group(2))
    check_size(width, height)
    return width, height, None


def check_stage(settings: StageSettings, *, hr: bool) -> None:
    """Refuse settings the stage cannot run, before any model is loaded."""
    check_size(settings.width, settings.height)
    check_frames(settings.frames)
    low, high = HR_STEP_RANGE if hr else (1, 1000)
    if not low <= settings.steps <= high:
        raise ConfigError(f"{'HR' if hr else 'LR'} steps {settings.steps} outside {low}..{high}")
    # written so that NaN fails too (every comparison with NaN is False); infinity is no shift or scale either
    if not 0 < settings.shift < math.inf:
        raise ConfigError(f"shift {settings.shift} must be a positive number (the reference uses 5.0 LR, 5.5 2K, "
                          "5.8 4K)")
    if not 1 <= settings.cfg < math.inf:
        raise ConfigError(f"guidance scale {settings.cfg} must be at least 1 (1 disables the unconditional pass)")


def prompt_seeds(base_seed: int, index: int) -> tuple[int, int]:
    """(lr_seed, hr_seed) of the prompt at 1-based ``index``, as the reference derives them."""
    return base_seed + 100 * index, base_seed + 100 * (index - 1) + 10000
