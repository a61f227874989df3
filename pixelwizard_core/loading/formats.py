"""Which model a weight listing holds, in which published layout, and how its keys map to ours.

Everything here works on names and shapes only (no tensor data), so a multi-GB file is recognised
and checked from its header before anything is read. Layouts recognised:

- DiT, official names: the Wan-AI shards and Comfy-Org single files; Comfy exports may prefix every key
  with ``model.diffusion_model.``; PixelWizard training checkpoints prefix ``model.`` and may carry FSDP /
  activation-checkpoint / torch.compile fragments inside the names.
- PixelWizard HR DiT: the same plus ``dt_embedding.*`` and ``spatial_adapter.*``.
- Wan2.2 VAE: official names (``Wan2.2_VAE.pth`` and Comfy-Org ``wan2.2_vae.safetensors``).
- umT5 encoder: official names (``models_t5_umt5-xxl-enc-bf16.pth``) or the Hugging Face / Comfy-Org
  names, which are renamed here; Comfy files add ``spiece_model`` (the tokenizer) and, when fp8-scaled,
  scale tensors handled by :mod:`.fp8`.

The diffusers layouts use other module names and are refused with a pointer to the file to use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..errors import WeightFormatError
from ..models.quantized import is_quantized
from .readers import TensorInfo

SHORT_NAMES = {
    "dit": "Wan2.2-TI2V-5B DiT", "hr_dit": "PixelWizard HR DiT", "vae": "Wan2.2 VAE", "t5": "umT5-XXL encoder",
}
COMPONENT_NAMES = {
    "dit": "the Wan2.2-TI2V-5B DiT",
    "hr_dit": "the PixelWizard HR DiT (Wan2.2 DiT + dt_embedding + spatial_adapter)",
    "vae": "the Wan2.2 VAE",
    "t5": "the umT5-XXL text encoder",
}

# Wrapper fragments inside names: FSDP, activation checkpointing, torch.compile.
FSDP_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Prefixes stripped when every model key carries one; the longest matching one wins.
PREFIXES = {
    "model.diffusion_model.": "Comfy 'model.diffusion_model.' prefix",
    "diffusion_model.": "'diffusion_model.' prefix",
    "model.": "PixelWizard 'model.' prefix",
    "module.": "'module.' prefix",
}
# Tensors that are not model weights: the tokenizer, fp8 markers and scales.
_AUX_NAMES = ("scaled_fp8", "spiece_model")
_AUX_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")

_HF_T5_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^shared\.weight$", "token_embedding.weight"),
        (r"^encoder\.embed_tokens\.weight$", "token_embedding.weight"),
        (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
        (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
        (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
        (
            r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
            r"blocks.\1.pos_embedding.embedding.weight",
        ),
        (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
        (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
        (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
        (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
    )
)

_USE_INSTEAD = {
    "dit": (
        "the Comfy-Org repackaged single file wan2.2_ti2v_5B_fp16.safetensors (ComfyUI models/diffusion_models) "
        "or the official Wan-AI/Wan2.2-TI2V-5B folder (diffusion_pytorch_model-0000N-of-00003.safetensors "
        "+ diffusion_pytorch_model.safetensors.index.json)"
    ),
    "vae": (
        "the Comfy-Org wan2.2_vae.safetensors (ComfyUI models/vae) or Wan2.2_VAE.pth from the official "
        "Wan-AI/Wan2.2-TI2V-5B folder"
    ),
    "t5": (
        "the Comfy-Org umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors "
        "(ComfyUI models/text_encoders) or models_t5_umt5-xxl-enc-bf16.pth from the official folder"
    ),
}

LOOKED_FOR = (
    "the Wan2.2 DiT (head.modulation, patch_embedding.weight, blocks.N.self_attn.*; bare, with the "
    "'model.diffusion_model.' or 'model.' prefix, FSDP fragments allowed), the PixelWizard HR additions "
    "(dt_embedding.*, spatial_adapter.*), the Wan2.2 VAE (encoder.conv1.weight, conv2.weight, "
    "decoder.middle.0.residual.0.gamma), and the umT5 encoder (official blocks.N.attn.q.weight / "
    "token_embedding.weight, or Hugging Face encoder.block.N.layer.0.SelfAttention.q.weight / shared.weight)"
)


@dataclass(frozen=True)
class Layout:
    """What a listing was recognised as."""

    component: str  # "dit", "hr_dit", "vae", "t5"
    names: str  # "official" or "hf" (umT5 Hugging Face / Comfy names)
    prefix: str = ""
    fsdp: bool = False
    quantization: str | None = None  # None, "scaled_fp8" (scale_weight keys), "comfy_quant" (weight_scale)
    # or "gguf Q8_0" (GGUF block types, "/"-joined)

    def describe(self) -> str:
        parts = [SHORT_NAMES[self.component]]
        parts.append("Hugging Face / Comfy names" if self.names == "hf" else "official names")
        if self.prefix:
            parts.append(PREFIXES.get(self.prefix, f"prefix {self.prefix!r}"))
        if self.fsdp:
            parts.append("FSDP wrapper fragments")
        if self.quantization:
            gguf = self.quantization.startswith("gguf")
            parts.append(self.quantization if gguf else f"fp8 ({self.quantization})")
        return ", ".join(parts)


@dataclass
class KeyPlan:
    """Target (our) name -> source key, plus the non-weight tensors found next to the weights."""

    layout: Layout
    tensors: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    weight_scales: dict[str, str] = field(default_factory=dict)  # target weight -> source scale key
    input_scales: list[str] = field(default_factory=list)  # source keys, dropped
    quant_configs: dict[str, str] = field(default_factory=dict)  # target weight -> source '.comfy_quant' key
    quant_layers: dict[str, str] = field(default_factory=dict)  # target weight -> format, from the header
    dropped: list[str] = field(default_factory=list)  # markers and duplicates, dropped silently
    tokenizer_key: str | None = None


# ---------------------------------------------------------------------------------------------- helpers

def strip_fragments(key: str) -> str:
    for fragment in FSDP_FRAGMENTS:
        key = key.replace(fragment, "")
    return key


def is_aux(key: str) -> bool:
    """A tensor stored next to the weights that is not a weight (tokenizer, fp8 marker or scale)."""
    return key.rsplit(".", 1)[-1] in _AUX_NAMES or key.endswith(_AUX_SUFFIXES)


def common_prefix(keys: Iterable[str]) -> str:
    """The longest known prefix that every key starts with ('' if none)."""
    keys = list(keys)
    for prefix in PREFIXES:  # ordered longest first where they nest
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def hf_t5_to_official(name: str) -> str:
    """Rename one Hugging Face / Comfy umT5 key to the official name (unknown names are returned as-is)."""
    for pattern, repl in _HF_T5_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def _sample(keys: Iterable[str], n: int = 6) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------------------------------- detection

def classify(names: set[str], where: str) -> tuple[str, str]:
    """(component, names style) of prefix-free, fragment-free names; raises for refused/unknown layouts."""
    _refuse_diffusers(names, where)
    has_blocks = any(n.startswith("blocks.") and ".self_attn." in n for n in names)
    if has_blocks and ("head.modulation" in names or "patch_embedding.weight" in names):
        hr = any(n.startswith(("dt_embedding.", "spatial_adapter.")) for n in names)
        return ("hr_dit" if hr else "dit"), "official"
    vae_markers = ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight", "decoder.conv1.weight")
    if sum(m in names for m in vae_markers) >= 2:
        return "vae", "official"
    if "token_embedding.weight" in names or any(re.match(r"blocks\.\d+\.attn\.q\.weight$", n) for n in names):
        return "t5", "official"
    if any(n.startswith("encoder.block.") for n in names):
        if any(n.startswith("decoder.") for n in names) or "lm_head.weight" in names:
            raise WeightFormatError(
                f"{where} is a full umT5 encoder-decoder checkpoint (it has decoder.* keys). Wan2.2 uses only "
                f"the encoder: use {_USE_INSTEAD['t5']}."
            )
        return "t5", "hf"
    raise WeightFormatError(
        f"{where} is not a weight file PixelWizard knows. It has keys like: {_sample(sorted(names))}. "
        f"Looked for {LOOKED_FOR}."
    )


def _refuse_diffusers(names: set[str], where: str) -> None:
    wan_blocks = any(re.match(r"blocks\.\d+\.attn[12]\.", n) for n in names)
    markers = any(n.startswith(("condition_embedder.", "scale_shift_table", "proj_out.")) for n in names)
    if markers and wan_blocks:
        raise WeightFormatError(
            f"{where} is the diffusers layout of the Wan2.2 DiT (condition_embedder / attn1 / scale_shift_table "
            f"/ proj_out keys, as in Wan-AI/Wan2.2-TI2V-5B-Diffusers). PixelWizard loads the official names: "
            f"use {_USE_INSTEAD['dit']}."
        )
    vae = {"quant_conv.weight", "post_quant_conv.weight", "encoder.conv_in.weight", "decoder.conv_in.weight"}
    if names & vae or any(n.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for n in names):
        raise WeightFormatError(
            f"{where} is the diffusers layout of the VAE (conv_in / down_blocks / quant_conv keys, as in the "
            f"-Diffusers repository's vae/ folder). PixelWizard loads the official names: use {_USE_INSTEAD['vae']}."
        )


def plan_keys(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], where: str) -> KeyPlan:
    """Recognise a listing and map every weight to our name. Raises WeightFormatError when refused."""
    main = [k for k in infos if not is_aux(k)]
    if not main:
        raise WeightFormatError(f"{where} holds no model weights (keys: {_sample(list(infos))}).")
    cleaned = {k: strip_fragments(k) for k in main}
    fsdp = any(k != c for k, c in cleaned.items())
    prefix = common_prefix(cleaned.values())
    bare = {c[len(prefix):]: k for k, c in cleaned.items()}
    component, names = classify(set(bare), where)
    rename = hf_t5_to_official if names == "hf" else (lambda n: n)

    plan = KeyPlan(Layout(component, names, prefix, fsdp), {}, {})
    _map_weights(plan, bare, rename, infos, where)
    _refuse_other_models(plan, where)
    _map_aux(plan, [k for k in infos if is_aux(k)], prefix, rename, where)
    if "_quantization_metadata" in metadata:
        _map_metadata_layers(plan, metadata["_quantization_metadata"], prefix, rename, where)
    blocks = sorted({str(infos[k].dtype) for k in plan.tensors.values() if is_quantized(infos[k].dtype)})
    if blocks:  # GGUF block-quantized tensors (loading/gguf.py lists them with their type name as dtype)
        plan.layout = _with_quant(plan.layout, "gguf " + "/".join(blocks))
    return plan


def _refuse_other_models(plan: KeyPlan, where: str) -> None:
    """Same family, other model: files users often pick by mistake in ComfyUI's folders."""
    names = plan.tensors
    if plan.layout.component == "vae" and any(re.match(r"encoder\.downsamples\.\d+\.residual\.", n) for n in names):
        raise WeightFormatError(
            f"{where} is the Wan2.1 VAE (z_dim 16, used by Wan2.1 and the Wan2.2 14B models), not the Wan2.2 VAE "
            f"that Wan2.2-TI2V-5B needs: use {_USE_INSTEAD['vae']}."
        )
    pos = "blocks.{}.pos_embedding.embedding.weight"
    one_table = pos.format(0) in names and pos.format(1) not in names
    if plan.layout.component == "t5" and one_table and "blocks.1.attn.q.weight" in names:
        raise WeightFormatError(
            f"{where} is a T5 v1.1 encoder (one relative-position table for all layers, like the t5xxl files of "
            f"Flux / SD3), not umT5-XXL, which has one per layer. Wan2.2 needs {_USE_INSTEAD['t5']}."
        )


