r"""The training configuration: its fields, their defaults, and each loss's paper hyper-parameters.

Experiment files (``experiments/configs/<dataset>.py``) start from :func:`base_config` and set what
their recipe changes; :func:`rankjax.train.train_and_evaluate` checks every key against it, so a
misspelled key is an error, not a silently ignored setting. Every field can be overridden on the
command line, e.g. ``--config.train.steps=200 --config.loss.name=npairs
--config.loss.npairs.l2_reg=0.01``.

Loss hyper-parameters live in one section per loss (``config.loss.<name>``) so that switching
``config.loss.name`` never passes one loss's margin to another. Each section starts at its paper's
defaults, and the head's normalisation (``model.normalize`` left at ``None``), the batch layout
(the N-pair family's K = 2) and the loss's learned parameters (class proxies, at
``optimizer.proxy_learning_rate``, by default 100x the network's; the margin loss's
:math:`\beta`) follow the loss's spec: all of them are in the loss catalogue,
:mod:`rankjax.losses.catalogue`, with its table of defaults and papers.

``config.xbm`` adds a cross-batch memory (Wang et al. 2020, :mod:`rankjax.cross_batch`) to the
losses that take a reference set (``LossSpec.takes_references``):
``enabled``, ``size`` (M embeddings), ``start_step`` (the warm-up) and ``weight`` of the memory
term, by default the authors' code's 8192, 2000 and 1.0.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Sequence

from absl import logging
import ml_collections
from ml_collections import config_dict

from rankjax import checks
from rankjax import cross_batch
from rankjax import losses

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
HEAD_INITS = ("random", "pca")
SCHEDULES = ("constant", "cosine", "linear", "step")


def base_config() -> ml_collections.ConfigDict:
  """Every field a training run reads, at its default; unlocked so experiment files can edit it."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Multi-host: call jax.distributed.initialize() before anything touches the devices (the same
  # as `python -m rankjax.main --distributed`, for code that calls train_and_evaluate itself).
  c.distributed = False
  # The training classes are dealt into this many data shards, each drawing classes_per_batch /
  # data_shards classes a step; every process reads only the shards it holds (rankjax.data).
  # The global batches depend on this number, not on the number of processes: fix it (to a
  # multiple of every process count the run may use) to get the same training on any topology.
  # None = one shard per process.
  c.data_shards = config_dict.placeholder(int)

  # Input (rankjax.data): P classes x K samples per global batch.
  c.dataset = "omniglot"
  c.data_dir = config_dict.placeholder(str)  # The TFDS data directory; None = TFDS' default.
  c.image_size = 28
  c.classes_per_batch = 32
  c.samples_per_class = 4
  c.augment = config_dict.placeholder(bool)  # None = the dataset's paper default.
  # The crop and flip of augmented training images (rankjax.data.Augment): the area fraction and
  # aspect-ratio ranges of the random resized crop, the flip, and whether the resize of a crop is
  # anti-aliased (as the evaluation resize is).
  c.augment_options = ml_collections.ConfigDict(
      {"scale": (0.16, 1.0), "ratio": (3 / 4, 4 / 3), "flip": True, "antialias": False})
  # How the classes are split (rankjax.data.Protocol); None = the dataset's default. The
  # validation split (the last val_fraction of the training classes) chooses the best checkpoint;
  # the test split is evaluated once, at the end.
  c.protocol = ml_collections.ConfigDict()
  c.protocol.val_fraction = config_dict.placeholder(float)
  c.protocol.train_fraction = config_dict.placeholder(float)  # Folder datasets.
  c.protocol.min_images_per_class = config_dict.placeholder(int)
  c.protocol.train_classes = ()  # Folder datasets: explicit class folder names (with test_).
  c.protocol.test_classes = ()
  # Class augmentation by rotation (Omniglot's standard recipe, Santoro et al. 2016; Vinyals et
  # al. 2016): each class of a training batch is turned by a random multiple of 90 degrees and
  # counted as a new class, so there are 4x as many training classes.
  c.rotate_classes = False
  # A random rotation (up to +-rotation_degrees), scale (1 +- scale) and shift (up to +-shift of
  # the image size) of each training image, on the device (rankjax.augment); all 0
  # turns it off.
  c.affine = ml_collections.ConfigDict({"rotation_degrees": 0.0, "scale": 0.0, "shift": 0.0})

  # Encoder (rankjax.models).
  c.model = ml_collections.ConfigDict()
  c.model.name = "conv4"
  c.model.embedding_dim = 128
  c.model.pooling = "avg"
  c.model.normalize = config_dict.placeholder(bool)  # None = the loss's convention.
  c.model.freeze_batchnorm = False
  c.model.dtype = "float32"  # Compute dtype; parameters and the loss stay float32.
  # "imagenet" (resnet50, efficientnet_lite0) or a weights file.
  c.model.pretrained = config_dict.placeholder(str)
  # Extra keyword arguments of the backbone class, e.g. {"width": 64} for conv4.
  c.model.backbone_options = ml_collections.ConfigDict()
  # The embedding head's start (rankjax.head_init): "random" (LeCun normal), or "pca": the
  # leading principal directions of the training images' pooled features, so that the network
  # starts from (a projection of) the pretrained features rather than below them.
  c.model.head_init = "random"

  # The frozen-trunk activation cache (rankjax.frozen_cache): with a frozen prefix
  # (model.backbone_options.frozen_blocks > 0), compute its output once per dataset, image size,
  # augmentation and encoder, store it under `dir` (None = DATA_DIR/rankjax_frozen_cache), and
  # train and evaluate from it. `views` augmented views of each training image, drawn with the
  # cache's own `seed` (shared by every run of a sweep); `dtype` of the stored activations.
  c.frozen_cache = ml_collections.ConfigDict(
      {"enabled": False, "views": 8, "seed": 0, "dtype": "float16",
       "dir": config_dict.placeholder(str)})

  # Loss (rankjax.losses.catalogue): name, and the keyword arguments of each loss in its own
  # section, at its paper's values.
  c.loss = ml_collections.ConfigDict()
  c.loss.name = losses.catalogue.DEFAULT_LOSS
  for name, spec in losses.CATALOGUE.items():
    c.loss[name] = ml_collections.ConfigDict(dict(spec.defaults))

  # Cross-batch memory (rankjax.cross_batch; Wang et al. 2020): from step `start_step` on, the loss
  # also compares each batch with the embeddings of the last `size` training images, that term
  # weighted by `weight`. Losses that take a reference set only. Defaults: the authors' code's.
  c.xbm = ml_collections.ConfigDict(
      {"enabled": False, "size": 8192, "start_step": 2000, "weight": 1.0})

  # Optimizer (optax).
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3  # Peak learning rate of the backbone.
  c.optimizer.head_learning_rate = config_dict.placeholder(float)  # None = learning_rate.
  # Proxy losses only: None = losses.spec.PROXY_LEARNING_RATE_MULTIPLIER x learning_rate.
  c.optimizer.proxy_learning_rate = config_dict.placeholder(float)
  c.optimizer.momentum = 0.9  # sgd, rmsprop.
  c.optimizer.nesterov = False  # sgd.
  c.optimizer.b1 = 0.9  # adam, adamw.
  c.optimizer.b2 = 0.999  # adam, adamw.
  c.optimizer.eps = 1e-8  # adam, adamw, rmsprop.
  c.optimizer.rmsprop_decay = 0.9  # rmsprop.
  # Decoupled weight decay on kernels (not biases or BatchNorm): adamw's own, else added to the
  # gradient before the optimizer (classic L2 for sgd/rmsprop/adam).
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0  # Clip the global gradient norm; 0 = no clipping.
  c.optimizer.schedule = "constant"  # constant | cosine | linear (to 0) | step.
  c.optimizer.warmup_steps = 0  # Linear warm-up from 0.
  c.optimizer.decay_steps = (0,)  # step: multiply by decay_factor at these steps.
  c.optimizer.decay_factor = 0.1  # step.

  # Training loop.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1500
  c.train.log_every = 50  # Logs the window's mean loss and the batch diagnostics of its last step.
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  # Running again on a workdir resumes it; a config other than its config.json is an error
  # (rankjax.resume). True lets the cadence fields of rankjax.resume.SAFE_TO_CHANGE differ, and
  # train.steps grow; every other field must still match.
  c.train.allow_config_changes = False

  # Evaluation on the held-out classes (rankjax.evaluation).
  c.eval = ml_collections.ConfigDict()
  # Evaluate the validation split every this many steps and keep the best checkpoint (needs a
  # validation split, protocol.val_fraction > 0); 0 = none. The final evaluation on eval.split
  # then reports the best checkpoint.
  c.eval.every = 0
  c.eval.split = "test"  # The final evaluation, once, at the end.
  c.eval.batch_size = 256
  # Names for rankjax.evaluation.Evaluator: "recall@K" (any K), "map@r", "r_precision", "nmi".
  c.eval.metrics = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi")
  c.eval.distance = "cosine"
  c.eval.chunk_size = config_dict.placeholder(int)
  c.eval.best_metric = "recall@1"  # The best checkpoint (workdir/best) maximises this.
  # Test-time augmentation (rankjax.evaluation.shift_average): s > 0 embeds each test image as the
  # mean over its (2s + 1)^2 copies shifted by up to s pixels; 0 = the image alone.
  c.eval.test_time_shift = 0
  return c


