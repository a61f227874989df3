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

Ordering on CUDA, all asynchronous to the host (no synchronisation per block):
- the side stream waits on its slot's "free" event (recorded on the compute stream right after the block
  that last used the slot), copies host -> slot, and records the slot's "ready" event;
- the compute stream waits on "ready" before the block's kernels are queued.
Two fixed slots bound the device memory to two blocks however far the host runs ahead of the GPU; copies
into freshly allocated tensors would instead be held by the caching allocator until the GPU caught up.

On a CPU device the same code runs without streams or events (plain synchronous copies), so tests can
check outputs and residency without a GPU. Inference only: autograd would keep references to slot
contents that the next blocks overwrite, so a forward with gradients enabled is refused.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError

log = logging.getLogger("pixelwizard")

SLOTS = 2  # the block running and the next one in flight

# blocks currently streamed by some BlockSwap: one block cannot be streamed twice at the same time
_streamed: weakref.WeakSet[nn.Module] = weakref.WeakSet()


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


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """The tensor in CPU memory, pinned when ``pin`` (kept as is when it already is)."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu" and (not pin or tensor.is_pinned()):
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
    host.copy_(tensor)
    return host


def check_count(count: object, num_blocks: int) -> int:
    """``count`` as the number of blocks to swap, refused unless it is an integer in 0..num_blocks."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= num_blocks:
        raise ConfigError(f"swap_blocks {count!r}: the model has {num_blocks} transformer blocks, so choose a "
                          f"whole number from 0 (no block swap) to {num_blocks} (every block streamed)")
    return count


