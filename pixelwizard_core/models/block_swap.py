"""Block swap: run a DiT whose last blocks wait in (pinned) CPU memory and are streamed in one at a time.

For GPUs too small to hold the whole DiT. The swapped blocks keep their weights in host memory; just before
one runs, its weights are copied into one of two reusable device buffers ("slots") and the block's
parameters and buffers point at that slot; right after it ran they point back at the host copy, so between
forward calls a swapped block holds nothing on the device. While block i computes, the next swapped block
is already copying into the other slot on a side CUDA stream: the copies hide behind the compute when a
block computes longer than its weights take to copy (a 5B block is ~330 MB in bf16, ~15 ms over PCIe 4;
at 2K it computes for a few hundred ms, at the 448x256 anchor size for a few ms).

The result is exact: the same weights reach the same kernels, so the output equals the unswapped model's
bit for bit.

Memory: each swapped block's host copy is ONE buffer (its tensors are views into it, see
:class:`BlockLayout`), page-locked as a whole with ``cudaHostRegister``, so page-locked bytes equal stored
bytes up to one page per block. torch's caching host allocator (``pin_memory=True``) would round each
allocation up to a power of two (a 312 MiB bf16 block takes 512 MiB, whether pinned per tensor or whole)
and keep freed blocks cached for good. The registration is undone and the pages returned to the system
when the last view of the buffer is gone (the model moved to the GPU, or dropped); while the model waits
on the CPU between stages its blocks stay page-locked, so the next swap neither copies nor pins again.
Where registration is refused (WSL), the caching allocator is the fallback, said once. Each device slot
is one buffer as large as the largest block (blocks may differ: mixed GGUF quantizations), so a block
arrives in one copy.

Ordering on CUDA, all asynchronous to the host (no synchronisation per block):
- the side stream waits on its slot's "free" event (recorded on the compute stream right after the block
  that last used the slot), copies host -> slot, and records the slot's "ready" event;
- the compute stream waits on "ready" before the block's kernels are queued.
Two fixed slots bound the device memory to two blocks however far the host runs ahead of the GPU; copies
into freshly allocated tensors would instead be held by the caching allocator until the GPU caught up.
``tests/fake_cuda.py`` records these calls on the CPU and checks the order (and that removing either wait
is caught).

On a CPU device the same code runs without streams or events (plain synchronous copies), so tests can
check outputs and residency without a GPU. Inference only: autograd would keep references to slot
contents that the next blocks overwrite, so a forward with gradients enabled is refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..errors import ConfigError

log = logging.getLogger("pixelwizard")

SLOTS = 2  # the block running and the next one in flight
ALIGN = 512  # byte offset alignment of the views in a block buffer: the CUDA caching allocator's
PAGE = 4096  # page-locking works on whole pages

# blocks currently streamed by some BlockSwap: one block cannot be streamed twice at the same time
_streamed: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --- one buffer per block ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockLayout:
    """Where each tensor of a block lies in its one buffer: byte offsets aligned to ``ALIGN``."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    nbytes: int  # the buffer's size

    @classmethod
    def of(cls, tensors: Sequence[tuple[Sequence[int], torch.dtype]]) -> "BlockLayout":
        """The layout of tensors given as (shape, dtype), in order."""
        offsets, end = [], 0
        for shape, dtype in tensors:
            offsets.append(end)
            end = _round_up(end + math.prod(shape) * dtype.itemsize, ALIGN)
        return cls(tuple(tuple(s) for s, _ in tensors), tuple(d for _, d in tensors), tuple(offsets), end)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors themselves (what per-tensor storage would hold)."""
        return sum(math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes))

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """The tensors as views into ``buffer`` (uint8, at least ``nbytes``)."""
        return [buffer[o:o + math.prod(s) * d.itemsize].view(d).view(s)
                for s, d, o in zip(self.shapes, self.dtypes, self.offsets)]


def pinned_bytes(nbytes: int, method: str = "registered") -> int:
    """Page-locked bytes one host buffer of ``nbytes`` takes: "registered" memory is locked in whole
    pages; torch's caching host allocator ("cached") rounds every allocation up to a power of two;
    "pageable" memory is not locked."""
    if method == "registered":
        return _round_up(nbytes, PAGE)
    if method == "cached":
        return 1 << max(nbytes - 1, 0).bit_length()
    return 0


# --- host buffers ---------------------------------------------------------------------------------------
class HostBuffers(Protocol):
    """Where host copies live: ``allocate`` a block's buffer (uint8); ``is_pinned`` says whether memory is
    page-locked (only then may a copy from it be non-blocking). ``method``: see :func:`pinned_bytes`."""

    method: str

    def allocate(self, nbytes: int) -> torch.Tensor: ...

    def is_pinned(self, tensor: torch.Tensor) -> bool: ...


class PageableBuffers:
    """Plain host memory: a CPU "device" needs nothing page-locked."""

    method = "pageable"

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return False


class _LockedPages(mmap.mmap):
    """Anonymous pages registered with CUDA until this object is collected. The buffer tensor made from it
    (``torch.frombuffer``) holds it, and every view of the buffer holds that, so the pages are unlocked and
    unmapped exactly when the last view of the block's weights is gone."""

    registered = 0  # bytes registered by the whole process (doctor and the benchmark read it)

    def lock(self) -> torch.Tensor:
        buffer = torch.frombuffer(self, dtype=torch.uint8)
        # flag 1, cudaHostRegisterPortable: page-locked for every device's context, as torch registers memory
        result = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), len(self), 1))
        if result != 0:
            raise RuntimeError(f"cudaHostRegister of {len(self)} bytes failed with cudaError {result}")
        self._pointer = buffer.data_ptr()
        _LockedPages.registered += len(self)
        return buffer

    def __del__(self) -> None:
        if getattr(self, "_pointer", None) is not None:
            _LockedPages.registered -= len(self)
            with contextlib.suppress(Exception):  # at interpreter exit the CUDA runtime may be gone
                torch.cuda.cudart().cudaHostUnregister(self._pointer)


