"""Wan2.2 DiT and PixelWizard HR DiT: keys, parity with the official code, numerics, sequence parallel."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FIXTURES, free_port, manifest, meta_shapes
from safetensors.torch import load_file

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.dit import DiTConfig, WanDiT
from pixelwizard_core.models.hr import (
    STEP_SIZE_CONDITIONINGS,
    SinusoidalStepSize,
    StepSizeConditioning,
    WanHRDiT,
    register_step_size_conditioning,
)
from pixelwizard_core.models.parallel import valid_degrees

TINY = DiTConfig.tiny()


def tiny_inputs(generator, batch=1, grid=(3, 4, 6)):
    f, h, w = grid
    x = torch.randn(batch, TINY.in_dim, f, h, w, generator=generator)
    context = torch.randn(batch, 5, TINY.text_dim, generator=generator)
    anchor = torch.randn(batch, TINY.in_dim, f, h // 2, w // 2, generator=generator)
    return x, context, anchor


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_dit_keys_and_shapes_match_the_official_manifest():
    with torch.device("meta"):
        model = WanDiT(DiTConfig())
    assert meta_shapes(model) == manifest("wan2.2_ti2v_5b_dit")["keys"]
    assert sum(p.numel() for p in model.parameters()) == 4_999_787_712


def test_hr_keys_and_shapes_match_the_pixelwizard_manifest():
    with torch.device("meta"):
        model = WanHRDiT(DiTConfig())
    expected = {k.removeprefix("model."): v for k, v in manifest("pixelwizard_hr_checkpoint")["keys"].items()}
    assert meta_shapes(model) == expected


def _parity_fixture():
    data = load_file(FIXTURES / "parity_dit.safetensors")
    weights = {k.removeprefix("weight."): v for k, v in data.items() if k.startswith("weight.")}
    return data, weights


def test_dit_equals_the_official_implementation():
    data, weights = _parity_fixture()
    model = WanDiT(TINY).eval()
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("dt_", "spatial_"))})
    with torch.no_grad():
        out = model(data["x"], data["t"], data["context"])
    expected = data["official_out"]
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_hr_dit_equals_the_reference_formulation():
    data, weights = _parity_fixture()
    model = WanHRDiT(TINY).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        out = model(data["x"], data["t"], data["context"], dt=data["dt"], anchor=data["anchor"])
    expected = data["official_hr_out"]
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_forward_is_deterministic_and_keeps_the_latent_shape(generator):
    model = randomised(WanDiT(TINY))
    x, context, _ = tiny_inputs(generator, batch=2)
    t = torch.tensor([999.0, 500.0])
    with torch.no_grad():
        first, second = model(x, t, context), model(x, t, context)
    assert first.shape == x.shape and first.dtype == torch.float32
    assert torch.equal(first, second)


def test_per_token_timesteps_equal_one_timestep_per_sample(generator):
    model = randomised(WanDiT(TINY))
    x, context, _ = tiny_inputs(generator)
    tokens = 3 * 2 * 3
    with torch.no_grad():
        scalar = model(x, torch.tensor([700.0]), context)
        per_token = model(x, torch.full((1, tokens), 700.0), context)
    # the same numbers up to float32 GEMM rounding (one row vs L rows through the time projection)
    assert ((per_token - scalar).abs().max() / scalar.abs().max()).item() <= 1e-5


def test_hr_with_zeroed_step_size_and_injector_equals_the_base_dit(generator):
    hr = randomised(WanHRDiT(TINY))
    with torch.no_grad():
        for p in list(hr.dt_embedding[2].parameters()) + list(hr.spatial_adapter.zero_layers.parameters()):
            p.zero_()
    base = WanDiT(TINY).eval()
    base.load_state_dict({k: v for k, v in hr.state_dict().items() if not k.startswith(("dt_", "spatial_"))})
    x, context, anchor = tiny_inputs(generator)
    t = torch.tensor([942.0])
    with torch.no_grad():
        assert torch.equal(hr(x, t, context, dt=torch.tensor([96.0]), anchor=anchor), base(x, t, context))


def test_hr_output_depends_on_dt_and_anchor(generator):
    hr = randomised(WanHRDiT(TINY))
    x, context, anchor = tiny_inputs(generator)
    t = torch.tensor([942.0])
    with torch.no_grad():
        reference = hr(x, t, context, dt=torch.tensor([96.0]), anchor=anchor)
        other_dt = hr(x, t, context, dt=torch.tensor([198.0]), anchor=anchor)
        other_anchor = hr(x, t, context, dt=torch.tensor([96.0]), anchor=anchor.flip(-1))
    assert not torch.allclose(reference, other_dt)
    assert not torch.allclose(reference, other_anchor)


def test_bf16_weights_stay_within_bf16_tolerance_of_fp32(generator):
    model = randomised(WanHRDiT(TINY))
    x, context, anchor = tiny_inputs(generator)
    args = (x, torch.tensor([845.0]), context)
    with torch.no_grad():
        full = model(*args, dt=torch.tensor([198.0]), anchor=anchor)
        model.to(torch.bfloat16)
        half = model(*args, dt=torch.tensor([198.0]), anchor=anchor)
    assert half.dtype == torch.float32
    assert ((half - full).norm() / full.norm()).item() < 0.05


def test_bad_inputs_are_refused_with_what_to_change(generator):
    model = WanHRDiT(TINY)
    x, context, anchor = tiny_inputs(generator)
    t, dt = torch.tensor([999.0]), torch.tensor([56.0])
    with pytest.raises(ConfigError, match="expected \\[B, 8, T, H, W\\]"):
        model(x[:, :4], t, context, dt=dt, anchor=anchor)
    with pytest.raises(ConfigError, match="multiples of 32"):
        model(x[..., :5], t, context, dt=dt, anchor=anchor)
    with pytest.raises(ConfigError, match="token grid"):
        model(x, t, context, dt=dt, anchor=anchor[..., :2])
    with pytest.raises(ConfigError, match="umT5"):
        model(x, t, context[..., :7], dt=dt, anchor=anchor)
    with pytest.raises(ConfigError, match="registered: .*sinusoidal"):
        WanHRDiT(TINY, step_size_conditioning="nope")


def test_a_new_step_size_conditioning_plugs_in_by_name(generator):
    class NoiseSpan(SinusoidalStepSize):
        """Conditions on the shifted noise span instead of the index step (example plug-in)."""

        def signal(self, t, dt):
            return 1000.0 * (t - (t - dt).clamp_min(0)) / 1000.0 + 0.5

    register_step_size_conditioning("test_noise_span", NoiseSpan)
    try:
        model = randomised(WanHRDiT(TINY, step_size_conditioning="test_noise_span"))
        assert isinstance(model.dt_embedding, StepSizeConditioning)
        x, context, anchor = tiny_inputs(generator)
        with torch.no_grad():
            out = model(x, torch.tensor([999.0]), context, dt=torch.tensor([56.0]), anchor=anchor)
        assert out.shape == x.shape
        assert set(model.state_dict()) == set(randomised(WanHRDiT(TINY)).state_dict())
    finally:
        del STEP_SIZE_CONDITIONINGS["test_noise_span"]


# --- sequence parallel over real processes (gloo) ------------------------------------------------


def _sp_worker(rank: int, world_size: int, port: int, grid: tuple[int, int, int], result_path: str) -> None:
    from pixelwizard_core.distributed.ulysses import UlyssesGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = randomised(WanHRDiT(TINY))
        x, context, anchor = tiny_inputs(torch.Generator().manual_seed(1), grid=grid)
        with torch.no_grad():
            out = model(x, torch.tensor([999.0]), context, dt=torch.tensor([56.0]), anchor=anchor, sp=UlyssesGroup())
        if rank == 0:
            torch.save(out, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size, grid", [(2, (3, 4, 6)), (2, (3, 6, 6))], ids=["even", "padded"])
def test_sequence_parallel_hr_forward_equals_single_process(tmp_path, world_size, grid):
    """Tokens split over ranks (padded when the world size does not divide them), the injector's
    control sliced per rank, RoPE rows offset per rank: the gathered output equals one process."""
    result = tmp_path / "out.pt"
    mp.spawn(_sp_worker, args=(world_size, free_port(), grid, str(result)), nprocs=world_size)
    model = randomised(WanHRDiT(TINY))
    x, context, anchor = tiny_inputs(torch.Generator().manual_seed(1), grid=grid)
    with torch.no_grad():
        expected = model(x, torch.tensor([999.0]), context, dt=torch.tensor([56.0]), anchor=anchor)
    assert (3 * (grid[1] // 2) * (grid[2] // 2)) % world_size == (0 if grid == (3, 4, 6) else 1)
    torch.testing.assert_close(torch.load(result, weights_only=True), expected, rtol=1e-5, atol=1e-5)


def test_sequence_parallel_degree_must_divide_the_heads():
    class FakeGroup:
        rank, world_size = 0, 3

    with pytest.raises(ConfigError, match="use one of 1, 2, 4"):
        WanDiT(TINY)(torch.zeros(1, 8, 1, 2, 2), torch.tensor([1.0]), torch.zeros(1, 1, 24), sp=FakeGroup())
    assert valid_degrees(24) == [1, 2, 3, 4, 6, 8, 12, 24]


def test_no_float64_or_per_token_modulation_tensor_of_sequence_length(generator):
    """Lean memory: float64 only on per-sample values, and no [B, L, 6, dim] modulation copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    grid = (5, 8, 8)
    tokens = 5 * 4 * 4
    big_float64, per_token_modulation = [], []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    if t.dtype == torch.float64 and t.numel() >= tokens:
                        big_float64.append((func, tuple(t.shape)))
                    if t.dim() == 4 and t.shape[1] == tokens and t.shape[2] == 6:
                        per_token_modulation.append((func, tuple(t.shape)))
            return out

    model = randomised(WanHRDiT(TINY))
    x, context, anchor = tiny_inputs(generator, grid=grid)
    with torch.no_grad(), Recorder():
        model(x, torch.tensor([999.0]), context, dt=torch.tensor([56.0]), anchor=anchor)
    assert big_float64 == [] and per_token_modulation == []


