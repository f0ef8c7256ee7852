"""IWAE against exact answers and against Pyro's RenyiELBO(alpha=0).

Tolerances come from standard errors of the Monte Carlo estimates (R independent replicates
give a mean with standard error sd/sqrt(R)); seeds are fixed.
"""

import math

import pyro
import pytest
import torch

from ppl_lvm import IWAE, IncompatibleModelError
from ppl_lvm.inference.iwae import vimco_signals
from ppl_lvm.testing import BinaryLatents, NormalNormalGlobal, NormalNormalLocal


def _set(backend, fx, **values):
    backend.setup(*fx.args)
    store = pyro.get_param_store()
    for k, v in values.items():
        store[f"{fx.name}.{k}"] = torch.as_tensor(v, dtype=torch.float64)


def _bound_estimates(backend, fx, k, reps):
    return torch.tensor([-backend.loss(*fx.args, num_particles=k) for _ in range(reps)])


def test_bound_rises_with_k_and_approaches_the_evidence():
    fx = NormalNormalLocal()
    mean, sd = fx.exact_posterior_mean()["z"], fx.exact_posterior_sd()["z"]
    backend = IWAE(fx.model, fx.guide)
    _set(backend, fx, loc=mean + sd, scale=2.0 * sd)  # deliberately mis-specified guide
    exact = fx.exact_log_evidence()
    stats = {}
    for k in (1, 5, 50):
        est = _bound_estimates(backend, fx, k, reps=300)
        stats[k] = (float(est.mean()), float(est.std() / math.sqrt(len(est))))
    (l1, s1), (l5, s5), (l50, s50) = stats[1], stats[5], stats[50]
    assert l5 - l1 > 3 * math.hypot(s1, s5)
    assert l50 - l5 > 3 * math.hypot(s5, s50)
    assert l50 < exact + 3 * s50  # still a lower bound
    assert exact - l50 < 0.25 * (exact - l1)  # and most of the gap is closed


