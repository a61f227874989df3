"""Networks: the Wan2.2 DiT and its PixelWizard HR variant, the Wan2.2 VAE, the umT5 encoder."""
