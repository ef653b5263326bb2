r"""Images per second of the full training step, rankjax (JAX) beside PyTorch in the same run.

The step is what :func:`rankjax.train_state.make_train_step` jits for training: encoder forward in
training mode (batch statistics), the semi-hard triplet loss (margin 0.2) on the L2-normalised
embeddings of the whole batch, backward, and an Adam update; timed on one fixed batch already on
the device (the input pipeline is benchmarked in benchmarks/input_pipeline.py). PyTorch runs the
same architecture (written out below: same widths, strides, BatchNorm and head), the same loss
(TF Addons' semi-hard algorithm) and Adam, when ``torch`` is installed.

CPU (default)::

  python benchmarks/train_step.py            # small_resnet @ 28 px, resnet18 @ 64 px

GPU (``--gpu``): ResNet-50 at 224 px, bfloat16 compute (float32 parameters and loss), batch 128
(32 classes x 4), beside eager PyTorch with ``torch.autocast(bfloat16)`` and channels-last on the
same card. Prints images/s and model FLOP utilisation, MFU = 3 x forward FLOPs per image (those of
the convolutions and matrix products, :func:`matmul_flops`) x images/s / the card's peak dense
bfloat16 FLOP/s. It compiles once and times 30 steps per framework: under a minute on an H100::

  python benchmarks/train_step.py --gpu
"""

from __future__ import annotations

import argparse
import os
import time
import types

# JAX and PyTorch share the card in --gpu mode: rather than JAX's default reservation of 75% of
# its memory (a quarter left to PyTorch), each gets half. Set before JAX is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from rankjax import configs
from rankjax import losses
from rankjax import parallel
from rankjax import train
from rankjax.evaluation import embed as eval_embed
from rankjax import optim
from rankjax import train_state

# Peak dense bfloat16 FLOP/s by jax.Device.device_kind (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100": 989.4e12, "NVIDIA H200": 989.4e12,
    "NVIDIA H100 PCIe": 756.0e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L4": 121e12, "NVIDIA A10G": 70e12,
}


# ---------------------------------------------------------------------------------------------
# rankjax.
# ---------------------------------------------------------------------------------------------


