"""How the pool's parent and its workers find each other, per platform: the control connection, the
rendezvous store of the process group, and the process group's backend.

The transport (:func:`.transport.transport_mode`, ``PIXELWIZARD_POOL_TRANSPORT``) picks both halves:

* ``pipe``, the default on Linux and macOS: each worker inherits its end of a private socket pair as a
  file descriptor (``pass_fds``, given in argv). The rendezvous is a TCPStore served by the parent on a
  socket it bound to 127.0.0.1 before the store takes it (``master_listen_fd``), so there is no race and
  nothing listens on another address.
* ``portable``, the default on Windows (which has neither inherited descriptors nor ``master_listen_fd``),
  or forced anywhere: the parent listens on 127.0.0.1 at a port the system picks, with a random key made
  for this start. Each worker gets the address and its rank in argv and the key in its environment (never
  argv, which other users can read), connects back, and both sides prove they hold the key (the HMAC
  challenge of :mod:`multiprocessing.connection`) before anything is unpickled. The listener closes once
  every worker is in. The rendezvous is a FileStore in the pool's private folder: nothing listens for it.

Both give the parent one :class:`~multiprocessing.connection.Connection` per worker, so everything above
(:mod:`.pool_rpc`, :mod:`.worker`) is the same for both.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import secrets
import socket
import subprocess
import threading
from datetime import timedelta
from multiprocessing import AuthenticationError, Pipe
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .session import BACKENDS

log = logging.getLogger("pixelwizard")

KEY_ENV = "PIXELWIZARD_POOL_KEY"
HELLO_TIMEOUT_S = 30.0  # a connected worker sends its rank at once; this only bounds a stuck one


# --- backend ---------------------------------------------------------------------------------------

def nccl_usable() -> bool:
    """NCCL needs a torch build that has it (Linux CUDA builds; not Windows or macOS) and a visible GPU."""
    return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()


def resolve_pool_backend(backend: str) -> str:
    """"auto" -> NCCL where it is usable, else gloo; an explicit "nccl" that cannot work is refused."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed, which the worker pool needs")
    if backend == "auto":
        return "nccl" if nccl_usable() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend 'nccl' needs CUDA GPUs, and none is visible; use 'gloo' for CPU processes")
    if backend == "nccl" and not nccl_usable():
        raise ConfigError("backend 'nccl': this torch build has no NCCL (Windows and macOS builds never do); "
                          "use 'gloo' or 'auto'")
    return backend


# --- rendezvous ------------------------------------------------------------------------------------

def serve_rendezvous(mode: str, folder: Path, world_size: int, timeout_s: float) -> tuple[object | None, dict]:
    """The store the parent must keep alive (None for a FileStore) and what a worker needs to join it."""
    if mode == "portable":
        return None, {"file": str(folder / "rendezvous")}
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(world_size)
        port = listener.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=True,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                              master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the listening socket now and closes it when it goes
    return store, {"port": port}


def join_rendezvous(rendezvous: dict, world_size: int, timeout_s: float) -> dist.Store:
    """A worker's side of :func:`serve_rendezvous`."""
    timeout = timedelta(seconds=timeout_s)
    if "file" in rendezvous:
        store = dist.FileStore(rendezvous["file"], world_size)
        store.set_timeout(timeout)
        return store
    return dist.TCPStore("127.0.0.1", rendezvous["port"], world_size, is_master=False, timeout=timeout)


# --- control connection: the parent's side -----------------------------------------------------------

class Launcher(Protocol):
    """Starts worker processes and hands over each one's connection once it is there."""

    def start(self, rank: int, command: list[str], env: dict[str, str]) -> subprocess.Popen: ...

    def accept(self, timeout: float) -> tuple[int, Connection] | None: ...

    def close(self) -> None: ...


def open_launcher(mode: str) -> Launcher:
    return PortableLauncher() if mode == "portable" else PipeLauncher()


class PipeLauncher:
    """POSIX: a socket pair per worker; the child's end is inherited, so it is connected from the start."""

    def __init__(self) -> None:
        self._ready: list[tuple[int, Connection]] = []

    def start(self, rank: int, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        parent_end, child_end = Pipe()
        try:
            process = subprocess.Popen([*command, str(child_end.fileno())], pass_fds=(child_end.fileno(),),
                                       env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()  # the child has its copy; ours would hide the child's exit from the parent
        self._ready.append((rank, parent_end))
        return process

    def accept(self, timeout: float) -> tuple[int, Connection] | None:
        return self._ready.pop(0) if self._ready else None

    def close(self) -> None:
        for _, conn in self._ready:
            conn.close()
        self._ready.clear()


class PortableLauncher:
    """A loopback listener that authenticates every connection with a key made for this start.

    ``Listener.accept`` blocks, so a thread accepts while the caller watches for deaths and its deadline
    (:meth:`accept` waits at most ``timeout``)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._key)
        self.address: tuple[str, int] = self._listener.address
        self._accepted: queue.Queue[tuple[int, Connection]] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept_all, name="pixelwizard-pool-accept", daemon=True)
        self._thread.start()

    def start(self, rank: int, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        host, port = self.address
        return subprocess.Popen([*command, "--connect", f"{host}:{port}", "--rank", str(rank)],
                                env={**env, KEY_ENV: self._key.hex()}, stdin=subprocess.DEVNULL)

    def accept(self, timeout: float) -> tuple[int, Connection] | None:
        try:
            return self._accepted.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop listening; connections accepted but never claimed are closed."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(OSError):  # wake the blocked accept(); a plain connect cannot hang
            socket.create_connection(self.address, timeout=1.0).close()
        self._thread.join(5.0)
        self._listener.close()
        while True:
            try:
                self._accepted.get_nowait()[1].close()
            except queue.Empty:
                break

    def _accept_all(self) -> None:
        while not self._closing.is_set():
            try:
                conn = self._listener.accept()
            except (AuthenticationError, EOFError, OSError) as error:  # a stranger, or our own wake-up
                if self._closing.is_set():
                    return
                log.debug("the worker pool refused a connection: %s", error)
                self._closing.wait(0.05)  # no busy loop should accept() itself keep failing
                continue
            if self._closing.is_set():
                conn.close()
                return
            self._claim(conn)

    def _claim(self, conn: Connection) -> None:
        """A worker's first message is its rank."""
        try:
            if not conn.poll(HELLO_TIMEOUT_S):
                raise EOFError("no rank")
            rank = int(conn.recv_bytes(32))
        except (EOFError, OSError, ValueError) as error:
            log.debug("a worker connection said no rank: %s", error)
            conn.close()
            return
        self._accepted.put((rank, conn))


# --- control connection: the worker's side -----------------------------------------------------------

def connect_to_parent(argv: list[str]) -> Connection:
    """The worker's connection, from its arguments: ``FD`` (pipe) or ``--connect HOST:PORT --rank N``
    (portable, the key in ``PIXELWIZARD_POOL_KEY``, removed from the environment once read)."""
    if argv and argv[0].isdigit():
        return Connection(int(argv[0]))
    parser = argparse.ArgumentParser(prog="python -m pixelwizard_core.distributed.worker")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--rank", type=int, required=True)
    args = parser.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    key = os.environ.pop(KEY_ENV, None)  # not passed on to anything this worker starts
    if not key:
        raise ConfigError(f"a pool worker started with --connect needs the pool's key in {KEY_ENV}")
    conn = Client((host, int(port)), authkey=bytes.fromhex(key))
    conn.send_bytes(str(args.rank).encode())
    return conn
