"""Writing decoded video: float frames -> uint8, streamed mp4 (H.264) and PNG sequences, all atomic.

Canonical frame layout is ``[F, H, W, 3]`` (channels last: what ffmpeg's rgb24 input, PNG and ComfyUI's
IMAGE use). :func:`frames_to_uint8` and the writers also take channels-first ``[F, 3, H, W]`` and the
VAE's own ``[1, 3, F, H, W]``; a 4-D tensor whose last dimension is 3 is read as channels last.

Both writers are atomic: a file appears under its final name only when it is complete. The mp4 goes to
a hidden temporary file in the same folder, renamed on a clean close; on any exception (KeyboardInterrupt
included) ffmpeg is killed and the temporary file deleted. Each PNG is written to a temporary name and
renamed. Neither overwrites an existing file unless ``overwrite=True``.

ffmpeg is the binary shipped inside the ``imageio-ffmpeg`` wheel; we run it ourselves (instead of
``imageio_ffmpeg.write_frames``) to check its exit status and report its messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Iterable, Mapping

import numpy as np
import torch

from ..errors import ConfigError, PixelWizardError
from ..files import publish, temporary_name
from .paths import check_folder, check_writable

log = logging.getLogger("pixelwizard")

DEFAULT_FPS = 24
# libx264 constant rate factor: 0 (best) .. 51 (worst). 10 is what the reference gets from imageio's
# quality=8 (imageio-ffmpeg maps quality q to crf int((1 - q/10) * 51)).
DEFAULT_CRF = 10
VIDEO_SUFFIXES = (".mp4",)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")


# --------------------------------------------------------------------------------------------------
# Frames


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Frames in [-1, 1] -> uint8 ``[F, H, W, 3]`` on the same device, ROUNDED to the nearest level.

    The reference truncates (``((x + 1) / 2 * 255).byte()``), which darkens every pixel by half a level
    on average; we round instead (round half to even), so a value maps to the closest of the 256 levels.
    Accepts float ``[F, H, W, 3]``, ``[F, 3, H, W]`` or ``[1, 3, F, H, W]`` (values outside [-1, 1] are
    clipped); uint8 input is only re-laid out. Raises ConfigError on NaN/inf or an unknown shape.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not torch.is_tensor(x):
        raise ConfigError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
    x = _channels_last(x)
    if x.dtype == torch.uint8:
        return x.contiguous()
    if not x.is_floating_point():
        raise ConfigError(f"frames must be floating point in [-1, 1] or uint8, got dtype {x.dtype}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(
            "decoded frames contain NaN or infinite values; the VAE overflowed (try decoding in float32 or "
            "bfloat16 instead of float16) or the latent is broken")
    return x.clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_().to(torch.uint8).contiguous()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    shape = tuple(x.shape)
    if x.dim() == 5 and shape[0] == 1 and shape[1] == 3:  # the VAE's [1, 3, F, H, W]
        return x[0].permute(1, 2, 3, 0)
    if x.dim() == 4 and shape[-1] == 3:
        return x
    if x.dim() == 4 and shape[1] == 3:
        return x.permute(0, 2, 3, 1)
    raise ConfigError(
        f"frames must be [F, H, W, 3], [F, 3, H, W] or [1, 3, F, H, W] (RGB), got shape {shape}; for a "
        "batch of several videos write each one separately")


def check_video_size(width: int, height: int) -> None:
    """yuv420p stores colour at half resolution, so H.264 in yuv420p needs even width and height."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ConfigError(
            f"an mp4 in yuv420p needs a positive even width and height, got {width}x{height}; crop or pad the "
            "frames by one pixel (Wan2.2 sizes are multiples of 16 and always fit)")