def test_fp8_weight_storage_halves_linear_memory_and_stays_close_to_bf16(generator):
    from pixelwizard_core.models.layers import FP8, store_linears_in_fp8

    model = randomised(WanHRDiT(TINY)).to(torch.bfloat16)
    x, context, anchor = tiny_inputs(generator)
    args = (x, torch.tensor([845.0]), context)
    with torch.no_grad():
        reference = model(*args, dt=torch.tensor([198.0]), anchor=anchor)
        before = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
        assert store_linears_in_fp8(model.blocks) == TINY.num_layers * 10  # q k v o twice, ffn 0 and 2
        after = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
        quantised = model(*args, dt=torch.tensor([198.0]), anchor=anchor)
    assert model.blocks[0].self_attn.q.weight.dtype == FP8 and after < 0.6 * before
    error = ((quantised - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.1, error  # e4m3 keeps 3 mantissa bits: a few percent through two blocks


def test_chunked_ffn_equals_the_whole_sequence_and_saves_the_predicted_memory():
    """Lean path: the FFN over token chunks gives the straightforward path's output within float32 rounding,
    and its peak of live tensors is lower by what the whole-sequence hidden layer and GELU output need."""
    from live_memory import peak_tensor_bytes

    config = DiTConfig.tiny(dim=64, ffn_dim=1024, num_layers=1)
    torch.manual_seed(0)
    model = WanDiT(config).eval()
    x, t, context = torch.randn(1, 8, 4, 16, 16), torch.tensor([700.0]), torch.randn(1, 16, 24)
    tokens = 4 * 8 * 8
    peaks, outputs = {}, {}
    for name, budget in (("whole", 0), ("chunked", 2 * 64 * config.ffn_dim * 4)):  # 64 tokens per chunk
        model.ffn_chunk_bytes = budget
        with torch.no_grad(), peak_tensor_bytes() as peak:
            outputs[name] = model(x, t, context)
        peaks[name] = peak["bytes"]
    torch.testing.assert_close(outputs["chunked"], outputs["whole"], rtol=1e-5, atol=1e-6)
    predicted = 2 * (tokens - 64) * config.ffn_dim * 4  # hidden layer + GELU output, float32
    saved = peaks["whole"] - peaks["chunked"]
    assert 0.8 * predicted <= saved <= 1.2 * predicted, (peaks, predicted)
    with torch.enable_grad():
        assert model.ffn_chunk_tokens(1) == 0  # training keeps whole sequences


def test_per_token_timesteps_are_chunked_with_their_rows():
    config = DiTConfig.tiny(ffn_dim=256)
    torch.manual_seed(1)
    model = WanDiT(config).eval()
    x, context = torch.randn(1, 8, 2, 8, 8), torch.randn(1, 16, 24)
    t = torch.linspace(900, 100, 2 * 4 * 4)[None]  # one timestep per token
    with torch.no_grad():
        model.ffn_chunk_bytes = 0
        whole = model(x, t, context)
        model.ffn_chunk_bytes = 2 * 5 * 256 * 4  # 5 tokens per chunk: uneven split
        chunked = model(x, t, context)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_compiled_blocks_give_the_same_velocity():
    config = DiTConfig.tiny()
    torch.manual_seed(2)
    model = WanDiT(config).eval()
    x, t, context = torch.randn(1, 8, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 24)
    with torch.no_grad():
        plain = model(x, t, context)
        model.compile_blocks(backend="eager")  # traced by dynamo; no C++ toolchain needed in CI
        compiled = model(x, t, context)
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-6)


def test_lean_hr_forward_is_identical_and_needs_far_less_memory_per_token():
    """bf16 HR model with its injector: the chunked row-wise parts (q/k with norms and RoPE, cross-attention,
    FFN) give bit-identical velocities and cut the peak of live tensors by a third or more."""
    from live_memory import peak_tensor_bytes

    config = DiTConfig.tiny(dim=128, ffn_dim=512, num_heads=2, num_layers=2)
    torch.manual_seed(3)
    model = WanHRDiT(config).to(torch.bfloat16).eval()
    model.spatial_adapter.float()
    x, anchor = torch.randn(1, 8, 4, 64, 64), torch.randn(1, 8, 4, 32, 32)
    t, dt, context = torch.tensor([500.0]), torch.tensor([8.0]), torch.randn(1, 16, 24)
    peaks, outputs = {}, {}
    for name, budget in (("straightforward", 0), ("lean", 2 * 256 * config.ffn_dim * 2)):
        model.ffn_chunk_bytes = budget
        with torch.no_grad(), peak_tensor_bytes() as peak:
            outputs[name] = model(x, t, context, dt=dt, anchor=anchor)
        peaks[name] = peak["bytes"]
    assert torch.equal(outputs["lean"], outputs["straightforward"])
    assert peaks["lean"] <= 0.7 * peaks["straightforward"], peaks


# --- layout changes as named rearranges: bit-identical to the expressions they replaced -----------------


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_patchify_unpatchify_and_the_injector_equal_the_previous_expressions(generator, patch):
    from pixelwizard_core.models.hr import AnchorInjector

    config = DiTConfig.tiny(patch_size=patch)
    model = randomised(WanDiT(config))
    x = torch.randn(2, config.in_dim, 4, 8, 10, generator=generator)
    tokens, grid = model.patchify(x)
    y = model.patch_embedding(x)
    before = y.flatten(2).transpose(1, 2)
    assert torch.equal(tokens, before) and tokens.stride() == before.stride()  # a view, as before
    (f, h, w), (pt, ph, pw), c = grid, patch, config.out_dim
    flat = torch.randn(2, f * h * w, pt * ph * pw * c, generator=generator)
    before = torch.einsum("bfhwpqrc->bcfphqwr", flat.reshape(2, f, h, w, pt, ph, pw, c))
    assert torch.equal(model.unpatchify(flat, grid), before.reshape(2, c, f * pt, h * ph, w * pw).float())
    injector = randomised(AnchorInjector(config))
    anchor = torch.randn(2, config.in_dim, 4, 4, 5, generator=generator)
    t_features = torch.randn(2, config.freq_dim, generator=generator)
    with torch.no_grad():
        control = injector(anchor, t_features, t_features)
        features = injector.backbone(anchor).flatten(2).transpose(1, 2)  # the previous expression
        gate = torch.tanh(injector.adapter_time_proj(t_features) + injector.adapter_dt_proj(t_features))
        expected = injector.zero_layers["1"](injector.feature_norm(features).float() * (1 + gate.float().unsqueeze(1)))
    assert torch.equal(control, expected)


def test_head_split_and_merge_equal_the_previous_expressions(generator):
    from pixelwizard_core.models.dit import merge_heads, split_heads

    x = torch.randn(2, 7, 4 * 16, generator=generator)
    assert torch.equal(split_heads(x, 4), x.unflatten(2, (4, -1)))
    out = torch.randn(2, 4, 7, 16, generator=generator).transpose(1, 2)  # SDPA's output: not contiguous
    assert torch.equal(merge_heads(out), out.flatten(2))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ulysses_exchanges_equal_the_previous_chunk_and_cat(generator, world):
    """The all-to-all, simulated over ``world`` ranks: rank r receives part r of every rank's send buffer
    (``all_to_all_single``); HEAD built per-rank lists with chunk and cat."""
    from pixelwizard_core.distributed import ulysses as u

    def exchange(sent: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([s[rank] for s in sent]) for rank in range(world)]

    local = [torch.randn(2, 5, 12, 8, generator=generator) for _ in range(world)]  # [B, L/P, N, D]
    before = [torch.cat([x.chunk(world, dim=2)[r] for x in local], dim=1) for r in range(world)]
    after = [u.tokens_to_heads_received(b) for b in exchange([u.tokens_to_heads_send(x, world) for x in local])]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    heads = [torch.randn(2, 5 * world, 12 // world, 8, generator=generator) for _ in range(world)]
    before = [torch.cat([y.chunk(world, dim=1)[r] for y in heads], dim=2) for r in range(world)]
    after = [u.heads_to_tokens_received(b) for b in exchange([u.heads_to_tokens_send(y, world) for y in heads])]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
