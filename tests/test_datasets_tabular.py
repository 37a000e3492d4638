"""MAF tabular loaders: FFJORD's preprocessing on small synthetic files, and bad files."""

import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from flows.datasets.errors import DatasetFileError
from flows.datasets.tabular import TABULAR_DATASETS, TabularData, load_tabular

N_FEATURES = 27  # HEPMASS '1000' files: 27 features (the test file adds a 'mass' column)
HEPMASS_DISCRETE = (5, 9, 13, 17, 21)  # number of jets and the four b-tags, as in the real file
HEPMASS_MIN_SIX_TIMES = 3  # smallest value occurs 6 times among signal rows: removed
HEPMASS_MIN_FIVE_TIMES = 1  # smallest value occurs 5 times among signal rows: kept
HEPMASS_MODE_REPEATED = 2  # a non-minimal value repeats 50 times: kept (MAF only tests the min)
HEPMASS_KEPT = [j for j in range(N_FEATURES) if j not in (*HEPMASS_DISCRETE, HEPMASS_MIN_SIX_TIMES)]


def _split_sizes(n: int) -> tuple[int, int, int]:
    n_test = int(0.1 * n)
    n_val = int(0.1 * (n - n_test))
    return n - n_test - n_val, n_val, n_test


def _write_power(root: Path, n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(n, 8)) * np.arange(1, 9) + np.arange(8)
    (root / "power").mkdir(parents=True, exist_ok=True)
    np.save(root / "power" / "data.npy", raw)
    return raw


def _power_oracle(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FFJORD's datasets/power.py steps, written out literally."""
    rng = np.random.RandomState(42)
    data = raw.copy()
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage = 0.01 * rng.rand(n, 1)
    gap = 0.001 * rng.rand(n, 1)
    sm = rng.rand(n, 3)
    data = data + np.hstack((gap, voltage, sm, np.zeros((n, 1))))
    n_test = int(0.1 * n)
    test, data = data[-n_test:], data[:-n_test]
    n_val = int(0.1 * data.shape[0])
    val, train = data[-n_val:], data[:-n_val]
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _write_gas(root: Path, n: int = 300) -> np.ndarray:
    """16 sensors in 8 near-duplicate pairs; returns the sensors MAF's loop should keep."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(n, 8))
    # Pairs 6 and 7 correlate at ~0.9: below the 0.98 limit, so both survive.
    base[:, 7] = 0.9 * base[:, 6] + np.sqrt(1 - 0.81) * base[:, 7]
    sensors = np.empty((n, 16))
    sensors[:, 0::2] = base + 0.01 * rng.normal(size=(n, 8))
    sensors[:, 1::2] = 2.0 * base + 3.0 + 0.01 * rng.normal(size=(n, 8))
    frame = pd.DataFrame(sensors, columns=[f"S{i}" for i in range(16)])
    # Meth duplicates a sensor: if it were not dropped first, it would change which column goes.
    frame.insert(0, "Time", np.arange(n, dtype=np.float64))
    frame.insert(1, "Meth", sensors[:, 1].copy())
    frame.insert(2, "Eth", rng.uniform(size=n))
    (root / "gas").mkdir(parents=True, exist_ok=True)
    frame.to_pickle(root / "gas" / "ethylene_CO.pickle")
    # Each pair's first column is met first with a count of 2 and removed.
    return sensors[:, 1::2]


def _hepmass_features(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    n = labels.shape[0]
    x = rng.normal(size=(n, N_FEATURES))
    x[labels == 0] += 100.0  # background rows far away: any leak shows in the statistics
    x[:, HEPMASS_DISCRETE[0]] = rng.integers(1, 5, size=n)
    for j in HEPMASS_DISCRETE[1:]:
        x[:, j] = rng.integers(0, 2, size=n)
    return x


def _write_hepmass_csv(path: Path, labels: np.ndarray, x: np.ndarray, extra: bool) -> None:
    names = ["# label", *(f"f{j}" for j in range(N_FEATURES))] + (["mass"] if extra else [])
    columns = [labels[:, None].astype(np.float64), x]
    if extra:
        columns.append(np.full((labels.shape[0], 1), 1000.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(
        path, np.hstack(columns), delimiter=",", fmt="%.17g", header=",".join(names), comments=""
    )


def _write_hepmass(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns the signal rows' features of the training and the test file."""
    rng = np.random.default_rng(3)
    train_labels = (rng.uniform(size=330) < 0.65).astype(np.int64)
    test_labels = (rng.uniform(size=120) < 0.5).astype(np.int64)
    train_x = _hepmass_features(rng, train_labels)
    test_x = _hepmass_features(rng, test_labels)
    signal = np.flatnonzero(train_labels == 1)
    background = np.flatnonzero(train_labels == 0)
    train_x[signal[:6], HEPMASS_MIN_SIX_TIMES] = -50.0
    train_x[signal[:5], HEPMASS_MIN_FIVE_TIMES] = -50.0
    # Two more minima among background rows: counted only if label-0 rows leaked in.
    train_x[background[:2], HEPMASS_MIN_FIVE_TIMES] = -50.0
    train_x[signal[10:60], HEPMASS_MODE_REPEATED] = 0.25
    _write_hepmass_csv(root / "hepmass" / "1000_train.csv", train_labels, train_x, extra=False)
    _write_hepmass_csv(root / "hepmass" / "1000_test.csv", test_labels, test_x, extra=True)
    return train_x[train_labels == 1], test_x[test_labels == 1]


def _write_miniboone(root: Path, n: int = 150) -> np.ndarray:
    rng = np.random.default_rng(4)
    data = rng.normal(size=(n, 43)) * 3.0 - 1.0
    (root / "miniboone").mkdir(parents=True, exist_ok=True)
    np.save(root / "miniboone" / "data.npy", data)
    return data


def _write_bsds300(root: Path, shapes: dict[str, tuple[int, int]] | None = None) -> dict:
    shapes = shapes or {"train": (40, 63), "validation": (15, 63), "test": (20, 63)}
    rng = np.random.default_rng(5)
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    (root / "BSDS300").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, array in arrays.items():
            f.create_dataset(key, data=array)
    return arrays


WRITERS = {
    "power": _write_power,
    "gas": _write_gas,
    "hepmass": _write_hepmass,
    "miniboone": _write_miniboone,
    "bsds300": _write_bsds300,
}
PATHS = {
    "power": "power/data.npy",
    "gas": "gas/ethylene_CO.pickle",
    "hepmass": "hepmass/1000_train.csv",
    "miniboone": "miniboone/data.npy",
    "bsds300": "BSDS300/BSDS300.hdf5",
}
DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}


