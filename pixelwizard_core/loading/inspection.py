"""Describe a weight file without loading it: for ``doctor`` and the download verifier.

Reads headers only (safetensors) or the pickle structure (memory-mapped ``.pt``), never tensor data
beyond tiny fp8 markers. Problems are reported in the result instead of raised, so a caller can list
every file's state; only a path that does not exist raises.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MissingFileError, PixelWizardError
from . import folders
from .configs import derive_values, make_config, matches_published
from .formats import COMPONENT_NAMES, plan_keys
from .load import choose_section, load_from_source, model_classes, plan_for
from .readers import PickleCheckpoint, TensorSource, open_file_source


@dataclass
class WeightsInfo:
    """What a weight file is. ``problem`` is None when it would load."""

    path: str
    container: str = "?"
    component: str | None = None
    layout: str = "unrecognised"
    section: str | None = None  # the pickle section that would be loaded ('' = bare state dict)
    sections: list[str] = field(default_factory=list)
    tensor_count: int = 0
    parameter_count: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> number of weight tensors
    quantization: str | None = None
    has_tokenizer: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    published_size: bool | None = None  # the config equals the released Wan2.2-TI2V-5B one
    loadable: bool | None = None  # strict key/shape check against the model passed (None: model code absent)
    problem: str | None = None

    def summary(self) -> str:
        """One line for people."""
        if self.component is None:
            return f"{self.path}: {self.problem}"
        dtypes = ", ".join(f"{d} x{n}" for d, n in self.dtypes.items())
        size = {True: "published size", False: "NOT the published size", None: "size unknown"}[self.published_size]
        state = "ok" if self.problem is None else f"PROBLEM: {self.problem}"
        return (
            f"{self.path}: {COMPONENT_NAMES[self.component]} [{self.layout}], {self.tensor_count} tensors, "
            f"{self.parameter_count / 1e9:.3f} B parameters, {dtypes}; {size}; {state}"
        )


def inspect_weights(path: str | Path, *, component: str | None = None, use_ema: bool = False) -> WeightsInfo:
    """Describe the weights at ``path`` (a file, a shard index, or a folder with ``component``, default 'dit')."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{path} does not exist.")
    info = WeightsInfo(str(path))
    try:
        _describe(info, path, component, use_ema)
    except PixelWizardError as exc:
        info.problem = str(exc)
    return info


def inspect_folder(folder: str | Path) -> dict[str, WeightsInfo]:
    """Describe each component of an official Wan-AI folder; a missing piece is reported in its entry."""
    out: dict[str, WeightsInfo] = {}
    for component in ("dit", "vae", "t5"):
        try:
            out[component] = inspect_weights(folders.resolve(folder, component), component=component)
        except PixelWizardError as exc:
            out[component] = WeightsInfo(str(folder), problem=str(exc))
    return out


def _describe(info: WeightsInfo, path: Path, component: str | None, use_ema: bool) -> None:
    file = folders.resolve(path, component or "dit")
    opened = open_file_source(file)
    if isinstance(opened, PickleCheckpoint):
        info.sections = list(opened.sections)
        opened = opened.source(choose_section(opened, prefer_ema=use_ema))
    with opened as source:
        info.container = source.container
        info.section = getattr(source, "section", None)
        plan = plan_keys(source.infos, source.metadata, source.describe())
        layout = plan.layout
        info.component, info.layout, info.quantization = layout.component, layout.describe(), layout.quantization
        info.tensor_count = len(plan.tensors)
        info.parameter_count = sum(source.infos[k].numel for k in plan.tensors.values())
        counts = Counter(str(source.infos[k].dtype).replace("torch.", "") for k in plan.tensors.values())
        info.dtypes = dict(counts.most_common())
        info.has_tokenizer = plan.tokenizer_key is not None or (
            layout.component == "t5" and folders.tokenizer_folder(file) is not None
        )
        plan_for(source, component or layout.component)  # the component asked for, and the fp8 scheme
        _check_model(info, source, layout.component, plan.shapes)


def _check_model(info: WeightsInfo, source: TensorSource, component: str, shapes: dict) -> None:
    """Config, size, and a strict dry-run load on the meta device (no data read)."""
    try:
        config_cls, _ = model_classes(component)
    except ImportError:
        return  # model code not importable: the file is described, not checked against the model
    info.loadable = False
    config = make_config(component, config_cls, derive_values(component, shapes), None, source.describe())
    info.config = dict(vars(config))
    info.published_size = matches_published(component, config)
    load_from_source(source, component, device="meta")
    info.loadable = True
