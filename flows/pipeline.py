"""Algorithm 1 of the paper: dense warm start, then prune + retrain cycles.

``run_pipeline`` is the loop: it checks the run directory (``flows.rundir``:
config.json, results.json, checkpoints), resumes from the last finished cycle,
calls ``run_cycle`` once per cycle, checkpoints each, and stops at
``run.cycles``, ``run.target_ratio`` or after ``run.patience`` cycles without a
better validation NLL. ``run_cycle`` is one cycle: prune (after cycle 0),
compile, train, evaluate, time, and the cycle's row. The configuration is a
``flows.run_config.RunConfig``, built once from the checked nested dict that
``build_config`` returns.

Each cycle seeds its own randomness from (seed, cycle), so a run resumed after
a kill gives the same results.json as an uninterrupted one.

Kernels (``run.kernels``, ``--kernels``): "compiled" (the default) trains and
evaluates each cycle on ``sparsekern.compile_sparse``'d dynamics, whose
parameters are the kept values only, then writes them back into the dense
masked model, which is pruned next and checkpointed as before (``flows.engine``).
"dense" trains the dense masked model itself. Rows of a compiled run add
``kernels``, ``not_compiled`` (ops the engine could not compile and ran dense;
empty for this package's flows, image flows included) and, when
``run.speedup_steps`` > 0, ``step_seconds_dense``, ``step_seconds_compiled``
and ``speedup``: a training step of both models on the
same batches, measured in the same run (the global RNG is restored, so the
measurement changes no result).

Two prune ratios appear, and they differ for structured pruning:

- ``prune.prune_ratio`` (PR, the ``--prune-ratio`` flag) is what each cycle
  removes. Unstructured: PR of the remaining prunable weights, globally, so
  after n cycles (1 - PR)^n of the weights remain. Structured: PR of the live
  neurons of every hidden layer of each vector field (never a field's outputs
  or a classifier's read-out), so each hidden layer keeps (1 - PR)^n of its
  neurons but the weights do not follow (1 - PR)^n: a weight between two
  hidden layers goes with either neuron (about (1 - PR)^(2n) kept), while the
  input layer's columns and the output layer's rows stay.
- ``prune_ratio`` in results.json (and ``run.target_ratio``) is the honest
  weight ratio, 1 - kept / prunable weights, counted from the masks
  (``flows.prune.sparsity``), for either method; ``kept_fraction`` is
  1 - prune_ratio and ``nonzero_params`` counts every nonzero parameter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from flows import distributed
from flows.checkpoint import check_output_dir, save_atomic
from flows.cnf import CNF, Flow, SequentialFlow
from flows.datasets import (
    IMAGE_DATASETS,
    TABULAR_DATASETS,
    TOY_DATASETS,
    load_image_dataset,
    load_tabular,
    toy_classification,
    toy_data,
)
from flows.engine import compile_for_training, measure_speedup
from flows.finite import check_finite_rows
from flows.likelihood import bits_per_dim, dequantize, nll_nats
from flows.multiscale import MultiscaleFlow
from flows.neural_ode import ODEClassifier
from flows.odenet import ODEnet
from flows.presets import merge
from flows.prune import empty_layers, prune_, sparsity
from flows.run_config import RunConfig, as_run_config, reference_config
from flows.run_report import write_run_report
from flows.rundir import (
    check_same_run,
    config_path,
    cycle_checkpoint,
    load_model_checkpoint,
    load_state_checked,
    read_results,
    read_run_config,
    train_checkpoint,
    write_results,
    write_run_config,
)
from flows.settings import check_config
from flows.train import TrainConfig, fit, nll_sum
from sparsekern import write_back

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ConfigLike = RunConfig | Mapping[str, Any]
_T = TypeVar("_T")


def build_config(dataset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset for ``dataset`` with a ``run`` section, merged with ``overrides``.

    ``overrides`` is a nested dict of the same shape (e.g. ``{"run": {"cycles":
    3}, "train": {"lr": 1e-3}}``); unknown keys are errors, and so are values of
    the wrong type or out of range (``flows.settings.SettingError``). Returns
    the checked nested dict; ``RunConfig.from_dict`` types it.
    """
    reference = reference_config(dataset)
    config = merge(reference, overrides or {})
    check_config(config, reference)
    return config


