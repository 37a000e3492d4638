import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.datasets.errors import DatasetFileError
from flows.datasets.images import IMAGE_DATASETS, ImageData, load_image_dataset

MNIST_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An array in the IDX format: big-endian int32 magic and dims, then the uint8 data."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    data = idx_bytes(array, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_mnist(folder: Path, gz: bool = False, h: int = 5, w: int = 7, seed: int = 0) -> dict:
    """Tiny MNIST files (non-square images so a transposition would show)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, size=(6, h, w)),
        "train_labels": rng.integers(0, 10, size=6),
        "test_images": rng.integers(0, 256, size=(4, h, w)),
        "test_labels": rng.integers(0, 10, size=4),
    }
    arrays["train_images"][0, 0, :2] = (0, 255)
    for key, array in arrays.items():
        magic = 2051 if key.endswith("images") else 2049
        write_idx(folder / MNIST_NAMES[key], array, magic, gz=gz)
    return arrays


def make_cifar(root: Path, n: int = 3, protocol: int = pickle.HIGHEST_PROTOCOL) -> dict:
    """Tiny CIFAR-10 python batches with every key the real files have."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = batch
    return batches


# ---------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_idx_files(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    d = load_image_dataset("mnist", tmp_path)
    assert isinstance(d, ImageData) and d.name == "mnist" and d.levels == 256
    assert d.train.shape == (6, 1, 5, 7) and d.test.shape == (4, 1, 5, 7)
    assert d.shape == (1, 5, 7)
    assert d.train.dtype == torch.float32 and d.train_labels.dtype == torch.int64
    assert torch.equal(d.train[:, 0], torch.from_numpy(arrays["train_images"]).float())
    assert torch.equal(d.test[:, 0], torch.from_numpy(arrays["test_images"]).float())
    assert d.train_labels.tolist() == arrays["train_labels"].tolist()
    assert d.test_labels.tolist() == arrays["test_labels"].tolist()
    assert d.train[0, 0, 0, :2].tolist() == [0.0, 255.0]


def test_mnist_in_torchvision_layout_and_float64(tmp_path):
    arrays = make_mnist(tmp_path / "MNIST" / "raw", gz=True)
    d = load_image_dataset("mnist", str(tmp_path), dtype=torch.float64)
    assert d.train.dtype == torch.float64
    assert torch.equal(d.test[:, 0], torch.from_numpy(arrays["test_images"]).double())


def test_mnist_missing_file_names_expected_paths(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / MNIST_NAMES["test_labels"]).unlink()
    with pytest.raises(DatasetFileError) as err:
        load_image_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in msg
    assert str(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz") in msg
    assert "magic 2049" in msg
    assert err.value.path == tmp_path / "t10k-labels-idx1-ubyte"


def test_mnist_wrong_magic(tmp_path):
    arrays = make_mnist(tmp_path)
    # A labels-type header on the images file.
    bad = write_idx(tmp_path / MNIST_NAMES["train_images"], arrays["train_images"], 2049)
    with pytest.raises(DatasetFileError, match="wrong magic number 2049") as err:
        load_image_dataset("mnist", tmp_path)
    assert err.value.path == bad and "magic 2051" in str(err.value)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_data(tmp_path, gz):
    arrays = make_mnist(tmp_path)
    raw = idx_bytes(arrays["test_images"], 2051)[:-5]
    path = tmp_path / MNIST_NAMES["test_images"]
    path.unlink()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    with pytest.raises(DatasetFileError, match="truncated") as err:
        load_image_dataset("mnist", tmp_path)
    assert err.value.path == path


def test_mnist_truncated_gzip_stream(tmp_path):
    make_mnist(tmp_path, gz=True)
    path = tmp_path / (MNIST_NAMES["train_labels"] + ".gz")
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetFileError) as err:
        load_image_dataset("mnist", tmp_path)
    assert err.value.path == path


def test_mnist_truncated_header_and_count_mismatch(tmp_path):
    arrays = make_mnist(tmp_path)
    path = tmp_path / MNIST_NAMES["train_labels"]
    path.write_bytes(struct.pack(">I", 2049))
    with pytest.raises(DatasetFileError, match="truncated header"):
        load_image_dataset("mnist", tmp_path)
    write_idx(path, arrays["train_labels"][:-1], 2049)
    with pytest.raises(DatasetFileError, match="5 labels for the 6 images") as err:
        load_image_dataset("mnist", tmp_path)
    assert err.value.path == path