def with_loss(config: ml_collections.ConfigDict, loss: str) -> ml_collections.ConfigDict:
  """Selects ``loss`` in ``config``; a loss that needs K samples per class (the N-pair family's
  2) gets them at the same global batch size."""
  k = loss_spec(loss).samples_per_class
  config.loss.name = loss
  if k is not None and config.samples_per_class != k:
    batch = config.classes_per_batch * config.samples_per_class
    config.classes_per_batch, config.samples_per_class = batch // k, k
  return config


def parse_arg(arg: str | None, default_loss: str,
              allowed_flags: Sequence[str] = ("runlocal",)) -> tuple[str, set[str]]:
  """Splits a config argument like ``"npairs,runlocal"`` into the loss and a set of flags."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  flags = {p for p in parts if p not in losses.CATALOGUE}
  names = [p for p in parts if p in losses.CATALOGUE]
  unknown = flags - set(allowed_flags)
  if unknown or len(names) > 1:
    raise ValueError(
        f"config argument {arg!r}: expected one loss name out of "
        f"{', '.join(losses.loss_names())}, optionally followed by any of "
        f"{', '.join(',' + f for f in allowed_flags)}; could not read {sorted(unknown) or names}.")
  return (names[0] if names else default_loss), flags


def loss_spec(name: str) -> losses.LossSpec:
  """The catalogue's spec of the loss ``name`` (``config.loss.name``); a clear error if unknown."""
  try:
    return losses.get_spec(name)
  except ValueError as e:
    raise ValueError(f"config.loss.name: {e}") from None


