"""Install the Sparse Flows packages: flows (the method), sparsekern (the engine), bench.

Metadata lives here rather than in pyproject.toml's [project] table, next to
what the engine needs to build its kernels. The C++ (csrc/cpu) and CUDA
(csrc/cuda) extensions are not ext_modules: building them at install time would
make pip pull torch into an isolated build environment (a CUDA build of several
GB on a CPU machine). They are compiled with ninja on first use against the
torch that is installed, and cached (sparsekern/backends/cpu.py); ``make
install`` triggers that build once, so tests and the demo start without it.
"""

from setuptools import find_packages, setup

RUNTIME = [
    "torch>=2.4",
    "torchdiffeq>=0.2.3",
    "numpy",
    "tqdm",
    "matplotlib",
    "scikit-learn",
    "pyyaml",
    "ninja",  # builds the C++ CPU kernels of sparsekern on first use
]
TABULAR = ["pandas", "h5py"]
TRITON = ["triton"]
DEV = ["pytest", "pytest-benchmark", "hypothesis", "ruff", *TRITON, *TABULAR]

setup(
    name="sparseflows",
    version="0.1.0",
    description="Sparse Flows: prune continuous normalizing flows and neural ODEs, "
    "and run the pruned models on sparse kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["flows", "flows.*", "sparsekern", "sparsekern.*", "bench", "bench.*"]
    ),
    install_requires=RUNTIME,
    extras_require={"triton": TRITON, "tabular": TABULAR, "dev": DEV},
    entry_points={"console_scripts": ["sparseflow = flows.cli:main"]},
)