_PRIVATE = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # POSIX: not shared on fork


class PinnedBuffers:
    """Page-locked host memory for a CUDA device: registered pages, else torch's caching host allocator."""

    method = "registered"

    def allocate(self, nbytes: int) -> torch.Tensor:
        if self.method == "registered":
            try:
                return _LockedPages(-1, _round_up(max(nbytes, 1), PAGE), **_PRIVATE).lock()[:nbytes]
            except (RuntimeError, OSError, AttributeError, AssertionError) as error:
                PinnedBuffers.method = "cached"  # for the whole process: the system refuses it
                log.warning("block swap: page-locking host memory with cudaHostRegister failed (%s); using torch's "
                            "pinned memory instead, which rounds each block up to a power of two", error)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()


def empty_host_cache() -> None:
    """Return the pinned blocks torch's caching host allocator keeps cached: freed pinned tensors stay
    cached for reuse, and ``torch.cuda.empty_cache()`` does not touch them."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.accelerator.empty_host_cache()


def locked_host_bytes() -> int:
    """Page-locked host memory of this process that torch and block swap know of: block swap's registered
    buffers plus the caching host allocator's blocks (in use or cached)."""
    cached = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cached = int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    return _LockedPages.registered + cached


def _existing_buffer(tensors: Sequence[torch.Tensor], layout: BlockLayout,
                     buffers: HostBuffers) -> torch.Tensor | None:
    """The pinned buffer ``tensors`` already are views of in ``layout`` (a swap's host copies, kept while the
    model waited on the CPU), or None."""
    storage = tensors[0].untyped_storage()
    base = storage.data_ptr()
    for tensor, offset in zip(tensors, layout.offsets):
        if (tensor.device.type != "cpu" or not tensor.is_contiguous()
                or tensor.untyped_storage().data_ptr() != base or tensor.data_ptr() - base != offset):
            return None
    if storage.nbytes() < layout.nbytes:
        return None
    buffer = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (layout.nbytes,))
    return buffer if buffers.is_pinned(buffer) else None


