"""Where each component lives inside a folder: the official Wan-AI checkpoint folder or a PixelWizard one.

Only folders are resolved by file name (the official layout is fixed); a file given directly is always
recognised by its keys.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingFileError, WeightFormatError

DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
VAE_FILE = "Wan2.2_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
PIXELWIZARD_FILE = "model.pt"  # lr/model.pt, 2k/model.pt, 4k/model.pt

OFFICIAL_LAYOUT = (
    "an official Wan-AI/Wan2.2-TI2V-5B folder holds diffusion_pytorch_model-0000N-of-00003.safetensors with "
    f"{DIT_INDEX}, {VAE_FILE}, {T5_FILE} and the tokenizer folder {TOKENIZER_DIR.as_posix()}/"
)

# component -> file names tried in order inside a folder
_CANDIDATES = {
    "dit": (DIT_INDEX, "diffusion_pytorch_model.safetensors", PIXELWIZARD_FILE),
    "hr_dit": (PIXELWIZARD_FILE,),
    "vae": (VAE_FILE,),
    "t5": (T5_FILE,),
}
_EXPECTED = {
    "dit": f"{DIT_INDEX} and its shards (or a PixelWizard {PIXELWIZARD_FILE})",
    "hr_dit": f"PixelWizard HR checkpoint {PIXELWIZARD_FILE} (from the 2k/ or 4k/ folder of the release)",
    "vae": VAE_FILE,
    "t5": T5_FILE,
}


def resolve(path: str | Path, component: str) -> Path:
    """The weight file (or shard index) to open for ``component``; a file path is returned as is."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: expected a weight file or a checkpoint folder.")
    return _in_folder(path, component)


def _in_folder(folder: Path, component: str) -> Path:
    for name in _CANDIDATES[component]:
        if (folder / name).is_file():
            return folder / name
    if component == "dit":
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return indexes[0]
    _refuse_diffusers_folder(folder)
    raise MissingFileError(
        f"{folder} has no {_EXPECTED[component]}; expected it at {folder / _CANDIDATES[component][0]}. "
        f"({OFFICIAL_LAYOUT}.) Download the missing file into that folder, or pass the weight file itself."
    )


def _refuse_diffusers_folder(folder: Path) -> None:
    if (folder / "model_index.json").is_file() or (folder / "transformer").is_dir():
        raise WeightFormatError(
            f"{folder} is a diffusers pipeline folder (Wan-AI/Wan2.2-TI2V-5B-Diffusers layout: model_index.json, "
            "transformer/, vae/, text_encoder/), whose weights use diffusers names. PixelWizard loads the official "
            "Wan-AI/Wan2.2-TI2V-5B folder or the Comfy-Org repackaged single files."
        )


def tokenizer_folder(path: str | Path) -> Path | None:
    """The folder holding the umT5 tokenizer that belongs to ``path`` (a folder or a file in one), if any."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    for where in (folder, folder / TOKENIZER_DIR):
        if (where / "tokenizer.json").is_file() or (where / "spiece.model").is_file():
            return folder
    return None
