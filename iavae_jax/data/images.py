"""The image data sets: MNIST, Fashion-MNIST, Omniglot and binarised MNIST, as 28x28 ink = 1.

`load` returns float32 images [N, 28, 28] with values in [0, 1]: the training split keeps its grey
levels (the trainer binarises it afresh each epoch with `binarize`), the validation and test
splits are binarised once, so every model is scored on the same binary images.

Sources: ``source="tfds"`` reads a prepared TFDS data set through ``tfds.data_source`` (no
TensorFlow needed; the 'image' field; tensorflow-datasets is imported only then, an optional
dependency: ``pip install 'iavae-jax[tfds]'``); ``source="local"`` reads the original files from a
directory; ``source="auto"`` reads local files when data_dir (or `default_data_dir`) holds a
recognised set of them, else TFDS. Local files recognised, the first complete set in this order:
  mnist, fashion_mnist: train-images-idx3-ubyte + t10k-images-idx3-ubyte (the standard IDX
      files, gzipped or not); or images-idx3-ubyte alone (a pool with no test split, such as the
      5,000-image MNIST subset).
  omniglot: chardata.mat (Burda et al.'s 28x28 version: 'data' and 'testdata'); or Lake's
      images_background.zip + images_evaluation.zip; or images_background_small1.zip and/or
      images_background_small2.zip (pooled; the drawings in both, Greek and Latin, kept once).
  binarized_mnist: Larochelle's binarized_mnist_{train,valid,test}.amat.

``info["paper_split"]`` says whether the train/test split is the one the paper (after Kim et al.)
uses: True for MNIST and Fashion-MNIST from their standard train and test files (local or TFDS)
and for OMNIGLOT from Burda et al.'s chardata.mat (24,345 train, 8,070 test); False from any other
source (a pool such as the 5,000-image MNIST subset; Lake's zips or TFDS's Omniglot, whose split
is Lake's background/evaluation); None for data sets the paper does not use (binarized_mnist).

Splits depend only on split_seed (never on a model seed), through NumPy generators
``np.random.default_rng([split_seed, purpose])``:
  test: the shipped test split; where there is none, a random test_fraction of the pool
      (purpose 0).
  valid: binarized_mnist's shipped validation split; otherwise a random valid_fraction of what
      remains for training (purpose 1).
  binarisation: valid and test get one Bernoulli draw per pixel (purposes 2 and 3); images
      already in {0, 1} come out unchanged.
Held out are the first round(fraction * N) examples of a permutation (of that purpose), and the
rest stay in permuted order; a shipped split is permuted too (train: purpose 4), so the first n
examples of every split are a random sample of it.
"""

import dataclasses
import gzip
import io
import os
import struct
import zipfile
import zlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from iavae_jax.data import DATASETS, SOURCES

__all__ = ["IMAGE_SIZE", "PAPER_DATASETS", "DataError", "ImageSplits", "default_data_dir",
           "binarize", "load", "subset"]

IMAGE_SIZE = 28

PAPER_DATASETS = ("omniglot", "mnist", "fashion_mnist")
_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_IMAGES_MAGIC = 2051
_OMNIGLOT_SIZE = 105
_AMAT_SPLITS = ("train", "valid", "test")
# Purposes of the split generators default_rng([split_seed, purpose]).
_TEST_SPLIT, _VALID_SPLIT, _VALID_BINARIZE, _TEST_BINARIZE, _TRAIN_ORDER = range(5)

