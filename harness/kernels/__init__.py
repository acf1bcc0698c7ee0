"""Pure tensor kernels (Triton) with their PyTorch references; nothing here imports the harness
beyond harness.errors."""
from harness.kernels.latent_decode import latent_decode, latent_decode_reference, latent_decode_triton

__all__ = ["latent_decode", "latent_decode_reference", "latent_decode_triton"]
