"""Results of models with enumerated discrete sites: ArviZ's log_likelihood holds the marginal
per observation (the enumerated sites summed out), and the log-evidence sums them out exactly."""
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

import ppl_lvm

K = 3
CENTRES = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64)


def _data(n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, K, (n,), generator=g)
    return CENTRES[z] + torch.randn(n, generator=g, dtype=torch.float64)


def mixture_model(x):
    """A user's mixture as written in Pyro's tutorials: ``mu[z]`` does not broadcast over a
    particle plate, so the results run the enumeration once per draw."""
    w = pyro.sample("w", dist.Dirichlet(torch.ones(K, dtype=x.dtype)))
    with pyro.plate("comp", K):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=x.dtype), 10.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def broadcasting_mixture_model(x):
    """The same model written to broadcast (``Vindex``): the results use one particle plate."""
    w = pyro.sample("w", dist.Dirichlet(torch.ones(K, dtype=x.dtype)))
    with pyro.plate("comp", K):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=x.dtype), 10.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w.unsqueeze(-2)), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(Vindex(mu.unsqueeze(-2))[..., z], 1.0), obs=x)


def mixture_guide(x):
    a = pyro.param("a", 10 * torch.ones(K, dtype=x.dtype), constraint=constraints.positive)
    pyro.sample("w", dist.Dirichlet(a))
    with pyro.plate("comp", K):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype)),
                                      pyro.param("s", 0.5 * torch.ones(K, dtype=x.dtype),
                                                 constraint=constraints.positive)))


def _hand_marginal(w, mu, x):
    """log p(x_i | w, mu) = log sum_k w_k N(x_i; mu_k, 1), per draw and data point."""
    comp = dist.Normal(mu[:, None, :], 1.0).log_prob(x[None, :, None])
    return torch.logsumexp(w.log()[:, None, :] + comp, -1)


@pytest.mark.parametrize("model", [mixture_model, broadcasting_mixture_model], ids=["indexing", "vindex"])
def test_log_likelihood_group_is_the_marginal_over_enumerated_sites(model):
    x = _data()
    fit = ppl_lvm.fit(model, mixture_guide, x, backend="svi", loss="enum", num_steps=600,
                      optim=pyro.optim.Adam({"lr": 0.05}))
    idata = fit.to_inferencedata(200)
    w = torch.as_tensor(idata.posterior["w"].values).reshape(-1, K)
    mu = torch.as_tensor(idata.posterior["mu"].values).reshape(-1, K)
    ll = torch.as_tensor(idata.log_likelihood["x"].values).reshape(-1, x.shape[0])
    # an identity at the same draws: only rounding separates them
    assert torch.allclose(ll, _hand_marginal(w, mu, x), atol=1e-8)
    # well specified with 5 free parameters (3 means, 2 weights): LOO's effective number of
    # parameters is close to 5 (was ~1e4 when z was drawn from its prior)
    loo = az.loo(idata)
    assert 3.0 < loo.p_loo < 8.0
    assert np.all(loo.pareto_k.values < 0.7)


def test_log_evidence_sums_out_enumerated_sites_against_quadrature():
    """Known centres and weights, one latent shift ``s ~ N(0, 1)``: p(x) is a 1-d integral of
    a product of mixtures, computed by quadrature on a fine grid."""
    x = _data(80, seed=1)
    weights = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)

    def model(x):
        s = pyro.sample("s", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(CENTRES[z] + s, 1.0), obs=x)

    def guide(x):
        pyro.sample("s", dist.Normal(pyro.param("s_loc", torch.tensor(0.0, dtype=x.dtype)),
                                     pyro.param("s_scale", torch.tensor(1.0, dtype=x.dtype),
                                                constraint=constraints.positive)))

    fit = ppl_lvm.fit(model, guide, x, backend="svi", loss="enum", num_steps=800,
                      optim=pyro.optim.Adam({"lr": 0.05}))
    est = fit.log_evidence(2000)
    grid = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    per = torch.logsumexp(weights.log() + dist.Normal(CENTRES + grid[:, None, None], 1.0)
                          .log_prob(x[None, :, None]), -1).sum(-1)
    exact = float(torch.logsumexp(per + dist.Normal(0.0, 1.0).log_prob(grid), 0) + math.log(grid[1] - grid[0]))
    assert est.stderr < 0.1
    assert abs(est.log_evidence - exact) < 4 * est.stderr + 1e-3, (est, exact)
    assert est.khat < 0.7
