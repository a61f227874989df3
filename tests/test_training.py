"""Shortcut training: samplers, weights, targets, checkpoints and resume, the toy evidence, the train command."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from safetensors.torch import save_file
from tiny_models import DIT

from pixelwizard_core.cli import main
from pixelwizard_core.errors import ConfigError, MissingFileError
from pixelwizard_core.io.latents import save_tensor_file
from pixelwizard_core.loading import load_hr_dit
from pixelwizard_core.models.hr import STEP_SIZE_CONDITIONINGS, LogSNRSpanStepSize, WanHRDiT
from pixelwizard_core.training.checkpoint import list_checkpoints, read_metadata
from pixelwizard_core.training.data import TrainingData, check_items, discover, sample_order
from pixelwizard_core.training.degrade import DegradeConfig, degrade_frames, gaussian_kernel, synthesize_anchor
from pixelwizard_core.training.objective import ShortcutConfig, ShortcutObjective, TrainingBatch
from pixelwizard_core.training.schedule import (
    TrainingGrid,
    calibration_weights,
    dt_candidates,
    index_probabilities,
    noise_span,
    sample_self_consistency,
)
from pixelwizard_core.training.sharding import enable_activation_checkpointing
from pixelwizard_core.training.toy import ToyEvaluator, ToyRecipe, ToyShortcutNet, pretrain, train_toy
from pixelwizard_core.training.trainer import OptimConfig, Trainer

GRID = TrainingGrid(5.0)


@pytest.fixture
def one_thread():
    """Small ops are fastest (and immune to spin-waiting on a loaded machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- grid and samplers ------------------------------------------------------------------------------


def test_training_grid_is_the_reference_flow_match_grid():
    u = 1 - torch.arange(1000, dtype=torch.float64) / 1000
    expected = 5 * u / (1 + 4 * u)
    assert torch.allclose(GRID.sigmas.double(), expected, atol=1e-7)
    assert torch.allclose(GRID.timesteps, GRID.sigmas * 1000)
    w = GRID.base_weights
    assert float(w.min()) == 0 and math.isclose(float(w.sum()), 1000, rel_tol=1e-5)
    assert abs(float(GRID.timesteps[w.argmax()]) - 500) < 2  # Gaussian in t centred on 500


def test_snapping_is_the_nearest_grid_point():
    t = torch.cat([torch.rand(5000) * 1100 - 50, GRID.timesteps[:50], (GRID.timesteps[1:] + GRID.timesteps[:-1]) / 2])
    brute = (GRID.timesteps[None, :] - t[:, None]).abs().argmin(dim=1)
    assert torch.equal(GRID.snap(t), brute)


def test_dt_candidates_halve_floor_and_are_even_and_at_least_2():
    timesteps = torch.tensor([500.0, 600.3, 700.0, 800.0, 999.0, 5.0, 3.0])
    got = dt_candidates(timesteps, 6)

    def reference(t: int, k: int) -> int:
        d = max(t // 2**k, 2)
        return max(d - d % 2, 2)

    for row, t in zip(got.tolist(), timesteps.round().long().tolist()):
        assert row == [reference(t, k) for k in range(6)]
    assert got[0].tolist() == [500, 250, 124, 62, 30, 14]
    assert got[2].tolist() == [700, 350, 174, 86, 42, 20]
    assert bool((got % 2 == 0).all()) and int(got.min()) == 2


def test_step_index_frequencies_follow_exp_minus_0_7_k():
    """200,000 draws through the real sampler: each frequency within 5 standard errors of
    exp(-0.7 k) / Z (se = sqrt(p(1-p)/N) <= 0.0011), and a chi-square (5 dof) below its 0.1% point."""
    n = 200_000
    probs = index_probabilities(6, 0.7)
    expected = torch.exp(-0.7 * torch.arange(6, dtype=torch.float64))
    assert torch.allclose(probs, expected / expected.sum())
    generator = torch.Generator().manual_seed(0)
    draw = sample_self_consistency(GRID, n, anchors=torch.tensor([500.0, 600, 700, 800]), candidates=6,
                                   probabilities=probs, generator=generator)
    freq = torch.bincount(draw.k, minlength=6).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert bool(((freq - probs).abs() < 5 * se).all()), (freq, probs)
    chi2 = float(((freq - probs) ** 2 / probs).sum() * n)
    assert chi2 < 20.52
    anchors = torch.bincount(draw.t_index, minlength=1000)[GRID.snap(torch.tensor([500.0, 600, 700, 800]))]
    assert bool(((anchors.double() / n - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / n)).all())
    uniform = index_probabilities(6, 0.7, "uniform")
    draw_u = sample_self_consistency(GRID, n, anchors=torch.tensor([700.0]), candidates=6, probabilities=uniform,
                                     generator=generator)
    freq_u = torch.bincount(draw_u.k, minlength=6).double() / n
    assert bool(((freq_u - 1 / 6).abs() < 5 * math.sqrt(5 / 36 / n)).all())
    assert float((freq - freq_u).abs().max()) > 0.1  # the two samplers really differ


def test_midpoint_and_end_are_snapped_after_t():
    draw = sample_self_consistency(GRID, 5000, anchors=torch.tensor([500.0, 600, 700, 800]), candidates=6,
                                   probabilities=index_probabilities(6, 0.7), generator=torch.Generator().manual_seed(1))
    t = GRID.timesteps[draw.t_index]
    assert bool((draw.mid_index >= draw.t_index).all()) and bool((draw.end_index >= draw.mid_index).all())
    spacing = (GRID.timesteps[:-1] - GRID.timesteps[1:]).max()
    assert float((GRID.timesteps[draw.mid_index] - (t - draw.dt / 2)).abs().max()) <= spacing
    assert int(draw.t_index.max()) <= 997


def test_calibration_weights_are_clamped_powers_of_the_relative_span():
    span = torch.tensor([1e-5, 0.01, 0.04, 0.09, 50.0])
    w = calibration_weights(span, 0.01, 0.5)
    assert torch.allclose(w, torch.tensor([0.1, 1.0, 2.0, 3.0, 10.0]))  # 0.0316 -> 0.1, 70.7 -> 10
    assert torch.allclose(calibration_weights(span, 0.01, 1.0, (0.5, 4.0)), torch.tensor([0.5, 1.0, 4.0, 4.0, 4.0]))
    assert torch.equal(calibration_weights(span, 0.01, 0.0), torch.ones(5))
    with pytest.raises(ConfigError, match="clamp"):
        calibration_weights(span, 0.01, 0.5, (0.0, 10.0))


def test_objective_uses_the_batch_mean_span():
    objective = ShortcutObjective(ShortcutConfig())
    draw = sample_self_consistency(GRID, 64, anchors=objective.anchors, candidates=6,
                                   probabilities=objective.probabilities, generator=torch.Generator().manual_seed(2))
    span = noise_span(GRID, draw)
    assert torch.allclose(span, (GRID.sigmas[draw.end_index] - GRID.sigmas[draw.t_index]).abs())
    w = calibration_weights(span, objective.span_reference(span), 0.5)
    assert torch.allclose(w, ((span / span.mean()) ** 0.5).clamp(0.1, 10))
    assert torch.equal(calibration_weights(span[:1], span[:1].mean(), 0.5), torch.ones(1))  # batch of one: a no-op


# --- the loss ----------------------------------------------------------------------------------------


class RecordingModel(torch.nn.Module):
    """v = scale * x (a linear field) with one trainable scale; records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, t, context, *, dt, anchor):
        self.calls.append({"x": x.detach().clone(), "t": t.clone(), "dt": dt.clone(), "grad": torch.is_grad_enabled(),
                           "context": context.clone(), "anchor": anchor.clone()})
        return self.scale * x


def _batch(size: int = 4) -> TrainingBatch:
    g = torch.Generator().manual_seed(3)
    return TrainingBatch(latent=torch.randn(size, 2, 1, 2, 2, generator=g), context=torch.ones(size, 3, 5),
                         anchor=torch.ones(size, 2, 1, 1, 1), empty_context=torch.zeros(1, 2, 5))


def test_self_consistency_target_is_the_mean_of_two_half_steps():
    config = ShortcutConfig(cfg_dropout=0.0, timestep_weighting="none", calibration_power=0.0)
    objective = ShortcutObjective(config)
    model = RecordingModel()
    loss, logs = objective.loss(model, _batch(), torch.Generator().manual_seed(0), self_consistency=True)
    first, second, trained = model.calls
    assert not first["grad"] and not second["grad"] and trained["grad"]
    assert torch.equal(first["dt"], trained["dt"] / 2) and torch.equal(second["dt"], first["dt"])
    assert bool((trained["dt"] % 2 == 0).all()) and bool((trained["dt"] >= 2).all())
    sigma = trained["t"] / 1000
    sigma_mid = second["t"] / 1000
    assert bool((second["t"] <= trained["t"]).all())
    # v = x: x_mid = (1 + s_mid - s) x_t, target = (x_t + x_mid)/2, prediction x_t
    ratio = (sigma_mid - sigma).reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(second["x"], first["x"] * (1 + ratio), atol=1e-6)
    expected = ((ratio / 2) ** 2 * first["x"] ** 2).flatten(1).mean(1).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert logs["branch_sc"] == 1.0


def test_flow_matching_batch_has_dt_0_and_targets_noise_minus_data():
    objective = ShortcutObjective(ShortcutConfig(cfg_dropout=0.0, timestep_weighting="none"))
    model = RecordingModel()
    batch = _batch()
    with torch.no_grad():
        model.scale.zero_()  # predicts 0: the loss is E|noise - x0|^2
    loss, _ = objective.loss(model, batch, torch.Generator().manual_seed(0), self_consistency=False)
    (call,) = model.calls
    assert torch.equal(call["dt"], torch.zeros(4))
    sigma = (call["t"] / 1000).reshape(-1, 1, 1, 1, 1)
    noise = (call["x"] - (1 - sigma) * batch.latent) / sigma
    assert torch.allclose(loss, (noise - batch.latent).pow(2).flatten(1).mean(1).mean(), rtol=1e-4)


def test_cfg_dropout_swaps_prompt_and_zeroes_anchor_together():
    batch = _batch(400)
    for rate, lo, hi in ((0.0, 0, 0), (1.0, 400, 400), (0.1, 20, 65)):
        objective = ShortcutObjective(ShortcutConfig(cfg_dropout=rate))
        context, anchor = objective.drop_conditions(batch, torch.Generator().manual_seed(4))
        dropped = anchor.flatten(1).abs().sum(1) == 0
        assert lo <= int(dropped.sum()) <= hi
        assert bool((context[dropped] == 0).all()) and bool((context[~dropped, :3] == 1).all())
        assert context.shape[1] == 3


def test_branch_rate_is_sc_rate():
    objective = ShortcutObjective(ShortcutConfig(sc_rate=0.3))
    g = torch.Generator().manual_seed(5)
    share = sum(objective.choose_self_consistency(g) for _ in range(20_000)) / 20_000
    assert abs(share - 0.3) < 5 * math.sqrt(0.21 / 20_000)


def test_options_are_validated():
    for bad in (dict(sc_rate=1.5), dict(index_sampling="cubic"), dict(dt_candidates=0), dict(t_anchors=(0.0,)),
                dict(calibration_clamp=(2.0, 1.0)), dict(loss_normalization="sum")):
        with pytest.raises(ConfigError):
            ShortcutConfig(**bad)


# --- step-size conditioning ---------------------------------------------------------------------


def test_log_snr_span_conditioning_signal_and_keys():
    config = DIT
    default, alternative = STEP_SIZE_CONDITIONINGS["sinusoidal"](config), LogSNRSpanStepSize(config)
    assert set(default.state_dict()) == set(alternative.state_dict())
    t = torch.tensor([999.0, 942.0, 646.0, 700.0, 700.0])
    dt = torch.tensor([56.0, 96.0, 646.0, 0.0, 100.0])
    assert torch.equal(default.signal(t, dt), dt)
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    expected = [100 * (lam(max(min((a - b) / 1000, 0.999), 0.001)) - lam(min(a / 1000, 0.999))) if b else 0.0
                for a, b in zip(t.tolist(), dt.tolist())]
    assert torch.allclose(alternative.signal(t, dt), torch.tensor(expected, dtype=torch.float64))
    assert float(alternative.signal(torch.tensor([700.0]), torch.tensor([200.0]))) > float(
        alternative.signal(torch.tensor([700.0]), torch.tensor([100.0])))


def _tiny_hr(conditioning: str = "sinusoidal", seed: int = 0) -> WanHRDiT:
    torch.manual_seed(seed)
    model = WanHRDiT(DIT, step_size_conditioning=conditioning)
    with torch.no_grad():  # make the zero-initialised layers matter
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


def _hr_batch(seed: int = 0, size: int = 1) -> TrainingBatch:
    g = torch.Generator().manual_seed(seed)
    return TrainingBatch(latent=torch.randn(size, 48, 2, 4, 4, generator=g),
                         context=torch.randn(size, 5, DIT.text_dim, generator=g),
                         anchor=torch.randn(size, 48, 2, 2, 2, generator=g), empty_context=torch.zeros(1, DIT.text_dim))


def test_checkpoint_records_the_conditioning_and_loading_uses_it(tmp_path, one_thread):
    model = _tiny_hr("log_snr_span")
    trainer = Trainer(model, ShortcutObjective(ShortcutConfig(sc_rate=1.0)), OptimConfig(lr=1e-3), seed=0)
    trainer.train_step(_hr_batch())
    folder = trainer.save(tmp_path, export_pt=True)
    assert read_metadata(folder / "model.safetensors")["step_size_conditioning"] == "log_snr_span"
    x, ctx, anchor = (_hr_batch(1).latent, _hr_batch(1).context, _hr_batch(1).anchor)
    t, dt = torch.tensor([845.0]), torch.tensor([198.0])
    model.eval()
    with torch.no_grad():
        want = model(x, t, ctx, dt=dt, anchor=anchor)
        for path in (folder / "model.safetensors", folder / "model.pt"):
            loaded = load_hr_dit(path)
            assert loaded.step_size_conditioning == "log_snr_span"
            assert torch.equal(loaded(x, t, ctx, dt=dt, anchor=anchor), want)
        forced = load_hr_dit(folder / "model.safetensors", step_size_conditioning="sinusoidal")
        assert not torch.allclose(forced(x, t, ctx, dt=dt, anchor=anchor), want)
    odd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(odd, tmp_path / "odd.safetensors", metadata={"step_size_conditioning": "no_such_thing"})
    with pytest.raises(ConfigError, match="no_such_thing"):
        load_hr_dit(tmp_path / "odd.safetensors")


# --- trainer pieces --------------------------------------------------------------------------------


def test_activation_checkpointing_keeps_gradients_and_names(one_thread):
    plain, checkpointed = _tiny_hr(), _tiny_hr()
    names = list(plain.state_dict())
    enable_activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == names
    batch = _hr_batch(size=2)
    for model in (plain, checkpointed):
        out = model(batch.latent, torch.tensor([700.0, 300.0]), batch.context, dt=torch.tensor([100.0, 0.0]),
                    anchor=batch.anchor)
        out.pow(2).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_starting_from_the_base_dit_gives_the_base_model_plus_no_op_hr_parts(tmp_path, one_thread):
    from pixelwizard_core.models.dit import WanDiT
    from pixelwizard_core.training.build import build_training_model

    torch.manual_seed(0)
    base = WanDiT(DIT)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    model = build_training_model(tmp_path / "base.safetensors", step_size_conditioning="log_snr_span")
    assert model.step_size_conditioning == "log_snr_span" and all(p.requires_grad for p in model.parameters())
    batch = _hr_batch(size=2)
    t = torch.tensor([900.0, 400.0])
    with torch.no_grad():
        want = base(batch.latent, t, batch.context)
        got = model(batch.latent, t, batch.context, dt=torch.tensor([96.0, 400.0]), anchor=batch.anchor)
    assert torch.equal(got, want)
    frozen = build_training_model(tmp_path / "base.safetensors", trainable="conditioning")
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("dt_embedding.", "spatial_adapter.")) for n in trainable)


def test_ema_starts_as_a_copy_then_averages(one_thread):
    model = _tiny_hr()
    trainer = Trainer(model, ShortcutObjective(ShortcutConfig(cfg_dropout=0.0)),
                      OptimConfig(lr=1e-2, ema_decay=0.5, ema_start=2), seed=0)
    trainer.train_step(_hr_batch())
    assert trainer.ema.shadow is None
    trainer.train_step(_hr_batch())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(trainer.ema.shadow[n], before[n]) for n in before)
    trainer.train_step(_hr_batch())
    name = "blocks.0.self_attn.q.weight"
    assert torch.allclose(trainer.ema.shadow[name], 0.5 * before[name] + 0.5 * model.state_dict()[name])


def _run(tmp_path: Path, steps: int, crash_at: int | None = None, resume: bool = False) -> Trainer:
    model = _tiny_hr()
    trainer = Trainer(model, ShortcutObjective(ShortcutConfig(sc_rate=0.5, calibration_reference="running")),
                      OptimConfig(lr=1e-3, ema_decay=0.9, ema_start=1), seed=7)
    if resume:
        folder = list_checkpoints(tmp_path)[-1]
        trainer.resume(folder)

    def batches(step: int) -> TrainingBatch:
        if step == crash_at:
            raise RuntimeError("simulated crash")
        return _hr_batch(step, size=2)

    trainer.fit(batches, steps, output_dir=tmp_path, save_every=3, log_every=0)
    return trainer


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, one_thread):
    straight = _run(tmp_path / "a", 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "b", 6, crash_at=4)  # steps 1..4 done, checkpoint at 3, step 4 lost
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint_000003"]
    resumed = _run(tmp_path / "b", 6, resume=True)
    assert resumed.step == straight.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(straight.ema.shadow[n], resumed.ema.shadow[n]) for n in straight.ema.shadow)
    for pa, pb in zip(straight.params, resumed.params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(straight.optimizer.state[pa][key], resumed.optimizer.state[pb][key])
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert straight.objective.state() == resumed.objective.state()
    # and the saved step-6 files are the same too
    a, b = (load_hr_dit(p / "checkpoint_000006" / "model.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- data and anchors ------------------------------------------------------------------------------


def test_degradation_and_anchor_synthesis():
    from pixelwizard_core.models.vae import VAEConfig, WanVAE

    taps = gaussian_kernel(7, 3.0)
    assert math.isclose(float(taps.sum()), 1.0, rel_tol=1e-6) and torch.equal(taps, taps.flip(0))
    config = DegradeConfig(size=(32, 48))
    frames = torch.rand(5, 3, 128, 192) * 2 - 1
    a = degrade_frames(frames, config, torch.Generator().manual_seed(0))
    b = degrade_frames(frames, config, torch.Generator().manual_seed(0))
    assert a.shape == (5, 3, 32, 48) and torch.equal(a, b)
    assert float(a.std()) < 0.5 * float(frames.std())  # blurred, much smoother than the noise input
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny())
    anchor = synthesize_anchor(vae, frames.permute(1, 0, 2, 3)[None], config, torch.Generator().manual_seed(0))
    assert anchor.shape == (1, 48, 2, 128 // 32, 192 // 32)


def test_sample_order_is_a_per_epoch_permutation_shared_by_ranks():
    seen = [i for step in range(5) for rank in range(2) for i in sample_order(step, 1, 10, seed=3, rank=rank,
                                                                                world_size=2)]
    assert sorted(seen) == list(range(10))  # one epoch: every item once
    assert sample_order(7, 2, 10, seed=3) == sample_order(7, 2, 10, seed=3)
    assert sample_order(0, 10, 10, seed=3) != sample_order(0, 10, 10, seed=4)


def _latent_files(folder: Path, count: int = 3, context: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        tensors = {"latent": torch.randn(48, 2, 4, 4, generator=g), "anchor": torch.randn(48, 2, 1, 2, generator=g)}
        if context:
            tensors["context"] = torch.randn(3 + i, DIT.text_dim, generator=g)
        save_tensor_file(folder / f"{i}.safetensors", tensors, {"prompt": f"prompt {i}"})


def test_data_checks_and_batches(tmp_path):
    _latent_files(tmp_path / "d")
    items = discover(tmp_path / "d")
    (tmp_path / "list.txt").write_text("# two items\nd/0.safetensors\nd/2.safetensors\n")
    assert [p.name for p in discover(tmp_path / "list.txt")] == ["0.safetensors", "2.safetensors"]
    with pytest.raises(ConfigError, match="empty prompt"):
        check_items(items, have_vae=False, have_text=False, have_clip=False, have_empty=False, cfg_dropout=0.1)
    _latent_files(tmp_path / "nc", 1, context=False)
    with pytest.raises(ConfigError, match="text encoder"):
        check_items(discover(tmp_path / "nc"), have_vae=False, have_text=False, have_clip=False, have_empty=True,
                    cfg_dropout=0.1)
    data = TrainingData(items, empty_context=torch.zeros(1, DIT.text_dim))
    batch = data.batch([0, 2], torch.Generator())
    assert batch.latent.shape == (2, 48, 2, 4, 4) and batch.anchor.shape == (2, 48, 2, 2, 2)  # resized to tokens
    assert batch.context.shape == (2, 5, DIT.text_dim) and bool((batch.context[0, 3:] == 0).all())


class FakeText:
    """Stands in for the umT5 encoder: one row per character, so prompts are told apart."""

    def encode(self, prompts):
        rows = max(len(p) for p in prompts) + 1
        out = torch.zeros(len(prompts), rows, DIT.text_dim)
        for i, p in enumerate(prompts):
            out[i, :len(p) + 1] = 1.0
        return out


def test_clips_become_latent_and_synthesised_anchor(tmp_path):
    from pixelwizard_core.io.video import write_video
    from pixelwizard_core.models.vae import VAEConfig, WanVAE
    from pixelwizard_core.training.data import ClipSettings

    frames = (torch.rand(7, 80, 120, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    write_video(tmp_path / "clip.mp4", [frames.numpy()], crf=0)
    items = discover(tmp_path)
    with pytest.raises(MissingFileError, match="no prompt"):
        TrainingData(items, vae=object(), text_encoder=FakeText(), clip=ClipSettings(64, 64, 5))
    (tmp_path / "clip.txt").write_text("a fox\n")
    with pytest.raises(ConfigError, match="VAE"):
        TrainingData(items, text_encoder=FakeText())
    torch.manual_seed(0)
    data = TrainingData(items, vae=WanVAE(VAEConfig.tiny()), text_encoder=FakeText(), clip=ClipSettings(64, 64, 5),
                        degrade=DegradeConfig(size=(32, 32)))
    batch = data.batch([0], torch.Generator().manual_seed(1))
    assert batch.latent.shape == (1, 48, 2, 4, 4) and batch.anchor.shape == (1, 48, 2, 2, 2)
    assert batch.context.shape == (1, 6, DIT.text_dim) and batch.empty_context.shape == (1, DIT.text_dim)
    again = data.batch([0], torch.Generator().manual_seed(1))
    assert torch.equal(batch.anchor, again.anchor)  # window and degradation come from the generator


# --- the toy evidence -----------------------------------------------------------------------------------


def test_shortcut_training_makes_4_step_sampling_match_the_exact_flow(one_thread):
    """From one flow-matching start, the same number of updates of shortcut training (the reference's
    options) brings 4-step samples much closer to the exact flow map than before, and closer than
    plain flow matching. Fuller table: bench/shortcut_toy.py, BENCHMARKS.md."""
    recipe = ToyRecipe(pretrain_steps=500, finetune_steps=500, batch_size=128, hidden=128)
    evaluator = ToyEvaluator(count=1024, seed=99)
    start = pretrain(recipe, seed=0)
    before = evaluator(start, zero_dt=True).flow_mse
    results = {}
    for name, config in (("shortcut", recipe.objective), ("flow matching", replace(recipe.objective, sc_rate=0.0))):
        model = ToyShortcutNet(hidden=recipe.hidden)
        model.load_state_dict(start.state_dict())
        train_toy(model, replace(config, shift=recipe.shift), steps=recipe.finetune_steps, lr=recipe.finetune_lr,
                  batch_size=recipe.batch_size, seed=1)
        results[name] = evaluator(model, zero_dt=name == "flow matching").flow_mse
    assert results["shortcut"] < 0.6 * before, (before, results)
    assert results["shortcut"] < 0.6 * results["flow matching"], (before, results)


# --- the train command ---------------------------------------------------------------------------------


@pytest.fixture
def train_files(tmp_path):
    model = _tiny_hr()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "hr.safetensors")
    _latent_files(tmp_path / "data")
    save_tensor_file(tmp_path / "empty.safetensors", {"context": torch.zeros(1, DIT.text_dim)}, {})
    return tmp_path


def _train_args(root: Path, out: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--data", str(root / "data"), "--output_dir", str(root / out), "--init", str(root / "hr.safetensors"),
            "--empty_context", str(root / "empty.safetensors"), "--device", "cpu", "--precision", "fp32",
            "--steps", str(steps), "--save_every", "2", "--sc_rate", "0.5", "--lr", "1e-3", "--ema_start", "1",
            "--log_every", "0", *extra]


def test_train_command_resumes_to_the_same_weights(train_files, one_thread):
    root = train_files
    assert main(_train_args(root, "straight", 4, "--export_pt")) == 0
    assert main(_train_args(root, "stopped", 2)) == 0
    assert main(_train_args(root, "stopped", 4)) == 0  # --resume auto picks checkpoint_000002
    final = [load_hr_dit(root / run / "checkpoint_000004" / "model.safetensors") for run in ("straight", "stopped")]
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in final)))
    assert (root / "straight" / "checkpoint_000004" / "model.pt").is_file()
    ema = load_hr_dit(root / "straight" / "checkpoint_000004" / "model.pt", use_ema=True)
    assert not all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), final[0].state_dict().values()))
    meta = read_metadata(root / "straight" / "checkpoint_000004" / "model.safetensors")
    assert meta["objective"]["beta"] == 0.7 and meta["step_size_conditioning"] == "sinusoidal"


def test_train_command_ablation_flags_reach_the_checkpoint(train_files, one_thread):
    root = train_files
    assert main(_train_args(root, "ablation", 1, "--index_sampling", "uniform", "--calibration_power", "0",
                            "--step_size_conditioning", "log_snr_span", "--beta", "1.5")) == 0
    meta = read_metadata(root / "ablation" / "checkpoint_000001" / "model.safetensors")
    assert meta["objective"]["index_sampling"] == "uniform" and meta["objective"]["calibration_power"] == 0
    assert meta["objective"]["beta"] == 1.5 and meta["step_size_conditioning"] == "log_snr_span"
    assert load_hr_dit(root / "ablation" / "checkpoint_000001" / "model.safetensors").step_size_conditioning == \
        "log_snr_span"
    # resuming with another conditioning is refused, before any model is loaded; so are unknown names
    assert main(_train_args(root, "ablation", 2, "--step_size_conditioning", "sinusoidal")) == 2
    assert main(_train_args(root, "other", 1, "--step_size_conditioning", "nope")) == 2
    assert main(_train_args(root, "other", 1, "--plugin", "no_such_module_xyz")) == 2


def test_a_plugin_module_adds_a_conditioning_to_train_with(train_files, monkeypatch, one_thread):
    (train_files / "my_conditioning.py").write_text(
        "from pixelwizard_core.models.hr import SinusoidalStepSize, register_step_size_conditioning\n"
        "class Halved(SinusoidalStepSize):\n"
        "    def signal(self, t, dt):\n"
        "        return dt / 2\n"
        "register_step_size_conditioning('halved_test', Halved)\n")
    monkeypatch.syspath_prepend(str(train_files))
    args = _train_args(train_files, "plugin", 1, "--plugin", "my_conditioning", "--step_size_conditioning", "halved_test")
    assert main(args) == 0
    folder = train_files / "plugin" / "checkpoint_000001"
    assert read_metadata(folder / "model.safetensors")["step_size_conditioning"] == "halved_test"
    assert load_hr_dit(folder / "model.safetensors").step_size_conditioning == "halved_test"


def test_train_command_refuses_bad_inputs_early(train_files):
    root = train_files
    assert main(_train_args(root, "x", 1, "--cfg_dropout", "2")) == 2
    args = _train_args(root, "y", 1)
    args[args.index("--empty_context") + 1] = str(root / "hr.safetensors")  # no 'context' in it
    assert main(args) == 2


# --- FSDP across two processes ---------------------------------------------------------------------------


def _fsdp_worker(rank: int, ports: list[int], root: str, result: dict) -> None:
    torch.set_num_threads(1)
    codes = []
    runs = (("fsdp", 2), ("fsdp", 3), ("fsdp_straight", 3))  # the 2nd run resumes the 1st
    for port, (out, steps) in zip(ports, runs):
        # a fresh port per run: a rank that finishes first must not join the previous run's store
        os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        args = _train_args(Path(root), out, steps)
        args[args.index("--precision") + 1] = "bf16"
        codes.append(main(args))
    result[rank] = codes


def test_train_command_with_fsdp_on_two_processes(train_files):
    """Two gloo processes, bf16 FSDP mixed precision: each rank writes its optimiser shard, rank 0 the full
    float32 weights; stopping at step 2 and resuming on both ranks gives the uninterrupted run's weights."""
    manager = mp.Manager()
    result = manager.dict()
    ports = [free_port() for _ in range(3)]
    context = mp.start_processes(_fsdp_worker, args=(ports, str(train_files), result), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two FSDP training processes did not finish within 300 s")
    assert dict(result) == {0: [0, 0, 0], 1: [0, 0, 0]}
    assert [p.name for p in list_checkpoints(train_files / "fsdp")] == ["checkpoint_000002", "checkpoint_000003"]
    folder = train_files / "fsdp" / "checkpoint_000003"
    assert sorted(p.name for p in folder.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                       "state_rank00000.safetensors", "state_rank00001.safetensors"]
    assert read_metadata(folder / "model.safetensors")["step"] == 3
    trained = load_hr_dit(folder / "model.safetensors")
    straight = load_hr_dit(train_files / "fsdp_straight" / "checkpoint_000003" / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), straight.state_dict().values()))
    start = load_hr_dit(train_files / "hr.safetensors")
    assert trained.patch_embedding.weight.dtype == torch.float32
    assert not torch.equal(trained.blocks[0].ffn[0].weight, start.blocks[0].ffn[0].weight)
