"""LoRA files for the Wan2.2-TI2V-5B DiT: the key formats found in the wild, mapped to our parameter names.

Only names and shapes decide (the file's header), so a file is checked before anything heavy happens.
Formats recognised (research/comfyui_memory_and_formats.md §2), on any of these module spellings:

- our (official Wan) names, bare (``blocks.0.self_attn.q``, DiffSynth / musubi) or prefixed
  ``diffusion_model.`` / ``model.diffusion_model.`` (ComfyUI's generic map, Kijai's extracts),
  ``base_model.model.`` (PEFT), ``pipe.dit.`` (DiffSynth);
- the same names with ``.`` written ``_`` behind ``lora_unet_`` (kohya / musubi), ``lora_unet__`` (Fun),
  ``lycoris_`` (LyCORIS / ai-toolkit);
- diffusers names (``transformer.blocks.0.attn1.to_q``, ``condition_embedder.*``, ``proj_out``), dotted or
  behind ``lora_transformer_``. attn1 is self-attention in diffusers' Wan, attn2 cross-attention.

Per module: ``lora_down``/``lora_up`` (+ ``alpha``), ``lora_A``/``lora_B`` (also ``.default`` and without
``.weight``), ``lora.down``/``lora.up``, ``lora_linear_layer.down/up``; ``.diff`` / ``.diff_b`` full weight
and bias deltas, ``.diff_m`` for a block's modulation. The update of a weight W is
``strength * alpha / rank * up @ down`` (rank = rows of down; alpha = rank when the file has none), or
``strength * diff``: what ComfyUI applies.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import ConfigError, MissingFileError, WeightFormatError
from ..models.dit import DiTConfig, WanDiT
from .readers import SafetensorsSource, read_safetensors_header, sniff_container

LORA_FOLDER = "loras"  # ComfyUI's model folder for them
EXPECTED_FORMAT = (
    "a LoRA for the Wan2.2-TI2V-5B DiT: keys such as diffusion_model.blocks.0.self_attn.q.lora_down.weight / "
    ".lora_up.weight / .alpha (ComfyUI, kohya lora_unet_blocks_0_self_attn_q.*), .lora_A/.lora_B (PEFT, "
    "diffusers transformer.blocks.0.attn1.to_q.*), or .diff/.diff_b full deltas, on the modules of the 30 "
    "blocks (self_attn, cross_attn: q k v o; ffn.0, ffn.2) and the embeddings and head"
)

# (suffix, part): the longest spellings first, so ".lora_A.weight" is not read as ".lora_A"
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora_up.weight", "up"), (".lora_down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_B", "up"), (".lora_A", "down"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
# other adapter families ComfyUI knows: named in the refusal rather than reported as unknown keys
_OTHER_ADAPTERS = {".hada_": "LoHa", ".lokr_": "LoKr", ".lora_mid.": "LoCon (mid)", ".dora_scale": "DoRA",
                   ".oft_": "OFT", ".w_norm": "GLoRA/norm", ".b_norm": "GLoRA/norm", ".set_weight": "set_weight"}
# stripped (repeatedly) until the rest names one of our modules
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.",
             "model.", "lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
# our name -> diffusers' name (Wan2.2 in diffusers: WanTransformer3DModel)
_DIFFUSERS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^blocks\.(\d+)\.self_attn\.([qkv])$", r"blocks.\1.attn1.to_\2"),
    (r"^blocks\.(\d+)\.self_attn\.o$", r"blocks.\1.attn1.to_out.0"),
    (r"^blocks\.(\d+)\.self_attn\.(norm_[qk])$", r"blocks.\1.attn1.\2"),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])$", r"blocks.\1.attn2.to_\2"),
    (r"^blocks\.(\d+)\.cross_attn\.o$", r"blocks.\1.attn2.to_out.0"),
    (r"^blocks\.(\d+)\.cross_attn\.(norm_[qk])$", r"blocks.\1.attn2.\2"),
    (r"^blocks\.(\d+)\.ffn\.0$", r"blocks.\1.ffn.net.0.proj"),
    (r"^blocks\.(\d+)\.ffn\.2$", r"blocks.\1.ffn.net.2"),
    (r"^blocks\.(\d+)\.norm3$", r"blocks.\1.norm2"),  # diffusers' norm2 is the affine cross-attention norm
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^time_embedding\.0$", "condition_embedder.time_embedder.linear_1"),
    (r"^time_embedding\.2$", "condition_embedder.time_embedder.linear_2"),
    (r"^time_projection\.1$", "condition_embedder.time_proj"),
    (r"^text_embedding\.0$", "condition_embedder.text_embedder.linear_1"),
    (r"^text_embedding\.2$", "condition_embedder.text_embedder.linear_2"),
    (r"^head\.head$", "proj_out"),
    (r"^head\.modulation$", "scale_shift_table"),
))


class LoraRef(NamedTuple):
    """One LoRA file with its strength, as a model handle carries it: the file's path, and its size and
    mtime so that a replaced file is merged anew. A handle sends its LoRAs to other processes as plain
    tuples (``ModelHandle.__getstate__``); :func:`as_refs` makes them LoraRefs again."""

    path: str
    strength: float = 1.0
    size: int = 0
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).name

    def describe(self) -> str:
        return f"{self.name} @ {self.strength:g}"


def lora_ref(path: str | os.PathLike, strength: float = 1.0) -> LoraRef:
    """A checked reference to a LoRA file: it exists, is a safetensors file, and its keys name modules of
    the Wan2.2-5B DiT (header only; shapes are checked against the model when it is merged)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"LoRA file {path} does not exist: put it in ComfyUI's models/{LORA_FOLDER} folder "
                               "or give its full path")
    strength = float(strength)
    if not math.isfinite(strength):
        raise ConfigError(f"LoRA strength {strength!r} for {path.name}: give a finite number (1.0 = as trained)")
    plan_lora(_header_keys(path), base_parameter_names(), str(path))
    stat = path.stat()
    return LoraRef(str(path), strength, stat.st_size, stat.st_mtime_ns)


