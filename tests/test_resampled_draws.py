"""IWAE and chi^2-VIS return importance-resampled draws (the importance-weighted posterior they
target), SVI the guide's own; ``draws=`` switches.  Checked against exact conjugate posteriors
with a deliberately poor guide: resampled means must match the exact ones within the standard
error of a resampled estimate (sd^2 (1/ESS + 1/S)), the raw proposal must not."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from ppl_lvm import IWAE, SVI, ChiSquareVIS

N = 20
X = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)


def global_model(x):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def global_guide(x):  # exact: N(sum x / (N + 1), 1 / (N + 1)); this one is off by ~2 sd and too wide
    loc = pyro.param("loc", torch.tensor(0.0, dtype=x.dtype))
    scale = pyro.param("scale", torch.tensor(0.5, dtype=x.dtype), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def local_guide(x):  # exact: z_i ~ N(x_i / 2, 1/2); this one is the prior
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], dtype=x.dtype), 1.0))


@pytest.mark.parametrize("backend", [IWAE, ChiSquareVIS])
def test_global_latent_resampled_draws_match_the_exact_posterior(backend):
    fit = backend(global_model, global_guide).make_fit((X,), {})
    mean, sd = float(X.sum() / (N + 1)), 1.0 / math.sqrt(N + 1)
    S = 4000
    idata = fit.to_inferencedata(S)
    assert idata.sample_stats.attrs["draws"] == "resampled"
    ess = idata.sample_stats.attrs["importance_ess"]
    assert 50 < ess < S
    draws = torch.as_tensor(idata.posterior["mu"].values).reshape(-1)
    se = sd * math.sqrt(1.0 / ess + 1.0 / S)
    assert abs(float(draws.mean()) - mean) < 4 * se
    assert abs(float(draws.std()) / sd - 1.0) < 4 * math.sqrt(1.0 / (2 * ess) + 1.0 / (2 * S))
    # the log-likelihood group follows the resampled draws
    ll = torch.as_tensor(idata.log_likelihood["x"].values).reshape(S, N)
    assert torch.allclose(ll, dist.Normal(draws[:, None], 1.0).log_prob(X), atol=1e-10)
    # the raw proposal is what the guide says: ~2 posterior sd off
    raw = fit.posterior_samples(S, draws="proposal")["mu"]
    assert abs(float(raw.mean()) - mean) > 1.5 * sd


def test_local_latents_are_resampled_per_data_point():
    fit = IWAE(local_model, local_guide).make_fit((X,), {})
    S = 4000
    z = fit.posterior_samples(S)["z"]
    assert z.shape == (S, N)
    sd = math.sqrt(0.5)
    # ESS of prior-as-proposal for N(x/2, 1/2) is S * (1 - ...) ~ S * 0.75 at x = 0 and less further out
    idata = fit.to_inferencedata(S)
    ess = idata.sample_stats.attrs["importance_ess"]
    se = sd * math.sqrt(1.0 / ess + 1.0 / S)
    zscores = (z.mean(0) - X / 2) / se
    assert float(zscores.abs().max()) < 4.0, zscores


def test_svi_returns_the_guide_draws_and_draws_option_is_checked():
    fit = SVI(global_model, global_guide).make_fit((X,), {})
    idata = fit.to_inferencedata(500)
    assert "log_importance_weight" in idata.sample_stats
    assert "draws" not in idata.sample_stats.attrs
    resampled = fit.to_inferencedata(500, draws="resampled")
    assert resampled.sample_stats.attrs["draws"] == "resampled"
    with pytest.raises(ValueError, match="draws"):
        fit.posterior_samples(10, draws="sir")
