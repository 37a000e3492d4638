"""Algorithm 1 of the paper: dense warm start, then prune + retrain cycles.

A run lives in one directory::

    DIR/config.json               the resolved configuration
    DIR/results.json              one row per finished cycle (rewritten atomically)
    DIR/results.md                the same as a markdown table
    DIR/checkpoints/cycle_KKK.pt  model (with masks) after cycle K
    DIR/checkpoints/train_cycle_KKK.pt  in-cycle training state, removed when the cycle ends
    DIR/plots/*.png               NLL against prune ratio, densities per cycle

Each cycle seeds its own randomness from (seed, cycle), so a run resumed after
a kill gives the same results.json as an uninterrupted one.

Kernels (``run.kernels``, ``--kernels``): "compiled" (the default) trains and
evaluates each cycle on ``sparsekern.compile_sparse``'d dynamics, whose
parameters are the kept values only, then writes them back into the dense
masked model, which is pruned next and checkpointed as before (``flows.engine``).
"dense" trains the dense masked model itself. Rows of a compiled run add
``kernels``, ``not_compiled`` (ops that ran dense, e.g. an image flow's
convolutions) and, when ``run.speedup_steps`` > 0, ``step_seconds_dense``,
``step_seconds_compiled`` and ``speedup``: a training step of both models on the
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

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from flows.checkpoint import (
    CheckpointError,
    PathError,
    check_finite_state,
    check_output_dir,
    load_checkpoint,
    read_json,
    save_atomic,
    write_text_atomic,
)
from flows.cnf import CNF, SequentialFlow
from flows.datasets import (
    IMAGE_DATASETS,
    TABULAR_DATASETS,
    TOY_DATASETS,
    load_image_dataset,
    load_tabular,
    toy_classification,
    toy_data,
)
from flows.engine import compile_for_training, measure_speedup, write_back
from flows.finite import check_finite_rows
from flows.likelihood import LogitTransform, bits_per_dim, dequantize, nll_nats
from flows.neural_ode import ODEClassifier
from flows.odenet import ConvODEnet, ODEnet
from flows.presets import PRESETS, get_preset, merge
from flows.prune import empty_layers, ensure_masks, prune_, sparsity
from flows.settings import check_config
from flows.train import TrainConfig, evaluate_nll, fit

DTYPES = {"float32": torch.float32, "float64": torch.float64}
RESULT_FIELDS = (
    "cycle",
    "prune_ratio",
    "kept_fraction",
    "nonzero_params",
    "train_nll",
    "val_nll",
    "test_nll",
    "nfe_forward",
    "nfe_backward",
    "seconds",
)
RUN_DEFAULTS: dict[str, Any] = {
    "dataset": "gaussians",
    "method": "unstructured",
    "cycles": 8,
    "target_ratio": None,
    "patience": None,
    "seed": 0,
    "budget": 1.0,
    "iters": None,
    "data_root": None,
    "dtype": "float32",
    "eval_samples": 2048,
    "kernels": "compiled",
    "speedup_steps": 3,
}


def build_config(dataset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset for ``dataset`` with a ``run`` section, merged with ``overrides``.

    ``overrides`` is a nested dict of the same shape (e.g. ``{"run": {"cycles":
    3}, "train": {"lr": 1e-3}}``); unknown keys are errors.
    """
    reference = reference_config(dataset)
    config = merge(reference, overrides or {})
    check_config(config, reference)
    return config


def reference_config(dataset: str) -> dict[str, Any]:
    """The configuration ``build_config`` starts from: the preset with the run defaults."""
    config = get_preset(dataset)
    config["run"] = dict(RUN_DEFAULTS, dataset=dataset)
    return config


def validate_config(config: dict[str, Any]) -> None:
    """Check every setting's type and range (``flows.settings``) before any work starts.

    Raises ValueError (``flows.settings.SettingError`` for a bad value) naming
    the setting, the value and what is expected.
    """
    run = config.get("run") if isinstance(config, dict) else None
    dataset = run.get("dataset") if isinstance(run, dict) else None
    if dataset not in PRESETS:
        raise ValueError(
            f"run.dataset={dataset!r} is invalid: expected one of {', '.join(sorted(PRESETS))}"
        )
    check_config(config, reference_config(dataset))


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


