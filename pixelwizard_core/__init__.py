"""PixelWizard on Wan2.2-TI2V-5B: the host-independent library under the ComfyUI node pack."""

__version__ = "0.1.0"
