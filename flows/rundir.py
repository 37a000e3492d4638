"""A run directory: the files one pipeline run writes, and reading them back checked.

::

    DIR/config.json               the resolved configuration (``RunConfig.to_dict()``)
    DIR/results.json              one row per finished cycle (rewritten atomically)
    DIR/results.md                the rows as a markdown table (``flows.run_report``)
    DIR/checkpoints/cycle_KKK.pt  model (with masks) after cycle K
    DIR/checkpoints/train_cycle_KKK.pt  in-cycle training state, removed when the cycle ends
    DIR/plots/*.png               NLL against prune ratio, densities per cycle

This module is the layer that both ``flows.pipeline`` (which writes runs) and
``flows.report`` (which reports over several) use; it imports neither. Every
write goes through ``flows.checkpoint`` (atomic: a temporary file, fsync,
rename), and every read raises a ``PathError`` / ``CheckpointError`` naming the
file when it is damaged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from flows.checkpoint import (
    CheckpointError,
    PathError,
    check_finite_state,
    load_checkpoint,
    read_json,
    write_text_atomic,
)
from flows.prune import ensure_masks
from flows.run_config import RunConfig, validate_config

# ---------------------------------------------------------------- paths

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


def config_path(run_dir: str | Path) -> Path:
    """DIR/config.json."""
    return Path(run_dir) / "config.json"


def results_path(run_dir: str | Path) -> Path:
    """DIR/results.json."""
    return Path(run_dir) / "results.json"


def cycle_checkpoint(run_dir: str | Path, cycle: int) -> Path:
    """DIR/checkpoints/cycle_KKK.pt: the model (with masks) after ``cycle``."""
    return Path(run_dir) / "checkpoints" / f"cycle_{cycle:03d}.pt"


def train_checkpoint(run_dir: str | Path, cycle: int) -> Path:
    """DIR/checkpoints/train_cycle_KKK.pt: the training state inside ``cycle``."""
    return Path(run_dir) / "checkpoints" / f"train_cycle_{cycle:03d}.pt"


# ---------------------------------------------------------------- config.json, results.json


def write_run_config(run_dir: str | Path, config: RunConfig) -> Path:
    """Write DIR/config.json (``config.to_dict()``, indented) atomically; returns its path."""
    return write_text_atomic(json.dumps(config.to_dict(), indent=2), config_path(run_dir))


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The checked configuration of run directory ``run_dir`` (DIR/config.json).

    Returns the nested dict (``RunConfig.from_dict`` types it). Raises
    FileNotFoundError if there is none, PathError naming the file if it is
    damaged or any setting is invalid (see ``validate_config``).
    """
    path = config_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"no run in {run_dir}: {path} not found")
    config = read_json(path, "run configuration")
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict):
        model.setdefault("step_size", None)  # runs written before model.step_size existed
    try:
        validate_config(config)
    except ValueError as e:
        raise PathError(path, f"run configuration {path} is invalid: {e}") from None
    return config


def check_same_run(run_dir: str | Path, config: RunConfig, finished: int, resume: bool) -> None:
    """Refuse to write a run with ``config`` into ``run_dir`` over an earlier one.

    Args:
        run_dir: the run directory.
        config: the configuration of the run about to start.
        finished: how many finished cycles results.json holds.
        resume: whether the run continues the one in ``run_dir``.

    Raises:
        FileExistsError: ``run_dir`` holds a run with results and ``resume`` is off.
        ValueError: it holds a run with another configuration (``resume`` on).
        PathError: its config.json is damaged.
    """
    path = config_path(run_dir)
    if not (path.exists() and (finished or resume)):
        return
    saved = read_json(path, "run configuration")
    if not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run ({finished} cycles); use --resume or another --out"
        )
    if saved != json.loads(json.dumps(config.to_dict())):
        raise ValueError(
            f"{run_dir} holds a run with a different configuration ({path}); resume "
            "with the same settings or use another --out"
        )


def write_results(run_dir: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write DIR/results.json (the rows, indented) atomically; returns its path."""
    return write_text_atomic(json.dumps(list(rows), indent=2), results_path(run_dir))


def read_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of DIR/results.json, or [] if there is none yet.

    Raises PathError naming the file if it is damaged: not JSON, not a list of
    rows numbered 0, 1, ..., or a row without the fields of ``RESULT_FIELDS``.
    """
    path = results_path(run_dir)
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


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, rows) of a finished or running run, both checked.

    Raises FileNotFoundError if ``run_dir`` has no results.json (or no
    config.json), PathError if either is damaged.
    """
    res_path = results_path(run_dir)
    if not res_path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (needs config.json and results.json): "
            f"{res_path} not found"
        )
    return read_run_config(run_dir), read_results(run_dir)


# ---------------------------------------------------------------- checkpoints


def load_model_checkpoint(path: str | Path) -> dict[str, Any]:
    """A cycle checkpoint with a finite model state.

    Returns the checkpoint dict ("model", and "row", "history", "config" for a
    cycle checkpoint). Raises FileNotFoundError if there is none, and a
    CheckpointError naming ``path`` if it is damaged, holds no model state or
    has non-finite weights.
    """
    path = Path(path)
    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(path, f"checkpoint {path} holds no model state ('model')")
    check_finite_state(state["model"], path)
    return state


def load_model_state(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load a checkpoint's model state, giving ``model`` mask buffers first if it has some."""
    if any(k.endswith("weight_mask") for k in state_dict):
        ensure_masks(model)
    model.load_state_dict(state_dict)


def load_state_checked(
    model: nn.Module, state_dict: dict[str, Any], path: str | Path, source: str | Path
) -> None:
    """``load_model_state``, with a CheckpointError if the state does not fit ``model``.

    Args:
        model: the model built from the configuration in ``source``.
        state_dict: the model state of the checkpoint at ``path``.
        path: the checkpoint, named in the error.
        source: the file describing the model (a run's config.json), named too.
    """
    try:
        load_model_state(model, state_dict)
    except (RuntimeError, KeyError, ValueError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise CheckpointError(
            path,
            f"checkpoint {path} does not fit the model that {source} describes ({first})",
        ) from None
