"""gti_jax: extend a pretrained LM's vocabulary and initialize new tokens well, in JAX/Flax."""

__version__ = "0.1.0"
