"""Messages between the pool's parent and its workers: pickled over a private socket pair, tensors by file.

A tensor bigger than ``INLINE_BYTES`` is written into a file in a private folder on a RAM file system
(``/dev/shm`` where there is one) and only its name, dtype and shape travel; the receiver maps the file
and deletes its name at once, so a 10 GB decoded video crosses without being copied through the
socket. Small tensors travel inline as raw bytes (never through torch's own pickling).

Only our own processes are at the other end of the socket, but unpickling still only resolves classes
from torch, pixelwizard_core, pathlib and collections: a message can carry tensors, settings objects and
plain data, never a reference to arbitrary code.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

import torch

INLINE_BYTES = 1 << 16
_ALLOWED_MODULES = ("torch", "pixelwizard_core", "pathlib", "collections")
_ALLOWED_BUILTINS = {"slice", "complex", "set", "frozenset", "range", "bytearray"}
_counter = itertools.count()


def shared_folder(prefix: str = "pixelwizard-pool-") -> Path:
    """A new private folder (mode 700) on a RAM file system when the machine has one."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, folder: Path) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.folder = folder

    def persistent_id(self, obj: object) -> tuple | None:
        if not isinstance(obj, torch.Tensor):
            return None
        tensor = obj.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        dtype, shape = str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
        flat = tensor.contiguous().reshape(-1)
        if flat.numel() * flat.element_size() <= INLINE_BYTES:
            return ("inline", flat.view(torch.uint8).numpy().tobytes(), dtype, shape)
        path = self.folder / f"t{os.getpid()}-{next(_counter)}.bin"
        torch.from_file(str(path), shared=True, size=flat.numel(), dtype=flat.dtype).copy_(flat)
        return ("file", str(path), dtype, shape)


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: tuple) -> torch.Tensor:
        kind, data, dtype_name, shape = pid
        dtype = getattr(torch, dtype_name)
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"{dtype_name!r} is not a torch dtype")
        if kind == "inline":
            if not data:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).view(shape)
        if kind != "file":
            raise pickle.UnpicklingError(f"unknown persistent object {kind!r}")
        numel = 1
        for size in shape:
            numel *= size
        try:
            tensor = torch.from_file(data, shared=True, size=numel, dtype=dtype)
        finally:
            os.unlink(data)  # the mapping stays valid; the memory goes when the tensor does
        return tensor.view(shape)

    def find_class(self, module: str, name: str) -> object:
        if module.split(".")[0] in _ALLOWED_MODULES or (module == "builtins" and name in _ALLOWED_BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a pool message may not reference {module}.{name}")


def send(conn: Connection, message: object, folder: Path) -> None:
    buffer = io.BytesIO()
    _Pickler(buffer, folder).dump(message)
    conn.send_bytes(buffer.getbuffer())


def receive(conn: Connection) -> object:
    """The next message (raises EOFError when the other end is gone)."""
    return _Unpickler(io.BytesIO(conn.recv_bytes())).load()


def discard_files(folder: Path) -> None:
    """Remove tensor files that were sent but never received (a dead receiver)."""
    for path in folder.glob("t*.bin"):
        path.unlink(missing_ok=True)
