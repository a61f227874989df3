"""PixelWizard's GPU benchmark as a package; ``bench/gpu_benchmark.py`` is its entry point.

config (what is benchmarked, memory modes) - meters (device / emulated host memory) - models (random-weight
models, ``ModelPool`` placement) - harness (timing, memory by stage, records, budget, JSON and markdown
files) - text, lr, hr, decode (one stage each) - flops - estimates (doctor's) - environment (versions,
ceilings) - report (markdown tables) - plan (modes and stage order, one process per mode on the CPU) -
cuda_paths (graphs per compiled block, pinned bytes per swapped block, HR step per attention backend) - cli.
"""
