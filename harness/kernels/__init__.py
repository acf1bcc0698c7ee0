"""Pure tensor kernels (Triton) with their PyTorch references; nothing here imports the harness
beyond harness.errors."""
from harness.kernels.decode_config import DecodeConfig, decode_tuning
from harness.kernels.latent_decode import latent_decode, latent_decode_reference, latent_decode_triton, tune_decode

__all__ = ["DecodeConfig", "decode_tuning", "latent_decode", "latent_decode_reference", "latent_decode_triton",
           "tune_decode"]