_HOW_TO_GET = {
    "mnist": ("the standard IDX files from http://yann.lecun.com/exdb/mnist/, or a directory "
              "holding images-idx3-ubyte.gz, such as a 5,000-image subset"),
    "fashion_mnist": "`apt-get install -y dataset-fashion-mnist` (puts them in "
                     f"{_FASHION_MNIST_DIR})",
    "omniglot": ("the zips from https://github.com/brendenlake/omniglot (python/), or "
                 "chardata.mat from https://github.com/yburda/iwae (datasets/OMNIGLOT)"),
    "binarized_mnist": ("the .amat files from "
                        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"),
}
_LOOKED_FOR = {
    "mnist": ("train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz], or "
              "images-idx3-ubyte[.gz]"),
    "omniglot": ("chardata.mat, or images_background.zip and images_evaluation.zip, or "
                 "images_background_small1.zip and/or images_background_small2.zip"),
    "binarized_mnist": ", ".join(f"binarized_mnist_{s}.amat" for s in _AMAT_SPLITS),
}
_LOOKED_FOR["fashion_mnist"] = _LOOKED_FOR["mnist"]
# TFDS splits read for (train, valid, test); None: none shipped.
_TFDS_SPLITS = {"mnist": ("train", None, "test"), "fashion_mnist": ("train", None, "test"),
                "omniglot": ("train", None, "test"),
                "binarized_mnist": ("train", "validation", "test")}


class DataError(ValueError):
  """Data that cannot be used: the message names the file or argument and says how to get or
  fix it."""


@dataclasses.dataclass(frozen=True)
class ImageSplits:
  train: np.ndarray  # [N_train, 28, 28] float32 in [0, 1]: grey levels, binarised per epoch
  valid: np.ndarray  # [N_valid, 28, 28] float32 in {0, 1}: binarised once with a fixed seed
  test: np.ndarray   # [N_test, 28, 28] float32 in {0, 1}: binarised once with a fixed seed
  info: dict         # JSON-serialisable: dataset, source, files or TFDS name, split rule, sizes


class _Read(NamedTuple):
  """Images as read, before splitting: float32 [N, 28, 28] in [0, 1]."""
  train: np.ndarray
  valid: Optional[np.ndarray]  # the shipped validation split, if any
  test: Optional[np.ndarray]   # the shipped test split, if any
  info: dict                   # where they came from and how they were converted


def default_data_dir(dataset: str) -> Optional[str]:
  """Where a system package puts the data set's files (fashion_mnist only), else None."""
  _check_dataset(dataset)
  return _FASHION_MNIST_DIR if dataset == "fashion_mnist" else None


def subset(data: ImageSplits, max_train: int = 0, max_valid: int = 0,
           max_test: int = 0) -> ImageSplits:
  """The first max_* examples of each split (0: all of it); ``load``'s splits are already
  shuffled, so these are random subsets. ``info`` is unchanged."""
  for name, value in (("max_train", max_train), ("max_valid", max_valid),
                      ("max_test", max_test)):
    if value < 0:
      raise ValueError(f"subset: {name} must be a non-negative integer (0: all), got {value}.")
  cap = lambda x, n: x[:n] if n else x
  return dataclasses.replace(data, train=cap(data.train, max_train),
                             valid=cap(data.valid, max_valid), test=cap(data.test, max_test))


def binarize(key: jax.Array, images: jax.Array) -> jax.Array:
  """A Bernoulli draw per pixel, images [..., 28, 28] in [0, 1] -> float32 {0, 1}. Jittable."""
  return jax.random.bernoulli(key, images).astype(jnp.float32)


def load(dataset: str, *, data_dir: Optional[str] = None, source: str = "auto",
         split_seed: int = 0, valid_fraction: float = 0.15,
         test_fraction: float = 0.15) -> ImageSplits:
  """Reads a data set and splits it into train (grey) and binarised valid and test sets.

  data_dir: the directory of local files, or TFDS's data directory for source="tfds" (None:
  `default_data_dir`, then TFDS's default). Raises DataError, naming the file or argument and how
  to fix it, for anything that cannot be used.
  """
  _check_dataset(dataset)
  if source not in SOURCES:
    raise DataError(f"source must be one of {', '.join(SOURCES)}; got {source!r}.")
  if data_dir is not None and not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir} does not exist or is not a directory.")

  directory = data_dir if data_dir is not None else default_data_dir(dataset)
  found = None
  if source != "tfds" and directory is not None and os.path.isdir(directory):
    found = _find_local(dataset, directory)
  if source == "local" and found is None:
    if directory is None:
      raise DataError(f"source='local' needs data_dir: a directory holding "
                      f"{_LOOKED_FOR[dataset]}; get {_HOW_TO_GET[dataset]}.")
    raise DataError(f"No {dataset} files in {directory}: looked for {_LOOKED_FOR[dataset]}. "
                    f"Get {_HOW_TO_GET[dataset]}.")
  if found is not None:
    read = _read_local(*found)
    paper_split = found[0] in ("idx", "chardata")
  else:
    no_local = (f"no local files ({_LOOKED_FOR[dataset]}) in {directory}, and "
                if source == "auto" and directory is not None else "")
    read = _read_tfds(dataset, data_dir, no_local)
    paper_split = dataset != "omniglot"
  read.info["paper_split"] = paper_split if dataset in PAPER_DATASETS else None
  return _split(dataset, read, split_seed, valid_fraction, test_fraction)


