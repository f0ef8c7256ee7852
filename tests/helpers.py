"""Helpers shared by the test modules (imported as ``tests.helpers``; fixtures stay in conftest.py)."""

import pyro
import pyro.distributions as dist
import pytest
import torch


def cuda_params():
    """Parametrize over devices: CPU always, CUDA only where available (skipped otherwise)."""
    return [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ]


def minibatch_regression_data(n=200, seed=0):
    """``(x, y)``: y = 1 + 2 x + N(0, 0.5^2), float64, for :func:`minibatch_regression`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dtype=torch.float64, generator=g)
    return x, 1.0 + 2.0 * x + 0.5 * torch.randn(n, dtype=torch.float64, generator=g)


def minibatch_regression(x, y, subsample_size=20):
    """Regression with an intercept a and slope b (global latents, N(0, 5^2) priors), known noise
    0.5, minibatches of ``subsample_size`` from the data plate."""
    a = pyro.sample("a", dist.Normal(torch.zeros((), dtype=x.dtype), 5.0))
    b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=x.dtype), 5.0))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal(a + b * x[idx], 0.5), obs=y[idx])
