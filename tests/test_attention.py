"""Attention backends and RoPE: choice of backend, key masking, rotation against complex arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models import attention as attn
from pixelwizard_core.models.rope import apply_rope, axis_pairs, rope_cos_sin


def test_auto_picks_sdpa_without_cuda_and_flash_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = torch.device("cpu")
    assert attn.resolve_backend("auto", cpu) == "sdpa"
    assert attn.resolve_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(ConfigError, match="needs a CUDA GPU and the flash-attn package"):
        attn.resolve_backend("flash", cpu)
    with pytest.raises(ConfigError, match="choose one of auto, flash, sage, sdpa"):
        attn.resolve_backend("xformers", cpu)


def test_sdpa_equals_explicit_softmax_and_k_len_masks_padded_keys(generator):
    q, k, v = (torch.randn(2, 7, 3, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    out = attn.attention(q, k, v, k_len=5, backend="sdpa")
    scores = torch.einsum("blnd,bmnd->bnlm", q, k[:, :5]) / math.sqrt(8)
    expected = torch.einsum("bnlm,bmnd->blnd", scores.softmax(-1), v[:, :5])
    torch.testing.assert_close(out, expected)


def test_flash_path_casts_to_half_and_back(generator):
    """The flash branch (CUDA-only in real use) gets bf16 q/k/v and returns the caller's dtype, whether the
    build returns the output or (output, lse)."""
    seen = []

    def fake_flash(q, k, v):
        seen.append(q.dtype)
        return attn._sdpa(q.float(), k.float(), v.float()).to(q.dtype)

    q, k, v = (torch.randn(1, 6, 2, 8, generator=generator) for _ in range(3))
    for function in (fake_flash, lambda q, k, v: (fake_flash(q, k, v), None)):
        out = attn._flash_call(function, q, k, v)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, attn._sdpa(q, k, v), rtol=2e-2, atol=2e-2)
    assert seen == [torch.bfloat16, torch.bfloat16]
    half = q.half()
    assert attn._flash_call(fake_flash, half, half, half).dtype == torch.float16 and seen[-1] == torch.float16


def test_rope_split_and_rotation_match_complex128_arithmetic(generator):
    assert axis_pairs(128) == (22, 21, 21)
    grid, head_dim = (3, 4, 5), 16
    cos, sin = rope_cos_sin(grid, head_dim)
    x = torch.randn(1, 60, 2, head_dim, generator=generator)
    # complex reference: per-axis exponents, interleaved pairs
    pf, ph, pw = axis_pairs(head_dim)
    tables = [
        torch.outer(torch.arange(n, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, 2 * p, 2, dtype=torch.float64) / (2 * p)))
        for n, p in zip(grid, (pf, ph, pw))
    ]
    f, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    angles = torch.cat([tables[0][f.flatten()], tables[1][h.flatten()], tables[2][w.flatten()]], dim=-1)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(angles), angles)[None, :, None]
    expected = torch.view_as_real(z).flatten(-2)
    out = apply_rope(x, cos, sin)
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6


def test_rope_refuses_grids_beyond_its_positions():
    with pytest.raises(ValueError, match="1024 RoPE positions"):
        rope_cos_sin((1, 1025, 2), 16)


def test_the_dit_refuses_an_impossible_backend_when_it_is_set(monkeypatch):
    """On a machine without a GPU the CPU is where the model will run: checked at once (on a GPU machine a
    model waiting on the CPU is checked when placed: tests/test_gpu_paths.py)."""
    from pixelwizard_core.models.dit import DiTConfig, WanDiT

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = WanDiT(DiTConfig.tiny())
    model.set_attention_backend("sdpa")
    assert model.attn_backend == "sdpa" and model.attn_kernel.name == "sdpa"  # resolved now: no GPU here
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        model.set_attention_backend("flash")
    with pytest.raises(ConfigError, match="unknown attention backend"):
        model.set_attention_backend("fast")
    assert model.attn_backend == "sdpa"
