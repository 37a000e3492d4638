import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from flows.datasets.toy import TOY_DATASETS, toy_classification, toy_data


def _polar(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    p = x.double().numpy()
    return np.hypot(p[:, 0], p[:, 1]), np.arctan2(p[:, 1], p[:, 0])


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort((a[:, 1], a[:, 0]))]


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_every_dataset_shape_dtype_and_seeding(name):
    x = toy_data(name, 301)
    assert x.shape == (301, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, toy_data(name, 301))
    assert not torch.allclose(x, toy_data(name, 301, seed=1))
    assert toy_data(name, 7, dtype=torch.float64).dtype == torch.float64
    assert toy_data(name, 1).shape == (1, 2)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_normalisation_is_one_global_mean_and_std(name):
    raw = toy_data(name, 2000, normalize=False, dtype=torch.float64)
    x = toy_data(name, 2000, dtype=torch.float64)
    assert abs(x.mean().item()) < 1e-12
    assert x.std().item() == pytest.approx(1.0, abs=1e-12)
    # One scalar for both axes: an affine map of the raw points, not per-column scaling.
    assert torch.allclose(x, (raw - raw.mean()) / raw.std(), atol=1e-12)


def test_normalisation_keeps_aspect_ratio():
    raw = toy_data("moons", 2000, normalize=False)
    x = toy_data("moons", 2000)
    ratio = raw.std(dim=0)[0] / raw.std(dim=0)[1]
    assert ratio > 1.3  # moons are wider than tall
    assert (x.std(dim=0)[0] / x.std(dim=0)[1]).item() == pytest.approx(ratio.item(), rel=1e-4)


def test_global_rng_untouched():
    # The legacy global numpy state is exactly what must stay untouched.
    np_state = np.random.get_state()  # noqa: NPY002
    torch_state = torch.get_rng_state()
    toy_data("gaussians", 100)
    toy_classification("moons", 100)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state[1], np.random.get_state()[1])  # noqa: NPY002


def test_points_are_shuffled_so_slices_are_representative():
    _, y = toy_classification("gaussians", 1200, normalize=False)
    # Generators emit modes in blocks; callers slice train/val/test off the front.
    assert len(torch.unique(y[:100])) == 6
    assert len(torch.unique(y[-100:])) == 6


def test_gaussians_geometry_six_modes_radius_4_std_half():
    x = toy_data("gaussians", 6000, normalize=False)
    km = KMeans(n_clusters=6, n_init=10, random_state=0).fit(x.double().numpy())
    r, theta = _polar(torch.from_numpy(km.cluster_centers_))
    assert np.allclose(r, 4.0, atol=0.1)
    gaps = np.diff(np.sort(theta))
    assert np.allclose(gaps, 2 * math.pi / 6, atol=0.05)
    pts = x.double().numpy()
    for k in range(6):
        members = pts[km.labels_ == k]
        assert len(members) == pytest.approx(1000, abs=30)
        assert members.std(axis=0, ddof=1) == pytest.approx([0.5, 0.5], abs=0.04)
    # Six clusters really are the structure: five leave far more residual spread.
    five = KMeans(n_clusters=5, n_init=10, random_state=0).fit(pts)
    assert five.inertia_ > 2 * km.inertia_


def test_gaussianspiral_ten_modes_along_spiral():
    x, y = toy_classification("gaussianspiral", 5000, normalize=False)
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    pts = x.double().numpy()
    km = KMeans(n_clusters=10, n_init=10, random_state=0).fit(pts)
    # Paper's layout: 6 modes per turn, radius 4 -> 1, std 0.3 -> 0.1.
    angles = 2 * math.pi * np.arange(1, 11) / 6
    radii = np.linspace(4.0, 1.0, 10)
    expected = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    dist = np.linalg.norm(expected[:, None] - km.cluster_centers_[None], axis=2)
    assert dist.min(axis=1).max() < 0.1
    assert len(set(dist.argmin(axis=1))) == 10
    stds = np.linspace(0.3, 0.1, 10)
    for k in range(10):
        members = pts[(y == k).numpy()]
        assert members.std(axis=0, ddof=1) == pytest.approx([stds[k]] * 2, rel=0.15)