def check_loss_name(name: str) -> None:
  loss_spec(name)


def loss_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The keyword arguments for ``rankjax.losses.get_loss(config.loss.name, ...)``: the section
  ``config.loss.<name>`` without the keys that configure the loss's learned parameters."""
  return loss_spec(config.loss.name).loss_options(config.loss[config.loss.name].to_dict())


def num_train_labels(config: ml_collections.ConfigDict, train_classes: int) -> int:
  """Distinct training labels: the training classes, x4 with ``rotate_classes``.

  ``train_classes``: the dataset's training classes, labelled ``0 .. train_classes - 1``
  (rankjax.data's convention for every dataset). A loss with one parameter row per class (class
  proxies) has this many rows.
  """
  return train_classes * (4 if config.rotate_classes else 1)


def normalize_embeddings(config: ml_collections.ConfigDict) -> bool:
  """``config.model.normalize``, or the loss's convention when it is ``None``."""
  if config.model.normalize is not None:
    return bool(config.model.normalize)
  return loss_spec(config.loss.name).normalize


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for a key :func:`base_config` lacks (a misspelling) or a bad value."""
  _check_keys(config, base_config(), prefix="")
  check_loss_name(config.loss.name)
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {config.optimizer.name!r} (config.optimizer.name); "
                     f"choose one of {', '.join(OPTIMIZERS)}.")
  if config.optimizer.schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule {config.optimizer.schedule!r} "
                     f"(config.optimizer.schedule); choose one of {', '.join(SCHEDULES)}.")
  if config.eval.best_metric not in config.eval.metrics:
    raise ValueError(f"config.eval.best_metric={config.eval.best_metric!r} is not one of "
                     f"config.eval.metrics {tuple(config.eval.metrics)}.")
  for key in ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
              "eval.batch_size", "classes_per_batch", "samples_per_class", "image_size"):
    value = _get(config, key)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{key} must be a positive integer; got {value!r}.")
  check_rates_and_counts(config)
  _check_protocol(config.protocol)
  if config.eval.split not in ("train", "val", "test"):
    raise ValueError(f"config.eval.split must be 'train', 'val' or 'test'; got "
                     f"{config.eval.split!r}.")
  _check_xbm(config)
  _check_batch_layout(config)
  shards = config.data_shards
  if shards is not None and (not isinstance(shards, int) or shards <= 0 or
                             config.classes_per_batch % shards):
    raise ValueError(f"config.data_shards must be None or a positive integer that divides "
                     f"config.classes_per_batch={config.classes_per_batch}; got {shards!r}.")
  try:
    checks.check_max_shift(config.eval.test_time_shift, config.image_size)
  except ValueError as e:
    raise ValueError(f"config.eval.test_time_shift: {e}") from None
  try:
    checks.check_affine(**config.affine)
  except ValueError as e:
    raise ValueError(f"config.affine: {e}") from None
  if config.model.head_init not in HEAD_INITS:
    raise ValueError(f"config.model.head_init must be one of {', '.join(HEAD_INITS)}; got "
                     f"{config.model.head_init!r}.")
  _check_frozen_cache(config)


def _check_frozen_cache(config: ml_collections.ConfigDict) -> None:
  """What a frozen-trunk cache cannot combine with: augmentations of the image on the device."""
  if not config.frozen_cache.enabled:
    return
  from rankjax import augment as device_augment  # pylint: disable=g-import-not-at-top
  from rankjax import frozen_cache  # pylint: disable=g-import-not-at-top
  frozen_cache.Settings.from_config(config)  # Checks views and dtype.
  if not (config.model.backbone_options.to_dict() or {}).get("frozen_blocks"):
    raise ValueError("config.frozen_cache.enabled caches a frozen prefix: set "
                     "config.model.backbone_options.frozen_blocks > 0 (efficientnet_lite0).")
  moving = [name for name, on in (
      ("config.affine", not device_augment.is_identity(**config.affine)),
      ("config.rotate_classes", config.rotate_classes),
      ("config.eval.test_time_shift", config.eval.test_time_shift)) if on]
  if moving:
    raise ValueError(f"{' and '.join(moving)} transform the image on the device, after the "
                     "frozen prefix the cache stores has already seen it: turn them off, or "
                     "config.frozen_cache.enabled.")


def augment_setting(config: ml_collections.ConfigDict):
  """The ``augment`` argument of :func:`rankjax.data.train_batches` for ``config``.

  ``config.augment`` says whether (``None``: the dataset's default), ``config.augment_options``
  how.
  """
  if config.augment is None:
    from rankjax import data  # pylint: disable=g-import-not-at-top
    if not data.datasets.get_spec(config.dataset).augment:
      return False
  elif not config.augment:
    return False
  options = config.augment_options.to_dict()
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}


def check_rates_and_counts(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for a learning rate that is not positive, or a negative weight decay,
  clipping norm or step count (``train.steps=0`` is valid: it evaluates the untrained network)."""
  opt = config.optimizer
  for key in ("learning_rate", "head_learning_rate", "proxy_learning_rate"):
    if opt[key] is None and key != "learning_rate":
      continue  # Unset: follows learning_rate.
    if not _is_number(opt[key]) or not opt[key] > 0:
      raise ValueError(f"config.optimizer.{key} must be a positive number; got {opt[key]!r} (at "
                       f"0 nothing trains, below 0 the loss is climbed instead of descended).")
  if not _is_number(opt.decay_factor) or not opt.decay_factor > 0:
    raise ValueError(f"config.optimizer.decay_factor must be a positive number; got "
                     f"{opt.decay_factor!r}.")
  for key in ("weight_decay", "grad_clip_norm"):
    if not _is_number(opt[key]) or not opt[key] >= 0:
      raise ValueError(f"config.optimizer.{key} must be 0 (off) or positive; got {opt[key]!r}.")
  counts = {"train.steps": config.train.steps, "optimizer.warmup_steps": opt.warmup_steps,
            "eval.every": config.eval.every}
  counts.update({f"optimizer.decay_steps[{i}]": s for i, s in enumerate(opt.decay_steps)})
  for key, value in counts.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"config.{key} must be a non-negative integer; got {value!r}.")


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _get(config, dotted_key):
  for part in dotted_key.split("."):
    config = config[part]
  return config


