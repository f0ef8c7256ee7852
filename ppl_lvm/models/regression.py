r"""Bayesian linear regression with unknown noise: the smallest complete library model.

.. math::

    w \sim \mathcal N(0, \tau^2 I_D), \quad b \sim \mathcal N(0, \tau^2), \quad
    \sigma \sim \mathrm{HalfNormal}(1), \quad
    y_n \mid x_n \sim \mathcal N(x_n^\top w + b, \sigma^2).

The hand-built guide is mean-field: Normal over ``w`` and ``b`` and a LogNormal over
``sigma``.  It is the model behind ``ppl-lvm demo`` and the first tutorial, and it shows the
conventions every library model follows: a :class:`~pyro.nn.PyroModule` whose ``model`` and
``guide`` are ``pyro_method``\ s (so their ``PyroParam``\ s are seen by every backend's
optimizer), a ``simulate`` with ground truth, shape checks with clear errors, and a
``predict`` on new inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch.distributions import constraints

from . import register_model

__all__ = ["BayesianLinearRegression"]


class BayesianLinearRegression(PyroModule):
    """Bayesian linear regression :math:`y = Xw + b + \\varepsilon` with a mean-field guide.

    :param int num_features: D, the number of columns of X.
    :param float prior_scale: :math:`\\tau`, prior standard deviation of weights and bias.

    Example::

        >>> reg = BayesianLinearRegression(10)
        >>> fit = ppl_lvm.fit(reg.model, reg.guide, X, y, num_steps=2000)
    """

    def __init__(self, num_features: int, prior_scale: float = 1.0):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale!r}")
        self.num_features = num_features
        self.prior_scale = float(prior_scale)
        self.w_loc = PyroParam(torch.zeros(num_features))
        self.w_scale = PyroParam(torch.full((num_features,), 0.1), constraint=constraints.positive)
        self.b_loc = PyroParam(torch.zeros(()))
        self.b_scale = PyroParam(torch.tensor(0.1), constraint=constraints.positive)
        self.log_sigma_loc = PyroParam(torch.zeros(()))
        self.log_sigma_scale = PyroParam(torch.tensor(0.1), constraint=constraints.positive)

    def _check(self, X, y):
        if not torch.is_tensor(X) or X.dim() != 2 or X.shape[-1] != self.num_features:
            shape = tuple(X.shape) if torch.is_tensor(X) else type(X).__name__
            raise ValueError(
                f"X must be a tensor of shape (N, {self.num_features}), got {shape}. "
                "Reshape it, or build the model with the right num_features."
            )
        if y is not None and (not torch.is_tensor(y) or tuple(y.shape) != (X.shape[0],)):
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"y must be a tensor of shape ({X.shape[0]},) to match X, got {shape}.")

    @pyro_method
    def model(self, X: torch.Tensor, y: Optional[torch.Tensor] = None):
        self._check(X, y)
        zero = X.new_zeros(())
        tau = zero + self.prior_scale
        w = pyro.sample("w", dist.Normal(zero, tau).expand([self.num_features]).to_event(1))
        b = pyro.sample("b", dist.Normal(zero, tau))
        sigma = pyro.sample("sigma", dist.HalfNormal(zero + 1.0))
        with pyro.plate("data", X.shape[0], dim=-1):
            # Inside the data plate global sites carry a trailing size-1 dim, so these
            # broadcast against the N data points and against particle dims on the left.
            mean = (X * w).sum(-1) + b
            return pyro.sample("y", dist.Normal(mean, sigma), obs=y)

    @pyro_method
    def guide(self, X: torch.Tensor, y: Optional[torch.Tensor] = None):
        self._check(X, y)
        pyro.sample("w", dist.Normal(self.w_loc, self.w_scale).to_event(1))
        pyro.sample("b", dist.Normal(self.b_loc, self.b_scale))
        pyro.sample("sigma", dist.LogNormal(self.log_sigma_loc, self.log_sigma_scale))

    @staticmethod
    def simulate(num_data: int = 200, num_features: int = 3, noise_scale: float = 0.5, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        """Draw ``(X, y, truth)`` with ``truth = {"w", "b", "sigma"}`` from a seeded generator."""
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(num_data, num_features, generator=g, dtype=dtype)
        w = torch.randn(num_features, generator=g, dtype=dtype)
        b = torch.randn((), generator=g, dtype=dtype)
        y = X @ w + b + noise_scale * torch.randn(num_data, generator=g, dtype=dtype)
        return X, y, {"w": w, "b": b, "sigma": torch.tensor(noise_scale, dtype=dtype)}

    def predict(self, fit, X_new: torch.Tensor, num_samples: int = 500):
        """Posterior predictive mean and standard deviation of y at ``X_new``."""
        draws = fit.predictive(num_samples, X_new, None, return_sites=["y"])["y"]
        return draws.mean(0), draws.std(0)


@register_model("linear_regression")
def _matrix_case():
    X, y, _ = BayesianLinearRegression.simulate(num_data=40, num_features=2, seed=1)
    return BayesianLinearRegression(2), (X, y)
