"""SVI against exact answers.

Tolerances come from the estimators' standard errors: a posterior mean estimated from n
independent guide draws has Monte Carlo standard error sd/sqrt(n); the importance-sampled
log-evidence carries its own delta-method standard error.  Seeds are fixed.
"""

import math
import warnings

import pyro
import pytest
import torch

from ppl_lvm import SVI
from ppl_lvm.testing import (
    ConjugateLinearRegression,
    BinaryLatents,
    LinearGaussianSSM,
    NormalNormalGlobal,
    NormalNormalLocal,
)

NUM_DRAWS = 4000


def _optim(num_steps, lr=0.05, final_lr=1e-4):
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": (final_lr / lr) ** (1.0 / num_steps)})


def _fit(fx, num_steps=2000, **kw):
    # Many vectorized particles and a decaying step size bring the guide within about 0.01
    # posterior sd of its optimum, well inside the 3 x sd/sqrt(4000) = 0.047 sd tolerance.
    kw.setdefault("num_particles", 128)
    kw.setdefault("vectorize_particles", True)
    backend = SVI(fx.model, fx.guide, optim=_optim(num_steps), **kw)
    return backend.run(*fx.args, num_steps=num_steps)


def _check_moments(fit, mean, sd, z_bound=3.0):
    # the sd of NUM_DRAWS independent draws has relative standard error 1/sqrt(2 (n - 1)) = 1.1%;
    # 4 of them, plus 1% for the optimizer's residual (the guide ends within about 0.01 of its
    # optimum, see _fit), bound the largest relative error over a site's elements (measured on
    # the four fits below: 0.4% to 2.6%)
    sd_rtol = 4.0 / math.sqrt(2 * (NUM_DRAWS - 1)) + 0.01
    draws = fit.posterior_samples(NUM_DRAWS)
    for name in mean:
        est_mean = draws[name].mean(0)
        est_sd = draws[name].std(0)
        mcse = sd[name] / math.sqrt(NUM_DRAWS)
        z = ((est_mean - mean[name]) / mcse).abs().max()
        assert z < z_bound, f"{name}: posterior mean off by {float(z):.2f} Monte Carlo standard errors"
        rel = ((est_sd - sd[name]) / sd[name]).abs().max()
        assert rel < sd_rtol, f"{name}: posterior sd off by {float(rel):.1%}"


def _check_evidence(fit, exact, num_particles=2000):
    ev = fit.log_evidence(num_particles)
    assert ev.stderr > 0
    assert abs(ev.log_evidence - exact) < 3 * ev.stderr + 1e-9, (ev, exact)
    return ev


@pytest.mark.parametrize("vectorize", [False, True])
def test_normal_global_posterior_and_evidence(vectorize):
    fx = NormalNormalGlobal()
    fit = _fit(fx, num_particles=16 if vectorize else 2, vectorize_particles=vectorize)
    _check_moments(fit, fx.exact_posterior_mean(), fx.exact_posterior_sd())
    ev = _check_evidence(fit, fx.exact_log_evidence())
    assert ev.khat < 0.5


def test_normal_local_posterior_and_evidence():
    fx = NormalNormalLocal()
    fit = _fit(fx)
    # 20 coordinates checked at once: a Bonferroni bound, P(max |z| > 3.5) ~ 20 * 4.7e-4 < 1%
    _check_moments(fit, fx.exact_posterior_mean(), fx.exact_posterior_sd(), z_bound=3.5)
    _check_evidence(fit, fx.exact_log_evidence())


def test_evidence_estimate_is_right_for_a_poor_guide():
    """The IS estimate is consistent whatever the proposal: shift the guide by 1.5 sd."""
    fx = NormalNormalLocal()
    mean, sd = fx.exact_posterior_mean()["z"], fx.exact_posterior_sd()["z"]
    backend = SVI(fx.model, fx.guide)
    backend.setup(*fx.args)
    store = pyro.get_param_store()
    store["normal_local.loc"] = (mean + 1.5 * sd).detach()
    store["normal_local.scale"] = (1.3 * sd).detach()
    fit = backend.make_fit(fx.args, {})
    ev = _check_evidence(fit, fx.exact_log_evidence(), num_particles=5000)
    assert ev.stderr > 0.01  # a poor proposal shows in the standard error


def test_linear_regression_mean_field_optimum():
    """For a Gaussian posterior, the mean-field optimum has the exact means and
    sd_i = 1/sqrt(Lambda_ii) (the diagonal of the precision), not the marginal sd."""
    fx = ConjugateLinearRegression()
    fit = _fit(fx, num_steps=3000)
    cov = fx.exact_posterior_cov()
    mf_sd = torch.linalg.inv(cov).diagonal().rsqrt()
    exact_mean = fx.exact_posterior_mean()
    _check_moments(fit, exact_mean, {"w": mf_sd})
    # the ELBO-optimal mean-field guide is still a valid proposal: the evidence is exact
    _check_evidence(fit, fx.exact_log_evidence(), num_particles=4000)


