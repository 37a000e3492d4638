"""Seeded 2D toy distributions for the toy CNF and neural ODE experiments.

Two families, each reproduced from the generator the paper's code used:

- ``gaussians``, ``gaussianspiral``, ``spiral``, ``moons``: torchdyn's
  ``ToyDataset`` generators (``generate_gaussians``, ``generate_gaussians_spiral``,
  ``generate_spirals``, ``generate_moons``) with the parameters the paper's
  torchprune configs pass to them (``ToyGaussians``, ``ToyGaussiansSpiral``,
  ``ToySpirals2``, ``ToyMoons``), which differ from torchdyn's defaults.
- ``8gaussians``, ``checkerboard``, ``circles``, ``pinwheel``: FFJORD's
  ``lib/toy_data.py`` with its constants.

Every constant is a keyword of the generator function below, defaulting to the
paper's value; :func:`toy_data` and :func:`toy_classification` forward extra
keywords to it. A generator returns the points in float64 with a component
label per point (mode, arm, ring, ...). The samples are then shuffled, because
callers split train / validation / test by slicing and the generators emit
points grouped by component. With ``normalize=True`` the points are
standardised by one scalar mean and one scalar std over all coordinates, as
the paper's code does, which keeps the shape of the distribution (no per-axis
stretching).

All randomness comes from a local ``numpy.random.Generator`` seeded by
``seed``; the global RNG state is neither read nor changed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = [
    "TOY_DATASETS",
    "checkerboard",
    "circles",
    "eight_gaussians",
    "gaussians",
    "gaussians_spiral",
    "moons",
    "pinwheel",
    "spiral",
    "toy_classification",
    "toy_data",
]

TOY_DATASETS: tuple[str, ...] = (
    "gaussians",
    "gaussianspiral",
    "spiral",
    "moons",
    "8gaussians",
    "checkerboard",
    "circles",
    "pinwheel",
)

# Points [n, 2] float64 and component labels [n] int64.
_Sample = tuple[np.ndarray, np.ndarray]


def _split_evenly(n: int, parts: int) -> np.ndarray:
    """Sizes of ``parts`` groups summing to ``n``, differing by at most one."""
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[: n % parts] += 1
    return sizes


def _gaussian_modes(
    n: int,
    rng: np.random.Generator,
    centers: np.ndarray,
    stds: np.ndarray,
    center_jitter: float,
) -> _Sample:
    """Isotropic Gaussian modes ``centers[k]`` [K, 2] with std ``stds[k]``, n split evenly.

    As in torchdyn, each mode's whole block of samples is shifted by one
    ``N(0, center_jitter^2)`` offset per coordinate.
    """
    sizes = _split_evenly(n, len(centers))
    labels = np.repeat(np.arange(len(centers), dtype=np.int64), sizes)
    jitter = rng.standard_normal(centers.shape) * center_jitter
    points = centers[labels] + jitter[labels]
    points += rng.standard_normal((n, 2)) * stds[labels, None]
    return points, labels


def gaussians(
    n: int,
    rng: np.random.Generator,
    *,
    n_modes: int = 6,
    radius: float = 4.0,
    std: float = 0.5,
    center_jitter: float = 1e-3,
) -> _Sample:
    """Gaussian modes evenly spaced on a circle (torchdyn ``generate_gaussians``).

    Args:
        n: total number of points, split evenly over the modes.
        rng: source of randomness.
        n_modes: number of modes; the paper uses 6 (torchdyn default 7).
        radius: radius of the circle of mode centres; paper 4 (default 0.5).
        std: per-coordinate std of each mode; paper 0.5 (default 0.1).
        center_jitter: std of torchdyn's per-mode random shift of the centre.

    Returns:
        Points [n, 2] float64 and mode labels [n] int64 in ``0..n_modes-1``.
        Mode ``k`` is centred at angle ``2*pi*(k+1)/n_modes``, as in torchdyn.
    """
    angles = 2.0 * math.pi * np.arange(1, n_modes + 1) / n_modes
    centers = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return _gaussian_modes(n, rng, centers, np.full(n_modes, float(std)), center_jitter)


def gaussians_spiral(
    n: int,
    rng: np.random.Generator,
    *,
    n_modes: int = 10,
    modes_per_loop: int = 6,
    radius_start: float = 4.0,
    radius_end: float = 1.0,
    std_start: float = 0.3,
    std_end: float = 0.1,
    center_jitter: float = 1e-3,
) -> _Sample:
    """Gaussian modes along an inward spiral (torchdyn ``generate_gaussians_spiral``).

    Mode ``k`` sits at angle ``2*pi*(k+1)/modes_per_loop`` with radius and std
    interpolated linearly from the start to the end value over the modes.

    Args:
        n: total number of points, split evenly over the modes.
        rng: source of randomness.
        n_modes: number of modes; paper 10 (torchdyn default 7).
        modes_per_loop: modes per turn of the spiral; paper 6 (default 4).
        radius_start: radius of the first mode; paper 4 (default 1).
        radius_end: radius of the last mode; paper 1 (default 0.2).
        std_start: std of the first mode; paper and default 0.3.
        std_end: std of the last mode; paper and default 0.1.
        center_jitter: std of torchdyn's per-mode random shift of the centre.

    Returns:
        Points [n, 2] float64 and mode labels [n] int64 in ``0..n_modes-1``.
    """
    angles = 2.0 * math.pi * np.arange(1, n_modes + 1) / modes_per_loop
    radii = np.linspace(radius_start, radius_end, n_modes)
    centers = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    stds = np.linspace(std_start, std_end, n_modes)
    return _gaussian_modes(n, rng, centers, stds, center_jitter)


def spiral(
    n: int,
    rng: np.random.Generator,
    *,
    turn_degrees: float = 780.0,
    noise: float = 0.5,
) -> _Sample:
    """Two point-symmetric spiral arms (torchdyn ``generate_spirals``).

    Arm 0 is ``(-t cos t, t sin t) + u`` with ``t = sqrt(U) * turn`` (denser
    towards the outer end, sparse near the centre) and ``u`` uniform in
    ``[0, noise)`` per coordinate; arm 1 is the negation of arm 0, point by point.

    Args:
        n: total number of points; arm 0 gets ``n - n // 2``, arm 1 ``n // 2``.
        rng: source of randomness.
        turn_degrees: angle swept by each arm, in degrees (torchdyn: 780).
        noise: width of the uniform noise; the paper's ``ToySpirals2`` uses 0.5
            (torchdyn default 1e-4).

    Returns:
        Points [n, 2] float64 and arm labels [n] int64 in ``{0, 1}``.
    """
    n_first = n - n // 2
    t = np.sqrt(rng.random(n_first)) * math.radians(turn_degrees)
    arm = np.stack([-np.cos(t) * t, np.sin(t) * t], axis=1)
    arm += rng.random((n_first, 2)) * noise
    points = np.concatenate([arm, -arm[: n // 2]])
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [n_first, n // 2])
    return points, labels


def moons(
    n: int,
    rng: np.random.Generator,
    *,
    noise: float = 0.1,
) -> _Sample:
    """Two interleaving half circles (torchdyn ``generate_moons``).

    The geometry is scikit-learn's ``make_moons``: the outer moon is the upper
    unit half circle, the inner one is ``(1 - cos s, 0.5 - sin s)``, both on an
    even grid of angles in ``[0, pi]``. The noise is torchdyn's, which the
    paper used: one uniform draw in ``[0, noise)`` per point, added to both
    coordinates (a shift along the diagonal), not sklearn's Gaussian noise.

    Args:
        n: total number of points; outer moon ``n // 2``, inner ``n - n // 2``.
        rng: source of randomness.
        noise: width of the uniform noise; paper 0.1 (``ToyMoons``).

    Returns:
        Points [n, 2] float64 and labels [n] int64: 0 outer moon, 1 inner moon.
    """
    n_out, n_in = n // 2, n - n // 2
    s_out = np.linspace(0.0, math.pi, n_out)
    s_in = np.linspace(0.0, math.pi, n_in)
    outer = np.stack([np.cos(s_out), np.sin(s_out)], axis=1)
    inner = np.stack([1.0 - np.cos(s_in), 0.5 - np.sin(s_in)], axis=1)
    points = np.concatenate([outer, inner])
    points += rng.random((n, 1)) * noise
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [n_out, n_in])
    return points, labels


def eight_gaussians(
    n: int,
    rng: np.random.Generator,
    *,
    n_modes: int = 8,
    scale: float = 4.0,
    std: float = 0.5,
    rescale: float = 1.414,
) -> _Sample:
    """Gaussian modes on a circle, mode drawn at random per point (FFJORD ``8gaussians``).

    Args:
        n: number of points.
        rng: source of randomness.
        n_modes: number of modes, evenly spaced in angle starting at angle 0 (FFJORD: 8).
        scale: radius of the circle of centres before rescaling (FFJORD: 4).
        std: per-coordinate std of each mode before rescaling (FFJORD: 0.5).
        rescale: everything is divided by this at the end (FFJORD: 1.414).

    Returns:
        Points [n, 2] float64 and mode labels [n] int64 in ``0..n_modes-1``.
    """
    angles = 2.0 * math.pi * np.arange(n_modes) / n_modes
    centers = scale * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = rng.integers(0, n_modes, size=n)
    points = centers[labels] + rng.standard_normal((n, 2)) * std
    return points / rescale, labels.astype(np.int64)


def checkerboard(
    n: int,
    rng: np.random.Generator,
    *,
    scale: float = 2.0,
) -> _Sample:
    """Uniform points on the dark squares of a 4x4 checkerboard (FFJORD ``checkerboard``).

    Before scaling, ``x1`` is uniform on ``[-2, 2)`` and ``x2`` uniform on the
    two unit squares of its column whose parity matches ``floor(x1)``.

    Args:
        n: number of points.
        rng: source of randomness.
        scale: final multiplier (FFJORD: 2, giving the square ``[-4, 4)^2``).

    Returns:
        Points [n, 2] float64 and labels [n] int64 in ``0..7``: the index of the
        occupied square (column-major over the 8 dark squares).
    """
    x1 = rng.random(n) * 4.0 - 2.0
    lower = rng.integers(0, 2, size=n)
    x2 = rng.random(n) - 2.0 * lower + np.floor(x1) % 2
    labels = 2 * (np.floor(x1).astype(np.int64) + 2) + (1 - lower)
    return np.stack([x1, x2], axis=1) * scale, labels


def circles(
    n: int,
    rng: np.random.Generator,
    *,
    factor: float = 0.5,
    noise: float = 0.08,
    scale: float = 3.0,
) -> _Sample:
    """Two concentric rings (FFJORD ``circles``: sklearn ``make_circles`` scaled).

    Args:
        n: number of points; outer ring ``n // 2``, inner ring ``n - n // 2``,
            each on an even grid of angles in ``[0, 2 pi)``.
        rng: source of randomness.
        factor: inner radius relative to the outer unit ring (FFJORD: 0.5).
        noise: std of the Gaussian noise per coordinate, before scaling (FFJORD: 0.08).
        scale: final multiplier (FFJORD: 3).

    Returns:
        Points [n, 2] float64 and labels [n] int64: 0 outer ring, 1 inner ring.
    """
    n_out, n_in = n // 2, n - n // 2
    a_out = np.linspace(0.0, 2.0 * math.pi, n_out, endpoint=False)
    a_in = np.linspace(0.0, 2.0 * math.pi, n_in, endpoint=False)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], axis=1)
    inner = factor * np.stack([np.cos(a_in), np.sin(a_in)], axis=1)
    points = np.concatenate([outer, inner]) + rng.standard_normal((n, 2)) * noise
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [n_out, n_in])
    return points * scale, labels


def pinwheel(
    n: int,
    rng: np.random.Generator,
    *,
    n_arms: int = 5,
    radial_std: float = 0.3,
    tangential_std: float = 0.1,
    rate: float = 0.25,
    scale: float = 2.0,
) -> _Sample:
    """Curved Gaussian arms (FFJORD ``pinwheel``).

    A point of arm ``k`` starts as ``(1 + radial_std * e1, tangential_std * e2)``
    and is rotated by ``2*pi*k/n_arms + rate * exp(first coordinate)``, so arms
    bend more the further out they go.

    Args:
        n: number of points, split evenly over the arms (FFJORD drops the
            remainder of ``n / n_arms``; here every requested point is drawn).
        rng: source of randomness.
        n_arms: number of arms (FFJORD: 5).
        radial_std: std along the arm (FFJORD: 0.3).
        tangential_std: std across the arm (FFJORD: 0.1).
        rate: how fast the rotation grows with radius (FFJORD: 0.25).
        scale: final multiplier (FFJORD: 2).

    Returns:
        Points [n, 2] float64 and arm labels [n] int64 in ``0..n_arms-1``.
    """
    labels = np.repeat(np.arange(n_arms, dtype=np.int64), _split_evenly(n, n_arms))
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    angles = 2.0 * math.pi * labels / n_arms + rate * np.exp(features[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    # Row vector times [[cos, -sin], [sin, cos]], FFJORD's orientation.
    points = np.stack(
        [features[:, 0] * cos + features[:, 1] * sin, -features[:, 0] * sin + features[:, 1] * cos],
        axis=1,
    )
    return points * scale, labels


_GENERATORS: dict[str, Callable[..., _Sample]] = {
    "gaussians": gaussians,
    "gaussianspiral": gaussians_spiral,
    "spiral": spiral,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "circles": circles,
    "pinwheel": pinwheel,
}


def _generate(
    name: str, n: int, seed: int, normalize: bool, dtype: torch.dtype, params: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, draw, shuffle and normalise; returns x [n, 2] and labels [n]."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown toy dataset {name!r}; expected one of {list(TOY_DATASETS)}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    generator = _GENERATORS[name]
    accepted = [p for p in inspect.signature(generator).parameters if p not in ("n", "rng")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"toy dataset {name!r} has no parameter(s) {unknown}; its parameters are {accepted}"
        )
    rng = np.random.default_rng(seed)
    points, labels = generator(int(n), rng, **params)
    order = rng.permutation(int(n))
    points, labels = points[order], labels[order]
    if normalize:
        # One scalar mean and std over all coordinates (paper's code), with torch's
        # default Bessel-corrected std (ddof=1).
        points = (points - points.mean()) / points.std(ddof=1)
    return torch.from_numpy(np.ascontiguousarray(points)).to(dtype), torch.from_numpy(labels)


def toy_data(
    name: str,
    n: int,
    seed: int = 0,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    **params: Any,
) -> torch.Tensor:
    """Draw ``n`` points from a 2D toy distribution for density estimation.

    Args:
        name: one of :data:`TOY_DATASETS`.
        n: number of points, >= 1.
        seed: seed of the local RNG; the same ``(name, n, seed, params)`` gives
            the same points.
        normalize: subtract the scalar mean and divide by the scalar std over all
            ``2n`` coordinates.
        dtype: floating dtype of the result (drawn in float64, then cast).
        **params: keywords of the dataset's generator function in this module
            (e.g. ``radius`` for ``gaussians``), overriding the paper's values.

    Returns:
        Points ``[n, 2]`` in random order.

    Raises:
        ValueError: unknown name, ``n < 1``, non-floating dtype, or unknown parameter.
    """
    return _generate(name, n, seed, normalize, dtype, params)[0]


def toy_classification(
    name: str = "moons",
    n: int = 1024,
    seed: int = 0,
    noise: float | None = None,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    **params: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` labelled points from a 2D toy distribution for classification.

    The label is the generator's component: moon, arm, ring or mode. The paper
    classifies ``moons`` with ``n = 1024`` and noise 0.1.

    Args:
        name: one of :data:`TOY_DATASETS`.
        n: number of points, >= 1.
        seed: seed of the local RNG.
        noise: the generator's ``noise`` keyword (moons, spiral, circles); None
            keeps the paper's value for that dataset.
        normalize: standardise by one scalar mean and std, as in :func:`toy_data`.
        dtype: floating dtype of ``x``.
        **params: other keywords of the dataset's generator function.

    Returns:
        ``x [n, 2]`` and labels ``y [n]`` int64 in ``0..K-1``, in random order.

    Raises:
        ValueError: as :func:`toy_data`, and for ``noise`` on a dataset without it.
    """
    if noise is not None:
        params = {**params, "noise": noise}
    return _generate(name, n, seed, normalize, dtype, params)
