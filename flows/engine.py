"""How the pipeline runs a cycle on sparsekern's compiled kernels.

After a prune step the flow is compiled (``compile_for_training``, through
``sparsekern.compile_sparse``): the optimiser then trains the kept values only,
evaluation runs on the same compiled dynamics, and the pipeline's
``sparsekern.write_back`` returns the trained values to the dense masked model
before the next prune step and the checkpoint. Image flows' concat convolutions
compile too (``sparsekern.fused_conv``); a layer the engine cannot compile (a
dilated convolution, say) runs dense through PyTorch and is listed, never
silently skipped.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

KERNELS = ("compiled", "dense")


def compile_for_training(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The compiled model for a cycle, and the ops left dense (e.g. "Conv2d with dilation
    (2, 2) (layers.0.conv)"; none for the flows of this package).

    Layouts are chosen by the engine's density rule, not by timing, so the same
    masks give the same kernels and a resumed run the same numbers.
    """
    from flows.prune import ensure_masks
    from sparsekern import SparseConfig, compile_sparse, compiled_fields

    ensure_masks(model)  # explicit masks: a weight that trains to 0.0 stays a kept weight
    config = SparseConfig(layout="auto", autotune=False, fallback="eager")
    with warnings.catch_warnings():
        # The list below reports what runs dense; the per-op warnings would repeat it.
        warnings.filterwarnings("ignore", message="sparsekern cannot compile")
        work = compile_sparse(model, config)
    dense_ops = [op for f in compiled_fields(work) for op in getattr(f, "eager_ops", [])]
    return work, dense_ops


def _step_seconds(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    batches: list[tuple[torch.Tensor, ...]],
) -> tuple[float, float]:
    """Median seconds of forward + backward over ``batches`` (after one warm-up), and mean NFE."""
    times, nfes = [], []
    model.train()
    for i, batch in enumerate([batches[0], *batches]):
        t0 = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
            nfes.append(float(getattr(model, "nfe_forward", 0)))
    for p in model.parameters():
        p.grad = None
    model.eval()
    return statistics.median(times), sum(nfes) / len(nfes)


def measure_speedup(
    dense: nn.Module,
    compiled: nn.Module,
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    data: tuple[torch.Tensor, ...],
    batch_size: int,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Training-step time of the dense masked model against the compiled one, same batches.

    Each side runs ``steps`` forward + backward passes (no optimiser step, so
    neither model changes) on the same minibatches and the same Hutchinson
    noise. The global RNG is restored afterwards, so measuring does not change
    the run's results.

    Returns:
        step_seconds_dense, step_seconds_compiled (medians), speedup (their
        ratio), and the mean forward NFE of each (equal up to solver rounding).
    """
    n = data[0].shape[0]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        batches.append(tuple(t[idx] for t in data))
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        t_dense, nfe_dense = _step_seconds(dense, loss_fn, batches)
        torch.manual_seed(seed)
        t_comp, nfe_comp = _step_seconds(compiled, loss_fn, batches)
    finally:
        torch.set_rng_state(rng)
    return {
        "step_seconds_dense": t_dense,
        "step_seconds_compiled": t_comp,
        "speedup": t_dense / t_comp,
        "step_nfe_dense": nfe_dense,
        "step_nfe_compiled": nfe_comp,
    }
