"""``convert``: the destination is written under a temporary name and published whole, an existing one is
only replaced with --overwrite, and a refusal is one message with exit code 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.loading import convert
from pixelwizard_core.loading.convert import convert_pickle_to_safetensors, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save({"generator": {"w": torch.arange(6.0)}}, path)
    return path


def test_without_trust_code_one_message_and_exit_2(src: Path, tmp_path: Path) -> None:
    """It ended in a raw ConfigError traceback."""
    run = subprocess.run([sys.executable, "-m", "pixelwizard_core.loading.convert", str(src),
                          str(tmp_path / "out.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: converting a pickle runs whatever code") and \
        "--trust-code" in lines[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_destination_is_kept_unless_overwrite(src: Path, tmp_path: Path, caplog) -> None:
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    assert main([str(src), str(dst), "--trust-code"]) == 2
    assert dst.read_bytes() == b"keep me"
    assert "already exists: choose another name, delete it, or pass --overwrite" in caplog.text
    assert main([str(src), str(dst), "--trust-code", "--overwrite"]) == 0
    assert torch.equal(load_file(dst)["w"], torch.arange(6.0))


def test_destination_is_published_whole_or_not_at_all(src: Path, tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    dst = tmp_path / "out.safetensors"
    written: list[str] = []
    real = safetensors.torch.save_file

    def watch(tensors, path, *args, **kwargs):
        written.append(path)
        assert not dst.exists()
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", watch)
    assert convert_pickle_to_safetensors(src, dst, trust_code=True) == 1
    assert written and Path(written[0]) != dst and Path(written[0]).parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out.safetensors"]

    def disk_full(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    other = tmp_path / "other.safetensors"
    with pytest.raises(ConfigError, match="could not write .*other.safetensors: No space left on device"):
        convert_pickle_to_safetensors(src, other, trust_code=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out.safetensors"]  # no partial file


def test_destination_that_appears_meanwhile_is_not_replaced(src: Path, tmp_path: Path, monkeypatch) -> None:
    dst = tmp_path / "out.safetensors"
    real = convert._check_paths

    def then_someone_writes(*args):
        real(*args)
        dst.write_bytes(b"theirs")

    monkeypatch.setattr(convert, "_check_paths", then_someone_writes)
    with pytest.raises(ConfigError, match="created by something else during the conversion; nothing was replaced"):
        convert_pickle_to_safetensors(src, dst, trust_code=True)
    assert dst.read_bytes() == b"theirs" and len(list(tmp_path.iterdir())) == 2
