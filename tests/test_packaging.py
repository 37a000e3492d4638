"""The kernels build from an installed wheel, not only from an editable checkout.

setup.py ships csrc/ as ``sparsekern/_csrc``; ``sparsekern.backends.build.source_root``
finds it there first, and the build cache is keyed by the sources' contents and
their paths relative to that root, so an installed copy loads the build the
checkout made (no second compile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import sparsekern
from sparsekern.backends import build, cpu
ext = cpu.extension()
print(json.dumps({"package": sparsekern.__file__, "root": str(build.source_root()),
                  "build_root": str(cpu.build().root), "extension": ext.__file__,
                  "has_mlp_fwd": hasattr(ext, "mlp_fwd")}))
"""


def _copy_tree(dest: Path) -> None:
    """What a wheel is built from: the files git tracks or would track, as they are now.

    Building in a copy keeps setuptools' build/ folder out of the shared checkout.
    """
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.slow
def test_installed_wheel_finds_its_sources_and_loads_the_cpu_extension(tmp_path):
    from sparsekern.backends import cpu

    if not cpu.available():
        pytest.skip("the CPU extension cannot be built here (no C++ compiler or ninja)")
    checkout_ext = cpu.extension()  # built (or loaded) from the checkout's csrc/
    src, dist, target = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    _copy_tree(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                           "."], cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("sparseflows-*.whl")
    proc = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (target / "sparsekern" / "_csrc" / "common" / "mlp_program.h").is_file()

    away = tmp_path / "elsewhere"  # neither the checkout nor the install: no csrc/ nearby
    away.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=away, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target), found
    assert Path(found["root"]) == target / "sparsekern" / "_csrc", found
    assert Path(found["build_root"]).is_relative_to(target), found
    assert found["has_mlp_fwd"]
    # Same sources, same key: the installed copy loads the checkout's cached build.
    assert found["extension"] == checkout_ext.__file__, found
    assert "building the CPU kernels" not in proc.stderr
