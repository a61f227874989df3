"""What is benchmarked: the model configs and stage sizes (real or ``--small``) and the memory modes."""

from __future__ import annotations

from dataclasses import dataclass

from pixelwizard_core.models.dit import DiTConfig
from pixelwizard_core.models.t5 import T5Config
from pixelwizard_core.models.vae import VAEConfig
from pixelwizard_core.pipeline.presets import HR_CFG, HR_PRESETS, LR_DEFAULTS, StageSettings
from pixelwizard_core.pipeline.tile_plan import ORDERS  # noqa: F401 (the stages import it from here)

GIB = 2**30
SEED = 0
OVERLAP = 3  # latent columns added on each interior side of a decode tile (the reference's default)


@dataclass(frozen=True)
class HRSize:
    label: str
    width: int
    height: int
    shift: float
    steps: int
    patches: int  # decode tiles along the width


@dataclass(frozen=True)
class Setup:
    """Model configs and stage sizes: the real ones, or tiny ones for the CPU (``--small``)."""

    dit: DiTConfig
    t5: T5Config
    vae: VAEConfig
    lr: StageSettings
    sizes: tuple[HRSize, ...]
    prompt_tokens: tuple[int, int]  # true lengths of the prompt and the negative prompt (of text_len)
    swap_blocks: tuple[int, ...]
    small: bool

    @property
    def frames(self) -> int:
        return self.lr.frames

    def hr_settings(self, size: HRSize) -> StageSettings:
        return StageSettings(size.width, size.height, self.frames, size.steps, size.shift, HR_CFG)


def real_setup() -> Setup:
    sizes = tuple(HRSize(name, p.width, p.height, p.shift, p.steps, p.decode_patches) for name, p in HR_PRESETS.items())
    # the Wan default negative prompt is ~120 umT5 tokens; a typical prompt about as long
    return Setup(DiTConfig(), T5Config(), VAEConfig(), LR_DEFAULTS, sizes, (120, 126), (10, 20), False)


def small_setup() -> Setup:
    """Real structure (48 latent channels, head_dim 64, 4 DiT blocks), tiny widths; weights of a few MB each
    so that which models are resident shows clearly in the resident set."""
    dit = DiTConfig(dim=256, ffn_dim=1024, freq_dim=64, num_heads=4, num_layers=4, text_len=64, text_dim=128)
    t5 = T5Config(vocab=8192, dim=128, dim_attn=128, dim_ffn=512, num_heads=4, num_layers=2, text_len=64)
    lr = StageSettings(width=128, height=64, frames=9, steps=50, shift=5.0, cfg=5.0)
    sizes = (HRSize("2k", 256, 160, 5.5, 4, 3), HRSize("4k", 384, 224, 5.8, 4, 4))
    return Setup(dit, t5, VAEConfig.tiny(), lr, sizes, (20, 24), (1, 2), True)


@dataclass(frozen=True)
class Mode:
    """A memory mode: where models wait between stages, and how many DiT blocks are streamed."""

    name: str  # gpu | offload | block_swap
    swap_blocks: int = 0

    @property
    def key(self) -> str:
        return f"block_swap_{self.swap_blocks}" if self.swap_blocks else self.name

    @property
    def resident(self) -> bool:
        return self.name == "gpu"


def mode_list(names: list[str], setup: Setup) -> list[Mode]:
    """The modes named (first occurrence kept), block_swap expanded to one mode per swap-block count."""
    modes: list[Mode] = []
    for name in dict.fromkeys(names):
        modes += [Mode(name, n) for n in setup.swap_blocks] if name == "block_swap" else [Mode(name)]
    return modes
