"""`doctor` on this machine, the peak-memory estimate against the formula in BENCHMARKS.md, and
`generate --demo`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny_models import state_dicts, write_pixelwizard

from pixelwizard_core.pipeline import memory
from pixelwizard_core import doctor
from pixelwizard_core.cli import main
from pixelwizard_core.pipeline.presets import HR_PRESETS

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
GIB = 2**30


# --- the estimate against BENCHMARKS.md -------------------------------------------------------------


def documented_constants() -> dict[str, float]:
    """The `| `NAME` | value | ... |` rows of BENCHMARKS.md's 'Peak memory estimate' section."""
    text = BENCHMARKS.read_text()
    section = text[text.index("## Peak memory estimate"):]
    section = section[:section.find("\n## ", 5) if "\n## " in section[5:] else None]
    values = {name: float(value.replace(",", "")) for name, value in
              re.findall(r"^\| `([A-Z0-9_]+)` \| ([0-9][0-9,.]*) \|", section, re.M)}
    assert len(values) >= 12, "the constants table of BENCHMARKS.md was not found"
    return values


def tile_areas(latent_h: int, latent_w: int, patches: int, overlap: int = 3) -> list[int]:
    """Tiles along the width as the reference plans them (BENCHMARKS.md): base = w // n, widened by the
    overlap on interior sides, clipped."""
    base, areas = latent_w // patches, []
    for i in range(patches):
        start, stop = base * i, (base * (i + 1) if i < patches - 1 else latent_w)
        start, stop = max(0, start - overlap * (i > 0)), min(latent_w, stop + overlap * (i < patches - 1))
        areas.append(latent_h * (stop - start))
    return areas


