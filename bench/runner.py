"""The benchmark loop: cases x providers x metrics -> rows (``bench.schema``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from bench.cases import Case, Shape, build_field, kept_weights, reduced_weights
from bench.metrics import (
    FLOW_METRICS,
    FLOW_RUNNERS,
    METRICS,
    RUNNERS,
    Inputs,
    Result,
    conv_roofline,
    flops,
    make_inputs,
    rel_err,
    roofline,
)
from bench.providers import Prepared, Provider
from bench.schema import empty_row
from bench.timing import TimingConfig


@dataclass
class Settings:
    """Options of a run that are not the selection of cases and providers.

    Attributes:
        metrics: subset of ``bench.metrics.METRICS``, in run order.
        timing: budget and repeats of each measurement.
        dtype, device: of models and inputs.
        seed: of models, inputs and the solve's noise.
        masks: "random" or "magnitude" (unstructured cases; ``bench.cases``).
        batch: overrides every case's batch (None: the shape's).
        solve_batch: caps the batch of the flow metrics (None: no cap of its own).
        shape_solve_batch: also apply the shape's own cap (``Shape.solve_batch``: the
            image shapes'), as the command line does unless ``--solve-batch`` is given.
        solve_blocks: caps the number of CNF blocks in the solve (None: all).
    """

    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    timing: TimingConfig = field(default_factory=TimingConfig)
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    masks: str = "random"
    batch: int | None = None
    solve_batch: int | None = None
    shape_solve_batch: bool = True
    solve_blocks: int | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")


def _error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]


def _base_row(case: Case, provider: str, metric: str, batch: int, settings: Settings,
              kept: int, roof: float | None, reduced: int | None = None) -> dict[str, object]:
    shape = case.shape
    row = empty_row()
    row.update(
        case=case.name, shape=shape.name, shape_label=shape.label, structure=case.structure,
        density=case.density, kept_weights=kept, dense_weights=shape.dense_weights,
        kept_fraction=kept / shape.dense_weights, provider=provider, metric=metric,
        flop_ratio=shape.dense_weights / reduced if reduced else None,
        batch=batch, dtype=str(settings.dtype).removeprefix("torch."),
        device=str(settings.device), threads=torch.get_num_threads(), roofline_gflops=roof,
        masks=settings.masks if case.structure == "unstructured" and case.density < 1 else None,
    )
    if metric in FLOW_METRICS:
        row.update(atol=shape.atol, rtol=shape.rtol)
    return row


def _fill(row: dict[str, object], result: Result, n_flops: int) -> None:
    t = result.timing
    row.update(median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, repeats=t.repeats,
               inner=t.inner, first_ms=t.first_ms, flops=n_flops)
    row["gflops"] = n_flops / (t.median_ms * 1e-3) / 1e9 if t.median_ms > 0 else None
    if row["gflops"] is not None and row["roofline_gflops"]:
        row["roofline_fraction"] = row["gflops"] / row["roofline_gflops"]
    if result.nfe is not None:
        evals = result.nfe + (result.nfe_backward or 0)
        row.update(nfe=result.nfe, nfe_backward=result.nfe_backward,
                   per_nfe_ms=t.median_ms / max(evals, 1), model_ms=result.model_ms,
                   solver_ms=result.solver_ms, ode_solver=result.ode_solver,
                   solve_note=result.solve_note)


def metrics_of(provider: Provider, metrics: list[str]) -> list[str]:
    """The metrics of ``metrics`` that ``provider`` measures (``metric_unavailable``)."""
    return [m for m in metrics if provider.metric_unavailable(m) is None]


def case_metric_reason(case: Case, metric: str) -> str | None:
    """None if ``metric`` is measured on ``case``, else why not (the image shapes measure
    the flow metrics on a few cases only: ``Shape.flow_densities``)."""
    return case.shape.flow_metric_reason(case) if metric in FLOW_METRICS else None


def case_metrics(case: Case, metrics: list[str]) -> list[str]:
    """The metrics of ``metrics`` measured on ``case`` (``case_metric_reason``)."""
    return [m for m in metrics if case_metric_reason(case, m) is None]


def measured_metrics(provider: Provider, case: Case, metrics: list[str]) -> list[str]:
    """What ``provider`` measures on ``case``: nothing on a shape it does not run
    (``Provider.shape_unavailable``), else the metrics both it and the case measure."""
    if provider.shape_unavailable(case.shape) is not None:
        return []
    return metrics_of(provider, case_metrics(case, metrics))


def solve_batch_of(shape: Shape, batch: int, settings: Settings) -> int:
    """The batch of the flow metrics: ``batch`` capped by ``settings.solve_batch`` and,
    with ``settings.shape_solve_batch``, by the shape's own cap."""
    out = min(batch, settings.solve_batch or batch)
    if settings.shape_solve_batch and shape.solve_batch:
        out = min(out, shape.solve_batch)
    return out


