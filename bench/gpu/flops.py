"""FLOPs of a DiT forward, to read step times as a rate and to predict steps not yet measured."""

from __future__ import annotations

from pixelwizard_core.models.dit import DiTConfig


def dit_forward_flops(config: DiTConfig, tokens: int, batch: int = 1, injector: bool = False) -> float:
    """Multiply-adds x 2 of one DiT forward (the architecture note's §7.1 count, with our single modulation
    row): the blocks' Linears, self-attention (4 L^2 d), cross-attention to text_len rows, and the HR
    injector's convolutions when ``injector``."""
    d, f, n, text = config.dim, config.ffn_dim, config.num_layers, config.text_len
    linear = 2 * tokens * (6 * d * d + 2 * d * f) + 2 * text * 2 * d * d
    attention = 4 * tokens * tokens * d + 4 * tokens * text * d
    total = n * (linear + attention) + 2 * tokens * d * (config.in_dim * 4 + config.out_dim * 4)
    if injector:
        mid = d // 4
        total += 2 * tokens * (config.in_dim * mid + 27 * mid * d + d * d)
    return float(batch * total)