def _check_dataset(dataset: str):
  if dataset not in DATASETS:
    raise DataError(f"Unknown data set {dataset!r}: dataset must be one of "
                    f"{', '.join(DATASETS)}.")


def _split(dataset: str, read: _Read, split_seed: int, valid_fraction: float,
           test_fraction: float) -> ImageSplits:
  """Holds out test and valid where not shipped, and binarises them once."""
  train, valid, test = read.train, read.valid, read.test
  if test is None:
    rules = [f"test: a random {test_fraction:g} of the {len(train)} images "
             f"(numpy default_rng([split_seed, {_TEST_SPLIT}]) permutation)"]
    train, test = _hold_out(train, test_fraction, [split_seed, _TEST_SPLIT], "test_fraction")
  else:
    rules = [f"test: the shipped test split (permuted by default_rng([split_seed, "
             f"{_TEST_SPLIT}]))"]
    test = _permuted(test, [split_seed, _TEST_SPLIT])
  if valid is None:
    rules.append(f"valid: a random {valid_fraction:g} of the {len(train)} training images "
                 f"(numpy default_rng([split_seed, {_VALID_SPLIT}]) permutation)")
    train, valid = _hold_out(train, valid_fraction, [split_seed, _VALID_SPLIT], "valid_fraction")
  else:
    rules.append(f"valid: the shipped validation split (permuted by default_rng([split_seed, "
                 f"{_VALID_SPLIT}]), train by [split_seed, {_TRAIN_ORDER}])")
    train = _permuted(train, [split_seed, _TRAIN_ORDER])
    valid = _permuted(valid, [split_seed, _VALID_SPLIT])
  rules.append(f"valid and test binarised once, Bernoulli per pixel (numpy default_rng("
               f"[split_seed, {_VALID_BINARIZE}]) and [split_seed, {_TEST_BINARIZE}]); train "
               "kept grey")
  info = {"dataset": dataset, **read.info, "split": "; ".join(rules),
          "split_seed": int(split_seed),
          "sizes": {"train": len(train), "valid": len(valid), "test": len(test)}}
  return ImageSplits(train=train, valid=_binarize_once(valid, [split_seed, _VALID_BINARIZE]),
                     test=_binarize_once(test, [split_seed, _TEST_BINARIZE]), info=info)


def _hold_out(images: np.ndarray, fraction: float, seed: list,
              argument: str) -> tuple[np.ndarray, np.ndarray]:
  """Splits images [N, ...] into (rest, held out) by a seeded permutation."""
  num_held = int(round(fraction * len(images)))
  if not 0 < num_held < len(images):
    raise DataError(f"{argument}={fraction} of {len(images)} images holds out {num_held}: "
                    "both parts must be non-empty; use a data_dir with more images.")
  order = np.random.default_rng(seed).permutation(len(images))
  return images[order[num_held:]], images[order[:num_held]]


def _permuted(images: np.ndarray, seed: list) -> np.ndarray:
  """images [N, ...] in the order of a seeded permutation."""
  return images[np.random.default_rng(seed).permutation(len(images))]


def _binarize_once(images: np.ndarray, seed: list) -> np.ndarray:
  """Bernoulli per pixel, [N, 28, 28] -> float32 {0, 1}; values already 0 or 1 stay as they are
  (a uniform draw in [0, 1) is always below 1 and never below 0)."""
  uniform = np.random.default_rng(seed).random(images.shape, dtype=np.float32)
  return (uniform < images).astype(np.float32)


