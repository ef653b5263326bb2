"""Image-folder datasets: scanning, errors, the split rule, the pipelines, and the offline sets."""

import fcntl
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

from rankjax import configs
from rankjax import data
from rankjax.data import datasets
from rankjax.data import image_folder

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
S = 16


def _save(path, array, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def _make_folder(root, counts, *, mode="L", fmt="PNG", seed=0):
  """Class folders c00, c01, ... with ``counts[i]`` images each; returns {relpath: array}."""
  rng = np.random.default_rng(seed)
  shape = (12, 10) if mode == "L" else (12, 10, 3)
  images = {}
  for c, n in enumerate(counts):
    for i in range(n):
      array = rng.integers(0, 256, size=shape, dtype=np.uint8)
      rel = os.path.join(f"c{c:02d}", f"img{i}.{fmt.lower()}")
      _save(os.path.join(root, rel), array, fmt)
      images[rel] = array
  return images


@pytest.fixture(autouse=True)
def _fresh_cache():
  data.clear_cache()
  yield
  data.clear_cache()


def test_scan_lists_sorted_classes_and_skips_non_images(tmp_path, caplog):
  _make_folder(tmp_path / "root", [2, 3])
  (tmp_path / "root" / "c00" / "notes.txt").write_text("not an image")
  (tmp_path / "root" / "c01" / ".hidden.png").write_bytes(b"")
  (tmp_path / "root" / "README").write_text("top-level file")
  listing = image_folder.scan(str(tmp_path / "root"))
  assert listing.classes == ("c00", "c01")
  assert listing.counts().tolist() == [2, 3]
  assert listing.labels.tolist() == [0, 0, 1, 1, 1]
  assert sorted(p for p, _ in listing.skipped) == sorted(
      ["README", os.path.join("c00", "notes.txt"), os.path.join("c01", ".hidden.png")])
  with caplog.at_level(logging.INFO):
    data.get_dataset_info(f"folder:{tmp_path / 'root'}", data_dir=str(tmp_path / "tfds"),
                          protocol=data.Protocol(val_fraction=0.0))
  text = caplog.text
  assert "2 classes, 5 images; 3 other files skipped" in text
  assert "not an image file name" in text and "notes.txt" in text


@pytest.mark.parametrize("make, match, error", [
    (lambda root: None, "does not exist", FileNotFoundError),
    (lambda root: root.write_text("x"), "is a file", NotADirectoryError),
    (lambda root: (root.mkdir(), (root / "a.png").write_bytes(b"x")), "has no class subfolders",
     ValueError),
    (lambda root: (_make_folder(root, [2]), (root / "empty").mkdir(),
                   (root / "empty" / "x.txt").write_text("x")), r"empty holds no image",
     ValueError),
    (lambda root: (_make_folder(root, [2, 2]), (root / "c01" / "broken.jpg").write_bytes(b"junk")),
     r"c01/broken\.jpg is not a readable image", ValueError),
])
def test_bad_folders_are_errors_naming_the_path(tmp_path, make, match, error):
  root = tmp_path / "root"
  make(root)
  with pytest.raises(error, match=match):
    data.get_dataset_info(f"folder:{root}", data_dir=str(tmp_path / "tfds"))


def test_bad_names_are_errors():
  with pytest.raises(ValueError, match="Unknown dataset name='photos:/x'"):
    datasets.parse_name("photos:/x")
  with pytest.raises(ValueError, match="'cub200' is not a folder dataset"):
    datasets.parse_name("cub200:/x")
  with pytest.raises(ValueError, match="needs its folder"):
    datasets.parse_name("folder")
  with pytest.raises(ValueError, match="reads its folder 'lfw_a' from data_dir"):
    data.get_dataset_info("lfw")


@pytest.mark.parametrize("mode, fmt, channels", [("L", "PNG", 1), ("L", "JPEG", 1),
                                                  ("RGB", "JPEG", 3), ("RGB", "PNG", 3)])
def test_eval_images_are_the_files_preprocessed(tmp_path, mode, fmt, channels):
  _make_folder(tmp_path / "root", [3, 2, 4, 3], mode=mode, fmt=fmt)
  name = f"folder:{tmp_path / 'root'}"
  kwargs = dict(data_dir=str(tmp_path / "tfds"), protocol=data.Protocol(val_fraction=0.0))
  info = data.get_dataset_info(name, **kwargs)
  assert info.num_channels == channels
  assert (info.train_classes, info.test_classes) == (2, 2)
  assert (info.num_train_examples, info.num_test_examples) == (5, 7)
  got_images, got_labels = [], []
  for batch in data.eval_batches(name, batch_size=4, image_size=S, **kwargs):
    got_images.extend(batch["image"][batch["mask"]])
    got_labels.extend(batch["label"][batch["mask"]].tolist())
  # Test classes c02, c03 (labels 2, 3); the order is the prepared records', so match by label
  # and compare each image with an independent decode of its file.
  assert sorted(got_labels) == [2] * 4 + [3] * 3
  listing = image_folder.scan(str(tmp_path / "root"))
  expected = {}
  for rel, label in zip(listing.files, listing.labels):
    with open(os.path.join(listing.root, rel), "rb") as f:
      decoded = tf.io.decode_image(f.read(), channels=channels).numpy()
    expected.setdefault(int(label), []).append(
        data.preprocess_for_eval(decoded, name=name, image_size=S, num_channels=channels))
  for label in (2, 3):
    mine = np.stack([im for im, y in zip(got_images, got_labels) if y == label])
    theirs = np.stack(expected[label])
    # Same set of images (in some order): sort both by their pixel sums to align them.
    key = lambda x: np.argsort(x.reshape(len(x), -1).sum(axis=1))  # noqa: E731
    np.testing.assert_allclose(mine[key(mine)], theirs[key(theirs)], atol=1e-5)


def test_mixed_grayscale_and_rgb_folder_is_rgb(tmp_path):
  _make_folder(tmp_path / "root", [2, 2], mode="L")
  _save(str(tmp_path / "root" / "c01" / "colour.jpg"),
        np.zeros((8, 8, 3), np.uint8) + np.array([255, 0, 0], np.uint8), "JPEG")
  info = data.get_dataset_info(f"folder:{tmp_path / 'root'}", data_dir=str(tmp_path / "tfds"),
                               protocol=data.Protocol(val_fraction=0.0))
  assert info.num_channels == 3 and info.num_test_examples == 3


def test_split_rule_min_images_and_validation(tmp_path):
  # 10 classes; c03 and c07 have one image and are dropped, leaving 8: c00-c05 minus c03 train
  # (the first half of the kept classes), the rest test; the last 2 training classes validate.
  counts = [2, 3, 2, 1, 4, 2, 2, 1, 3, 2]
  _make_folder(tmp_path / "root", counts)
  name = f"folder:{tmp_path / 'root'}"
  source = datasets.get_source(name, str(tmp_path / "tfds"), data.Protocol(val_fraction=0.5))
  names = np.asarray(source.class_names)
  assert names[source.split_classes["train"]].tolist() == ["c00", "c01"]
  assert names[source.split_classes["val"]].tolist() == ["c02", "c04"]
  assert names[source.split_classes["test"]].tolist() == ["c05", "c06", "c08", "c09"]
  # The training classes are already 0-1 (what proxies index): the folder's own class ids stay.
  assert sorted(set(source.labels[source.positions("train")])) == [0, 1]
  assert sorted(set(source.labels[source.positions("val")])) == [2, 4]
  assert sorted(set(source.labels[source.positions("test")])) == [5, 6, 8, 9]
  assert (source.labels == -1).sum() == 2  # The dropped images.
  for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
    assert not set(source.positions(a)) & set(source.positions(b))
  batch = next(data.train_batches(name, classes_per_batch=2, samples_per_class=2, image_size=S,
                                  seed=0, data_dir=str(tmp_path / "tfds"),
                                  protocol=data.Protocol(val_fraction=0.5)))
  assert sorted(set(batch["label"].tolist())) == [0, 1]

  # min_images_per_class=3 keeps c01, c04, c08 only: 2 train (rounded half of 3), 1 test.
  strict = datasets.get_source(name, str(tmp_path / "tfds"),
                               data.Protocol(val_fraction=0.0, min_images_per_class=3))
  assert names[strict.split_classes["train"]].tolist() == ["c01", "c04"]
  assert names[strict.split_classes["test"]].tolist() == ["c08"]
  # Training classes 1 and 4 are not 0 .. T-1: every kept class is renumbered, train first.
  assert sorted(set(strict.labels[strict.positions("train")])) == [0, 1]
  assert sorted(set(strict.labels[strict.positions("test")])) == [2]
  assert (strict.labels == -1).sum() == counts[0] + sum(counts[2:4]) + sum(counts[5:8]) + counts[9]
  # A fraction, and explicit class lists.
  third = datasets.get_source(name, str(tmp_path / "tfds"),
                              data.Protocol(val_fraction=0.0, train_fraction=0.25))
  assert names[third.split_classes["train"]].tolist() == ["c00", "c01"]
  explicit = datasets.get_source(name, str(tmp_path / "tfds"), data.Protocol(
      val_fraction=0.0, train_classes=("c09", "c00"), test_classes=("c05",)))
  assert names[explicit.split_classes["train"]].tolist() == ["c00", "c09"]
  assert names[explicit.split_classes["test"]].tolist() == ["c05"]
  with pytest.raises(ValueError, match="no class folder named 'c99'"):
    datasets.get_source(name, str(tmp_path / "tfds"), data.Protocol(
        train_classes=("c99",), test_classes=("c05",)))
  with pytest.raises(ValueError, match="a validation split needs at least 2"):
    datasets.get_source(name, str(tmp_path / "tfds"), data.Protocol(val_fraction=0.1))


def test_prepared_once_and_again_when_the_folder_changes(tmp_path, caplog):
  _make_folder(tmp_path / "root", [2, 2])
  name, data_dir = f"folder:{tmp_path / 'root'}", str(tmp_path / "tfds")
  with caplog.at_level(logging.INFO):
    data.get_dataset_info(name, data_dir=data_dir, protocol=data.Protocol(val_fraction=0.0))
    assert "Preparing the image folder" in caplog.text
    caplog.clear()
    data.clear_cache()
    data.get_dataset_info(name, data_dir=data_dir, protocol=data.Protocol(val_fraction=0.0))
    assert "Preparing the image folder" not in caplog.text
    _save(str(tmp_path / "root" / "c01" / "new.png"), np.zeros((5, 5), np.uint8), "PNG")
    data.clear_cache()
    info = data.get_dataset_info(name, data_dir=data_dir,
                                 protocol=data.Protocol(val_fraction=0.0))
    assert "Preparing the image folder" in caplog.text
  assert info.num_test_examples == 3


def test_register_dataset_adds_a_named_folder_protocol(tmp_path):
  _make_folder(tmp_path / "data" / "birds", [2, 2, 2, 2, 2])
  spec = datasets.DatasetSpec(name="test_birds", folder=True, folder_name="birds",
                              num_channels=None, train_fraction=0.4)
  data.register_dataset(spec)
  try:
    with pytest.raises(ValueError, match="already registered"):
      data.register_dataset(spec)
    assert "test_birds" in data.dataset_names()
    info = data.get_dataset_info("test_birds", data_dir=str(tmp_path / "data"))
    assert (info.train_classes, info.test_classes) == (2, 3)
  finally:
    datasets._SPECS.pop("test_birds")


def test_a_spec_with_neither_a_tfds_builder_nor_a_folder_is_refused(monkeypatch):
  monkeypatch.setattr(datasets, "_SPECS", dict(datasets._SPECS))  # Whatever happens, undone.
  spec = datasets.DatasetSpec(name="test_nowhere", train_labels=range(0, 5),
                              test_labels=range(5, 10), num_channels=1)
  with pytest.raises(ValueError, match="neither a TFDS builder"):
    data.register_dataset(spec)
  assert "test_nowhere" not in data.dataset_names()
  # Nor does such a spec read scikit-learn's digits if it reaches the registry some other way.
  datasets._SPECS["test_nowhere"] = spec
  with pytest.raises(ValueError, match="neither a TFDS builder"):
    datasets.get_source("test_nowhere")
  # The built-in digits, the one dataset read without either, still are.
  assert data.get_dataset_info("digits").test_classes == 5


# --- The offline sets (the tars in shared/data). ---


def _unpacked(tmp_path_factory, tar_name):
  """The tar unpacked once per test session (shared by pytest-xdist workers); its data_dir."""
  path = os.path.join(SHARED, tar_name)
  if not os.path.exists(path):
    pytest.skip(f"{path} is not on this machine.")
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  data_dir = os.path.join(base, "offline_sets")
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, tar_name + ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = os.path.join(data_dir, tar_name + ".done")
    if not os.path.exists(done):
      with tarfile.open(path) as tar:
        tar.extractall(data_dir, filter="data")
      open(done, "w").close()
  return data_dir


@pytest.mark.parametrize("name, tar_name, channels, want", [
    # (train, val, test) classes and images.
    ("lfw", "lfw_a.tar", 1, ((672, 168, 840), None, 4126)),
    ("cars196_half", "cars196_half.tar", 3, ((78, 20, 98), None, 4092)),
    ("cub200_first50", "cub200_first50.tar", 3, ((20, 5, 25), None, None)),
])
def test_offline_sets_split_counts(tmp_path_factory, name, tar_name, channels, want):
  data_dir = _unpacked(tmp_path_factory, tar_name)
  info = data.get_dataset_info(name, data_dir=data_dir)
  classes, _, test_images = want
  assert info.num_channels == channels
  assert (info.train_classes, info.val_classes, info.test_classes) == classes
  if test_images is not None:
    assert info.num_test_examples == test_images
  source = datasets.get_source(name, data_dir)
  names = source.class_names
  if name == "cars196_half":  # The standard zero-shot split: classes 1-98 / 99-196.
    assert names[source.split_classes["test"][0]].startswith("099_")
    assert names[source.split_classes["val"][-1]].startswith("098_")
  if name == "cub200_first50":
    assert names[source.split_classes["test"][0]].startswith("026.")
  if name == "lfw":  # Everyone kept has two or more images; 1,680 people in all.
    kept = np.concatenate(list(source.split_classes.values()))
    assert kept.size == 1680
    assert np.bincount(source.raw_labels)[kept].min() >= 2
  batch = next(data.train_batches(name, classes_per_batch=4, samples_per_class=2, image_size=S,
                                  seed=0, data_dir=data_dir))
  assert batch["image"].shape == (8, S, S, channels)
  assert np.all(batch["label"] < info.train_classes)


def test_named_set_with_the_wrong_folder_is_an_error(tmp_path):
  _make_folder(tmp_path / "cub200", [2, 2])
  with pytest.raises(ValueError, match="dataset 'cub200_first50'.*has 50 and 2889"):
    data.get_dataset_info("cub200_first50", data_dir=str(tmp_path))



# --- The photo configs on a folder, end to end. ---


def _config(name, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name, arg, dataset", [
    ("folder", "npairs", "folder"), ("lfw", "triplet_hard", "lfw"),
    ("cars196", "multi_similarity,offline", "cars196_half"),
    ("cub200", "angular,offline", "cub200_first50")])
