"""Training: U-Net, diffusion loss, BraTS data pipeline (needs the `train` extra: torch)."""
