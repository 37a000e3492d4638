"""The typed schema of a run configuration: every setting's type, range and choices.

``SCHEMA`` maps each ``section.key`` of a configuration (a preset from
``flows.presets`` with the pipeline's ``run`` section) to a ``Setting``: its
kind (integer, number, boolean, text, one of some choices, a list of
integers), its range where one matters, and whether ``null`` is allowed.
``check_config`` checks a whole configuration against it and against the
preset it came from (the same keys, and the settings a preset fixes), so that
bad values fail with one line naming the key, the value and what was expected
before any work starts. A key that a preset holds but the schema does not list
is checked against the kind of the preset's own value.

``Setting`` also checks arguments outside configurations: the command line's
flags (``Setting.parse``) and the analyses' parameters (``Setting.check``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from flows.divergence import DIVERGENCES, NOISE_KINDS
from flows.engine import KERNELS
from flows.odefunc import SOLVERS
from flows.odenet import ACTIVATIONS, TIME_MODES
from flows.prune import PRUNE_METHODS
from flows.train import OPTIMIZERS

Kind = Literal["int", "float", "bool", "str", "choice", "int_list"]
TASKS = ("density", "classification")
MODEL_KINDS = ("mlp", "conv")
DTYPE_NAMES = ("float32", "float64")
SEED_MAX = 2**32 - 1


class SettingError(ValueError):
    """A setting or argument has a value of the wrong type or out of its range.

    ``name`` is the setting (``train.lr``) or argument, ``value`` the value
    given, ``expected`` a description of the allowed values.
    """

    def __init__(self, name: str, value: Any, expected: str, flag: str | None = None) -> None:
        self.name, self.value, self.expected, self.flag = name, value, expected, flag
        via = f" (flag {flag})" if flag else ""
        super().__init__(f"{name}={value!r}{via} is invalid: expected {expected}")


@dataclass(frozen=True)
class Setting:
    """The type and range of one setting.

    Args:
        kind: "int" (a whole number, never a float like 10.5 or 10.0), "float"
            (a finite number; integers are numbers too), "bool" (true or false
            only), "str" (text), "choice" (one of ``choices``) or "int_list" (a
            list of integers, each within the range).
        ge, gt, le, lt: bounds (>=, >, <=, <) of the number, or of each entry of
            an int_list.
        choices: the allowed values of a "choice".
        nullable: null (None) is allowed too.
        min_len: the shortest int_list allowed.
        flag: the command-line flag that sets it, named in errors.
        fixed: set by the dataset's preset; it cannot be overridden.
    """

    kind: Kind
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    min_len: int = 0
    flag: str | None = None
    fixed: bool = False

    def _range(self) -> str:
        lo = ("[", self.ge) if self.ge is not None else None
        lo = lo or (("(", self.gt) if self.gt is not None else None)
        hi = ("]", self.le) if self.le is not None else None
        hi = hi or ((")", self.lt) if self.lt is not None else None)
        if lo and hi:
            return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        if lo:
            return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        if hi:
            return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
        return ""

    def expected(self) -> str:
        """What the allowed values are, in words: "an integer >= 1 or null"."""
        if self.kind == "int":
            text = f"an integer{self._range()}"
        elif self.kind == "float":
            text = f"a number{self._range()}"
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a text value (a path or name)"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            size = "a non-empty list" if self.min_len >= 1 else "a list"
            text = f"{size} of integers{self._range()}, like [64, 64]"
        return f"{text}, or null" if self.nullable else text

    def _in_range(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def valid(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.nullable
        if self.kind == "int":
            return _is_int(value) and self._in_range(value)
        if self.kind == "float":
            return _is_number(value) and math.isfinite(value) and self._in_range(value)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        return (
            isinstance(value, list)
            and len(value) >= self.min_len
            and all(_is_int(v) and self._in_range(v) for v in value)
        )

    def check(self, name: str, value: Any) -> None:
        """Raise ``SettingError`` naming ``name`` unless ``value`` is allowed."""
        if not self.valid(value):
            raise SettingError(name, value, self.expected(), self.flag)

    def parse(self, text: str) -> Any:
        """A command-line flag's text as a value of this setting.

        Raises ValueError ("expected an integer >= 1, got '0'") if the text is
        not of the kind or the value is out of range.
        """
        value: Any = text
        try:
            if self.kind == "int":
                value = int(text)
            elif self.kind == "float":
                value = float(text)
        except ValueError:
            value = None
        if value is None or not self.valid(value):
            raise ValueError(f"expected {self.expected()}, got {text!r}")
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pos_float(**kw: Any) -> Setting:
    return Setting("float", gt=0, **kw)


def _unit_open(**kw: Any) -> Setting:
    return Setting("float", gt=0, lt=1, **kw)


SCHEMA: dict[str, Setting] = {
    "task": Setting("choice", choices=TASKS, fixed=True),
    "data.n_train": Setting("int", ge=1),
    "data.n_val": Setting("int", ge=1),
    "data.n_test": Setting("int", ge=1),
    "model.kind": Setting("choice", choices=MODEL_KINDS, fixed=True),
    "model.hidden": Setting("int_list", ge=1, min_len=1),
    "model.time": Setting("choice", choices=TIME_MODES),
    "model.activation": Setting("choice", choices=tuple(ACTIVATIONS)),
    "model.divergence": Setting("choice", choices=DIVERGENCES),
    "model.noise": Setting("choice", choices=NOISE_KINDS),
    "model.solver": Setting("choice", choices=SOLVERS),
    "model.step_size": _pos_float(nullable=True),
    "model.atol": _pos_float(),
    "model.rtol": _pos_float(),
    "model.adjoint": Setting("bool"),
    "model.blocks": Setting("int", ge=1),
    "model.T": _pos_float(),
    "model.train_T": Setting("bool"),
    "model.alpha": Setting("float", ge=0, lt=0.5),
    "train.optimizer": Setting("choice", choices=tuple(OPTIMIZERS)),
    "train.epochs": Setting("int", ge=1),
    "train.batch_size": Setting("int", ge=1),
    "train.lr": _pos_float(),
    "train.lr_milestones": Setting("int_list", ge=1),
    "train.lr_gamma": _pos_float(),
    "train.beta1": Setting("float", ge=0, lt=1),
    "train.beta2": Setting("float", ge=0, lt=1),
    "train.weight_decay": Setting("float", ge=0),
    "prune.prune_ratio": _unit_open(flag="--prune-ratio"),
    "eval.exact": Setting("bool", flag="--exact"),
    "run.dataset": Setting("str", flag="--dataset", fixed=True),
    "run.method": Setting("choice", choices=PRUNE_METHODS, flag="--method"),
    "run.cycles": Setting("int", ge=0, flag="--cycles"),
    "run.target_ratio": _unit_open(nullable=True, flag="--target-ratio"),
    "run.patience": Setting("int", ge=1, nullable=True, flag="--patience"),
    "run.seed": Setting("int", ge=0, le=SEED_MAX, flag="--seed"),
    "run.budget": _pos_float(flag="--budget"),
    "run.iters": Setting("int", ge=1, nullable=True, flag="--iters"),
    "run.data_root": Setting("str", nullable=True, flag="--data-root"),
    "run.dtype": Setting("choice", choices=DTYPE_NAMES, flag="--dtype"),
    "run.eval_samples": Setting("int", ge=1),
    "run.kernels": Setting("choice", choices=KERNELS, flag="--kernels"),
    "run.speedup_steps": Setting("int", ge=0),
}

# Flags that set no configuration value.
THREADS = Setting("int", ge=1)
SAMPLES = Setting("int", ge=1)
CYCLE = Setting("int", ge=0)


def setting_for(name: str, default: Any) -> Setting:
    """The schema's setting ``name``, else one of the kind of its preset value ``default``."""
    if name in SCHEMA:
        return SCHEMA[name]
    if isinstance(default, bool):
        return Setting("bool")
    if _is_int(default):
        return Setting("int")
    if isinstance(default, float):
        return Setting("float")
    if isinstance(default, list):
        return Setting("int_list")
    return Setting("str", nullable=default is None)