# --- streams ----------------------------------------------------------------------------------------------
class CudaStreams:
    """The CUDA stream and event calls block swap makes, in one place: tests pass a recorder with the same
    methods (``tests/fake_cuda.py``) that checks their order on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def current(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def using(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)


# --- the swap ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One parameter or buffer of a block, addressed through the module that owns it."""

    owner: nn.Module
    name: str
    is_parameter: bool

    def get(self) -> torch.Tensor:
        return getattr(self.owner, self.name)

    def point_at(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


def _entries(block: nn.Module) -> list[_Entry]:
    entries = []
    for module in block.modules():
        entries += [_Entry(module, n, True) for n, p in module._parameters.items() if p is not None]
        entries += [_Entry(module, n, False) for n, b in module._buffers.items() if b is not None]
    return entries


def check_count(count: object, num_blocks: int) -> int:
    """``count`` as the number of blocks to swap, refused unless it is an integer in 0..num_blocks."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= num_blocks:
        raise ConfigError(f"swap_blocks {count!r}: the model has {num_blocks} transformer blocks, so choose a "
                          f"whole number from 0 (no block swap) to {num_blocks} (every block streamed)")
    return count


class BlockSwap:
    """Streams the last ``count`` of ``blocks`` from host memory to ``device`` while they run.

    ``enable()`` moves the swapped blocks' weights into one host buffer per block (page-locked on CUDA;
    blocks already in such a buffer are kept, so a model that waits on the CPU is pinned once) and installs
    the hooks; ``disable(home)`` removes them and puts the swapped blocks on ``home`` (None: leave them on
    their host copies). Also a context manager (``with BlockSwap(...) as swap``; leaving it puts the blocks
    back where they were). Everything of the model other than the swapped blocks is the caller's to place
    (see :func:`pixelwizard_core.pipeline.placement.on_device`). ``streams`` and ``buffers`` replace the CUDA
    calls and the host memory (tests).
    """

    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device | str, *,
                 streams: CudaStreams | None = None, buffers: HostBuffers | None = None) -> None:
        self.blocks = list(blocks)
        self.count = check_count(count, len(self.blocks))
        if self.count == 0:
            raise ConfigError("BlockSwap with 0 blocks does nothing; do not create one for swap_blocks 0")
        self.first = len(self.blocks) - self.count  # model index of the first swapped block
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self._streams = streams if streams is not None else CudaStreams(self.device) if cuda else None
        self._buffers = buffers if buffers is not None else PinnedBuffers() if cuda else PageableBuffers()
        self.active = False
        self._entered_from: torch.device | None = None

    @property
    def indices(self) -> range:
        """Model indices of the swapped blocks."""
        return range(self.first, len(self.blocks))

    # --- switching on and off --------------------------------------------------------------------
    def enable(self) -> "BlockSwap":
        if self.active:
            return self
        swapped = self.blocks[self.first:]
        if any(block in _streamed for block in swapped):
            raise ConfigError("these DiT blocks are already being streamed (block swap): a model can be used by "
                              "one block-swapped stage at a time; finish the other stage first")
        self._entries = [_entries(block) for block in swapped]
        self._layouts = self._block_layouts()
        # block by block: one extra copy at a time
        self._hosts = [self._to_host(entries, layout) for entries, layout in zip(self._entries, self._layouts)]
        self._host_views = [layout.views(host) for layout, host in zip(self._layouts, self._hosts)]
        self._pinned = [self._buffers.is_pinned(host) for host in self._hosts]
        # a slot takes the largest block (mixed GGUF K-quants store some blocks' Linears larger)
        self._slots = [torch.empty(max(layout.nbytes for layout in self._layouts), dtype=torch.uint8,
                                   device=self.device) for _ in range(min(SLOTS, self.count))]
        self._slot_views: dict[tuple[int, BlockLayout], list[torch.Tensor]] = {}
        self._holds: list[int | None] = [None] * len(self._slots)  # which swapped block each slot holds
        self._start_streams()
        self._needs_grad = [any(e.get().requires_grad for e in entries if e.is_parameter) for entries in self._entries]
        self._install_hooks(swapped)
        _streamed.update(swapped)
        self.active = True
        log.debug("block swap on: blocks %d..%d streamed to %s", self.first, len(self.blocks) - 1, self.device)
        return self

    def _to_host(self, entries: list[_Entry], layout: BlockLayout) -> torch.Tensor:
        """The block's host buffer (its existing pinned one, or a new one filled from its tensors), with
        the block's tensors pointed at their views into it."""
        tensors = [entry.get().detach() for entry in entries]
        buffer = _existing_buffer(tensors, layout, self._buffers)
        if buffer is None:
            buffer = self._buffers.allocate(layout.nbytes)
            for view, tensor in zip(layout.views(buffer), tensors):
                view.copy_(tensor)
        for entry, view in zip(entries, layout.views(buffer)):
            entry.point_at(view)
        return buffer

    def _start_streams(self) -> None:
        self._stream = self._ready = self._free = None
        if self._streams is None:
            return
        self._stream = self._streams.new_stream()
        # the slots may reuse memory that queued compute-stream work still touches: copy after it
        self._stream.wait_stream(self._streams.current())
        self._ready = [self._streams.new_event() for _ in self._slots]
        self._free = [self._streams.new_event() for _ in self._slots]

    def _install_hooks(self, swapped: list[nn.Module]) -> None:
        self._hooks = []
        for position, block in enumerate(swapped):
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._before, position)))
            self._hooks.append(block.register_forward_hook(functools.partial(self._after, position), always_call=True))
        if self.first > 0:  # start copying the first swapped block while the block before it computes
            self._hooks.append(self.blocks[self.first - 1].register_forward_pre_hook(self._prefetch_first))

    def disable(self, home: torch.device | str | None) -> None:
        """Stop streaming; the swapped blocks go to ``home`` (None: they stay on their host copies)."""
        if not self.active:
            return
        if self._stream is not None:  # copies still queued read the host copies and write the slots
            self._streams.current().wait_stream(self._stream)
            self._stream.synchronize()
        for hook in self._hooks:
            hook.remove()
        for entries, views in zip(self._entries, self._host_views):
            for entry, view in zip(entries, views):
                entry.point_at(view if home is None else view.to(home))
        _streamed.difference_update(self.blocks[self.first:])
        self._entries = self._layouts = self._hosts = self._host_views = self._slots = self._holds = []
        self._slot_views = {}
        self._hooks = []
        self._stream = self._ready = self._free = None
        self.active = False
        empty_host_cache()

    def __enter__(self) -> "BlockSwap":
        first = self.blocks[self.first]
        self._entered_from = next((t.device for t in [*first.parameters(), *first.buffers()]), None)
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable(self._entered_from)

    # --- residency and memory (for tests, diagnostics and the benchmark) ----------------------------
    def resident(self) -> list[int]:
        """Model indices of swapped blocks whose weights are not on their host copies right now (only
        the block running and, on CUDA, none other: between forward calls this is empty)."""
        if not self.active:
            return []
        return [self.first + p for p, (entries, views) in enumerate(zip(self._entries, self._host_views))
                if any(e.get().data_ptr() != v.data_ptr() for e, v in zip(entries, views))]

    def slot_bytes(self) -> int:
        """Device memory held by the slots (two blocks' weights, one when a single block is swapped)."""
        return sum(slot.numel() for slot in self._slots) if self.active else 0

    def host_bytes(self) -> dict[str, object]:
        """Per swapped block (the largest, where blocks differ): the tensors' bytes, the buffer's, the
        page-locked bytes it takes, and how it is page-locked (see :func:`pinned_bytes`)."""
        method = self._buffers.method if any(self._pinned) else "pageable"
        largest = max(self._layouts, key=lambda layout: layout.nbytes)
        return {"stored": largest.stored_bytes, "buffer": largest.nbytes,
                "pinned": pinned_bytes(largest.nbytes, method), "method": method}

    # --- the hooks -------------------------------------------------------------------------------
    def _prefetch_first(self, module: nn.Module, args: tuple) -> None:
        self._fill(0)

    def _before(self, position: int, module: nn.Module, args: tuple) -> None:
        if self._needs_grad[position] and torch.is_grad_enabled():
            raise ConfigError("block swap is for inference: run the model under torch.no_grad() (or "
                              "inference_mode), or turn block swap off to train")
        slot = self._fill(position)
        if self._stream is not None:
            self._wait_ready(slot)
        for entry, tensor in zip(self._entries[position], self._views_in_slot(slot, position)):
            entry.point_at(tensor)
        if position + 1 < self.count:
            self._fill(position + 1)  # overlaps with this block's compute

    def _after(self, position: int, module: nn.Module, args: tuple, output: object) -> None:
        for entry, view in zip(self._entries[position], self._host_views[position]):
            entry.point_at(view)
        if self._free is not None:  # the slot may be overwritten once the kernels queued so far are done
            self._free[position % len(self._slots)].record(self._streams.current())

    def _wait_ready(self, slot: int) -> None:
        """The block's kernels must not read its slot before the copy into it is done."""
        self._streams.current().wait_event(self._ready[slot])

    def _wait_free(self, slot: int) -> None:
        """The copy must not overwrite a slot that a queued block may still read."""
        self._stream.wait_event(self._free[slot])

    def _fill(self, position: int) -> int:
        """Make sure the slot of swapped block ``position`` holds it (copy queued if not); its index."""
        slot = position % len(self._slots)
        if self._holds[slot] == position:
            return slot
        target = self._slots[slot][:self._layouts[position].nbytes]
        if self._stream is None:
            target.copy_(self._hosts[position])
        else:
            with self._streams.using(self._stream):
                self._wait_free(slot)
                target.copy_(self._hosts[position], non_blocking=self._pinned[position])
                self._ready[slot].record(self._stream)
        self._holds[slot] = position
        return slot

    def _views_in_slot(self, slot: int, position: int) -> list[torch.Tensor]:
        """Block ``position``'s tensors as views into slot ``slot`` (made once per slot and layout)."""
        key = (slot, self._layouts[position])
        if key not in self._slot_views:
            self._slot_views[key] = self._layouts[position].views(self._slots[slot])
        return self._slot_views[key]

    def _block_layouts(self) -> list[BlockLayout]:
        """Each swapped block's layout. Wan blocks share one; a GGUF file may store some blocks' Linears in
        another quantization (the _M/_S K-quant mixes), so each block gets its own and the slots fit the
        largest."""
        return [BlockLayout.of([(tuple(e.get().shape), e.get().dtype) for e in entries]) for entries in self._entries]