@dataclass
class RunData:
    """Splits of one dataset; ``y_*`` are labels for classification, else None."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    y_train: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    levels: int | None = None  # intensity levels for images (bits/dim), else None


def load_run_data(config: ConfigLike) -> RunData:
    """Load the dataset a config names, split into train / val / test.

    Raises ValueError if a split holds rows with NaN or inf ("train split of
    dataset 'power' has 3 rows with NaN or inf ..."), before any solver sees them.
    """
    c = as_run_config(config)
    data = _load_splits(c)
    for split in ("train", "val", "test"):
        check_finite_rows(getattr(data, split), f"{split} split of dataset {c.run.dataset!r}")
    return data


def _present(value: _T | None, name: str) -> _T:
    """``value``, which the preset holds for this kind of run (else a ValueError naming it)."""
    if value is None:
        raise ValueError(f"{name} is required for this dataset and model")
    return value


def _load_splits(c: RunConfig) -> RunData:
    name, dtype, seed = c.run.dataset, DTYPES[c.run.dtype], c.run.seed
    if c.task == "classification" or name in TOY_DATASETS:
        # Generated: one draw, normalised once, then split (the splits share it).
        n_train = _present(c.data.n_train, "data.n_train")
        n_val = _present(c.data.n_val, "data.n_val")
        n = n_train + n_val + _present(c.data.n_test, "data.n_test")
        a, b = n_train, n_train + n_val
        if c.task == "classification":
            x, y = toy_classification(name, n, seed=seed)
            x = x.to(dtype)
            return RunData(x[:a], x[a:b], x[b:], y[:a], y[a:b], y[b:])
        x = toy_data(name, n, seed=seed, dtype=dtype)
        return RunData(x[:a], x[a:b], x[b:])
    if name in TABULAR_DATASETS:
        if c.run.data_root is None:
            raise ValueError(f"run.data_root (--data-root) is required for {name!r}")
        d = load_tabular(name, c.run.data_root, dtype=dtype)
        return RunData(d.train, d.val, d.test)
    if name in IMAGE_DATASETS:
        d = load_image_dataset(name, c.run.data_root, dtype=dtype)
        n_val = max(1, d.train.shape[0] // 10)
        return RunData(d.train[:-n_val], d.train[-n_val:], d.test, levels=d.levels)
    raise ValueError(f"no loader for dataset {name!r}")


def build_model(config: ConfigLike, data: RunData) -> nn.Module:
    """A fresh model for the config's task and the data's shape (in the run's dtype)."""
    c = as_run_config(config)
    m = c.model
    dtype = DTYPES[c.run.dtype]
    solver: dict[str, Any] = {
        "solver": m.solver,
        "atol": m.atol,
        "rtol": m.rtol,
        "adjoint": m.adjoint,
    }
    if m.step_size is not None:
        solver["solver_options"] = {"step_size": m.step_size}
    hidden = list(m.hidden)
    if c.task == "classification":
        n_classes = int(data.y_train.max()) + 1
        model: nn.Module = ODEClassifier(
            data.train.shape[1],
            n_classes,
            hidden,
            activation=m.activation,
            time=_present(m.time, "model.time"),
            T=m.T,
            **solver,
        )
        return model.to(dtype)
    cnf_kw: dict[str, Any] = {
        "divergence": m.divergence,
        "noise": m.noise,
        "T": m.T,
        "train_T": m.train_T,
        **solver,
    }
    if m.kind == "conv":
        # FFJORD's multiscale flow (flows.multiscale); model.blocks is CNFs per stack.
        flow = MultiscaleFlow(
            tuple(data.train.shape[1:]),
            hidden,
            blocks=m.blocks,
            alpha=_present(m.alpha, "model.alpha"),
            activation=m.activation,
            cnf_kwargs=cnf_kw,
        )
        return flow.to(dtype)
    dim = data.train.shape[1]
    cnfs = [
        CNF(ODEnet(dim, hidden, time=_present(m.time, "model.time"), activation=m.activation),
            **cnf_kw)
        for _ in range(m.blocks)
    ]
    model = cnfs[0] if len(cnfs) == 1 else SequentialFlow(cnfs)
    return model.to(dtype)


class Task:
    """Loss and evaluation for one config: NLL (nats), bits/dim, or cross-entropy.

    ``run_config`` is the typed configuration, ``config`` its nested dict.
    """

    def __init__(self, config: ConfigLike, data: RunData) -> None:
        self.run_config = as_run_config(config)
        self.config = self.run_config.to_dict()
        self.data = data
        self.classification = self.run_config.task == "classification"
        self.images = data.levels is not None
        self.dims = math.prod(data.train.shape[1:])

    @property
    def train_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors training draws minibatches from: (x,) or (x, labels)."""
        if self.classification:
            return (self.data.train, self.data.y_train)
        return (self.data.train,)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The training loss of ``model`` on one minibatch (``train_tensors`` indexed)."""
        if self.classification:
            return nn.functional.cross_entropy(model(batch[0]), batch[1])
        if self.images:
            x = dequantize(batch[0], self.data.levels)
            return bits_per_dim(model.log_prob(x), self.dims, self.data.levels)
        return nll_nats(model.log_prob(batch[0]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, limit: int | None = None) -> dict[str, float]:
        """Metrics on a split ('train', 'val', 'test'), on its first ``limit`` rows.

        Returns {"nll": ...} (nats, bits/dim for images, cross-entropy for
        classification) and "accuracy" for classification. Deterministic: the
        exact trace where configured, else Hutchinson with probes fixed per row.
        Under torchrun every rank evaluates its share of the rows and the sums
        are reduced (``flows.distributed``); every rank returns the same metrics.
        """
        x = getattr(self.data, split)
        y = getattr(self.data, f"y_{split}")
        if limit is not None:
            x = x[:limit]
            y = None if y is None else y[:limit]
        n = x.shape[0]
        part = distributed.current().rows(n)
        model.eval()
        if self.classification:
            xs, ys = x[part], y[part]
            sums = [0.0, 0.0]
            if xs.shape[0]:
                logits = torch.cat([model(xs[i : i + 4096]) for i in range(0, xs.shape[0], 4096)])
                sums = [nn.functional.cross_entropy(logits, ys, reduction="sum").item(),
                        float((logits.argmax(1) == ys).sum())]
            ce, correct = distributed.gather(sums).sum(0).tolist()
            return {"nll": ce / n, "accuracy": correct / n}
        if self.images:
            # The whole split is dequantised with one fixed generator, then shared out.
            x = dequantize(x, self.data.levels, generator=torch.Generator().manual_seed(12345))
        total = nll_sum(model, x[part], batch_size=2048, exact=self.run_config.eval.exact,
                        rows=part, total=n)
        nll = float(distributed.gather([total]).sum()) / n
        if self.images:
            nll = bits_per_dim(torch.tensor(-nll), self.dims, self.data.levels).item()
        return {"nll": nll}


def iterations_per_cycle(config: ConfigLike, n_train: int) -> int:
    """run.iters if set, else epochs x batches per epoch x budget (at least 1)."""
    c = as_run_config(config)
    if c.run.iters is not None:
        return int(c.run.iters)
    per_epoch = math.ceil(n_train / c.train.batch_size)
    return max(1, round(c.train.epochs * per_epoch * c.run.budget))


def train_config(config: ConfigLike, n_train: int, cycle: int) -> TrainConfig:
    """The TrainConfig of one cycle: LR milestones scaled from epochs to iterations.

    Args:
        config: the run's configuration.
        n_train: rows of the training split.
        cycle: the cycle (0 = the dense warm start); seeds it (seed * 1000 + cycle).
    """
    c = as_run_config(config)
    t = c.train
    iters = iterations_per_cycle(c, n_train)
    scale = iters / max(1, t.epochs)
    milestones = tuple(sorted({max(1, round(e * scale)) for e in t.lr_milestones} - {iters}))
    return TrainConfig(
        iters=iters,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        beta1=t.beta1,
        beta2=t.beta2,
        eval_every=iters,
        checkpoint_every=max(1, min(50, iters // 4)),
        seed=c.run.seed * 1000 + cycle,
        lr_milestones=milestones,
        lr_gamma=t.lr_gamma,
    )


def load_cycle_model(
    out: str | Path, cycle: int | None = None, data: RunData | None = None
) -> tuple[nn.Module, dict[str, Any], RunData]:
    """Rebuild the model of a run directory after ``cycle`` (default: the last finished).

    ``data`` skips reloading the dataset when the caller already has it.
    Returns (model in eval mode, config as a nested dict, data).

    Raises:
        FileNotFoundError: no run in ``out``, or it has no finished cycle yet.
        ValueError: ``cycle`` is not a finished cycle of the run.
        PathError: config.json or results.json is damaged or invalid.
        CheckpointError: the cycle's checkpoint is truncated, corrupt, has
            non-finite weights or does not fit the model config.json describes.
    """
    out = Path(out)
    config = read_run_config(out)
    rows = read_results(out)
    if not rows:
        raise FileNotFoundError(f"run {out} has no finished cycle yet (results.json is empty)")
    cycles = [r["cycle"] for r in rows]
    if cycle is None:
        cycle = cycles[-1]
    elif cycle not in cycles:
        raise ValueError(
            f"run {out} has no finished cycle {cycle}; expected one of its finished cycles "
            f"{', '.join(map(str, cycles))}"
        )
    path = cycle_checkpoint(out, cycle)
    state = load_model_checkpoint(path)
    if data is None:
        data = load_run_data(config)
    model = build_model(config, data)
    load_state_checked(model, state["model"], path, config_path(out))
    model.eval()
    return model, config, data


def _stop_reason(config: RunConfig, rows: list[dict[str, Any]]) -> str | None:
    run = config.run
    last = rows[-1]
    if last["cycle"] >= run.cycles:
        return f"reached {run.cycles} prune cycles"
    if run.target_ratio is not None and last["prune_ratio"] >= run.target_ratio:
        return f"reached the target prune ratio {run.target_ratio}"
    if run.patience is not None:
        best = min(range(len(rows)), key=lambda i: rows[i]["val_nll"])
        if len(rows) - 1 - best >= run.patience:
            return f"validation loss has not improved for {run.patience} cycles"
    return None


class CycleResult(NamedTuple):
    """What ``run_cycle`` returns: the cycle's row and its training history."""

    row: dict[str, Any]
    history: list[dict[str, Any]]


def run_cycle(
    model: nn.Module,
    config: ConfigLike,
    task: Task,
    cycle: int,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    warm_history: list[dict[str, Any]] | None = None,
    progress: bool = False,
) -> CycleResult:
    """One cycle of Algorithm 1 on ``model``, in place: prune, train, evaluate.

    Seeds the global RNG with ``seed * 7919 + cycle`` first (pruning and setup;
    training seeds itself with ``seed * 1000 + cycle``, see ``train_config``).
    After cycle 0, prunes ``prune.prune_ratio`` by ``run.method``; with
    ``run.kernels="compiled"`` trains and evaluates the compiled model and
    writes its kept values back into ``model``.

    Args:
        model: the dense masked model, pruned and trained in place.
        config: the run's configuration.
        task: loss and evaluation (built from ``config`` and the run's data).
        cycle: the cycle's number (0 = the dense warm start, not pruned).
        checkpoint: file for the in-cycle training state (``fit``'s checkpoint).
        resume: continue training from ``checkpoint`` if it exists.
        warm_history: the training history of a warm start whose weights
            ``model`` already holds: the cycle then trains nothing.
        progress: show a progress bar for training.

    Returns:
        The row (``RESULT_FIELDS``, total_params, empty_layers, prepare_seconds,
        train_seconds, eval_seconds, iters, kernels; not_compiled and the
        speedup measurement when compiled; accuracies for classification) and
        the training history.
    """
    config = as_run_config(config)
    run = config.run
    torch.manual_seed(run.seed * 7919 + cycle)
    t_start = time.perf_counter()
    if cycle > 0:
        # Every rank prunes rank 0's weights with the same seed; the masks must agree.
        distributed.broadcast_module_(model)
        prune_(model, config.prune.prune_ratio, run.method)
        distributed.check_same_on_ranks(
            {k: b for k, b in model.named_buffers() if k.endswith("_mask")},
            f"the masks after pruning cycle {cycle}",
        )
    cfg = train_config(config, task.data.train.shape[0], cycle)
    # Train and evaluate on compiled kernels (kept values only), or on the
    # dense masked model itself.
    compiled = run.kernels == "compiled"
    work, dense_ops = compile_for_training(model) if compiled else (model, [])
    t_prepare = time.perf_counter() - t_start
    if warm_history is not None:
        history = warm_history
    else:
        history = fit(
            work,
            task.loss,
            task.train_tensors,
            cfg,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
            desc=f"cycle {cycle}",
        )
    if compiled:
        write_back(work)
    t_train = time.perf_counter() - t_start - t_prepare
    t0 = time.perf_counter()
    limit = run.eval_samples
    metrics = {
        split: task.evaluate(work, split, limit if split == "train" else None)
        for split in ("train", "val", "test")
    }
    t_eval = time.perf_counter() - t0
    speed = {}
    if compiled and run.speedup_steps > 0:
        speed = measure_speedup(model, work, task.loss, task.train_tensors, cfg.batch_size,
                                run.speedup_steps, seed=cfg.seed)
    s = sparsity(model)
    last = history[-1]
    per_rank = {
        key: {"mean": last[key], "max": last.get(f"{key}_max", last[key])}
        for key in ("nfe_forward", "nfe_backward")
    }
    # Timing is each rank's own; the row holds the ranks' mean, per_rank the max too.
    per_rank.update(distributed.mean_and_max(
        [t_prepare, t_train, t_eval], ("prepare_seconds", "train_seconds", "eval_seconds")))
    t_prepare, t_train, t_eval = (per_rank[k]["mean"] for k in
                                  ("prepare_seconds", "train_seconds", "eval_seconds"))
    row: dict[str, Any] = {
        "cycle": cycle,
        "prune_ratio": s["prune_ratio"],
        "kept_fraction": s["kept_fraction"],
        "nonzero_params": s["nonzero_params"],
        "total_params": s["total_params"],  # the dense count (Table 3's #params at PR 0)
        # Layers with no kept weight (global magnitude pruning may empty one; the
        # prune step warned when it did): they pass on their bias alone.
        "empty_layers": empty_layers(model),
        "train_nll": metrics["train"]["nll"],
        "val_nll": metrics["val"]["nll"],
        "test_nll": metrics["test"]["nll"],
        "nfe_forward": last["nfe_forward"],
        "nfe_backward": last["nfe_backward"],
        "seconds": t_prepare + t_train + t_eval,
        "prepare_seconds": t_prepare,
        "train_seconds": t_train,
        "eval_seconds": t_eval,
        "iters": cfg.iters,
        "kernels": run.kernels,
        **speed,
        "world_size": distributed.current().size,
        "per_rank": per_rank,
    }
    if compiled:
        row["not_compiled"] = dense_ops
    if task.classification:
        for split in ("train", "val", "test"):
            row[f"{split}_accuracy"] = metrics[split]["accuracy"]
    return CycleResult(row, history)


def run_pipeline(
    config: ConfigLike,
    out: str | Path,
    resume: bool = False,
    warm_start: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Run Algorithm 1 into directory ``out`` and return the per-cycle rows.

    Args:
        config: from ``build_config`` (or a ``RunConfig``).
        out: run directory (created). Without ``resume`` it must not hold an
            earlier run's results.
        resume: continue an interrupted run in ``out`` from its last finished
            cycle (and from inside the interrupted cycle's training).
        warm_start: a cycle-0 checkpoint of a run with the same data and model
            settings; its dense model is used instead of training one (the demo
            shares one warm start between unstructured and structured runs).
        progress: show progress bars.
        plots: draw the run's plots (DIR/plots) besides results.md.

    Each cycle (``run_cycle``) prunes ``prune.prune_ratio`` of the remaining
    weights (unstructured) or of each hidden layer's live neurons (structured);
    a row's ``prune_ratio`` is the overall fraction of prunable weights removed
    so far, counted from the masks, whichever the method (see the module
    docstring).

    Returns the rows of results.json: each has ``RESULT_FIELDS`` (plus
    train_accuracy, val_accuracy, test_accuracy for classification, nfe per
    training batch, seconds split into prepare_seconds (pruning and compiling),
    train_seconds (retraining) and eval_seconds).
    """
    # Everything is checked (settings, the directory, earlier files, the data)
    # before anything is written, so bad input leaves the directory as it was.
    c = as_run_config(config)
    world = distributed.current()
    out = check_output_dir(out, "run directory")
    rows = read_results(out)
    check_same_run(out, c, len(rows), resume)
    last_path = cycle_checkpoint(out, rows[-1]["cycle"]) if rows else None
    last = load_model_checkpoint(last_path) if last_path is not None else None
    if resume and train_checkpoint(out, len(rows)).exists():
        load_model_checkpoint(train_checkpoint(out, len(rows)))  # fit() resumes from it
    # A warm start replaces the training of cycle 0, so only a run that starts there uses it.
    warm_path = Path(warm_start) if warm_start and not rows else None
    warm = load_model_checkpoint(warm_path) if warm_path is not None else None
    data = _on_device(load_run_data(c), world.device)
    # The global batch must share out evenly before anything is written.
    distributed.per_rank_batch(min(c.train.batch_size, data.train.shape[0]), world)
    torch.manual_seed(c.run.seed)  # the initial weights belong to the run's seed
    model = build_model(c, data)
    if last_path is not None and last is not None:
        load_state_checked(model, last["model"], last_path, config_path(out))
    model.to(world.device)
    # Every rank has checked the directory before rank 0 writes to it.
    distributed.barrier()
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, c)
    task = Task(c, data)
    if rows and _stop_reason(c, rows):
        return rows
    if warm_path is not None and warm is not None:
        load_state_checked(model, warm["model"], warm_path, config_path(out))

    bar = tqdm(
        total=c.run.cycles + 1,
        initial=len(rows),
        desc=f"{c.run.dataset} {c.run.method}",
        disable=not progress or not world.main,
        dynamic_ncols=True,
    )
    cycle = len(rows)
    while True:
        row, history = run_cycle(
            model,
            c,
            task,
            cycle,
            checkpoint=train_checkpoint(out, cycle),
            resume=resume,
            warm_history=warm["history"] if warm is not None and cycle == 0 else None,
            progress=progress,
        )
        rows.append(row)
        if world.main:
            save_atomic(
                {"model": model.state_dict(), "row": row, "history": history,
                 "config": c.to_dict()},
                cycle_checkpoint(out, cycle),
            )
            write_results(out, rows)
            train_checkpoint(out, cycle).unlink(missing_ok=True)
        distributed.barrier()
        bar.update(1)
        bar.set_postfix(ratio=f"{row['prune_ratio']:.2f}", val=f"{row['val_nll']:.3f}")
        if _stop_reason(c, rows):
            break
        cycle += 1
    bar.close()
    if world.main:
        _write_report(out, c, data, plots)
    distributed.barrier()
    return rows


def _on_device(data: RunData, device: torch.device) -> RunData:
    """``data`` with its tensors on ``device`` (a rank's GPU under torchrun)."""
    if device.type == "cpu":
        return data
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in vars(data).items()}
    return RunData(**moved)


def _write_report(out: Path, config: RunConfig, data: RunData, plots: bool) -> None:
    """results.md and plots; a 2D density run also gets its densities per cycle, an
    image run a grid of samples per cycle."""

    def cycle_model(cycle: int) -> Flow:
        return cast(Flow, load_cycle_model(out, cycle, data)[0])

    if config.task == "density" and config.run.dataset in TOY_DATASETS:
        write_run_report(out, plots, cycle_model=cycle_model, points=data.test)
    elif data.levels is not None:
        write_run_report(out, plots, cycle_model=cycle_model)
    else:
        write_run_report(out, plots)