def jax_step(model_name, *, image_size, channels, batch, dtype, backbone_options=None,
             num_devices=1, freeze_batchnorm=False, diagnostics="step"):
  """``(run(n) -> seconds for n steps, forward FLOPs per image)`` for the rankjax train step.

  The step runs data-parallel over the first ``num_devices`` devices (the batch split among them).
  ``diagnostics``: ``"step"`` computes the batch diagnostics inside the step, ``"none"`` leaves
  them out, ``"separate"`` computes them after each step in a jitted call of their own (what the
  trainer does on the steps it logs).
  """
  if diagnostics not in ("step", "none", "separate"):
    raise ValueError(f"diagnostics must be 'step', 'none' or 'separate'; got {diagnostics!r}.")
  config = configs.base_config()
  config.model.name = model_name
  config.model.dtype = dtype
  config.model.freeze_batchnorm = freeze_batchnorm
  config.model.embedding_dim = 128
  config.image_size = image_size
  if backbone_options:
    config.model.backbone_options.update(backbone_options)
  configs.with_loss(config, "triplet_semihard")
  model = train.build_model(config, types.SimpleNamespace(num_channels=channels))
  graphdef, eval_graphdef, params, model_state = train_state.split_model(model)
  tx, schedules = optim.make_optimizer(config.optimizer, params, total_steps=1000)
  loss_fn = losses.get_loss("triplet_semihard", **configs.loss_kwargs(config))
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  state = train_state.init_state(params, model_state, tx)
  step, sharding = parallel.jit_data_parallel(
      train_state.make_train_step(graphdef, loss_fn, tx, schedules,
                                  train_state.diagnostics_kwargs(config)
                                  if diagnostics == "step" else None,
                                  batch_outputs=diagnostics == "separate"),
      state, mesh, batch_outputs=diagnostics == "separate")
  if diagnostics == "separate":
    diagnose = jax.jit(train_state.make_diagnostics_fn(train_state.diagnostics_kwargs(config)),
                       out_shardings=parallel.replicated(mesh))
    step_and_diagnose = step

    def step(state, batch):
      state, metrics, outputs = step_and_diagnose(state, batch)
      return state, {**metrics, **diagnose(outputs["embeddings"], outputs["label"])}
  state = jax.device_put(state, sharding)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, image_size, image_size, channels)).astype(np.float32)
  labels = np.repeat(np.arange(batch // 4, dtype=np.int32), 4)
  device_batch = parallel.global_batch({"image": images, "label": labels}, mesh)

  embed = eval_embed.make_embed_fn(eval_graphdef)
  forward_flops = matmul_flops(
      jax.make_jaxpr(embed)(train_state.model_variables(state), device_batch["image"])) / batch

  return step_timer(step, state, device_batch), forward_flops


def step_timer(step, state, batch):
  """``run(n) -> seconds`` for ``n`` steps of ``step`` on ``batch``, the state carried across
  calls (the step may donate it); compiled and warmed up by two steps first."""
  holder = {"state": state}

  def run(n):
    state = holder["state"]
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    holder["state"] = state
    return time.perf_counter() - start

  run(2)
  return run


def matmul_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of the convolutions and matrix products in a (closed) jaxpr.

  Counted from the program rather than by XLA's cost analysis, which on a GPU sees the compiled
  convolutions as cuDNN custom calls and counts them as zero. Element-wise work (BatchNorm, ReLU,
  pooling) is left out, as MFU conventionally does.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * np.prod(out) * np.prod(kernel) / out_features
    elif eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([lhs[i] for i in contracting])
    repeats = eqn.params.get("length", 1)  # A scan's body runs `length` times.
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          total += repeats * matmul_flops(sub)
  return total


# ---------------------------------------------------------------------------------------------
# PyTorch: the same architectures, loss and optimizer.
# ---------------------------------------------------------------------------------------------


def torch_modules():
  """PyTorch twins of rankjax.models' small_resnet, ResNet-18/50 and the embedding head."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=False)

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1):
      super().__init__()
      self.conv1, self.bn1 = conv(cin, width, 3, stride), nn.BatchNorm2d(width)
      self.conv2, self.bn2 = conv(width, width, 3), nn.BatchNorm2d(width)
      self.shortcut = None
      if stride != 1 or cin != width:
        self.shortcut = nn.Sequential(conv(cin, width, 1, stride), nn.BatchNorm2d(width))

    def forward(self, x):
      y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
      return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
      super().__init__()
      out = width * 4  # Stride on the first 1x1, as rankjax's (Keras') ResNet-50.
      self.conv1, self.bn1 = conv(cin, width, 1, stride), nn.BatchNorm2d(width)
      self.conv2, self.bn2 = conv(width, width, 3), nn.BatchNorm2d(width)
      self.conv3, self.bn3 = conv(width, out, 1), nn.BatchNorm2d(out)
      self.shortcut = None
      if stride != 1 or cin != out:
        self.shortcut = nn.Sequential(conv(cin, out, 1, stride), nn.BatchNorm2d(out))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))

  def stages(block, cin, widths, sizes):
    layers = []
    for i, (width, n) in enumerate(zip(widths, sizes)):
      for j in range(n):
        layers.append(block(cin, width, 2 if i > 0 and j == 0 else 1))
        cin = width * block.expansion
    return nn.Sequential(*layers), cin

  class Embedder(nn.Module):
    def __init__(self, stem, body, features, dim=128):
      super().__init__()
      self.stem, self.body, self.head = stem, body, nn.Linear(features, dim)

    def forward(self, x):
      x = self.body(self.stem(x)).mean(dim=(2, 3))
      return nn.functional.normalize(self.head(x.float()), dim=-1)

  def small_resnet(channels, widths=(32, 64, 128, 256)):
    body, features = stages(BasicBlock, widths[0], widths, (1, 1, 1, 1))
    stem = nn.Sequential(conv(channels, widths[0], 3), nn.BatchNorm2d(widths[0]), nn.ReLU())
    return Embedder(stem, body, features)

  def resnet(block, sizes, channels):
    body, features = stages(block, 64, (64, 128, 256, 512), sizes)
    stem = nn.Sequential(conv(channels, 64, 7, 2), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1))
    return Embedder(stem, body, features)

  return {
      "small_resnet": small_resnet,
      "resnet18": lambda c: resnet(BasicBlock, (2, 2, 2, 2), c),
      "resnet50": lambda c: resnet(Bottleneck, (3, 4, 6, 3), c),
  }


def torch_triplet_semihard(embeddings, labels, margin=0.2):
  """TF Addons' TripletSemiHardLoss in PyTorch (euclidean distances)."""
  import torch  # pylint: disable=g-import-not-at-top
  sq = (embeddings * embeddings).sum(1)
  d2 = (sq[:, None] + sq[None, :] - 2 * embeddings @ embeddings.T).clamp_min(0)
  eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
  d = torch.where(d2 > 0, d2.clamp_min(1e-16).sqrt(), torch.zeros_like(d2))
  d = d.masked_fill(eye, 0)
  same = labels[:, None] == labels[None, :]
  pos, neg = same & ~eye, ~same
  d_ap = d[:, :, None]                       # [a, p, 1]
  d_an = d[:, None, :]                       # [a, 1, n]
  semi = neg[:, None, :] & (d_an > d_ap)     # negatives farther than the positive
  inf = torch.finfo(d.dtype).max
  nearest_semi = torch.where(semi, d_an, torch.full_like(d_an, inf)).amin(-1)
  farthest = torch.where(neg, d, torch.full_like(d, -inf)).amax(-1, keepdim=True)
  chosen = torch.where(semi.any(-1), nearest_semi, farthest.expand_as(nearest_semi))
  valid = pos & neg.any(-1, keepdim=True)
  loss = torch.relu(d - chosen + margin)
  return (loss * valid).sum() / valid.sum().clamp_min(1)


def torch_step(model_name, *, image_size, channels, batch, device, bf16, build=None):
  """``run(n) -> seconds`` for the PyTorch train step, or None without torch.

  ``build(channels)`` gives the model (default: :func:`torch_modules`' ``model_name``); Adam
  updates the parameters that require a gradient.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  model = (build or torch_modules()[model_name])(channels).to(device)
  if device == "cuda":
    model = model.to(memory_format=torch.channels_last)
  model.train()
  opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  rng = np.random.default_rng(0)
  images = torch.tensor(
      rng.normal(size=(batch, channels, image_size, image_size)).astype(np.float32), device=device)
  if device == "cuda":
    images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.tensor(np.repeat(np.arange(batch // 4), 4), device=device)

  def one_step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      embeddings = model(images)
    loss = torch_triplet_semihard(embeddings.float(), labels)
    loss.backward()
    opt.step()
    return loss

  def run(n):
    start = time.perf_counter()
    for _ in range(n):
      loss = one_step()
    loss.item()
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  run(2)
  return run


# ---------------------------------------------------------------------------------------------
# Timing and the table.
# ---------------------------------------------------------------------------------------------


def images_per_second(run, batch, *, steps, repeats):
  """Best of ``repeats`` timings of ``steps`` steps (the CPU is shared: the best is the least
  disturbed)."""
  return max(batch * steps / run(steps) for _ in range(repeats))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gpu", action="store_true", help="ResNet-50 @ 224 px, bf16, with MFU.")
  parser.add_argument("--steps", type=int, default=None, help="Timed steps per repeat.")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  if args.gpu:
    if jax.default_backend() != "gpu":
      raise SystemExit(f"--gpu needs a GPU; JAX's backend is {jax.default_backend()!r}.")
    cases = [("resnet50", 224, 3, 128, "bfloat16")]
    steps = args.steps or 10
  else:
    cases = [("small_resnet", 28, 1, 128, "float32"), ("resnet18", 64, 3, 64, "float32")]
    steps = args.steps or 5
  device = jax.devices()[0]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch_version = torch.__version__
    if not args.gpu:
      torch.set_num_threads(os.cpu_count())
  except ImportError:
    torch_version = None

  print(f"JAX {jax.__version__} on {device.device_kind} ({jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores); PyTorch {torch_version or 'not installed'}; "
        f"{steps} steps x best of {args.repeats}")
  header = (f"{'model':<13} {'size':>4} {'batch':>5} {'dtype':<8} {'rankjax img/s':>13} "
            f"{'PyTorch img/s':>13} {'ratio':>6}")
  if args.gpu:
    header += f" {'fwd GFLOP/img':>13} {'MFU jax':>7} {'MFU torch':>9}"
  print(header)
  for name, size, channels, batch, dtype in cases:
    run, flops = jax_step(name, image_size=size, channels=channels, batch=batch, dtype=dtype)
    jax_ips = images_per_second(run, batch, steps=steps, repeats=args.repeats)
    trun = torch_step(name, image_size=size, channels=channels, batch=batch,
                      device="cuda" if args.gpu else "cpu", bf16=dtype == "bfloat16")
    torch_ips = (images_per_second(trun, batch, steps=steps, repeats=args.repeats)
                 if trun else float("nan"))
    line = (f"{name:<13} {size:>4} {batch:>5} {dtype:<8} {jax_ips:>13.1f} {torch_ips:>13.1f} "
            f"{jax_ips / torch_ips:>6.2f}")
    if args.gpu:
      peak = PEAK_BF16_FLOPS.get(device.device_kind, float("nan"))
      line += (f" {flops / 1e9:>13.2f} {3 * flops * jax_ips / peak:>7.1%} "
               f"{3 * flops * torch_ips / peak:>9.1%}")
    print(line, flush=True)
  if args.gpu and device.device_kind not in PEAK_BF16_FLOPS:
    print(f"(no peak FLOP/s on record for {device.device_kind!r}: MFU is nan)")


if __name__ == "__main__":
  main()
