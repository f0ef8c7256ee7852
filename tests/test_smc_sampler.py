"""Tempered SMC sampler and open-horizon SMC against exact answers.

The SMC evidence estimate Z-hat is unbiased; log Z-hat is tested over independent runs with
the standard error of their mean (and E[log Z-hat] <= log Z by Jensen, a bias of about
Var(log Z-hat)/2, small here).  Posterior moments: the run-averaged particle mean is z-tested
with the across-run standard error (t with few degrees of freedom: bound 4).
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lvm
from ppl_lvm import SVI, IncompatibleModelError
from ppl_lvm.inference import OpenHorizonSMC, SMCSampler
from ppl_lvm.testing import ConjugateLinearRegression, BinaryLatents

RUNS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _runs(model, args, guide=None, runs=RUNS, **opts):
    out = []
    for _ in range(runs):
        s = SMCSampler(model, guide, **opts)
        s.run(*args)
        out.append(s)
    return out


def test_linreg_evidence_and_posterior_moments():
    fx = ConjugateLinearRegression(num_data=100, num_features=3, seed=0)
    samplers = _runs(fx.model, fx.args, num_particles=400)
    lz = np.array([s.log_evidence_ for s in samplers])
    se = lz.std(ddof=1) / math.sqrt(RUNS)
    assert abs(lz.mean() - fx.exact_log_evidence()) < 3 * se + 1e-9, (lz.mean(), fx.exact_log_evidence(), se)
    means = torch.stack([s.particles()["w"].mean(0) for s in samplers])
    sds = torch.stack([s.particles()["w"].std(0) for s in samplers])
    z = (means.mean(0) - fx.exact_posterior_mean()["w"]) / (means.std(0) / math.sqrt(RUNS))
    assert float(z.abs().max()) < 4, z
    # the run-averaged particle sd, z-tested with the across-run standard error like the means
    z_sd = (sds.mean(0) - fx.exact_posterior_sd()["w"]) / (sds.std(0) / math.sqrt(RUNS))
    assert float(z_sd.abs().max()) < 4, z_sd
    s = samplers[0]
    assert s.betas[0] == 0.0 and s.betas[-1] == 1.0 and len(s.betas) > 2
    assert all(b1 > b0 for b0, b1 in zip(s.betas, s.betas[1:]))
    assert 0.3 < np.mean(s.acceptance) < 0.95


def _scale_model(y):
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.ones((), dtype=y.dtype)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, sigma), obs=y)


def test_constrained_site_evidence_and_mean_by_quadrature():
    g = torch.Generator().manual_seed(3)
    y = 0.7 * torch.randn(40, generator=g, dtype=torch.float64)
    s_grid = np.linspace(1e-4, 5, 400001)
    ds = s_grid[1] - s_grid[0]
    log_joint = (np.log(2) - 0.5 * np.log(2 * np.pi) - 0.5 * s_grid ** 2
                 - len(y) * (np.log(s_grid) + 0.5 * np.log(2 * np.pi)) - 0.5 * float((y ** 2).sum()) / s_grid ** 2)
    m = log_joint.max()
    log_z = m + np.log(np.exp(log_joint - m).sum() * ds)
    post_mean = (s_grid * np.exp(log_joint - m)).sum() / np.exp(log_joint - m).sum()
    samplers = _runs(_scale_model, (y,), num_particles=400)
    lz = np.array([s.log_evidence_ for s in samplers])
    se = lz.std(ddof=1) / math.sqrt(RUNS)
    assert abs(lz.mean() - log_z) < 3 * se + 1e-9, (lz.mean(), log_z, se)
    means = np.array([float(s.particles()["sigma"].mean()) for s in samplers])
    assert all(bool((s.particles()["sigma"] > 0).all()) for s in samplers)
    assert abs(means.mean() - post_mean) < 4 * means.std(ddof=1) / math.sqrt(RUNS)


def test_guide_as_base_distribution_shortens_the_path():
    fx = ConjugateLinearRegression(num_data=100, num_features=3, seed=0)
    SVI(fx.model, fx.guide, pyro.optim.Adam({"lr": 0.05})).run(*fx.args, num_steps=1500)
    samplers = _runs(fx.model, fx.args, guide=fx.guide, runs=6, num_particles=400)
    lz = np.array([s.log_evidence_ for s in samplers])
    se = lz.std(ddof=1) / math.sqrt(len(lz))
    assert abs(lz.mean() - fx.exact_log_evidence()) < 3 * se + 1e-9
    from_prior = SMCSampler(fx.model, num_particles=400)
    from_prior.run(*fx.args)
    assert len(samplers[0].betas) < len(from_prior.betas)


def test_fit_log_evidence_is_the_run_you_have_and_reruns_only_when_asked():
    fx = ConjugateLinearRegression(num_data=50, num_features=2, seed=1)
    s = SMCSampler(fx.model, num_particles=200)
    with pytest.raises(ValueError, match="beta = 0 < 1"):
        ppl_lvm.inference.Fit(s, fx.args, {}).log_evidence()
    fit = s.run(*fx.args)
    est = fit.log_evidence()
    assert est.log_evidence == s.log_evidence_ and est.num_particles == 200
    assert math.isnan(est.stderr) and "num_runs" in est.note
    assert fit.log_evidence(200).log_evidence == s.log_evidence_
    with pytest.raises(ValueError, match="ran with 200 particles.*num_runs"):
        fit.log_evidence(500)


def test_fit_log_evidence_repeats_runs_and_inferencedata():
    fx = ConjugateLinearRegression(num_data=50, num_features=2, seed=1)
    s = SMCSampler(fx.model, num_particles=200)
    fit = s.run(*fx.args)
    est = fit.log_evidence(200, num_runs=4)
    assert math.isfinite(est.stderr) and est.num_particles == 800
    assert abs(est.log_evidence - fx.exact_log_evidence()) < 4 * est.stderr + 0.05
    idata = fit.to_inferencedata()
    assert idata.posterior["w"].shape == (1, 200, 2)  # one population (issue: not 4 pseudo-chains)
    assert idata.log_likelihood["y"].shape == (1, 200, 50)
    more = s.step(*fx.args)  # after beta = 1: rejuvenation moves only
    assert math.isfinite(more) and s.log_evidence_ == fit.backend.log_evidence_


def test_refusals():
    fx = ConjugateLinearRegression(num_data=50, num_features=2, subsample_size=10)
    with pytest.raises(IncompatibleModelError, match="smc_online"):
        SMCSampler(fx.model, num_particles=10).run(*fx.args)
    with pytest.raises(IncompatibleModelError, match="gflownet_em"):
        SMCSampler(BinaryLatents().model, num_particles=10).run(*BinaryLatents().args)
    with pytest.raises(ValueError, match="target_ess"):
        SMCSampler(fx.model, target_ess=0.0)


# --------------------------------------------------------------------------- open horizon
def test_open_horizon_learns_the_deterministic_part():
    """y = phi x + psi + noise with phi ~ N(0, 1) stochastic and psi a parameter: psi's
    marginal maximum-likelihood value is the GLS estimate under Cov(y) = s^2 I + x x^T."""
    g = torch.Generator().manual_seed(0)
    N = 1000
    x = torch.randn(N, generator=g, dtype=torch.float64)
    y = 0.8 * x + 1.5 + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)

    def model(x, y, subsample_size=100):
        psi = pyro.param("psi", torch.tensor(0.0, dtype=torch.float64))
        phi = pyro.sample("phi", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as i:
            pyro.sample("y", dist.Normal(phi.unsqueeze(-1) * x[i] + psi, 0.5), obs=y[i])

    C = 0.25 * torch.eye(N, dtype=torch.float64) + torch.outer(x, x)
    c1 = torch.linalg.solve(C, torch.ones(N, dtype=torch.float64))
    psi_hat = float(c1 @ y / c1.sum())
    prec = 1 + float(x @ x) / 0.25
    phi_mean = float((y - psi_hat) @ x) / 0.25 / prec
    phi_sd = prec ** -0.5
    s = OpenHorizonSMC(model, optim=pyro.optim.Adam({"lr": 0.02}), num_particles=200)
    fit = s.run(x, y, num_steps=500)
    # psi: the MLE's own standard error is 0.5 / sqrt(N) = 0.016; allow 3 of them
    assert abs(pyro.param("psi").item() - psi_hat) < 3 * 0.5 / math.sqrt(N)
    phi = s.particles()["phi"]
    # the cloud follows the latest minibatch posteriors, whose means scatter by
    # phi_sd * sqrt(N / B) around the full posterior mean: 3 of those
    assert abs(float(phi.mean()) - phi_mean) < 3 * phi_sd * math.sqrt(N / 100)
    assert 0.2 * phi_sd < float(phi.std()) < 5 * phi_sd
    assert fit.losses[-50:].mean() < fit.losses[:10].mean()
    assert fit.posterior_samples(30)["phi"].shape == (30,)
    info = s.last_step  # the last minibatch step's named record
    assert info.ess <= 200 and info.acceptance == pytest.approx(np.mean(s.acceptance[-s.num_moves:]))
    assert np.isfinite(info.log_likelihood) and isinstance(info.resampled, bool)


def test_open_horizon_refuses_local_latents_in_the_minibatch():
    from ppl_lvm.testing import NormalNormalLocal

    fx = NormalNormalLocal(num_data=20, subsample_size=5)
    with pytest.raises(IncompatibleModelError, match="persist"):
        OpenHorizonSMC(fx.model, num_particles=10).run(*fx.args, num_steps=2)


def test_arviz_layout_is_one_population_with_smc_diagnostics():
    """The particles are one population, not four chains: ArviZ gets one chain, and the SMC
    diagnostics (particle ESS, move acceptance, unique particles) in sample_stats (it split
    them into 4 pseudo-chains, so R-hat read ~1 whatever happened)."""
    from ppl_lvm.testing import ConjugateLinearRegression as LinReg

    fx = LinReg()
    fit = ppl_lvm.fit(fx.model, None, *fx.args, backend="smc", num_particles=200)
    idata = fit.to_inferencedata()
    assert idata.posterior.sizes["chain"] == 1 and idata.posterior.sizes["draw"] == 200
    attrs = idata.sample_stats.attrs
    assert "not MCMC" in attrs["sampler"]
    assert 0 < attrs["particle_ess"] <= 200 and 0 < attrs["move_acceptance"] <= 1
    assert 1 <= attrs["unique_particles"] <= 200 and attrs["num_temperatures"] >= 1
    assert "lp" in idata.sample_stats and idata.log_likelihood["y"].shape[:2] == (1, 200)


def test_each_step_reports_what_it_did():
    fx = ConjugateLinearRegression(num_data=30, num_features=2, seed=0)
    s = SMCSampler(fx.model, num_particles=100)
    assert s.last_step is None
    s.step(*fx.args)
    info = s.last_step
    assert info.beta == s.beta and info.moves == s.moves_per_step[-1] and 0 <= info.acceptance <= 1
    assert info.ess == s.ess[-1] and info.log_evidence_increment == s.log_evidence_
    s.run(*fx.args)
    s.step(*fx.args)  # beta = 1: moves only
    assert s.last_step.log_evidence_increment == 0.0 and math.isnan(s.last_step.ess)
