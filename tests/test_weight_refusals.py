"""Unreadable weight files: the precise diagnosis reaches the user (model handles, loaders, doctor), and
files that used to end in a traceback (a torch pickle named .safetensors, a damaged safetensors header)
are refused with a message that names the file and what to do."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pixelwizard_core.errors import ConfigError, WeightFormatError
from pixelwizard_core.loading import inspect_weights, load_vae
from pixelwizard_core.models.vae import VAEConfig, WanVAE
from pixelwizard_core.pipeline.handles import ModelHandle


@pytest.fixture(scope="module")
def vae_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in WanVAE(VAEConfig.tiny()).state_dict().items()}


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _truncated(folder: Path, state: dict) -> Path:
    path = folder / "vae.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    return path


def _code_pickle(folder: Path, state: dict) -> Path:
    path = folder / "vae.pt"
    torch.save({**state, "payload": _RunsCode(folder / "ran")}, path)
    return path


@pytest.mark.parametrize("make, expected", [
    (_truncated, r"vae.safetensors is truncated: .*Download it again"),
    (_code_pickle, r"tried to run code while loading \(it references .*system\).*--trust-code"),
])
def test_handle_keeps_the_readers_diagnosis(tmp_path: Path, vae_state, make, expected) -> None:
    """It said "is 'not a recognised weight file', but the vae stage needs 'vae'" for every such file."""
    path = make(tmp_path, vae_state)
    with pytest.raises(ConfigError, match=expected) as caught:
        ModelHandle.for_file("vae", path)
    assert "not a recognised weight file" not in str(caught.value)
    assert str(caught.value).startswith("the vae model file cannot be used: ")
    assert not (tmp_path / "ran").exists()


def test_empty_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"vae model file cannot be used: .*vae.safetensors is not a weight file "
                                          r"PixelWizard can read"):
        ModelHandle.for_file("vae", path)


def test_torch_pickle_named_safetensors_is_refused_with_what_to_do(tmp_path: Path, vae_state) -> None:
    """torch.load picks safetensors by the name: a SafetensorError traceback from every loader before."""
    path = tmp_path / "wan2.2_vae.safetensors"
    torch.save(vae_state, path)
    rename = r"torch pickle checkpoint, not a safetensors file.*Rename it to wan2\.2_vae\.pt"
    with pytest.raises(WeightFormatError, match=rename):
        load_vae(path)
    with pytest.raises(ConfigError, match=rename):
        ModelHandle.for_file("vae", path)
    assert "Rename it" in inspect_weights(path, component="vae").summary()  # doctor --models
    renamed = path.rename(path.with_suffix(".pt"))
    assert isinstance(load_vae(renamed), WanVAE)  # the advice works


def _with_header(path: Path, header: object, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, what", [
    ({"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, "has no 'dtype'"),
    ({"w": {"dtype": "F32", "data_offsets": [0, 16]}}, "has no valid 'shape'"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16]}}, "has no valid 'data_offsets'"),
    ({"w": "F32"}, "is not an object"),
])
def test_damaged_safetensors_header_is_a_message(tmp_path: Path, header, what) -> None:
    """A header entry without 'dtype' raised KeyError: 'dtype' before."""
    path = _with_header(tmp_path / "vae.safetensors", header)
    with pytest.raises(WeightFormatError, match=rf"vae.safetensors: the safetensors header entry 'w' {what}.*"
                                                r"download or export it again"):
        load_vae(path)
    with pytest.raises(ConfigError, match=what):
        ModelHandle.for_file("vae", path)


def test_header_that_the_library_rejects_is_a_message(tmp_path: Path, vae_state) -> None:
    """Offsets our reader accepts but safetensors refuses (overlapping tensors) end as our error, not a
    SafetensorError."""
    path = tmp_path / "vae.safetensors"
    save_file(vae_state, str(path))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [0, header[first]["data_offsets"][1] + 4]  # overlaps the next tensor
    raw = json.dumps(header).encode().ljust(n)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    expected = r"vae.safetensors could not be opened as a safetensors file .*download or export it again"
    with pytest.raises(WeightFormatError, match=expected):
        load_vae(path)