def _map_weights(plan: KeyPlan, bare: dict[str, str], rename, infos: Mapping[str, TensorInfo], where: str) -> None:
    for name, source in bare.items():
        target = rename(name)
        if target in plan.tensors:
            other = plan.tensors[target]
            if infos[other].shape != infos[source].shape:
                raise WeightFormatError(
                    f"{where}: {other!r} and {source!r} both map to {target!r} but have shapes "
                    f"{list(infos[other].shape)} and {list(infos[source].shape)}."
                )
            # Tied copies (shared.weight and encoder.embed_tokens.weight): keep the first one.
            plan.dropped.append(source)
            continue
        plan.tensors[target] = source
        plan.shapes[target] = infos[source].shape


def _aux_base(key: str, prefix: str) -> str:
    key = strip_fragments(key)
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def _map_aux(plan: KeyPlan, aux: list[str], prefix: str, rename, where: str) -> None:
    for key in aux:
        base = _aux_base(key, prefix)
        if base == "spiece_model":
            plan.tokenizer_key = key
        elif base == "scaled_fp8":
            plan.dropped.append(key)
            plan.layout = _with_quant(plan.layout, "scaled_fp8")
        elif base.endswith(_INPUT_SCALE_SUFFIXES):
            plan.input_scales.append(key)
        elif base.endswith(_WEIGHT_SCALE_SUFFIXES):
            target = _weight_of_layer(base.rsplit(".", 1)[0], plan, rename, key, where)
            plan.weight_scales[target] = key
            kind = "scaled_fp8" if base.endswith(".scale_weight") else "comfy_quant"
            plan.layout = _with_quant(plan.layout, plan.layout.quantization or kind)
        elif base.endswith(".comfy_quant"):
            target = _weight_of_layer(base[: -len(".comfy_quant")], plan, rename, key, where)
            plan.quant_configs[target] = key
            plan.layout = _with_quant(plan.layout, "comfy_quant")


