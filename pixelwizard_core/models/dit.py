"""Wan2.2-TI2V-5B diffusion transformer (official ``WanModel``, t2v/ti2v path), our implementation.

Keys and shapes are the official ones (tests/manifests/wan2.2_ti2v_5b_dit.json). Numerics follow the
official bf16 pipeline (PixelWizard always converts the DiT to bf16): Linears compute in the parameter
dtype, the time embedding, modulation, norms and head in float32, the residual stream in float32.

Deviations for memory, with identical values: one timestep per sample gives one modulation row that is
broadcast over the tokens, instead of the official per-token copies (8 GB at 2K, 18 GB at 4K); at inference
the FFN, the cross-attention and the q/k projections with their norms and RoPE run over the tokens in chunks, so their float32
and [L, ffn_dim] temporaries never exist whole; the modulated block inputs are cast once to the Linears'
dtype (each Linear cast them anyway); and the anchor control exists only while block 1 takes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

from ..errors import ConfigError
from .attention import AttentionKernel, attention, check_backend_name, indexed, resolve_attention
from .layers import Conv3d, FP32Linear, LayerNorm, Linear, RMSNorm, mlp, sinusoidal_embedding
from .parallel import SequenceParallel, check_degree, shard_tokens
from .rope import apply_rope, rope_cos_sin

FFN_CHUNK_BYTES = 512 * 2**20  # budget of one FFN chunk's hidden layer and GELU output at inference


def over_token_chunks(fn: Callable[..., torch.Tensor], chunk: int, x: torch.Tensor,
                      *per_token: torch.Tensor) -> torch.Tensor:
    """``fn(x, *per_token)`` computed ``chunk`` tokens at a time into one output (0: all at once).

    ``x`` is [B, L, ...]; each of ``per_token`` has its token axis at dim 1 too, of size L (sliced with
    ``x``) or 1 (broadcast, e.g. one modulation row). For row-wise ``fn`` the result equals the unchunked one."""
    length = x.shape[1]
    if not chunk or length <= chunk:
        return fn(x, *per_token)
    out = None
    for start in range(0, length, chunk):
        part = slice(start, start + chunk)
        piece = fn(x[:, part], *(t[:, part] if t.shape[1] == length else t for t in per_token))
        if out is None:
            out = piece.new_empty((piece.shape[0], length, *piece.shape[2:]))
        out[:, part] = piece
    return out


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, heads * head_dim] -> [B, L, heads, head_dim] (the layout every attention backend takes)."""
    return rearrange(x, "b l (n d) -> b l n d", n=num_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, L, heads, head_dim] -> [B, L, heads * head_dim]: the inverse of :func:`split_heads`."""
    return rearrange(x, "b l n d -> b l (n d)")


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 3072
    ffn_dim: int = 14336
    freq_dim: int = 256
    num_heads: int = 24
    num_layers: int = 30
    in_dim: int = 48
    out_dim: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def tiny(cls, **overrides) -> "DiTConfig":
        """A small config for tests: same structure, head_dim 16 (8 RoPE pairs split 4/2/2)."""
        values = dict(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, in_dim=8, out_dim=8,
                      text_len=16, text_dim=24)
        values.update(overrides)
        return cls(**values)


@dataclass
class TokenState:
    """Everything the blocks share within one forward call."""

    e0: torch.Tensor  # [B, 1 or L_local, 6, dim] float32 modulation from the time embedding
    context: torch.Tensor  # [B, text_len, dim] embedded text
    cos: torch.Tensor  # [L_local, head_dim/2] float32 RoPE
    sin: torch.Tensor
    seq_len: int  # true token count (keys beyond it are padding)
    sp: SequenceParallel | None
    attn: AttentionKernel  # resolved at placement: compiled blocks call it, never look a backend up
    chunk: int = 0  # tokens per chunk of the row-wise parts (q/k, cross-attention, FFN); 0: all at once


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        tables = state.cos[None], state.sin[None]  # token axis at dim 1, as x
        q = over_token_chunks(self._rotated(self.q, self.norm_q), state.chunk, x, *tables)
        k = over_token_chunks(self._rotated(self.k, self.norm_k), state.chunk, x, *tables)
        v = split_heads(self.v(x), self.num_heads)
        if state.sp is not None:
            q, k, v = (state.sp.tokens_to_heads(t) for t in (q, k, v))
        out = attention(q, k, v, k_len=state.seq_len, backend=state.attn)
        if state.sp is not None:
            out = state.sp.heads_to_tokens(out)
        return self.o(merge_heads(out))

    def _rotated(self, linear: Linear, norm: RMSNorm) -> Callable[..., torch.Tensor]:
        """Projection, RMSNorm and RoPE of some tokens, in the Linears' dtype (as official before attention)."""
        def project(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            heads = split_heads(norm(linear(x)), self.num_heads)
            return apply_rope(heads, cos[0], sin[0]).to(self.v.compute_dtype)
        return project


class CrossAttention(SelfAttention):
    """Attention from video tokens to all text_len context rows (no RoPE, no key mask: as official)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn: AttentionKernel) -> torch.Tensor:
        q = split_heads(self.norm_q(self.q(x)), self.num_heads)
        k = split_heads(self.norm_k(self.k(context)), self.num_heads)
        v = split_heads(self.v(context), self.num_heads)
        return self.o(merge_heads(attention(q, k, v, backend=attn)))


class AttentionBlock(nn.Module):
    """Self-attention and FFN modulated 6 ways by the time embedding; cross-attention in between."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        # chunk order: shift, scale, gate (attention), shift, scale, gate (FFN)
        mod = (self.modulation.float().unsqueeze(0) + state.e0).unbind(dim=2)
        attn_in = (self.norm1(x).float() * (1 + mod[1]) + mod[0]).to(self.self_attn.q.compute_dtype)
        x = x + self.self_attn(attn_in, state) * mod[2]
        del attn_in
        x = over_token_chunks(self._cross_residual(state), state.chunk, x)  # each token attends on its own
        return over_token_chunks(self._ffn_residual, state.chunk, x, *mod[3:])

    def _cross_residual(self, state: TokenState) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: x + self.cross_attn(self.norm3(x), state.context, state.attn)

    def _ffn_residual(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ffn_in = (self.norm2(x).float() * (1 + scale) + shift).to(self.ffn[0].compute_dtype)
        return x + self.ffn(ffn_in) * gate


class Head(nn.Module):
    """Output projection modulated by the time embedding e (not e0), in float32."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(config.dim, config.eps)
        self.head = FP32Linear(config.dim, math.prod(config.patch_size) * config.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(dim=2)
        return self.head(self.norm(x.float()) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """The Wan2.2 DiT: latent [B, 48, T, H, W] + timestep + text context -> flow velocity."""

    def __init__(self, config: DiTConfig = DiTConfig()) -> None:
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ConfigError(f"dim {config.dim} must split into {config.num_heads} heads of even size")
        self.config = config
        self.attn_backend = "auto"  # what was asked for; attn_kernel: what runs, for one device and dtype
        self.attn_kernel: AttentionKernel | None = None
        self.ffn_chunk_bytes = FFN_CHUNK_BYTES  # 0: never chunk (the straightforward path)
        self.patch_embedding = Conv3d(config.in_dim, config.dim, config.patch_size, stride=config.patch_size)
        self.text_embedding = mlp(config.text_dim, config.dim, nn.GELU(approximate="tanh"))
        self.time_embedding = mlp(config.freq_dim, config.dim, nn.SiLU(), FP32Linear)
        self.time_projection = nn.Sequential(nn.SiLU(), FP32Linear(config.dim, 6 * config.dim))
        self.blocks = nn.ModuleList(AttentionBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)

    def set_attention_backend(self, backend: str) -> None:
        """Force a registered backend ("sdpa", "flash", ...), or let "auto" pick the fastest that runs.

        Resolved now where the weights are when they are where the model will compute (on a GPU, or on a
        machine without one), so a wrong choice fails before sampling; a model waiting on the CPU of a GPU
        machine is resolved when it is placed (:meth:`place_attention`)."""
        check_backend_name(backend)
        device = self.patch_embedding.weight.device
        settled = device.type != "meta" and (device.type != "cpu" or not torch.cuda.is_available())
        kernel = resolve_attention(backend, device, self.attention_dtype()) if settled else None
        self.attn_backend, self.attn_kernel = backend, kernel

    def place_attention(self, device: torch.device | str) -> AttentionKernel:
        """The attention kernel for computing on ``device``, resolved once per device and dtype and kept:
        every forward carries it to the blocks, so compiled blocks never look a backend up.
        :func:`pixelwizard_core.pipeline.placement.on_device` calls this when it places the model."""
        device, dtype = indexed(device), self.attention_dtype()
        kernel = self.attn_kernel
        if kernel is None or kernel.device != device or kernel.dtype != dtype:
            kernel = self.attn_kernel = resolve_attention(self.attn_backend, device, dtype)
        return kernel

    def attention_dtype(self) -> torch.dtype:
        """The dtype attention computes in: the blocks' Linears' (bf16 for fp8-stored weights)."""
        if len(self.blocks):
            return self.blocks[0].self_attn.v.compute_dtype
        return self.patch_embedding.weight.dtype

    def ffn_chunk_tokens(self, batch: int) -> int:
        """Tokens per FFN chunk within ``ffn_chunk_bytes`` (0: no chunking). Training keeps whole
        sequences: autograd saves every chunk's activations anyway."""
        if not self.ffn_chunk_bytes or torch.is_grad_enabled():
            return 0
        width = self.blocks[0].ffn[0].weight if len(self.blocks) else self.head.head.weight
        per_token = 2 * batch * self.config.ffn_dim * max(width.element_size(), 2)  # hidden + GELU output
        return max(1, self.ffn_chunk_bytes // per_token)

    def compile_blocks(self, **options) -> None:
        """torch.compile each transformer block (same weights and numerics; the first call compiles)."""
        for block in self.blocks:
            block.compile(**options)

    # --- embeddings -------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, T, H, W] -> tokens [B, L, dim] in F-H-W order, and the token grid."""
        self._check_latent(x)
        y = self.patch_embedding(x)
        return rearrange(y, "b c f h w -> b (f h w) c"), tuple(y.shape[2:])

    def time_embedding_of(self, t: torch.Tensor) -> torch.Tensor:
        """Time embedding e [B, dim] (t [B]) or [B, L, dim] (t [B, L]), float32."""
        features = sinusoidal_embedding(self.config.freq_dim, t.flatten()).float()
        return self.time_embedding(features).unflatten(0, t.shape)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Zero-pad context rows to text_len (the padded rows are attended, as official) and embed."""
        batch, rows, width = context.shape
        if width != self.config.text_dim or rows > self.config.text_len:
            raise ConfigError(
                f"text context has shape {tuple(context.shape)}; expected [B, <= {self.config.text_len}, "
                f"{self.config.text_dim}] from the umT5 encoder"
            )
        if rows < self.config.text_len:
            context = torch.cat([context, context.new_zeros(batch, self.config.text_len - rows, width)], dim=1)
        return self.text_embedding(context)

    # --- forward ----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        sp: SequenceParallel | None = None,
    ) -> torch.Tensor:
        """Velocity [B, out_dim, T, H, W] float32 for latent ``x``, timesteps ``t`` ([B] or [B, L]),
        text ``context`` [B, rows, text_dim]; ``sp`` splits the tokens over a sequence-parallel group."""
        return self.run(x, self.time_embedding_of(t), context, sp=sp)

    def run(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        *,
        sp: SequenceParallel | None = None,
        block_inputs: Mapping[int, torch.Tensor | Callable[[], torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Forward from a ready time embedding ``e``; ``block_inputs[i]`` ([B, L, dim], or a function that
        makes it, called just before block i so it never coexists with the earlier blocks' work) is added
        to the input of block i (the HR model's anchor injection)."""
        if sp is not None:
            check_degree(self.config.num_heads, sp.world_size)
        tokens, grid = self.patchify(x)
        seq_len = tokens.shape[1]
        e = e if e.dim() == 3 else e.unsqueeze(1)  # [B, 1 or L, dim]
        cos, sin = rope_cos_sin(grid, self.config.head_dim, device=tokens.device)
        if sp is not None:
            tokens = shard_tokens(tokens, sp)
            cos = shard_tokens(cos[None], sp, pad_value=1.0)[0]  # padded rows rotate by identity
            sin = shard_tokens(sin[None], sp)[0]
            if e.shape[1] > 1:
                e = shard_tokens(e, sp)
        state = TokenState(
            e0=self.time_projection(e).unflatten(2, (6, self.config.dim)),
            context=self.embed_text(context),
            cos=cos,
            sin=sin,
            seq_len=seq_len,
            sp=sp,
            attn=self.place_attention(tokens.device),
            chunk=self.ffn_chunk_tokens(tokens.shape[0]),
        )
        pending = dict(block_inputs or {})
        for index, block in enumerate(self.blocks):
            if index in pending:
                extra = pending.pop(index)
                extra = extra() if callable(extra) else extra
                tokens = tokens + (shard_tokens(extra, sp) if sp is not None else extra).to(tokens.dtype)
                del extra
            tokens = block(tokens, state)
        out = self.head(tokens, e)
        if sp is not None:
            out = sp.gather_tokens(out)[:, :seq_len]
        return self.unpatchify(out, grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, prod(patch) * out_dim] -> [B, out_dim, T*pt, H*ph, W*pw] float32."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        return rearrange(tokens, "b (f h w) (p q r c) -> b c (f p) (h q) (w r)", f=f, h=h, w=w, p=pt, q=ph,
                         r=pw).float()

    def _check_latent(self, x: torch.Tensor) -> None:
        pt, ph, pw = self.config.patch_size
        if x.dim() != 5 or x.shape[1] != self.config.in_dim:
            raise ConfigError(
                f"latent has shape {tuple(x.shape)}; expected [B, {self.config.in_dim}, T, H, W] (Wan2.2 latents)"
            )
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ConfigError(
                f"latent size T={x.shape[2]} H={x.shape[3]} W={x.shape[4]} is not divisible by the patch "
                f"{self.config.patch_size}: pixel height and width must be multiples of 32"
            )
