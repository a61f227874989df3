"""The CPU treated as CUDA, for tests of the CUDA-only paths.

- :func:`pretend_gpu`: ``torch.cuda`` reports one GPU of a chosen compute capability (tensors stay on the
  CPU; only what the library reads about the device is faked).
- :func:`install_flash`: the flash-attn fakes of ``tests/fakes`` as ``flash_attn`` / ``flash_attn_interface``
  (or either marked not installed).
- :class:`StreamRecorder`: block swap's streams, events and host memory (``BlockSwap(streams=, buffers=)``)
  as a model of CUDA's ordering: every op queued on a stream gets a vector clock, events and waits join
  clocks, so "A happens before B" is a clock comparison. The tensor copies are seen through a
  ``TorchFunctionMode``; the reads of a block are noted by hooks (:meth:`StreamRecorder.watch`).
  :meth:`StreamRecorder.violations` then says whether a block read a slot before its copy was waited on,
  a copy overwrote a slot that a queued block may still read, or a non-blocking copy came from pageable
  memory.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch.overrides import TorchFunctionMode

GPU_NAMES = {(7, 0): "Tesla V100-SXM2-16GB", (7, 5): "Tesla T4", (8, 0): "NVIDIA A100-SXM4-80GB",
             (8, 9): "NVIDIA L4", (9, 0): "NVIDIA H100 80GB HBM3", (12, 0): "NVIDIA GeForce RTX 5090"}


def pretend_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] = (9, 0)) -> torch.device:
    """``torch.cuda`` says there is one GPU, cuda:0, of ``capability``; returns that device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU_NAMES.get(capability, "GPU"))
    # dynamo saves and restores the CUDA RNG state around every frame it compiles when CUDA is available
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": None)
    return torch.device("cuda", 0)


def install_flash(monkeypatch: pytest.MonkeyPatch, fa2: bool = True, fa3: bool = False) -> None:
    """The fakes as the installed flash-attn 2 / 3 (False: that package is not installed)."""
    import fakes.flash_attn
    import fakes.flash_attn_interface

    monkeypatch.setitem(sys.modules, "flash_attn", fakes.flash_attn if fa2 else None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fakes.flash_attn_interface if fa3 else None)
    fakes.flash_attn.calls.clear()
    fakes.flash_attn_interface.calls.clear()


# --- streams --------------------------------------------------------------------------------------------
Clock = dict[str, int]


def _join(a: Clock, b: Clock) -> Clock:
    return {key: max(a.get(key, 0), b.get(key, 0)) for key in a.keys() | b.keys()}


@dataclass
class Op:
    kind: str  # "copy" or "read"
    stream: str
    clock: Clock
    dst: tuple[int, int] = (0, 0)  # byte range written (copy)
    src: tuple[int, int] = (0, 0)  # byte range read (copy)
    slot: int = 0  # a byte the block reads (read)
    host: int = 0  # a byte of the block's host copy (read)
    non_blocking: bool = False
    src_pinned: bool = False

    def before(self, other: "Op") -> bool:
        """Whether this op is finished before ``other`` starts, by CUDA's ordering rules."""
        return self.clock[self.stream] <= other.clock.get(self.stream, 0)


@dataclass
class FakeStream:
    recorder: "StreamRecorder"
    name: str
    clock: Clock = field(default_factory=dict)

    def wait_event(self, event: "FakeEvent") -> None:
        if event.clock is not None:  # waiting on an event never recorded returns at once, as in CUDA
            self.clock = _join(self.clock, event.clock)

    def wait_stream(self, other: "FakeStream") -> None:
        self.clock = _join(self.clock, other.clock)

    def synchronize(self) -> None:
        self.recorder.host_done = _join(self.recorder.host_done, self.clock)


@dataclass
class FakeEvent:
    clock: Clock | None = None

    def record(self, stream: FakeStream) -> None:
        self.clock = dict(stream.clock)


def _range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


