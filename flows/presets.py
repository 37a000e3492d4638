"""The paper's hyperparameters (Tables S1-S3) as run configurations.

A preset is a nested dict with sections ``data``, ``model``, ``train`` and
``prune``; ``resolve_config`` merges user overrides into it. Training length
is in epochs, as in the paper; ``budget`` scales it for a quick look.

Notes on reading the tables:
- Table S1's "Layers" counts linear layers, as the paper's code names its
  models (``ffjord_l4_h64_sigmoid`` is 2-64-64-64-2), so gaussians is 2-128-2
  and the moons classifier's vector field is 2-128-2 (``ODEClassifier``'s default).
- Tables S2/S3 point to FFJORD (Grathwohl et al. 2019, App. B.1 and C) for the
  architectures and solvers: concatsquash MLPs with FFJORD's widths and block
  counts (bench/cases.py lists them), dopri5 with atol 1e-8, rtol 1e-6, a trained end time
  starting at T = 0.5 (FFJORD's train_tabular defaults).
- Images (Table S3 -> FFJORD App. B.1, "multi-scale"): FFJORD's multiscale
  flow (``flows.multiscale``) as its ``train_cnf.py --multiscale True --dims
  64,64,64 --strides 1,1,1,1 --num_blocks 2 --layer_type concat --rademacher
  True`` builds it: 2 CNF blocks per stack, concat 3x3 convolutions with 64
  channels, softplus, Rademacher Hutchinson noise, dopri5 at 1e-5, a trained
  end time from T = 1, a logit transform with alpha 1e-6 (FFJORD's default,
  also for CIFAR-10, whose command sets no other).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

TOY_DATA = {"n_train": 10240, "n_val": 2048, "n_test": 2048}


def _toy(
    hidden,
    activation,
    lr,
    weight_decay,
    optimizer="adamw",
    epochs=100,
    batch=1024,
    tol=1e-5,
    pr=0.1,
    task="density",
):
    return {
        "task": task,
        "data": dict(TOY_DATA),
        "model": {
            "kind": "mlp",
            "hidden": list(hidden),
            "time": "none",
            "activation": activation,
            "divergence": "hutchinson",
            "noise": "gaussian",
            "solver": "dopri5",
            "step_size": None,  # fixed-step solvers only (rk4, euler, ...)
            "atol": tol,
            "rtol": tol,
            "adjoint": True,
            "blocks": 1,
            "T": 1.0,
            "train_T": False,
        },
        "train": {
            "optimizer": optimizer,
            "epochs": epochs,
            "batch_size": batch,
            "lr": lr,
            "lr_milestones": [],
            "lr_gamma": 0.1,
            "beta1": 0.9,
            "beta2": 0.999,
            "weight_decay": weight_decay,
        },
        "prune": {"prune_ratio": pr},
        "eval": {"exact": True},
    }


def _tabular(hidden, activation, blocks, epochs, batch, milestones, pr):
    return {
        "task": "density",
        "data": {},
        "model": {
            "kind": "mlp",
            "hidden": list(hidden),
            "time": "concatsquash",
            "activation": activation,
            "divergence": "hutchinson",
            "noise": "gaussian",
            "solver": "dopri5",
            "step_size": None,  # fixed-step solvers only (rk4, euler, ...)
            "atol": 1e-8,
            "rtol": 1e-6,
            "adjoint": True,
            "blocks": blocks,
            "T": 0.5,  # FFJORD's train_tabular: --time_length 0.5, --train_T True
            "train_T": True,
        },
        "train": {
            "optimizer": "adam",
            "epochs": epochs,
            "batch_size": batch,
            "lr": 1e-3,
            "lr_milestones": list(milestones),
            "lr_gamma": 0.1,
            "beta1": 0.9,
            "beta2": 0.999,
            "weight_decay": 1e-6,
        },
        "prune": {"prune_ratio": pr},
        "eval": {"exact": True},
    }


def _image(hidden=(64, 64, 64), epochs=50, milestones=(45,)):
    # Table S3 (MNIST and CIFAR-10 alike): Adam, batch 200, LR 1e-3 stepped by 0.1
    # at epoch 45, betas 0.9 / 0.999, no weight decay, PR 22%. The table gives no
    # epoch count; the step at 45 places it in a cycle of 50 epochs.
    return {
        "task": "density",
        "data": {},
        "model": {
            "kind": "conv",
            "hidden": list(hidden),
            "activation": "softplus",
            "divergence": "hutchinson",
            "noise": "rademacher",
            "solver": "dopri5",
            "step_size": None,  # fixed-step solvers only (rk4, euler, ...)
            "atol": 1e-5,
            "rtol": 1e-5,
            "adjoint": True,
            "blocks": 2,  # CNF blocks per stack (FFJORD's --num_blocks)
            "T": 1.0,
            "train_T": True,
            "alpha": 1e-6,
        },
        "train": {
            "optimizer": "adam",
            "epochs": epochs,
            "batch_size": 200,
            "lr": 1e-3,
            "lr_milestones": list(milestones),
            "lr_gamma": 0.1,
            "beta1": 0.9,
            "beta2": 0.999,
            "weight_decay": 0.0,
        },
        "prune": {"prune_ratio": 0.22},
        "eval": {"exact": False},
    }


PRESETS: dict[str, dict[str, Any]] = {
    # Table S1 (toy), widths per the paper's code; moons is a classifier.
    "gaussians": _toy((128,), "sigmoid", lr=5e-3, weight_decay=1e-5),
    "gaussianspiral": _toy((64, 64, 64), "sigmoid", lr=5e-2, weight_decay=1e-2),
    "spiral": _toy((64, 64, 64), "sigmoid", lr=5e-2, weight_decay=1e-6),
    "moons": _toy(
        (128,),
        "tanh",
        lr=1e-2,
        weight_decay=1e-4,
        optimizer="adam",
        epochs=50,
        batch=128,
        tol=1e-4,
        task="classification",
    ),
    # Table S2 (tabular); architectures from FFJORD's Table 4.
    "power": _tabular((60, 60, 60), "tanh", 5, 100, 10000, (90, 97), 0.25),
    "gas": _tabular((160, 160, 160), "tanh", 5, 30, 1000, (25, 28), 0.25),
    "hepmass": _tabular((210, 210), "softplus", 10, 400, 10000, (250, 295), 0.22),
    "miniboone": _tabular((860, 860), "softplus", 1, 400, 1000, (300, 350), 0.22),
    "bsds300": _tabular((1260, 1260, 1260), "softplus", 2, 100, 10000, (96, 99), 0.25),
    # Table S3 (images), FFJORD's multiscale architecture.
    "mnist": _image(),
    "cifar10": _image(),
    # Not in the paper: scikit-learn's 8x8 digits (no download), the same multiscale
    # architecture and training settings with narrower fields and shorter cycles, so
    # that a whole run fits a CPU (about 3 s per training step on two cores).
    "digits": _image(hidden=(32, 32), epochs=20, milestones=(18,)),
}

# The other 2D generators train with the gaussians settings.
for _name in ("8gaussians", "checkerboard", "circles", "pinwheel"):
    PRESETS[_name] = copy.deepcopy(PRESETS["gaussians"])


def get_preset(dataset: str) -> dict[str, Any]:
    """A deep copy of the preset for ``dataset``."""
    if dataset not in PRESETS:
        raise ValueError(f"no preset for dataset {dataset!r}; expected one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[dataset])


def merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base``; unknown keys are errors."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in out:
            raise ValueError(f"unknown setting {where!r}; known here: {sorted(out)}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"setting {where!r} is a section; give a mapping, got {value!r}")
            out[key] = merge(out[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_assignment(text: str) -> dict[str, Any]:
    """``"train.lr=1e-3"`` -> ``{"train": {"lr": 0.001}}``; values parse as JSON, else strings."""
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE like train.lr=1e-3, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


class _Yaml12Loader:
    """Built on first use: PyYAML's safe loader, reading floats as YAML 1.2 does.

    PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string; YAML 1.2 and
    JSON read it as a number, and so does a config file here.
    """

    loader: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.loader is None:
            import re

            import yaml

            class Loader(yaml.SafeLoader):
                pass

            Loader.add_implicit_resolver(
                "tag:yaml.org,2002:float",
                re.compile(
                    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""",
                    re.X,
                ),
                list("-+0123456789."),
            )
            cls.loader = Loader
        return cls.loader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Overrides from a .json, .yaml or .yml file (a nested mapping).

    YAML numbers follow YAML 1.2 (``1e-3`` is a number, as in JSON).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is a directory, unreadable, not valid JSON / YAML,
            has another suffix, or does not hold a mapping; the message names the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; expected a .json, .yaml or .yml file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} cannot be read: {e}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_Yaml12Loader.get())  # a SafeLoader subclass
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {path} is not valid YAML{at}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} must hold a mapping of sections (like train: {{lr: 1e-3}}), "
            f"got {type(data).__name__}"
        )
    return data
