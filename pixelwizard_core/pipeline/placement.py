"""Where a model is while it works and while it waits: the one placement policy of the library.

The ComfyUI nodes (:func:`.handles.opened`), the command line (:meth:`.models.Models.use`) and the worker
processes (:class:`~pixelwizard_core.distributed.session.Session`) all place models through
:func:`on_device`; they only differ in how they pick ``device``, ``home`` and ``swap_blocks``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.block_swap import BlockSwap, check_count, empty_host_cache
from .text import TextEncoder

log = logging.getLogger("pixelwizard")

M = TypeVar("M")


def module_of(model: object) -> nn.Module:
    """The module holding a model's weights (the umT5 encoder of a :class:`TextEncoder`)."""
    return model.encoder if isinstance(model, TextEncoder) else model


def num_blocks(model: object) -> int:
    """How many transformer blocks block swap could stream (0 for a model without ``.blocks``: T5, VAE)."""
    blocks = getattr(module_of(model), "blocks", None)
    return len(blocks) if isinstance(blocks, nn.ModuleList) else 0


def check_swap_blocks(model: object, swap_blocks: int) -> int:
    """``swap_blocks`` checked against ``model``: 0 for any model, 1..len(blocks) for a DiT."""
    available = num_blocks(model)
    if available == 0 and swap_blocks:
        raise ConfigError(f"swap_blocks {swap_blocks!r}: a {type(module_of(model)).__name__} has no transformer "
                          "blocks to stream; block swap applies to the LR and HR DiTs only (use 0 here)")
    return check_count(swap_blocks, available)


@contextlib.contextmanager
def on_device(model: M, device: torch.device | str, *, home: torch.device | str | None,
              swap_blocks: int = 0) -> Iterator[M]:
    """``model`` ready to run on ``device`` inside the ``with`` block; afterwards back on ``home``.

    - ``model``: an ``nn.Module`` (WanDiT, WanHRDiT, WanVAE, ...) or a :class:`TextEncoder` (its
      ``.encoder`` is moved). It is yielded unchanged.
    - ``device``: where it computes.
    - ``home``: where it waits after the block: ``device`` to stay there, ``"cpu"`` to offload, or None to
      leave everything where it ran (only for a caller that drops the model right after).
    - ``swap_blocks``: 0, or for a model with ``.blocks`` (the DiTs) the number of LAST blocks kept in
      host memory (pinned on CUDA) and streamed to ``device`` one at a time while the model runs, the next
      one copying while the current one computes (:class:`~pixelwizard_core.models.block_swap.BlockSwap`).
      Everything else of the model is on ``device``. The outputs are identical to the unswapped model's.
      Must run without gradients (sampling does).

    A model with ``place_attention`` (the DiTs) resolves its attention backend here, once, for ``device``
    (flash-attn looked up, the GPU's capability read): its compiled blocks never look anything up.

    The CUDA cache is emptied after something left the GPU, and torch's pinned host cache too. Leaving
    the block restores a whole model (every block on ``home``), so a cached model can be used next in
    another mode. Raises ConfigError for a ``swap_blocks`` out of 0..len(model.blocks) (or > 0 for a model
    without blocks) before moving anything.
    """
    module = module_of(model)
    device = _normalized(device)
    home = None if home is None else _normalized(home)
    count = check_swap_blocks(model, swap_blocks)
    swap = BlockSwap(module.blocks, count, device) if count else None
    try:
        if swap is not None:  # to the host first: the whole DiT never sits on the device at once
            swap.enable()
        _move(module, device, skip=swap.blocks[swap.first:] if swap is not None else ())
        place_attention(model, device)
        yield model
    finally:
        if swap is not None:
            swap.disable(home)  # its two device slots are freed here
        moved = home is not None and home != device and _move(module, home)
        if (moved or swap is not None) and device.type == "cuda":
            torch.cuda.empty_cache()
            empty_host_cache()


def place_attention(model: object, device: torch.device | str) -> None:
    """Resolve ``model``'s attention backend for computing on ``device`` (models without attention: nothing).
    Callers that place a model without :func:`on_device` (FSDP shards) call this once it is placed."""
    resolve = getattr(module_of(model), "place_attention", None)
    if resolve is not None:
        resolve(device)


def _normalized(device: torch.device | str) -> torch.device:
    """A device with its index: tensors report ``cuda:0``, never ``cuda``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _move(module: nn.Module, device: torch.device, skip: Iterable[nn.Module] = ()) -> bool:
    """Move every parameter and buffer of ``module`` not on ``device`` there, except those of the
    modules in ``skip`` (and their children); whether anything moved. Parameters keep their identity
    (``.data`` is replaced), as ``nn.Module.to`` does."""
    skipped = {id(m) for s in skip for m in s.modules()}
    moved = False
    with torch.no_grad():
        for owner in module.modules():
            if id(owner) in skipped:
                continue
            for name, param in owner._parameters.items():
                if param is not None and param.device != device:
                    param.data = param.data.to(device)
                    moved = True
            for name, buffer in owner._buffers.items():
                if buffer is not None and buffer.device != device:
                    owner._buffers[name] = buffer.to(device)
                    moved = True
    return moved


def move_module(model: object, device: torch.device | str) -> bool:
    """Move all of ``model``'s weights to ``device`` now (a host's memory manager evicting it); whether
    anything moved. The CUDA cache is left to the caller (it may evict several models first)."""
    return _move(module_of(model), _normalized(device))
