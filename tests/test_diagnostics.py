import warnings

import arviz as az
import numpy as np
import pyro
import pytest
import torch

from ppl_lvm import SVI, psis_khat, to_inferencedata
from ppl_lvm.diagnostics import groups_to_inferencedata
from ppl_lvm.testing import ConjugateLinearRegression, NormalNormalGlobal


@pytest.mark.parametrize("tail", ["light", "heavy"])
def test_psis_khat_matches_arviz(tail):
    rng = np.random.default_rng(0)
    if tail == "light":
        lw = rng.normal(size=4000) * 0.3
    else:  # log of Pareto(alpha=1.25) draws: a true shape k = 0.8
        lw = np.log(rng.pareto(1.25, size=4000) + 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ref = az.psislw(lw.copy(), reff=1.0)
    ours = psis_khat(torch.as_tensor(lw))
    assert ours == pytest.approx(float(ref), abs=1e-6)
    if tail == "heavy":
        assert 0.6 < ours < 1.0
    else:
        assert ours < 0.5


def test_psis_khat_input_handling():
    assert np.isnan(psis_khat(np.zeros(5)))
    two_d = np.stack([np.zeros(100), np.log(np.random.default_rng(1).pareto(1.1, 100) + 1)], axis=1)
    assert psis_khat(two_d) == pytest.approx(psis_khat(two_d[:, 1]))
    with pytest.raises(ValueError, match="1-d or 2-d"):
        psis_khat(np.zeros((2, 2, 2)))


def test_groups_to_inferencedata_shapes():
    idata = groups_to_inferencedata({
        "posterior": {"w": np.zeros((2, 10, 3))},
        "log_likelihood": {"y": np.zeros((2, 10, 5))},
        "observed_data": {"y": np.ones(5)},
        "sample_stats": {},
    })
    assert idata.posterior["w"].shape == (2, 10, 3)
    assert "sample_stats" not in idata.groups()


def test_svi_fit_to_inferencedata_works_with_arviz():
    fx = ConjugateLinearRegression(num_data=60)
    fit = SVI(fx.model, fx.guide, optim=pyro.optim.Adam({"lr": 0.05}), num_particles=8,
              vectorize_particles=True).run(*fx.args, num_steps=800)
    idata = to_inferencedata(fit, num_samples=800)
    assert set(idata.groups()) >= {"posterior", "sample_stats", "log_likelihood", "observed_data"}
    assert idata.posterior["w"].shape == (4, 200, 3)
    assert idata.log_likelihood["y"].shape == (4, 200, 60)
    np.testing.assert_allclose(idata.observed_data["y"].values, fx.args[1].numpy())
    summary = az.summary(idata, var_names=["w"])
    assert list(summary.index) == ["w[0]", "w[1]", "w[2]"]
    # guide draws are independent: ESS close to the number of draws and R-hat close to 1
    ess = az.ess(idata, var_names=["w"])["w"].values
    assert np.all(ess > 500)
    assert np.all(np.abs(summary["r_hat"].values - 1.0) < 0.02)
    loo = az.loo(idata)
    assert np.isfinite(float(loo.elpd_loo))
    # the per-observation log-likelihood sums to the model's log-likelihood of each draw
    draws = fit.posterior_samples(3)
    assert draws["w"].shape == (3, 3)
    assert idata.sample_stats["log_importance_weight"].shape == (4, 200)
    assert idata.posterior.attrs["backend"] == "SVI"


def test_log_likelihood_values_are_exact_per_observation():
    fx = NormalNormalGlobal(num_data=7)
    fit = SVI(fx.model, fx.guide).run(*fx.args, num_steps=5)
    idata = fit.to_inferencedata(num_samples=16)
    z = torch.as_tensor(idata.posterior["z"].values)  # (4, 4)
    expected = torch.distributions.Normal(z[..., None], fx.obs_scale).log_prob(fx.args[0])
    np.testing.assert_allclose(idata.log_likelihood["x"].values, expected.numpy(), rtol=1e-10)
