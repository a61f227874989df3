"""Multi-GPU nodes: describe a worker pool (started by the first node that uses it) and shut it down."""

from __future__ import annotations

from pixelwizard_core.distributed.pool import PoolSpec, parse_devices, shutdown_all
from pixelwizard_core.distributed.session import BACKENDS

from .types import CATEGORY, PW_POOL


class PixelWizardMultiGPU:
    DESCRIPTION = ("Run the PixelWizard stages on several GPUs: one persistent worker process per GPU (torch.distributed), "
                   "models kept loaded between runs. Ulysses splits each video's tokens over the GPUs (faster); FSDP "
                   "shards the weights (less memory per GPU). Connect it to the text encoder, samplers and decoders.")
    CATEGORY = CATEGORY
    FUNCTION = "configure"
    RETURN_TYPES = (PW_POOL,)
    RETURN_NAMES = ("pool",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "devices": ("STRING", {"default": "2", "tooltip": "number of GPUs (2 = GPUs 0 and 1) or GPU indices (0,2,3)"}),
            "ulysses": ("INT", {"default": 2, "min": 1, "max": 24,
                                "tooltip": "sequence-parallel degree: 1, or the number of GPUs (must divide 24: 2, 3, 4, 6, 8)"}),
            "dit_fsdp": ("BOOLEAN", {"default": False, "tooltip": "shard the DiT weights over the GPUs (about 10 GB less each)"}),
            "t5_fsdp": ("BOOLEAN", {"default": False, "tooltip": "shard the umT5 text encoder over the GPUs"}),
            "backend": (list(BACKENDS), {"default": "auto", "tooltip": BACKENDS.choices_text()}),
        }, "optional": {
            "timeout_minutes": ("INT", {"default": 0, "min": 0, "max": 1440,
                                        "tooltip": "fail a stage that runs longer than this (0: no limit)"}),
        }}

    def configure(self, devices, ulysses, dit_fsdp, t5_fsdp, backend, timeout_minutes=0):
        timeout = timeout_minutes * 60.0 if timeout_minutes else None
        return (PoolSpec(parse_devices(devices), ulysses, dit_fsdp, t5_fsdp, backend, timeout),)


class PixelWizardPoolShutdown:
    DESCRIPTION = ("Stop every PixelWizard worker process and free their GPU memory (the next run starts fresh ones). "
                   "Connect 'after' to the last output so it runs at the end of the workflow.")
    CATEGORY = CATEGORY
    FUNCTION = "shutdown"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    RETURN_NAMES = ()

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"pool": (PW_POOL, {"tooltip": "the pool to stop (every pool of this server stops)"})},
                "optional": {"after": ("*", {"tooltip": "any output: makes this node run after it"})}}

    @classmethod
    def IS_CHANGED(cls, **_inputs) -> float:
        return float("nan")  # never cached: it must stop the workers on every run

    def shutdown(self, pool, after=None):
        shutdown_all()
        return {"ui": {"text": ["PixelWizard workers stopped"]}}
