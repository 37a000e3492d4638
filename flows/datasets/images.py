"""Image datasets read from their standard distribution files, without torchvision.

- ``mnist``: the four IDX files of the MNIST distribution, plain or gzipped,
  in ``root`` or ``root/MNIST/raw`` (torchvision's layout).
- ``cifar10``: the "python version" of CIFAR-10, ``root/cifar-10-batches-py``
  with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.
- ``digits``: scikit-learn's bundled 8x8 digits, no files needed; the last 20%
  of the samples (in sklearn's order) are the test set.

Images are returned as whole float tensors ``[N, C, H, W]`` holding the raw
integer intensities ``0 .. levels-1``; dequantisation and scaling are left to
the training code, which needs ``levels`` for bits per dimension.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.datasets.errors import DatasetFileError

__all__ = ["IMAGE_DATASETS", "ImageData", "load_image_dataset"]

IMAGE_DATASETS: tuple[str, ...] = ("mnist", "cifar10", "digits")

_N_CLASSES = 10

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_FORMAT = (
    "CIFAR-10 python batch: a pickled dict with b'data' (uint8 array [N, 3072]) "
    "and b'labels' (N ints in 0..9)"
)

_DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True, eq=False)
class ImageData:
    """Train and test images of one dataset with their class labels.

    ``train`` / ``test`` are ``[N, C, H, W]`` floats holding integers in
    ``0 .. levels-1``; ``train_labels`` / ``test_labels`` are ``[N]`` int64.
    """

    name: str
    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    levels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` shape of one image."""
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)


