"""The tiny PixelWizard of the toy world: model configs, stage sizes and the shipped weight files.

Every model has the real structure (Wan2.2 DiT blocks with 128-wide heads, the HR model's dt embedding and
anchor injector, the Wan2.2 VAE's stages with z_dim 48, a umT5 encoder with per-layer relative positions)
at toy widths. The files are in the published layouts (bare official key names; the HR file with the
reference's ``model.`` prefix), so the project's loaders read them like real checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.dit import DiTConfig
from ..models.t5 import T5Config
from ..models.vae import VAEConfig
from .vocab import TEXT_ROWS, vocabulary

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FILES = {
    "text": "umt5_toy.safetensors",
    "vae": "wan2.2_vae_toy.safetensors",
    "lr": "pixelwizard_lr_toy.safetensors",
    "hr": "pixelwizard_hr_toy.safetensors",
}
TOKENIZER_FILE = "tokenizer.json"  # next to the text encoder, where the tokenizer loader looks
MANIFEST_FILE = "demo.json"         # files and settings, read by pipeline/demo.py

T5 = T5Config(vocab=len(vocabulary()), dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
# dim 256 (two heads of 128): one token carries a 2x2 patch of 48 latent channels, 192 values; a
# narrower model cannot pass the noise of a token through and never got below half the flow-matching loss
DIT = DiTConfig(dim=256, ffn_dim=512, freq_dim=256, num_heads=2, num_layers=4, text_dim=T5.dim,
                text_len=TEXT_ROWS)
# the decoder twice as wide as the encoder (it draws the sharp edges); narrow low-resolution stages keep
# the file small
VAE = VAEConfig(dim=8, dec_dim=16, dim_mult=(1, 2, 2, 2))


@dataclass(frozen=True)
class ToySizes:
    """Stage sizes of the toy world (pixels and frames); HR is 3x the anchor (2K is ~5.7x 448x256): an HR
    DiT step of batch 8 (144 tokens) takes about 0.45 s on one CPU core, so the HR model trains in about
    20 minutes."""

    lr_width: int = 128
    lr_height: int = 64
    hr_width: int = 384
    hr_height: int = 192
    frames: int = 5


SIZES = ToySizes()
# Sampling settings of the toy world: the HR sampler is the release's (UniPC, 4 steps, shift 5.5). The
# guidance scales suit the toy models: the HR model's unconditional branch (trained with an empty prompt
# *and* a zeroed anchor, as the reference's CFG dropout does) is far from its conditional one, so guiding
# at HR paints blotches; the anchor already carries the prompt, and CFG 1 runs one pass per step.
LR_STEPS, LR_SHIFT, LR_CFG = 20, 5.0, 3.0
HR_STEPS, HR_SHIFT, HR_CFG = 4, 5.5, 1.0
# three tiles along the width: they meet at 1/3 and 2/3, away from the split background's centre edge
TILES, OVERLAP = 3, 1
DEMO_PROMPT = "a red circle moving right on a dark background"
# the same as ``generate`` options (what ``generate --demo`` sets; written to the folder's demo.json)
STAGE_SETTINGS = {
    "lr_size": f"{SIZES.lr_width}*{SIZES.lr_height}", "frame_num": SIZES.frames, "lr_steps": LR_STEPS,
    "lr_shift": LR_SHIFT, "lr_guide_scale": LR_CFG, "resolution": f"{SIZES.hr_width}x{SIZES.hr_height}",
    "hr_steps": HR_STEPS, "hr_shift": HR_SHIFT, "hr_guide_scale": HR_CFG, "num_patches": TILES, "overlap": OVERLAP,
}


def weight_paths(folder: str | Path = WEIGHTS_DIR) -> dict[str, Path]:
    """role -> file of the toy models in ``folder``."""
    return {role: Path(folder) / name for role, name in FILES.items()}


def weights_present(folder: str | Path = WEIGHTS_DIR) -> bool:
    paths = weight_paths(folder)
    return all(p.is_file() for p in paths.values()) and (Path(folder) / TOKENIZER_FILE).is_file()


def manifest() -> dict:
    """The content of ``demo.json``: the files by role, the ``generate`` settings and the demo prompt."""
    return {"files": dict(FILES), "settings": dict(STAGE_SETTINGS), "prompt": DEMO_PROMPT}


# Where ``toy-install`` puts each file in a ComfyUI models folder (a subfolder of its own, so the
# tokenizer can sit next to the text encoder without meeting another model's)
INSTALL_FOLDERS = {"text": "text_encoders", "tokenizer": "text_encoders", "vae": "vae", "lr": "diffusion_models",
                   "hr": "diffusion_models"}
INSTALL_SUBFOLDER = "pixelwizard_toy"


def install(models: str | Path, folder: str | Path = WEIGHTS_DIR) -> dict[str, Path]:
    """Copy the toy files into a ComfyUI-layout models folder (``<kind>/pixelwizard_toy/<file>``, the
    tokenizer beside the text encoder), each under a temporary name first; returns role -> installed file."""
    import shutil

    from ..errors import MissingFileError
    from ..files import publish, temporary_name

    if not weights_present(folder):
        raise MissingFileError(f"no toy models in {folder}: `python -m pixelwizard_core train-toy` writes them")
    sources = {**weight_paths(folder), "tokenizer": Path(folder) / TOKENIZER_FILE}
    installed = {}
    for role, source in sources.items():
        target = Path(models) / INSTALL_FOLDERS[role] / INSTALL_SUBFOLDER / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_name(target)
        try:
            shutil.copyfile(source, temporary)
            publish(temporary, target, overwrite=True)
        finally:
            temporary.unlink(missing_ok=True)
        installed[role] = target
    return installed