def test_photo_configs(name, arg, dataset):
  from rankjax import configs  # pylint: disable=g-import-not-at-top
  config = _config(name, arg)
  configs.check_config(config)
  assert config.dataset == dataset
  assert config.eval.every > 0 and config.model.pretrained == "imagenet"
  assert config.loss.name == arg.split(",")[0]
  # N-pairs needs one pair per class: its batch never asks for more classes than training has.
  pairs = _config(name, arg.replace(arg.split(",")[0], "npairs"))
  assert pairs.samples_per_class == 2
  assert pairs.classes_per_batch <= {"cub200_first50": 20}.get(dataset, 32)
  small = _config(name, arg + ",runlocal")
  configs.check_config(small)
  assert small.train.steps < 10
  # The untrained baselines: pooled features (no head) of the ImageNet and of a random network.
  for baseline, pretrained in (("imagenet_features", "imagenet"), ("random_init", None)):
    base = _config(name, f"{arg},{baseline}")
    configs.check_config(base)
    assert (base.train.steps, base.eval.every, base.model.embedding_dim) == (0, 0, None)
    assert base.model.pretrained == pretrained and base.dataset == dataset
  with pytest.raises(ValueError, match="choose one baseline"):
    _config(name, f"{arg},imagenet_features,random_init")