# --------------------------------------------------------------------------------------------------
# mp4


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped with imageio-ffmpeg."""
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise ConfigError(
            "writing video needs the imageio-ffmpeg package (it ships its own ffmpeg): pip install imageio-ffmpeg"
        ) from e
    return imageio_ffmpeg.get_ffmpeg_exe()


class VideoWriter:
    """Streams frames into an H.264 mp4 (libx264, yuv420p, BT.709 tagged), atomically.

    ::

        check_writable(path)                     # up front, before the heavy work
        with VideoWriter(path, fps=24) as out:
            for chunk in tiled_decode_stream(...):
                out.append(chunk)                # [1, 3, n, H, W] in [-1, 1], or any layout frames_to_uint8 takes

    Only one chunk is ever held; ffmpeg reads raw rgb24 from a pipe. ``crf`` is libx264's constant rate
    factor, 0 (lossless in YUV, a High 4:4:4 profile some players cannot decode) to 51 (worst); the default
    10 matches the reference's imageio ``quality=8``; 18 is usually visually lossless and much smaller.
    ``size`` = (width, height), when known, is checked at once instead of at the first frame. ``metadata``
    (JSON-able) is stored as JSON in the mp4's ``comment`` tag; :func:`read_video_metadata` reads it back.
    """

    def __init__(self, path: str | os.PathLike, *, fps: float = DEFAULT_FPS, crf: int = DEFAULT_CRF,
                 preset: str = "medium", overwrite: bool = False, size: tuple[int, int] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        self.path = check_writable(path, overwrite=overwrite)
        if self.path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ConfigError(f"video file name must end in .mp4, got {self.path.name!r}")
        if not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
            raise ConfigError(f"fps must be a positive number, got {fps!r}")
        if not (isinstance(crf, int) and 0 <= crf <= 51):
            raise ConfigError(f"crf must be an integer from 0 (best) to 51 (worst), got {crf!r}")
        if preset not in X264_PRESETS:
            raise ConfigError(f"preset must be one of libx264's {X264_PRESETS}, got {preset!r}")
        if size is not None:
            check_video_size(*size)
        self.fps, self.crf, self.preset, self.overwrite = fps, crf, preset, overwrite
        self.size = size
        self.comment = _metadata_json(metadata) if metadata else None
        self.frames_written = 0
        self._temporary = temporary_name(self.path)
        self._process: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None
        self._closed = False

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "VideoWriter":
        return self

    def __del__(self) -> None:
        # A writer dropped without close() must not leave ffmpeg running or a partial file behind.
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:
                pass

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing --------------------------------------------------------------------------------
    def append(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames (any layout :func:`frames_to_uint8` takes; float in [-1, 1] or uint8)."""
        if self._closed:
            raise ConfigError(f"VideoWriter for {str(self.path)!r} is already closed")
        data = frames_to_uint8(frames).cpu().numpy()
        height, width = data.shape[1:3]
        if self.size is None:
            check_video_size(width, height)
            self.size = (width, height)
        elif (width, height) != tuple(self.size):
            raise ConfigError(
                f"frame size changed from {self.size[0]}x{self.size[1]} to {width}x{height} in {str(self.path)!r}")
        if self._process is None:
            self._start()
        try:
            self._process.stdin.write(memoryview(data).cast("B"))
        except (BrokenPipeError, OSError) as e:
            message = self._ffmpeg_failure("ffmpeg stopped accepting frames")
            self.abort()
            raise PixelWizardError(message) from e
        self.frames_written += data.shape[0]

    def close(self) -> Path:
        """Finish the file and move it to its final name; returns that path."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise ConfigError(f"no frames were written to {str(self.path)!r}; an empty video is not kept")
        try:
            try:
                self._process.stdin.close()
            except OSError:
                pass  # ffmpeg is already gone; its exit status below says why
            code = self._process.wait()
            if code != 0:
                raise PixelWizardError(self._ffmpeg_failure(f"ffmpeg exited with status {code}"))
            publish(self._temporary, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._close_stderr()
        log.info("wrote %s (%d frames, %dx%d, %g fps, crf %d)", self.path, self.frames_written,
                 self.size[0], self.size[1], self.fps, self.crf)
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file; nothing is left under the final name."""
        self._closed = True
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.wait()
            try:
                self._process.stdin.close()
            except OSError:
                pass
        self._close_stderr()
        self._temporary.unlink(missing_ok=True)

    # -- ffmpeg ---------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        width, height = self.size
        # Explicit BT.709 conversion and tags: HD players assume BT.709 for untagged video, while ffmpeg's
        # default RGB->YUV matrix is BT.601, which shifts colours slightly.
        colour = "scale=out_color_matrix=bt709:out_range=tv,setparams=range=tv:color_primaries=bt709:" \
                 "color_trc=bt709:colorspace=bt709"
        return [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", _rate(self.fps), "-i", "-",
                "-an", "-vf", colour, "-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf),
                "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
                *(("-metadata", f"comment={self.comment}") if self.comment else ()),
                "-movflags", "+faststart", "-f", "mp4", str(self._temporary)]

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        # Own session: a Ctrl-C in the terminal reaches only us, and we decide to kill ffmpeg (abort).
        self._process = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr, start_new_session=os.name == "posix")

    def _ffmpeg_failure(self, what: str) -> str:
        if self._process is not None and self._process.poll() is None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        detail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            detail = self._stderr.read().decode(errors="replace").strip()[-2000:]
        return (f"{what} while writing {str(self.path)!r}; ffmpeg said: {detail or '(nothing)'}. "
                "Check free disk space and that the folder stays writable")

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def _metadata_json(metadata: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"video metadata cannot be stored as JSON ({e}); use str, int, float, bool, None, lists "
                          "and dicts") from e


