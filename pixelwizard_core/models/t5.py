"""umT5-XXL text encoder of Wan2.2 (encoder half only) and the step from its output to DiT context.

Parameter names are those of the official checkpoint ``models_t5_umt5-xxl-enc-bf16.pth``
(``token_embedding``, ``blocks.N.{norm1,attn,norm2,ffn,pos_embedding}``, ``norm``); the Hugging Face /
Comfy-Org names are renamed by the loader. The arithmetic follows the official module operation by
operation, because the encoder runs in pure bf16 there (no autocast) and every intermediate rounding
shows in the result:

- T5 layer norm: RMS in float32, then cast to the weight dtype, then times the weight.
- attention: no 1/sqrt(d) scaling (T5), logits + bias in the activation dtype, softmax in float32 and
  cast back; the bias is the layer's own relative-position bias (umT5: one table per layer) with padded
  keys set to the dtype's most negative finite value.
- feed-forward: gated GELU, the GELU written with the tanh formula term by term.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, WeightFormatError

_EPS = 1e-6


@dataclass(frozen=True)
class T5Config:
    """Shape of the encoder. Defaults are umT5-XXL as Wan2.2 uses it."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    text_len: int = 512
    max_distance: int = 128

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ConfigError(
                f"T5Config: dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}; "
                "choose a head count that divides it")
        if self.num_buckets % 2:
            raise ConfigError(
                f"T5Config: num_buckets must be even (half per direction), got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def tiny(cls, **overrides: object) -> "T5Config":
        """A few-kilobyte encoder with the umT5 traits, for tests. dim_attn differs from dim on purpose."""
        base = cls(vocab=384, dim=32, dim_attn=48, dim_ffn=80, num_heads=4, num_layers=2)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], text_len: int = 512) -> "T5Config":
        """Read the shape from a state dict in the official names."""
        try:
            vocab, dim = state_dict["token_embedding.weight"].shape
            dim_attn = state_dict["blocks.0.attn.q.weight"].shape[0]
            dim_ffn = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
        except KeyError as missing:
            raise WeightFormatError(
                f"not a umT5 encoder state dict in the official names: key {missing} is absent "
                "(rename Hugging Face / Comfy keys first)") from None
        shared_pos = "pos_embedding.embedding.weight" in state_dict
        pos_key = "pos_embedding.embedding.weight" if shared_pos else "blocks.0.pos_embedding.embedding.weight"
        num_buckets, num_heads = state_dict[pos_key].shape
        layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
        return cls(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                   num_layers=max(layers) + 1, num_buckets=num_buckets, shared_pos=shared_pos,
                   text_len=text_len)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Bidirectional T5 bucket of every (query, key) pair: [length, length] int64.

    Half the buckets are for keys after the query. Within a half, distances below a quarter of
    num_buckets get a bucket each; larger ones share log-spaced buckets up to max_distance, beyond
    which they all fall in the last one. The float32 log expression keeps the official operation order
    so that distances on a bucket boundary round the same way.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # key position minus query position
    return bucket_of_distance(rel, num_buckets, max_distance)


def bucket_of_distance(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each signed distance (key minus query position), same shape as ``rel``."""
    half = num_buckets // 2
    exact = half // 2
    offset = (rel > 0).long() * half
    dist = rel.abs()
    scaled = torch.log(dist.clamp_min(1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    log_bucket = (exact + scaled.long()).clamp_max(half - 1)
    return offset + torch.where(dist < exact, dist, log_bucket)


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # The official encoder pulls fp16 overflow back into range after every residual add.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm: statistics in float32, rounded to the weight dtype before the scale."""

    def __init__(self, dim: int, eps: float = _EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


class T5RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head); turns a bucket table into a [1, heads, Lq, Lk] bias."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention without q.k scaling; the caller supplies the additive bias."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, length, _ = t.shape
        return t.view(b, length, self.num_heads, -1).transpose(1, 2)  # [B, heads, L, head_dim]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = torch.matmul(weights, v).transpose(1, 2)
        return self.o(out.reshape(x.shape[0], x.shape[1], -1))


class TanhGELU(nn.Module):
    """GELU, tanh approximation, evaluated term by term (not the fused kernel) to round like the official."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return 0.5 * x * (1.0 + torch.tanh(inner))


class T5FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu(gate(x))). ``gate`` is a Sequential so its key is ``gate.0.weight``."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """Pre-norm encoder layer: attention then feed-forward, each added back to the residual stream."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        # umT5 (shared_pos False) learns a relative-position table per layer.
        self.pos_embedding = None if cfg.shared_pos else T5RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None, buckets: torch.Tensor,
                shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        pos_bias = shared_bias if self.pos_embedding is None else self.pos_embedding(buckets)
        bias = _attention_bias(pos_bias, keep, x.dtype)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


def _attention_bias(pos_bias: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Position bias in the activation dtype, padded keys replaced by that dtype's lowest finite value."""
    pos_bias = pos_bias.to(dtype)
    if keep is None:
        return pos_bias
    return pos_bias.masked_fill(~keep, torch.finfo(dtype).min)


class UMT5Encoder(nn.Module):
    """umT5 encoder: token ids [B, L] and attention mask [B, L] -> hidden states [B, L, dim].

    Padded positions still produce rows (as in the official model); take the rows of real tokens with
    :func:`trim_context` or :func:`context_for_dit`.
    """

    def __init__(self, cfg: T5Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or T5Config()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_embedding = T5RelativePositionBias(cfg.num_buckets, cfg.num_heads) if cfg.shared_pos else None
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(ids, mask)
        x = self.token_embedding(ids)
        buckets = relative_position_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_distance, ids.device)
        keep = None if mask is None else (mask != 0)[:, None, None, :]  # [B, 1, 1, Lk]
        shared = None if self.pos_embedding is None else self.pos_embedding(buckets)
        for block in self.blocks:
            x = block(x, keep, buckets, shared)
        return self.norm(x)

    def _check_inputs(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"UMT5Encoder expects integer token ids [batch, length], got {ids.dtype} "
                              f"{tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ConfigError(f"UMT5Encoder: mask shape {tuple(mask.shape)} differs from ids shape "
                              f"{tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab):
            raise ConfigError(
                f"UMT5Encoder: token ids span [{int(ids.min())}, {int(ids.max())}] but the vocabulary has "
                f"{self.cfg.vocab} rows; the tokenizer does not belong to this encoder")


def trim_context(hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Rows of real tokens per prompt: ``hidden[i, :mask[i].sum()]`` (the count includes </s>).

    This is what the official text encoder hands to the pipeline.
    """
    lengths = mask.gt(0).sum(dim=1).tolist()
    return [h[:n] for h, n in zip(hidden, lengths)]


def pad_context(trimmed: Sequence[torch.Tensor], text_len: int = 512) -> torch.Tensor:
    """Stack trimmed prompts into [B, text_len, dim], zero rows after each prompt, as the DiT does."""
    longest = max(t.shape[0] for t in trimmed)
    if longest > text_len:
        raise ConfigError(f"a prompt has {longest} tokens but the context holds {text_len}; "
                          "tokenize with max_length <= text_len")
    out = trimmed[0].new_zeros(len(trimmed), text_len, trimmed[0].shape[-1])
    for row, t in zip(out, trimmed):
        row[: t.shape[0]] = t
    return out


def context_for_dit(hidden: torch.Tensor, mask: torch.Tensor, text_len: int = 512) -> torch.Tensor:
    """Encoder output -> DiT context [B, text_len, dim]: each prompt trimmed to its tokens, zero-padded."""
    return pad_context(trim_context(hidden, mask), text_len)
