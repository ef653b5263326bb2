"""Flax NNX encoders for deep metric learning: ResNets, EfficientNet-Lite0, small-image encoders,
the embedding head.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from rankjax import models
  >>> model = models.get_model("resnet18", embedding_dim=128, normalize=True, rngs=nnx.Rngs(0))
  >>> model.eval()
  >>> model(jnp.zeros((2, 64, 64, 3))).shape
  (2, 128)
"""

from rankjax.models.efficientnet import EfficientNetLite, EfficientNetLite0
from rankjax.models.head import POOLINGS, EmbeddingHead, global_pool
from rankjax.models.model import (MODEL_NAMES, EmbeddingModel, ModelSpec, check_image_size,
                                  get_model, model_names, register_model)
from rankjax.models.resnet import (BasicBlock, Bottleneck, ResNet, ResNet18, ResNet34, ResNet50,
                                   ResNetTiny)
from rankjax.models.small import Conv4, SmallResNet
from rankjax.models.weights import load_weights, save_weights

__all__ = [
    "MODEL_NAMES", "POOLINGS", "BasicBlock", "Bottleneck", "Conv4", "EfficientNetLite",
    "EfficientNetLite0", "EmbeddingHead", "EmbeddingModel", "ModelSpec", "ResNet", "ResNet18",
    "ResNet34", "ResNet50", "ResNetTiny", "SmallResNet",
    "check_image_size", "get_model", "global_pool", "load_weights", "model_names",
    "register_model", "save_weights",
]
