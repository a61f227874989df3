"""Messages between the pool's parent and its workers: pickled over a private connection, tensors by file.

A tensor bigger than ``INLINE_BYTES`` is written into a file in a private folder on a RAM file system
(``/dev/shm`` where there is one, else the temporary folder) and only its name, dtype and shape travel, so
a 10 GB decoded video crosses without being copied through the socket. With the default ``pipe``
transport the receiver maps the file and deletes its name at once (the mapping stays valid). Where a file
cannot be deleted while it is open or mapped (Windows), and whenever the ``portable`` transport is chosen,
nothing is mapped: the sender writes the file with ordinary writes, and the receiver reads it into memory,
closes it and only then deletes it (one more copy than mapping, and the file is on disk where there is no
RAM file system). Small tensors travel inline as raw bytes (never through torch's own pickling).

The transport (see :mod:`.pool_channel` for the control connection it also selects) is ``pipe`` on Linux
and macOS and ``portable`` on Windows; the environment variable ``PIXELWIZARD_POOL_TRANSPORT=portable``
forces the portable one anywhere (``pipe`` forces the POSIX one, ``auto`` or unset picks by platform).

Only our own processes are at the other end of the socket, but unpickling still resolves only the classes
the protocol sends (:data:`PROTOCOL_CLASSES`, torch dtypes, a few builtins): a message can carry tensors,
settings objects and plain data, never a reference to a function or to arbitrary code (``torch.hub.load``
is as refused as ``os.system``).

Each pool's folder is named after its owner (``pixelwizard-pool-<pid>-<start time>-*``), so a pool that
starts can remove the folders of pools whose process is gone (:func:`reclaim_stale_folders`): a parent
killed together with its workers cannot clean up after itself.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import os
import pathlib
import pickle
import re
import shutil
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import torch

from ..errors import ConfigError
from ..pipeline.anchors import Anchor
from ..pipeline.handles import ModelHandle
from ..pipeline.presets import StageSettings
from ..pipeline.engine import DecodeSettings
from ..pipeline.first_frame import FirstFrame
from ..pipeline.text import TextConditioning

log = logging.getLogger("pixelwizard")

INLINE_BYTES = 1 << 16
# Every class a job's arguments, results and reports contain (worker.py lists the messages); tensors travel
# by persistent id and need none. A job that sends a new class must add it here.
PROTOCOL_CLASSES: tuple[type, ...] = (
    ModelHandle, TextConditioning, StageSettings, Anchor, DecodeSettings, FirstFrame,
    torch.Size, torch.device, collections.OrderedDict, pathlib.PurePosixPath, pathlib.PureWindowsPath,
    pathlib.PosixPath, pathlib.WindowsPath,
)
_ALLOWED = frozenset((cls.__module__, cls.__qualname__) for cls in PROTOCOL_CLASSES)
_ALLOWED_BUILTINS = {"slice", "complex", "set", "frozenset", "range", "bytearray"}
_counter = itertools.count()
TRANSPORT_ENV = "PIXELWIZARD_POOL_TRANSPORT"
TRANSPORTS = ("auto", "pipe", "portable")
FOLDER_PREFIX = "pixelwizard-pool-"
PID_REUSE_MARGIN_MS = 30_000
_OWNED = re.compile(re.escape(FOLDER_PREFIX) + r"(\d+)-(\d+)-")  # <pid>-<process start, ms since the epoch>-


def transport_mode() -> str:
    """"pipe" (inherited socket pair, mapped tensor files: Linux, macOS) or "portable" (loopback socket,
    tensor files read then deleted: Windows, or forced by ``PIXELWIZARD_POOL_TRANSPORT``)."""
    wanted = os.environ.get(TRANSPORT_ENV, "").strip().lower() or "auto"
    if wanted not in TRANSPORTS:
        raise ConfigError(f"{TRANSPORT_ENV}={wanted!r}: use one of {', '.join(TRANSPORTS)}")
    if wanted == "auto":
        return "portable" if sys.platform == "win32" else "pipe"
    if wanted == "pipe" and sys.platform == "win32":
        raise ConfigError(f"{TRANSPORT_ENV}=pipe needs inherited file descriptors, which Windows lacks; "
                          "unset it or use 'portable'")
    return wanted


def shared_root() -> Path:
    """Where pool folders go: ``/dev/shm`` (a RAM file system) when the machine has one, else the
    temporary folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def shared_folder() -> Path:
    """A new private folder (mode 700) in :func:`shared_root`, named after this process (see
    :func:`reclaim_stale_folders`)."""
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{pid}-{_started_ms(pid)}-", dir=shared_root()))


