"""The pool's message transport in one process: the unpickler admits the classes the protocol sends and
nothing else under torch (torch.hub.load is refused), and stale pool folders whose owner is gone are
reclaimed (the folder is named after its process)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from multiprocessing import Pipe
from pathlib import Path

import pytest
import torch

from pixelwizard_core.distributed import transport
from pixelwizard_core.distributed.transport import receive, reclaim_stale_folders, send, shared_folder, shared_root
from pixelwizard_core.pipeline.anchors import Anchor
from pixelwizard_core.pipeline.handles import ModelHandle
from pixelwizard_core.pipeline.presets import StageSettings
from pixelwizard_core.pipeline.runner import DecodeSettings
from pixelwizard_core.pipeline.text import TextConditioning


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def _through(message: object, folder: Path, mode: str = "pipe") -> object:
    ours, theirs = Pipe()
    try:
        send(ours, message, folder, mode)
        return receive(theirs, mode)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("mode", ["pipe", "portable"])
def test_every_protocol_type_crosses(folder: Path, mode: str) -> None:
    text = TextConditioning(torch.randn(1, 4, 8), torch.randn(1, 4, 8), "a fox", "")
    anchor = Anchor(torch.randn(1, 48, 2, 16, 28), "a fox", "", 1, 448, 256, 5, 3, 5.0, 5.0)
    message = ("job", 3, "hr_latent", {
        "handle": ModelHandle("hr", "/models/model.pt"), "text": text, "anchor": anchor,
        "settings": StageSettings(256, 128, 5, 2, 5.5, 5.0), "decode": DecodeSettings(num_patches=2),
        "big": torch.arange(100_000, dtype=torch.float32), "dtype": torch.bfloat16, "size": torch.Size([2, 3]),
        "device": torch.device("cpu"), "path": Path("/tmp/x"), "set": {1, 2}, "none": None,
    })
    back = _through(message, folder, mode)
    kwargs = back[3]
    assert back[:3] == message[:3] and kwargs["handle"] == message[3]["handle"]
    assert torch.equal(kwargs["text"].positive, text.positive) and kwargs["anchor"].seed == 1
    assert torch.equal(kwargs["anchor"].latent, anchor.latent) and torch.equal(kwargs["big"], message[3]["big"])
    assert kwargs["settings"] == message[3]["settings"] and kwargs["decode"] == message[3]["decode"]
    assert kwargs["dtype"] is torch.bfloat16 and kwargs["size"] == torch.Size([2, 3]) and kwargs["set"] == {1, 2}
    assert kwargs["path"] == Path("/tmp/x") and kwargs["device"] == torch.device("cpu")
    assert not list(folder.iterdir())  # the tensor file was taken


@pytest.mark.parametrize("payload, name", [
    (torch.hub.load, "torch.hub.load"),
    (torch.load, "torch.serialization.load"),
    (torch.nn.Linear, "torch.nn.modules.linear.Linear"),
    (os.system, "system"),
    (eval, "builtins.eval"),
])
def test_anything_else_is_refused(payload: object, name: str) -> None:
    """The allow-list admitted every module under torch (torch.hub.load among them) before."""
    ours, theirs = Pipe()
    ours.send_bytes(pickle.dumps({"job": payload}))
    with pytest.raises(pickle.UnpicklingError, match=rf"may not reference .*{name}"):
        receive(theirs, "pipe")


def test_a_refused_reference_is_never_called(tmp_path: Path) -> None:
    """torch.hub loading a local folder imports its hubconf.py: code execution, admitted before."""
    marker = tmp_path / "ran"
    (tmp_path / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef model():\n    return 1\n")

    class Payload:
        def __reduce__(self):
            return torch.hub._load_local, (str(tmp_path), "model")

    with pytest.raises(pickle.UnpicklingError):
        transport._Unpickler(io.BytesIO(pickle.dumps(Payload())), False).load()
    assert not marker.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_folders_of_dead_owners_are_reclaimed() -> None:
    """/dev/shm (or the temporary folder without one) kept every folder of a pool killed with its workers."""
    root = shared_root()
    dead = root / f"pixelwizard-pool-{_dead_pid()}-1700000000000-test"
    reused = root / f"pixelwizard-pool-{os.getppid()}-1000-test"  # a live pid, but another process's start
    mine = shared_folder()  # this process: alive
    legacy = root / "pixelwizard-pool-abcd1234"  # from before owners were recorded: unknown, kept
    try:
        for made in (dead, reused, legacy):
            made.mkdir()
        (dead / "t1-0.bin").write_bytes(b"x" * 100)
        assert str(os.getpid()) in mine.name
        removed = reclaim_stale_folders()
        assert dead in removed and reused in removed
        assert not dead.exists() and not reused.exists() and mine.is_dir() and legacy.is_dir()
    finally:
        for made in (dead, reused, mine, legacy):
            if made.exists():
                for file in made.iterdir():
                    file.unlink()
                made.rmdir()


def test_pool_start_reclaims(monkeypatch) -> None:
    """Processes.spawn reclaims before it makes its own folder (it stops at the first step here)."""
    from pixelwizard_core.distributed import pool_processes

    calls = []
    monkeypatch.setattr(pool_processes, "reclaim_stale_folders", lambda: calls.append("reclaim"))

    def stop(*args):
        calls.append("folder")
        raise RuntimeError("stop here")

    monkeypatch.setattr(pool_processes, "shared_folder", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        pool_processes.Processes().spawn(None)
    assert calls == ["reclaim", "folder"]
