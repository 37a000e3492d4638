"""Install the Sparse Flows packages: flows (the method), sparsekern (the engine), bench.

Metadata lives here rather than in pyproject.toml's [project] table because the
engine's C++/CUDA extensions are declared here as well (ext_modules), and one
place for both keeps them in step.
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
