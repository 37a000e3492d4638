"""Wall-clock timing: warm-up, then the median of repeats with its p10-p90 spread, in a budget.

A measurement of ``fn`` goes:

1. the first call, timed on its own (``first_ms``: it includes compilation,
   kernel builds and allocator warm-up, so it is reported but never used);
2. a second call, whose time estimates the steady state;
3. more warm-up calls while they take at most a quarter of the budget (up to
   ``warmup`` of them in all, counting the second call);
4. samples: each sample is ``inner`` back-to-back calls (enough for a sample to
   last ``min_sample_s``, so fast calls are not lost in timer resolution),
   repeated until ``budget_s`` is spent, but at least ``min_repeats`` and at
   most ``max_repeats`` times. A call that alone takes longer than the budget is
   not repeated: its estimate call (step 2) is the only sample. A call that
   fits fewer than ``min_repeats`` times gets as many samples as fit (at least 1).

On CUDA the device is synchronised before the clock starts and after every
sample. Garbage collection is paused while sampling.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TimingConfig:
    """How long and how often to measure one (case, provider, metric).

    Attributes:
        budget_s: target seconds of timed samples per measurement.
        warmup: calls before sampling, counting the estimate call (at least 1).
        min_repeats, max_repeats: bounds on the number of samples.
        min_sample_s: a sample runs the call ``inner`` times to last at least this.
    """

    budget_s: float = 1.0
    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 50
    min_sample_s: float = 0.005

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.min_sample_s <= 0:
            raise ValueError("budget_s and min_sample_s must be positive")
        if self.warmup < 1 or self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ValueError("need warmup >= 1 and 1 <= min_repeats <= max_repeats")


@dataclass(frozen=True)
class Timing:
    """One measurement, per call of the measured function (milliseconds).

    Attributes:
        median_ms, p10_ms, p90_ms: median and 10th / 90th percentiles over samples.
        repeats: number of samples; inner: calls per sample.
        first_ms: the first call (compilation and warm-up included).
        calls: every call made, warm-up included.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    inner: int
    first_ms: float
    calls: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A no-argument function that waits for ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(fn: Callable[[], object], config: TimingConfig, device: torch.device) -> Timing:
    """Time ``fn()`` as the module docstring describes.

    Args:
        fn: the work of one call (its result is dropped).
        config: budget and repeat bounds.
        device: where ``fn`` runs; CUDA work is synchronised around samples.

    Returns:
        A ``Timing`` per call of ``fn``.
    """
    sync = synchronizer(device)
    clock = time.perf_counter
    sync()
    t0 = clock()
    fn()
    sync()
    first = clock() - t0
    t0 = clock()
    fn()
    sync()
    est = clock() - t0
    calls = 2
    if est >= config.budget_s:
        ms = est * 1e3
        return Timing(ms, ms, ms, 1, 1, first * 1e3, calls)
    spent = est
    for _ in range(config.warmup - 1):
        if spent + est > config.budget_s / 4:
            break
        t0 = clock()
        fn()
        sync()
        last = clock() - t0
        spent += last
        est = min(est, last)
        calls += 1
    est = max(est, 1e-7)
    inner = max(1, math.ceil(config.min_sample_s / est))
    fits = int(config.budget_s // (est * inner))
    repeats = min(fits, config.max_repeats) if fits >= config.min_repeats else max(1, fits)
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = clock()
            for _ in range(inner):
                fn()
            sync()
            samples.append((clock() - t0) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    calls += repeats * inner
    p10, med, p90 = np.percentile(np.asarray(samples) * 1e3, [10, 50, 90])
    return Timing(float(med), float(p10), float(p90), repeats, inner, first * 1e3, calls)
