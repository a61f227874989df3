"""Windows and macOS as far as Linux can simulate them: no POSIX-only module at import time, no hard links,
devices and model names by platform."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pixelwizard_core import system
from pixelwizard_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
POSIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp")

# Runs in a fresh interpreter: third-party packages are imported first (on Windows they do without these
# modules themselves), then the POSIX-only modules are made unimportable, every module of the library and
# of the node pack is imported, and (with a folder argument) generate --demo runs with os.link failing.
SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, json, os, pkgutil, sys
    import torch, numpy, safetensors, tqdm, imageio_ffmpeg, psutil, einops  # noqa: F401
    import multiprocessing.connection, subprocess, socket, tempfile  # noqa: F401

    BLOCKED = {blocked!r}
    for name in BLOCKED:
        sys.modules.pop(name, None)

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (simulated Windows)")
            return None

    sys.meta_path.insert(0, Block())
    failed = {{}}
    names = []
    for package in ("pixelwizard_core", "nodes"):
        module = importlib.import_module(package)
        names += [package] + [info.name for info in pkgutil.walk_packages(module.__path__, package + ".")]
    for name in names:
        if name.endswith("__main__"):
            continue  # it runs the command line
        try:
            importlib.import_module(name)
        except Exception as error:
            failed[name] = f"{{type(error).__name__}}: {{error}}"
    imported = len(names)
    if len(sys.argv) > 1:
        def no_link(*args, **kwargs):
            raise OSError(95, "Operation not supported (simulated file system without hard links)")
        os.link = no_link
        from pixelwizard_core.cli import main
        out = sys.argv[1]
        code = main(["generate", "--demo", "--video_dir", out + "/vid", "--save_dir", out + "/lat", "--png"])
        failed["generate"] = None if code == 0 else f"exit code {{code}}"
    print(json.dumps({{"imported": imported, "failed": {{k: v for k, v in failed.items() if v}}}}))
""")


def _run(*args: str) -> dict:
    script = SCRIPT.format(blocked=POSIX_ONLY)
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _demo_outputs(folder: Path) -> tuple[torch.Tensor, list[bytes]]:
    from safetensors.torch import load_file

    latent = load_file(folder / "lat" / "0.safetensors")["latent"]
    frames = [p.read_bytes() for p in sorted((folder / "vid" / "0_frames").glob("*.png"))]
    return latent, frames


@pytest.mark.slow
def test_everything_imports_and_the_demo_runs_without_posix_modules_or_hard_links(tmp_path):
    simulated = _run(str(tmp_path / "windows"))
    assert simulated["failed"] == {}
    assert simulated["imported"] > 80  # every module of both packages was tried
    from pixelwizard_core.cli import main

    assert main(["generate", "--demo", "--video_dir", str(tmp_path / "normal" / "vid"),
                 "--save_dir", str(tmp_path / "normal" / "lat"), "--png"]) == 0
    latent, frames = _demo_outputs(tmp_path / "windows")
    normal_latent, normal_frames = _demo_outputs(tmp_path / "normal")
    assert torch.equal(latent, normal_latent)
    assert len(frames) > 1 and frames == normal_frames  # every frame, bit for bit
    leftovers = [p.name for p in (tmp_path / "windows").rglob(".*")]
    assert leftovers == []  # nothing half-written was left


def test_the_block_is_real():
    """The simulation would prove nothing if the blocked modules could still be imported."""
    probe = SCRIPT.format(blocked=POSIX_ONLY) + "\ntry:\n    import resource\n    print('IMPORTED')\nexcept ImportError:\n    print('BLOCKED')\n"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "BLOCKED", result.stderr[-2000:]


def test_peak_memory_without_resource_falls_back_to_psutil(monkeypatch):
    import psutil  # noqa: F401 (on Linux it imports resource itself; on Windows it has no need)

    real = system.peak_rss_bytes()
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource now raises ImportError
    fallback = system.peak_rss_bytes()
    assert fallback > 0 and real > 0
    assert fallback <= real * 1.5 + 2**28  # the current RSS, never above the peak by much


def test_stop_signals_are_those_the_platform_has(monkeypatch):
    names = {sig.name for sig in system.stop_signals()}
    assert {"SIGINT", "SIGTERM"} <= names
    monkeypatch.delattr(signal, "SIGHUP")  # as on Windows
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)  # a stand-in for Ctrl-Break
    names = {sig.name if hasattr(sig, "name") else sig for sig in system.stop_signals()}
    assert "SIGHUP" not in names and signal.SIGUSR1 in system.stop_signals()


