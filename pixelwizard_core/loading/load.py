"""Build a model from any published weight layout without ever holding two copies of the weights.

Steps, all before any tensor data is read: open the file (header / mmap only), recognise the layout by
its keys, derive the config from the shapes, build the model on the meta device, and check strictly that
the file holds exactly the model's keys with the model's shapes. Then tensors are read one at a time (shard
by shard for a sharded folder), dequantised or cast to the target dtype, moved to the target device and
put in place of the meta parameter. ``device="meta"`` stops after the checks: a dry run that reads no data.

Models that keep derived tensors outside the state dict (non-persistent buffers, plain tensor attributes)
must rebuild them in a method ``reset_non_persistent_buffers()``; it is called after the weights are in
place, on the device the parameters now live on. Any tensor still on the meta device afterwards is an error.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..errors import ConfigError, MissingFileError, WeightFormatError
from ..models.dit import DiTConfig, WanDiT
from ..models.hr import STEP_SIZE_CONDITIONING_KEY, STEP_SIZE_CONDITIONINGS, WanHRDiT
from ..models.quantized import is_quantized
from ..models.t5 import T5Config, UMT5Encoder
from ..models.vae import VAEConfig, WanVAE
from . import folders
from .configs import derive_values, make_config, published_differences
from .formats import KeyPlan, plan_keys, require_component, verify_keys
from .fp8 import check_quantization, dequantize, is_fp8
from .gguf import keep_quantized
from .readers import PickleCheckpoint, TensorSource, open_file_source

log = logging.getLogger("pixelwizard")

PathLike = str | Path
DTypeLike = torch.dtype | str | None
Progress = Callable[[int, int], None]

# component -> (config class, model class)
MODEL_CLASSES: dict[str, tuple[type, type[nn.Module]]] = {
    "dit": (DiTConfig, WanDiT),
    "hr_dit": (DiTConfig, WanHRDiT),
    "vae": (VAEConfig, WanVAE),
    "t5": (T5Config, UMT5Encoder),
}
_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_FLOAT_TARGETS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------- public API

def load_dit(
    path: PathLike,
    *,
    dtype: DTypeLike = None,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """The Wan2.2-TI2V-5B DiT (``WanDiT``) from a single file, the official folder, or a PixelWizard LR ``.pt``.

    Args:
        path: a ``.safetensors`` file (bare or ``model.diffusion_model.``-prefixed keys), a shard index json,
            the official Wan-AI folder, or a PixelWizard LR ``model.pt`` (``generator`` first, then
            ``generator_ema``, then a bare state dict; ``use_ema=True`` prefers the EMA weights).
        dtype: target dtype (torch dtype or 'bf16'/'fp16'/'fp32'); None keeps the file's dtype (fp8 -> bf16).
        device: 'cpu', 'cuda[:N]', or 'meta' for a dry run that checks keys and shapes and reads no data.
        config_overrides: config fields the shapes cannot tell (e.g. ``num_heads`` for a non-Wan width).
        progress: called as ``progress(done, total)`` after each tensor.
    """
    with open_weights(path, "dit", use_ema=use_ema) as source:
        return load_from_source(source, "dit", dtype=dtype, device=device, overrides=config_overrides,
                                progress=progress)


def load_hr_dit(
    path: PathLike,
    *,
    use_ema: bool = False,
    dtype: DTypeLike = None,
    adapter_dtype: DTypeLike = torch.float32,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    step_size_conditioning: str | None = None,
) -> nn.Module:
    """The PixelWizard HR DiT (``WanHRDiT``) from its checkpoint (``2k/model.pt``, ``4k/model.pt`` or a file
    converted to safetensors).

    The file must hold exactly the 825 base keys, the 4 ``dt_embedding`` keys and the 18 ``spatial_adapter``
    keys (strict, unlike the reference's non-strict adapter load). ``use_ema`` picks ``generator_ema`` over
    ``generator``; a file with only one of them uses that one (logged). ``adapter_dtype`` keeps the anchor
    injector in float32 as the reference does (None: same as ``dtype``). ``step_size_conditioning`` names
    the registered step-size conditioning to build; None uses the one the file records in its metadata
    (``step_size_conditioning``, written by the trainer), else the reference's ``sinusoidal``.
    Other arguments as :func:`load_dit`.
    """
    overrides = {"spatial_adapter.": _as_dtype(adapter_dtype)} if adapter_dtype is not None else None
    with open_weights(path, "hr_dit", use_ema=use_ema) as source:
        name = step_size_conditioning or recorded_step_size_conditioning(source)
        return load_from_source(source, "hr_dit", dtype=dtype, device=device, overrides=config_overrides,
                                dtype_overrides=overrides, progress=progress,
                                model_kwargs={"step_size_conditioning": name})


def recorded_step_size_conditioning(source: TensorSource) -> str:
    """The step-size conditioning a checkpoint says it was trained with ('sinusoidal' when it says nothing).

    The value may be a bare string or JSON-encoded (files written through ``save_tensor_file``)."""
    raw = source.metadata.get(STEP_SIZE_CONDITIONING_KEY)
    if raw is None:
        return "sinusoidal"
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    name = value if isinstance(value, str) else raw
    if name not in STEP_SIZE_CONDITIONINGS:
        raise ConfigError(
            f"{source.describe()} was trained with the step-size conditioning {name!r}, which is not registered "
            f"here (registered: {', '.join(sorted(STEP_SIZE_CONDITIONINGS))}). Import the module that calls "
            "register_step_size_conditioning for it before loading, or pass step_size_conditioning=... explicitly."
        )
    return name


def load_vae(
    path: PathLike,
    *,
    dtype: DTypeLike = None,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """The Wan2.2 VAE (``WanVAE``) from ``Wan2.2_VAE.pth``, Comfy-Org ``wan2.2_vae.safetensors`` or the official
    folder. Arguments as :func:`load_dit`."""
    with open_weights(path, "vae") as source:
        return load_from_source(source, "vae", dtype=dtype, device=device, overrides=config_overrides,
                                progress=progress)


def load_t5(
    path: PathLike,
    *,
    dtype: DTypeLike = None,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """The umT5-XXL encoder (``UMT5Encoder``) from the official ``.pth`` / folder or a Comfy-Org file
    (fp16, or fp8 scaled: dequantised as fp8 x scale, to bf16 when ``dtype`` is None).

    The tokenizer that comes with the weights: :func:`load_t5_tokenizer` on the same path.
    Other arguments as :func:`load_dit`.
    """
    with open_weights(path, "t5") as source:
        return load_from_source(source, "t5", dtype=dtype, device=device, overrides=config_overrides,
                                progress=progress)


def load_t5_tokenizer(path: PathLike, max_length: int | None = None) -> Any:
    """The umT5 tokenizer shipped with the text encoder at ``path`` (``max_length`` None: the length its
    tokenizer.json sets, else Wan's 512).

    A Comfy-Org file carries it as the tensor ``spiece_model``; the official folder (or a ``.pth`` inside it)
    has it in ``google/umt5-xxl``; a tokenizer folder itself also works.
    """
    from .tokenizer import UMT5Tokenizer

    path = Path(path).expanduser()
    if path.is_file():
        key = _spiece_key(path)
        if key is not None:
            with open_weights(path, "t5") as source:
                return UMT5Tokenizer.from_spiece_bytes(source.read(key), max_length, source=f"{path}:{key}")
    folder = folders.tokenizer_folder(path)
    if folder is None and not path.exists():
        raise MissingFileError(f"{path} does not exist: expected a umT5 text encoder file or a tokenizer folder.")
    return UMT5Tokenizer.from_folder(folder or (path if path.is_dir() else path.parent), max_length)


def _spiece_key(path: Path) -> str | None:
    try:
        opened = open_file_source(path)
    except WeightFormatError:
        return None
    if isinstance(opened, PickleCheckpoint):
        keys = [k for section in opened.sections.values() for k in section]
    else:
        keys = list(opened.infos)
        opened.close()
    return next((k for k in keys if k.rsplit(".", 1)[-1] == "spiece_model"), None)


# ---------------------------------------------------------------------------------------------- opening

def open_weights(path: PathLike, component: str, *, use_ema: bool = False) -> TensorSource:
    """A tensor source for ``component`` at ``path`` (file or folder); a pickle's section chosen for it."""
    file = folders.resolve(path, component)
    opened = open_file_source(file)
    if isinstance(opened, PickleCheckpoint):
        return opened.source(choose_section(opened, prefer_ema=use_ema))
    return opened


def choose_section(ckpt: PickleCheckpoint, *, prefer_ema: bool) -> str:
    """``generator`` (or ``generator_ema`` when preferred), else the other one, else the bare state dict."""
    order = ("generator_ema", "generator") if prefer_ema else ("generator", "generator_ema")
    names = list(ckpt.sections)
    for rank, name in enumerate(order):
        if name in ckpt.sections:
            if rank:
                log.warning("%s has no '%s' weights; using '%s' instead.", ckpt.path, order[0], name)
            else:
                log.info("%s: using the '%s' weights.", ckpt.path, name)
            return name
    if "" in ckpt.sections:
        return ""
    if len(names) == 1:
        return names[0]
    raise WeightFormatError(
        f"{ckpt.path} holds several state dicts ({', '.join(names)}) and none is named 'generator' or "
        "'generator_ema', so it is unclear which one to load."
    )


# ---------------------------------------------------------------------------------------------- core

def model_classes(component: str) -> tuple[type, type[nn.Module]]:
    """(config class, model class) of a component."""
    return MODEL_CLASSES[component]


def plan_for(source: TensorSource, component: str) -> KeyPlan:
    """Recognise the source, require ``component``, and check its quantisation scheme (no weights read)."""
    where = source.describe()
    plan = plan_keys(source.infos, source.metadata, where)
    require_component(plan, component, where)
    check_quantization(plan, source.read, source.infos, where)
    return plan


def load_from_source(
    source: TensorSource,
    component: str,
    *,
    dtype: DTypeLike = None,
    device: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    dtype_overrides: Mapping[str, torch.dtype] | None = None,
    progress: Progress | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Check ``source`` against the model it describes and load it (see the module docstring).
    ``model_kwargs`` go to the model class after the config (e.g. the HR step-size conditioning)."""
    start = time.perf_counter()
    dev = _as_device(device)
    requested = _as_dtype(dtype)
    plan = plan_for(source, component)
    where = source.describe()
    config_cls, model_cls = model_classes(component)
    overrides = {**recorded_config(source, component), **(overrides or {})}
    config = make_config(component, config_cls, derive_values(component, plan.shapes), overrides, where)
    _warn_if_not_published(component, config, where)
    model = build_on_meta(model_cls, config, **(model_kwargs or {}))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    verify_keys(plan, expected, where)
    target = requested or default_dtype(plan, source)
    dtypes = _DtypeChooser(model, target, dtype_overrides)
    if dev.type == "meta":
        for name in expected:
            _assign(model, name, torch.empty(expected[name], dtype=dtypes(name), device="meta"))
    else:
        _fill(model, plan, source, dtypes, dev, progress)
        finish(model)
    model.eval().requires_grad_(False)
    log.info(
        "Loaded %s from %s [%s]: %d tensors, %s -> %s on %s in %.1f s",
        component, where, plan.layout.describe(), len(plan.tensors), _file_dtypes(plan, source), target, dev,
        time.perf_counter() - start,
    )
    return model


# Config fields no shape shows, which a file may record in its metadata (the toy world's DiTs attend to 16
# text rows; a file that records nothing gets the config's default, Wan's 512).
RECORDED_CONFIG_FIELDS = {"dit": ("text_len",), "hr_dit": ("text_len",)}


def recorded_config(source: TensorSource, component: str) -> dict[str, int]:
    """The config fields ``source`` records in its metadata (as decimal strings)."""
    found = {}
    for name in RECORDED_CONFIG_FIELDS.get(component, ()):
        raw = source.metadata.get(name)
        if raw is None:
            continue
        if not str(raw).strip().isdigit() or int(raw) < 1:
            raise WeightFormatError(f"{source.describe()}: its metadata says {name} = {raw!r}; expected a positive "
                                    "whole number")
        found[name] = int(raw)
    return found


def _warn_if_not_published(component: str, config: Any, where: str) -> None:
    # Another Wan model (2.1, the 14B ones) has the same key names and loads; say so before it is used.
    differences = published_differences(component, config)
    if differences:
        listed = ", ".join(f"{k} {have} (published {want})" for k, (have, want) in differences.items())
        log.warning("%s is not the size of the published Wan2.2-TI2V-5B model: %s", where, listed)


def build_on_meta(model_cls: type, config: Any, **kwargs: Any) -> nn.Module:
    """Construct the model without allocating its weights."""
    with torch.device("meta"):
        return model_cls(config, **kwargs)


def default_dtype(plan: KeyPlan, source: TensorSource) -> torch.dtype:
    """The float dtype that holds most of the file's weights; bf16 for fp8 and GGUF-quantized files, float32
    if none."""
    sizes: Counter[torch.dtype] = Counter()
    for target, key in plan.tensors.items():
        info = source.infos[key]
        if is_fp8(info.dtype) or target in plan.weight_scales or is_quantized(info.dtype):
            return torch.bfloat16
        if isinstance(info.dtype, torch.dtype) and info.dtype.is_floating_point:
            sizes[info.dtype] += info.numel
    return sizes.most_common(1)[0][0] if sizes else torch.float32


class _DtypeChooser:
    """Target dtype per key: floating weights get the target (or a prefix override), others keep theirs."""

    def __init__(self, model: nn.Module, target: torch.dtype, overrides: Mapping[str, torch.dtype] | None) -> None:
        self.declared = {k: v.dtype for k, v in model.state_dict().items()}
        self.target = target
        self.overrides = sorted((overrides or {}).items(), key=lambda kv: -len(kv[0]))

    def __call__(self, name: str) -> torch.dtype:
        declared = self.declared[name]
        if not declared.is_floating_point:
            return declared
        return next((d for p, d in self.overrides if name.startswith(p)), self.target)


def _fill(model: nn.Module, plan: KeyPlan, source: TensorSource, dtypes: _DtypeChooser, dev: torch.device,
          progress: Progress | None) -> None:
    position = {k: i for i, k in enumerate(source.infos)}
    items = sorted(plan.tensors.items(), key=lambda kv: position[kv[1]])  # file order: shard by shard
    # Readers hand out memory-mapped tensors (torch.load mmap, safetensors); the model gets its own copy
    # so it never depends on the file after loading (a rewritten file would change or fault the weights).
    copy = True
    for done, (target, key) in enumerate(items, 1):
        want = dtypes(target)
        if not keep_quantized(model, target, source, key, want, dev):  # GGUF blocks of a Linear stay blocks
            tensor = source.read(key)
            if target in plan.weight_scales:
                tensor = dequantize(tensor, source.read(plan.weight_scales[target]), want)
            _assign(model, target, _convert(tensor, want, dev, copy))
            del tensor
        if progress is not None:
            progress(done, len(items))


def _convert(tensor: torch.Tensor, dtype: torch.dtype, dev: torch.device, copy: bool) -> torch.Tensor:
    """Cast and move one tensor, narrowing on the CPU first so less crosses to the device."""
    original = tensor
    if tensor.dtype != dtype and tensor.element_size() > torch.empty((), dtype=dtype).element_size():
        tensor = tensor.to(dtype).to(dev)
    else:
        tensor = tensor.to(dev).to(dtype)
    if copy and tensor.device.type == "cpu" and _same_storage(tensor, original):
        tensor = tensor.clone()
    return tensor


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:  # the key came from model.state_dict(), so this is a model bug
        raise RuntimeError(f"{type(model).__name__}: state-dict key {name!r} is neither a parameter nor a buffer")


def finish(model: nn.Module) -> None:
    """Let the model rebuild tensors that are not in its state dict, then make sure none is left on meta."""
    hook = getattr(model, "reset_non_persistent_buffers", None)
    if callable(hook):
        hook()
    leftovers = meta_tensors(model)
    if leftovers:
        raise RuntimeError(
            f"{type(model).__name__} still has tensors on the meta device after loading: {', '.join(leftovers[:5])}. "
            "They are not in the state dict, so the model must rebuild them in reset_non_persistent_buffers()."
        )


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of parameters, buffers and plain tensor attributes that are on the meta device."""
    found = [n for n, t in model.named_parameters() if t.is_meta]
    found += [n for n, t in model.named_buffers() if t.is_meta]
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta:
                found.append(f"{prefix}.{attr}" if prefix else attr)
    return found


# ---------------------------------------------------------------------------------------------- arguments

def _as_dtype(dtype: DTypeLike) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _FLOAT_TARGETS:
        return dtype  # type: ignore[return-value]
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"dtype {dtype!r} is not a weight dtype PixelWizard loads into; use bf16, fp16 or fp32.")


def _as_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device (use 'cpu', 'cuda', 'cuda:1' or 'meta').") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible.")
    return dev


def _file_dtypes(plan: KeyPlan, source: TensorSource) -> str:
    counts = Counter(str(source.infos[k].dtype).replace("torch.", "") for k in plan.tensors.values())
    return "/".join(f"{d} x{n}" for d, n in counts.most_common())


__all__ = [
    "load_dit", "load_hr_dit", "load_vae", "load_t5", "load_t5_tokenizer", "open_weights", "load_from_source",
    "choose_section", "model_classes", "plan_for", "default_dtype", "meta_tensors", "recorded_step_size_conditioning",
]
