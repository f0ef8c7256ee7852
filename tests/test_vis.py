"""chi^2-VIS against exact answers (tolerances from standard errors; fixed seeds)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from ppl_lvm import ChiSquareVIS
from ppl_lvm.inference.vis import PRESETS
from ppl_lvm.testing import BinaryLatents, NormalNormalGlobal, NormalNormalLocal


def test_presets_name_the_papers_baselines():
    fx = NormalNormalLocal()
    for preset, (m, p) in PRESETS.items():
        b = ChiSquareVIS(fx.model, fx.guide, preset=preset)
        assert (b.model_objective, b.proposal_objective) == (m, p)
    assert PRESETS["vis"] == ("is_loglik", "chi2") and PRESETS["vi"] == ("elbo", "elbo")
    b = ChiSquareVIS(fx.model, fx.guide, preset="vis", proposal_objective="elbo")
    assert (b.model_objective, b.proposal_objective) == ("is_loglik", "elbo")


def test_proposal_converges_to_the_exact_posterior():
    """The forward chi^2 optimum is the posterior when the family contains it."""
    fx = NormalNormalLocal()
    fit = ChiSquareVIS(fx.model, fx.guide, pyro.optim.Adam({"lr": 0.05}), num_particles=64).run(
        *fx.args, num_steps=1000)
    mean, sd = fx.exact_posterior_mean()["z"], fx.exact_posterior_sd()["z"]
    loc = pyro.param("normal_local.loc").detach()
    scale = pyro.param("normal_local.scale").detach()
    assert float(((loc - mean) / sd).abs().max()) < 0.1
    assert float((scale / sd - 1).abs().max()) < 0.1
    assert fit.backend.gradient_estimator == "score"
    ev = fit.log_evidence(2000)
    assert abs(ev.log_evidence - fx.exact_log_evidence()) < 3 * ev.stderr + 1e-6


def test_recovers_an_unknown_prior_mean():
    """z_i ~ N(mu, 1), x_i ~ N(z_i, 1): the MLE of mu is mean(x), with standard error sqrt(2/N)."""
    n, mu_true = 200, 1.5
    g = torch.Generator().manual_seed(0)
    x = mu_true + math.sqrt(2.0) * torch.randn(n, generator=g, dtype=torch.float64)

    def model(x):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("q_loc", torch.zeros_like(x))
        scale = pyro.param("q_scale", torch.ones_like(x), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale))

    ChiSquareVIS(model, guide, pyro.optim.Adam({"lr": 0.05}), num_particles=64).run(x, num_steps=1500)
    mu = float(pyro.param("mu").detach())
    se = math.sqrt(2.0 / n)
    assert abs(mu - mu_true) < 3 * se
    assert abs(mu - float(x.mean())) < 0.3 * se  # and it sits at the maximum-likelihood estimate


def test_no_overflow_with_many_particles_and_extreme_weights():
    fx = NormalNormalGlobal()
    backend = ChiSquareVIS(fx.model, fx.guide, num_particles=5000)
    backend.setup(*fx.args)
    store = pyro.get_param_store()
    store["normal_global.loc"] = torch.tensor(-5.0, dtype=torch.float64)  # ~60 posterior sds off
    store["normal_global.scale"] = torch.tensor(3.0, dtype=torch.float64)
    lw = backend.evaluator.log_weights(5000, fx.args, {})
    assert float(lw.joint.max() - lw.joint.min()) > 300  # weights span hundreds of nats
    loss = backend.step(*fx.args)
    assert math.isfinite(loss)
    for name in ("normal_global.loc", "normal_global.scale"):
        assert torch.isfinite(store[name]).all()
    assert math.isfinite(backend.log_chi2_objective(*fx.args))


def test_pathwise_chi2_gradient_matches_finite_differences():
    """With common random numbers the pathwise gradient of log V is the derivative of the estimate."""
    fx = NormalNormalGlobal()
    backend = ChiSquareVIS(fx.model, fx.guide, num_particles=20000, proposal_gradient="pathwise")
    backend.setup(*fx.args)
    store = pyro.get_param_store()

    def set_params(loc, scale):
        store["normal_global.loc"] = torch.tensor(loc, dtype=torch.float64)
        store["normal_global.scale"] = torch.tensor(scale, dtype=torch.float64)

    def log_v(loc, scale):
        set_params(loc, scale)
        pyro.set_rng_seed(7)
        return backend.log_chi2_objective(*fx.args)

    loc, scale, h = 3.0, 0.3, 1e-4
    fd_loc = (log_v(loc + h, scale) - log_v(loc - h, scale)) / (2 * h)
    fd_log_scale = (log_v(loc, scale * math.exp(h)) - log_v(loc, scale * math.exp(-h))) / (2 * h)
    set_params(loc, scale)
    pyro.set_rng_seed(7)
    for p in store.values():
        p.unconstrained().grad = None
    backend._loss_and_grads(fx.args, {})
    # the guide's gradient is that of log V (the proposal objective is -log V, descended)
    assert float(store["normal_global.loc"].unconstrained().grad) == pytest.approx(fd_loc, rel=1e-4)
    assert float(store["normal_global.scale"].unconstrained().grad) == pytest.approx(fd_log_scale, rel=1e-4)


def test_score_function_proposal_for_discrete_guide_sites():
    fx = BinaryLatents()
    backend = ChiSquareVIS(fx.model, fx.guide, pyro.optim.Adam({"lr": 0.05}), num_particles=32)
    fit = backend.run(*fx.args, num_steps=300)
    assert backend.gradient_estimator == "score"
    assert fit.losses[-50:].mean() < fit.losses[:50].mean()
    with pytest.raises(ValueError, match="needs a reparameterizable guide"):
        ChiSquareVIS(fx.model, fx.guide, proposal_gradient="pathwise").step(*fx.args)


@pytest.mark.parametrize("preset", ["vbis", "vi"])
def test_baselines_fit_the_conjugate_posterior(preset):
    fx = NormalNormalGlobal()
    ChiSquareVIS(fx.model, fx.guide, pyro.optim.Adam({"lr": 0.05}), num_particles=32, preset=preset).run(
        *fx.args, num_steps=800)
    mean, sd = fx.exact_posterior_mean()["z"], fx.exact_posterior_sd()["z"]
    assert abs(float(pyro.param("normal_global.loc").detach() - mean) / float(sd)) < 0.1
    assert abs(float(pyro.param("normal_global.scale").detach()) / float(sd) - 1) < 0.1


def test_bad_arguments():
    fx = NormalNormalGlobal()
    with pytest.raises(ValueError, match="preset must be one of"):
        ChiSquareVIS(fx.model, fx.guide, preset="chivi")
    with pytest.raises(ValueError, match="model_objective must be one of"):
        ChiSquareVIS(fx.model, fx.guide, model_objective="kl")
    with pytest.raises(ValueError, match="proposal_gradient must be one of"):
        ChiSquareVIS(fx.model, fx.guide, proposal_gradient="dreg")
    with pytest.raises(ValueError, match="num_particles >= 2"):
        ChiSquareVIS(fx.model, fx.guide, num_particles=1)