def check_config(config: Any, reference: Mapping[str, Any]) -> None:
    """Check every setting of ``config`` against the schema and ``reference``.

    ``reference`` is the configuration the settings override: the dataset's
    preset with the run defaults (``flows.pipeline.build_config`` starts from
    it). ``config`` must have the same sections and keys; fixed settings (the
    task, the model kind, the dataset) must equal the reference's.

    Raises:
        SettingError: a value of the wrong type or out of range (naming the
            key, the value and what is expected).
        ValueError: a missing or unknown key, or a section that is not a mapping.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"a configuration must be a mapping of sections, got {config!r}")
    for key in config:
        if key not in reference:
            raise ValueError(f"unknown setting {key!r}; known here: {sorted(reference)}")
    for section, ref in reference.items():
        if section not in config:
            what = "section" if isinstance(ref, Mapping) else "setting"
            raise ValueError(f"the configuration lacks {what} {section!r}")
        value = config[section]
        if not isinstance(ref, Mapping):
            _check_one(section, value, ref)
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"setting {section!r} is a section; give a mapping, got {value!r}")
        for key in value:
            if key not in ref:
                raise ValueError(f"unknown setting '{section}.{key}'; known here: {sorted(ref)}")
        for key, default in ref.items():
            name = f"{section}.{key}"
            if key not in value:
                raise ValueError(f"the configuration lacks setting {name!r}")
            _check_one(name, value[key], default)


def _check_one(name: str, value: Any, default: Any) -> None:
    spec = setting_for(name, default)
    if spec.fixed and value != default:
        how = f"; use {spec.flag} to choose it" if spec.flag else ""
        raise SettingError(name, value, f"{default!r}, fixed by the dataset's preset{how}")
    spec.check(name, value)
