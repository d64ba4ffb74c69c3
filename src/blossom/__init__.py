"""blossom: text-to-image latent diffusion, from raw images to a served model on a laptop CPU."""

__version__ = "0.1.0"