def _check_protocol(protocol: ml_collections.ConfigDict) -> None:
  """Errors for fractions outside their range, a bad image minimum, one class list alone."""
  if protocol.val_fraction is not None and not 0 <= protocol.val_fraction < 1:
    raise ValueError(f"config.protocol.val_fraction must be in [0, 1); got "
                     f"{protocol.val_fraction!r}.")
  if protocol.train_fraction is not None and not 0 < protocol.train_fraction < 1:
    raise ValueError(f"config.protocol.train_fraction must be in (0, 1); got "
                     f"{protocol.train_fraction!r}.")
  minimum = protocol.min_images_per_class
  if minimum is not None and (not isinstance(minimum, int) or minimum < 1):
    raise ValueError(f"config.protocol.min_images_per_class must be a positive integer; got "
                     f"{minimum!r}.")
  if bool(protocol.train_classes) != bool(protocol.test_classes):
    raise ValueError("config.protocol.train_classes and test_classes go together: give both "
                     "(class folder names) or neither.")
def _check_batch_layout(config):
  """One class per batch leaves a loss without negatives (only the proxy losses have their own);
  a pair-based loss reads one pair of each class, so K > 2 wastes the rest (a warning)."""
  spec = loss_spec(config.loss.name)
  if config.classes_per_batch < 2 and not spec.learns_proxies:
    raise ValueError(
        f"config.classes_per_batch={config.classes_per_batch}: loss {config.loss.name!r} compares "
        "each anchor with negatives of other classes in its batch, and a batch of one class has "
        "none (the loss is 0 and nothing trains). Use classes_per_batch >= 2.")
  k = spec.samples_per_class
  if k is not None and config.samples_per_class != k:
    logging.warning(
        "Loss %r reads %d images of each class: with samples_per_class=%d it uses %d of the %d "
        "images of each class in a batch and ignores the rest. Set config.samples_per_class=%d "
        "(configs.with_loss does).", config.loss.name, k, config.samples_per_class, k,
        config.samples_per_class, k)