@pytest.mark.parametrize("name, arg", [("cars196", "contrastive,offline"),
                                       ("cub200", "npairs,offline"), ("lfw", "arcface")])
def test_the_cache224_recipe_and_its_baselines(name, arg):
  base = _config(name, arg)
  c = _config(name, f"{arg},cache224")
  configs.check_config(c)
  assert (c.image_size, c.frozen_cache.enabled, c.model.head_init) == (224, True, "pca")
  assert c.model.backbone_options.frozen_blocks == 13 and c.frozen_cache.views == 8
  assert c.train.checkpoint_every == c.eval.every  # Every evaluation has its checkpoint.
  assert (c.loss.name, c.classes_per_batch, c.samples_per_class) == (
      base.loss.name, base.classes_per_batch, base.samples_per_class)
  features = _config(name, f"{arg},cache224,imagenet_features")
  configs.check_config(features)
  assert (features.image_size, features.train.steps, features.model.embedding_dim) == (224, 0, None)
  assert features.model.head_init == "random" and features.frozen_cache.enabled


@pytest.mark.parametrize("name", ["cars196", "cub200"])
def test_baselines_of_the_fine_grained_sets_need_offline(name):
  with pytest.raises(ValueError, match="flags of the CPU recipe: add 'offline'"):
    _config(name, "npairs,imagenet_features")


