"""A stop signal during the decode, sent to a real `generate` process: the unfinished mp4 is removed, ffmpeg is
ended, one line says what was kept, and the exit code is 128 + the signal (issue 15, item 1)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from test_cli import official_args, weights  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
# The demo with a decode slowed down after each chunk, so the signal surely lands while the mp4 is open.
DRIVER = """
import sys, time
from pixelwizard_core.io import video
append = video.VideoWriter.append
def slow(self, frames):
    append(self, frames)
    time.sleep(2)
video.VideoWriter.append = slow
from pixelwizard_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_the_decode_leaves_no_partial_file_and_no_ffmpeg(tmp_path):
    stop_during_the_decode(tmp_path, "SIGTERM", 143)  # what timeout, docker stop, Slurm and torchrun send


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGHUP", 129)])
def test_ctrl_c_and_a_closed_terminal_during_the_decode_end_the_same_way(tmp_path, name, code):
    stop_during_the_decode(tmp_path, name, code)


def stop_during_the_decode(tmp_path: Path, name: str, code: int) -> None:
    videos, latents = tmp_path / "videos", tmp_path / "latents"
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "generate", "--demo", "--device", "cpu", "--video_dir", str(videos),
         "--save_dir", str(latents)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: list(videos.glob(".*.partial")) if videos.is_dir() else [], 180, "the decode to start")
        ffmpeg = _wait_for(lambda: [p for p in psutil.Process(process.pid).children(recursive=True)
                                    if "ffmpeg" in p.name()], 30, "ffmpeg")
        process.send_signal(getattr(signal, name))
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert not list(videos.glob("*partial*")) and not list(videos.glob("*.mp4")), list(videos.iterdir())
    for child in ffmpeg:  # ended, not left running as an orphan
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert stopped == [f"stopped by {name} during the decode of [1/1] into {videos / '0.mp4'}: unfinished outputs "
                       f"removed; kept {latents / '0.safetensors'}"], stderr
    assert (latents / "0.safetensors").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_two_torchrun_ranks_during_the_decode(weights, tmp_path):
    """What torchrun does when one rank dies: SIGTERM to every rank. The two ranks are two groups of one
    (--ulysses_size 1); whichever took the one prompt aborts its writer although its clean-up may meet a
    closed connection. Both exit 143; each group's leader prints one line, and the one that was decoding
    says what it removed and kept (before, only global rank 0 spoke, and said "nothing was written" when
    rank 1 had the prompt)."""
    import os

    videos, latents = tmp_path / "videos", tmp_path / "latents"
    argv = [sys.executable, "-c", DRIVER, "generate", *official_args(weights), "--device", "cpu", "--dtype", "fp32",
            "--lr_size", "128*64", "--frame_num", "9", "--lr_steps", "2", "--resolution", "256x128", "--hr_steps", "2",
            "--num_patches", "2", "--overlap", "1", "--prompt", "x", "--video_dir", str(videos),
            "--save_dir", str(latents)]
    port, ranks = str(free_port()), []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PYTHONPATH": str(ROOT)}
        ranks.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        _wait_for(lambda: list(videos.glob(".*.partial")) if videos.is_dir() else [], 240, "the decode to start")
        ffmpeg = [p for r in ranks for p in psutil.Process(r.pid).children(recursive=True) if "ffmpeg" in p.name()]
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert [rank.returncode for rank in ranks] == [143, 143], outputs
    assert not any("Traceback" in output for output in outputs), outputs[0][-3000:]
    assert not list(videos.glob("*partial*")) and not list(videos.glob("*.mp4"))
    assert ffmpeg and all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in ffmpeg)
    lines = sorted(([line for line in output.splitlines() if line.startswith("stopped by")] for output in outputs),
                   key=lambda found: "preparations" in str(found))
    assert lines == [[f"stopped by SIGTERM during the decode of [1/1] into {videos / '0.mp4'}: unfinished outputs "
                      f"removed; kept {latents / '0.safetensors'}"],
                     ["stopped by SIGTERM during the preparations: unfinished outputs removed; nothing was written"]
                     ], outputs