def _mean_field_elbo(fx, probs):
    """Exact ELBO of independent Bernoulli(probs) guides, by enumerating all 2^J states."""
    states, post = fx.exact_posterior_table()
    log_joint = post.log() + fx.exact_log_evidence()
    q = torch.distributions.Bernoulli(probs=probs).log_prob(states).sum(-1)
    return (q.exp() * (log_joint - q)).sum()


def _exact_mean_field_optimum(fx, num_iter=3000):
    logits = torch.zeros(len(fx.exact_posterior_mean()), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(num_iter):
        opt.zero_grad()
        (-_mean_field_elbo(fx, torch.sigmoid(logits))).backward()
        opt.step()
    return torch.sigmoid(logits).detach()


def test_binary_latents_score_function_svi():
    """Discrete guide sites (score-function gradients): the ELBO climbs towards the exact
    mean-field optimum and the evidence estimate matches enumeration."""
    fx = BinaryLatents()
    num_steps = 1500
    fit = SVI(fx.model, fx.guide, optim=_optim(num_steps, lr=0.1, final_lr=1e-3),
              num_particles=64, vectorize_particles=True).run(*fx.args, num_steps=num_steps)
    probs = pyro.param("binary.probs").detach()
    start = _mean_field_elbo(fx, torch.full_like(probs, 0.5))
    best = _mean_field_elbo(fx, _exact_mean_field_optimum(fx))
    reached = _mean_field_elbo(fx, probs)
    # Score-function SVI approaches optima at the boundary of [0, 1] slowly; 1500 steps close
    # 94% of the ELBO gap at this seed, and a broken estimator would not close half of it.
    assert (reached - start) / (best - start) > 0.9
    _check_evidence(fit, fx.exact_log_evidence(), num_particles=4000)


def test_binary_latents_enumerated_in_the_model():
    """TraceEnum sums the binary sites out: with an empty guide the loss is -log p(x) exactly."""
    fx = BinaryLatents()

    def model(x):
        with pyro.poutine.infer_config(config_fn=lambda site: {"enumerate": "parallel"}
                                       if site["type"] == "sample" and not site["is_observed"] else {}):
            fx.model(x)

    def guide(x):
        pass

    backend = SVI(model, guide, loss="enum")
    loss = backend.step(*fx.args)
    assert loss == pytest.approx(-fx.exact_log_evidence(), rel=1e-9)
    # the evidence sums the enumerated sites out too: every (empty) guide draw gives p(x) exactly
    est = backend.make_fit(fx.args, {}).log_evidence(10)
    assert est.log_evidence == pytest.approx(fx.exact_log_evidence(), rel=1e-9)
    assert est.stderr == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow  # 58 s in CI; default-suite budget
def test_lgssm_mean_field_means_match_the_smoother():
    fx = LinearGaussianSSM(num_time_steps=30)
    fit = _fit(fx, num_particles=32)
    mean = fx.exact_posterior_mean()
    draws = fit.posterior_samples(NUM_DRAWS)
    # mean-field on a Gaussian chain keeps the exact means; sds shrink, so the MC error of a
    # draw mean is at most the exact sd / sqrt(n).  30 sites: Bonferroni bound 3.5.
    sd = fx.exact_posterior_sd()
    z = max(float(((draws[k].mean(0) - mean[k]) / (sd[k] / math.sqrt(NUM_DRAWS))).abs()) for k in mean)
    assert z < 3.5


def test_subsampled_svi_needs_full_data_for_evidence():
    fx = NormalNormalLocal(num_data=20, subsample_size=5)
    fit = _fit(fx, num_steps=50)
    with pytest.raises(ValueError, match="subsamples plate"):
        fit.log_evidence(100)


@pytest.mark.parametrize("autoguide", ["AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal"])
def test_autoguides_evidence_counts_auxiliary_sites(autoguide):
    """Autoguides sample through an auxiliary site; log q must include it."""
    from pyro.infer import autoguide as ag

    fx = NormalNormalGlobal(num_data=20)
    guide = getattr(ag, autoguide)(fx.model)
    fit = SVI(fx.model, guide, optim=pyro.optim.Adam({"lr": 0.05})).run(*fx.args, num_steps=800)
    ev = _check_evidence(fit, fx.exact_log_evidence())
    assert ev.khat < 0.7


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_svi_follows_the_data_device(device):
    fx = NormalNormalLocal(num_data=10, device=device)
    fit = SVI(fx.model, fx.guide, optim=pyro.optim.Adam({"lr": 0.05}), num_particles=4,
              vectorize_particles=True).run(*fx.args, num_steps=20)
    assert pyro.param("normal_local.loc").device.type == device
    assert fit.posterior_samples(5)["z"].device.type == device
    assert pyro.param("normal_local.loc").dtype == torch.float64
    with warnings.catch_warnings():  # 20 steps leave a poor proposal; only placement is tested here
        warnings.simplefilter("ignore", RuntimeWarning)
        ev = fit.log_evidence(50)
    assert math.isfinite(ev.log_evidence)
    idata = fit.to_inferencedata(num_samples=16)
    assert idata.posterior["z"].shape == (4, 4, 10)


@pytest.mark.parametrize("loss", ["trace", "tracegraph", "meanfield", pyro.infer.Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)],
                         ids=["trace", "tracegraph", "meanfield", "elbo-instance"])
