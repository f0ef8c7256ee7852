"""Helpers shared by the test modules (imported as ``tests.helpers``; fixtures stay in conftest.py)."""

import pytest
import torch


def cuda_params():
    """Parametrize over devices: CPU always, CUDA only where available (skipped otherwise)."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ]