def test_spiral_two_point_symmetric_arms():
    x, y = toy_classification("spiral", 4000, normalize=False)
    assert torch.bincount(y).tolist() == [2000, 2000]
    arm0, arm1 = x[y == 0].double().numpy(), x[y == 1].double().numpy()
    # Arm 1 is arm 0 rotated by pi, point for point (torchdyn's construction).
    assert np.array_equal(_sorted_rows(arm0), _sorted_rows(-arm1))
    # Without labels: on an arm theta + r is constant mod 2 pi (pi for arm 0, 0 for arm 1).
    r, theta = _polar(x)
    far = r > 3
    phase = np.mod(theta + r, 2 * math.pi)
    near_pi = np.abs(phase - math.pi) < 1.2
    near_zero = np.minimum(phase, 2 * math.pi - phase) < 1.2
    assert (near_pi | near_zero)[far].all()
    assert np.array_equal(near_pi[far], (y == 0).numpy()[far])
    # Each arm sweeps 780 degrees, so the outermost points are near r = 13.6.
    assert r.max() == pytest.approx(math.radians(780), abs=0.8)


def test_moons_classification_balanced_half_circles():
    x, y = toy_classification("moons", 1000, normalize=False)
    assert x.shape == (1000, 2) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [500, 500]
    pts = x.double().numpy()
    outer, inner = pts[(y == 0).numpy()], pts[(y == 1).numpy()]
    assert np.all((np.linalg.norm(outer, axis=1) > 0.85) & (np.linalg.norm(outer, axis=1) < 1.15))
    d_inner = np.linalg.norm(inner - np.array([1.0, 0.5]), axis=1)
    assert np.all((d_inner > 0.85) & (d_inner < 1.15))
    assert outer[:, 1].min() > -0.01 and inner[:, 1].max() < 0.61
    # toy_data("moons") is the same draw without the labels.
    assert torch.equal(toy_data("moons", 1000, normalize=False), x)


def test_classification_defaults_and_noise_override():
    x, y = toy_classification()
    assert x.shape == (1024, 2) and set(y.tolist()) == {0, 1}
    assert abs(x.mean().item()) < 1e-5
    # noise=0 puts the outer moon exactly on the unit circle; the paper's 0.1 does not.
    clean, yc = toy_classification("moons", 200, noise=0.0, normalize=False, dtype=torch.float64)
    noisy, yn = toy_classification("moons", 200, normalize=False, dtype=torch.float64)
    assert torch.allclose(clean[yc == 0].norm(dim=1), torch.ones(100, dtype=torch.float64))
    assert (noisy[yn == 0].norm(dim=1) - 1).abs().max() > 0.05


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_classification_labels_are_contiguous_int64(name):
    x, y = toy_classification(name, 500)
    assert x.shape == (500, 2) and y.shape == (500,) and y.dtype == torch.int64
    assert torch.equal(torch.unique(y), torch.arange(int(y.max()) + 1))


def test_generator_parameters_are_forwarded():
    x = toy_data("gaussians", 3000, normalize=False, radius=10.0, n_modes=3)
    km = KMeans(n_clusters=3, n_init=10, random_state=0).fit(x.double().numpy())
    assert np.allclose(np.linalg.norm(km.cluster_centers_, axis=1), 10.0, atol=0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gaussianspiral"):
        toy_data("swissroll", 10)
    for n in (0, -3):
        with pytest.raises(ValueError, match="n must be"):
            toy_data("gaussians", n)
    with pytest.raises(ValueError, match="dtype"):
        toy_data("gaussians", 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="radius"):
        toy_data("gaussians", 10, radiuss=3.0)
    with pytest.raises(ValueError, match="noise"):
        toy_classification("gaussians", 10, noise=0.1)
