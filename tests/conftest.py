import os

import pyro
import pytest
import torch

os.environ.setdefault("PPL_LVM_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def one_thread():
    """One torch thread: many small kernels (filters, samplers) avoid OpenMP overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
