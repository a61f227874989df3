"""Parity of pixelwizard_core.models.vae.WanVAE with the official Wan2.2 VAE (wan/modules/vae2_2.py).

    /work/refvenv/bin/python tools/parity/vae.py --wan-repo /path/to/Wan2.2

Builds the official WanVAE_ and ours with VAEConfig.tiny() (same structure, narrow channels), fills both
with the same seeded random weights (rounded to float16 values so the fixture can store them as float16
without changing them), runs encode and decode in float32 on CPU and prints
max|ours - theirs| / max|theirs| for each. Then writes tests/fixtures/parity_vae.safetensors with the
weights ("model.<key>"), the inputs ("input.video", "input.latent") and the official outputs
("official.encode", "official.decode"); tests/test_vae.py checks ours against it without the official code.

The official Wan2_2_VAE wrapper cannot build a small config and loads weights from a file, so the script
drives its inner WanVAE_ directly and repeats what the wrapper adds: scale = [mean, 1/std] in float32,
`.float()` on the encoder output, `.float().clamp_(-1, 1)` on the decoder output. Its
`amp.autocast(float32)` only concerns CUDA tensors and is a no-op here. Nothing else is patched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pixelwizard_core.models.vae import LATENT_MEAN, LATENT_STD, VAEConfig, WanVAE  # noqa: E402
from tools.parity.official import official_module, relative_error  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "parity_vae.safetensors"
VIDEO_SHAPE = (1, 3, 5, 32, 48)    # 5 frames -> 2 latent frames of 2x3
LATENT_SHAPE = (1, 48, 3, 2, 3)    # 3 latent frames -> 9 frames of 32x48


def seeded_weights(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every key, scaled like a trained network (unit-variance activations), rounded
    to float16-representable values. The decoder head is scaled down so few outputs hit the clamp."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in sorted(model.state_dict().items()):
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("gamma"):
            value = 1.0 + 0.2 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        else:
            fan_in = param[0].numel()
            value = noise / fan_in**0.5
            if name.startswith("decoder.head"):
                value = value * 0.3
        weights[name] = value.half().float()
    return weights


def run_official(vae2_2, config: VAEConfig, weights, video, latent):
    model = vae2_2.WanVAE_(
        dim=config.dim, dec_dim=config.dec_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks, attn_scales=[], temperal_downsample=list(config.temporal_downsample),
        dropout=0.0).eval()
    model.load_state_dict(weights)
    scale = [torch.tensor(LATENT_MEAN, dtype=torch.float32), 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32)]
    with torch.no_grad():
        encoded = model.encode(video, scale).float()
        decoded = model.decode(latent, scale).float().clamp_(-1, 1)
    return encoded, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wan-repo", default=None, help="checkout of Wan-Video/Wan2.2 (or set WAN22_REPO)")
    parser.add_argument("--no-write", action="store_true", help="measure only, leave the fixture alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae2_2 = official_module("vae2_2", args.wan_repo)

    config = VAEConfig.tiny()
    ours = WanVAE(config).eval()
    weights = seeded_weights(ours)
    ours.load_state_dict(weights)
    gen = torch.Generator().manual_seed(1)
    video = (torch.rand(VIDEO_SHAPE, generator=gen) * 2 - 1).half().float()
    latent = torch.randn(LATENT_SHAPE, generator=gen)

    encoded, decoded = run_official(vae2_2, config, weights, video, latent)
    our_encoded, our_decoded = ours.encode(video), ours.decode(latent)
    clamped = (decoded.abs() == 1).float().mean().item()
    print(f"encode {tuple(video.shape)} -> {tuple(encoded.shape)}: rel err {relative_error(our_encoded, encoded):.3e}")
    print(f"decode {tuple(latent.shape)} -> {tuple(decoded.shape)}: rel err {relative_error(our_decoded, decoded):.3e} "
          f"(official output clamped at +-1: {clamped:.1%})")
    if args.no_write:
        return

    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.half() for k, v in weights.items()}
    tensors.update({"input.video": video.half(), "input.latent": latent,
                    "official.encode": encoded.contiguous(), "official.decode": decoded.contiguous()})
    meta = {"config": json.dumps({"dim": config.dim, "dec_dim": config.dec_dim, "z_dim": config.z_dim,
                                  "dim_mult": list(config.dim_mult), "num_res_blocks": config.num_res_blocks,
                                  "temporal_downsample": list(config.temporal_downsample)}),
            "source": "tools/parity/vae.py against Wan-Video/Wan2.2 wan/modules/vae2_2.py"}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(FIXTURE), metadata=meta)
    print(f"wrote {FIXTURE.relative_to(ROOT)} ({FIXTURE.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
