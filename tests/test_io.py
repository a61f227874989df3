"""io: uint8 conversion, atomic mp4 and PNG writers, checksummed tensor files."""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pixelwizard_core.errors import ConfigError, MissingFileError, WeightFormatError
from pixelwizard_core.io import (
    PngSequenceWriter,
    VideoWriter,
    check_writable,
    frames_to_uint8,
    load_tensor_file,
    probe_video,
    read_video,
    save_tensor_file,
    write_video,
)

H, W = 64, 96


def smooth_frames(count: int, seed: int = 0) -> torch.Tensor:
    """Float frames [F, H, W, 3] in [-1, 1]: colour gradients with a moving square (compress well)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, H)[:, None, None]
    x = torch.linspace(-1, 1, W)[None, :, None]
    tint = torch.rand(3, generator=g) * 2 - 1
    frames = []
    for f in range(count):
        image = (0.6 * x * tint + 0.3 * y * tint.flip(0)).expand(H, W, 3).clone()
        image[10:30, 8 + 6 * f:28 + 6 * f] = torch.tensor([0.9, -0.7, 0.2])
        frames.append(image)
    return torch.stack(frames).clamp(-1, 1)


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------------
# frames_to_uint8


def test_uint8_rounds_instead_of_truncating():
    levels = torch.tensor([0.0, 100.4, 100.6, 254.5001, 255.0, 127.49, -3.0, 300.0])
    x = (levels / 255 * 2 - 1).view(1, 1, -1, 1).expand(1, 1, 8, 3)  # [F=1, H=1, W=8, 3]
    out = frames_to_uint8(x)
    assert out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 100, 101, 255, 255, 127, 0, 255]
    truncated = ((x + 1) / 2 * 255).clamp(0, 255).byte()  # the reference's conversion, for contrast
    assert truncated[0, 0, 2, 0].item() == 100


def test_uint8_layouts_agree():
    frames = smooth_frames(3)
    expected = frames_to_uint8(frames)
    assert expected.shape == (3, H, W, 3)
    assert torch.equal(frames_to_uint8(frames.permute(0, 3, 1, 2)), expected)  # [F, 3, H, W]
    assert torch.equal(frames_to_uint8(frames.permute(3, 0, 1, 2)[None]), expected)  # VAE [1, 3, F, H, W]
    assert torch.equal(frames_to_uint8(expected.numpy()), expected)  # uint8 passes through


def test_uint8_refuses_nan_and_bad_shapes():
    bad = smooth_frames(1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        frames_to_uint8(bad)
    with pytest.raises(ConfigError, match="shape"):
        frames_to_uint8(torch.zeros(2, 4, 5, 6))


# --------------------------------------------------------------------------------------------------
# mp4


def test_mp4_round_trip_in_chunks(tmp_path):
    frames = smooth_frames(9)
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, fps=24, crf=10) as writer:
        writer.append(frames[:1])  # first latent frame gives 1 frame, then chunks of 4
        writer.append(frames[1:5].permute(0, 3, 1, 2))
        writer.append(frames[5:].permute(3, 0, 1, 2)[None])
    assert files_in(tmp_path) == ["clip.mp4"]
    back = read_video(path)
    assert back.shape == (9, H, W, 3) and back.dtype == torch.uint8
    diff = (back.int() - frames_to_uint8(frames).int()).abs().float()
    assert diff.mean() < 2.0, diff.mean()  # lossy H.264 + 4:2:0 chroma, but close
    info = probe_video(path)
    assert info["codec"] == "h264" and info["pix_fmt"].startswith("yuv420p") and "bt709" in info["pix_fmt"]
    assert info["fps"] == 24 and tuple(info["size"]) == (W, H)


def test_write_video_from_iterable(tmp_path):
    chunks = [smooth_frames(1), smooth_frames(4, seed=1)]
    path = write_video(tmp_path / "it.mp4", iter(chunks), fps=12, crf=30)
    assert read_video(path).shape[0] == 5
    assert probe_video(path)["fps"] == 12


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_mp4_writer_is_atomic(tmp_path, interrupt):
    path = tmp_path / "out.mp4"
    with pytest.raises(type(interrupt)):
        with VideoWriter(path) as writer:
            writer.append(smooth_frames(5))
            raise interrupt
    assert files_in(tmp_path) == []  # neither the final name nor the temporary file


def test_mp4_refuses_to_overwrite(tmp_path):
    path = tmp_path / "taken.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="already exists"):
        VideoWriter(path)
    with pytest.raises(ConfigError, match="already exists"):
        check_writable(path)
    assert path.read_bytes() == b"precious"
    with VideoWriter(path, overwrite=True) as writer:
        writer.append(smooth_frames(2))
    assert read_video(path).shape[0] == 2
    assert files_in(tmp_path) == ["taken.mp4"]


def test_mp4_bad_sizes_and_options(tmp_path):
    path = tmp_path / "odd.mp4"
    with pytest.raises(ConfigError, match="even"):
        VideoWriter(path, size=(95, 64))
    writer = VideoWriter(path)
    with pytest.raises(ConfigError, match="even"):
        writer.append(torch.zeros(1, 63, 96, 3))
    writer.abort()
    with pytest.raises(ConfigError, match="crf"):
        VideoWriter(path, crf=60)
    with pytest.raises(ConfigError, match="preset"):
        VideoWriter(path, preset="quick")
    with pytest.raises(ConfigError, match=".mp4"):
        VideoWriter(tmp_path / "x.avi")
    with pytest.raises(ConfigError, match="no frames"):
        with VideoWriter(path):
            pass
    with VideoWriter(path) as writer:
        writer.append(smooth_frames(1))
        with pytest.raises(ConfigError, match="size changed"):
            writer.append(torch.zeros(1, 32, 32, 3))
    assert files_in(tmp_path) == ["odd.mp4"]


def test_ffmpeg_failure_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    from pixelwizard_core.io import video

    broken = video.VideoWriter._command
    monkeypatch.setattr(video.VideoWriter, "_command", lambda self: broken(self)[:-1] + ["-no-such-option", "x"])
    with pytest.raises(video.PixelWizardError, match="ffmpeg"):
        with VideoWriter(tmp_path / "v.mp4") as writer:
            for _ in range(50):  # enough data to fill the pipe if ffmpeg stopped reading
                writer.append(smooth_frames(4))
    assert files_in(tmp_path) == []


def test_dropped_writer_leaves_nothing(tmp_path):
    writer = VideoWriter(tmp_path / "v.mp4")
    writer.append(smooth_frames(2))
    for _ in range(500):  # ffmpeg creates its output file shortly after starting
        if files_in(tmp_path):
            break
        time.sleep(0.01)
    assert len(files_in(tmp_path)) == 1 and files_in(tmp_path)[0].startswith(".v.mp4.")  # the temporary file
    del writer
    assert files_in(tmp_path) == []


def test_unwritable_output_folder_is_reported_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        check_writable(blocker / "video.mp4")
    with pytest.raises(ConfigError, match="not a folder"):
        VideoWriter(blocker / "video.mp4")
    with pytest.raises(ConfigError, match="does not exist"):
        check_writable(tmp_path / "missing" / "video.mp4")
    assert check_writable(tmp_path / "made" / "video.mp4", make_dirs=True).parent.is_dir()
    with pytest.raises(ConfigError, match="is a folder"):
        check_writable(tmp_path)


def test_read_only_folder_is_reported(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    elif os.path.isdir("/sys/kernel"):
        folder = "/sys"  # root can write anywhere except in kernel file systems
    else:
        pytest.skip("no folder that this user cannot write into")
    try:
        with pytest.raises(ConfigError, match="cannot write"):
            check_writable(os.path.join(folder, "video.mp4"))
    finally:
        if folder != "/sys":
            folder.chmod(0o700)


# --------------------------------------------------------------------------------------------------
# PNG sequences


def test_png_sequence_is_lossless_and_atomic(tmp_path):
    import imageio_ffmpeg

    frames = smooth_frames(3)
    frames[1] = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1  # noise: every level
    folder = tmp_path / "pngs"
    with PngSequenceWriter(folder, prefix="f_", digits=3) as writer:
        writer.append(frames[:1])
        writer.append(frames[1:].permute(0, 3, 1, 2))
    assert files_in(folder) == ["f_000.png", "f_001.png", "f_002.png"]
    expected = frames_to_uint8(frames)
    for i in range(3):  # decoded by ffmpeg, an independent PNG reader
        reader = imageio_ffmpeg.read_frames(str(folder / f"f_{i:03d}.png"))
        meta = next(reader)
        image = np.frombuffer(next(reader), dtype=np.uint8).reshape(H, W, 3)
        reader.close()
        assert tuple(meta["size"]) == (W, H)
        assert np.array_equal(image, expected[i].numpy())
    with pytest.raises(ConfigError, match="already exists"):
        PngSequenceWriter(folder, prefix="f_", digits=3).append(frames[:1])
    assert files_in(folder) == ["f_000.png", "f_001.png", "f_002.png"]  # no temporary left behind


# --------------------------------------------------------------------------------------------------
# Tensor files


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "latent": torch.randn(48, 2, 4, 6, generator=g),
        "half": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],
    }


META = {"prompt": "a red fox ☃ in snow", "seed": 1234, "size": [2560, 1440], "cfg": 5.0, "extra": None,
        "nested": {"steps": 4, "shift": 5.0}, "ok": True}


def test_tensor_file_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "anchor.safetensors"
    tensors = sample_tensors()
    assert save_tensor_file(path, tensors, META, kind="anchor") == path
    loaded, metadata = load_tensor_file(path, kind="anchor")
    assert metadata == META
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert files_in(tmp_path) == ["anchor.safetensors"]
    with pytest.raises(WeightFormatError, match="'hr_latent' was expected"):
        load_tensor_file(path, kind="hr_latent")


def data_offset(path) -> int:
    header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return 8 + header_length


def test_tampered_tensor_byte_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensor_file(path, sample_tensors(), META)
    data = bytearray(path.read_bytes())
    start = data_offset(path)
    data[start + (len(data) - start) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFormatError, match="damaged"):
        load_tensor_file(path)


def test_edited_metadata_is_refused(tmp_path):
    """Changing a seed in the header (same length, so the file stays valid safetensors) is caught."""
    path = tmp_path / "t.safetensors"
    save_tensor_file(path, sample_tensors(), META)
    data = path.read_bytes()
    assert data.count(b"1234") == 1
    path.write_bytes(data.replace(b"1234", b"4321"))
    with pytest.raises(WeightFormatError, match="tensors or metadata do not match"):
        load_tensor_file(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensor_file(path, sample_tensors(), META)
    data = path.read_bytes()
    for cut in (len(data) - 3, data_offset(path) - 5, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightFormatError, match="truncated"):
            load_tensor_file(path)


def test_tensor_file_errors(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(MissingFileError):
        load_tensor_file(path)
    with pytest.raises(ConfigError, match="JSON"):
        save_tensor_file(path, sample_tensors(), {"bad": object()})
    with pytest.raises(ConfigError, match="JSON"):
        save_tensor_file(path, sample_tensors(), {"nan": float("nan")})
    with pytest.raises(ConfigError, match="reserved"):
        save_tensor_file(path, sample_tensors(), {"pixelwizard.sha256": "x"})
    with pytest.raises(ConfigError, match="torch.Tensor"):
        save_tensor_file(path, {"x": np.zeros(3)}, {})
    assert files_in(tmp_path) == []
    save_tensor_file(path, sample_tensors(), META)
    with pytest.raises(ConfigError, match="already exists"):
        save_tensor_file(path, {"x": torch.zeros(1)}, {})
    save_tensor_file(path, {"x": torch.zeros(1)}, {"v": 2}, overwrite=True)
    assert load_tensor_file(path)[1] == {"v": 2}

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(WeightFormatError, match="not one written by PixelWizard"):
        load_tensor_file(foreign)

    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(2)}, str(newer), metadata={"pixelwizard.format": "pixelwizard-tensors",
                                                          "pixelwizard.version": "99"})
    with pytest.raises(WeightFormatError, match="Update PixelWizard"):
        load_tensor_file(newer)


def test_metadata_is_readable_in_the_plain_safetensors_header(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "t.safetensors"
    save_tensor_file(path, sample_tensors(), META, kind="anchor")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["prompt"]) == META["prompt"]
    assert header["pixelwizard.kind"] == "anchor" and len(header["pixelwizard.sha256"]) == 64
