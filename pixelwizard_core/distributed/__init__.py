"""Multi-process inference over torch.distributed (NCCL on CUDA, gloo on CPU).

- :mod:`.ulysses`: Ulysses sequence parallelism (all-to-all over heads around self-attention).
- :mod:`.fsdp`: FSDP2 sharding of the DiTs and the text encoder, one unit per block, read shard by shard.
- :mod:`.tiles`: the tiled VAE decode split across ranks.
- :mod:`.session`: one rank's resident models and the pipeline jobs (shared by the pool and torchrun).
- :mod:`.pool`: :class:`~.pool.WorkerPool`, persistent worker processes driven by a parent (ComfyUI).
- :mod:`.launch`: ``torchrun ... -m pixelwizard_core generate --ulysses_size N --dit_fsdp --t5_fsdp``.

Nothing is imported here, so ``import pixelwizard_core.distributed`` stays cheap.
"""