def _map_metadata_layers(plan: KeyPlan, raw: str, prefix: str, rename, where: str) -> None:
    import json

    try:
        layers = json.loads(raw)["layers"]
        assert isinstance(layers, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise WeightFormatError(f"{where}: the header's _quantization_metadata is not JSON with a 'layers' object.")
    for layer, conf in layers.items():
        target = _weight_of_layer(_aux_base(layer, prefix), plan, rename, layer, where)
        plan.quant_layers[target] = str(conf.get("format") if isinstance(conf, dict) else conf)
    plan.layout = _with_quant(plan.layout, "comfy_quant")


def _weight_of_layer(layer: str, plan: KeyPlan, rename, key: str, where: str) -> str:
    target = rename(f"{layer}.weight")
    if target not in plan.tensors:
        raise WeightFormatError(f"{where}: {key!r} belongs to layer {layer!r}, which has no weight in the file.")
    return target


def _with_quant(layout: Layout, kind: str) -> Layout:
    return Layout(layout.component, layout.names, layout.prefix, layout.fsdp, kind)


# ---------------------------------------------------------------------------------------------- checks

def require_component(plan: KeyPlan, expected: str, where: str) -> None:
    """Refuse a file that holds another component than the one asked for, saying where it belongs."""
    found = plan.layout.component
    if found == expected:
        return
    hints = {
        ("dit", "hr_dit"): "It is the PixelWizard HR checkpoint: load it as the HR model (load_hr_dit).",
        ("hr_dit", "dit"): (
            "It has no dt_embedding / spatial_adapter weights, so it is a plain Wan2.2 DiT (base or PixelWizard "
            "LR). The HR stage needs the PixelWizard HR checkpoint (2k/model.pt or 4k/model.pt)."
        ),
    }
    hint = hints.get((expected, found), f"Pass it where {COMPONENT_NAMES[found]} is expected.")
    raise WeightFormatError(
        f"{where} holds {COMPONENT_NAMES[found]}, not {COMPONENT_NAMES[expected]}. {hint}"
    )


def verify_keys(plan: KeyPlan, expected: Mapping[str, tuple[int, ...]], where: str, limit: int = 5) -> None:
    """Strict check: the file's weights are exactly the model's keys, with the model's shapes."""
    missing = [k for k in expected if k not in plan.shapes]
    unexpected = [k for k in plan.shapes if k not in expected]
    wrong = [k for k in expected if k in plan.shapes and tuple(plan.shapes[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        items = "; ".join(f"{k} {list(expected[k])}" for k in missing[:limit])
        problems.append(f"{len(missing)} missing (model needs them): {items}")
    if unexpected:
        items = "; ".join(f"{plan.tensors[k]} {list(plan.shapes[k])}" for k in unexpected[:limit])
        problems.append(f"{len(unexpected)} unexpected (model has no such weight): {items}")
    if wrong:
        items = "; ".join(f"{k}: file {list(plan.shapes[k])}, model {list(expected[k])}" for k in wrong[:limit])
        problems.append(f"{len(wrong)} with the wrong shape: {items}")
    raise WeightFormatError(
        f"{where} does not match {COMPONENT_NAMES[plan.layout.component]} (detected layout: "
        f"{plan.layout.describe()}): " + " | ".join(problems) + ". The file is incomplete, edited, or from "
        "another model: download it again or use the published file."
    )