def load_image_dataset(
    name: str, root: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> ImageData:
    """Load an image dataset's train and test split as whole tensors.

    Args:
        name: one of :data:`IMAGE_DATASETS`.
        root: directory holding the distribution files; required for ``mnist``
            (IDX files in ``root`` or ``root/MNIST/raw``) and ``cifar10``
            (``root/cifar-10-batches-py``), ignored for ``digits``.
        dtype: floating dtype of the image tensors.

    Returns:
        :class:`ImageData`: MNIST ``[60000|10000, 1, 28, 28]`` with 256 levels,
        CIFAR-10 ``[50000|10000, 3, 32, 32]`` with 256 levels, digits
        ``[1438|359, 1, 8, 8]`` with 17 levels (values 0..16).

    Raises:
        ValueError: unknown name, non-floating dtype, or no ``root`` for a
            dataset read from files.
        DatasetFileError: a file is missing, truncated or not in the expected format.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; expected one of {list(IMAGE_DATASETS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if name == "digits":
        arrays, levels = _load_digits(), 17
    else:
        if root is None:
            raise ValueError(
                f"image dataset {name!r} is read from files: a root directory is required"
            )
        root = Path(root)
        arrays = _load_mnist(root) if name == "mnist" else _load_cifar10(root)
        levels = 256
    train, train_labels, test, test_labels = arrays
    return ImageData(
        name=name,
        train=torch.from_numpy(train).to(dtype),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)),
        test=torch.from_numpy(test).to(dtype),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)),
        levels=levels,
    )


# ---------------------------------------------------------------- MNIST (IDX)


def _idx_format(magic: int) -> str:
    if magic == _IDX_IMAGES_MAGIC:
        return (
            f"MNIST IDX file (magic {magic}): big-endian int32 magic, count, rows, cols, "
            "then count*rows*cols unsigned bytes; plain or gzipped"
        )
    return (
        f"MNIST IDX file (magic {magic}): big-endian int32 magic, count, "
        "then count unsigned bytes; plain or gzipped"
    )


def _find_mnist_file(root: Path, filename: str, fmt: str) -> Path:
    """The first existing of ``filename`` / ``filename.gz`` in root, then root/MNIST/raw."""
    candidates = [
        folder / f"{filename}{suffix}"
        for folder in (root, root / "MNIST" / "raw")
        for suffix in ("", ".gz")
    ]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise DatasetFileError(candidates[0], fmt, f"MNIST file not found (looked for {looked})")


def _read_bytes(path: Path, fmt: str) -> bytes:
    """The file's content, decompressed when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        # A cut-off .gz raises EOFError; a non-gzip one gzip.BadGzipFile (an OSError).
        raise DatasetFileError(path, fmt, f"cannot read file ({exc})") from exc


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file into a uint8 array of its header's shape."""
    fmt = _idx_format(magic)
    raw = _read_bytes(path, fmt)
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise DatasetFileError(path, fmt, f"truncated header ({len(raw)} bytes, need {header_len})")
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise DatasetFileError(path, fmt, f"wrong magic number {int(header[0])}")
    dims = tuple(int(d) for d in header[1:])
    expected = int(np.prod(dims)) + header_len
    if len(raw) != expected:
        problem = "truncated data" if len(raw) < expected else "trailing bytes after the data"
        raise DatasetFileError(
            path, fmt, f"{problem}: header says {dims}, so {expected} bytes, file has {len(raw)}"
        )
    # Copy: frombuffer views the immutable bytes, and torch wants writable arrays.
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def _load_mnist_split(
    root: Path, images_key: str, labels_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 1, H, W] and labels [N] of one MNIST split."""
    images_path = _find_mnist_file(root, _MNIST_FILES[images_key], _idx_format(_IDX_IMAGES_MAGIC))
    labels_path = _find_mnist_file(root, _MNIST_FILES[labels_key], _idx_format(_IDX_LABELS_MAGIC))
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise DatasetFileError(
            labels_path,
            _idx_format(_IDX_LABELS_MAGIC),
            f"{len(labels)} labels for the {len(images)} images in {images_path}",
        )
    if labels.size and labels.max() >= _N_CLASSES:
        raise DatasetFileError(
            labels_path, _idx_format(_IDX_LABELS_MAGIC), f"label {labels.max()} outside 0..9"
        )
    return images[:, None], labels


def _load_mnist(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train, train_labels = _load_mnist_split(root, "train_images", "train_labels")
    test, test_labels = _load_mnist_split(root, "test_images", "test_labels")
    if train.shape[1:] != test.shape[1:]:
        raise DatasetFileError(
            _find_mnist_file(root, _MNIST_FILES["test_images"], _idx_format(_IDX_IMAGES_MAGIC)),
            _idx_format(_IDX_IMAGES_MAGIC),
            f"test images are {test.shape[2:]}, training images {train.shape[2:]}",
        )
    return train, train_labels, test, test_labels


# ---------------------------------------------------------------- CIFAR-10 (pickle)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers.

    A pickle can run arbitrary code on load; a CIFAR batch needs nothing but
    numpy's array reconstructors, so anything else is refused.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Protocol-2 pickles written by Python 3 encode bytes objects through this.
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as images uint8 [N, 3, 32, 32] and labels [N]."""
    if not path.is_file():
        raise DatasetFileError(path, _CIFAR_FORMAT, "CIFAR-10 batch file not found")
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        ImportError,
    ) as exc:
        # Truncated or foreign pickles fail with any of these, depending on where they break.
        raise DatasetFileError(path, _CIFAR_FORMAT, f"cannot unpickle file ({exc!r})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = list(batch)[:8] if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFileError(path, _CIFAR_FORMAT, f"no b'data' / b'labels' entries ({found})")
    data, labels = batch[b"data"], batch[b"labels"]
    row = int(np.prod(_CIFAR_SHAPE))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != row
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise DatasetFileError(path, _CIFAR_FORMAT, f"b'data' is {desc}, not uint8 [N, {row}]")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetFileError(path, _CIFAR_FORMAT, f"b'labels' is not integers ({exc})") from exc
    if labels.shape != (len(data),):
        raise DatasetFileError(path, _CIFAR_FORMAT, f"{labels.shape} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= _N_CLASSES):
        raise DatasetFileError(path, _CIFAR_FORMAT, "labels outside 0..9")
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    return data.reshape(-1, *_CIFAR_SHAPE), labels


def _load_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / _CIFAR_DIR
    parts = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN_BATCHES]
    train = np.concatenate([images for images, _ in parts])
    train_labels = np.concatenate([labels for _, labels in parts])
    test, test_labels = _read_cifar_batch(folder / _CIFAR_TEST_BATCH)
    return train, train_labels, test, test_labels


# ---------------------------------------------------------------- sklearn digits


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # sklearn stores the 0..16 counts as float64; round-trip through uint8 to be exact.
    images = np.rint(digits.images).astype(np.uint8)[:, None]
    labels = np.asarray(digits.target, dtype=np.int64)
    n_train = len(images) - round(_DIGITS_TEST_FRACTION * len(images))
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]
