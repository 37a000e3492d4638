import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Each test starts from the same global RNG state, so a failure reproduces alone.
    torch.manual_seed(0)
    yield
