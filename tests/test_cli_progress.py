"""What a terminal shows during `generate` (issue 16): every bar drawn with its total, no log line on a bar's
line, a model load never counted into a bar; and the per-stage memory figures."""

from __future__ import annotations

import os
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import FAST, official_args, weights  # noqa: F401 (fixture)


ROOT = Path(__file__).resolve().parents[1]
LOAD_SECONDS = 4.0
# `generate` with the HR model's load slowed down, as a 2K checkpoint's load is slow
SLOW_LOAD = f"""
import sys, time
from pixelwizard_core.pipeline.store import ModelStore
load = ModelStore._load
def slow(self, key, *rest):
    if key.role == "hr":
        time.sleep({LOAD_SECONDS})
    return load(self, key, *rest)
ModelStore._load = slow
from pixelwizard_core.cli import main
sys.exit(main(sys.argv[1:]))
"""
BAR = re.compile(r"([^\r\n\x1b]+?): *(\d+)%\|[^\r\n]*?\| (\d+)/(\d+) \[(\d\d):(\d\d)")
NO_TOTAL = re.compile(r"\d+(?:step|tile-frame|it)s? \[\d\d:\d\d")


def run_in_pty(argv: list[str], cwd: Path) -> str:
    """Everything the command writes to a 120-column terminal, as the terminal receives it."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(slave)
    received, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        try:
            data = os.read(master, 65536) if ready else b""
        except OSError:  # the command exited and closed the terminal
            break
        if ready and not data:
            break
        received += data
    process.wait(timeout=60)
    os.close(master)
    assert process.returncode == 0, received.decode(errors="replace")
    return received.decode(errors="replace")


def screen(stream: str) -> list[str]:
    """The rows a terminal keeps after ``stream`` (carriage return, line feed and cursor up; other escape
    sequences ignored): what the user reads when the command is done."""
    rows, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|\r|\n|[^\x1b\r\n]", stream):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            rows.extend([] for _ in range(row + 1 - len(rows)))
        elif token.startswith("\x1b"):
            row = max(0, row - 1) if token.endswith("A") else row
        else:
            line = rows[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col] = token
            col += 1
    return ["".join(r).rstrip() for r in rows]


def check_terminal(stream: str, messages: list[str]) -> list[tuple[str, int, int, int]]:
    """Every bar drawn with its total, every log message alone on its row; the bar draws (label, done,
    total, elapsed seconds) in order."""
    assert not NO_TOTAL.search(stream), NO_TOTAL.search(stream).group(0)
    draws = [(m[1], int(m[3]), int(m[4]), 60 * int(m[5]) + int(m[6])) for m in BAR.finditer(stream)]
    assert draws, stream
    rows = screen(stream)
    for message in messages:
        found = [row for row in rows if message in row]
        assert found, (message, rows)
        assert all(row.startswith(message) and "%|" not in row for row in found), found
    return draws


@pytest.mark.skipif(sys.platform == "win32", reason="pty")
def test_bars_start_after_the_load_with_their_totals_and_logs_keep_their_own_rows(weights, tmp_path):
    argv = [sys.executable, "-c", SLOW_LOAD, "generate", *official_args(weights), *FAST, "--prompt", "a fox",
            "--video_dir", str(tmp_path)]
    stream = run_in_pty(argv, tmp_path)
    draws = check_terminal(stream, ["loading hr model", "loaded hr model", "tiled VAE decode", "wrote ",
                                    "[1/1] text "])
    assert {label for label, *_ in draws} == {"[1/1] LR 128x64", "[1/1] HR 256x128",
                                              "[1/1] decode (2 tiles x 2 latent frames)"}
    hr = [d for d in draws if d[0].startswith("[1/1] HR")]
    assert hr[0][1:3] == (0, 2)  # drawn with its total, before its first step
    assert stream.index("loaded hr model") < stream.index("[1/1] HR 256x128:")  # not before the model is there
    # the load is not counted into the steps: the bar's time and the load fit in the stage's time
    stage_seconds = float(re.search(r"hr (\d+\.\d)s", stream).group(1))
    assert max(elapsed for *_, elapsed in hr) + LOAD_SECONDS <= stage_seconds + 1  # whole seconds on the bar
    assert [d[1:3] for d in draws if "decode" in d[0]][-1] == (4, 4)  # 2 tiles x 2 latent frames


@pytest.mark.skipif(sys.platform == "win32", reason="pty")
def test_the_demo_in_a_terminal(tmp_path):
    stream = run_in_pty([sys.executable, "-m", "pixelwizard_core", "generate", "--demo", "--device", "cpu"],
                        tmp_path)
    check_terminal(stream, ["tiled VAE decode", "wrote outputs/videos/0.mp4", "[1/1] text "])
    assert (tmp_path / "outputs" / "videos" / "0.mp4").is_file()


def test_the_memory_of_a_stage_is_its_own_not_the_process_peak_so_far():
    from types import SimpleNamespace

    from pixelwizard_core.pipeline.runner import PixelWizard
    from pixelwizard_core.system import peak_rss_bytes

    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, freed before the stages: the process's peak so far
    block.add_(1)
    del block
    lifetime = peak_rss_bytes()
    pw = PixelWizard(SimpleNamespace(device=torch.device("cpu"), open=None))
    with pw._stage("small"):
        torch.ones(2**20).add_(1)  # 4 MiB
    with pw._stage("large"):
        data = torch.ones(96 * 2**20 // 4)  # 96 MiB
        data.add_(1)
        del data
    gib = 2**30
    assert pw.stats.peak_gib["small"] * gib < lifetime - 128 * 2**20  # not the cumulative peak
    assert pw.stats.added_gib["small"] * gib < 32 * 2**20
    assert pw.stats.added_gib["large"] * gib >= 90 * 2**20
    assert "small 0.0s (peak " in pw.stats.summary() and ", +0.1)" in pw.stats.summary()