def parse_lora_arg(text: str, folders: Iterable[str | os.PathLike] = ()) -> LoraRef:
    """``FILE:STRENGTH`` or ``FILE`` (strength 1.0) from the command line, checked by :func:`lora_ref`; a FILE
    that does not exist as given is looked for in ``folders`` (e.g. the models folder's ``loras``). The
    strength is what follows the last ":" when it is a number, so Windows paths (``C:\\...``) work."""
    path, _, tail = text.rpartition(":")
    try:
        strength = float(tail) if path else 1.0
    except ValueError:
        path, strength = text, 1.0
    path = path or text
    candidates = [Path(path).expanduser(), *(Path(folder) / path for folder in folders)]
    found = next((c for c in candidates if c.is_file()), candidates[0])
    return lora_ref(found, strength)


def as_refs(loras: Iterable[tuple]) -> tuple[LoraRef, ...]:
    """A handle's LoRAs as :class:`LoraRef` (plain tuples after a trip through a pickle)."""
    return tuple(LoraRef(*lora) for lora in loras)


@functools.cache
def base_parameter_names() -> frozenset[str]:
    """The parameter names of the Wan2.2-5B DiT (30 blocks), from a narrow copy: names only."""
    return frozenset(name for name, _ in WanDiT(DiTConfig.tiny(num_layers=30)).named_parameters())


# --- names ------------------------------------------------------------------------------------------

class _Target(NamedTuple):
    name: str  # a module (its ".weight" is adapted) or a parameter (modulation tables: diffs only)
    is_module: bool


def _spellings(name: str) -> set[str]:
    """Our name, its diffusers name, and both with "." written "_" (the kohya style)."""
    spelled = {name}
    for pattern, replacement in _DIFFUSERS:
        if pattern.match(name):
            spelled.add(pattern.sub(replacement, name))
    return spelled | {s.replace(".", "_") for s in spelled}