def test_a_stop_signal_becomes_an_exception_that_cleans_up(tmp_path):
    from pixelwizard_core.io.video import VideoWriter

    target = tmp_path / "x.mp4"
    with pytest.raises(KeyboardInterrupt) as stopped, system.stop_on_signals():
        with VideoWriter(target, fps=8) as writer:
            writer.append(torch.zeros(1, 32, 32, 3))
            signal.raise_signal(signal.SIGTERM)
    assert stopped.value.signal_name == "SIGTERM"
    assert list(tmp_path.iterdir()) == []  # the partial file was removed
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_a_second_signal_does_not_interrupt_the_abort_of_the_first(tmp_path, monkeypatch):
    """Ctrl-C twice: the second arrives while the writer aborts (here: while ffmpeg is being stopped); the
    abort still completes and removes the partial file, and the run ends with the first signal."""
    from pixelwizard_core.io import video

    real_stop = video.VideoWriter.abort
    seconds = []

    def abort_with_a_second_signal(self) -> None:
        signal.raise_signal(signal.SIGINT)  # would raise inside the clean-up without the guard
        seconds.append(True)
        real_stop(self)

    monkeypatch.setattr(video.VideoWriter, "abort", abort_with_a_second_signal)
    target = tmp_path / "x.mp4"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the tests run in a background job
    with pytest.raises(KeyboardInterrupt) as stopped, system.stop_on_signals():
        with video.VideoWriter(target, fps=8) as writer:
            writer.append(torch.zeros(1, 32, 32, 3))
            signal.raise_signal(signal.SIGTERM)
    assert seconds == [True] and stopped.value.signal_name == "SIGTERM"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored


def test_devices_resolve_by_platform(monkeypatch):
    assert system.resolve_device("auto") == torch.device("cpu")
    assert system.resolve_device("CPU") == torch.device("cpu")
    for bad, message in (("cuda", "sees no CUDA"), ("cuda:3", "sees no CUDA"), ("mps", "MPS"), ("tpu", "choose one of")):
        with pytest.raises(ConfigError, match=message):
            system.resolve_device(bad)
    monkeypatch.setattr(system, "mps_available", lambda: True)
    assert system.resolve_device("auto") == torch.device("mps")
    assert system.unified_memory(torch.device("mps")) and system.device_kind(torch.device("mps")) == "MPS"
    monkeypatch.setattr(system, "mps_supports_bf16", lambda: False)
    assert system.supported_dtype(torch.bfloat16, torch.device("mps")) == torch.float16
    assert system.supported_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("name", ["PixelWizard\\2k\\model.pt", "PixelWizard/2k/model.pt",
                                  "Pixel Wizard\\ünïcode 2k\\model.pt"])
def test_model_names_from_windows_workflows_resolve(name, tmp_path, monkeypatch):
    from nodes import host

    parts = name.replace("\\", "/").split("/")
    file = tmp_path / "diffusion_models" / Path(*parts)
    file.parent.mkdir(parents=True)
    file.write_bytes(b"x")
    monkeypatch.setenv("PIXELWIZARD_MODELS", str(tmp_path))
    assert host.model_path("diffusion_models", name) == file
    assert "/".join(parts) in host.model_files("diffusion_models")


@pytest.mark.parametrize("requested, world, local_rank, expected", [
    ("cuda:1", 1, "0", "cuda:1"),  # one process: an explicit index wins
    ("cuda:0", 1, "3", "cuda:0"),
    ("cuda:0", 4, "3", "cuda:3"),  # torchrun: each rank its LOCAL_RANK
    ("cuda", 2, "1", "cuda:1"),
    ("cpu", 2, "1", "cpu"),
])
def test_the_device_rule_for_one_process_and_for_torchrun_ranks(monkeypatch, requested, world, local_rank, expected):
    from pixelwizard_core.distributed.launch import rank_device

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert rank_device(torch.device(requested), world) == torch.device(expected)


def test_compile_with_sharded_dits_is_refused_up_front(tmp_path):
    from pixelwizard_core.distributed.launch import from_env
    from pixelwizard_core.errors import ConfigError
    from pixelwizard_core.pipeline.models import ModelFiles, Models

    models = Models(ModelFiles(lr=tmp_path / "lr.pt"), device="cpu", compile_blocks=True)
    with pytest.raises(ConfigError, match="--compile with --dit_fsdp"):
        from_env(models, dit_fsdp=True)
