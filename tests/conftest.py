import os
import tempfile

# Inductor's on-disk cache (its precompiled header and compiled kernels) is not keyed on
# ATEN_CPU_CAPABILITY: a suite run with =default after one with the machine's own
# capability reuses a header without at::vec and fails to compile. A cache per capability
# keeps such runs (README, Development) apart. Set before torch loads.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest
import torch
from engine_helpers import BACKENDS, DEVICE


def pytest_report_header(config):
    return f"sparsekern engine tests: device {DEVICE} (SPARSEKERN_TEST_DEVICE), backends {BACKENDS}"


def pytest_configure(config):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"SPARSEKERN_TEST_DEVICE={DEVICE} but torch sees no CUDA device", returncode=4)


@pytest.fixture
def device() -> torch.device:
    """The device of the engine tests (SPARSEKERN_TEST_DEVICE, default "cpu")."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    # Each test starts from the same global RNG state, so a failure reproduces alone.
    torch.manual_seed(0)
    yield