def read_video_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata a :class:`VideoWriter` stored in ``path`` ({} when there is none or it is not JSON)."""
    result = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path),
                             "-f", "ffmetadata", "-"], capture_output=True, timeout=60)
    for line in result.stdout.decode(errors="replace").splitlines():
        if line.startswith("comment="):
            text = re.sub(r"\\(.)", r"\1", line[len("comment="):])  # ffmetadata escapes = ; # \ with a backslash
            try:
                value = json.loads(text)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def _rate(fps: float) -> str:
    from fractions import Fraction

    return str(Fraction(fps).limit_denominator(1001))


def write_video(path: str | os.PathLike, chunks: Iterable[torch.Tensor | np.ndarray], **options) -> Path:
    """Write every chunk of an iterable (e.g. a decode stream) to ``path``; options as :class:`VideoWriter`."""
    with VideoWriter(path, **options) as writer:
        for chunk in chunks:
            writer.append(chunk)
    return writer.path


def _decode_frames(source: Path, limit: int | None = None) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Up to ``limit`` frames of a video or image file as uint8 [H, W, 3] (rgb24, imageio-ffmpeg), and its size."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(source), pix_fmt="rgb24")
    try:
        width, height = next(reader)["size"]
        frames = []
        for raw in reader:
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
            if limit is not None and len(frames) >= limit:
                break
    finally:
        reader.close()
    return frames, (width, height)


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """Decode a video file to uint8 ``[F, H, W, 3]`` (RGB) with imageio-ffmpeg; for tests and metrics."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"video file {str(source)!r} does not exist")
    frames, (width, height) = _decode_frames(source)
    if not frames:
        return torch.empty(0, height, width, 3, dtype=torch.uint8)
    return torch.from_numpy(np.stack(frames))


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """A still image (PNG, JPEG, WebP, ...) as float ``[H, W, 3]`` in 0..1 (RGB; alpha dropped), decoded by
    the same ffmpeg as the videos, so no imaging library is needed. A video file gives its first frame."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise ConfigError(f"image file {str(source)!r} does not exist: give the path of a PNG or JPEG file")
    try:
        frames, _ = _decode_frames(source, limit=1)
    except (OSError, RuntimeError, StopIteration) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not read {source.name} as an image ({reason}): give a PNG, JPEG or WebP "
                          "file") from None
    if not frames:
        raise ConfigError(f"{source.name} holds no image: give a PNG, JPEG or WebP file")
    return torch.from_numpy(frames[0].astype(np.float32) / 255.0)


def probe_video(path: str | os.PathLike) -> dict:
    """ffmpeg's description of a video file: size (w, h), fps, codec, pix_fmt, duration, ..."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return dict(next(reader))
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------------
# PNG sequences


def encode_png(image: np.ndarray, compress_level: int = 4) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG bytes (8-bit truecolour, 'Up' filter, zlib), with no imaging library."""
    height, width, _ = image.shape
    rows = np.ascontiguousarray(image).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up: each row minus the row above (modulo 256); row 0 minus zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(filtered.tobytes(), compress_level)) + chunk(b"IEND", b""))


class PngSequenceWriter:
    """Writes frames as ``<folder>/<prefix><number>.png``, numbered from ``start`` with ``digits`` digits.

    Each file is written to a temporary name and renamed, so every PNG present is complete; on an
    exception the frames already finished stay (a usable prefix of the sequence) and nothing partial
    does. Existing files are not overwritten unless ``overwrite=True``.
    """

    def __init__(self, folder: str | os.PathLike, *, prefix: str = "frame_", digits: int = 5, start: int = 0,
                 overwrite: bool = False, compress_level: int = 4, make_dirs: bool = True) -> None:
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"PNG output folder {str(self.folder)!r} is a file")
        check_folder(self.folder, make_dirs)
        if os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise ConfigError(f"PNG prefix {prefix!r} must not contain a path separator")
        if not 0 <= compress_level <= 9:
            raise ConfigError(f"compress_level must be 0..9, got {compress_level}")
        self.prefix, self.digits, self.next_index = prefix, digits, start
        self.overwrite, self.compress_level = overwrite, compress_level
        self.written: list[Path] = []

    def __enter__(self) -> "PngSequenceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def frame_path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}{index:0{self.digits}d}.png"

    def append(self, frames: torch.Tensor | np.ndarray) -> None:
        data = frames_to_uint8(frames).cpu().numpy()
        for image in data:
            target = self.frame_path(self.next_index)
            if target.exists() and not self.overwrite:
                raise ConfigError(
                    f"PNG frame {str(target)!r} already exists; choose another folder or prefix, or pass "
                    "overwrite=True")
            temporary = temporary_name(target)
            try:
                temporary.write_bytes(encode_png(image, self.compress_level))
                publish(temporary, target, self.overwrite)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            self.written.append(target)
            self.next_index += 1

    def close(self) -> list[Path]:
        return self.written
