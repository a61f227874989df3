"""Multi-process inference: Ulysses sequence parallel over torch.distributed (NCCL on CUDA, gloo on CPU)."""
