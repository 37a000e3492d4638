"""What ran the benchmark: CPU, GPU, library versions, threads, and a short machine name."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions among the CPU's flags that matter to the kernels."""
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "neon", "asimd")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to place a figure: hardware, versions, threads.

    Returns:
        A JSON-ready dict: cpu_model, cpu_flags, cpu_count, threads, interop_threads,
        platform, python, torch, torchdiffeq, triton (or None), cuda (or None),
        gpu (name or None), gpu_capability, sparsekern, git_commit, device.
    """
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchdiffeq": _version("torchdiffeq"),
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "gpu_capability": None,
        "sparsekern": _version("sparseflows"),
        "git_commit": _git_commit(),
        "device": str(device),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
        info["gpu_capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(index))
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """A short file-system name for the machine, e.g. "cpu-amd-epyc-2c" or "cuda-nvidia-h100".

    Results are kept under ``bench/results/<slug>/`` so that figures from
    different machines never overwrite each other.
    """
    def clean(name: str) -> str:
        name = re.sub(r"\(r\)|\(tm\)|\bcpu\b\s*@.*$|\bprocessor\b", "", name.lower())
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")

    if info.get("gpu"):
        slug = "cuda-" + clean(info["gpu"])
    else:
        slug = f"cpu-{clean(info['cpu_model'])}-{info['threads']}t"
    return slug or "machine"