def reclaim_stale_folders(root: Path | None = None) -> list[Path]:
    """Remove the pool folders in ``root`` (default :func:`shared_root`) whose owner process is gone: what
    is left when a parent and its workers were killed together. Folders of live pools, of other users and
    with names from before owners were recorded are kept. Returns the folders removed."""
    removed = []
    for folder in (root or shared_root()).glob(FOLDER_PREFIX + "*"):
        owner = _OWNED.match(folder.name)
        if owner is None or not folder.is_dir() or not _ours(folder):
            continue
        if _alive(int(owner.group(1)), int(owner.group(2))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    if removed:
        log.info("removed %d stale worker-pool folder(s) whose process is gone: %s", len(removed),
                 ", ".join(str(f) for f in removed))
    return removed


def _started_ms(pid: int) -> int:
    """When process ``pid`` started, in ms since the epoch (0 if it cannot be read): with the pid it
    names a process even after its pid is reused."""
    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except (psutil.Error, OSError):
        return 0


def _alive(pid: int, started_ms: int) -> bool:
    """Whether the process that made a folder still runs (unsure counts as running)."""
    try:
        now = int(psutil.Process(pid).create_time() * 1000)
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True
    # A process started well after the folder's owner has only reused its pid. The margin absorbs the
    # start time's rounding and clock adjustments (psutil derives it from the boot time).
    return started_ms == 0 or now - started_ms <= PID_REUSE_MARGIN_MS


def _ours(folder: Path) -> bool:
    getuid = getattr(os, "getuid", None)  # Windows: the temporary folder is per user already
    return getuid is None or folder.stat().st_uid == getuid()


def _maps_files(mode: str | None) -> bool:
    return (mode or transport_mode()) == "pipe"


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, folder: Path, map_files: bool) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.folder, self.map_files = folder, map_files

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
        if self.map_files:
            torch.from_file(str(path), shared=True, size=flat.numel(), dtype=flat.dtype).copy_(flat)
        else:  # plain writes: no mapping whose lifetime could keep the file from being deleted
            with open(path, "wb") as file:
                file.write(_bytes_of(flat))
        return ("file", str(path), dtype, shape)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, map_files: bool) -> None:
        super().__init__(file)
        self.map_files = map_files

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
            if self.map_files:
                tensor = torch.from_file(data, shared=True, size=numel, dtype=dtype)
            else:
                tensor = _read_file(data, numel, dtype)
        finally:
            os.unlink(data)  # mapped: the mapping stays valid and the memory goes with the tensor
        return tensor.view(shape)

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED or (module == "builtins" and name in _ALLOWED_BUILTINS) or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a pool message may not reference {module}.{name} (only the classes in "
                                     "transport.PROTOCOL_CLASSES, torch dtypes and plain data)")


def _bytes_of(flat: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous 1-D tensor, without a copy."""
    return memoryview(flat.view(torch.uint8).numpy())


def _read_file(path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in file ``path``, read into memory (the file is closed when this returns)."""
    tensor = torch.empty(numel, dtype=dtype)
    target, done = _bytes_of(tensor), 0
    with open(path, "rb", buffering=0) as file:
        while done < len(target):
            count = file.readinto(target[done:])
            if not count:
                raise pickle.UnpicklingError(f"tensor file {path} ended after {done} of {len(target)} bytes")
            done += count
    return tensor


def send(conn: Connection, message: object, folder: Path, mode: str | None = None) -> None:
    """Send ``message``, its large tensors as files in ``folder``; ``mode`` is the transport (None: this
    process's, :func:`transport_mode`)."""
    buffer = io.BytesIO()
    _Pickler(buffer, folder, _maps_files(mode)).dump(message)
    conn.send_bytes(buffer.getbuffer())


def receive(conn: Connection, mode: str | None = None) -> object:
    """The next message (raises EOFError when the other end is gone); ``mode`` as for :func:`send`."""
    return _Unpickler(io.BytesIO(conn.recv_bytes()), _maps_files(mode)).load()


def discard_files(folder: Path) -> None:
    """Remove tensor files that were sent but never received (a dead receiver); one still open elsewhere
    (Windows refuses to delete it) is left for the caller's removal of the folder."""
    for path in folder.glob("t*.bin"):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