def test_every_elbo_recovers_the_conjugate_posterior(loss):
    fx = NormalNormalGlobal()
    kw = {} if not isinstance(loss, str) else {"num_particles": 16, "vectorize_particles": True}
    fit = SVI(fx.model, fx.guide, optim=_optim(1500), loss=loss, **kw).run(*fx.args, num_steps=1500)
    _check_moments(fit, fx.exact_posterior_mean(), fx.exact_posterior_sd())


def test_poor_proposal_warns_with_khat():
    fx = NormalNormalGlobal()
    backend = SVI(fx.model, fx.guide)
    backend.setup(*fx.args)
    pyro.get_param_store()["normal_global.scale"] = torch.tensor(0.02, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="k-hat"):
        ev = backend.make_fit(fx.args, {}).log_evidence(2000)
    assert ev.khat > 0.7


def test_a_run_whose_loss_is_still_falling_says_so():
    import pyro.distributions as dist
    import warnings
    from pyro.infer.autoguide import AutoNormal
    from ppl_lvm import SVI

    def model():
        pyro.sample("z", dist.Normal(torch.tensor(500.0), 1.0))

    pyro.clear_param_store()
    guide = AutoNormal(model)
    with pytest.warns(RuntimeWarning, match="still falling"):  # lr 1e-2 needs ~5e4 steps to reach 500
        SVI(model, guide).run(num_steps=300, progress=False)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # converged (within 0.02 after 2700 steps): no warning
        SVI(model, guide, pyro.optim.Adam({"lr": 0.5})).run(num_steps=6000, progress=False)