class StreamRecorder(TorchFunctionMode):
    """CudaStreams and HostBuffers for BlockSwap on the CPU, recording the order of what it queues."""

    method = "registered"

    def __init__(self, pinned: bool = True) -> None:
        super().__init__()
        self.compute = FakeStream(self, "compute")
        self.active = self.compute
        self.host_done: Clock = {}
        self.ops: list[Op] = []
        self.pinned = pinned  # whether allocate() hands out page-locked memory
        self._buffers: list[torch.Tensor] = []  # kept alive: their ranges stay theirs
        self._streams = 0
        self.allocations = 0

    # --- CudaStreams -------------------------------------------------------------------------------
    def current(self) -> FakeStream:
        return self.active

    def new_stream(self) -> FakeStream:
        self._streams += 1
        return FakeStream(self, f"side{self._streams}")

    def new_event(self) -> FakeEvent:
        return FakeEvent()

    @contextlib.contextmanager
    def using(self, stream: FakeStream) -> Iterator[None]:
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    # --- HostBuffers ---------------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.allocations += 1
        if self.pinned:
            self._buffers.append(buffer)
        return buffer

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return self.page_locked(tensor)

    def page_locked(self, tensor: torch.Tensor) -> bool:
        """The truth the checker uses (a test may make ``is_pinned`` lie to the code under test)."""
        start, end = _range(tensor)
        return any(b.data_ptr() <= start and end <= b.data_ptr() + b.numel() for b in self._buffers)

    # --- recording -------------------------------------------------------------------------------------
    def _queue(self, op: Op) -> None:
        stream = self.active
        stream.clock = _join(stream.clock, self.host_done)  # work the host waited for is done
        stream.clock[stream.name] = stream.clock.get(stream.name, 0) + 1
        op.stream, op.clock = stream.name, dict(stream.clock)
        self.ops.append(op)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
            self._queue(Op("copy", "", {}, dst=_range(dst), src=_range(src), non_blocking=non_blocking,
                           src_pinned=self.page_locked(src)))
        return func(*args, **kwargs)

    def watch(self, blocks: list[torch.nn.Module]) -> list:
        """Note each block's read of its slot: a hook before the swap's (the host copy the block expects)
        and one after it (where its weights point once placed). Returns the hook handles."""
        handles, expected = [], {}

        def note_host(module: torch.nn.Module, args: tuple) -> None:
            expected[id(module)] = next(module.parameters()).data_ptr()

        def read(module: torch.nn.Module, args: tuple) -> None:
            self._queue(Op("read", "", {}, slot=next(module.parameters()).data_ptr(), host=expected[id(module)]))

        for block in blocks:
            handles.append(block.register_forward_pre_hook(note_host, prepend=True))
            handles.append(block.register_forward_pre_hook(read))
        return handles

    # --- checking ---------------------------------------------------------------------------------------
    def violations(self) -> list[str]:
        found = []
        for index, op in enumerate(self.ops):
            earlier = self.ops[:index]
            if op.kind == "read":
                found += self._read_violations(index, op, earlier)
            elif op.non_blocking and not op.src_pinned:
                found.append(f"op {index}: a non-blocking copy from pageable memory")
            if op.kind == "copy":
                found += [f"op {index}: a copy overwrites the slot that read {i} may still be reading"
                          for i, read in enumerate(earlier) if read.kind == "read"
                          and op.dst[0] <= read.slot < op.dst[1] and not read.before(op)]
        return found

    def _read_violations(self, index: int, read: Op, earlier: list[Op]) -> list[str]:
        fills = [op for op in earlier if op.kind == "copy" and op.dst[0] <= read.slot < op.dst[1]]
        if not fills:
            return [f"op {index}: a block reads a slot nothing was copied into"]
        fill = fills[-1]
        if not fill.src[0] <= read.host < fill.src[1]:
            return [f"op {index}: a block reads a slot that holds another block"]
        if not fill.before(read):
            return [f"op {index}: a block reads its slot before the copy into it was waited on"]
        return []

    def copies(self, non_blocking: bool | None = None) -> list[Op]:
        return [op for op in self.ops if op.kind == "copy" and (non_blocking is None or op.non_blocking == non_blocking)]
