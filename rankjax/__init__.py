"""rankjax: deep metric learning with ranking losses in JAX/Flax."""

__version__ = "0.1.0"