def test_draws_from_a_guide_that_misses_the_posterior_come_with_the_psis_warning():
    import pyro.distributions as dist
    import warnings
    from torch.distributions import constraints
    from ppl_lvm import SVI, IWAE

    def model():
        pyro.sample("z", dist.Normal(torch.tensor(0.0), 1.0))

    def guide(scale0=0.3):
        scale = pyro.param("s", torch.tensor(scale0), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), scale))

    for backend in (SVI, IWAE):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        fit = backend(model, guide, pyro.optim.Adam({"lr": 1e-9})).run(num_steps=1, progress=False)
        with pytest.warns(RuntimeWarning, match="k-hat of the guide"):  # q = N(0, 0.3) for p = N(0, 1)
            fit.to_inferencedata(2000)
    pyro.clear_param_store()
    fit = SVI(model, lambda: guide(1.2), pyro.optim.Adam({"lr": 1e-9})).run(num_steps=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a wider guide: bounded weights, no warning
        fit.to_inferencedata(2000)


def test_vectorized_particles_with_minibatches_and_an_autoguide():
    """A plate the model subsamples and an autoguide does not: the vectorization check used to
    draw the minibatch twice, find different log-densities and refuse the model."""
    from pyro.infer.autoguide import AutoNormal
    from tests.helpers import minibatch_regression as model, minibatch_regression_data

    x, y = minibatch_regression_data()
    backend = SVI(model, AutoNormal(model), num_particles=8, vectorize_particles=True)
    fit = backend.run(x, y, num_steps=1500, progress=False)
    assert backend.evaluator.resolve_mode((x, y), {}) == "plate"
    X = torch.stack([torch.ones_like(x), x], 1)
    cov = torch.linalg.inv(X.T @ X / 0.25 + torch.eye(2, dtype=x.dtype) / 25)
    mean, sd = cov @ X.T @ y / 0.25, cov.diagonal().sqrt()
    s = fit.posterior_samples(4000)
    # the sds detect a wrong likelihood scale (without N/B they would be sqrt(10) times wider);
    # the means only gross errors: the final iterate of a minibatch fit at Adam's lr 1e-2 wanders
    # by about a posterior sd (0.85 sd measured here), so they are held to 1.5 sd
    for i, name in enumerate("ab"):
        assert abs(float(s[name].mean()) - float(mean[i])) < 1.5 * float(sd[i])
        assert 0.7 < float(s[name].std()) / float(sd[i]) < 1.4


def _normal_mean_problem():
    import pyro.distributions as dist
    from torch.distributions import constraints

    y = torch.randn(20, generator=torch.Generator().manual_seed(0)) + 1.0

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("d", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(loc, scale))

    prec = 1 / 100 + 20
    return model, guide, y, float(y.sum()) / prec, prec ** -0.5


@pytest.mark.slow
def test_a_run_ends_on_the_average_of_its_last_iterates():
    """Issue 16 item 11, the README's setting (Adam lr 0.02, 3000 steps) on a one-parameter
    normal model, 6 seeds: the last iterate sits 0.02-0.39 posterior sd from the exact mean
    (mean 0.19), the average of the last 20% of iterates 0.002-0.07 (mean 0.03)."""
    model, guide, y, mean, sd = _normal_mean_problem()
    errors = {}
    for avg in (0.0, None):  # None: the default, 0.2 for SVI
        errors[avg] = []
        for seed in range(6):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            SVI(model, guide, optim=pyro.optim.Adam({"lr": 0.02})).run(y, num_steps=3000, average_last=avg)
            errors[avg].append(abs(float(pyro.param("loc").detach()) - mean) / sd)
    assert sum(errors[None]) < 0.5 * sum(errors[0.0]), errors
    assert max(errors[None]) < 0.15, errors


def test_averaging_is_the_mean_of_the_window_and_the_next_step_continues_from_the_last_iterate(tmp_path):
    model, guide, y, _, _ = _normal_mean_problem()
    iterates = []

    def record(backend, step, loss):
        iterates.append(float(pyro.param("loc").detach()))

    pyro.set_rng_seed(1)
    backend = SVI(model, guide, optim=pyro.optim.Adam({"lr": 0.02}))
    backend.run(y, num_steps=100, average_last=0.2, callbacks=[record])
    assert backend.averaged_steps == (80, 100)
    assert float(pyro.param("loc").detach()) == pytest.approx(sum(iterates[80:]) / 20, rel=1e-6)
    backend.save(tmp_path / "avg.pt")
    backend.step(y)
    continued = float(pyro.param("loc").detach())
    # the same seed without averaging: step 101 is the same update of the same iterate
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    plain = SVI(model, guide, optim=pyro.optim.Adam({"lr": 0.02}))
    plain.run(y, num_steps=101, average_last=0.0)
    assert float(pyro.param("loc").detach()) == continued
    # a checkpoint of an averaged fit resumes from the last iterate too
    pyro.clear_param_store()
    resumed = SVI(model, guide, optim=pyro.optim.Adam({"lr": 0.02})).load(tmp_path / "avg.pt")
    assert float(pyro.param("loc").detach()) == pytest.approx(sum(iterates[80:]) / 20, rel=1e-6)
    resumed.step(y)
    assert float(pyro.param("loc").detach()) == continued
    with pytest.raises(ValueError, match="average_last"):
        plain.run(y, num_steps=10, average_last=1.0)
    # a diverging step after an averaged run leaves the average (and the kept last iterate) in place
    bad = y.clone()  # poisoned in place below, after the pre-flight check has passed
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    averaged = SVI(model, guide, optim=pyro.optim.Adam({"lr": 0.02}))
    averaged.run(bad, num_steps=100, average_last=0.2)
    before = float(pyro.param("loc").detach())
    kept = [v.clone() for _, v in averaged._last_iterate]
    bad.fill_(float("inf"))
    from ppl_lvm import DivergenceError

    with pytest.raises(DivergenceError):
        averaged.step(bad)
    assert float(pyro.param("loc").detach()) == before and averaged.averaged_steps == (80, 100)
    assert len(kept) == len(averaged._last_iterate)
    assert all(torch.equal(a, v) for a, (_, v) in zip(kept, averaged._last_iterate))


def test_fit_routes_average_last_to_the_run():
    import ppl_lvm

    model, guide, y, _, _ = _normal_mean_problem()
    assert ppl_lvm.fit(model, guide, y, num_steps=100).backend.averaged_steps == (80, 100)
    pyro.clear_param_store()
    assert ppl_lvm.fit(model, guide, y, num_steps=100, average_last=0).backend.averaged_steps is None
