"""Everything the node pack needs from ComfyUI, in one place.

Uses ComfyUI when it is importable (model folders, progress bar, interrupt, VRAM, output/input folders,
the VIDEO type) and plain fallbacks otherwise (a models folder from PIXELWIZARD_MODELS, tqdm, no-op
interrupt), so the nodes can be imported and tested without the host.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

import torch

from pixelwizard_core.distributed.pool import PoolSpec
from pixelwizard_core.distributed.pool_stages import PoolStages
from pixelwizard_core.pipeline.engine import LocalStages, StageControl, Stages
from pixelwizard_core.pipeline.handles import ModelHandle
from pixelwizard_core.pipeline.memory import RESERVE_ENV
from pixelwizard_core.pipeline.store import SHARED_STORE
from pixelwizard_core.system import resolve_device

from .comfy_memory import ComfyModelManager

log = logging.getLogger("pixelwizard")

try:  # inside ComfyUI
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
except ImportError:  # tests, scripts, worker processes
    _mm = _comfy_utils = _folder_paths = None

IN_COMFYUI = _folder_paths is not None
AUTO_MEMORY = "auto"  # the loaders' memory mode that follows ComfyUI's VRAM state (memory_mode)
if _mm is not None:  # ComfyUI's model manager decides what sits on the GPU (nodes/comfy_memory.py)
    SHARED_STORE.host = ComfyModelManager(_mm)
    # --reserve-vram: our memory plans (decode tiles, the CFG batch) leave it alone, in the workers too
    os.environ[RESERVE_ENV] = str(int(_mm.extra_reserved_memory()))
MODEL_FOLDERS = ("diffusion_models", "vae", "text_encoders")
# ComfyUI lists only its own weight extensions; a key of ours per folder lists the .gguf files in the same
# directories (the list object is shared, so paths added later count too)
GGUF_KEYS = {"diffusion_models": "pixelwizard_gguf_diffusion_models", "text_encoders": "pixelwizard_gguf_text_encoders"}


def _register_gguf_folders(folders) -> None:
    for folder, key in GGUF_KEYS.items():
        if folder in folders.folder_names_and_paths and key not in folders.folder_names_and_paths:
            folders.folder_names_and_paths[key] = (folders.folder_names_and_paths[folder][0], {".gguf"})


if IN_COMFYUI:
    _register_gguf_folders(_folder_paths)


def _fallback_root() -> Path:
    return Path(os.environ.get("PIXELWIZARD_MODELS", "models")).expanduser()


def model_files(folder: str) -> list[str]:
    """Relative file names under a model folder (what combo widgets list)."""
    if IN_COMFYUI:
        names = _folder_paths.get_filename_list(folder)
        if folder in GGUF_KEYS:
            names = sorted({*names, *_folder_paths.get_filename_list(GGUF_KEYS[folder])})
        return names
    root = _fallback_root() / folder
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def relative_name(name: str) -> Path:
    """A model name from a combo or a saved workflow as a relative path, whichever separator it was saved
    with (ComfyUI on Windows lists ``PixelWizard\\2k\\model.pt``)."""
    return Path(*PureWindowsPath(name).parts)


def model_path(folder: str, name: str) -> Path:
    """Full path of a file picked in a combo widget; a clear error when it is gone."""
    if IN_COMFYUI:
        full = _folder_paths.get_full_path(folder, name)
        if full is None and folder in GGUF_KEYS:
            full = _folder_paths.get_full_path(GGUF_KEYS[folder], name)
    else:
        candidate = _fallback_root() / folder / relative_name(name)
        full = str(candidate) if candidate.is_file() else None
    if full is None:
        raise FileNotFoundError(f"model file {name!r} is not in the ComfyUI '{folder}' folder; put it there or pick another")
    return Path(full)


def output_dir() -> Path:
    if IN_COMFYUI:
        return Path(_folder_paths.get_output_directory())
    return Path(os.environ.get("PIXELWIZARD_OUTPUT", "output")).expanduser()


def input_dir() -> Path:
    if IN_COMFYUI:
        return Path(_folder_paths.get_input_directory())
    return Path(os.environ.get("PIXELWIZARD_INPUT", "input")).expanduser()


def device() -> torch.device:
    if _mm is not None:
        return _mm.get_torch_device()
    return resolve_device("auto")


@contextlib.contextmanager
def placed(handle: ModelHandle, working_bytes: int = 0) -> Iterator[object]:
    """The model of ``handle`` from the model store on ComfyUI's device for the block (ComfyUI first makes
    room for it and ``working_bytes``), at its home after, then cached GPU memory given back: the opener of
    the local stages."""
    work = device()
    with SHARED_STORE.use(handle, work, home=handle.home(work), working_bytes=working_bytes) as model:
        yield model
    free_memory()


def lease(handle: ModelHandle) -> ModelHandle:
    """``handle`` as a loader node outputs it: its model stays loaded while ComfyUI keeps the output."""
    return SHARED_STORE.lease(handle)


def memory_mode(choice: str) -> str:
    """A loader's memory mode; "auto" follows ComfyUI's VRAM state: --highvram (and --gpu-only) keeps the
    models on the GPU, --lowvram and --novram stream the DiTs' blocks, otherwise models go to the CPU when
    their stage ends. Outside ComfyUI "auto" offloads."""
    if choice != AUTO_MEMORY:
        return choice
    state = getattr(getattr(_mm, "vram_state", None), "name", "NORMAL_VRAM")
    return {"HIGH_VRAM": "gpu", "LOW_VRAM": "block_swap", "NO_VRAM": "block_swap"}.get(state, "offload")


def stages(pool: PoolSpec | None) -> Stages:
    """Where a node's stage runs: the connected multi-GPU pool's workers, else this process."""
    return LocalStages(placed) if pool is None else PoolStages(pool)


def control(label: str, previews: bool = False) -> StageControl:
    """ComfyUI's progress bar, Cancel (also polled by a pool while no step ends) and, for the sampling
    nodes, live latent previews."""
    bar = progress(label, previews)
    return StageControl(on_step=bar, on_preview=bar.preview, should_stop=check_interrupt)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """An on_step(done, total) callback for the library: ComfyUI's progress bar (which also checks for
    Cancel) and, where the host has a previewer, a live preview of the latent being sampled."""

    def __init__(self, label: str, previews: bool = False) -> None:
        self.label = label
        self.bar = None
        self._previewer = _latent_previewer() if previews else None
        self._pending_preview = None
        # the library calls preview(x0) only when this is set, so without a previewer nothing is computed
        self.preview = self._make_preview if self._previewer is not None else None

    def __call__(self, done: int, total: int) -> None:
        check_interrupt()
        if _comfy_utils is not None:
            self.bar = self.bar or _comfy_utils.ProgressBar(total)
            self.bar.update_absolute(done, total, self._pending_preview)
        else:
            log.debug("%s %d/%d", self.label, done, total)
        self._pending_preview = None

    def _make_preview(self, latent: torch.Tensor) -> None:
        self._pending_preview = self._previewer.decode_latent_to_preview_image("JPEG", latent[:1])


def progress(label: str, previews: bool = False) -> Progress:
    """Progress for a long node; ``previews``: also live latent previews (sampling nodes)."""
    return Progress(label, previews)


def _latent_previewer():
    """ComfyUI's previewer for Wan2.2 latents (its latent format is normalised as ours), following the
    user's preview setting; None outside ComfyUI or when previews are off."""
    try:
        import comfy.latent_formats
        import latent_preview
    except ImportError:
        return None
    try:
        return latent_preview.get_previewer(device(), comfy.latent_formats.Wan22())
    except Exception as error:  # a preview must never fail a run
        log.warning("no latent previews: %s", error)
        return None


def free_memory() -> None:
    """Give cached GPU memory back after a heavy node (ComfyUI's own helper when present)."""
    if _mm is not None:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def video_output(path: Path) -> object:
    """ComfyUI's VIDEO object for an mp4 when the host has the type; otherwise the path."""
    try:
        from comfy_api.input_impl import VideoFromFile
    except ImportError:
        return str(path)
    return VideoFromFile(str(path))
