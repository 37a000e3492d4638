"""The run configuration: ``RunConfig``, the typed, frozen form of a run's config.json.

One frozen section per part (``task``, ``data``, ``model``, ``train``, ``prune``,
``eval``, ``run``), with ``Literal`` options; ``RunConfig.from_dict`` builds it
from a nested dict that ``validate_config`` accepts (``flows.settings`` checks
every value), and ``to_dict`` gives exactly that dict back, as config.json holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flows.odefunc import FIXED_STEP_SOLVERS
from flows.presets import PRESETS, get_preset
from flows.settings import SettingError, check_config

# ---------------------------------------------------------------- the run configuration

# The choices of ``flows.settings.SCHEMA``, as types (tests check they agree).
TaskName = Literal["density", "classification"]
ModelKind = Literal["mlp", "conv"]
TimeMode = Literal["none", "concat", "concatsquash"]
Activation = Literal["tanh", "sigmoid", "softplus", "relu", "elu", "swish"]
Divergence = Literal["hutchinson", "exact"]
NoiseKind = Literal["gaussian", "rademacher"]
Solver = Literal[
    "dopri5",
    "dopri8",
    "bosh3",
    "fehlberg2",
    "adaptive_heun",
    "euler",
    "midpoint",
    "rk4",
    "explicit_adams",
    "implicit_adams",
]
Optimizer = Literal["adam", "adamw"]
PruneMethod = Literal["unstructured", "structured"]
DtypeName = Literal["float32", "float64"]
Kernels = Literal["compiled", "dense"]

# A setting only some presets hold: None when absent, and then left out of ``to_dict``
# (these settings are never null where they are present).
_ABSENT = "absent_if_none"
_OPTIONAL = {_ABSENT: True}


class _Section:
    """A section of a run configuration: built from, and written back as, a flat mapping."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Any:
        """The section holding ``values`` (lists become tuples, so the section stays frozen)."""
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The section as config.json holds it: tuples as lists, absent settings left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get(_ABSENT):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, kw_only=True)
class DataSettings(_Section):
    """Split sizes of generated datasets (2D toys); absent for datasets that come in splits."""

    n_train: int | None = field(default=None, metadata=_OPTIONAL)
    n_val: int | None = field(default=None, metadata=_OPTIONAL)
    n_test: int | None = field(default=None, metadata=_OPTIONAL)


@dataclass(frozen=True, kw_only=True)
class ModelSettings(_Section):
    """The vector field and its solver (``time`` for MLP fields, ``alpha`` for image flows)."""

    kind: ModelKind
    hidden: tuple[int, ...]
    time: TimeMode | None = field(default=None, metadata=_OPTIONAL)
    activation: Activation
    divergence: Divergence
    noise: NoiseKind
    solver: Solver
    step_size: float | None = None  # the step of a fixed-step solver (required there)
    atol: float
    rtol: float
    adjoint: bool
    blocks: int
    T: float
    train_T: bool
    alpha: float | None = field(default=None, metadata=_OPTIONAL)


@dataclass(frozen=True, kw_only=True)
class TrainSettings(_Section):
    """Optimisation of one cycle; lengths in epochs, as in the paper."""

    optimizer: Optimizer
    epochs: int
    batch_size: int
    lr: float
    lr_milestones: tuple[int, ...]
    lr_gamma: float
    beta1: float
    beta2: float
    weight_decay: float


@dataclass(frozen=True, kw_only=True)
class PruneSettings(_Section):
    """``prune_ratio``: what each cycle removes (see ``flows.pipeline``)."""

    prune_ratio: float


@dataclass(frozen=True, kw_only=True)
class EvalSettings(_Section):
    """``exact``: evaluate with the exact trace rather than Hutchinson's estimator."""

    exact: bool


@dataclass(frozen=True, kw_only=True)
class RunSettings(_Section):
    """The pipeline's own settings; the defaults are ``RUN_DEFAULTS``."""

    dataset: str = "gaussians"
    method: PruneMethod = "unstructured"
    cycles: int = 8
    target_ratio: float | None = None
    patience: int | None = None
    seed: int = 0
    budget: float = 1.0
    iters: int | None = None
    data_root: str | None = None
    dtype: DtypeName = "float32"
    eval_samples: int = 2048
    kernels: Kernels = "compiled"
    speedup_steps: int = 3


RUN_DEFAULTS: dict[str, Any] = RunSettings().to_dict()
_SECTIONS: dict[str, type[_Section]] = {
    "data": DataSettings,
    "model": ModelSettings,
    "train": TrainSettings,
    "prune": PruneSettings,
    "eval": EvalSettings,
    "run": RunSettings,
}


def reference_config(dataset: str) -> dict[str, Any]:
    """The configuration a run of ``dataset`` starts from: its preset with the run defaults."""
    config = get_preset(dataset)
    config["run"] = dict(RUN_DEFAULTS, dataset=dataset)
    return config


def validate_config(config: Any) -> None:
    """Check every setting's type and range (``flows.settings``) before any work starts.

    ``config`` is a nested dict like config.json. Raises ValueError
    (``flows.settings.SettingError`` for a bad value) naming the setting, the
    value and what is expected.
    """
    run = config.get("run") if isinstance(config, dict) else None
    dataset = run.get("dataset") if isinstance(run, dict) else None
    if dataset not in PRESETS:
        raise ValueError(
            f"run.dataset={dataset!r} is invalid: expected one of {', '.join(sorted(PRESETS))}"
        )
    check_config(config, reference_config(dataset))
    model = config["model"]
    if model["solver"] in FIXED_STEP_SOLVERS and model["step_size"] is None:
        raise SettingError(
            "model.step_size", None,
            f"a step size > 0 for the fixed-step solver {model['solver']!r} "
            "(e.g. --set model.step_size=0.05)",
        )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The typed configuration of one run: what config.json holds, frozen.

    Build one with ``RunConfig.from_dict`` (or ``as_run_config``); ``to_dict``
    gives back the nested dict it came from, the one written to config.json.
    Every instance is checked (``validate_config``), also one made by
    ``dataclasses.replace``: a RunConfig with an invalid setting cannot exist.
    """

    task: TaskName
    data: DataSettings
    model: ModelSettings
    train: TrainSettings
    prune: PruneSettings
    eval: EvalSettings
    run: RunSettings

    def __post_init__(self) -> None:
        validate_config(self.to_dict())

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RunConfig:
        """The typed form of a nested configuration dict, checked first.

        Args:
            config: sections ``task``, ``data``, ``model``, ``train``, ``prune``,
                ``eval``, ``run``, as ``flows.pipeline.build_config`` returns them
                or config.json holds them.

        Raises:
            ValueError: from ``validate_config``: a ``SettingError`` naming the
                setting, the value and what is expected ("train.lr='abc' is
                invalid: expected a number > 0"), or a missing / unknown key.
        """
        validate_config(config)
        sections = {name: kind.from_mapping(config[name]) for name, kind in _SECTIONS.items()}
        return cls(task=config["task"], **sections)

    def to_dict(self) -> dict[str, Any]:
        """The nested dict, as config.json holds it (``from_dict(d).to_dict() == d``)."""
        return {"task": self.task, **{name: getattr(self, name).to_dict() for name in _SECTIONS}}


def as_run_config(config: RunConfig | Mapping[str, Any]) -> RunConfig:
    """``config`` itself if it is a ``RunConfig``, else ``RunConfig.from_dict(config)``."""
    return config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
