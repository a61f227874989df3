"""umT5 encoder: key layout of the real checkpoint, parity with the official code (fixture), numerics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pixelwizard_core.errors import ConfigError, WeightFormatError
from pixelwizard_core.models.t5 import (
    T5Config,
    T5LayerNorm,
    TanhGELU,
    UMT5Encoder,
    bucket_of_distance,
    context_for_dit,
    pad_context,
    relative_position_buckets,
    trim_context,
)

HERE = Path(__file__).parent
MANIFEST = HERE / "manifests" / "umt5_xxl_encoder.json"
FIXTURE = HERE / "fixtures" / "parity_t5.safetensors"


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).abs().max() / theirs.abs().max())


def random_encoder(cfg: T5Config, seed: int = 0) -> UMT5Encoder:
    gen = torch.Generator().manual_seed(seed)
    model = UMT5Encoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:  # norm scales
                p.copy_(1.0 + 0.1 * noise)
            elif "embedding" in name:  # token and position tables
                p.copy_(noise)
            else:  # linear weights, fan-in scaled
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def test_state_dict_matches_official_checkpoint_manifest() -> None:
    manifest = json.loads(MANIFEST.read_text())
    expected = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    with torch.device("meta"):
        model = UMT5Encoder(T5Config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(expected)) == []  # unexpected
    assert {k: ours[k] for k in expected} == expected
    assert len(ours) == 242
    assert manifest["config"] == {k: getattr(T5Config(), k) for k in manifest["config"]}


def test_config_from_state_dict_reads_shapes() -> None:
    cfg = T5Config.tiny(num_layers=3)
    with torch.device("meta"):
        sd = UMT5Encoder(cfg).state_dict()
    assert T5Config.from_state_dict(sd) == cfg
    with pytest.raises(WeightFormatError, match="shared.weight|token_embedding"):
        T5Config.from_state_dict({"shared.weight": torch.zeros(1)})


def test_config_rejects_heads_not_dividing_dim_attn() -> None:
    with pytest.raises(ConfigError, match="num_heads"):
        T5Config.tiny(num_heads=5)


def _fixture() -> tuple[T5Config, dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        cfg = T5Config(**json.loads(f.metadata()["config"]))
        return cfg, {k: f.get_tensor(k) for k in f.keys()}


def test_matches_official_encoder_fixture() -> None:
    cfg, data = _fixture()
    assert not cfg.shared_pos and cfg.dim_attn != cfg.dim  # umT5 traits plus a shape check
    model = UMT5Encoder(cfg).eval()
    weights = {k.removeprefix("weights."): v for k, v in data.items() if k.startswith("weights.")}
    model.load_state_dict(weights, strict=True)
    assert int(data["mask"].sum(1).min()) < data["mask"].shape[1]  # padding is exercised
    with torch.no_grad():
        ours = model(data["ids"], data["mask"])
    assert relative_error(ours, data["hidden"]) <= 1e-5


def test_buckets_match_official_fixture() -> None:
    cfg, data = _fixture()
    ours = bucket_of_distance(data["bucket_distance"], cfg.num_buckets, cfg.max_distance)
    assert torch.equal(ours, data["bucket"])


def test_bucket_table_properties() -> None:
    b = relative_position_buckets(300, num_buckets=32, max_distance=128)
    assert b.shape == (300, 300)
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    assert torch.equal(b[(rel.abs() < 8) & (rel <= 0)], (-rel)[(rel.abs() < 8) & (rel <= 0)])  # exact, keys before
    assert torch.equal(b[(rel > 0) & (rel < 8)], 16 + rel[(rel > 0) & (rel < 8)])  # keys after: second half
    assert int(b[rel <= -128].unique().numel()) == 1 and int(b[rel <= -128][0]) == 15  # capped
    assert int(b[rel >= 128].min()) == 31
    row = b[0, :]  # non-decreasing with distance
    assert bool((row[1:] >= row[:-1]).all())


def test_padding_does_not_change_real_rows() -> None:
    cfg = T5Config.tiny()
    model = random_encoder(cfg)
    ids = torch.tensor([[7, 8, 9, 10, 1]])
    short = torch.cat([ids, torch.zeros(1, 3, dtype=torch.int64)], 1)
    long = torch.cat([ids, torch.randint(4, cfg.vocab, (1, 20))], 1)  # junk in padded slots
    with torch.no_grad():
        a = model(short, (short != 0).long())
        b = model(long, torch.cat([torch.ones(1, 5), torch.zeros(1, 20)], 1).long())
        c = model(ids, torch.ones_like(ids))
    torch.testing.assert_close(a[:, :5], c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[:, :5], c, rtol=1e-5, atol=1e-6)
    # The mask matters: without it, junk keys are attended.
    with torch.no_grad():
        d = model(long)
    assert not torch.allclose(d[:, :5], c, atol=1e-4)


def test_layer_norm_rounds_to_weight_dtype() -> None:
    norm = T5LayerNorm(8).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.bfloat16) * 10
    x32 = x.float()
    expected = norm.weight * (x32 / torch.sqrt((x32 ** 2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    fp32 = T5LayerNorm(8)
    assert fp32(x).dtype == torch.float32  # an fp32 weight keeps the fp32 statistics


def test_gelu_is_tanh_form() -> None:
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(TanhGELU()(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(TanhGELU()(x), torch.nn.functional.gelu(x), atol=1e-5)
    assert math.isclose(float(TanhGELU()(torch.tensor(1.0))), 0.8411920071, rel_tol=1e-6)


def test_context_trim_and_pad() -> None:
    hidden = torch.randn(2, 10, 4)
    mask = torch.tensor([[1] * 3 + [0] * 7, [1] * 10])
    trimmed = trim_context(hidden, mask)
    assert [t.shape[0] for t in trimmed] == [3, 10]
    ctx = context_for_dit(hidden, mask, text_len=16)
    assert ctx.shape == (2, 16, 4)
    assert torch.equal(ctx[0, :3], hidden[0, :3]) and torch.equal(ctx[1, :10], hidden[1])
    assert not ctx[0, 3:].any() and not ctx[1, 10:].any()
    with pytest.raises(ConfigError, match="10 tokens"):
        pad_context(trimmed, text_len=8)


def test_rejects_ids_outside_vocabulary() -> None:
    model = UMT5Encoder(T5Config.tiny())
    with pytest.raises(ConfigError, match="vocabulary"):
        model(torch.tensor([[5, 384]]), torch.ones(1, 2))
    with pytest.raises(ConfigError, match="mask shape"):
        model(torch.tensor([[5, 6]]), torch.ones(1, 3))


def test_bf16_runs_and_tracks_fp32() -> None:
    cfg = T5Config.tiny()
    model = random_encoder(cfg)
    ids = torch.randint(4, cfg.vocab, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(ids, mask)
        low = model.to(torch.bfloat16)(ids, mask)
    assert low.dtype == torch.bfloat16
    assert relative_error(low.float(), ref) < 5e-2