def _checked(images: np.ndarray, where: str) -> np.ndarray:
  """images [N, 28, 28] as float32 in [0, 1], or DataError naming `where`."""
  if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise DataError(f"{where}: images of shape {list(images.shape)}; expected [N, {IMAGE_SIZE}, "
                    f"{IMAGE_SIZE}] ({IMAGE_SIZE}x{IMAGE_SIZE} images).")
  if len(images) == 0:
    raise DataError(f"{where}: no images.")
  images = images.astype(np.float32, copy=False)
  if np.isnan(images).any():
    raise DataError(f"{where}: the images contain NaN.")
  if images.min() < 0 or images.max() > 1:
    raise DataError(f"{where}: values in [{images.min():g}, {images.max():g}]; expected [0, 1] "
                    "(grey levels scaled to [0, 1], or 0/1).")
  return images


def _from_uint8(images: np.ndarray, where: str) -> np.ndarray:
  """uint8 grey levels [N, 28, 28] -> float32 in [0, 1] (scaled by 1/255)."""
  return _checked(images.astype(np.float32) / 255, where)


def _omniglot_28(ink: np.ndarray) -> np.ndarray:
  """One 105x105 ink image, float32 in [0, 1] -> [28, 28]: PIL's BOX filter, the area average."""
  small = np.asarray(Image.fromarray(ink).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                 Image.Resampling.BOX))
  return np.clip(small, 0, 1)  # BOX weights sum to 1 only up to float rounding


# Local files.


def _find_file(directory: str, *names: str) -> Optional[str]:
  """The path of the first of names present in directory, or None."""
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def _find_local(dataset: str, directory: str) -> Optional[tuple[str, dict]]:
  """(layout, {role: path}) for the first complete set of recognised files, or None."""
  if dataset in ("mnist", "fashion_mnist"):
    train = _find_file(directory, "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
    test = _find_file(directory, "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")
    if train and test:
      return "idx", {"train": train, "test": test}
    pool = _find_file(directory, "images-idx3-ubyte.gz", "images-idx3-ubyte")
    if pool:
      return "idx_pool", {"pool": pool}
  elif dataset == "omniglot":
    chardata = _find_file(directory, "chardata.mat")
    if chardata:
      return "chardata", {"chardata": chardata}
    background = _find_file(directory, "images_background.zip")
    evaluation = _find_file(directory, "images_evaluation.zip")
    if background and evaluation:
      return "omniglot_zips", {"train": background, "test": evaluation}
    small = {f"small{i}": _find_file(directory, f"images_background_small{i}.zip")
             for i in (1, 2)}
    small = {role: path for role, path in small.items() if path}
    if small:
      return "omniglot_small", small
  else:
    paths = {s: _find_file(directory, f"binarized_mnist_{s}.amat") for s in _AMAT_SPLITS}
    if all(paths.values()):
      return "amat", paths
  return None


def _read_local(layout: str, paths: dict) -> _Read:
  """Reads the files `_find_local` found."""
  info = {"source": "local", "files": sorted(os.path.abspath(p) for p in paths.values())}
  if layout == "idx":
    return _Read(_read_idx(paths["train"]), None, _read_idx(paths["test"]), info)
  if layout == "idx_pool":
    return _Read(_read_idx(paths["pool"]), None, None, info)
  if layout == "chardata":
    train, test = _read_chardata(paths["chardata"])
    return _Read(train, None, test, info)
  if layout == "omniglot_zips":
    info["preprocessing"] = "105x105 PNGs, ink = 1, resized to 28x28 with PIL's BOX filter"
    return _Read(_read_omniglot_zips([paths["train"]])[0], None,
                 _read_omniglot_zips([paths["test"]])[0], info)
  if layout == "omniglot_small":
    images, num_duplicates = _read_omniglot_zips([paths[r] for r in sorted(paths)])
    info["preprocessing"] = (f"105x105 PNGs pooled ({num_duplicates} drawings present in more "
                             "than one zip kept once, by alphabet/character/file), ink = 1, "
                             "resized to 28x28 with PIL's BOX filter")
    return _Read(images, None, None, info)
  return _Read(*(_read_amat(paths[s]) for s in _AMAT_SPLITS), info)


def _read_idx(path: str) -> np.ndarray:
  """An IDX image file (magic 2051, big-endian uint32 count, rows, cols; then uint8 pixels),
  gzipped or not -> float32 [N, 28, 28] in [0, 1]."""
  try:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: cannot be read ({e}); the file is corrupt or truncated: get it "
                    "again.") from e
  if len(data) < 16:
    raise DataError(f"{path}: {len(data)} bytes, shorter than an IDX header (16 bytes).")
  magic, count, rows, cols = struct.unpack(">4I", data[:16])
  if magic != _IDX_IMAGES_MAGIC:
    raise DataError(f"{path}: magic number {magic}, expected {_IDX_IMAGES_MAGIC} (an IDX file "
                    "of uint8 images); the file is corrupt or not an image file.")
  if len(data) != 16 + count * rows * cols:
    raise DataError(f"{path}: {len(data) - 16} bytes of pixels, but the header says {count} "
                    f"images of {rows}x{cols} ({count * rows * cols} bytes): the file is "
                    "truncated or corrupt.")
  pixels = np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)
  return _from_uint8(pixels, path)


