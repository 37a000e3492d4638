"""The five MAF tabular density-estimation datasets, preprocessed as FFJORD does.

The files are the ones distributed with MAF (Papamakarios et al., 2017) and read
by FFJORD's ``datasets`` package. Each loader reproduces that package's steps
exactly (seeds, shuffles, column removal, noise, split sizes, normalisation
statistics), because published log-likelihoods are only comparable on the same
splits. Summary, with ``d`` the resulting dimension:

- POWER (d=6): shuffle with seed 42, drop global reactive power and global
  intensity, add uniform dequantisation noise, split, standardise by train+val.
- GAS (d=8 on the real file): drop Meth/Eth/Time, repeatedly drop the first
  column correlated above 0.98 with another one, standardise by all rows, split.
- HEPMASS (d=21): keep signal rows (label 1), standardise by the training file,
  drop features whose smallest value repeats more than 5 times, split val off.
- MINIBOONE (d=43): split, standardise by train+val.
- BSDS300 (d=63): stored splits, used as is.

Splits are always taken from the end: the last 10% of the rows are the test set
and the last 10% of the remainder the validation set (HEPMASS and BSDS300 come
with their own test files). Data are returned as whole tensors.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from flows.datasets.errors import DatasetFileError

TABULAR_DATASETS: tuple[str, ...] = ("power", "gas", "hepmass", "miniboone", "bsds300")

_Splits = tuple[np.ndarray, np.ndarray, np.ndarray]

_POWER_FORMAT = "NumPy .npy array of shape [N, 8] (UCI household power, MAF preprocessed)"
_GAS_FORMAT = (
    "pandas DataFrame pickle with columns 'Time', 'Meth', 'Eth' and 16 sensor columns "
    "(UCI gas sensors ethylene_CO, MAF preprocessed)"
)
_HEPMASS_TRAIN_FORMAT = (
    "CSV with a header row, the 0/1 label column first, then the features "
    "(UCI HEPMASS '1000' training file)"
)
_HEPMASS_TEST_FORMAT = (
    "CSV with a header row, the 0/1 label column first, then the training file's features "
    "and one extra trailing column (UCI HEPMASS '1000' test file)"
)
_MINIBOONE_FORMAT = "NumPy .npy array of shape [N, 43] (UCI MiniBooNE, MAF preprocessed)"
_BSDS300_FORMAT = (
    "HDF5 file with datasets 'train', 'validation', 'test' of shape [N, 63] "
    "(BSDS300 8x8 patches, MAF preprocessed)"
)

_POWER_RAW_COLUMNS = 8
_GAS_SENSOR_COLUMNS = 16
_GAS_DROPPED_COLUMNS = ("Meth", "Eth", "Time")
_GAS_CORRELATION_LIMIT = 0.98
_HEPMASS_MAX_MIN_REPEATS = 5
_MINIBOONE_COLUMNS = 43
_BSDS300_COLUMNS = 63
_BSDS300_KEYS = ("train", "validation", "test")


@dataclass(frozen=True, eq=False)
class TabularData:
    """Train / validation / test splits of one tabular dataset, each ``[N_split, d]``."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    @property
    def dim(self) -> int:
        """The data dimension ``d`` (number of columns)."""
        return int(self.train.shape[1])


