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
