"""The DiT's CUDA paths: graphs per compiled block, page-locked host bytes per swapped block, and the time of
one HR step for every attention backend that runs here, compiled and not. Runs once, after the stages.

Graphs: ``torch._dynamo.explain`` on block 0 of the HR DiT with the arguments its forward gives it and the
kernel of each backend resolved for the device (the goal: 1 graph, 0 breaks; before the kernel was carried
in the forward's state, flash and auto gave 11 graphs per block).

Pinned: the HR DiT's last N blocks (the first ``--swap-blocks`` value) swapped by a ``BlockSwap`` on the
model while it sits on the device; planned = the layout's bytes under the allocation's rounding rule
(``models.block_swap.pinned_bytes``), measured = the rise of ``locked_host_bytes()`` (registered buffers
plus torch's pinned cache) while the swap is on, per block, and its change once the swap is off (the
pages are released). On the CPU nothing is page-locked: planned and measured are 0.

HR step: ``hr_latent`` at the LR size (the DiT's shape at the anchor's token count; the 2K step is the HR
stage's), 1 warm-up + ``TIMED`` steps, per backend; then with every block compiled (the warm-up step
compiles). Compiled only on CUDA, and only while the budget lasts.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.models.attention import ATTENTION_BACKENDS, resolve_attention
from pixelwizard_core.models.block_swap import BlockSwap, locked_host_bytes, pinned_bytes
from pixelwizard_core.pipeline.placement import on_device
from pixelwizard_core.pipeline.stages import hr_latent

from .config import SEED
from .harness import Bench, run_steps
from .models import ROLES, build, specs
from .progress import log

BACKENDS = ("sdpa", "flash", "sage")
TIMED = 2
COMPILE_BUDGET_S = 120.0  # compiling 30 blocks and timing them: skipped with less left


def _hr_model(bench: Bench) -> torch.nn.Module:
    """The pool's HR DiT (CUDA), or one built for this section (the CPU's pool keeps none)."""
    model = bench.pool.models.get("hr")
    return model if model is not None else build(specs(bench.setup)["hr"], bench.device, SEED + ROLES.index("hr"))


@contextmanager
def _eager_blocks(model: torch.nn.Module) -> Iterator[None]:
    """The blocks uncompiled inside, as they were after (``--compile`` compiles them in the pool)."""
    compiled = [block._compiled_call_impl for block in model.blocks]
    for block in model.blocks:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, impl in zip(model.blocks, compiled):
            block._compiled_call_impl = impl


def _block_args(model: torch.nn.Module, run_once: Callable[[], object]) -> tuple:
    """Block 0's arguments in one forward of ``run_once`` (the first call)."""
    seen: dict = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
    try:
        run_once()
    finally:
        hook.remove()
    return seen["args"]


def graphs_per_block(block: torch.nn.Module, args: tuple, device: torch.device, dtype: torch.dtype) -> dict:
    """Per backend: the graphs and breaks of ``block`` compiled with that backend's kernel (or why not)."""
    import torch._dynamo

    tokens, state = args
    out = {}
    for name in ("auto", *BACKENDS):
        try:
            kernel = resolve_attention(name, device, dtype)
        except ConfigError as error:
            out[name] = {"status": "not available", "reason": str(error)[:300]}
            continue
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(block)(tokens, dataclasses.replace(state, attn=kernel))
        out[name] = {"status": "ok", "runs": kernel.name, "graphs": explained.graph_count,
                     "breaks": explained.graph_break_count,
                     "reasons": sorted({str(r.reason).splitlines()[0][:120] for r in explained.break_reasons})}
    torch._dynamo.reset()
    return out


