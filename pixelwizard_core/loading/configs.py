"""Model configs read from tensor shapes, so any file (full size or a tiny test file) builds its own model.

Like ComfyUI's detection: DiT dim from head.modulation, layer count from the block indices, and so on.
What shapes cannot tell (attention heads of the DiT, eps, text length) comes from Wan's constants or the
config class defaults; callers can override any field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from ..errors import ConfigError, WeightFormatError

Shapes = Mapping[str, tuple[int, ...]]

DIT_HEAD_DIM = 128  # every Wan2.x DiT uses 128-wide heads; the head count is not visible in any shape

# The published Wan2.2-TI2V-5B sizes, to tell a full-size file from a test or foreign one.
PUBLISHED: dict[str, dict[str, Any]] = {
    "dit": dict(dim=3072, ffn_dim=14336, freq_dim=256, num_heads=24, num_layers=30, in_dim=48, out_dim=48,
                patch_size=(1, 2, 2), text_dim=4096),
    "vae": dict(dim=160, dec_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                temperal_downsample=(False, True, True)),
    "t5": dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
               num_buckets=32, shared_pos=False),
}
PUBLISHED["hr_dit"] = PUBLISHED["dit"]

# Our derived name -> other spellings a config class might use.
_ALIASES = {
    "temperal_downsample": ("temporal_downsample",),
    "vocab": ("vocab_size",),
    "dim_ffn": ("ffn_dim",),
}


def _first(shapes: Shapes, *keys: str) -> tuple[int, ...] | None:
    for key in keys:
        if key in shapes:
            return tuple(shapes[key])
    return None


def _count(shapes: Shapes, pattern: str) -> int:
    indices = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def dit_values(shapes: Shapes) -> dict[str, Any]:
    """Config fields of a (HR) DiT from its official-name shapes; fields it cannot see are left out."""
    v: dict[str, Any] = {}
    dim_shape = _first(shapes, "head.modulation", "blocks.0.modulation")
    if dim_shape:
        v["dim"] = dim_shape[-1]
    pe = _first(shapes, "patch_embedding.weight")
    if pe and len(pe) == 5:
        v["in_dim"], v["patch_size"] = pe[1], tuple(pe[2:])
        head = _first(shapes, "head.head.weight")
        if head:
            v["out_dim"] = head[0] // math.prod(pe[2:])
    for name, key, axis in (
        ("ffn_dim", "blocks.0.ffn.0.weight", 0),
        ("freq_dim", "time_embedding.0.weight", 1),
        ("text_dim", "text_embedding.0.weight", 1),
    ):
        if key in shapes and len(shapes[key]) > axis:
            v[name] = shapes[key][axis]
    v["num_layers"] = _count(shapes, r"blocks\.(\d+)\.")
    if "dim" in v and v["dim"] % DIT_HEAD_DIM == 0:
        v["num_heads"] = v["dim"] // DIT_HEAD_DIM
    return v


def vae_values(shapes: Shapes) -> dict[str, Any]:
    """Config fields of the Wan2.2 VAE from its shapes."""
    v: dict[str, Any] = {}
    conv1 = _first(shapes, "encoder.conv1.weight")
    if conv1:
        v["dim"] = conv1[0]
    z = _first(shapes, "conv2.weight")
    if z:
        v["z_dim"] = z[0]
    stages = _count(shapes, r"encoder\.downsamples\.(\d+)\.")
    stage_out = [_first(shapes, f"encoder.downsamples.{i}.downsamples.0.residual.2.weight") for i in range(stages)]
    if "dim" in v and stages and all(stage_out):
        v["dim_mult"] = tuple(s[0] // v["dim"] for s in stage_out)
        head = _first(shapes, "decoder.head.2.weight")
        if head:
            v["dec_dim"] = head[1] // v["dim_mult"][0]
    blocks = _count(shapes, r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.")
    if blocks:
        v["num_res_blocks"] = blocks
        v["temperal_downsample"] = tuple(
            f"encoder.downsamples.{i}.downsamples.{blocks}.time_conv.weight" in shapes for i in range(stages - 1)
        )
    return v


def t5_values(shapes: Shapes) -> dict[str, Any]:
    """Config fields of the umT5 encoder from its official-name shapes."""
    v: dict[str, Any] = {}
    emb = _first(shapes, "token_embedding.weight")
    if emb:
        v["vocab"], v["dim"] = emb
    for name, key in (("dim_attn", "blocks.0.attn.q.weight"), ("dim_ffn", "blocks.0.ffn.fc1.weight")):
        if key in shapes:
            v[name] = shapes[key][0]
    v["shared_pos"] = "pos_embedding.embedding.weight" in shapes
    pos = _first(shapes, "pos_embedding.embedding.weight", "blocks.0.pos_embedding.embedding.weight")
    if pos:
        v["num_buckets"], v["num_heads"] = pos
    v["num_layers"] = _count(shapes, r"blocks\.(\d+)\.")
    return v


DERIVE = {"dit": dit_values, "hr_dit": dit_values, "vae": vae_values, "t5": t5_values}


def derive_values(component: str, shapes: Shapes) -> dict[str, Any]:
    return DERIVE[component](shapes)


def make_config(
    component: str, config_cls: type, values: Mapping[str, Any], overrides: Mapping[str, Any] | None, where: str
) -> Any:
    """Instantiate ``config_cls`` from derived values (matched to its fields) and caller overrides."""
    names = {f.name: f for f in dataclasses.fields(config_cls)}
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise ConfigError(f"config_overrides {unknown} are not fields of {config_cls.__name__} ({', '.join(names)})")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        field_name = next((n for n in (name, *_ALIASES.get(name, ())) if n in names), None)
        if field_name is not None:
            kwargs[field_name] = _like_default(names[field_name], value)
    kwargs.update(overrides)
    if component in ("dit", "hr_dit") and "num_heads" not in kwargs and "dim" in kwargs:
        raise WeightFormatError(
            f"{where}: cannot tell the DiT's attention heads: dim {kwargs['dim']} is not a multiple of Wan's head "
            f"size {DIT_HEAD_DIM}. Pass config_overrides={{'num_heads': N}}."
        )
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise WeightFormatError(
            f"{where}: its shapes give an impossible {config_cls.__name__} {kwargs}: {exc}"
        ) from exc


def _like_default(f: dataclasses.Field, value: Any) -> Any:
    """Give sequence values the container type of the field's default (tuple vs list)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    if isinstance(value, (tuple, list)) and isinstance(default, (tuple, list)):
        return type(default)(value)
    return value


def published_differences(component: str, config: Any) -> dict[str, tuple[Any, Any]]:
    """Fields where ``config`` differs from the published Wan2.2-TI2V-5B model: name -> (file, published)."""
    out: dict[str, tuple[Any, Any]] = {}
    for name, value in PUBLISHED[component].items():
        field_name = next((n for n in (name, *_ALIASES.get(name, ())) if hasattr(config, n)), None)
        if field_name is None:
            continue
        have = getattr(config, field_name)
        have = tuple(have) if isinstance(value, tuple) else have
        if have != value:
            out[field_name] = (have, value)
    return out


def matches_published(component: str, config: Any) -> bool:
    """True when the config has the published Wan2.2-TI2V-5B sizes."""
    return not published_differences(component, config)
