"""PixelWizard HR DiT: the Wan DiT plus shortcut step-size conditioning and the anchor-guided injector.

Keys (pixelwizard_hr_checkpoint.json without the ``model.`` prefix): the 825 base keys, ``dt_embedding.*``
(4) and ``spatial_adapter.*`` (18). The step-size conditioning is a replaceable component: researchers
register another ``StepSizeConditioning`` under a name and select it in the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn as nn
from einops import rearrange

from ..errors import ConfigError
from .dit import DiTConfig, WanDiT
from .layers import Conv3d, FP32Linear, GroupNorm, LayerNorm, Linear, mlp, sinusoidal_embedding
from .parallel import SequenceParallel

INJECTED_BLOCK = 1  # the reference injects the anchor before block 1 only


class StepSizeConditioning(nn.Module, ABC):
    """How the model is told the size of the shortcut step it must take.

    ``signal`` is the scalar per sample that describes the step (the reference: dt on the 0..1000
    timestep scale); ``forward`` is the embedding added to the time embedding before
    ``time_projection``. The injector's gate sees the sinusoid of the same signal.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.freq_dim = config.freq_dim

    @abstractmethod
    def signal(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """[B] scalar describing the step from timestep ``t`` with step size ``dt``."""

    @abstractmethod
    def forward(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """[B, dim] float32 embedding added to the time embedding."""

    def features(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """[B, freq_dim] float32 sinusoid of the step signal."""
        return sinusoidal_embedding(self.freq_dim, self.signal(t, dt)).float()


class SinusoidalStepSize(StepSizeConditioning):
    """The reference: sinusoid of dt -> Linear, SiLU, Linear (keys ``dt_embedding.{0,2}``)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__(config)
        layers = mlp(config.freq_dim, config.dim, nn.SiLU(), FP32Linear)
        for name, layer in layers.named_children():
            self.add_module(name, layer)
        nn.init.zeros_(self[2].weight)  # a fresh conditioning starts as a no-op (training init)
        nn.init.zeros_(self[2].bias)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def signal(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        return dt

    def forward(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        return self[2](self[1](self[0](self.features(t, dt))))


class LogSNRSpanStepSize(SinusoidalStepSize):
    """Alternative: condition on the log-SNR span of the step instead of dt itself.

    t and dt live on the 0..1000 scale where sigma = t / 1000, both in training (t = 1000 * sigma on the
    shifted grid) and in sampling, so the plain noise span sigma(t) - sigma(t - dt) is dt / 1000 and
    tells the model nothing new. The log-SNR span lambda(t - dt) - lambda(t), lambda = ln((1 - sigma) /
    sigma), does: the same dt is a small step near sigma 1 and a large one near 0. It is scaled by
    ``SCALE`` so typical steps (0.1 .. 10) cover the range the sinusoid resolves, as dt (2 .. 1000) does.
    Same layers and keys as the default (``dt_embedding.{0,2}``); dt = 0 (flow matching) gives 0.
    """

    SCALE = 100.0
    SIGMA_CLAMP = 1e-3  # the end of the training grid; keeps lambda finite at sigma 0 and 1

    def signal(self, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        t64, dt64 = t.double(), dt.double()
        start = self._log_snr(t64 / 1000)
        end = self._log_snr((t64 - dt64).clamp_min(0) / 1000)
        return torch.where(dt64 > 0, (end - start) * self.SCALE, torch.zeros_like(t64))

    def _log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.clamp(self.SIGMA_CLAMP, 1 - self.SIGMA_CLAMP)
        return torch.log1p(-sigma) - torch.log(sigma)


STEP_SIZE_CONDITIONINGS: dict[str, Callable[[DiTConfig], StepSizeConditioning]] = {
    "sinusoidal": SinusoidalStepSize,
    "log_snr_span": LogSNRSpanStepSize,
}
# Metadata key under which a checkpoint records the conditioning it was trained with.
STEP_SIZE_CONDITIONING_KEY = "step_size_conditioning"


def register_step_size_conditioning(name: str, factory: Callable[[DiTConfig], StepSizeConditioning]) -> None:
    """Make a new step-size conditioning selectable by name (training and sampling)."""
    STEP_SIZE_CONDITIONINGS[name] = factory


class AnchorInjector(nn.Module):
    """The anchor-guided injector (reference ``spatial_adapter``).

    control = W( LayerNorm(backbone(anchor)) * (1 + tanh(P_t(SinEmb t) + P_dt(SinEmb dt))) ) + b,
    added to the input of block 1. The anchor must already be at the token grid (H/32, W/32).
    Runs in its own parameter dtype (float32 by default, as the reference keeps it), norms in float32.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        mid = config.dim // 4
        self.backbone = nn.Sequential(
            Conv3d(config.in_dim, mid, kernel_size=1),
            GroupNorm(16, mid),
            nn.SiLU(),
            Conv3d(mid, config.dim, kernel_size=3, padding=1),
            nn.SiLU(),
        )
        self.feature_norm = LayerNorm(config.dim, eps=1e-6, elementwise_affine=True)
        self.adapter_time_proj = mlp(config.freq_dim, config.dim, nn.SiLU())
        self.adapter_dt_proj = mlp(config.freq_dim, config.dim, nn.SiLU())
        nn.init.zeros_(self.adapter_dt_proj[2].weight)
        nn.init.zeros_(self.adapter_dt_proj[2].bias)
        self.zero_layers = nn.ModuleDict({str(INJECTED_BLOCK): Linear(config.dim, config.dim)})

    def forward(self, anchor: torch.Tensor, t_features: torch.Tensor, dt_features: torch.Tensor) -> torch.Tensor:
        """Control [B, L, dim] added to the input of block 1."""
        features = rearrange(self.backbone(anchor), "b c f h w -> b (f h w) c")  # F-H-W order, as the tokens
        gate = torch.tanh(self.adapter_time_proj(t_features) + self.adapter_dt_proj(dt_features))
        gated = self.feature_norm(features).float() * (1 + gate.float().unsqueeze(1))
        return self.zero_layers[str(INJECTED_BLOCK)](gated)


class WanHRDiT(WanDiT):
    """PixelWizard HR model: velocity from latent, timestep, step size dt, text and the LR anchor."""

    def __init__(self, config: DiTConfig = DiTConfig(), step_size_conditioning: str = "sinusoidal") -> None:
        super().__init__(config)
        if step_size_conditioning not in STEP_SIZE_CONDITIONINGS:
            raise ConfigError(
                f"unknown step-size conditioning {step_size_conditioning!r}; "
                f"registered: {', '.join(sorted(STEP_SIZE_CONDITIONINGS))}"
            )
        self.step_size_conditioning = step_size_conditioning
        self.dt_embedding = STEP_SIZE_CONDITIONINGS[step_size_conditioning](config)
        self.spatial_adapter = AnchorInjector(config)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        dt: torch.Tensor,
        anchor: torch.Tensor,
        sp: SequenceParallel | None = None,
    ) -> torch.Tensor:
        """``t`` and ``dt`` are [B] (one value per sample, the reference's constant per-token tensors), or
        ``t`` is [B, L] per token (a start image pinned as frame 0: its tokens at 0, the others at the step's
        t, which then conditions the step size and the injector); ``anchor`` [B, in_dim, T, H/2, W/2] is the LR
        latent resized to the token grid."""
        self._check_anchor(x, anchor)
        t, dt = t.float(), dt.float()
        step_t = t if t.dim() == 1 else t.amax(dim=1)
        step_e = self.dt_embedding(step_t, dt)
        e = self.time_embedding_of(t) + (step_e if t.dim() == 1 else step_e.unsqueeze(1))
        t_features = sinusoidal_embedding(self.config.freq_dim, step_t).float()
        dt_features = self.dt_embedding.features(step_t, dt)

        def control() -> torch.Tensor:  # made when block 1 needs it, dropped right after
            return self.spatial_adapter(anchor, t_features, dt_features)

        return self.run(x, e, context, sp=sp, block_inputs={INJECTED_BLOCK: control})

    def _check_anchor(self, x: torch.Tensor, anchor: torch.Tensor) -> None:
        self._check_latent(x)
        _, ph, pw = self.config.patch_size
        expected = (x.shape[0], self.config.in_dim, x.shape[2], x.shape[3] // ph, x.shape[4] // pw)
        if tuple(anchor.shape) != expected:
            raise ConfigError(
                f"anchor has shape {tuple(anchor.shape)}; the HR latent {tuple(x.shape)} needs {list(expected)}: "
                "resize the LR anchor per frame to the token grid (H/32, W/32 in pixels) first"
            )
