"""`download` against a fake Hugging Face Hub on 127.0.0.1 (tests/fake_hub.py; the hub client is pointed at
it with HF_ENDPOINT). Nothing here touches the internet.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from fake_hub import COMMIT, hub, repo_files  # noqa: F401 (fixtures)
from safetensors.torch import save as save_bytes

from pixelwizard_core import download as dl
from pixelwizard_core.cli import main
from pixelwizard_core.setup_cli import summary


def test_files_land_in_their_comfyui_folders_and_a_second_run_downloads_nothing(hub, repo_files, tmp_path):
    models = tmp_path / "models"
    files = dl.select(["wan", "lr", "2k"])
    results = dl.download(files, models)
    assert [r.status for r in results] == ["downloaded"] * 5, summary(results)
    expected = {"diffusion_models/wan2.2_ti2v_5B_fp16.safetensors", "vae/wan2.2_vae.safetensors",
                "text_encoders/umt5_xxl_fp16.safetensors", "diffusion_models/PixelWizard/lr/model.pt",
                "diffusion_models/PixelWizard/2k/model.pt"}
    assert {p.relative_to(models).as_posix() for p in models.rglob("*") if p.is_file()} == expected
    for file in files:
        assert (models / file.relative).read_bytes() == repo_files[(file.repo, file.path)]
    hub.requests.clear()
    again = dl.download(files, models)
    assert [r.status for r in again] == ["present"] * 5
    assert hub.requests == []  # present files are checked locally, the hub is not even asked


def test_flat_folder_and_cli(hub, tmp_path):
    target = tmp_path / "anywhere"
    assert main(["download", "2k", "vae", "--dir", str(target)]) == 0
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "PixelWizard/2k/model.pt", "wan2.2_vae.safetensors"]
    # a flat folder is found again by the models-folder lookup: nothing is fetched twice
    hub.requests.clear()
    assert main(["download", "2k", "vae", "--models", str(target)]) == 0
    assert hub.requests == []


def test_an_interrupted_download_resumes_where_it_stopped(hub, repo_files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the client's retry pause
    # the client writes what it received in chunks of this size: make them small beside the tiny file,
    # as 10 MB chunks are small beside a 10 GB one
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    file = dl.FILES_BY_KEY["dit"]
    data = repo_files[(file.repo, file.path)]
    hub.cut_after = len(data) * 2 // 5
    with pytest.raises(dl.DownloadError, match="Run the same command again to resume") as caught:
        dl.download([file], tmp_path)
    parts = list((tmp_path / "diffusion_models").glob("*.part"))
    kept = parts[0].stat().st_size if len(parts) == 1 else -1
    assert hub.cut_after - 64 * 1024 < kept <= hub.cut_after  # all whole chunks received before the cut
    assert str(parts[0]) in str(caught.value)
    assert not (tmp_path / file.relative).exists()  # never a half file under the real name

    hub.down, hub.cut_after, hub.body_bytes = False, None, 0
    hub.requests.clear()
    results = dl.download([file], tmp_path)
    assert results[0].status == "downloaded"
    assert (tmp_path / file.relative).read_bytes() == data
    ranges = [r for method, _, r in hub.requests if method == "GET"]
    assert ranges == [f"bytes={kept}-"]
    assert hub.body_bytes == len(data) - kept  # only the rest travelled
    assert not list((tmp_path / "diffusion_models").glob("*.part"))


def test_a_file_with_wrong_keys_is_reported(hub, tmp_path, caplog):
    vae = dl.FILES_BY_KEY["vae"]
    hub.files[(vae.repo, vae.path)] = save_bytes({"encoder.something.weight": torch.zeros(3, 3)})
    results = dl.download(dl.select(["vae", "2k"]), tmp_path)
    status = {r.file.key: r for r in results}
    assert status["2k"].status == "downloaded"  # the others still download
    assert status["vae"].status == "bad"
    assert "wan2.2_vae.safetensors" in status["vae"].problem and "'vae'" in status["vae"].problem
    assert vae.url in status["vae"].problem
    # the command exits non-zero and says which file is wrong
    assert main(["download", "vae", "--models", str(tmp_path)]) == 1
    assert "wan2.2_vae.safetensors" in caplog.text


def test_a_closed_port_gives_one_clear_offline_message(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    files = dl.select(["wan", "2k"])
    with pytest.raises(dl.HubUnreachableError) as caught:
        dl.download(files, tmp_path / "models")
    message = str(caught.value)
    assert "unreachable" in message
    for file in files:  # which file, from where, to where
        assert file.url in message
        assert str(tmp_path / "models" / file.relative) in message
    assert main(["download", "wan", "2k", "--models", str(tmp_path / "models")]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and files[0].url in errors[0].getMessage()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.part"))


def test_offline_mode_never_asks_the_hub_but_uses_its_cache(hub, repo_files, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file = dl.FILES_BY_KEY["2k"]
    with pytest.raises(dl.HubUnreachableError, match="HF_HUB_OFFLINE"):
        dl.download([file], tmp_path / "models")
    # a copy that an earlier hub download left in HF_HOME is used instead
    repo_dir = tmp_path / "hf_home" / "hub" / "models--wxli318--PixelWizard"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    cached = repo_dir / "snapshots" / COMMIT / file.path
    cached.parent.mkdir(parents=True)
    cached.write_bytes(repo_files[(file.repo, file.path)])
    results = dl.download([file], tmp_path / "models")
    assert results[0].status == "linked"
    assert (tmp_path / "models" / file.relative).read_bytes() == cached.read_bytes()
    assert hub.requests == []


def test_selection_and_the_table():
    # the default is what a command-line 2K run loads: not the 10 GB base DiT the LR stage never opens
    assert [f.key for f in dl.select()] == ["vae", "t5_fp16", "lr", "2k"]
    assert [f.key for f in dl.select(["comfyui"])] == ["dit", "vae", "t5_fp8", "lr", "2k"]
    assert [f.key for f in dl.select(["comfyui"], text_encoder="fp16")] == ["dit", "vae", "t5_fp16", "lr", "2k"]
    assert [f.key for f in dl.select(["wan"], text_encoder="fp8")] == ["dit", "vae", "t5_fp8"]
    assert {f.key for f in dl.select(["official"])} >= {"official:dit", "official:vae", "official:t5"}
    with pytest.raises(dl.ConfigError, match="unknown download item"):
        dl.select(["8k"])
    names = [f.name for f in dl.known_files()]
    assert len(names) == len(set(names))  # one name per file: ComfyUI lists them side by side
    for file in dl.known_files():
        entry = file.comfy_entry()
        assert entry["url"] == f"https://huggingface.co/{file.repo}/resolve/main/{file.path}"
        assert entry["directory"] in ("diffusion_models", "vae", "text_encoders", "")
    assert Path(dl.FILES_BY_KEY["official:vae"].relative) == Path("Wan2.2-TI2V-5B/Wan2.2_VAE.pth")


FAST = ["--device", "cpu", "--dtype", "fp32", "--lr_size", "128*64", "--frame_num", "5", "--lr_steps", "3",
        "--resolution", "256x128", "--hr_steps", "2", "--num_patches", "2", "--overlap", "1"]


def test_generate_without_files_stops_early_with_the_download_command(tmp_path, caplog, monkeypatch):
    from pixelwizard_core.pipeline.store import ModelStore

    monkeypatch.setattr(ModelStore, "_load", lambda self, key, *rest: pytest.fail(f"loaded {key.role}"))
    empty = tmp_path / "models"
    assert main(["generate", "--models", str(empty), "--prompt", "x", *FAST]) == 2
    message = caplog.text
    assert f"python -m pixelwizard_core download t5_fp16 vae lr 2k --models {empty}" in message
    assert str(empty / "diffusion_models" / "PixelWizard" / "2k" / "model.pt") in message
    caplog.clear()
    assert main(["generate", "--models", str(empty), "--prompt", "x", *FAST, "--resolution", "4k"]) == 2
    assert "download t5_fp16 vae lr 4k" in caplog.text


def test_generate_download_fetches_what_is_missing_then_generates(hub, tmp_path):
    from pixelwizard_core.io.video import read_video

    models = tmp_path / "models"
    # the text encoder is already there: only the other three are fetched
    t5 = dl.FILES_BY_KEY["t5_fp16"]
    dl.download([t5], models)
    hub.requests.clear()
    assert main(["generate", "--download", "--models", str(models), "--prompt", "a fox", *FAST,
                 "--video_dir", str(tmp_path / "videos")]) == 0
    fetched = sorted(path.split("/resolve/main/")[1] for method, path, _ in hub.requests
                     if method == "GET" and "/resolve/" in path)
    assert fetched == ["2k/model.pt", "lr/model.pt", "split_files/vae/wan2.2_vae.safetensors"]
    assert tuple(read_video(tmp_path / "videos" / "0.mp4").shape) == (5, 128, 256, 3)


# --- downloads by purpose, the compact list, the models folder of every command ---------------------------


def _comfyui_models(root: Path) -> Path:
    """A ComfyUI models folder as ComfyUI ships it (checkpoints/ among its sub-folders)."""
    (root / "checkpoints").mkdir(parents=True)
    return root


@pytest.mark.parametrize("comfyui, expected", [(False, ["vae", "t5_fp16", "lr", "2k"]),
                                               (True, ["dit", "vae", "t5_fp8", "lr", "2k"])])
def test_download_without_items_fetches_by_purpose(tmp_path, monkeypatch, comfyui, expected):
    root = _comfyui_models(tmp_path / "models") if comfyui else tmp_path / "models"
    asked = []
    monkeypatch.setattr(dl, "download", lambda files, *a, **k: asked.extend(f.key for f in files) or [])
    assert main(["download", "--models", str(root)]) == 0
    assert asked == expected
    asked.clear()
    assert main(["download", "--models", str(root), "--text_encoder", "fp16", "wan"]) == 0
    assert asked == ["dit", "vae", "t5_fp16"]


def test_the_downloader_has_every_file_the_workflows_name():
    import json

    names = {(m["name"], m["directory"]) for path in Path(__file__).parents[1].glob("workflows/*.json")
             for node in json.loads(path.read_text())["nodes"] for m in node.get("properties", {}).get("models") or []}
    offered = {(f.name, f.folder) for f in dl.select(["comfyui", "4k"])}
    assert names and names <= offered, names - offered


def test_the_list_is_compact_and_shows_the_size_on_disk(tmp_path, capsys):
    vae = tmp_path / "vae" / "wan2.2_vae.safetensors"
    vae.parent.mkdir()
    with open(vae, "wb") as handle:
        handle.truncate(250_000_000)  # sparse: 0.25 GB on disk where the release is 1.4 GB
    assert main(["download", "--list", "--models", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"models folder: {tmp_path}"
    assert all(len(line) <= 100 for line in lines[1:]), max(lines[1:], key=len)
    row = next(line for line in lines if line.startswith("vae "))
    assert row.split() == ["vae", "0.2", "GB", "present", "vae/wan2.2_vae.safetensors"]
    assert next(line for line in lines if line.startswith("dit ")).split()[1:4] == ["10.0", "GB", "missing"]
    assert "  Comfy-Org/Wan_2.2_ComfyUI_Repackaged: dit, vae" in lines


def test_generate_in_a_comfyui_folder_asks_for_the_workflows_text_encoder(tmp_path, caplog):
    models = _comfyui_models(tmp_path / "models")
    assert main(["generate", "--models", str(models), "--prompt", "x", *FAST]) == 2
    assert "download t5_fp8 vae lr 2k" in caplog.text


@pytest.mark.parametrize("command, extra, items", [
    ("anchor", ["--prompt", "x"], "t5_fp16 lr"),
    ("upscale", ["a.safetensors"], "t5_fp16 2k vae"),
    ("decode", ["l.safetensors"], "vae"),
])
def test_every_stage_command_reads_the_models_folder(tmp_path, caplog, monkeypatch, command, extra, items):
    import torch

    from pixelwizard_core.pipeline.anchors import Anchor, save_hr_latent
    from pixelwizard_core.pipeline.store import ModelStore

    monkeypatch.setattr(ModelStore, "_load", lambda self, key, *rest: pytest.fail(f"loaded {key.role}"))
    monkeypatch.chdir(tmp_path)
    Anchor(torch.zeros(1, 48, 2, 4, 8), "a", "", seed=1, width=128, height=64, frames=5, steps=3, shift=5.0,
           cfg=5.0).save("a.safetensors")
    save_hr_latent("l.safetensors", torch.zeros(1, 48, 2, 8, 16), {"prompt": "a"})
    empty = tmp_path / "models"
    options = {"anchor": ["--lr_size", "128*64", "--frame_num", "5"], "upscale": ["--resolution", "256x128"],
               "decode": []}[command]
    assert main([command, "--models", str(empty), "--device", "cpu", *options, *extra]) == 2
    assert f"python -m pixelwizard_core download {items} --models {empty}" in caplog.text


def test_decode_runs_from_the_models_folder_alone(tmp_path):
    import torch
    from safetensors.torch import save_file
    from tiny_models import state_dicts

    from pixelwizard_core.io.video import read_video
    from pixelwizard_core.pipeline.anchors import save_hr_latent

    vae = tmp_path / "models" / "vae" / "wan2.2_vae.safetensors"  # where `download vae` puts it
    vae.parent.mkdir(parents=True)
    save_file({k: v.half() for k, v in state_dicts()["vae"].items()}, vae)
    latent = save_hr_latent(tmp_path / "l.safetensors", torch.randn(1, 48, 2, 4, 8), {"prompt": "a"})
    assert main(["decode", "--models", str(tmp_path / "models"), "--device", "cpu", "--num_patches", "1", str(latent),
                 "--video_dir", str(tmp_path / "v")]) == 0
    assert tuple(read_video(tmp_path / "v" / "l.mp4").shape) == (5, 64, 128, 3)