def test_folder_config_trains_and_selects_on_validation(tmp_path):
  from rankjax import train  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  _make_folder(tmp_path / "root", [5] * 20, mode="RGB", fmt="JPEG")
  config = _config("folder", "triplet_semihard,runlocal")
  config.dataset = f"folder:{tmp_path / 'root'}"
  config.data_dir = str(tmp_path / "tfds")
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  report = json.loads((tmp_path / "run" / train.METRICS_FILE).read_text())
  assert report["checkpoint"] == "best" and "val/recall@1" in report
  assert all(np.isfinite(v) for v in metrics.values())
  # train.steps=0 evaluates the network as it is; embedding_dim=None on its pooled features.
  config.train.steps = 0
  untrained = train.train_and_evaluate(config, str(tmp_path / "untrained"))
  assert set(untrained) == set(metrics)
  report = json.loads((tmp_path / "untrained" / train.METRICS_FILE).read_text())
  assert report["checkpoint"] == "final" and report["checkpoint_step"] == 0
  config.model.embedding_dim = None
  pooled = train.train_and_evaluate(config, str(tmp_path / "pooled"))
  assert set(pooled) == set(metrics) and pooled != untrained


@pytest.mark.parametrize("target, match", [
    (".", "resolves to the image folder itself"),
    ("c00", "is the same folder as the class folder c00"),
])
def test_a_class_folder_that_links_to_the_root_or_another_class_is_an_error(tmp_path, target,
                                                                           match):
  root = tmp_path / "root"
  _make_folder(root, [2, 2])
  os.symlink(os.path.realpath(root / target), root / "zz_link")
  with pytest.raises(ValueError, match=match) as error:
    image_folder.scan(str(root))
  assert "zz_link" in str(error.value)