def pinned_per_block(model: torch.nn.Module, device: torch.device, blocks: int) -> dict:
    """Planned and measured page-locked bytes per swapped block, and what is left once the swap is off."""
    blocks = min(blocks, len(model.blocks))
    with on_device(model, device, home=device):
        before = locked_host_bytes()
        swap = BlockSwap(model.blocks, blocks, device).enable()
        during = locked_host_bytes()
        sizes = swap.host_bytes()
        swap.disable(device)
        after = locked_host_bytes()
    return {"swapped_blocks": blocks, "method": sizes["method"], "stored_bytes": sizes["stored"],
            "buffer_bytes": sizes["buffer"], "planned_pinned_bytes": sizes["pinned"],
            "rounded_if_cached_bytes": pinned_bytes(sizes["buffer"], "cached"),
            "measured_pinned_bytes": (during - before) / blocks, "left_after_release_bytes": after - before}


def _step_seconds(bench: Bench, model: torch.nn.Module, settings, text, anchor) -> list[float]:
    return run_steps(bench.meter, lambda cb: hr_latent(model, anchor, text, settings, SEED, on_step=cb), 1 + TIMED)


def hr_steps(bench: Bench, model: torch.nn.Module, text, anchor) -> dict:
    """Seconds per HR step at the LR size for each backend, eager and (CUDA, within budget) compiled."""
    settings = dataclasses.replace(bench.setup.hr_settings(bench.setup.sizes[0]), width=bench.setup.lr.width,
                                   height=bench.setup.lr.height)
    out = {"width": settings.width, "height": settings.height, "frames": settings.frames, "tokens": settings.tokens}
    requested = model.attn_backend
    try:
        for name in (b for b in BACKENDS if b in ATTENTION_BACKENDS):
            out[name] = _backend_steps(bench, model, name, settings, text, anchor)
    finally:
        model.set_attention_backend(requested)
        model.place_attention(bench.device)
    return out


def _backend_steps(bench: Bench, model: torch.nn.Module, name: str, settings, text, anchor) -> dict:
    try:
        model.set_attention_backend(name)
        model.place_attention(bench.device)
    except ConfigError as error:
        return {"status": "not available", "reason": str(error)[:300]}
    record: dict = {"status": "ok"}
    with _eager_blocks(model):
        record["eager_seconds_per_step"] = statistics.median(_step_seconds(bench, model, settings, text, anchor)[1:])
    if not bench.cuda or bench.left() < COMPILE_BUDGET_S:
        record["compiled"] = "skipped: " + ("needs a GPU" if not bench.cuda else "time budget")
        return record
    import torch._dynamo

    torch._dynamo.reset()
    with _eager_blocks(model):
        model.compile_blocks()
        times = _step_seconds(bench, model, settings, text, anchor)
    record.update(compile_and_first_step_seconds=times[0], compiled_seconds_per_step=statistics.median(times[1:]))
    torch._dynamo.reset()
    return record


def run_cuda_paths(bench: Bench) -> None:
    """The section, into ``bench.data["cuda_paths"]`` (errors are recorded, never fatal)."""
    record: dict = {}
    try:
        model = _hr_model(bench)
        home = next(model.parameters()).device
        with on_device(model, bench.device, home=home):
            text, anchor = bench.text.to(bench.device), bench.anchor.to(bench.device)
            settings = dataclasses.replace(bench.setup.hr_settings(bench.setup.sizes[0]), steps=2,
                                           width=bench.setup.lr.width, height=bench.setup.lr.height)
            with _eager_blocks(model):
                args = _block_args(model, lambda: hr_latent(model, anchor, text, settings, SEED))
                record["graphs_per_block"] = graphs_per_block(model.blocks[0], args, bench.device,
                                                              model.attention_dtype())
            log(f"graphs per block: { {k: v.get('graphs') for k, v in record['graphs_per_block'].items()} }")
            record["hr_step"] = hr_steps(bench, model, text, anchor)
        record["pinned_per_block"] = pinned_per_block(model, bench.device, bench.setup.swap_blocks[0])
        with on_device(model, home, home=home):
            pass
    except Exception as error:  # noqa: BLE001 - reported in the JSON, the run goes on
        record["error"] = f"{type(error).__name__}: {error}"[:500]
        log(f"CUDA paths: ERROR {record['error']}")
    bench.data["cuda_paths"] = record
    bench.save()