def test_mnist_and_cifar_need_a_root():
    for name in ("mnist", "cifar10"):
        with pytest.raises(ValueError, match="root directory is required"):
            load_image_dataset(name)


# ---------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_loads_python_batches(tmp_path, protocol):
    batches = make_cifar(tmp_path, protocol=protocol)
    d = load_image_dataset("cifar10", tmp_path)
    assert d.levels == 256 and d.shape == (3, 32, 32)
    assert d.train.shape == (15, 3, 32, 32) and d.test.shape == (3, 3, 32, 32)
    train_rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    # Row layout: 1024 red bytes, then green, then blue, each image row-major.
    assert d.train[4, 0, 0, 5].item() == train_rows[4, 5]
    assert d.train[4, 1, 2, 3].item() == train_rows[4, 1024 + 2 * 32 + 3]
    assert d.train[4, 2, 31, 31].item() == train_rows[4, 3071]
    assert torch.equal(d.train.reshape(15, -1), torch.from_numpy(train_rows).float())
    labels = [v for i in range(1, 6) for v in batches[f"data_batch_{i}"][b"labels"]]
    assert d.train_labels.tolist() == labels
    assert d.test_labels.tolist() == batches["test_batch"][b"labels"]
    assert d.train_labels.dtype == torch.int64


def test_cifar10_reads_python2_style_numpy_module_names(tmp_path):
    # The real batches were pickled with numpy 1.x, whose arrays name numpy.core.multiarray.
    make_cifar(tmp_path, protocol=2)
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        raw = path.read_bytes()
        assert b"numpy._core.multiarray\n" in raw
        path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert load_image_dataset("cifar10", tmp_path).train.shape == (15, 3, 32, 32)


def test_cifar10_missing_batch_names_path(tmp_path):
    make_cifar(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "test_batch"
    missing.unlink()
    with pytest.raises(DatasetFileError, match="not found") as err:
        load_image_dataset("cifar10", tmp_path)
    assert err.value.path == missing and str(missing) in str(err.value)
    assert "b'data'" in str(err.value)


def test_cifar10_truncated_pickle(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DatasetFileError) as err:
        load_image_dataset("cifar10", tmp_path)
    assert err.value.path == path


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, "not uint8"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "not uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside 0..9"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, "no b'data'"),
    ],
)
def test_cifar10_malformed_batches(tmp_path, batch, match):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetFileError, match=match) as err:
        load_image_dataset("cifar10", tmp_path)
    assert err.value.path == path


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent-dir/should-not-be-created"),))


def test_cifar10_refuses_pickles_that_call_other_code(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}))
    with pytest.raises(DatasetFileError, match="refusing"):
        load_image_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- digits and errors


def test_digits_from_sklearn_without_root():
    d = load_image_dataset("digits")
    assert d.levels == 17 and d.shape == (1, 8, 8)
    assert d.train.shape[1:] == (1, 8, 8) and d.test.shape[1:] == (1, 8, 8)
    n_train, n_test = len(d.train), len(d.test)
    assert n_train + n_test == 1797 and n_test == pytest.approx(0.2 * 1797, abs=1)
    for images in (d.train, d.test):
        assert images.min() == 0 and images.max() == 16
        assert torch.equal(images, images.round())
    assert sorted(torch.unique(d.train_labels).tolist()) == list(range(10))
    assert len(d.train_labels) == n_train and len(d.test_labels) == n_test
    again = load_image_dataset("digits", dtype=torch.float64)
    assert torch.equal(again.test.float(), d.test)
    assert torch.equal(again.test_labels, d.test_labels)


def test_unknown_name_and_dtype():
    with pytest.raises(ValueError, match="cifar10"):
        load_image_dataset("svhn")
    with pytest.raises(ValueError, match="dtype"):
        load_image_dataset("digits", dtype=torch.uint8)
    assert set(IMAGE_DATASETS) == {"mnist", "cifar10", "digits"}