def alias_table(parameter_names: Iterable[str]) -> dict[str, _Target]:
    """Every spelling of every adaptable module (and non-weight parameter) -> what it names."""
    table: dict[str, _Target] = {}
    for param in parameter_names:
        if param.endswith(".bias"):
            continue  # adapted through its module's ".diff_b"
        target = _Target(param[:-len(".weight")], True) if param.endswith(".weight") else _Target(param, False)
        for spelling in _spellings(target.name):
            table.setdefault(spelling, target)
    return table


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], part
    return None


def _resolve(stem: str, table: Mapping[str, _Target]) -> _Target | None:
    while stem not in table:
        prefix = next((p for p in _PREFIXES if stem.startswith(p)), None)
        if prefix is None:
            return None
        stem = stem[len(prefix):]
    return table[stem]


def _parameter_for(key: str, table: Mapping[str, _Target], params: frozenset[str] | set[str]) -> tuple[str, str] | None:
    """(our parameter name, part) for one key of a LoRA file, or None when it names nothing of ours.
    Parts: "up", "down", "alpha" (of a module's weight), "diff" (any parameter)."""
    split = _split_suffix(key)
    if split is None:
        return None
    stem, part = split
    if part == "diff_m":  # WanVideoWrapper's spelling of a block's modulation delta
        stem, part = stem + ".modulation", "diff"
    target = _resolve(stem, table)
    if target is None:
        return None
    if part == "diff_b":
        bias = target.name + ".bias"
        return (bias, "diff") if target.is_module and bias in params else None
    if not target.is_module:
        return (target.name, part) if part == "diff" else None
    return target.name + ".weight", part


def plan_lora(keys: Iterable[str], parameter_names: Iterable[str], where: str) -> dict[str, dict[str, str]]:
    """Our parameter name -> {part: key in the file} for every key of a LoRA file, or a WeightFormatError
    naming what does not fit: keys of other adapter kinds, keys that name none of our modules (the first
    few), a file whose keys name none at all ("not a Wan2.2-5B LoRA"), an up without its down."""
    keys, params = list(keys), frozenset(parameter_names)
    table = alias_table(params)
    plan: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        found = _parameter_for(key, table, params)
        if found is None:
            unknown.append(key)
        else:
            plan.setdefault(found[0], {})[found[1]] = key
    _refuse_other_adapters(keys, where)
    if not plan:
        raise WeightFormatError(f"{where} is not a Wan2.2-5B LoRA: none of its {len(keys)} keys names a module of "
                                f"the Wan2.2-TI2V-5B DiT (keys like {_sample(keys)}). Expected {EXPECTED_FORMAT}.")
    if unknown:
        raise WeightFormatError(f"{where}: {len(unknown)} of its {len(keys)} keys match no module of the Wan2.2-5B "
                                f"DiT: {_sample(unknown)}{_block_hint(unknown, params)}. Expected {EXPECTED_FORMAT}.")
    _check_pairs(plan, where)
    return plan


def _refuse_other_adapters(keys: list[str], where: str) -> None:
    kinds = {name: key for key in keys for marker, name in _OTHER_ADAPTERS.items() if marker in key}
    if kinds:
        raise WeightFormatError(f"{where} holds {', '.join(sorted(kinds))} adapter weights (e.g. "
                                f"{next(iter(kinds.values()))}), which PixelWizard does not apply: only LoRA "
                                "(lora_down/lora_up, lora_A/lora_B with alpha) and .diff/.diff_b deltas")


def _check_pairs(plan: Mapping[str, Mapping[str, str]], where: str) -> None:
    for param, parts in plan.items():
        if ("up" in parts) != ("down" in parts):
            have, missing = ("up", "down") if "up" in parts else ("down", "up")
            raise WeightFormatError(f"{where}: {parts[have]} has no matching {missing} weight; the file is incomplete")
        if "alpha" in parts and "up" not in parts:
            raise WeightFormatError(f"{where}: {parts['alpha']} belongs to no lora_up/lora_down pair")


