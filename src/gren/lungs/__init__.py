"""Left/right lung segmentation (classical and U-Net) and lung regions for hashing."""