def roofline_provider(shape: Shape) -> str:
    """The ``provider`` of a case's roofline row: "torch.mm" (GEMM), or "torch.conv2d" for
    an image shape (PyTorch's dense convolution)."""
    return "torch.conv2d" if shape.is_conv else "torch.mm"


def _speedups(rows: list[dict[str, object]]) -> None:
    base = {(r["case"], r["metric"]): r["median_ms"] for r in rows
            if r["provider"] == "dense_eager" and r["median_ms"]}
    for r in rows:
        b = base.get((r["case"], r["metric"]))
        if b and r["median_ms"] and r["metric"] != "roofline":
            r["speedup"] = b / r["median_ms"]


class CaseRunner:
    """Runs every selected provider and metric on one case."""

    def __init__(self, case: Case, providers: list[Provider], settings: Settings,
                 bar: tqdm) -> None:
        self.case = case
        self.providers = providers
        self.settings = settings
        self.bar = bar
        shape = case.shape
        self.batch = settings.batch or shape.batch
        self.solve_batch = solve_batch_of(shape, self.batch, settings)
        self.metrics = case_metrics(case, settings.metrics)
        self.flow_metrics = any(m in FLOW_METRICS for m in self.metrics)
        n_blocks = shape.blocks if self.flow_metrics else 1
        if settings.solve_blocks:
            n_blocks = min(n_blocks, settings.solve_blocks)
        self.nets = [build_field(case, dtype=settings.dtype, device=settings.device,
                                 seed=settings.seed, block=b, masks=settings.masks)
                     for b in range(n_blocks)]
        self.kept = [kept_weights(n) for n in self.nets]
        self.reduced = reduced_weights(self.nets[0])
        self.inputs: Inputs = make_inputs(shape.state_shape, self.batch, self.solve_batch,
                                          shape.T, settings.dtype, settings.device,
                                          settings.seed, noise=shape.noise)
        self.reference: dict[str, tuple[torch.Tensor, ...]] = {}
        self.reference_keys: dict[str, tuple[str, ...] | None] = {}

    def _roofline(self, batch: int):
        s, shape = self.settings, self.case.shape
        if shape.image is not None:
            return conv_roofline(shape.conv_layers, shape.image, batch, s.dtype, s.device,
                                 s.timing)
        return roofline(shape.layer_shapes, batch, s.dtype, s.device, s.timing)

    def roofline_row(self) -> dict[str, object]:
        s, shape = self.settings, self.case.shape
        row = _base_row(self.case, roofline_provider(shape), "roofline", self.batch, s,
                        self.kept[0], None, self.reduced)
        try:
            timing, rate = self._roofline(self.batch)
        except Exception as exc:
            row["error"] = _error(exc)
            return row
        row.update(median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                   repeats=timing.repeats, inner=timing.inner, first_ms=timing.first_ms,
                   flops=2 * self.batch * shape.pixels * shape.dense_weights, gflops=rate,
                   roofline_gflops=rate, roofline_fraction=1.0)
        return row

    def _solve_roofline(self, roof: float | None) -> float | None:
        """The dense GEMM (image shapes: convolution) rate at the solve's batch (the case's
        roofline if they agree)."""
        if self.solve_batch == self.batch or not self.flow_metrics:
            return roof
        try:
            return self._roofline(self.solve_batch)[1]
        except Exception:
            return None

    def run(self) -> list[dict[str, object]]:
        roof_row = self.roofline_row()
        rows = [roof_row]
        roof = roof_row["gflops"]
        roof_solve = self._solve_roofline(roof)
        for provider in self.providers:
            metrics = measured_metrics(provider, self.case, self.settings.metrics)
            if not metrics:
                continue
            prepared: Prepared | None = None
            prep_error = None
            try:
                # Always, even for the solve alone: it also starts the provider's case.
                prepared = provider.prepare(self.nets[0], self.batch)
            except Exception as exc:
                prep_error = _error(exc)
            for metric in metrics:
                self.bar.set_postfix_str(f"{provider.name} {metric}", refresh=False)
                flow_metric = metric in FLOW_METRICS
                batch = self.solve_batch if flow_metric else self.batch
                row = _base_row(self.case, provider.name, metric, batch, self.settings,
                                self.kept[0], roof_solve if flow_metric else roof, self.reduced)
                if prepared is not None:
                    row["div_impl"] = prepared.div_impl.get(metric)
                    row["backend"] = prepared.info.get("backend")
                    row["layouts"] = prepared.info.get("layouts")
                    row["precision"] = prepared.info.get("precision")
                if prep_error is not None and not flow_metric:
                    row["error"] = prep_error
                else:
                    try:
                        self._measure(provider, prepared, metric, row)
                    except Exception as exc:
                        row["error"] = _error(exc)
                rows.append(row)
                self.bar.update(1)
        _speedups(rows)
        return rows

    def _measure(self, provider: Provider, prepared: Prepared | None, metric: str,
                 row: dict[str, object]) -> None:
        s = self.settings
        if metric in FLOW_METRICS:
            prepare = provider.prepare_flow if metric == "solve" else provider.prepare_train_flow
            flow = prepare(self.case.shape, self.nets, self.solve_batch)
            result = FLOW_RUNNERS[metric](flow, self.inputs, s.timing, s.device)
            n_flops = flops(metric, self.kept[0], self.solve_batch, result.nfe_per_block,
                            self.kept, result.nfe_backward_per_block,
                            pixels=self.case.shape.pixels)
        else:
            if prepared is None:
                raise RuntimeError("provider was not prepared")
            result = RUNNERS[metric](prepared.field, self.inputs, s.timing, s.device)
            n_flops = flops(metric, self.kept[0], self.batch, pixels=self.case.shape.pixels)
        _fill(row, result, n_flops)
        if provider.name == "dense_eager":
            self.reference[metric] = result.outputs
            self.reference_keys[metric] = result.output_keys
        elif metric in self.reference:
            ref = self.reference[metric]
            if result.output_keys == self.reference_keys[metric]:
                row["rel_err"] = rel_err(result.outputs, ref)
            else:
                # Outputs that do not pair up (train_solve: parameters held another way,
                # e.g. CSR values): the first output (the loss) alone.
                row["rel_err"] = rel_err(result.outputs[:1], ref[:1])


