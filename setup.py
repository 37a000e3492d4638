"""Install the Sparse Flows packages: flows (the method), sparsekern (the engine), bench.

Metadata lives here rather than in pyproject.toml's [project] table, next to
what the engine needs to build its kernels. The C++ (csrc/cpu) and CUDA
(csrc/cuda) extensions are not ext_modules: building them at install time would
make pip pull torch into an isolated build environment (a CUDA build of several
GB on a CPU machine). They are compiled with ninja on first use against the
torch that is installed, and cached (sparsekern/backends/build.py); ``make
install`` triggers that build once, so tests and the demo start without it.

So that an installed wheel can build them too, the sources ship as package data:
the top-level csrc/ becomes ``sparsekern/_csrc`` (``package_dir``), where
``sparsekern.backends.build.source_root`` looks first; an editable install has
no such folder and uses the checkout's csrc/.
"""

from setuptools import find_packages, setup

# csrc/ is installed as sparsekern/_csrc: its C++ and CUDA sources and headers.
CSRC_PACKAGE = "sparsekern._csrc"
CSRC_FILES = ["*/*.h", "*/*.cpp", "*/*.cu"]

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
# The bench's torchode peer (bench/providers.py). torchtyping 0.1.4 does not import on
# torch 2.13; 0.1.5 does. `make install` installs these with --no-deps, so the torch
# installed stays the one there.
BENCH = ["torchode==1.0.1", "torchtyping==0.1.5", "typeguard>=2.11.1,<3"]
TABULAR = ["pandas", "h5py"]
TRITON = ["triton"]
# mypy pinned: a newer release may report new errors on unchanged code (tests/test_lint.py).
DEV = ["pytest", "pytest-benchmark", "hypothesis", "ruff", "mypy==1.20.2", *TRITON, *TABULAR]

setup(
    name="sparseflows",
    version="0.1.0",
    description="Sparse Flows: prune continuous normalizing flows and neural ODEs, "
    "and run the pruned models on sparse kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        *find_packages(
            include=["flows", "flows.*", "sparsekern", "sparsekern.*", "bench", "bench.*"]
        ),
        CSRC_PACKAGE,
    ],
    package_dir={CSRC_PACKAGE: "csrc"},
    package_data={CSRC_PACKAGE: CSRC_FILES},
    include_package_data=False,
    install_requires=RUNTIME,
    extras_require={"triton": TRITON, "tabular": TABULAR, "dev": DEV, "bench": BENCH},
    entry_points={"console_scripts": ["sparseflow = flows.cli:main"]},
)