def load_tabular(name: str, root: str | Path, dtype: torch.dtype = torch.float32) -> TabularData:
    """Load and preprocess one MAF tabular dataset exactly as FFJORD does.

    Args:
        name: one of ``TABULAR_DATASETS``.
        root: the MAF data directory. Files are read from exactly
            ``root/power/data.npy``, ``root/gas/ethylene_CO.pickle``,
            ``root/hepmass/1000_train.csv`` and ``root/hepmass/1000_test.csv``,
            ``root/miniboone/data.npy`` and ``root/BSDS300/BSDS300.hdf5``.
        dtype: floating dtype of the returned tensors. Preprocessing runs in the
            files' own precision, as in the reference, and is cast once at the end.

    Returns:
        ``TabularData`` whose ``train``, ``val`` and ``test`` are CPU tensors of
        shape ``[N_split, d]``: d = 6 (power), 8 (gas), 21 (hepmass),
        43 (miniboone), 63 (bsds300) on the real files.

    Raises:
        ValueError: unknown ``name`` or non-floating ``dtype``.
        DatasetFileError: a file is missing or malformed; the message names the
            expected path and format.
        ImportError: pandas (gas, hepmass) or h5py (bsds300) is not installed.
    """
    if name not in _LOADERS:
        raise ValueError(
            f"unknown tabular dataset {name!r}; expected one of {', '.join(TABULAR_DATASETS)}"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    train, val, test = _LOADERS[name](Path(root))
    return TabularData(
        name, _to_tensor(train, dtype), _to_tensor(val, dtype), _to_tensor(test, dtype)
    )


def _to_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _import_optional(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed to read this tabular dataset; "
            'install it with: pip install "sparseflows[tabular]"'
        ) from exc


def _require_file(path: Path, expected_format: str) -> None:
    if not path.is_file():
        problem = "not a regular file" if path.exists() else "dataset file not found"
        raise DatasetFileError(path, expected_format, problem)


def _as_float_matrix(
    array: Any, columns: int | None, path: Path, expected_format: str
) -> np.ndarray:
    """Check that ``array`` is a finite real ``[N, columns]`` matrix.

    Floating arrays are returned in their own precision (the reference computes in it);
    integer and boolean ones as float64.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise DatasetFileError(path, expected_format, f"found non-numeric dtype {array.dtype}")
    if array.ndim != 2 or (columns is not None and array.shape[1] != columns):
        raise DatasetFileError(
            path, expected_format, f"found an array of shape {list(array.shape)}"
        )
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise DatasetFileError(path, expected_format, "found NaN or infinite values")
    return array


def _load_npy(path: Path, columns: int, expected_format: str) -> np.ndarray:
    _require_file(path, expected_format)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetFileError(path, expected_format, f"unreadable .npy file ({exc})") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DatasetFileError(path, expected_format, "found an .npz archive, not an .npy array")
    return _as_float_matrix(array, columns, path, expected_format)


def _split_off_tail(data: np.ndarray, path: Path, expected_format: str) -> _Splits:
    """MAF's split: the last 10% of rows are test, the last 10% of the rest validation."""
    n_test = int(0.1 * data.shape[0])
    rest, test = data[: data.shape[0] - n_test], data[data.shape[0] - n_test :]
    n_val = int(0.1 * rest.shape[0])
    train, val = rest[: rest.shape[0] - n_val], rest[rest.shape[0] - n_val :]
    # With fewer than ~10 rows MAF's data[-0:] would silently put everything in test.
    if min(train.shape[0], val.shape[0], test.shape[0]) == 0:
        raise DatasetFileError(
            path, expected_format, f"too few rows ({data.shape[0]}) for a train/val/test split"
        )
    return train, val, test


def _standardise_by_train_val(splits: _Splits, path: Path, expected_format: str) -> _Splits:
    """Standardise all splits by the mean and (population) std of train and val together."""
    train, val, test = splits
    both = np.vstack((train, val))
    mean, std = both.mean(axis=0), both.std(axis=0)
    _check_nonconstant(std, path, expected_format)
    return (train - mean) / std, (val - mean) / std, (test - mean) / std


def _check_nonconstant(std: np.ndarray, path: Path, expected_format: str) -> None:
    constant = np.flatnonzero(~(std > 0))
    if constant.size:
        raise DatasetFileError(
            path, expected_format, f"columns {constant.tolist()} are constant; cannot standardise"
        )


def _load_power(root: Path) -> _Splits:
    path = root / "power" / "data.npy"
    data = _load_npy(path, _POWER_RAW_COLUMNS, _POWER_FORMAT)
    # MAF's exact stream: this legacy generator shuffles the rows first, then draws the
    # noise in the order voltage, active power, sub-meterings. Order matters for the splits.
    rng = np.random.RandomState(42)
    data = data.copy()
    rng.shuffle(data)
    n = data.shape[0]
    # Drop global reactive power (1) and global intensity (3). Kept: global active power,
    # voltage, sub-metering 1-3, time of day.
    data = data[:, [0, 2, 4, 5, 6, 7]]
    voltage_noise = 0.01 * rng.rand(n, 1)
    active_power_noise = 0.001 * rng.rand(n, 1)
    sub_metering_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data = data + np.hstack((active_power_noise, voltage_noise, sub_metering_noise, time_noise))
    splits = _split_off_tail(data, path, _POWER_FORMAT)
    return _standardise_by_train_val(splits, path, _POWER_FORMAT)


def _load_gas(root: Path) -> _Splits:
    path = root / "gas" / "ethylene_CO.pickle"
    _require_file(path, _GAS_FORMAT)
    pd = _import_optional("pandas")
    try:
        frame = pd.read_pickle(path)
    except Exception as exc:  # unpickling arbitrary bytes can raise nearly any exception type
        raise DatasetFileError(
            path, _GAS_FORMAT, f"could not unpickle a DataFrame ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(frame, pd.DataFrame):
        raise DatasetFileError(path, _GAS_FORMAT, f"found a pickled {type(frame).__name__}")
    missing = [c for c in _GAS_DROPPED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetFileError(
            path, _GAS_FORMAT, f"columns {missing} missing; found {list(frame.columns)}"
        )
    sensors = frame.drop(columns=list(_GAS_DROPPED_COLUMNS))
    if sensors.shape[1] != _GAS_SENSOR_COLUMNS:
        raise DatasetFileError(
            path, _GAS_FORMAT, f"found {sensors.shape[1]} sensor columns {list(sensors.columns)}"
        )
    _as_float_matrix(sensors.to_numpy(), _GAS_SENSOR_COLUMNS, path, _GAS_FORMAT)

    # Every column correlates 1 with itself, so a count above 1 means a near-duplicate.
    # MAF removes the first such column and recomputes, until none is left.
    while True:
        counts = (sensors.corr() > _GAS_CORRELATION_LIMIT).to_numpy().sum(axis=1)
        duplicated = np.flatnonzero(counts > 1)
        if duplicated.size == 0:
            break
        sensors = sensors.drop(columns=sensors.columns[duplicated[0]])

    # Statistics over all rows (test included) with pandas' sample std (ddof=1), as MAF does.
    std = sensors.std()
    _check_nonconstant(std.to_numpy(), path, _GAS_FORMAT)
    data = ((sensors - sensors.mean()) / std).to_numpy(dtype=np.float64)
    return _split_off_tail(data, path, _GAS_FORMAT)


def _read_hepmass_csv(pd: ModuleType, path: Path, expected_format: str, min_columns: int) -> Any:
    _require_file(path, expected_format)
    try:
        # index_col=False as in MAF: never take the first column as the row index.
        frame = pd.read_csv(path, index_col=False)
    except (ValueError, OSError) as exc:
        raise DatasetFileError(path, expected_format, f"unreadable CSV ({exc})") from exc
    if frame.shape[1] < min_columns or frame.shape[0] == 0:
        raise DatasetFileError(
            path, expected_format, f"found {frame.shape[0]} rows x {frame.shape[1]} columns"
        )
    kinds = {dtype.kind for dtype in frame.dtypes}
    if not kinds <= set("biuf"):
        raise DatasetFileError(
            path, expected_format, f"found non-numeric columns (dtypes {sorted(map(str, kinds))})"
        )
    return frame


def _signal_rows(frame: Any, path: Path, expected_format: str) -> Any:
    signal = frame[frame.iloc[:, 0] == 1]
    if signal.shape[0] == 0:
        raise DatasetFileError(path, expected_format, "found no rows with label 1")
    return signal


def _load_hepmass(root: Path) -> _Splits:
    train_path = root / "hepmass" / "1000_train.csv"
    test_path = root / "hepmass" / "1000_test.csv"
    _require_file(train_path, _HEPMASS_TRAIN_FORMAT)
    _require_file(test_path, _HEPMASS_TEST_FORMAT)
    pd = _import_optional("pandas")
    train_frame = _read_hepmass_csv(pd, train_path, _HEPMASS_TRAIN_FORMAT, min_columns=2)
    test_frame = _read_hepmass_csv(pd, test_path, _HEPMASS_TEST_FORMAT, min_columns=3)

    # Background rows (label 0) are discarded; the label column goes.
    train = _signal_rows(train_frame, train_path, _HEPMASS_TRAIN_FORMAT).iloc[:, 1:]
    # The test file carries one trailing column the training file lacks; MAF drops it.
    test = _signal_rows(test_frame, test_path, _HEPMASS_TEST_FORMAT).iloc[:, 1:-1]
    # MAF aligns train statistics to test columns by name; equal names make that positional.
    train_names = [str(c) for c in train.columns]
    test_names = [str(c) for c in test.columns]
    if train_names != test_names:
        raise DatasetFileError(
            test_path,
            _HEPMASS_TEST_FORMAT,
            f"feature columns {test_names} (after the label and the trailing column) "
            f"do not match the training file's {train_names}",
        )

    # Only the rows and columns used must be finite (the dropped trailing test column may not be).
    train_raw = _as_float_matrix(train.to_numpy(), None, train_path, _HEPMASS_TRAIN_FORMAT)
    test_raw = _as_float_matrix(test.to_numpy(), None, test_path, _HEPMASS_TEST_FORMAT)

    # Training-file statistics (validation rows included, sample std) for both files.
    mean = train.mean().to_numpy(dtype=np.float64)
    std = train.std().to_numpy(dtype=np.float64)
    _check_nonconstant(std, train_path, _HEPMASS_TRAIN_FORMAT)
    train_x = (train_raw - mean) / std
    test_x = (test_raw - mean) / std

    # MAF meant to drop features with too many repeated values but, sorting a Counter by
    # value, it tests how often each feature's *smallest* value occurs. Reproduced as is.
    min_repeats = (train_x == train_x.min(axis=0)).sum(axis=0)
    keep = np.flatnonzero(min_repeats <= _HEPMASS_MAX_MIN_REPEATS)
    if keep.size == 0:
        raise DatasetFileError(train_path, _HEPMASS_TRAIN_FORMAT, "every feature is discrete")
    train_x, test_x = train_x[:, keep], test_x[:, keep]

    n_val = int(train_x.shape[0] * 0.1)
    if n_val == 0:
        raise DatasetFileError(
            train_path,
            _HEPMASS_TRAIN_FORMAT,
            f"too few label-1 rows ({train_x.shape[0]}) for a train/val split",
        )
    n_train = train_x.shape[0] - n_val
    return train_x[:n_train], train_x[n_train:], test_x


def _load_miniboone(root: Path) -> _Splits:
    path = root / "miniboone" / "data.npy"
    data = _load_npy(path, _MINIBOONE_COLUMNS, _MINIBOONE_FORMAT)
    splits = _split_off_tail(data, path, _MINIBOONE_FORMAT)
    return _standardise_by_train_val(splits, path, _MINIBOONE_FORMAT)


def _load_bsds300(root: Path) -> _Splits:
    path = root / "BSDS300" / "BSDS300.hdf5"
    _require_file(path, _BSDS300_FORMAT)
    h5py = _import_optional("h5py")
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetFileError(path, _BSDS300_FORMAT, f"unreadable HDF5 file ({exc})") from exc
    splits = []
    with file:
        for key in _BSDS300_KEYS:
            if key not in file:
                raise DatasetFileError(
                    path,
                    _BSDS300_FORMAT,
                    f"dataset {key!r} missing; found keys {list(file.keys())}",
                )
            node = file[key]
            if not isinstance(node, h5py.Dataset):
                raise DatasetFileError(
                    path, _BSDS300_FORMAT, f"{key!r} is a {type(node).__name__}, not a dataset"
                )
            if len(node.shape) != 2 or node.shape[1] != _BSDS300_COLUMNS or node.shape[0] == 0:
                raise DatasetFileError(
                    path, _BSDS300_FORMAT, f"dataset {key!r} has shape {list(node.shape)}"
                )
            splits.append(_as_float_matrix(node[()], _BSDS300_COLUMNS, path, _BSDS300_FORMAT))
    train, val, test = splits
    return train, val, test


_LOADERS: dict[str, Callable[[Path], _Splits]] = {
    "power": _load_power,
    "gas": _load_gas,
    "hepmass": _load_hepmass,
    "miniboone": _load_miniboone,
    "bsds300": _load_bsds300,
}
