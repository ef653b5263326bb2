r"""Stanford Online Products: train on 11,318 products (59,551 images), test on 11,316 (60,502).

Command (on an accelerator; TFDS ``stanford_online_products`` prepared in ``--config.data_dir``)::

  python -m rankjax.main --config=experiments/configs/sop.py:triplet_semihard \
      --config.data_dir=~/tensorflow_datasets --workdir=/tmp/sop_triplet_semihard

Recipe: Roth, Milbich et al. 2020, "Revisiting Training Strategies and Generalization Performance
in Deep Metric Learning" (ICML): ImageNet ResNet-50 (Keras' weights) with frozen BatchNorm, a
128-d head, Adam lr 1e-5 with weight decay 4e-4, batch 112 (here 56 classes x 2 images), random
resized crop to 224 px and horizontal flip,
150 epochs (59,551 x 150 / 112 = 79,756 steps). Every 10,000 steps the validation split
(the last 20% of the training classes) is evaluated and ``best/`` keeps the best Recall@1; the test
classes are evaluated once, at the end, on that checkpoint, with Recall@1/10/100/1000 as the field
reports SOP (Musgrave et al. 2020's protocol; the papers chose on the test classes). The
loss's hyper-parameters, and whether the head L2-normalises, are its paper's (rankjax/configs.py).
bfloat16 compute on the accelerator.

Their R@1 (ResNet-50, 128-d), not reproduced here: triplet semi-hard 74.0, N-pair 70.9, margin 76.1.

The N-pairs / angular recipe of Wang et al. 2017 (64 classes x 2, 512-d, alpha 45, lambda 2) and the
batch-hard recipe of Hermans et al. 2017 (P = 18, K = 4, soft margin) are flags (details in
``rankjax.recipes.roth2020_recipe``)::

  python -m rankjax.main --config=experiments/configs/sop.py:npairs_angular,wang2017 ...
  python -m rankjax.main --config=experiments/configs/sop.py:triplet_hard,hermans2017 ...

``:<loss>,runlocal`` is a few steps of a tiny ResNet at 64 px (smoke tests on mock data).
"""

from rankjax import configs
from rankjax import recipes


def get_config(arg: str | None = None):
  loss, flags = configs.parse_arg(arg, default_loss="triplet_semihard",
                                  allowed_flags=recipes.FINE_GRAINED_FLAGS)
  c = recipes.roth2020_recipe("sop", loss, flags, steps=79756, eval_every=10000,
                              checkpoint_every=2000)
  if "runlocal" not in flags:
    c.eval.metrics = ("recall@1", "recall@10", "recall@100", "recall@1000", "map@r", "r_precision",
                      "nmi")
  return c