def test_unknown_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="power, gas, hepmass, miniboone, bsds300"):
        load_tabular("mnist", tmp_path)
    assert TABULAR_DATASETS == ("power", "gas", "hepmass", "miniboone", "bsds300")


def test_non_floating_dtype_is_rejected(tmp_path):
    _write_miniboone(tmp_path)
    with pytest.raises(ValueError, match="floating"):
        load_tabular("miniboone", tmp_path, dtype=torch.int64)


@pytest.mark.parametrize("name", TABULAR_DATASETS)
def test_whole_tensors_of_the_right_dim_dtype_and_determinism(tmp_path, name):
    WRITERS[name](tmp_path)
    a = load_tabular(name, str(tmp_path))  # a str root works as well as a Path
    np.random.seed(123)  # noqa: NPY002  (the legacy global state is what must not matter)
    torch.manual_seed(123)
    b = load_tabular(name, tmp_path)
    assert isinstance(a, TabularData) and a.name == name
    assert a.dim == DIMS[name]
    for split_a, split_b in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        assert isinstance(split_a, torch.Tensor)
        assert split_a.dtype == torch.float32 and split_a.is_contiguous()
        assert split_a.ndim == 2 and split_a.shape[1] == DIMS[name] and split_a.shape[0] > 0
        assert torch.isfinite(split_a).all()
        assert torch.equal(split_a, split_b)
    c = load_tabular(name, tmp_path, dtype=torch.float64)
    assert c.train.dtype == torch.float64
    assert torch.equal(c.train.float(), a.train)


