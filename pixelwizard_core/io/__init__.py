"""Files in and out: streamed atomic video/PNG writing, checksummed tensor files (safetensors)."""

from .latents import load_tensor_file, save_tensor_file, tensors_sha256
from .paths import check_writable
from .video import (
    DEFAULT_CRF,
    DEFAULT_FPS,
    PngSequenceWriter,
    VideoWriter,
    check_video_size,
    encode_png,
    frames_to_uint8,
    probe_video,
    read_image,
    read_video,
    write_video,
)

__all__ = [
    "DEFAULT_CRF",
    "DEFAULT_FPS",
    "PngSequenceWriter",
    "VideoWriter",
    "check_video_size",
    "check_writable",
    "encode_png",
    "frames_to_uint8",
    "load_tensor_file",
    "probe_video",
    "read_image",
    "read_video",
    "save_tensor_file",
    "tensors_sha256",
    "write_video",
]
