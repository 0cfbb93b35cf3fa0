"""ddpm_tutorial: the helper package of the book "DDPM from scratch" (Ho et al. 2020)."""
__version__ = "0.1.0"