def _sample(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _block_hint(keys: list[str], params: frozenset[str]) -> str:
    """A hint when keys address blocks beyond ours: a LoRA for a deeper Wan model (14B: 40 blocks)."""
    ours = {int(m.group(1)) for p in params if (m := re.match(r"blocks\.(\d+)\.", p))}
    theirs = {int(m.group(1)) for k in keys if (m := re.search(r"blocks[._](\d+)[._]", k))}
    if ours and theirs and max(theirs) > max(ours):
        return (f" (the file addresses block {max(theirs)}; this DiT has {max(ours) + 1} blocks: a LoRA for another "
                "Wan model, e.g. the 14B with 40?)")
    return ""


# --- tensors ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraTerm:
    """The update a LoRA file makes to one of our parameters: ``up @ down`` scaled by ``scale`` (alpha/rank),
    or a full ``diff``; :meth:`delta` applies the strength."""

    target: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    diff: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    def delta(self, strength: float, device: torch.device, shape: torch.Size) -> torch.Tensor:
        """The float32 update of a parameter of ``shape``, on ``device``."""
        if self.diff is not None:
            return (self.diff.to(device, torch.float32) * strength).reshape(shape)
        product = self.up.to(device, torch.float32).flatten(1) @ self.down.to(device, torch.float32).flatten(1)
        return (product * (strength * self.scale)).reshape(shape)

    def fits(self, shape: torch.Size) -> bool:
        """Whether the update has the size of a parameter of ``shape`` ([out, in...] for a LoRA pair)."""
        if self.diff is not None:
            return self.diff.numel() == shape.numel()
        return len(shape) >= 2 and self.up.shape[0] == shape[0] and self.down[0].numel() == shape[1:].numel()

    def describe_shape(self) -> str:
        if self.diff is not None:
            return f"a .diff of shape {list(self.diff.shape)}"
        return f"a rank-{self.rank} update of shape [{self.up.shape[0]}, {self.down[0].numel()}]"


def read_lora(path: str | os.PathLike, parameter_names: Iterable[str]) -> list[LoraTerm]:
    """Every update the LoRA file at ``path`` makes to a model with ``parameter_names``."""
    path = Path(path)
    _require_safetensors(path)
    source = SafetensorsSource(path)
    try:
        plan = plan_lora(source.infos, parameter_names, str(path))
        return [_term(target, parts, source) for target, parts in plan.items()]
    finally:
        source.close()


def _term(target: str, parts: Mapping[str, str], source: SafetensorsSource) -> LoraTerm:
    if "diff" in parts:
        if "up" in parts:
            raise WeightFormatError(f"{source.path}: {target} has both a .diff and a LoRA pair; the file is damaged")
        return LoraTerm(target, diff=source.read(parts["diff"]))
    down, up = source.read(parts["down"]), source.read(parts["up"])
    if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
        raise WeightFormatError(f"{source.path}: {parts['up']} {tuple(up.shape)} and {parts['down']} "
                                f"{tuple(down.shape)} do not multiply (up [out, rank], down [rank, in])")
    rank = down.shape[0]
    alpha = float(source.read(parts["alpha"]).float().reshape(-1)[0]) if "alpha" in parts else float(rank)
    return LoraTerm(target, down=down, up=up, scale=alpha / rank)


def _require_safetensors(path: Path) -> None:
    kind = sniff_container(path)
    if kind != "safetensors":
        raise WeightFormatError(f"{path} is not a safetensors file (it looks like {kind}): LoRAs are read from "
                                ".safetensors files, as ComfyUI's loras folder holds them")


def _header_keys(path: Path) -> Iterator[str]:
    _require_safetensors(path)
    infos, _ = read_safetensors_header(path)
    return iter(infos)