def load_run_data(config: dict[str, Any]) -> RunData:
    """Load the dataset a config names, split into train / val / test.

    Raises ValueError if a split holds rows with NaN or inf ("train split of
    dataset 'power' has 3 rows with NaN or inf ..."), before any solver sees them.
    """
    data = _load_splits(config)
    for split in ("train", "val", "test"):
        check_finite_rows(
            getattr(data, split), f"{split} split of dataset {config['run']['dataset']!r}"
        )
    return data


def _load_splits(config: dict[str, Any]) -> RunData:
    run, data = config["run"], config["data"]
    name, dtype, seed = run["dataset"], DTYPES[run["dtype"]], run["seed"]
    if config["task"] == "classification":
        n = data["n_train"] + data["n_val"] + data["n_test"]
        x, y = toy_classification(name, n, seed=seed)
        x = x.to(dtype)
        a, b = data["n_train"], data["n_train"] + data["n_val"]
        return RunData(x[:a], x[a:b], x[b:], y[:a], y[a:b], y[b:])
    if name in TOY_DATASETS:
        # One draw, normalised once, then split: the splits share the normalisation.
        n = data["n_train"] + data["n_val"] + data["n_test"]
        x = toy_data(name, n, seed=seed, dtype=dtype)
        a, b = data["n_train"], data["n_train"] + data["n_val"]
        return RunData(x[:a], x[a:b], x[b:])
    if name in TABULAR_DATASETS:
        if run["data_root"] is None:
            raise ValueError(f"run.data_root (--data-root) is required for {name!r}")
        d = load_tabular(name, run["data_root"], dtype=dtype)
        return RunData(d.train, d.val, d.test)
    if name in IMAGE_DATASETS:
        d = load_image_dataset(name, run["data_root"], dtype=dtype)
        n_val = max(1, d.train.shape[0] // 10)
        return RunData(d.train[:-n_val], d.train[-n_val:], d.test, levels=d.levels)
    raise ValueError(f"no loader for dataset {name!r}")


def build_model(config: dict[str, Any], data: RunData) -> nn.Module:
    """A fresh model for the config's task and the data's shape."""
    m = config["model"]
    dtype = DTYPES[config["run"]["dtype"]]
    solver = {"solver": m["solver"], "atol": m["atol"], "rtol": m["rtol"], "adjoint": m["adjoint"]}
    if config["task"] == "classification":
        n_classes = int(data.y_train.max()) + 1
        model: nn.Module = ODEClassifier(
            data.train.shape[1],
            n_classes,
            m["hidden"],
            activation=m["activation"],
            time=m["time"],
            T=m["T"],
            **solver,
        )
        return model.to(dtype)
    cnf_kw = {
        "divergence": m["divergence"],
        "noise": m["noise"],
        "T": m["T"],
        "train_T": m["train_T"],
        **solver,
    }
    if m["kind"] == "conv":
        shape = tuple(data.train.shape[1:])
        blocks: list[nn.Module] = [LogitTransform(m["alpha"])]
        blocks += [
            CNF(ConvODEnet(shape, m["hidden"], activation=m["activation"]), **cnf_kw)
            for _ in range(m["blocks"])
        ]
        return SequentialFlow(blocks).to(dtype)
    dim = data.train.shape[1]
    cnfs = [
        CNF(ODEnet(dim, m["hidden"], time=m["time"], activation=m["activation"]), **cnf_kw)
        for _ in range(m["blocks"])
    ]
    model = cnfs[0] if len(cnfs) == 1 else SequentialFlow(cnfs)
    return model.to(dtype)


class Task:
    """Loss and evaluation for one config: NLL (nats), bits/dim, or cross-entropy."""

    def __init__(self, config: dict[str, Any], data: RunData) -> None:
        self.config, self.data = config, data
        self.classification = config["task"] == "classification"
        self.images = data.levels is not None
        self.dims = math.prod(data.train.shape[1:])

    @property
    def train_tensors(self) -> tuple[torch.Tensor, ...]:
        if self.classification:
            return (self.data.train, self.data.y_train)
        return (self.data.train,)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
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
        exact trace where configured, else Hutchinson with a fixed seed.
        """
        x = getattr(self.data, split)
        y = getattr(self.data, f"y_{split}")
        if limit is not None:
            x = x[:limit]
            y = None if y is None else y[:limit]
        model.eval()
        if self.classification:
            logits = torch.cat([model(x[i : i + 4096]) for i in range(0, x.shape[0], 4096)])
            return {
                "nll": nn.functional.cross_entropy(logits, y).item(),
                "accuracy": (logits.argmax(1) == y).double().mean().item(),
            }
        rng = torch.get_rng_state()
        torch.manual_seed(12345)  # the same Hutchinson probes at every evaluation
        try:
            if self.images:
                x = dequantize(x, self.data.levels, generator=torch.Generator().manual_seed(12345))
            nll = evaluate_nll(model, x, batch_size=2048, exact=self.config["eval"]["exact"])
        finally:
            torch.set_rng_state(rng)
        if self.images:
            nll = bits_per_dim(torch.tensor(-nll), self.dims, self.data.levels).item()
        return {"nll": nll}


def iterations_per_cycle(config: dict[str, Any], n_train: int) -> int:
    """run.iters if set, else epochs x batches per epoch x budget (at least 1)."""
    run, train = config["run"], config["train"]
    if run["iters"] is not None:
        return int(run["iters"])
    per_epoch = math.ceil(n_train / train["batch_size"])
    return max(1, round(train["epochs"] * per_epoch * run["budget"]))


def train_config(config: dict[str, Any], n_train: int, cycle: int) -> TrainConfig:
    """The TrainConfig of one cycle: LR milestones scaled from epochs to iterations."""
    t = config["train"]
    iters = iterations_per_cycle(config, n_train)
    scale = iters / max(1, t["epochs"])
    milestones = tuple(sorted({max(1, round(e * scale)) for e in t["lr_milestones"]} - {iters}))
    return TrainConfig(
        iters=iters,
        batch_size=t["batch_size"],
        lr=t["lr"],
        weight_decay=t["weight_decay"],
        optimizer=t["optimizer"],
        beta1=t["beta1"],
        beta2=t["beta2"],
        eval_every=iters,
        checkpoint_every=max(1, min(50, iters // 4)),
        seed=config["run"]["seed"] * 1000 + cycle,
        lr_milestones=milestones,
        lr_gamma=t["lr_gamma"],
    )


def _cycle_path(out: Path, cycle: int) -> Path:
    return out / "checkpoints" / f"cycle_{cycle:03d}.pt"


def load_cycle_model(
    out: str | Path, cycle: int | None = None, data: RunData | None = None
) -> tuple[nn.Module, dict[str, Any], RunData]:
    """Rebuild the model of a run directory after ``cycle`` (default: the last finished).

    ``data`` skips reloading the dataset when the caller already has it.
    Returns (model in eval mode, config, data).

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
    path = _cycle_path(out, cycle)
    state = _load_model_checkpoint(path)
    if data is None:
        data = load_run_data(config)
    model = build_model(config, data)
    _load_checked(model, state["model"], path, out / "config.json")
    model.eval()
    return model, config, data


def _load_model_checkpoint(path: Path) -> dict[str, Any]:
    """A cycle checkpoint with a finite model state, or a CheckpointError naming ``path``."""
    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(path, f"checkpoint {path} holds no model state ('model')")
    check_finite_state(state["model"], path)
    return state


def _load_checked(model: nn.Module, state_dict: dict[str, Any], path: Path, source: Path) -> None:
    try:
        load_model_state(model, state_dict)
    except (RuntimeError, KeyError, ValueError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise CheckpointError(
            path,
            f"checkpoint {path} does not fit the model that {source} describes ({first})",
        ) from None


def load_model_state(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load a checkpoint's model state, giving ``model`` mask buffers first if it has some."""
    if any(k.endswith("weight_mask") for k in state_dict):
        ensure_masks(model)
    model.load_state_dict(state_dict)


def read_run_config(out: str | Path) -> dict[str, Any]:
    """The checked configuration of run directory ``out`` (DIR/config.json).

    Raises FileNotFoundError if there is none, PathError naming the file if it
    is damaged or any setting is invalid (see ``validate_config``).
    """
    path = Path(out) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no run in {out}: {path} not found")
    config = read_json(path, "run configuration")
    try:
        validate_config(config)
    except ValueError as e:
        raise PathError(path, f"run configuration {path} is invalid: {e}") from None
    return config


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The rows of DIR/results.json, or [] if there is none yet.

    Raises PathError naming the file if it is damaged: not JSON, not a list of
    rows numbered 0, 1, ..., or a row without the fields of ``RESULT_FIELDS``.
    """
    path = Path(out) / "results.json"
    if not path.exists():
        return []
    rows = read_json(path, "results file")
    expected = "expected a list of per-cycle rows as sparseflow writes them"
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise PathError(path, f"results file {path} does not hold a list of rows; {expected}")
    for i, r in enumerate(rows):
        missing = [k for k in RESULT_FIELDS if k not in r]
        if missing:
            raise PathError(
                path, f"results file {path}: row {i} lacks {', '.join(missing)}; {expected}"
            )
        if r["cycle"] != i:
            raise PathError(
                path, f"results file {path}: row {i} is cycle {r['cycle']!r}, not {i}; {expected}"
            )
    return rows


def _stop_reason(config: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    run = config["run"]
    last = rows[-1]
    if last["cycle"] >= run["cycles"]:
        return f"reached {run['cycles']} prune cycles"
    if run["target_ratio"] is not None and last["prune_ratio"] >= run["target_ratio"]:
        return f"reached the target prune ratio {run['target_ratio']}"
    if run["patience"] is not None:
        best = min(range(len(rows)), key=lambda i: rows[i]["val_nll"])
        if len(rows) - 1 - best >= run["patience"]:
            return f"validation loss has not improved for {run['patience']} cycles"
    return None


def run_pipeline(
    config: dict[str, Any],
    out: str | Path,
    resume: bool = False,
    warm_start: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Run Algorithm 1 into directory ``out`` and return the per-cycle rows.

    Args:
        config: from ``build_config``.
        out: run directory (created). Without ``resume`` it must not hold an
            earlier run's results.
        resume: continue an interrupted run in ``out`` from its last finished
            cycle (and from inside the interrupted cycle's training).
        warm_start: a cycle-0 checkpoint of a run with the same data and model
            settings; its dense model is used instead of training one (the demo
            shares one warm start between unstructured and structured runs).

    Each cycle prunes ``config["prune"]["prune_ratio"]`` of the remaining
    weights (unstructured) or of each hidden layer's live neurons (structured);
    a row's ``prune_ratio`` is the overall fraction of prunable weights removed
    so far, counted from the masks, whichever the method (see the module
    docstring).

    Each row has ``RESULT_FIELDS`` (plus train_accuracy, val_accuracy,
    test_accuracy for classification, nfe per training batch, seconds split into
    prepare_seconds (pruning and compiling), train_seconds (retraining) and
    eval_seconds).
    """
    # Everything is checked (settings, the directory, earlier files, the data)
    # before anything is written, so bad input leaves the directory as it was.
    validate_config(config)
    out = check_output_dir(out, "run directory")
    config_path = out / "config.json"
    rows = read_results(out)
    if config_path.exists() and (rows or resume):
        saved = read_json(config_path, "run configuration")
        if not resume:
            raise FileExistsError(
                f"{out} already holds a run ({len(rows)} cycles); use --resume or another --out"
            )
        if saved != json.loads(json.dumps(config)):
            raise ValueError(
                f"{out} holds a run with a different configuration ({config_path}); resume "
                "with the same settings or use another --out"
            )
    last = _load_model_checkpoint(_cycle_path(out, rows[-1]["cycle"])) if rows else None
    in_cycle = out / "checkpoints" / f"train_cycle_{len(rows):03d}.pt"
    if resume and in_cycle.exists():
        _load_model_checkpoint(in_cycle)  # fit() resumes from it: check it first
    warm_state = _load_model_checkpoint(Path(warm_start)) if warm_start and not rows else None
    data = load_run_data(config)
    run = config["run"]
    torch.manual_seed(run["seed"])  # the initial weights belong to the run's seed
    model = build_model(config, data)
    if last is not None:
        _load_checked(model, last["model"], _cycle_path(out, rows[-1]["cycle"]), config_path)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(config, indent=2), config_path)
    task = Task(config, data)
    n_train = data.train.shape[0]
    if rows and _stop_reason(config, rows):
        return rows

    bar = tqdm(
        total=run["cycles"] + 1,
        initial=len(rows),
        desc=f"{run['dataset']} {run['method']}",
        disable=not progress,
        dynamic_ncols=True,
    )
    cycle = len(rows)
    while True:
        torch.manual_seed(run["seed"] * 7919 + cycle)
        t_start = time.perf_counter()
        if cycle > 0:
            prune_(model, config["prune"]["prune_ratio"], run["method"])
        cfg = train_config(config, n_train, cycle)
        train_ckpt = out / "checkpoints" / f"train_cycle_{cycle:03d}.pt"
        warm = warm_state if cycle == 0 else None
        if warm is not None:
            _load_checked(model, warm["model"], Path(warm_start), config_path)
        # Train and evaluate on compiled kernels (kept values only), or on the
        # dense masked model itself.
        compiled = run["kernels"] == "compiled"
        work, dense_ops = compile_for_training(model) if compiled else (model, [])
        t_prepare = time.perf_counter() - t_start
        if warm is not None:
            history = warm["history"]
        else:
            history = fit(
                work,
                task.loss,
                task.train_tensors,
                cfg,
                checkpoint=train_ckpt,
                resume=resume,
                progress=progress,
                desc=f"cycle {cycle}",
            )
        if compiled:
            write_back(work)
        t_train = time.perf_counter() - t_start - t_prepare
        t0 = time.perf_counter()
        limit = run["eval_samples"]
        metrics = {
            split: task.evaluate(work, split, limit if split == "train" else None)
            for split in ("train", "val", "test")
        }
        t_eval = time.perf_counter() - t0
        speed = {}
        if compiled and run["speedup_steps"] > 0:
            speed = measure_speedup(model, work, task.loss, task.train_tensors, cfg.batch_size,
                                    run["speedup_steps"], seed=cfg.seed)
        s = sparsity(model)
        row: dict[str, Any] = {
            "cycle": cycle,
            "prune_ratio": s["prune_ratio"],
            "kept_fraction": s["kept_fraction"],
            "nonzero_params": s["nonzero_params"],
            # Layers with no kept weight (global magnitude pruning may empty one; the
            # prune step warned when it did): they pass on their bias alone.
            "empty_layers": empty_layers(model),
            "train_nll": metrics["train"]["nll"],
            "val_nll": metrics["val"]["nll"],
            "test_nll": metrics["test"]["nll"],
            "nfe_forward": history[-1]["nfe_forward"],
            "nfe_backward": history[-1]["nfe_backward"],
            "seconds": t_prepare + t_train + t_eval,
            "prepare_seconds": t_prepare,
            "train_seconds": t_train,
            "eval_seconds": t_eval,
            "iters": cfg.iters,
            "kernels": run["kernels"],
            **speed,
        }
        if compiled:
            row["not_compiled"] = dense_ops
        if task.classification:
            for split in ("train", "val", "test"):
                row[f"{split}_accuracy"] = metrics[split]["accuracy"]
        save_atomic(
            {"model": model.state_dict(), "row": row, "history": history, "config": config},
            _cycle_path(out, cycle),
        )
        rows.append(row)
        write_text_atomic(json.dumps(rows, indent=2), out / "results.json")
        train_ckpt.unlink(missing_ok=True)
        bar.update(1)
        bar.set_postfix(ratio=f"{row['prune_ratio']:.2f}", val=f"{row['val_nll']:.3f}")
        if _stop_reason(config, rows):
            break
        cycle += 1
    bar.close()
    from flows.report import write_run_report

    write_run_report(out, plots=plots)
    return rows


def copy_config(config: dict[str, Any], **run: Any) -> dict[str, Any]:
    """A copy of ``config`` with some ``run`` settings replaced."""
    new = copy.deepcopy(config)
    new["run"].update(run)
    validate_config(new)
    return new