def _check_xbm(config):
  if not config.xbm.enabled:
    return
  cross_batch.check_loss(loss_spec(config.loss.name))
  batch = config.classes_per_batch * config.samples_per_class
  size, start, weight = config.xbm.size, config.xbm.start_step, config.xbm.weight
  if not isinstance(size, int) or size < batch:
    raise ValueError(f"config.xbm.size must be an integer of at least the global batch ({batch}); "
                     f"got {size!r}.")
  if not isinstance(start, int) or start < 0:
    raise ValueError(f"config.xbm.start_step must be an integer >= 0; got {start!r}.")
  if not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
    raise ValueError(f"config.xbm.weight must be a finite number >= 0; got {weight!r}.")


def _check_keys(config, reference, prefix):
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in reference:
      raise ValueError(f"Unknown config key {path!r}.{_suggest(key, list(reference.keys()))} "
                       f"The keys are listed in rankjax/configs.py:base_config.")
    if isinstance(reference[key], ml_collections.ConfigDict):
      if path.startswith("loss.") or path == "model.backbone_options":
        continue  # Keyword arguments, checked by rankjax.losses.get_loss / models.get_model.
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        raise ValueError(f"config key {path!r} must be a section; got {config[key]!r}.")
      _check_keys(config[key], reference[key], prefix=f"{path}.")


def _suggest(name, choices):
  close = difflib.get_close_matches(str(name), list(choices), n=1)
  return f" Did you mean {close[0]!r}?" if close else ""