def test_the_names_of_dropped_classes_are_logged(tmp_path, caplog):
  _make_folder(tmp_path / "root", [2, 3, 2, 1, 4, 2, 2, 1, 3, 2])
  with caplog.at_level(logging.INFO):
    datasets.get_source(f"folder:{tmp_path / 'root'}", str(tmp_path / "tfds"),
                        data.Protocol(val_fraction=0.0))
  dropped = [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()]
  assert dropped and "c03" in dropped[0] and "c07" in dropped[0]


def test_a_one_class_folder_is_an_error_about_its_classes(tmp_path):
  _make_folder(tmp_path / "root", [3])
  with pytest.raises(ValueError, match="1 class with at least 2 images.*at least 2 classes"):
    datasets.get_source(f"folder:{tmp_path / 'root'}", str(tmp_path / "tfds"), data.Protocol())


def test_a_registered_dataset_trains_end_to_end(tmp_path):
  # The "adding a dataset" recipe: one spec, then config.dataset names it.
  from rankjax import train  # pylint: disable=g-import-not-at-top
  _make_folder(tmp_path / "data" / "birds", [3] * 8)
  data.register_dataset(datasets.DatasetSpec(
      name="test_birds_run", folder=True, folder_name="birds", num_channels=None,
      image_size=16, augment=False, train_fraction=0.5))
  try:
    c = configs.base_config()
    c.dataset, c.data_dir, c.image_size = "test_birds_run", str(tmp_path / "data"), 16
    c.model.name, c.model.backbone_options = "conv4", {"width": 4}
    c.classes_per_batch, c.samples_per_class = 4, 2  # 8: the tests' 8 devices.
    c.train.steps, c.train.log_every, c.eval.batch_size = 2, 1, 8
    c.protocol.val_fraction = 0.0
    metrics = train.train_and_evaluate(c, str(tmp_path / "run"))
    # The 4 test classes of 3 images: 12 queries, so Recall@1 is a multiple of 1/12.
    assert 0.0 <= metrics["recall@1"] <= 1.0
    assert metrics["recall@1"] * 12 == pytest.approx(round(metrics["recall@1"] * 12))
  finally:
    datasets._SPECS.pop("test_birds_run")  # pylint: disable=protected-access