def test_power_matches_ffjord_steps(tmp_path):
    raw = _write_power(tmp_path)
    d = load_tabular("power", tmp_path, dtype=torch.float64)
    assert (d.train.shape[0], d.val.shape[0], d.test.shape[0]) == _split_sizes(200) == (162, 18, 20)
    for got, want in zip((d.train, d.val, d.test), _power_oracle(raw), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    both = torch.cat((d.train, d.val))
    torch.testing.assert_close(both.mean(0), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(both.std(0, unbiased=False), torch.ones(6, dtype=torch.float64))

    # The time column (last) gets no noise: its values are the raw ones, affinely rescaled.
    def standardised_sorted(x: np.ndarray) -> np.ndarray:
        return (np.sort(x) - x.mean()) / x.std()

    time = torch.cat((d.train, d.val, d.test))[:, 5].numpy()
    np.testing.assert_allclose(
        standardised_sorted(time), standardised_sorted(raw[:, 7]), atol=1e-12
    )


def test_gas_drops_the_first_of_each_correlated_pair_and_normalises_all_rows(tmp_path):
    kept = _write_gas(tmp_path)
    d = load_tabular("gas", tmp_path, dtype=torch.float64)
    assert d.dim == 8
    assert (d.train.shape[0], d.val.shape[0], d.test.shape[0]) == _split_sizes(300) == (243, 27, 30)
    want = (kept - kept.mean(axis=0)) / kept.std(axis=0, ddof=1)
    got = torch.cat((d.train, d.val, d.test)).numpy()  # no shuffle: the file order
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_hepmass_signal_rows_train_statistics_and_min_repeat_rule(tmp_path):
    train_x, test_x = _write_hepmass(tmp_path)
    d = load_tabular("hepmass", tmp_path, dtype=torch.float64)
    assert d.dim == len(HEPMASS_KEPT) == 21
    n = train_x.shape[0]  # label-0 rows are gone from both files
    n_val = int(0.1 * n)
    assert (d.train.shape[0], d.val.shape[0]) == (n - n_val, n_val)
    assert d.test.shape[0] == test_x.shape[0]
    mu, s = train_x.mean(axis=0), train_x.std(axis=0, ddof=1)
    want_train = ((train_x - mu) / s)[:, HEPMASS_KEPT]
    want_test = ((test_x - mu) / s)[:, HEPMASS_KEPT]  # test uses the training file's statistics
    np.testing.assert_allclose(torch.cat((d.train, d.val)).numpy(), want_train, atol=1e-10)
    np.testing.assert_allclose(d.test.numpy(), want_test, atol=1e-10)
    both = torch.cat((d.train, d.val))
    torch.testing.assert_close(both.mean(0), torch.zeros(21, dtype=torch.float64))
    torch.testing.assert_close(both.std(0), torch.ones(21, dtype=torch.float64))
    assert d.test.mean(0).abs().max() > 1e-3  # not re-centred on its own


def test_miniboone_splits_from_the_end_and_normalises_by_train_val(tmp_path):
    data = _write_miniboone(tmp_path)
    d = load_tabular("miniboone", tmp_path, dtype=torch.float64)
    n_train, n_val, n_test = _split_sizes(150)
    assert (d.train.shape[0], d.val.shape[0], d.test.shape[0]) == (n_train, n_val, n_test)
    mu = data[: n_train + n_val].mean(axis=0)
    s = data[: n_train + n_val].std(axis=0)
    np.testing.assert_allclose(
        torch.cat((d.train, d.val, d.test)).numpy(), (data - mu) / s, atol=1e-12
    )


def test_bsds300_splits_are_the_stored_ones(tmp_path):
    arrays = _write_bsds300(tmp_path)
    d = load_tabular("bsds300", tmp_path)
    for got, key in zip((d.train, d.val, d.test), ("train", "validation", "test"), strict=True):
        assert torch.equal(got, torch.from_numpy(arrays[key]))


# --- bad files ------------------------------------------------------------------------------


def _assert_names(exc: pytest.ExceptionInfo, path: Path) -> None:
    assert isinstance(exc.value, ValueError)
    assert str(path) in str(exc.value)
    assert "expected" in str(exc.value)


@pytest.mark.parametrize("name", TABULAR_DATASETS)
def test_missing_file_names_the_expected_path_and_format(tmp_path, name):
    with pytest.raises(DatasetFileError) as exc:
        load_tabular(name, tmp_path)
    _assert_names(exc, tmp_path / PATHS[name])
    assert exc.value.path == tmp_path / PATHS[name]
    assert exc.value.expected_format in str(exc.value)


def test_missing_hepmass_test_file_names_it(tmp_path):
    _write_hepmass(tmp_path)
    (tmp_path / "hepmass" / "1000_test.csv").unlink()
    with pytest.raises(DatasetFileError) as exc:
        load_tabular("hepmass", tmp_path)
    _assert_names(exc, tmp_path / "hepmass" / "1000_test.csv")


@pytest.mark.parametrize("name", TABULAR_DATASETS)
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / PATHS[name]
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(range(256)) * 4)
    if name == "hepmass":
        _write_hepmass_csv(path.with_name("1000_test.csv"), np.ones(3), np.zeros((3, 27)), True)
    with pytest.raises(DatasetFileError) as exc:
        load_tabular(name, tmp_path)
    _assert_names(exc, path)


def _npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def _bad_gas(columns: list[str]):
    def write(root: Path) -> Path:
        path = root / PATHS["gas"]
        path.parent.mkdir(parents=True)
        pd.DataFrame(
            np.random.default_rng(0).normal(size=(50, len(columns))), columns=columns
        ).to_pickle(path)
        return path

    return write


def _wrong_power(root: Path) -> Path:
    _npy(root / PATHS["power"], np.zeros((50, 7)))
    return root / PATHS["power"]


def _wrong_miniboone(root: Path) -> Path:
    _npy(root / PATHS["miniboone"], np.zeros((50, 42)))
    return root / PATHS["miniboone"]


def _one_dim_miniboone(root: Path) -> Path:
    _npy(root / PATHS["miniboone"], np.zeros(43 * 50))
    return root / PATHS["miniboone"]


def _string_power(root: Path) -> Path:
    _npy(root / PATHS["power"], np.full((50, 8), "x"))
    return root / PATHS["power"]


def _nan_miniboone(root: Path) -> Path:
    data = np.random.default_rng(0).normal(size=(50, 43))
    data[3, 4] = np.nan
    _npy(root / PATHS["miniboone"], data)
    return root / PATHS["miniboone"]


def _constant_miniboone(root: Path) -> Path:
    data = np.random.default_rng(0).normal(size=(50, 43))
    data[:, 7] = 2.0
    _npy(root / PATHS["miniboone"], data)
    return root / PATHS["miniboone"]


def _few_rows_power(root: Path) -> Path:
    _npy(root / PATHS["power"], np.random.default_rng(0).normal(size=(9, 8)))
    return root / PATHS["power"]


def _wrong_bsds300(root: Path) -> Path:
    _write_bsds300(root, {"train": (10, 62), "validation": (5, 63), "test": (5, 63)})
    return root / PATHS["bsds300"]


def _keyless_bsds300(root: Path) -> Path:
    _write_bsds300(root, {"train": (10, 63), "test": (5, 63)})
    return root / PATHS["bsds300"]


def _hepmass_test_without_extra_column(root: Path) -> Path:
    _write_hepmass(root)
    path = root / "hepmass" / "1000_test.csv"
    labels = np.ones(20)
    _write_hepmass_csv(path, labels, np.random.default_rng(0).normal(size=(20, 27)), False)
    return path


def _hepmass_text(root: Path) -> Path:
    _write_hepmass(root)
    path = root / "hepmass" / "1000_train.csv"
    path.write_text("# label,f0,f1\n1,a,b\n1,c,d\n")
    return path


@pytest.mark.parametrize(
    ("name", "write", "problem"),
    [
        ("power", _wrong_power, "shape"),
        ("power", _string_power, "non-numeric"),
        ("power", _few_rows_power, "too few rows"),
        ("miniboone", _wrong_miniboone, "shape"),
        ("miniboone", _one_dim_miniboone, "shape"),
        ("miniboone", _nan_miniboone, "NaN"),
        ("miniboone", _constant_miniboone, "constant"),
        ("bsds300", _wrong_bsds300, "shape"),
        ("bsds300", _keyless_bsds300, "'validation' missing"),
        ("gas", _bad_gas(["Time", "Eth", *(f"S{i}" for i in range(16))]), "Meth"),
        ("gas", _bad_gas(["Time", "Meth", "Eth", *(f"S{i}" for i in range(15))]), "15 sensor"),
        ("hepmass", _hepmass_test_without_extra_column, "do not match"),
        ("hepmass", _hepmass_text, "non-numeric"),
    ],
)
def test_malformed_content(tmp_path, name, write, problem):
    path = write(tmp_path)
    with pytest.raises(DatasetFileError, match=problem) as exc:
        load_tabular(name, tmp_path)
    _assert_names(exc, path)


def test_gas_pickle_of_a_non_dataframe(tmp_path):
    path = tmp_path / PATHS["gas"]
    path.parent.mkdir(parents=True)
    pd.to_pickle({"Meth": [1.0]}, path)
    with pytest.raises(DatasetFileError, match="dict") as exc:
        load_tabular("gas", tmp_path)
    _assert_names(exc, path)


@pytest.mark.parametrize(("name", "module"), [("gas", "pandas"), ("bsds300", "h5py")])
def test_missing_optional_dependency_says_what_to_install(tmp_path, monkeypatch, name, module):
    WRITERS[name](tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=r'pip install "sparseflows\[tabular\]"'):
        load_tabular(name, tmp_path)