def documented_estimate(c: dict, width: int, height: int, mode: str, frames: int = 121) -> float:
    """The formula of BENCHMARKS.md, written out independently of pixelwizard_core.doctor."""
    t = (frames - 1) // 4 + 1
    tokens_hr, tokens_lr = t * (height // 32) * (width // 32), t * (256 // 32) * (448 // 32)
    w_t5 = 2 * c["T5_PARAMS"]
    w_lr = 2 * c["DIT_PARAMS"]
    w_hr = 2 * c["DIT_PARAMS"] + 2 * c["HR_DT_PARAMS"] + 4 * c["HR_ADAPTER_PARAMS"]
    vae_bytes = 2 if mode == "lowvram" else 4
    w_vae = vae_bytes * c["VAE_PARAMS"]
    patches = {2560: 3, 3840: 4}[width]
    areas = tile_areas(height // 16, width // 16, patches)
    if mode == "lowvram":  # bf16, one tile at a time: one tile's cache; the blended chunk is on the host
        decode = (max(areas) * (c["VAE_CACHE_BYTES_PER_LATENT_PIXEL"] / 2
                                + c["VAE_TRANSIENT_BF16_BYTES_PER_LATENT_PIXEL"])
                  + 48 * 2 * 256 * max(areas))
    else:  # float32, every tile's cache at once
        decode = (sum(areas) * c["VAE_CACHE_BYTES_PER_LATENT_PIXEL"]
                  + max(areas) * c["VAE_TRANSIENT_FP32_BYTES_PER_LATENT_PIXEL"]
                  + 48 * (width * height + 2 * 256 * max(areas)))
    work = {"text": 0 if mode == "lowvram" else c["T5_ACTIVATION_BYTES"],
            "anchor": tokens_lr * (2 * c["DIT_BYTES_PER_TOKEN"] + c["SAMPLER_BYTES_PER_TOKEN"]) + c["DIT_CHUNK_BYTES"],
            "hr": tokens_hr * (c["DIT_BYTES_PER_TOKEN"] + c["SAMPLER_BYTES_PER_TOKEN"]) + c["DIT_CHUNK_BYTES"],
            "decode": decode}
    weights = {"text": 0 if mode == "lowvram" else w_t5, "anchor": w_lr, "hr": w_hr, "decode": w_vae}
    if mode == "gpu":
        return max(sum(weights.values()) + w for w in work.values())
    return max(weights[s] + work[s] for s in work)


def test_the_code_uses_the_documented_constants():
    for name, value in documented_constants().items():
        assert getattr(memory, name) == pytest.approx(value, rel=1e-9), name


@pytest.mark.parametrize("preset", ["2k", "4k"])
@pytest.mark.parametrize("mode", ["gpu", "offload", "lowvram"])
def test_the_estimate_follows_the_documented_formula(preset, mode):
    c = documented_constants()
    p = HR_PRESETS[preset]
    estimate = memory.estimate_memory(p.width, p.height, 121, mode=mode)
    assert estimate.peak == pytest.approx(documented_estimate(c, p.width, p.height, mode), rel=1e-6)
    assert estimate.peak == max(estimate.stages.values())


def test_the_documented_figures_are_what_the_code_gives():
    """The table of estimates in BENCHMARKS.md lists each preset and mode's peak in GiB."""
    text = BENCHMARKS.read_text()
    rows = re.findall(r"^\| (2k|4k) \| (gpu|offload|lowvram) \| ([0-9.]+) GiB \|", text, re.M)
    assert len(rows) == 6
    for preset, mode, gib in rows:
        p = HR_PRESETS[preset]
        assert memory.estimate_memory(p.width, p.height, mode=mode).peak_gib == pytest.approx(float(gib), abs=0.05)


def test_modes_order_and_fitting():
    for preset in HR_PRESETS.values():
        peaks = [memory.estimate_memory(preset.width, preset.height, mode=m).peak for m in memory.PROFILES]
        assert peaks[0] > peaks[1] >= peaks[2] > peaks[3]  # gpu > offload >= lowvram > block_swap
    two_k = memory.estimate_memory(2560, 1440, mode="offload")
    four_k = memory.estimate_memory(3840, 2144, mode="offload")
    assert four_k.peak > two_k.peak
    assert two_k.fits(80 * GIB) and not two_k.fits(int(two_k.peak))  # headroom is required
    # fp8 block weights save about 4.9 GB in every stage that holds a DiT
    fp8 = memory.estimate_memory(2560, 1440, mode="offload", precision="fp8")
    assert two_k.stages["hr"] - fp8.stages["hr"] == memory.DIT_BLOCK_LINEAR_PARAMS


# --- the doctor command -----------------------------------------------------------------------------


def test_doctor_on_this_machine_reports_and_exits_1_without_models(tmp_path, capsys):
    code = main(["doctor", "--models", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert code == 1  # documented: 1 when something blocks generation (here: no model files)
    for expected in ("torch", "CUDA (torch)", "sdpa (cpu)", "flash (cpu)", "ffmpeg (imageio-ffmpeg)",
                     "files for a 2k run", "2k 2560x1440", "4k 3840x2144", "gpu", "lowvram", "Not ready"):
        assert expected in out, expected
    assert "python -m pixelwizard_core download t5_fp16 vae lr 2k --models" in out
    assert re.search(r"sdpa \(cpu\)\s+works", out.replace("ok   ", ""))


def test_doctor_json_and_exit_0_when_ready(tmp_path, capsys, monkeypatch):
    """With the 2K files in place and an 80 GiB GPU (faked: this machine has none) nothing blocks."""
    from fake_hub import make_repo_files

    from pixelwizard_core import download as dl

    models = tmp_path / "models"
    (tmp_path / "spm").mkdir()
    for (repo, path), data in make_repo_files(tmp_path / "spm").items():
        file = next(f for f in dl.known_files() if (f.repo, f.path) == (repo, path))
        if file.key in ("t5_fp16", "vae", "lr", "2k"):
            (models / file.relative).parent.mkdir(parents=True, exist_ok=True)
            (models / file.relative).write_bytes(data)
    monkeypatch.setattr(doctor, "_gpus", lambda: [doctor.Gpu(0, "Fake H100", "9.0", 80 * GIB, 79 * GIB)])
    code = main(["doctor", "--models", str(models), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["exit_code"] == 0, [c for c in report["checks"] if not c["ok"]]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["files for a 2k run"]["ok"] and not checks["files for a 4k run"]["ok"]
    assert checks["PixelWizard/2k/model.pt"]["ok"]
    assert {(r["preset"], r["mode"]) for r in report["memory"]} == {
        (p, m) for p in ("2k", "4k") for m in ("gpu", "offload", "lowvram", "block_swap")}


def test_doctor_names_a_broken_file(tmp_path, capsys):
    models = tmp_path / "models"
    write_pixelwizard(tmp_path / "pw", state_dicts())
    bad = models / "diffusion_models" / "PixelWizard" / "2k" / "model.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes((tmp_path / "pw" / "lr" / "model.pt").read_bytes())  # an LR model where the HR one goes
    assert main(["doctor", "--models", str(models)]) == 1
    out = capsys.readouterr().out
    assert "PixelWizard/2k/model.pt" in out and "'hr_dit'" in out


# --- generate --demo --------------------------------------------------------------------------------


def test_generate_demo_writes_a_noise_video_without_files(tmp_path, monkeypatch):
    import time

    from pixelwizard_core.io.video import read_video

    monkeypatch.setenv("PIXELWIZARD_MODELS", str(tmp_path / "no_models_here"))
    start = time.perf_counter()
    assert main(["generate", "--demo", "random", "--device", "cpu", "--video_dir", str(tmp_path)]) == 0
    seconds = time.perf_counter() - start
    video = read_video(tmp_path / "0.mp4")
    assert tuple(video.shape) == (9, 192, 256, 3)
    assert video.float().std() > 0
    assert not (tmp_path / "no_models_here").exists()
    assert seconds < 90, seconds  # about 6 s of CPU time on 2 cores; generous for loaded machines


def test_the_chunk_allowance_is_the_dit_chunk_budget():
    from pixelwizard_core.models.dit import FFN_CHUNK_BYTES

    assert memory.DIT_CHUNK_BYTES == FFN_CHUNK_BYTES


def test_the_vae_cache_constant_is_the_exact_count_of_the_real_decoder():
    from pixelwizard_core.models.vae import VAEConfig, decoder_cache_elements

    elements = decoder_cache_elements(VAEConfig(), (16, 16))
    assert elements * 4 / (16 * 16) == memory.VAE_CACHE_BYTES_PER_LATENT_PIXEL
    assert decoder_cache_elements(VAEConfig(), (16, 32)) == 2 * elements  # proportional to the latent area