def test_matches_pyro_renyi_elbo_on_the_same_samples():
    fx = NormalNormalGlobal()
    backend = IWAE(fx.model, fx.guide, num_particles=32)
    _set(backend, fx, loc=3.0, scale=0.3)
    renyi = pyro.infer.RenyiELBO(alpha=0.0, num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        ours = backend.loss(*fx.args)
        pyro.set_rng_seed(seed)
        theirs = renyi.loss(fx.model, fx.guide, *fx.args)
        assert ours == pytest.approx(theirs, rel=1e-10, abs=1e-10)


def _gradients(fx, gradient, loc, scale, k=16, reps=1000):
    backend = IWAE(fx.model, fx.guide, num_particles=k, gradient=gradient)
    _set(backend, fx, loc=loc, scale=scale)
    store = pyro.get_param_store()
    names = [f"{fx.name}.loc", f"{fx.name}.scale"]
    out = []
    for _ in range(reps):
        for n in names:
            store[n].unconstrained().grad = None
        backend._loss_and_grads(fx.args, {})
        out.append(torch.stack([store[n].unconstrained().grad for n in names]))
    return torch.stack(out)


def test_dreg_is_unbiased_and_has_lower_variance_than_pathwise():
    fx = NormalNormalGlobal()
    m = float(fx.exact_posterior_mean()["z"])
    s = float(fx.exact_posterior_sd()["z"])
    pyro.set_rng_seed(1)
    path = _gradients(fx, "pathwise", m + 0.5 * s, 3 * s)
    pyro.set_rng_seed(2)
    dreg = _gradients(fx, "dreg", m + 0.5 * s, 3 * s)
    se = torch.sqrt(path.var(0) / len(path) + dreg.var(0) / len(dreg))
    z = (path.mean(0) - dreg.mean(0)).abs() / se
    assert (z < 4).all(), z  # same expectation (4 sigma over 2 coordinates)
    # variance ordering, with a margin far outside the sampling error of a variance ratio
    # from 1000 draws (relative sd of a sample variance ~ sqrt(2/999) = 4.5%)
    assert (dreg.var(0) < 0.5 * path.var(0)).all(), (dreg.var(0), path.var(0))


def test_stl_is_biased_for_k_above_one():
    """A documented property, checked so that the estimators cannot silently swap."""
    fx = NormalNormalGlobal()
    m = float(fx.exact_posterior_mean()["z"])
    s = float(fx.exact_posterior_sd()["z"])
    pyro.set_rng_seed(3)
    path = _gradients(fx, "pathwise", m, 3 * s, reps=600)
    pyro.set_rng_seed(4)
    stl = _gradients(fx, "stl", m, 3 * s, reps=600)
    se = torch.sqrt(path.var(0) / len(path) + stl.var(0) / len(stl))
    assert float((path.mean(0)[1] - stl.mean(0)[1]).abs() / se[1]) > 6


def _train_local(gradient, num_steps=1500):
    fx = NormalNormalLocal()
    optim = pyro.optim.Adam({"lr": 0.05})
    fit = IWAE(fx.model, fx.guide, optim, num_particles=16, gradient=gradient).run(*fx.args, num_steps=num_steps)
    mean, sd = fx.exact_posterior_mean()["z"], fx.exact_posterior_sd()["z"]
    loc_err = float(((pyro.param("normal_local.loc").detach() - mean) / sd).abs().max())
    scale_err = float((pyro.param("normal_local.scale").detach() / sd - 1).abs().max())
    return fx, fit, loc_err, scale_err


@pytest.mark.parametrize("gradient", ["dreg", "stl"])
def test_training_reaches_the_exact_posterior_for_local_latents(gradient):
    fx, fit, loc_err, scale_err = _train_local(gradient)
    # the exact posterior maximizes L_K; guide parameters end within 0.05 sd of it
    assert loc_err < 0.05 and scale_err < 0.05
    ev = fit.log_evidence(2000)
    assert abs(ev.log_evidence - fx.exact_log_evidence()) < 3 * ev.stderr + 1e-6


def test_pathwise_guide_gradient_loses_signal_where_dreg_does_not():
    """Rainforth et al. (2018): the pathwise guide gradient's signal-to-noise ratio falls with K.
    With the same K = 16 and 1500 Adam steps, DReG lands on the posterior and pathwise does not."""
    _, fit_p, loc_p, _ = _train_local("pathwise")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    _, _, loc_d, _ = _train_local("dreg")
    assert loc_d < 0.05 < loc_p
    assert fit_p.losses[-100:].mean() < fit_p.losses[:100].mean()  # pathwise still improves the bound


def test_vimco_for_discrete_guide_sites():
    fx = BinaryLatents()
    backend = IWAE(fx.model, fx.guide, pyro.optim.Adam({"lr": 0.05}), num_particles=16)
    fit = backend.run(*fx.args, num_steps=400)
    assert backend.gradient_estimator == "pathwise"
    losses = fit.losses
    assert losses[-50:].mean() < losses[:50].mean()
    # with K = 16 the bound of the trained guide is within 0.1 nats of log p(x)
    est = torch.tensor([-backend.loss(*fx.args) for _ in range(200)])
    assert fx.exact_log_evidence() - float(est.mean()) < 0.1
    with pytest.raises(ValueError, match="needs a reparameterizable guide"):
        IWAE(fx.model, fx.guide, gradient="dreg").step(*fx.args)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        IWAE(fx.model, fx.guide, num_particles=1).step(*fx.args)


def test_vimco_signals_leave_one_out():
    x = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    sig = vimco_signals(x)
    total = torch.logsumexp(x, 0) - math.log(3)
    for k in range(3):
        others = torch.cat([x[:k], x[k + 1:]])
        replaced = x.clone()
        replaced[k] = others.mean()
        assert float(sig[k]) == pytest.approx(float(total - (torch.logsumexp(replaced, 0) - math.log(3))))
    with pytest.raises(ValueError):
        vimco_signals(x[:1])


def test_global_latents_with_subsampling_are_refused():
    fx = NormalNormalGlobal(subsample_size=10)
    backend = IWAE(fx.model, fx.guide)
    with pytest.raises(IncompatibleModelError, match="global latent site.*subsamples plate"):
        backend.run(*fx.args, num_steps=5)
    assert backend.num_steps == 0


def test_local_latents_with_subsampling_give_an_unbiased_bound():
    """Minibatch estimates (N/B outside the log-mean-exp) average to the full-data bound."""
    full = NormalNormalLocal(num_data=20)
    mini = NormalNormalLocal(num_data=20, subsample_size=5)
    mean, sd = full.exact_posterior_mean()["z"], full.exact_posterior_sd()["z"]
    b_full = IWAE(full.model, full.guide, num_particles=4)
    _set(b_full, full, loc=mean + 0.5 * sd, scale=1.5 * sd)
    b_mini = IWAE(mini.model, mini.guide, num_particles=4)
    b_mini.setup(*mini.args)
    f = _bound_estimates(b_full, full, 4, reps=400)
    m = _bound_estimates(b_mini, mini, 4, reps=4000)
    se = math.hypot(float(f.std()) / math.sqrt(len(f)), float(m.std()) / math.sqrt(len(m)))
    assert abs(float(f.mean()) - float(m.mean())) < 3 * se


def test_bad_arguments():
    fx = NormalNormalGlobal()
    with pytest.raises(ValueError, match="gradient must be one of"):
        IWAE(fx.model, fx.guide, gradient="reinforce")
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        IWAE(fx.model, fx.guide, num_particles=0)


def test_small_vae_trains_and_its_held_out_bound_improves():
    import warnings

    from ppl_lvm.datasets import load_digits_binary
    from ppl_lvm.models import VAE

    data = load_digits_binary()
    train, test = data.train[:400], data.test[:100]
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=4, hidden=(32,), name="test_vae")
    backend = IWAE(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=5)
    with warnings.catch_warnings():  # an untrained encoder is a poor proposal: k-hat warns
        warnings.simplefilter("ignore", RuntimeWarning)
        backend.setup(train, subsample_size=50)
        before = backend.make_fit((train,), {"subsample_size": 50}).log_evidence(200, test, subsample_size=None)
        fit = backend.run(train, num_steps=400, subsample_size=50)
        after = fit.log_evidence(200, test, subsample_size=None)
    assert after.log_evidence - before.log_evidence > 3 * math.hypot(before.stderr, after.stderr)
    assert after.log_evidence / len(test) > -30.0  # nats per image; 64 fair coins would be -44.4


def test_public_log_weights_and_chi2_objective_on_any_guided_backend():
    fx = NormalNormalLocal()
    backend = IWAE(fx.model, fx.guide, num_particles=7)
    lw = backend.log_weights(*fx.args)
    assert lw.local.shape == (7, 20) and not lw.local.requires_grad
    # with the exact posterior as guide every weight equals p(x_i): log V = 2 log p(x)
    _set(backend, fx, loc=fx.exact_posterior_mean()["z"], scale=fx.exact_posterior_sd()["z"])
    assert backend.log_chi2_objective(*fx.args) == pytest.approx(2 * fx.exact_log_evidence(), rel=1e-10)
