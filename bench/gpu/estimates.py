"""memory.py's per-stage memory estimate for each mode, to set beside the measured peaks."""

from __future__ import annotations

from pixelwizard_core.pipeline import memory

from .config import ORDERS, OVERLAP, Mode, Setup


def estimates(setup: Setup, mode: Mode, vae_precision: str) -> dict:
    """The memory model's per-stage estimate in this mode (bytes), from its own functions; real configs only."""
    if setup.small:
        return {}
    savings = memory.block_swap_savings(mode.swap_blocks) if mode.swap_blocks else 0
    weights = {"text": memory.weight_bytes("text"), "lr": memory.weight_bytes("lr") - savings,
               "hr": memory.weight_bytes("hr") - savings, "vae": memory.weight_bytes("vae", vae_precision=vae_precision)}
    resident = sum(weights.values())

    def peak(role: str, work: int) -> int:
        return (resident if mode.resident else weights[role]) + work

    out = {"text": peak("text", memory.T5_ACTIVATION_BYTES),
           "lr": peak("lr", memory.dit_activation_bytes(setup.lr.tokens, batch=2))}
    for size in setup.sizes:
        out[f"hr {size.label}"] = peak("hr", memory.dit_activation_bytes(setup.hr_settings(size).tokens))
        for order in ORDERS:
            work = memory.decode_bytes(size.width, size.height, num_patches=size.patches, overlap=OVERLAP,
                                       order=order, vae_precision=vae_precision)
            out[f"decode {size.label} {order}"] = peak("vae", work)
    return out
