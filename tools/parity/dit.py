"""Parity of our Wan DiT and PixelWizard HR DiT with the official Wan2.2 ``WanModel`` (float32, CPU).

Run: /work/refvenv/bin/python tools/parity/dit.py --wan-repo /path/to/Wan2.2
(the official module needs ``diffusers`` importable).

The official DiT calls flash-attn, which needs CUDA; here ``flash_attention`` is replaced by torch's
SDPA in float32 (no key masks are in play: no sequence-parallel padding, context_lens None).
The HR model is not in the official repository: its reference behaviour (pixelwizard_reference.md §2.2)
is rebuilt around the official WanModel with plain torch layers: the dt MLP is added to the output of
the official time embedding (a forward hook), and the injector's control is added to block 1's input by a forward
pre-hook, exactly where the PixelWizard reference hooks it.

Writes tests/fixtures/parity_dit.safetensors: our-named weights, inputs, official outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from official import official_module, relative_error  # noqa: E402

from pixelwizard_core.models.dit import DiTConfig, WanDiT  # noqa: E402
from pixelwizard_core.models.hr import WanHRDiT  # noqa: E402


def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, **_):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def randomise(module: nn.Module, generator: torch.Generator) -> None:
    """Random weights everywhere (the official init zeroes the head, which would hide errors)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def reference_hr(official, base: nn.Module, config: DiTConfig, generator: torch.Generator):
    """The PixelWizard HR forward rebuilt on the official WanModel; returns (call, extra weights)."""
    dim, freq = config.dim, config.freq_dim
    dt_mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))
    backbone = nn.Sequential(nn.Conv3d(config.in_dim, dim // 4, 1), nn.GroupNorm(16, dim // 4), nn.SiLU(),
                             nn.Conv3d(dim // 4, dim, 3, padding=1), nn.SiLU())
    feature_norm = nn.LayerNorm(dim, eps=1e-6)
    t_proj = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))
    dt_proj = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))
    zero = nn.Linear(dim, dim)
    for m in (dt_mlp, backbone, feature_norm, t_proj, dt_proj, zero):
        randomise(m, generator)
    sinus = official.sinusoidal_embedding_1d

    def call(x, t, context, seq_len, dt, anchor):
        dt_emb = dt_mlp(sinus(freq, dt).float())  # [B, dim]; the reference adds it to every token's e
        add_dt = base.time_embedding.register_forward_hook(lambda mod, args, out: out + dt_emb[:, None])
        a = feature_norm(backbone(anchor).flatten(2).transpose(1, 2))
        gate = torch.tanh(t_proj(sinus(freq, t[:, 0]).float()) + dt_proj(sinus(freq, dt).float()))
        control = zero(a * (1 + gate[:, None]))
        hook = base.blocks[1].register_forward_pre_hook(lambda mod, args: (args[0] + control,) + args[1:])
        try:
            return torch.stack(base(list(x), t=t, context=list(context), seq_len=seq_len))
        finally:
            hook.remove()
            add_dt.remove()

    extra = {f"dt_embedding.{k}": v for k, v in dt_mlp.state_dict().items()}
    parts = {"backbone": backbone, "feature_norm": feature_norm, "adapter_time_proj": t_proj,
             "adapter_dt_proj": dt_proj, "zero_layers.1": zero}
    for name, module in parts.items():
        extra.update({f"spatial_adapter.{name}.{k}": v for k, v in module.state_dict().items()})
    return call, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wan-repo", default=None)
    parser.add_argument("--out", default=str(ROOT / "tests/fixtures/parity_dit.safetensors"))
    args = parser.parse_args()
    official = official_module("model", args.wan_repo)
    official.flash_attention = sdpa_flash_attention
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1234)

    config = DiTConfig.tiny()
    base = official.WanModel(model_type="ti2v", patch_size=config.patch_size, text_len=config.text_len,
                             in_dim=config.in_dim, dim=config.dim, ffn_dim=config.ffn_dim,
                             freq_dim=config.freq_dim, text_dim=config.text_dim, out_dim=config.out_dim,
                             num_heads=config.num_heads, num_layers=config.num_layers, eps=config.eps).eval()
    randomise(base, generator)
    hr_call, hr_extra = reference_hr(official, base, config, generator)

    # two samples, different timesteps and prompt lengths, a grid that is not square
    x = torch.randn(2, config.in_dim, 3, 6, 8, generator=generator)
    t = torch.tensor([999.0, 437.0])
    context = torch.zeros(2, 9, config.text_dim)
    context[0, :5] = torch.randn(5, config.text_dim, generator=generator)
    context[1] = torch.randn(9, config.text_dim, generator=generator)
    dt = torch.tensor([56.0, 198.0])
    anchor = torch.randn(2, config.in_dim, 3, 3, 4, generator=generator)
    seq_len = 3 * 3 * 4

    with torch.no_grad():
        t_tokens = t[:, None].expand(2, seq_len)  # the official pipeline passes one t per token
        official_out = torch.stack(base([u for u in x], t=t_tokens, context=[context[0, :5], context[1]], seq_len=seq_len))
        official_hr = hr_call(x, t_tokens, [context[0, :5], context[1]], seq_len, dt, anchor)
        ours = WanDiT(config).eval()
        ours.load_state_dict(base.state_dict(), strict=True)
        ours_out = ours(x, t, context)
        state = {**base.state_dict(), **hr_extra}
        ours_hr = WanHRDiT(config).eval()
        ours_hr.load_state_dict(state, strict=True)
        ours_hr_out = ours_hr(x, t, context, dt=dt, anchor=anchor)

    print(f"DiT    rel err vs official: {relative_error(ours_out, official_out):.3e}")
    print(f"HR DiT rel err vs reference: {relative_error(ours_hr_out, official_hr):.3e}")
    tensors = {f"weight.{k}": v.contiguous() for k, v in state.items()}
    tensors.update(x=x, t=t, context=context, dt=dt, anchor=anchor,
                   official_out=official_out.contiguous(), official_hr_out=official_hr.contiguous())
    save_file(tensors, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
