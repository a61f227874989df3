"""Peak bytes of tensors created inside a block (CPU or any device), counted at the dispatcher.

Every op's output storage is counted while some Python tensor still refers to it; parameters and inputs made
before the block are not counted. This measures what the code allocates, independent of the allocator."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveTensors(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage pointer -> bytes
        self.refs: dict[int, int] = {}
        self.before: set[int] = set()
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.live.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                self.before.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.before or key == 0:
                continue  # an in-place op or view of something made outside the block
            if key not in self.live:
                self.live[key] = t.untyped_storage().nbytes()
                self.refs[key] = 0
                self.current += self.live[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


@contextmanager
def peak_tensor_bytes() -> Iterator[dict]:
    """On exit the yielded dict holds ``bytes``: the most bytes of tensors alive at once inside the block."""
    mode, result = _LiveTensors(), {}
    with mode:
        yield result
    result["bytes"] = mode.peak