def run_benchmark(
    cases: list[Case],
    providers: list[Provider],
    settings: Settings,
    progress: bool = True,
    on_case: Callable[[list[dict[str, object]]], None] | None = None,
) -> list[dict[str, object]]:
    """Measure every metric of every provider on every case.

    Args:
        cases: what to measure (``bench.cases``).
        providers: available providers, dense_eager first if present (it gives
            the reference outputs and the speedups' baseline).
        settings: metrics, timing, dtype, device, ...
        progress: show a tqdm bar (stderr).
        on_case: called with all rows so far after each case (to save partial results).

    Returns:
        Rows with the fields of ``bench.schema.ROW_FIELDS``: one roofline row per
        case, then one per (provider, metric) the provider measures on the case (none
        for the others: ``Provider.metric_unavailable``, ``Provider.shape_unavailable``,
        ``case_metric_reason``). A failure is a row with ``error`` set and no times,
        never an exception.
    """
    rows: list[dict[str, object]] = []
    per_case = {c.name: sum(len(measured_metrics(p, c, settings.metrics)) for p in providers)
                for c in cases}
    total = sum(per_case.values())
    with tqdm(total=total, disable=not progress, unit="meas", dynamic_ncols=True) as bar:
        for case in cases:
            bar.set_description(case.name)
            t0 = time.perf_counter()
            try:
                runner = CaseRunner(case, providers, settings, bar)
            except Exception as exc:
                row = _base_row(case, "-", "build", settings.batch or case.shape.batch,
                                settings, 0, None)
                row["error"] = _error(exc)
                rows.append(row)
                bar.update(per_case[case.name])
                continue
            rows += runner.run()
            if progress:
                bar.write(f"{case.name}: {time.perf_counter() - t0:.1f} s")
            if on_case is not None:
                on_case(rows)
    return rows
