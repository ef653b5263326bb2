"""rankjax: deep metric learning with ranking losses in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so that `import rankjax` stays light (no JAX/TensorFlow until they are needed).
  if name == "load_embedder":
    from rankjax.embedder import load_embedder  # pylint: disable=g-import-not-at-top
    return load_embedder
  raise AttributeError(f"module 'rankjax' has no attribute {name!r}")
