"""pytest configuration of the kernel microbenchmarks (``pytest bench/``)."""

import os

import torch

# The suite's convention: 2 threads unless told otherwise, as in python -m bench.
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