def _read_chardata(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Burda et al.'s chardata.mat -> (train, test), float32 [N, 28, 28] in [0, 1]."""
  try:
    mat = scipy.io.loadmat(path)
  except (OSError, ValueError, scipy.io.matlab.MatReadError) as e:
    raise DataError(f"{path}: cannot be read as a MATLAB file ({e}).") from e
  splits = []
  for name in ("data", "testdata"):
    if name not in mat:
      raise DataError(f"{path}: no '{name}' array (expected 'data' and 'testdata', 784 x N).")
    columns = np.asarray(mat[name])
    if columns.ndim != 2 or columns.shape[0] != IMAGE_SIZE * IMAGE_SIZE:
      raise DataError(f"{path}: '{name}' has shape {list(columns.shape)}; expected [784, N] "
                      f"(one {IMAGE_SIZE}x{IMAGE_SIZE} image per column).")
    # Each column is an image flattened column-major, as MATLAB stores it: pixel (r, c) is at
    # r + 28 c. Transposed, the array is [N, 784]; its Fortran-order reshape maps (n, r + 28 c)
    # to (n, r, c), the same per image as column.reshape((28, 28), order='F'). This is the IWAE
    # code's reshape_data (a C reshape to [N, 28, 28], then a Fortran flatten to [N, 784] read
    # as C-order images), i.e. each image transposed from a C-order reading of its column.
    splits.append(_checked(columns.T.reshape((-1, IMAGE_SIZE, IMAGE_SIZE), order="F"),
                           f"{path} '{name}'"))
  return splits[0], splits[1]


def _read_omniglot_zips(paths: list) -> tuple[np.ndarray, int]:
  """Lake's zips of <top>/<alphabet>/<character>/<drawing>.png, 105x105 binary, ink black ->
  (float32 [N, 28, 28] ink = 1, the number of duplicates dropped).

  A drawing is named by its path below the top-level folder; one present in several zips is
  kept once. Images are in the order of those names.
  """
  members = {}  # alphabet/character/drawing.png -> (zip path, member name)
  num_duplicates = 0
  for path in paths:
    try:
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as e:
      raise DataError(f"{path}: not a readable zip ({e}); get it again.") from e
    for name in names:
      parts = name.split("/")
      if len(parts) != 4 or not parts[3].endswith(".png"):
        continue
      key = "/".join(parts[1:])
      if key in members:
        num_duplicates += 1
      else:
        members[key] = (path, name)
  if not members:
    raise DataError(f"{', '.join(paths)}: no <alphabet>/<character>/<drawing>.png images; "
                    f"expected Lake's Omniglot zips ({_HOW_TO_GET['omniglot']}).")
  images = {}
  for path in paths:
    with zipfile.ZipFile(path) as zf:
      for key, (member_zip, name) in members.items():
        if member_zip == path:
          images[key] = _read_omniglot_png(zf, path, name)
  stacked = np.stack([images[key] for key in sorted(images)])
  return _checked(stacked, ", ".join(paths)), num_duplicates


def _read_omniglot_png(zf: zipfile.ZipFile, path: str, name: str) -> np.ndarray:
  """One 105x105 PNG of the zip -> float32 [28, 28], ink = 1."""
  try:
    image = Image.open(io.BytesIO(zf.read(name)))
    grey = np.asarray(image.convert("F"), np.float32) / 255
  except (OSError, UnidentifiedImageError, zipfile.BadZipFile) as e:
    raise DataError(f"{path}: {name} cannot be read as an image ({e}).") from e
  if grey.shape != (_OMNIGLOT_SIZE, _OMNIGLOT_SIZE):
    raise DataError(f"{path}: {name} is {grey.shape[1]}x{grey.shape[0]}; expected "
                    f"{_OMNIGLOT_SIZE}x{_OMNIGLOT_SIZE} Omniglot drawings.")
  return _omniglot_28(1 - grey)


def _read_amat(path: str) -> np.ndarray:
  """A Larochelle .amat file, one image per line as 784 whitespace-separated 0/1 values ->
  float32 [N, 28, 28]."""
  try:
    rows = np.loadtxt(path, dtype=np.float32, ndmin=2)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot be read as whitespace-separated numbers ({e}).") from e
  if rows.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
    raise DataError(f"{path}: {rows.shape[1]} values per line; expected "
                    f"{IMAGE_SIZE * IMAGE_SIZE} ({IMAGE_SIZE}x{IMAGE_SIZE} images, [N, 28, 28]).")
  return _checked(rows.reshape(-1, IMAGE_SIZE, IMAGE_SIZE), path)


# TFDS.


def _read_tfds(dataset: str, data_dir: Optional[str], no_local: str) -> _Read:
  """Reads the prepared TFDS data set's 'image' field; no_local prefixes the error's advice."""
  names = [s for s in _TFDS_SPLITS[dataset] if s is not None]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (optional, heavy)
  except ImportError as e:
    raise DataError(
        f"{no_local}TFDS needs tensorflow-datasets to read {dataset}, and it is not installed: "
        f"pip install 'iavae-jax[tfds]'. Or use local files: {_HOW_TO_GET[dataset]}.") from e
  try:
    sources = tfds.data_source(dataset, split=names, data_dir=data_dir, download=False)
    raw = {name: np.stack([np.asarray(example["image"]) for example in source])
           for name, source in zip(names, sources)}
  except (LookupError, RuntimeError, ValueError, OSError) as e:
    where = data_dir if data_dir is not None else "TFDS's default data directory"
    raise DataError(
        f"{no_local}TFDS {dataset} is not prepared for random access in {where} (TFDS says: "
        f"{str(e).splitlines()[0]}). Prepare "
        f"it with `tfds build {dataset} --file_format=array_record` on a machine with internet, "
        f"copy its data directory here and pass it as data_dir; or use local files: "
        f"{_HOW_TO_GET[dataset]}.") from e
  converted = {name: _from_tfds(dataset, images, f"TFDS {dataset} split {name!r}")
               for name, images in raw.items()}
  train, valid, test = (converted.get(s) for s in _TFDS_SPLITS[dataset])
  info = {"source": "tfds", "tfds_name": dataset, "tfds_splits": names,
          "data_dir": os.path.abspath(data_dir) if data_dir is not None else None}
  if dataset == "omniglot":
    info["preprocessing"] = ("105x105x3 images averaged to grey, ink = 1, resized to 28x28 "
                             "with PIL's BOX filter")
  return _Read(train, valid, test, info)


def _from_tfds(dataset: str, images: np.ndarray, where: str) -> np.ndarray:
  """TFDS 'image' uint8 [N, H, W, C] -> float32 [N, 28, 28] in [0, 1], ink = 1."""
  if dataset == "omniglot":
    if images.shape[1:] != (_OMNIGLOT_SIZE, _OMNIGLOT_SIZE, 3):
      raise DataError(f"{where}: images of shape {list(images.shape)}; expected "
                      f"[N, {_OMNIGLOT_SIZE}, {_OMNIGLOT_SIZE}, 3].")
    ink = 1 - images.astype(np.float32).mean(axis=-1) / 255
    return _checked(np.stack([_omniglot_28(image) for image in ink]), where)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if dataset == "binarized_mnist":
    return _checked(images, where)  # TFDS stores these pixels as 0 and 1, not 0 and 255
  return _from_uint8(images, where)
