"""IWAE's and chi^2-VIS's gradient estimators with Pyro's autoguides.

An autoguide draws an auxiliary unconstrained value u and puts z = T(u) on a ``Delta`` site
whose log-density is the log-Jacobian: STL and DReG must keep that term's path derivative and
its event_dim (dropping them crashed on vector latents and biased constrained ones).  The
checks are unbiasedness identities at fixed parameters: at K = 1 the STL gradient and the ELBO's
reparameterization gradient have the same expectation; at K > 1 DReG and the pathwise IWAE
gradient do.  Means over R independent draws are compared with a z-test from their standard
errors (threshold 4.5 over ~20 coordinates: a false alarm has probability < 1e-4)."""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.nn import PyroParam
from torch.distributions import constraints

from ppl_lvm import IWAE, SVI, ChiSquareVIS

Y = torch.tensor([28., 8., -3., 7., -1., 1., 18., 12.], dtype=torch.float64)
SIGMA = torch.tensor([15., 10., 16., 11., 9., 11., 10., 18.], dtype=torch.float64)


def eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(5.0, dtype=y.dtype)))
    with pyro.plate("groups", y.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def vector_regression(y, sigma):
    """A vector-valued latent (event_dim 1) with a positive scale."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=y.dtype), 10.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(torch.tensor(2.0, dtype=y.dtype), 1.0))
    x = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    with pyro.plate("data", y.shape[-1]):
        pyro.sample("y", dist.Normal(beta[..., :1] + beta[..., 1:] * x, s), obs=y)


def _mean_and_se(backend, reps):
    draws = [backend.gradients(Y, SIGMA)[1] for _ in range(reps)]
    out = {}
    for name in draws[0]:
        g = torch.stack([d[name] for d in draws])
        out[name] = (g.mean(0), g.std(0) / reps ** 0.5)
    return out


def _z_scores(a, b):
    return {n: ((a[n][0] - b[n][0]) / (a[n][1] ** 2 + b[n][1] ** 2).clamp_min(1e-30).sqrt()).abs().max().item()
            for n in a}


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoMultivariateNormal])
@pytest.mark.parametrize("model", [eight_schools, vector_regression], ids=["eight_schools", "vector"])
def test_stl_at_one_particle_is_the_unbiased_elbo_gradient(model, autoguide):
    guide = autoguide(model)
    guide(Y, SIGMA)  # create the parameters at the autoguide's initial values
    with torch.no_grad():  # move off the initial point, where the tau gradient is small
        for name, p in pyro.get_param_store().named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    stl = IWAE(model, guide, num_particles=1, gradient="stl")
    elbo = SVI(model, guide, loss="trace")
    a, b = _mean_and_se(stl, 300), _mean_and_se(elbo, 300)
    z = _z_scores(a, b)
    assert max(z.values()) < 4.5, z


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoMultivariateNormal])
@pytest.mark.parametrize("model", [eight_schools, vector_regression], ids=["eight_schools", "vector"])
def test_dreg_matches_the_pathwise_iwae_gradient(model, autoguide):
    guide = autoguide(model)
    guide(Y, SIGMA)
    with torch.no_grad():
        for name, p in pyro.get_param_store().named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    dreg = IWAE(model, guide, num_particles=4, gradient="dreg")
    path = IWAE(model, guide, num_particles=4, gradient="pathwise")
    a, b = _mean_and_se(dreg, 300), _mean_and_se(path, 300)
    z = _z_scores(a, b)
    assert max(z.values()) < 4.5, z


def prior_only(y, sigma):
    """Latents whose posterior is their prior (the observation does not depend on them): an
    AutoNormal/AutoMultivariateNormal guide can equal it exactly."""
    pyro.sample("tau", dist.LogNormal(torch.tensor(0.3, dtype=y.dtype), 0.7))
    pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=y.dtype), 2.0).to_event(1))
    with pyro.plate("groups", y.shape[-1]):
        pyro.sample("y", dist.Normal(torch.zeros((), dtype=y.dtype), sigma), obs=y)


def _set_exact_posterior(guide, autoguide):
    """Put the autoguide at q = prior_only's posterior."""
    def put(module, name, value, constraint):  # replace a module parameter, keeping its constraint
        setattr(module, name, PyroParam(value, constraint))

    loc = torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)  # unconstrained: (log tau, beta)
    sd = torch.tensor([0.7, 2.0, 2.0], dtype=torch.float64)
    if autoguide is AutoNormal:
        put(guide.locs, "tau", loc[0], constraints.real)
        put(guide.locs, "beta", loc[1:], constraints.real)
        put(guide.scales, "tau", sd[0], guide.scale_constraint)
        put(guide.scales, "beta", sd[1:], guide.scale_constraint)
    else:
        put(guide, "loc", loc, constraints.real)
        put(guide, "scale", sd, guide.scale_constraint)
        put(guide, "scale_tril", torch.eye(3, dtype=torch.float64), guide.scale_tril_constraint)


@pytest.mark.parametrize("gradient,k", [("stl", 1), ("stl", 4), ("dreg", 4)])
@pytest.mark.parametrize("autoguide", [AutoNormal, AutoMultivariateNormal])
def test_stl_and_dreg_vanish_at_the_exact_posterior(autoguide, gradient, k):
    """'Sticking the landing': when q equals the posterior, log w is constant in z, so the STL
    and DReG guide gradients are exactly zero for every draw (Roeder et al. 2017; Tucker et al.
    2019).  With the autoguide's log-Jacobian detached the tau location got a gradient of 1
    per draw; with a vector site the estimators crashed."""
    guide = autoguide(prior_only)
    guide(Y, SIGMA)
    _set_exact_posterior(guide, autoguide)
    backend = IWAE(prior_only, guide, num_particles=k, gradient=gradient)
    for _ in range(5):
        _, grads = backend.gradients(Y, SIGMA)
        for name, g in grads.items():
            assert torch.allclose(g, torch.zeros_like(g), atol=1e-9), (name, g)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoMultivariateNormal])
def test_vis_score_gradient_has_mean_zero_at_the_exact_posterior(autoguide):
    """At q = p the chi^2 objective log E_q[w^2] is stationary, and the score-function form
    -sum_k what_k grad log q(z_k) (equal weights there) has mean exactly zero.  The autoguide's
    log-Jacobian must not leak a pathwise term into it (it did: mean 1 per draw on tau's
    location)."""
    guide = autoguide(prior_only)
    guide(Y, SIGMA)
    _set_exact_posterior(guide, autoguide)
    vis = ChiSquareVIS(prior_only, guide, num_particles=4)
    mean_se = _mean_and_se(vis, 400)
    z = {n: (m / s.clamp_min(1e-30)).abs().max().item() for n, (m, s) in mean_se.items()}
    assert vis.gradient_estimator == "score"
    assert max(z.values()) < 4.5, z
