"""Tiny random-weight model sets written in the published file layouts, for end-to-end tests.

Shapes follow the real models where the pipeline depends on them (48 latent channels, head_dim 128,
512 context rows); widths and depths are tiny so a whole generation runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import manifest
from safetensors.torch import save_file

from pixelwizard_core.models.dit import DiTConfig, WanDiT
from pixelwizard_core.models.hr import WanHRDiT
from pixelwizard_core.models.t5 import T5Config, UMT5Encoder
from pixelwizard_core.models.vae import VAEConfig, WanVAE

DIT = DiTConfig(dim=128, ffn_dim=256, freq_dim=256, num_heads=1, num_layers=2, text_dim=32)
T5 = T5Config.tiny(dim=32)
VAE = VAEConfig.tiny()


def _weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's own init, with zero-initialised layers given small random values (so they matter)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.abs().max() == 0 and tensor.dim() > 1:
            tensor = torch.randn(tensor.shape, generator=generator) * 0.02
        state[name] = tensor.detach().clone().contiguous()
    return state


def state_dicts(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return {
        "dit": _weights(WanDiT(DIT), seed),
        "hr": _weights(WanHRDiT(DIT), seed + 1),
        "t5": _weights(UMT5Encoder(T5), seed + 2),
        "vae": _weights(WanVAE(VAE), seed + 3),
    }


def _t5_hf_names() -> dict[str, str]:
    return {k: v["hf_name"] for k, v in manifest("umt5_xxl_encoder")["keys"].items()}


def write_official(folder: Path, states: dict, spiece: Path) -> Path:
    """The Wan-AI folder: 3 DiT shards + index json, Wan2.2_VAE.pth, the umT5 .pth, google/umt5-xxl/."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, weight_map = list(states["dit"]), {}
    for i in range(3):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        part = {k: states["dit"][k] for k in keys[i::3]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save(states["vae"], folder / "Wan2.2_VAE.pth")
    torch.save({k: v.to(torch.bfloat16) for k, v in states["t5"].items()}, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    tokenizer_dir = folder / "google" / "umt5-xxl"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "spiece.model").write_bytes(spiece.read_bytes())
    return folder


def write_comfy(folder: Path, states: dict, spiece: Path) -> dict[str, Path]:
    """Comfy-Org single files: prefixed fp16 DiT, fp16 VAE, HF-named umT5 carrying spiece_model."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"dit": folder / "wan2.2_ti2v_5B_fp16.safetensors", "vae": folder / "wan2.2_vae.safetensors",
             "t5": folder / "umt5_xxl_fp16.safetensors"}
    save_file({f"model.diffusion_model.{k}": v.half() for k, v in states["dit"].items()}, files["dit"])
    save_file({k: v.half() for k, v in states["vae"].items()}, files["vae"])
    names = _t5_hf_names()
    t5 = {names[k]: v.half() for k, v in states["t5"].items()}
    spm = spiece.read_bytes()
    t5["spiece_model"] = torch.frombuffer(bytearray(spm), dtype=torch.uint8)
    save_file(t5, files["t5"])
    return files


def write_pixelwizard(folder: Path, states: dict) -> dict[str, Path]:
    """The release layout: lr/model.pt (generator + generator_ema) and 2k/model.pt (generator)."""
    files = {"lr": folder / "lr" / "model.pt", "hr": folder / "2k" / "model.pt"}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    lr = {f"model.{k}": v for k, v in states["dit"].items()}
    torch.save({"generator": lr, "generator_ema": lr}, files["lr"])
    torch.save({"generator": {f"model.{k}": v for k, v in states["hr"].items()}}, files["hr"])
    return files
