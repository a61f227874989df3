"""Prompts -> DiT context: tokenize, run umT5 on all 512 positions, trim to the true length, zero-pad."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..loading.tokenizer import UMT5Tokenizer
from ..models.t5 import UMT5Encoder, context_for_dit
from .presets import WAN_NEGATIVE_PROMPT


@dataclass
class TextConditioning:
    """Context rows for the guided (positive) and unguided (negative) branch, [1, 512, 4096] each."""

    positive: torch.Tensor
    negative: torch.Tensor
    prompt: str
    negative_prompt: str

    def to(self, device: torch.device | str) -> "TextConditioning":
        return TextConditioning(self.positive.to(device), self.negative.to(device), self.prompt, self.negative_prompt)


class TextEncoder:
    """umT5 encoder and its tokenizer, used the way the official pipeline uses them."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: UMT5Tokenizer) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[len(prompts), text_len, dim] context, zero rows after each prompt's tokens (</s> included)."""
        ids, mask = self.tokenizer(list(prompts))
        device = next(self.encoder.parameters()).device
        hidden = self.encoder(ids.to(device), mask.to(device))
        return context_for_dit(hidden, mask.to(device), self.tokenizer.max_length)

    def conditioning(self, prompt: str, negative_prompt: str | None = None) -> TextConditioning:
        """Both branches of one prompt; an empty or missing negative prompt means Wan's default one."""
        negative_prompt = negative_prompt or WAN_NEGATIVE_PROMPT
        positive, negative = self.encode([prompt, negative_prompt]).split(1)
        return TextConditioning(positive, negative, prompt, negative_prompt)
