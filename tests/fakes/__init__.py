"""Stand-ins for CUDA-only packages (flash-attn 2 and 3) that run on the CPU; installed by tests/fake_cuda.py."""
