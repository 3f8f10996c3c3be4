"""The image data sets: local files, TFDS (mocked), splits, refusals with advice, binarisation."""

import gzip
import json
import os
import sys

import chex
import jax
import numpy as np
import pytest
import scipy.io

from iavae_jax.data import images
from conftest import real_data, write_idx, write_omniglot_zip


def _assert_splits(splits: images.ImageSplits, num_train: int, num_valid: int, num_test: int):
  """Shapes, dtypes and ranges of every split; info is JSON and states the sizes."""
  chex.assert_shape(splits.train, (num_train, 28, 28))
  chex.assert_shape(splits.valid, (num_valid, 28, 28))
  chex.assert_shape(splits.test, (num_test, 28, 28))
  for split in (splits.train, splits.valid, splits.test):
    assert split.dtype == np.float32
    assert 0 <= split.min() and split.max() <= 1
  for split in (splits.valid, splits.test):
    assert set(np.unique(split)) <= {0.0, 1.0}
  assert json.loads(json.dumps(splits.info))["sizes"] == {
      "train": num_train, "valid": num_valid, "test": num_test}


def _read_idx_pool(path: str) -> np.ndarray:
  """The raw uint8 pixels [N, 28, 28] of an IDX file, read independently of the module."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)


# TFDS, mocked offline (tensorflow-datasets is an optional extra).


def _tfds():
  return pytest.importorskip("tensorflow_datasets",
                             reason="tensorflow-datasets is not installed (the tfds extra)")


def test_tfds_mnist_mock_shapes_ranges_and_valid_fraction():
  tfds = _tfds()
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    splits = images.load("mnist", source="tfds", valid_fraction=0.25)
  _assert_splits(splits, 30, 10, 40)
  assert splits.info["source"] == "tfds" and splits.info["tfds_name"] == "mnist"


def test_tfds_omniglot_mock_is_resized_to_28x28():
  tfds = _tfds()
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    splits = images.load("omniglot", source="tfds")
  _assert_splits(splits, 10, 2, 12)


def test_tfds_binarized_mnist_keeps_the_shipped_validation_split():
  tfds = _tfds()
  rng = np.random.default_rng(0)

  def data_source(builder, split, **kwargs):
    del builder, kwargs
    sizes = {"train": 30, "validation": 10, "test": 12}
    return [[{"image": rng.integers(0, 2, (28, 28, 1), np.uint8)} for _ in range(sizes[s])]
            for s in split]

  with tfds.testing.mock_data(as_data_source_fn=data_source,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    splits = images.load("binarized_mnist", source="tfds")
  _assert_splits(splits, 30, 10, 12)
  assert set(np.unique(splits.train)) == {0.0, 1.0}  # stored as 0/1, not scaled by 1/255
  assert "valid: the shipped validation split" in splits.info["split"]


def test_tfds_binarized_mnist_refuses_grey_levels():
  # TFDS's mock fills images with 0..254, which a binarised set must not hold.
  tfds = _tfds()
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(images.DataError, match=r"expected \[0, 1\]"):
      images.load("binarized_mnist", source="tfds")


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  _tfds()
  with pytest.raises(images.DataError, match="tfds build mnist") as error:
    images.load("mnist", source="tfds", data_dir=str(tmp_path))
  assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("source", ["tfds", "auto"])
def test_tfds_missing_says_how_to_install_it(tmp_path, monkeypatch, source):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # importing it raises
  with pytest.raises(images.DataError) as error:
    images.load("mnist", data_dir=str(tmp_path), source=source)
  message = str(error.value)
  assert "needs tensorflow-datasets" in message and "pip install 'iavae-jax[tfds]'" in message
  assert "yann.lecun.com/exdb/mnist" in message               # the local files, the other way
  assert ("no local files" in message) == (source == "auto")


# The real local data sets.


def test_fashion_mnist_local_uses_the_shipped_test_split():
  if not os.path.isdir(images.default_data_dir("fashion_mnist")):
    pytest.skip("needs Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
  splits = images.load("fashion_mnist")
  _assert_splits(splits, 51_000, 9_000, 10_000)
  assert splits.info["source"] == "local"
  assert 0.2 < splits.train.mean() < 0.4


def test_mnist_5k_split_sizes_and_determinism():
  mnist_5k = real_data("mnist-5k")
  first = images.load("mnist", data_dir=mnist_5k, split_seed=0)
  _assert_splits(first, 3_612, 638, 750)  # test round(0.15 * 5000), valid round(0.15 * 4250)
  again = images.load("mnist", data_dir=mnist_5k, split_seed=0)
  other = images.load("mnist", data_dir=mnist_5k, split_seed=1)
  for name in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(getattr(first, name), getattr(other, name))
  assert "default_rng([split_seed, 0])" in first.info["split"]


def test_mnist_5k_splits_partition_the_pool():
  mnist_5k = real_data("mnist-5k")
  pool = _read_idx_pool(os.path.join(mnist_5k, "images-idx3-ubyte.gz"))
  splits = images.load("mnist", data_dir=mnist_5k)
  flat_pool = pool.reshape(len(pool), -1).astype(np.float32) / 255
  by_bytes = {image.tobytes(): i for i, image in enumerate(pool)}
  assert len(by_bytes) == len(pool)
  train = [by_bytes[np.rint(image * 255).astype(np.uint8).tobytes()] for image in splits.train]

  def sources(binary: np.ndarray) -> list:
    # The pool image under which the binary draw is most likely (Bernoulli log-likelihood).
    flat = binary.reshape(len(binary), -1)
    p = np.clip(flat_pool, 1e-6, 1 - 1e-6)
    log_likelihood = flat @ np.log(p).T + (1 - flat) @ np.log1p(-p).T
    return list(np.argmax(log_likelihood, axis=1))

  origins = train + sources(splits.valid) + sources(splits.test)
  assert sorted(origins) == list(range(len(pool)))


def test_omniglot_small_sets_pool_4840_distinct_drawings():
  splits = images.load("omniglot", data_dir=real_data("omniglot"))
  _assert_splits(splits, 3_497, 617, 726)
  assert sum(splits.info["sizes"].values()) == 4_840
  assert "1000 drawings present in more than one zip" in splits.info["preprocessing"]
  assert len({image.tobytes() for image in splits.train}) == len(splits.train)
  assert 0.02 < splits.train.mean() < 0.5  # ink = 1 on a mostly empty page


# Local formats, written to temporary directories.


def test_idx_pair_uncompressed_scales_by_1_over_255(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (20, 28, 28), np.uint8)
  test = rng.integers(0, 256, (6, 28, 28), np.uint8)
  write_idx(str(tmp_path / "train-images-idx3-ubyte"), train)
  write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), test)
  splits = images.load("mnist", data_dir=str(tmp_path), source="local", valid_fraction=0.25)
  _assert_splits(splits, 15, 5, 6)
  assert "test: the shipped test split" in splits.info["split"]
  shipped_train = {image.tobytes() for image in train}
  for image in splits.train:  # grey levels / 255, from the training file
    np.testing.assert_allclose(image * 255, np.rint(image * 255), atol=1e-4)
    assert np.rint(image * 255).astype(np.uint8).tobytes() in shipped_train


def test_idx_of_32x32_images_is_refused(tmp_path):
  write_idx(str(tmp_path / "images-idx3-ubyte.gz"), np.zeros((10, 32, 32), np.uint8))
  with pytest.raises(images.DataError, match=r"\[10, 32, 32\].*expected \[N, 28, 28\]"):
    images.load("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("damage", ["magic", "truncated", "not_gzip", "short"])
def test_corrupt_idx_names_the_file(tmp_path, damage):
  path = str(tmp_path / "images-idx3-ubyte.gz")
  pixels = np.zeros((10, 28, 28), np.uint8)
  if damage == "magic":
    write_idx(path, pixels, magic=2049)
  elif damage == "truncated":
    write_idx(path, pixels)
    with gzip.open(path, "rb") as f:
      data = f.read()
    with gzip.open(path, "wb") as f:
      f.write(data[:-100])
  elif damage == "not_gzip":
    with open(path, "wb") as f:
      f.write(b"not a gzip file at all")
  else:
    with gzip.open(path, "wb") as f:
      f.write(b"\x00\x00\x08")
  with pytest.raises(images.DataError, match="images-idx3-ubyte.gz"):
    images.load("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("dataset, advice", [
    ("mnist", "yann.lecun.com/exdb/mnist"),
    ("fashion_mnist", "apt-get install -y dataset-fashion-mnist"),
    ("omniglot", "github.com/brendenlake/omniglot"),
    ("binarized_mnist", "binarized_mnist_valid.amat"),
])
def test_missing_files_are_named_with_how_to_get_them(tmp_path, dataset, advice):
  with pytest.raises(images.DataError) as error:
    images.load(dataset, data_dir=str(tmp_path), source="local")
  assert str(tmp_path) in str(error.value) and advice in str(error.value)
  # auto falls back to TFDS, and says what it looked for locally as well (and how to prepare the
  # TFDS set, or, without tensorflow-datasets, how to install it).
  with pytest.raises(images.DataError,
                     match=rf"(?s)no local files.*(tfds build {dataset}|iavae-jax\[tfds\])"):
    images.load(dataset, data_dir=str(tmp_path))


def test_bad_arguments_are_refused(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(images.DataError, match="nowhere"):
    images.load("mnist", data_dir=missing)
  with pytest.raises(images.DataError, match="mnist, fashion_mnist, omniglot, binarized_mnist"):
    images.load("cifar10")
  write_idx(str(tmp_path / "images-idx3-ubyte.gz"), np.zeros((10, 28, 28), np.uint8))
  with pytest.raises(images.DataError, match="test_fraction=0.0 of 10 images holds out 0"):
    images.load("mnist", data_dir=str(tmp_path), test_fraction=0.0)
  with pytest.raises(images.DataError, match="source must be one of auto, local, tfds; got 'web'"):
    images.load("mnist", data_dir=str(tmp_path), source="web")


def test_default_data_dir():
  assert images.default_data_dir("fashion_mnist") == "/usr/share/datasets/fashion-mnist"
  assert images.default_data_dir("mnist") is None


def test_chardata_columns_are_column_major_images(tmp_path):
  image = np.zeros((28, 28), np.float32)
  image[0, :] = 1.0   # top row
  image[:, 3] = 0.5   # a column near the left
  image[27, 27] = 0.25
  batch = np.stack([image, image.T, image, image])
  # MATLAB stores an image column by column: pixel (r, c) at r + 28 c.
  columns = np.stack([b.ravel(order="F") for b in batch], axis=1)  # [784, 4]
  scipy.io.savemat(str(tmp_path / "chardata.mat"), {"data": columns, "testdata": columns[:, :1]})
  splits = images.load("omniglot", data_dir=str(tmp_path), valid_fraction=0.25)
  _assert_splits(splits, 3, 1, 1)
  train_and_valid = {b.tobytes() for b in batch}
  assert {b.tobytes() for b in splits.train} <= train_and_valid
  binary = (image == 0) | (image == 1)  # pixels the binarisation leaves as they are
  np.testing.assert_array_equal(splits.test[0][binary], image[binary])


@pytest.mark.parametrize("bad", [1.5, -0.5, np.nan])
def test_values_out_of_range_are_refused(tmp_path, bad):
  columns = np.full((784, 4), 0.5, np.float32)
  columns[10, 2] = bad
  scipy.io.savemat(str(tmp_path / "chardata.mat"), {"data": columns, "testdata": columns})
  with pytest.raises(images.DataError, match="chardata.mat"):
    images.load("omniglot", data_dir=str(tmp_path))


def _write_amat(path: str, rows: np.ndarray):
  np.savetxt(path, rows, fmt="%d")


def test_amat_keeps_the_shipped_validation_split(tmp_path):
  rng = np.random.default_rng(0)
  shipped = {s: rng.integers(0, 2, (n, 784)) for s, n in
             (("train", 10), ("valid", 6), ("test", 7))}
  for split, rows in shipped.items():
    _write_amat(str(tmp_path / f"binarized_mnist_{split}.amat"), rows)
  splits = images.load("binarized_mnist", data_dir=str(tmp_path))
  _assert_splits(splits, 10, 6, 7)
  for split in ("train", "valid", "test"):
    # Binary data comes through the binarisation as is, in a seeded random order.
    loaded = getattr(splits, split).reshape(-1, 784)
    assert not np.array_equal(loaded, shipped[split])
    np.testing.assert_array_equal(np.unique(loaded, axis=0), np.unique(shipped[split], axis=0))
  assert "valid: the shipped validation split" in splits.info["split"]


def test_amat_with_a_short_line_is_refused(tmp_path):
  for split in ("train", "valid", "test"):
    _write_amat(str(tmp_path / f"binarized_mnist_{split}.amat"), np.zeros((2, 784), int))
  _write_amat(str(tmp_path / "binarized_mnist_valid.amat"), np.zeros((2, 783), int))
  with pytest.raises(images.DataError, match="binarized_mnist_valid.amat.*783"):
    images.load("binarized_mnist", data_dir=str(tmp_path))


def test_omniglot_full_zips_train_on_background_test_on_evaluation(tmp_path):
  page = np.ones((105, 105), bool)
  stroke = page.copy()
  stroke[:30, :30] = False  # black ink in the top-left corner
  write_omniglot_zip(str(tmp_path / "images_background.zip"), "images_background",
                      {f"Latin/character{i:02d}/{i}_01.png": stroke for i in range(4)})
  write_omniglot_zip(str(tmp_path / "images_evaluation.zip"), "images_evaluation",
                      {"Atlantean/character01/1_01.png": page})
  splits = images.load("omniglot", data_dir=str(tmp_path), valid_fraction=0.25)
  _assert_splits(splits, 3, 1, 1)
  assert not splits.test.any()  # a blank page has no ink
  # 30 of 105 pixels = 8 of 28 exactly: ink 1 there, 0 beyond.
  np.testing.assert_allclose(splits.train[:, :8, :8], 1.0)
  np.testing.assert_allclose(splits.train[:, 8:, :], 0.0)


def test_paper_split_says_whether_the_split_is_the_papers(tmp_path):
  # OMNIGLOT: Burda et al.'s chardata.mat is the paper's split, Lake's zips are not; MNIST: the
  # standard train and test files are, a pool is not; binarized_mnist is not in the paper.
  columns = np.zeros((784, 4), np.float32)
  page = np.ones((105, 105), bool)
  writers = {
      ("omniglot", True): lambda d: scipy.io.savemat(str(d / "chardata.mat"),
                                                     {"data": columns, "testdata": columns}),
      ("omniglot", False): lambda d: [write_omniglot_zip(
          str(d / f"images_{top}.zip"), f"images_{top}",
          {f"Latin/character01/{i}_01.png": page for i in range(4)})
          for top in ("background", "evaluation")],
      ("mnist", True): lambda d: [write_idx(str(d / f"{name}-images-idx3-ubyte.gz"),
                                            np.zeros((4, 28, 28), np.uint8))
                                  for name in ("train", "t10k")],
      ("mnist", False): lambda d: write_idx(str(d / "images-idx3-ubyte.gz"),
                                            np.zeros((8, 28, 28), np.uint8)),
      ("binarized_mnist", None): lambda d: [np.savetxt(str(d / f"binarized_mnist_{s}.amat"),
                                                       np.zeros((4, 784)), fmt="%d")
                                            for s in ("train", "valid", "test")],
  }
  for (dataset, paper_split), write in writers.items():
    directory = tmp_path / f"{dataset}_{paper_split}"
    directory.mkdir()
    write(directory)
    info = images.load(dataset, data_dir=str(directory), valid_fraction=0.25).info
    assert info["paper_split"] is paper_split, (dataset, info)


def test_omniglot_drawing_of_the_wrong_size_is_refused(tmp_path):
  write_omniglot_zip(str(tmp_path / "images_background_small1.zip"), "images_background_small1",
                      {"Latin/character01/1_01.png": np.ones((64, 64), bool)})
  with pytest.raises(images.DataError, match=r"1_01.png is 64x64; expected 105x105"):
    images.load("omniglot", data_dir=str(tmp_path))


# binarize.


def test_binarize_is_a_bernoulli_draw_and_jits(key):
  probabilities = jax.random.uniform(jax.random.PRNGKey(1), (64, 28, 28))
  binary = images.binarize(key, probabilities)
  chex.assert_shape(binary, (64, 28, 28))
  assert binary.dtype == np.float32
  assert set(np.unique(np.asarray(binary))) == {0.0, 1.0}
  assert abs(float(binary.mean()) - float(probabilities.mean())) < 0.01  # 50,176 pixels
  np.testing.assert_array_equal(jax.jit(images.binarize)(key, probabilities), binary)
  assert not np.array_equal(images.binarize(jax.random.PRNGKey(2), probabilities), binary)
