"""Compare two results.json files and flag regressions beyond the measured noise.

Rows pair up by (case, provider, metric, batch, dtype, device, threads, masks). A pair
is a **regression** when the new run is slower beyond both runs' spread and a
relative margin:

    new.median > old.p90 * (1 + margin)   and   old.median < new.p10

i.e. each median lies outside the other run's p10-p90 spread, the new one by
the margin beyond the old run's slow tail. An **improvement** is the mirror
image (new.median < old.p10 / (1 + margin) and old.median > new.p90).
Anything else is noise. A measurement with a single sample has p10 = p90 = median, so only the
margin protects it; keep the margin above the run-to-run noise of the machine.

A solve whose NFE changed by more than 2% is flagged as well (the engine must
not change the solver's work), and so is a row that errored in the new run
but not in the old one. If the roofline (torch.mm) rows moved beyond noise,
the machine itself changed speed, and a note says so.

``python -m bench.compare OLD.json NEW.json [--margin 0.05] [--out compare.md]``
exits 1 when there is a regression.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import NFE_TOLERANCE, _fmt_ms, _table, atomic_write_text, load_results

Row = dict[str, Any]
KEY_FIELDS = ("case", "provider", "metric", "batch", "dtype", "device", "threads", "masks")
DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class Change:
    """One paired measurement that moved, or that is new / gone / broken.

    Attributes:
        kind: "regression", "improvement", "nfe_changed", "new_error", "missing", "new".
        key: the pairing key (``KEY_FIELDS``).
        old, new: the rows (None for missing / new).
        ratio: new median / old median (None if either lacks one).
    """

    kind: str
    key: tuple
    old: Row | None
    new: Row | None
    ratio: float | None

    @property
    def label(self) -> str:
        case, provider, metric = self.key[:3]
        return f"{case} {provider} {metric}"


def _key(row: Row) -> tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def _timed(row: Row | None) -> bool:
    return bool(row) and not row.get("error") and bool(row.get("median_ms"))


def classify(old: Row, new: Row, margin: float = DEFAULT_MARGIN) -> str | None:
    """"regression", "improvement" or None (noise) for one pair of timed rows."""
    o_med, o_lo, o_hi = old["median_ms"], old["p10_ms"], old["p90_ms"]
    n_med, n_lo, n_hi = new["median_ms"], new["p10_ms"], new["p90_ms"]
    if n_med > o_hi * (1 + margin) and o_med < n_lo:
        return "regression"
    if n_med < o_lo / (1 + margin) and o_med > n_hi:
        return "improvement"
    return None


def compare_rows(old_rows: list[Row], new_rows: list[Row],
                 margin: float = DEFAULT_MARGIN) -> list[Change]:
    """Every change between two runs (see the module docstring), regressions first."""
    old = {_key(r): r for r in old_rows}
    new = {_key(r): r for r in new_rows}
    changes: list[Change] = []
    for key, n in new.items():
        o = old.get(key)
        if o is None:
            changes.append(Change("new", key, None, n, None))
            continue
        ratio = n["median_ms"] / o["median_ms"] if _timed(o) and _timed(n) else None
        if n.get("error") and not o.get("error"):
            changes.append(Change("new_error", key, o, n, None))
            continue
        if ratio is not None:
            kind = classify(o, n, margin)
            if kind:
                changes.append(Change(kind, key, o, n, ratio))
        if n.get("metric") in ("solve", "train_solve") and any(
                o.get(f) and n.get(f) is not None
                and abs(n[f] - o[f]) > NFE_TOLERANCE * o[f] for f in ("nfe", "nfe_backward")):
            changes.append(Change("nfe_changed", key, o, n, ratio))
    changes += [Change("missing", k, o, None, None) for k, o in old.items() if k not in new]
    order = {"regression": 0, "new_error": 1, "nfe_changed": 2, "improvement": 3,
             "missing": 4, "new": 5}
    return sorted(changes, key=lambda c: (order[c.kind], c.label))


def machine_note(changes: list[Change], old_meta: dict[str, Any],
                 new_meta: dict[str, Any]) -> list[str]:
    """Warnings that the two runs are not like for like (other machine, GEMM rate moved)."""
    notes = []
    om, nm = old_meta.get("machine", {}), new_meta.get("machine", {})
    for k in ("cpu_model", "gpu", "torch", "threads"):
        if om.get(k) != nm.get(k) and (om or nm):
            notes.append(f"{k} differs: {om.get(k)!r} -> {nm.get(k)!r}")
    roof = [c for c in changes if c.key[2] == "roofline" and c.kind in ("regression",
                                                                        "improvement")]
    if roof:
        notes.append(f"the dense GEMM rate (roofline) moved beyond noise in {len(roof)} case(s): "
                     "the machine itself ran at another speed (load, clocks); read the other "
                     "changes with that in mind")
    return notes


def render(changes: list[Change], notes: list[str], margin: float) -> str:
    """Markdown summary of a comparison."""
    lines = ["# Benchmark comparison", "",
             f"Regression: new median > old p90 x (1 + {margin:g}) and old median < new p10.", ""]
    lines += [f"> Note: {n}" for n in notes]
    shown = [c for c in changes if c.kind not in ("missing", "new")]
    if shown:
        body = []
        for c in shown:
            o, n = c.old or {}, c.new or {}
            body.append([c.kind, c.label,
                         f"{_fmt_ms(o.get('median_ms'))} ({_fmt_ms(o.get('p10_ms'))}-"
                         f"{_fmt_ms(o.get('p90_ms'))})",
                         f"{_fmt_ms(n.get('median_ms'))} ({_fmt_ms(n.get('p10_ms'))}-"
                         f"{_fmt_ms(n.get('p90_ms'))})",
                         "-" if c.ratio is None else f"{c.ratio:.2f}",
                         f"{o.get('nfe')} -> {n.get('nfe')}" if c.kind == "nfe_changed"
                         else (n.get("error") or "")])
        lines += ["", _table(["change", "measurement", "old ms (p10-p90)", "new ms (p10-p90)",
                              "new/old", "detail"], body, "lllrrl")]
    else:
        lines.append("No change beyond noise.")
    missing = [c.label for c in changes if c.kind == "missing"]
    new = [c.label for c in changes if c.kind == "new"]
    if missing:
        lines += ["", f"Only in the old run ({len(missing)}): " + ", ".join(missing[:20])
                  + (" ..." if len(missing) > 20 else "")]
    if new:
        lines += ["", f"Only in the new run ({len(new)}): " + ", ".join(new[:20])
                  + (" ..." if len(new) > 20 else "")]
    return "\n".join(lines) + "\n"


def compare_loaded(old: tuple[dict[str, Any], list[Row]], new: tuple[dict[str, Any], list[Row]],
                   margin: float = DEFAULT_MARGIN,
                   out: Path | None = None) -> tuple[list[Change], str]:
    """Compare two loaded runs, each ``(meta, rows)``; write the markdown to ``out`` if given.

    Returns:
        (changes, markdown).
    """
    (old_meta, old_rows), (new_meta, new_rows) = old, new
    changes = compare_rows(old_rows, new_rows, margin)
    text = render(changes, machine_note(changes, old_meta, new_meta), margin)
    if out is not None:
        atomic_write_text(out, text)
    return changes, text


def compare_files(old_path: Path, new_path: Path, margin: float = DEFAULT_MARGIN,
                  out: Path | None = None) -> tuple[list[Change], str]:
    """Compare two results.json; write the markdown to ``out`` if given.

    Returns:
        (changes, markdown).
    """
    return compare_loaded(load_results(old_path), load_results(new_path), margin, out)


def summary_line(changes: list[Change]) -> str:
    """e.g. "1 regression, 0 new errors, 0 NFE changes, 3 improvements"."""
    names = {"regression": "regression", "new_error": "new error", "nfe_changed": "NFE change",
             "improvement": "improvement"}
    parts = []
    for kind, name in names.items():
        n = sum(c.kind == kind for c in changes)
        parts.append(f"{n} {name}{'' if n == 1 else 's'}")
    return ", ".join(parts)


def has_regressions(changes: list[Change]) -> bool:
    return any(c.kind in ("regression", "new_error", "nfe_changed") for c in changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare",
                                     description="flag regressions between two results.json")
    parser.add_argument("old", help="baseline results.json")
    parser.add_argument("new", help="results.json to check")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help=f"relative margin beyond the spread (default {DEFAULT_MARGIN})")
    parser.add_argument("--out", default=None, help="write the markdown summary here")
    args = parser.parse_args(argv)
    changes, text = compare_files(Path(args.old), Path(args.new), args.margin,
                                  Path(args.out) if args.out else None)
    print(text, end="")
    print(summary_line(changes))
    return 1 if has_regressions(changes) else 0


if __name__ == "__main__":
    sys.exit(main())