class BlockSwap:
    """Streams the last ``count`` of ``blocks`` from host memory to ``device`` while they run.

    ``enable()`` moves the swapped blocks' weights to host memory (pinned on CUDA; weights already pinned
    are kept, so a model that waits on the CPU is pinned once) and installs the hooks; ``disable(home)``
    removes them and puts the swapped blocks on ``home`` (None: leave them on their host copies). Also a
    context manager (``with BlockSwap(...) as swap``; leaving it puts the blocks back where they were).
    Everything of the model other than the swapped blocks is the caller's to place (see
    :func:`pixelwizard_core.pipeline.placement.on_device`).
    """

    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device | str) -> None:
        self.blocks = list(blocks)
        self.count = check_count(count, len(self.blocks))
        if self.count == 0:
            raise ConfigError("BlockSwap with 0 blocks does nothing; do not create one for swap_blocks 0")
        self.first = len(self.blocks) - self.count  # model index of the first swapped block
        self.device = torch.device(device)
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
        cuda = self.device.type == "cuda"
        self._entries = [_entries(block) for block in swapped]
        self._check_one_layout()
        self._hosts = [[_host_copy(e.get(), pin=cuda) for e in entries] for entries in self._entries]
        for entries, hosts in zip(self._entries, self._hosts):
            for entry, host in zip(entries, hosts):
                entry.point_at(host)
        self._slots = [[torch.empty_like(h, device=self.device) for h in self._hosts[0]]
                       for _ in range(min(SLOTS, self.count))]
        self._holds: list[int | None] = [None] * len(self._slots)  # which swapped block each slot holds
        self._stream = self._ready = self._free = None
        if cuda:
            self._stream = torch.cuda.Stream(self.device)
            # the slots may reuse memory that queued compute-stream work still touches: copy after it
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            self._ready = [torch.cuda.Event() for _ in self._slots]
            self._free = [torch.cuda.Event() for _ in self._slots]
        self._needs_grad = [any(e.get().requires_grad for e in entries if e.is_parameter) for entries in self._entries]
        self._hooks = []
        for position, block in enumerate(swapped):
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._before, position)))
            self._hooks.append(block.register_forward_hook(functools.partial(self._after, position), always_call=True))
        if self.first > 0:  # start copying the first swapped block while the block before it computes
            self._hooks.append(self.blocks[self.first - 1].register_forward_pre_hook(self._prefetch_first))
        _streamed.update(swapped)
        self.active = True
        log.debug("block swap on: blocks %d..%d streamed to %s", self.first, len(self.blocks) - 1, self.device)
        return self

    def disable(self, home: torch.device | str | None) -> None:
        """Stop streaming; the swapped blocks go to ``home`` (None: they stay on their host copies)."""
        if not self.active:
            return
        if self._stream is not None:  # copies still queued read the host copies and write the slots
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._stream.synchronize()
        for hook in self._hooks:
            hook.remove()
        for entries, hosts in zip(self._entries, self._hosts):
            for entry, host in zip(entries, hosts):
                entry.point_at(host if home is None else host.to(home))
        _streamed.difference_update(self.blocks[self.first:])
        self._entries = self._hosts = self._slots = self._holds = self._hooks = []
        self._stream = self._ready = self._free = None
        self.active = False

    def __enter__(self) -> "BlockSwap":
        first = self.blocks[self.first]
        self._entered_from = next((t.device for t in [*first.parameters(), *first.buffers()]), None)
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable(self._entered_from)

    # --- residency (for tests and diagnostics) ---------------------------------------------------
    def resident(self) -> list[int]:
        """Model indices of swapped blocks whose weights are not on their host copies right now (only
        the block running and, on CUDA, none other: between forward calls this is empty)."""
        if not self.active:
            return []
        return [self.first + p for p, (entries, hosts) in enumerate(zip(self._entries, self._hosts))
                if any(e.get().data_ptr() != h.data_ptr() for e, h in zip(entries, hosts))]

    def slot_bytes(self) -> int:
        """Device memory held by the slots (two blocks' weights, one when a single block is swapped)."""
        if not self.active:
            return 0
        return sum(t.numel() * t.element_size() for slot in self._slots for t in slot)

    # --- the hooks -------------------------------------------------------------------------------
    def _prefetch_first(self, module: nn.Module, args: tuple) -> None:
        self._fill(0)

    def _before(self, position: int, module: nn.Module, args: tuple) -> None:
        if self._needs_grad[position] and torch.is_grad_enabled():
            raise ConfigError("block swap is for inference: run the model under torch.no_grad() (or "
                              "inference_mode), or turn block swap off to train")
        slot = self._fill(position)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        for entry, tensor in zip(self._entries[position], self._slots[slot]):
            entry.point_at(tensor)
        if position + 1 < self.count:
            self._fill(position + 1)  # overlaps with this block's compute

    def _after(self, position: int, module: nn.Module, args: tuple, output: object) -> None:
        for entry, host in zip(self._entries[position], self._hosts[position]):
            entry.point_at(host)
        if self._free is not None:  # the slot may be overwritten once the kernels queued so far are done
            self._free[position % len(self._slots)].record(torch.cuda.current_stream(self.device))

    def _fill(self, position: int) -> int:
        """Make sure the slot of swapped block ``position`` holds it (copy queued if not); its index."""
        slot = position % len(self._slots)
        if self._holds[slot] == position:
            return slot
        pairs = zip(self._slots[slot], self._hosts[position])
        if self._stream is None:
            for dst, src in pairs:
                dst.copy_(src)
        else:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(self._free[slot])
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                self._ready[slot].record(self._stream)
        self._holds[slot] = position
        return slot

    def _check_one_layout(self) -> None:
        """The slots are shared, so every swapped block must have the same tensors (true of Wan blocks,
        fp8 storage included, as long as every block was converted alike)."""
        def layout(entries: list[_Entry]) -> list[tuple]:
            return [(e.name, tuple(e.get().shape), e.get().dtype) for e in entries]

        reference = layout(self._entries[0])
        for position, entries in enumerate(self._entries[1:], start=1):
            if layout(entries) != reference:
                raise ConfigError(f"block {self.first + position} has other tensors (shapes/dtypes) than block "
                                  f"{self.first}; block swap needs identical blocks (convert all of them to fp8 "
                                  "or none)")
