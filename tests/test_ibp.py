"""Indian buffet priors and the sparse IBP factorization: exact answers first (closed forms,
enumeration), then Monte Carlo checks with tolerances from their standard errors, then recovery."""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import digamma

from ppl_lvm.models.ibp import (IndianBuffet, RestrictedBernoulliRows, SparseIBPFactorization,
                                expected_num_features, poisson_binomial_log_pmf)
from tests.helpers import cuda_params

REFERENCE = {(2.0, 1.0, 0.0): 8.998, (2.0, 1.5, 0.0): 11.686, (2.0, 1.5, 0.3): 20.979, (3.0, 0.5, 0.5): 34.694}


def _all_rows(K, dtype=torch.float64):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)), dtype=dtype)


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("params", sorted(REFERENCE))
def test_expected_num_features_matches_the_reference_values(params):
    a, c, s = params
    got = expected_num_features(50, a, c, s)
    assert abs(got - REFERENCE[params]) < 5e-4  # the references have three decimals
    if s == 0.0:
        assert got == pytest.approx(a * c * (digamma(50 + c) - digamma(c)), rel=1e-12)
    if c == 1.0 and s == 0.0:
        assert got == pytest.approx(a * sum(1.0 / i for i in range(1, 51)), rel=1e-12)


# --------------------------------------------------------------------------- prior draws
# truncation K per case: chosen so that the truncation's bias bound is below a quarter of the
# Monte Carlo standard error (checked in the test)
TRUNCATION = {(2.0, 1.0, 0.0): 60, (2.0, 1.5, 0.0): 100, (2.0, 1.5, 0.3): 400}


@pytest.mark.parametrize("params", [pytest.param(p, marks=pytest.mark.slow) if p[2] > 0 else p
                                    for p in sorted(TRUNCATION)])  # sigma > 0 needs K = 400: slow
def test_prior_draws_match_expected_num_features(params):
    a, c, s = params
    torch.manual_seed(0)
    S = 400
    ib = IndianBuffet(a, 50, TRUNCATION[params], concentration=c, discount=s)
    kn = torch.cat([(ib.sample((100,)).sum(-2) > 0).sum(-1).double() for _ in range(S // 100)])
    se = kn.std().item() / math.sqrt(S)
    bias = ib.truncation_bias()
    assert bias < 0.25 * se, (bias, se)
    z = (kn.mean().item() - REFERENCE[params]) / se
    assert abs(z) < 4.0, (kn.mean().item(), REFERENCE[params], se)  # two-sided, 4 SE


def test_power_law_prior_draws_within_the_truncation_bound():
    """(3, 0.5, 0.5): the truncation error decays only like 1/K, so the draws can only be held to
    one-sided bounds: ref - bias_bound - 4 SE <= mean <= ref + 4 SE."""
    a, c, s = 3.0, 0.5, 0.5
    torch.manual_seed(1)
    S = 400
    ib = IndianBuffet(a, 50, 300, concentration=c, discount=s)
    kn = torch.cat([(ib.sample((100,)).sum(-2) > 0).sum(-1).double() for _ in range(S // 100)])
    se = kn.std().item() / math.sqrt(S)
    bias = ib.truncation_bias()
    ref = REFERENCE[(a, c, s)]
    assert ref - bias - 4 * se <= kn.mean().item() <= ref + 4 * se, (kn.mean().item(), ref, bias, se)
    # and the bound is not vacuous: it is smaller than the expectation itself
    assert bias < 0.1 * ref


def test_truncation_bias_grows_with_discount():
    biases = [IndianBuffet(2.0, 50, 100, concentration=1.0, discount=s).truncation_bias() for s in (0.0, 0.3, 0.6)]
    assert biases[0] < biases[1] < biases[2]
    # the ordered construction's bound is the closed form N alpha (alpha/(1+alpha))^K
    assert IndianBuffet(2.0, 50, 30).truncation_bias() == pytest.approx(50 * 2 * (2 / 3) ** 30, rel=1e-12)


def test_rounds_sticks_have_the_stated_means():
    """E[sum_k pi_k] = alpha (1 - dropped fraction): sticks of the rounds construction, sigma > 0."""
    torch.manual_seed(2)
    ib = IndianBuffet(2.0, 10, 100, concentration=1.5, discount=0.3)
    tot = ib.sample_sticks((1000,)).sum(-1)
    se = tot.std().item() / math.sqrt(1000)
    expect = 2.0 - ib.dropped_mass()
    assert abs(tot.mean().item() - expect) < 4 * se


# --------------------------------------------------------------------------- restricted and exact
def test_poisson_binomial_recursion_equals_enumeration():
    probs = torch.tensor([0.2, 0.5, 0.7, 0.1, 0.95], dtype=torch.float64)
    rows = _all_rows(5)
    p_rows = (rows * probs + (1 - rows) * (1 - probs)).prod(-1)
    brute = torch.zeros(6, dtype=torch.float64).index_add_(0, rows.sum(-1).long(), p_rows)
    assert torch.allclose(poisson_binomial_log_pmf(probs).exp(), brute, atol=1e-14, rtol=0)


def test_restricted_point_mass_gives_exactly_J_features_per_row():
    torch.manual_seed(3)
    ib = IndianBuffet(2.0, 30, 12, concentration=1.0, discount=0.2, num_active=dist.Delta(torch.tensor(3.0)))
    z = ib.sample((5,))
    assert torch.all(z.sum(-1) == 3)


def test_restricted_with_poisson_binomial_f_equals_the_unrestricted_law():
    probs = torch.tensor([0.3, 0.6, 0.15, 0.8], dtype=torch.float64)
    f = dist.Categorical(probs=poisson_binomial_log_pmf(probs).exp())
    rows = _all_rows(4)
    restricted = RestrictedBernoulliRows(probs, f).log_prob(rows)
    plain = dist.Bernoulli(probs=probs).to_event(1).log_prob(rows)
    assert torch.allclose(restricted, plain, atol=1e-12, rtol=0)


@pytest.mark.parametrize("f", [dist.Poisson(torch.tensor(1.7, dtype=torch.float64)),
                               dist.Delta(torch.tensor(2.0, dtype=torch.float64))])
def test_restricted_log_prob_equals_brute_force_enumeration(f):
    probs = torch.tensor([0.3, 0.6, 0.15, 0.8], dtype=torch.float64)
    rows = _all_rows(4)
    bern = (rows * probs + (1 - rows) * (1 - probs)).prod(-1)
    J = rows.sum(-1).long()
    pb = torch.zeros(5, dtype=torch.float64).index_add_(0, J, bern)  # by enumeration
    fj = f.log_prob(torch.arange(5, dtype=torch.float64)).exp()
    fj = fj / fj.sum()  # truncation: J <= K
    brute = fj[J] * bern / pb[J]
    got = RestrictedBernoulliRows(probs, f).log_prob(rows).exp()
    assert torch.allclose(got, brute, atol=1e-10, rtol=0)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-12)
    # the matrix law: N = 2 rows, every one of the 256 matrices, conditional on the sticks
    ib = IndianBuffet(2.0, 2, 4, concentration=1.5, discount=0.3, num_active=f)
    mats = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1, 2)
    Z = rows[mats]
    lp = ib.log_prob(Z, probs)
    assert torch.allclose(lp.exp(), brute[mats].prod(-1), atol=1e-12, rtol=0)


def test_restricted_sampler_draws_the_exact_law():
    torch.manual_seed(4)
    probs = torch.tensor([0.3, 0.6, 0.15, 0.8], dtype=torch.float64)
    d = RestrictedBernoulliRows(probs, dist.Poisson(torch.tensor(1.5)))
    S = 20000
    x = d.sample((S,))
    code = (x * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)).sum(-1).long()
    freq = torch.bincount(code, minlength=16).double() / S
    exact = d.log_prob(_all_rows(4)).exp()
    se = (exact * (1 - exact) / S).sqrt()
    assert torch.all((freq - exact).abs() < 4.5 * se + 1e-12)  # 16 cells, each within 4.5 SE


def test_pyro_model_sticks_follow_the_rounds_definition():
    m = SparseIBPFactorization(7, prior="3ibp", alpha=2.0, concentration=1.5, discount=0.3)
    prior = m._stick_prior(torch.zeros(1, dtype=torch.float64))
    torch.manual_seed(5)
    flat = prior.sample()
    assert flat.shape == (int(m.rounds.sum()),)
    pi = m.sticks_to_probs(flat)
    v = m._flat_to_matrix(flat)
    mask = m._stick_matrix_prior(flat)[2]
    for k in range(7):
        r = int(m.rounds[k])  # slot k+1 in round ceil((k+1)/alpha)
        assert r == math.ceil((k + 1) / 2.0)
        want = v[k, r - 1] * torch.prod(1 - v[k, :r - 1])
        assert pi[k].item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.equal(mask.sum(-1).long(), torch.as_tensor(m.rounds))


# --------------------------------------------------------------------------- Gibbs conditionals
def _joint(m, counts, z, w, phi, probs):
    """log p(x, z | w, phi, pi) from scratch (the Poisson pmf and the row prior)."""
    rate = (z * w) @ phi
    lik = torch.where(counts > 0, counts * torch.log(rate.clamp_min(1e-300)), torch.zeros_like(rate)) - rate \
        - torch.lgamma(counts + 1)
    lik = torch.where((rate == 0) & (counts > 0), torch.full_like(lik, -math.inf), lik)
    if m.num_active is None:
        prior = dist.Bernoulli(probs=probs).to_event(1).log_prob(z)
    else:
        prior = RestrictedBernoulliRows(probs, m.num_active).log_prob(z)
    return lik.sum() + prior.sum()


@pytest.mark.parametrize("prior", ["3ibp", "restricted-3ibp"])
def test_gibbs_z_conditional_equals_enumeration_of_the_joint(prior):
    torch.manual_seed(6)
    N, D, K = 3, 4, 3
    m = SparseIBPFactorization(K, prior=prior)
    counts = torch.poisson(torch.full((N, D), 2.0, dtype=torch.float64))
    z = (torch.rand(N, K, dtype=torch.float64) < 0.6).double()
    z[:, 0] = 1.0
    w = torch.rand(N, K, dtype=torch.float64) + 0.5
    phi = torch.rand(K, D, dtype=torch.float64) + 0.1
    probs = torch.tensor([0.6, 0.3, 0.45], dtype=torch.float64)
    for k in range(K):
        got = m.gibbs_z_log_odds(counts, z, w, phi, probs, k)
        for n in range(N):
            z1, z0 = z.clone(), z.clone()
            z1[n, k], z0[n, k] = 1.0, 0.0
            want = _joint(m, counts, z1, w, phi, probs) - _joint(m, counts, z0, w, phi, probs)
            if math.isinf(want.item()):
                assert got[n].item() == want.item()
            else:
                assert got[n].item() == pytest.approx(want.item(), abs=1e-9)


@pytest.mark.parametrize("prior", ["ibp", "3ibp", "restricted-3ibp"])
def test_stick_target_differences_equal_the_row_law(prior):
    """The Metropolis target of the sticks, log p(Z | pi) up to constants, against the rows' law."""
    torch.manual_seed(7)
    m = SparseIBPFactorization(5, prior=prior)
    Z = (torch.rand(20, 5, dtype=torch.float64) < 0.4).double()
    hist = torch.bincount(Z.sum(1).long(), minlength=6).double()
    p1 = torch.tensor([0.7, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    p2 = torch.tensor([0.6, 0.55, 0.2, 0.25, 0.05], dtype=torch.float64)

    def exact(p):
        return m._rows_dist(p).log_prob(Z).sum()

    got = m._log_p_z_given_probs(p1, Z.sum(0), 20, hist).sum() - m._log_p_z_given_probs(p2, Z.sum(0), 20, hist).sum()
    assert got.item() == pytest.approx((exact(p1) - exact(p2)).item(), abs=1e-10)


# --------------------------------------------------------------------------- recovery
@pytest.mark.slow
def test_gibbs_recovers_simulated_features_and_their_number():
    counts, truth = SparseIBPFactorization.simulate(num_rows=100, num_items=40, num_features=4, seed=0)
    m = SparseIBPFactorization(8, prior="3ibp", alpha=1.0, weight_shape=2.0, weight_rate=0.5)
    fit = m.fit_gibbs(counts, num_steps=300, warmup=150, seed=1, progress=False)
    post = fit.feature_count_posterior()
    mode = max(post, key=post.get)
    assert abs(mode - 4) <= 1, post
    phi = fit.loadings_mean()[fit.active_features()]
    cos = torch.nn.functional.normalize(truth["loadings"], dim=1) @ torch.nn.functional.normalize(phi, dim=1).T
    r, c = linear_sum_assignment(-cos.numpy())
    assert len(r) == 4 and np.all(cos.numpy()[r, c] >= 0.8), cos
    # what users read off a fit
    labels = [f"item{d}" for d in range(40)]
    top = fit.top_items(labels, num_items=3)
    assert top and all(len(items) == 3 and isinstance(items[0][0], str) for _, items in top)
    rec = fit.reconstruction()
    assert rec.shape == counts.shape and torch.all(rec >= 0)
    # reconstruction explains the counts far better than the row means
    base = counts.mean(1, keepdim=True).expand_as(counts)
    assert ((rec - counts) ** 2).mean() < 0.2 * ((base - counts) ** 2).mean()
    assert 0.0 < fit.zero_loading_fraction() < 1.0
    ll = fit.heldout_log_likelihood(counts, scale=1.0)
    assert math.isfinite(ll)
    import matplotlib
    matplotlib.use("Agg")
    assert fit.plot_features() is not None and fit.plot_loadings(int(fit.active_features()[0]), labels) is not None
    assert fit.plot_feature_count() is not None


def test_heldout_log_likelihood_is_the_log_posterior_predictive():
    counts, _ = SparseIBPFactorization.simulate(num_rows=20, num_items=10, num_features=2, seed=3)
    m = SparseIBPFactorization(4, prior="ibp")
    fit = m.fit_gibbs(counts, num_steps=20, warmup=10, seed=0, progress=False)
    from scipy.stats import poisson
    test = torch.poisson(torch.full_like(counts, 0.5))
    rates = [0.25 * (zw @ phi).numpy() for zw, phi in zip(fit.zw, fit.loadings)]
    from scipy.special import logsumexp
    logpmf = np.stack([poisson.logpmf(test.numpy(), r + np.finfo(np.float64).eps) for r in rates])
    want = (logsumexp(logpmf, axis=0) - np.log(len(rates))).sum() / test.sum().item()
    assert fit.heldout_log_likelihood(test, scale=0.25) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- Pyro programs
def test_model_and_guides_run_under_svi_with_minibatches():
    pyro.clear_param_store()
    counts, _ = SparseIBPFactorization.simulate(num_rows=30, num_items=8, num_features=2, seed=1)
    m = SparseIBPFactorization(4, prior="restricted-3ibp", binary_guide="relaxed")
    svi = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    losses = [svi.step(counts, subsample_size=10) for _ in range(300)]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-50:]) < np.mean(losses[:50])  # measured 1656 -> 1070
    tr = pyro.poutine.trace(m.model).get_trace(counts, subsample_size=10)
    assert tr.nodes["z"]["value"].shape == (10, 4) and tr.nodes["x"]["value"].shape == (10, 8)
    assert set(n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
               and n != "rows") == {"v", "phi_on", "phi_slab", "z", "w"}


def test_gflownet_em_fits_with_the_continuous_guide():
    import ppl_lvm

    pyro.clear_param_store()
    counts, _ = SparseIBPFactorization.simulate(num_rows=10, num_items=5, num_features=2, seed=2)
    m = SparseIBPFactorization(2, prior="ibp", point_estimates=("loadings",))
    fit = ppl_lvm.GFlowNetEM(m.model, m.continuous_guide, num_particles=4, hidden=(16,)).run(counts, num_steps=30)
    assert np.all(np.isfinite(fit.losses))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1.0, -1.0]]), "negative"),
    (torch.tensor([[1.0, 0.5]]), "integer"),
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
    (torch.tensor([1.0, 2.0]), "2-D"),
    ("abc", "tensor"),
])
def test_bad_counts_are_refused_before_any_work(bad, match):
    m = SparseIBPFactorization(3)
    with pytest.raises((ValueError, TypeError), match=match):
        m.fit_gibbs(bad, num_steps=2)
    with pytest.raises((ValueError, TypeError), match=match):
        m.model(bad)
    assert m.num_items is None  # nothing was built


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_features_max=0), ValueError, "num_features_max"),
    (dict(num_features_max=2.5), TypeError, "num_features_max"),
    (dict(num_features_max=3, prior="4ibp"), ValueError, "prior"),
    (dict(num_features_max=3, prior="ibp", discount=0.3), ValueError, "one-parameter"),
    (dict(num_features_max=3, discount=1.0), ValueError, "discount"),
    (dict(num_features_max=3, concentration=-0.5, discount=0.2), ValueError, "concentration"),
    (dict(num_features_max=3, alpha=0.0), ValueError, "alpha"),
    (dict(num_features_max=3, num_active=dist.Poisson(torch.tensor(2.0))), ValueError, "restricted"),
    (dict(num_features_max=3, prior="restricted-3ibp", num_active=3), TypeError, "num_active"),
    (dict(num_features_max=3, point_estimates=("loading",)), ValueError, "point_estimates"),
])
def test_bad_options_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseIBPFactorization(**kwargs)


def test_bad_prior_arguments_are_refused():
    with pytest.raises(ValueError, match="truncation"):
        IndianBuffet(2.0, 10, 0)
    with pytest.raises(ValueError, match="ordered"):
        IndianBuffet(2.0, 10, 5, concentration=2.0, construction="ordered")
    with pytest.raises(ValueError, match="probs"):
        IndianBuffet(2.0, 2, 3).log_prob(torch.zeros(2, 3))
    counts, _ = SparseIBPFactorization.simulate(num_rows=5, num_items=4, num_features=2, seed=0)
    with pytest.raises(ValueError, match="warmup"):
        SparseIBPFactorization(2).fit_gibbs(counts, num_steps=5, warmup=5)


# --------------------------------------------------------------------------- the stick moves
def _batch_means_se(x, num_batches=20):
    b = np.asarray(x).reshape(num_batches, -1).mean(1)
    return b.std(ddof=1) / math.sqrt(num_batches)


@pytest.mark.parametrize("prior, exact", [
    # K = 1: the stick's posterior given Z is conjugate
    ("ibp", lambda m, N: (2.0 + m, N - m + 1.0)),                      # nu ~ Beta(alpha, 1)
    ("3ibp", lambda m, N: (1 - 0.25 + m, 1.0 + 0.25 + N - m)),         # V_1 ~ Beta(1 - s, c + s)
    ("restricted-3ibp", lambda m, N: (1 - 0.25, 1.0 + 0.25)),          # p(z | pi) free of pi: the prior
])
def test_stick_metropolis_moves_target_the_exact_conditional(prior, exact):
    torch.manual_seed(8)
    m_ = SparseIBPFactorization(1, prior=prior, alpha=2.0)
    N, used = 30, 9
    Z = torch.zeros(N, 1, dtype=torch.float64)
    Z[:used] = 1.0
    if prior == "ibp":
        sticks, mask = torch.tensor([0.5], dtype=torch.float64), None
    else:
        sticks, mask = torch.tensor([[0.5]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    draws = []
    for _ in range(4000):
        sticks, _ = m_._update_sticks(sticks, mask, Z, 1.0, 1)
        draws.append(float(m_._gibbs_probs(sticks)[0]))
    draws = np.asarray(draws[1000:])
    a, b = exact(used, N)
    mean = a / (a + b)
    se = _batch_means_se(draws)
    assert abs(draws.mean() - mean) < 4 * se, (draws.mean(), mean, se)


def test_float32_counts_keep_float32_everywhere():
    counts, _ = SparseIBPFactorization.simulate(num_rows=15, num_items=6, num_features=2, seed=4, dtype=torch.float32)
    m = SparseIBPFactorization(3, prior="restricted-3ibp")
    tr = pyro.poutine.trace(m.model).get_trace(counts)
    assert all(s["value"].dtype == torch.float32 for s in tr.nodes.values()
               if s["type"] == "sample" and s["value"].is_floating_point())
    fit = m.fit_gibbs(counts, num_steps=10, warmup=5, seed=0, progress=False)
    assert fit.loadings[0].dtype == torch.float32 and np.all(np.isfinite(fit.log_likelihood_trace))
    idata = fit.to_inferencedata()
    assert idata.posterior["probs"].shape == (1, 5, 3)


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["ibp", "restricted-3ibp"])
def test_gibbs_recovery_with_the_other_priors(prior):
    counts, truth = SparseIBPFactorization.simulate(num_rows=100, num_items=40, num_features=4, seed=0)
    m = SparseIBPFactorization(8, prior=prior, alpha=1.0, weight_shape=2.0, weight_rate=0.5)
    fit = m.fit_gibbs(counts, num_steps=400, warmup=200, seed=1, progress=False)
    post = fit.feature_count_posterior()
    assert abs(max(post, key=post.get) - 4) <= 1, post
    phi = fit.loadings_mean()[fit.active_features()]
    cos = torch.nn.functional.normalize(truth["loadings"], dim=1) @ torch.nn.functional.normalize(phi, dim=1).T
    r, c = linear_sum_assignment(-cos.numpy())
    assert len(r) == 4 and np.all(cos.numpy()[r, c] >= 0.8), cos


def test_a_binding_truncation_is_flagged():
    counts, _ = SparseIBPFactorization.simulate(num_rows=40, num_items=12, num_features=3, seed=5)
    with pytest.warns(UserWarning, match="truncation binds"):
        SparseIBPFactorization(1, prior="3ibp").fit_gibbs(counts, num_steps=20, seed=0, progress=False)


@pytest.mark.parametrize("device", cuda_params())
def test_everything_follows_the_data_device(device):
    counts, _ = SparseIBPFactorization.simulate(num_rows=12, num_items=5, num_features=2, seed=6)
    counts = counts.to(device)
    m = SparseIBPFactorization(3, prior="restricted-3ibp").to(device)
    tr = pyro.poutine.trace(m.guide).get_trace(counts)
    tr_m = pyro.poutine.trace(pyro.poutine.replay(m.model, trace=tr)).get_trace(counts)
    assert all(s["value"].device.type == device for s in tr_m.nodes.values() if s["type"] == "sample"
               and torch.is_tensor(s["value"]))
    assert torch.isfinite(tr_m.log_prob_sum())
    fit = m.fit_gibbs(counts, num_steps=6, warmup=3, seed=0, progress=False)
    assert fit.loadings[0].device.type == device and fit.z[0].device.type == device
    ib = IndianBuffet(2.0, 4, 6, concentration=1.5, discount=0.3, num_active=dist.Poisson(torch.tensor(2.0, device=device)),
                      device=device)
    assert ib.sample((2,)).device.type == device


# --------------------------------------------------------------------------- the whole sampler
def _prior_state(m, N, D, like):
    K, kw = m.K, dict(dtype=like.dtype)
    alpha = None
    if m.alpha_prior is not None:
        alpha = float(torch.distributions.Gamma(torch.tensor(m.alpha_prior[0], **kw),
                                                torch.tensor(m.alpha_prior[1], **kw)).sample())
    if m.prior == "ibp":
        sticks = torch.distributions.Beta(torch.full((K,), m.alpha if alpha is None else alpha, **kw),
                                          torch.ones(K, **kw)).sample()
        mask = None
    else:
        a, b, mask = m._stick_matrix_prior(like)
        sticks = torch.distributions.Beta(a, b).sample()
    Z = m._rows_dist(m._gibbs_probs(sticks).expand(N, K)).sample()
    W = torch.distributions.Gamma(torch.full((N, K), m.weight_shape, **kw), torch.full((N, K), m.weight_rate, **kw)).sample()
    Bm = torch.bernoulli(torch.full((K, D), m.loading_density, **kw))
    G = torch.distributions.Gamma(torch.full((K, D), m.loading_shape, **kw),
                                  torch.full((K, D), m.loading_rate, **kw)).sample()
    return dict(Z=Z, W=W, Bm=Bm, G=G, sticks=sticks, stick_step=0.8, alpha=alpha), mask


def _state_stats(m, st):
    p = m._gibbs_probs(st["sticks"])
    out = [st["Z"].sum().item(), st["W"].mean().item(), st["Bm"].mean().item(), st["G"].mean().item(),
           p[0].item(), p.sum().item()]
    return out + ([st["alpha"]] if st["alpha"] is not None else [])


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["ibp", "3ibp", "restricted-3ibp", "ibp+alpha_prior"])
def test_gibbs_sweep_leaves_the_joint_invariant(prior):
    """Geweke's successive-conditional check: alternating x ~ p(x | state) and one Gibbs sweep
    (every move, relabeling included) must keep the state's prior as its marginal.  Six
    statistics against independent prior draws; SE from 20 batch means of the chain and the
    draws' sd; |z| < 4.5 each (18 comparisons).  A longer run of this check (2500 sweeps,
    20000 prior draws) found the restricted prior's stick move counting log p(Z | pi) K times
    (z = 3.6 on the first stick; fixed); at this test's size a bug of that size is not sure to
    reach 4.5, so the test guards against larger errors only."""
    from ppl_lvm.models.ibp import _num_active_log_pmf

    torch.manual_seed(0)
    N, D, K, T, burn = 3, 3, 3, 2000, 200
    hyper = dict(prior="ibp", alpha_prior=(3.0, 2.0)) if prior == "ibp+alpha_prior" else dict(prior=prior)
    m = SparseIBPFactorization(K, alpha=1.5, weight_shape=2.0, weight_rate=1.0, loading_shape=2.0,
                               loading_rate=1.0, loading_density=0.5, **hyper)
    like = torch.zeros(1, dtype=torch.float64)
    st, mask = _prior_state(m, N, D, like)
    log_f = _num_active_log_pmf(m.num_active, K, like) if m.num_active is not None else None
    chain = []
    for it in range(T):
        x = torch.poisson((st["Z"] * st["W"]) @ (st["Bm"] * st["G"]))
        nz, vals, tok_r, tok_c = m._prepare_counts(x)
        dat = dict(nz=nz, vals=vals, tok_r=tok_r, tok_c=tok_c, mask=mask, log_f=log_f, swap_pairs=K, stick_moves=2)
        m._gibbs_sweep(st, dat, it, relabel=True, adapt=False)
        chain.append(_state_stats(m, st))
    chain = np.asarray(chain[burn:])
    ref = np.asarray([_state_stats(m, _prior_state(m, N, D, like)[0]) for _ in range(4000)])
    nb = 20
    bm = chain[: len(chain) // nb * nb].reshape(nb, -1, chain.shape[1]).mean(1)
    se = np.sqrt(bm.var(0, ddof=1) / nb + ref.var(0, ddof=1) / len(ref))
    z = (chain.mean(0) - ref.mean(0)) / se
    assert np.all(np.abs(z) < 4.5), (chain.mean(0), ref.mean(0), z)



# --------------------------------------------------------------------------- the structured guide
def _set_params(m, constraint_of, **values):
    """Set a module's guide parameters before its first use (PyroParams of the module)."""
    from pyro.nn import PyroParam

    for name, value in values.items():
        setattr(m, name, PyroParam(value, constraint=constraint_of[name]))


_POS, _REAL = dist.constraints.positive, dist.constraints.real
_CONSTRAINT = {"q_z_logits": _REAL, "q_on_logits": _REAL, "q_w_shape": _POS, "q_w_rate": _POS,
               "q_slab_shape": _POS, "q_slab_rate": _POS}


def _gamma_expect(shapes, rates, f, num_nodes):
    r"""E f(X_1, ..., X_m) for independent X_i ~ Gamma(shape_i, rate_i): the trapezoid rule with
    ``num_nodes`` nodes per variable in y_i = log X_i on
    [log(a/b) - max(24/a, 8/sqrt(a)), log(a/b) + max(4, 8/sqrt(a))] (the density of log X,
    b^a e^(a y - b e^y) / Gamma(a), is analytic in the strip |Im y| < pi/2, so the rule converges
    exponentially; the cut tails hold about e^-24 of the mass).  Summed slice by slice over the
    first variable."""
    from scipy.special import gammaln

    grids, logw = [], []
    for a, b in zip(shapes, rates):
        c = math.log(a / b)
        y = np.linspace(c - max(24.0 / a, 8.0 / math.sqrt(a)), c + max(4.0, 8.0 / math.sqrt(a)), num_nodes)
        h = y[1] - y[0]
        grids.append(np.exp(y))
        logw.append(math.log(h) + a * math.log(b) + a * y - b * np.exp(y) - gammaln(a))
    rest = np.meshgrid(*grids[1:], indexing="ij")
    w_rest = np.exp(sum(np.meshgrid(*logw[1:], indexing="ij"))) if len(grids) > 1 else 1.0
    return float(sum(math.exp(lw0) * (w_rest * f(x0, *rest)).sum() for x0, lw0 in zip(grids[0], logw[0])))


def _exact_elbo(m, counts, probs, q, structured, num_nodes=40):
    r"""ELBO of the (structured or mean-field) guide on the model with fixed probs, latent z, w,
    phi_on, phi_slab: enumeration of the binary sites (z, phi_on), closed forms of the Gamma
    terms (KL, E rate, E log of one product), quadrature for E log of a sum of two products."""
    from scipy.special import digamma

    N, D = counts.shape
    K = m.K
    aw, bw, ap, bp = m.weight_shape, m.weight_rate, m.loading_shape, m.loading_rate
    qz = torch.sigmoid(q["q_z_logits"]).numpy()
    qo = torch.sigmoid(q["q_on_logits"]).numpy()
    wa, wb = q["q_w_shape"].numpy(), q["q_w_rate"].numpy()
    sa, sb = q["q_slab_shape"].numpy(), q["q_slab_rate"].numpy()
    x = counts.numpy()
    fl = np.finfo(np.float64).eps

    def kl_gamma(a, b, a0, b0):
        return float(torch.distributions.kl_divergence(torch.distributions.Gamma(torch.tensor(a), torch.tensor(b)),
                                                       torch.distributions.Gamma(torch.tensor(a0), torch.tensor(b0))))

    kl_w = np.array([[kl_gamma(wa[n, k], wb[n, k], aw, bw) for k in range(K)] for n in range(N)])
    kl_s = np.array([[kl_gamma(sa[k, d], sb[k, d], ap, bp) for d in range(D)] for k in range(K)])
    # E log(sum_{k in S} w_nk g_kd + eps) per cell and active set S (K = 2)
    assert K == 2
    elog = {}
    for n in range(N):
        for d in range(D):
            elog[n, d, ()] = math.log(fl)
            for k in range(K):
                elog[n, d, (k,)] = digamma(wa[n, k]) - math.log(wb[n, k]) + digamma(sa[k, d]) - math.log(sb[k, d])
            elog[n, d, (0, 1)] = _gamma_expect(
                [wa[n, 0], sa[0, d], wa[n, 1], sa[1, d]], [wb[n, 0], sb[0, d], wb[n, 1], sb[1, d]],
                lambda w0, g0, w1, g1: np.log(w0 * g0 + w1 * g1 + fl), num_nodes)
    ew, es = wa / wb, sa / sb
    total = 0.0
    for zc in itertools.product([0, 1], repeat=N * K):
        z = np.asarray(zc, dtype=np.float64).reshape(N, K)
        lq_z = np.log(np.where(z > 0, qz, 1 - qz)).sum()
        lp_z = np.log(np.where(z > 0, probs, 1 - probs)).sum()
        for oc in itertools.product([0, 1], repeat=K * D):
            on = np.asarray(oc, dtype=np.float64).reshape(K, D)
            lq_o = np.log(np.where(on > 0, qo, 1 - qo)).sum()
            lp_o = np.log(np.where(on > 0, m.loading_density, 1 - m.loading_density)).sum()
            lik = 0.0
            for n in range(N):
                for d in range(D):
                    act = tuple(k for k in range(K) if z[n, k] * on[k, d] > 0)
                    rate = sum(ew[n, k] * es[k, d] for k in act) + fl
                    lik += x[n, d] * elog[n, d, act] - rate - math.lgamma(x[n, d] + 1)
            kl = (kl_w * (z if structured else 1.0)).sum() + (kl_s * (on if structured else 1.0)).sum()
            total += math.exp(lq_z + lq_o) * (lp_z - lq_z + lp_o - lq_o + lik - kl)
    return total


def test_gamma_quadrature_matches_the_closed_form():
    """The quadrature of the exact-ELBO check against E log(w g) = psi(a) - log b + psi(c) - log d."""
    from scipy.special import digamma

    for a, b in [((2.5, 4.0), (1.5, 3.0)), ((20.0, 12.0), (8.0, 4.0))]:
        got = _gamma_expect(a, b, lambda w, g: np.log(w * g), 40)
        assert _gamma_expect(a, b, lambda w, g: np.ones_like(w), 40) == pytest.approx(1.0, abs=1e-8)
        assert got == pytest.approx(digamma(a[0]) - math.log(b[0]) + digamma(a[1]) - math.log(b[1]), abs=1e-7)


def _elbo_case(guide_family):
    pyro.clear_param_store()
    counts = torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64)
    probs = torch.tensor([0.6, 0.35], dtype=torch.float64)
    m = SparseIBPFactorization(2, prior="3ibp", loading_density=0.4, weight_shape=1.5, weight_rate=1.0,
                               loading_shape=2.0, loading_rate=1.5, fixed_values={"probs": probs},
                               guide_family=guide_family)
    q = {"q_z_logits": torch.tensor([[0.4, -0.3], [-0.8, 1.1]], dtype=torch.float64),
         "q_on_logits": torch.tensor([[0.5, -0.2], [1.0, -1.3]], dtype=torch.float64),
         "q_w_shape": torch.tensor([[20.0, 12.0], [15.0, 25.0]], dtype=torch.float64),
         "q_w_rate": torch.tensor([[8.0, 4.0], [10.0, 8.0]], dtype=torch.float64),
         "q_slab_shape": torch.tensor([[15.0, 10.0], [12.0, 20.0]], dtype=torch.float64),
         "q_slab_rate": torch.tensor([[6.0, 12.0], [5.0, 9.0]], dtype=torch.float64)}
    _set_params(m, _CONSTRAINT, **q)
    return m, counts, probs, q


@pytest.mark.parametrize("guide_family", ["structured", "mean-field"])
def test_guide_elbo_equals_enumeration_and_quadrature(guide_family):
    r"""Pyro's Trace_ELBO (Monte Carlo, 20 batches of 2000 vectorized particles) on the model with
    fixed probs equals the exact ELBO of the guide (enumeration of the 2^8 binary configurations,
    closed-form Gamma terms, quadrature) within 4 SE of the batch means.  The two families differ
    by sum_nk q(z_nk = 0) KL_nk + sum_kd q(b_kd = 0) KL_kd (here 3.8 nats, beyond 8 SE),
    so a structured guide that learned the slab of a switched-off spike would fail."""
    m, counts, probs, q = _elbo_case(guide_family)
    exact = _exact_elbo(m, counts, probs.numpy(), q, structured=guide_family == "structured")
    other = _exact_elbo(m, counts, probs.numpy(), q, structured=guide_family != "structured")
    # the quadrature has converged (40 vs 56 nodes per variable), far below the Monte Carlo SE
    assert exact == pytest.approx(_exact_elbo(m, counts, probs.numpy(), q, guide_family == "structured", 56),
                                  abs=1e-7)
    torch.manual_seed(0)
    elbo = pyro.infer.Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    batches = np.array([-elbo.loss(m.model, m.guide, counts) for _ in range(20)])
    se = batches.std(ddof=1) / math.sqrt(len(batches))
    assert abs(batches.mean() - exact) < 4 * se, (batches.mean(), exact, se)
    # the other family's ELBO lies beyond 8 SE: an estimate centred there would fail the 4-SE check
    # (measured: 3.80 nats apart, SE 0.35)
    assert abs(other - exact) > 8 * se, (other, exact, se)


def test_structured_guide_draws_switched_off_slabs_from_the_prior():
    m, counts, _, q = _elbo_case("structured")
    torch.manual_seed(1)
    tr = pyro.poutine.trace(m.guide).get_trace(counts)
    z, on = tr.nodes["z"]["value"], tr.nodes["phi_on"]["value"]
    for site, spike, prior, learned in [("w", z, (1.5, 1.0), ("q_w_shape", "q_w_rate")),
                                        ("phi_slab", on, (2.0, 1.5), ("q_slab_shape", "q_slab_rate"))]:
        fn = tr.nodes[site]["fn"].base_dist
        for attr, pv, lv in [("concentration", prior[0], q[learned[0]]), ("rate", prior[1], q[learned[1]])]:
            want = torch.where(spike > 0.5, lv, torch.full_like(lv, pv))
            assert torch.allclose(getattr(fn, attr), want, atol=1e-12), (site, attr)
    assert set(tr.stochastic_nodes) >= {"z", "w", "phi_on", "phi_slab"} and "v" not in tr.nodes


_P = torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(guide_family="full"), ValueError, "guide_family"),
    (dict(fixed_values=[1.0]), TypeError, "fixed_values must be a dict"),
    (dict(fixed_values={"sticks": _P}), ValueError, "fixed_values keys"),
    (dict(fixed_values={"probs": [0.5, 0.4, 0.3]}), TypeError, "floating-point tensor"),
    (dict(fixed_values={"probs": _P[:2]}), ValueError, r"shape \(K,\)"),
    (dict(fixed_values={"probs": torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64)}), ValueError, r"\(0, 1\)"),
    (dict(fixed_values={"probs": torch.tensor([0.5, float("nan"), 0.3])}), ValueError, "NaN"),
    (dict(fixed_values={"weights": -torch.ones(4, 3)}), ValueError, "> 0"),
    (dict(fixed_values={"loadings": torch.ones(2, 5)}), ValueError, r"\(K, num_items\)"),
    (dict(fixed_values={"loadings": -torch.ones(3, 5)}), ValueError, ">= 0"),
    (dict(fixed_values={"probs": _P}, point_estimates=("sticks",)), ValueError, "one or the other"),
])
def test_bad_fixed_values_and_guide_family_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseIBPFactorization(3, **kwargs)


def test_fixed_values_are_constants_checked_against_the_data():
    counts, _ = SparseIBPFactorization.simulate(num_rows=4, num_items=5, num_features=2, seed=0)
    fixed = {"probs": _P, "weights": torch.ones(4, 3, dtype=torch.float64), "loadings": torch.ones(3, 5)}
    m = SparseIBPFactorization(3, fixed_values=fixed)
    tr = pyro.poutine.trace(m.model).get_trace(counts)
    assert {n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]} == {"rows", "z"}
    assert not list(m.parameters()) and {b for b, _ in m.named_buffers()} == {"fixed_probs", "fixed_weights",
                                                                            "fixed_loadings"}
    assert {n for n, s in pyro.poutine.trace(m.guide).get_trace(counts).nodes.items() if s["type"] == "sample"} \
        == {"rows", "z"}
    with pytest.raises(ValueError, match="fixed_values"):
        m.fit_gibbs(counts, num_steps=2)
    with pytest.raises(ValueError, match="rows but counts has 6"):
        SparseIBPFactorization(3, fixed_values=fixed).model(torch.zeros(6, 5))
    with pytest.raises(ValueError, match="items"):
        SparseIBPFactorization(3, fixed_values=fixed).model(torch.zeros(4, 7))


# --------------------------------------------------------------------------- variational backends, exactly
def _enumerable_case():
    r"""Sticks, weights and loadings fixed; z the only latent.  The loadings have disjoint supports
    (items {0, 1} for feature 0, {2, 3} for feature 1), so each row's likelihood, hence its exact
    posterior, factorizes over the features and lies in the guide's (Bernoulli mean-field) family:
    every backend's optimal guide is the exact posterior."""
    f64 = dict(dtype=torch.float64)
    counts = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 2, 1, 0]], **f64)
    fixed = {"probs": torch.tensor([0.5, 0.3], **f64),
             "weights": torch.tensor([[1.0, 0.8], [1.2, 1.0], [0.7, 1.5], [1.0, 1.0]], **f64),
             "loadings": torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.5, 0.3]], **f64)}
    return counts, fixed


def _exact_z_posterior(counts, fixed):
    """Per row: log p(x_n, z_n) over the 2^K rows z_n (the model's eps floor on the rate), the
    posterior marginals P(z_nk = 1 | x) and log p(x), by enumeration."""
    probs, w, phi = fixed["probs"], fixed["weights"], fixed["loadings"]
    rows = _all_rows(probs.shape[0])
    lp = (rows * probs.log() + (1 - rows) * torch.log1p(-probs)).sum(-1)
    rate = (rows[None] * w[:, None]) @ phi + torch.finfo(torch.float64).eps
    joint = torch.distributions.Poisson(rate).log_prob(counts[:, None]).sum(-1) + lp  # (N, 2^K)
    post = (joint - joint.logsumexp(-1, keepdim=True)).exp()
    return rows, joint, (post[..., None] * rows).sum(1), float(joint.logsumexp(-1).sum())


@pytest.mark.parametrize("backend, options, marginal_tol", [
    ("svi", dict(num_particles=16, vectorize_particles=True), 0.05),
    # IWAE: the bound's gradient in q flattens as q approaches the posterior (Rainforth et al.
    # 2018) and q wanders: max error 0.039, 0.050, 0.12, 0.097, 0.091 at seeds 0-4 after 1000
    # steps, still 0.067, 0.057 after 4000; only "q moved most of the way" is checked here, and
    # IWAE's answer, its importance-resampled draws, is checked exactly below
    ("iwae", {}, 0.15),
    ("chi2_vis", {}, 0.05),
])
def test_variational_backends_find_the_exact_posterior_and_evidence(backend, options, marginal_tol):
    r"""``ppl_lvm.fit`` with the IBP model and its guide on the enumerable case (1000 steps of
    Adam(0.05), seed 0), against the exact posterior by enumeration:

    * the fitted guide's q(z_nk = 1) against the exact marginals.  The tolerances are for an
      optimizer's output, not a Monte Carlo estimate (measured max errors at seeds 0-4: svi
      0.008, 0.027, 0.008, 0.033, 0.016; chi2_vis 0.001, 0.003, 0.004, 0.003, 0.002), below the
      gap to the prior (|p(z=1|x) - pi| >= 0.11) and to the guide's start (sigmoid(3) = 0.95:
      >= 0.6 away on the moderate entries);
    * IWAE and chi^2-VIS return importance-resampled draws (``draws="resampled"``): their
      marginals from 4000 draws within 4 SE, SE^2 = p(1 - p)(1/S + 1/ESS) (resampling plus
      the self-normalized weights, Kish's ESS of 4000 fresh weights per row); entries whose
      posterior is 1 up to e^-36 must come out exactly 1;
    * ``Fit.log_evidence(2000)`` against the exact log p(x) = -13.3435 within 4 of its SEs."""
    import ppl_lvm

    counts, fixed = _enumerable_case()
    rows, joint, marg, log_px = _exact_z_posterior(counts, fixed)
    assert float((marg - fixed["probs"]).abs().min()) >= 0.11
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    m = SparseIBPFactorization(2, prior="3ibp", fixed_values=fixed)
    fit = ppl_lvm.fit(m.model, m.guide, counts, backend=backend, num_steps=1000,
                      optim=pyro.optim.Adam({"lr": 0.05}), progress=False, **options)
    q = torch.sigmoid(m.q_z_logits).detach()
    assert float((q - marg).abs().max()) < marginal_tol, (q, marg)
    if backend != "svi":
        S = 4000
        draws = fit.posterior_samples(S)["z"].to(torch.float64)
        assert draws.shape == (S, 4, 2)
        lw = fit.backend.log_weights(counts, num_particles=S).local  # (S, rows)
        ess = torch.exp(2 * lw.logsumexp(0) - (2 * lw).logsumexp(0))
        sure = (1 - marg) < 1e-12
        assert torch.all(draws.mean(0)[sure] == 1.0)
        p = marg[~sure]
        se = (p * (1 - p) * (1.0 / S + 1.0 / ess[:, None].expand_as(marg)[~sure])).sqrt()
        zscore = (draws.mean(0)[~sure] - p) / se
        assert torch.all(zscore.abs() < 4), (draws.mean(0), marg, zscore)
    ev = fit.log_evidence(2000)
    assert abs(ev.log_evidence - log_px) < 4 * ev.stderr, (ev, log_px)


def test_straight_through_binary_guide_under_svi_on_the_enumerable_case():
    r"""``binary_guide="relaxed"`` (:class:`ppl_lvm.distributions.StraightThroughBernoulli`) is a
    discrete guide that the backends accept at ``z``.  Its draws and log q are exact, so the SVI
    fit's ``log_evidence`` is unbiased for the exact log p(x) (within 4 of its SEs); its gradient
    is a biased surrogate, so the fitted marginals are held only to the optimizer tolerance of the
    score-function case (0.05; measured max errors 0.010, 0.013, 0.021 at seeds 0-2, against
    0.008, 0.027, 0.008 with the score-function guide)."""
    import ppl_lvm

    counts, fixed = _enumerable_case()
    _, _, marg, log_px = _exact_z_posterior(counts, fixed)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    m = SparseIBPFactorization(2, prior="3ibp", fixed_values=fixed, binary_guide="relaxed")
    fit = ppl_lvm.fit(m.model, m.guide, counts, backend="svi", num_steps=1000, optim=pyro.optim.Adam({"lr": 0.05}),
                      progress=False, num_particles=16, vectorize_particles=True)
    assert isinstance(pyro.poutine.trace(m.guide).get_trace(counts).nodes["z"]["fn"].base_dist,
                      ppl_lvm.distributions.StraightThroughBernoulli)
    q = torch.sigmoid(m.q_z_logits).detach()
    assert float((q - marg).abs().max()) < 0.05, (q, marg)
    ev = fit.log_evidence(2000)
    assert abs(ev.log_evidence - log_px) < 4 * ev.stderr, (ev, log_px)


def _full_latent_exact_log_evidence(x, alpha, rho, aw, bw, ap, bp):
    r"""log p(x) of the full-latent model (``prior="ibp"``, K = 1, N rows, one item: sites ``nu``,
    ``phi_on``, ``phi_slab``, ``z``, ``w`` all latent), exactly: the weights integrate in closed
    form (Gamma-Poisson: negative binomial), the stick through the Beta moments
    :math:`E[\nu^j (1-\nu)^k]` of the product over rows (a polynomial in :math:`\nu`), the spike
    by summation and the slab by adaptive quadrature (scipy ``quad``, relative 1e-12)."""
    import itertools

    from scipy import integrate, special

    e = np.finfo(np.float64).eps
    off_row = [math.exp(-e + v * math.log(e) - special.gammaln(v + 1)) for v in x]  # rate eps

    def on_row(v, c):
        return math.exp(special.gammaln(v + aw) - special.gammaln(aw) - special.gammaln(v + 1)
                        + aw * math.log(bw / (bw + c)) + v * math.log(c / (bw + c)))

    def rows(on):  # E_nu prod_n [(1 - nu) A_n + nu B_n]
        total = 0.0
        for zs in itertools.product((0, 1), repeat=len(x)):
            j = sum(zs)
            term = math.exp(special.betaln(alpha + j, 1 + len(x) - j) - special.betaln(alpha, 1))
            for n, zn in enumerate(zs):
                term *= on[n] if zn else off_row[n]
            total += term
        return total

    def slab(g):
        return math.exp(ap * math.log(bp) - special.gammaln(ap) + (ap - 1) * math.log(g) - bp * g)

    on = integrate.quad(lambda g: slab(g) * rows([on_row(v, g) for v in x]), 0, np.inf, epsabs=0,
                        epsrel=1e-12, limit=200)[0]
    return math.log((1 - rho) * rows(off_row) + rho * on)


@pytest.mark.slow  # 15 s + 19 s; the z-latent enumerable case stays in the default suite
@pytest.mark.parametrize("backend", ["svi", "iwae"])
def test_full_latent_model_and_structured_guide_give_the_exact_evidence(backend):
    r"""Every site latent (stick, spike, slab, z, w), structured guide, fitted by ``ppl_lvm.fit``
    (2000 steps of Adam(0.02), seed 0): the importance-sampling ``log_evidence(20000)`` with the
    fitted guide as proposal equals the exact log p(x) (-5.3709, quadrature above) within 4 of its
    SEs (measured -5.3736 ± 0.0224 svi, -5.3643 ± 0.0095 iwae), with k-hat below 0.7 (0.65,
    0.49); the objective's mean over the last 200 steps is not significantly above log p(x)
    (ELBO -6.59, IWAE bound -5.46)."""
    import ppl_lvm

    alpha, rho, aw, bw, ap, bp = 2.0, 0.5, 2.0, 1.0, 2.0, 1.0
    x = [3.0, 1.0]
    log_px = _full_latent_exact_log_evidence(x, alpha, rho, aw, bw, ap, bp)
    counts = torch.tensor(x, dtype=torch.float64).reshape(2, 1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    m = SparseIBPFactorization(1, prior="ibp", alpha=alpha, loading_density=rho, weight_shape=aw, weight_rate=bw,
                               loading_shape=ap, loading_rate=bp)
    fit = ppl_lvm.fit(m.model, m.guide, counts, backend=backend, num_steps=2000,
                      optim=pyro.optim.Adam({"lr": 0.02}), progress=False)
    ev = fit.log_evidence(20000)
    assert ev.khat < 0.7, ev
    assert abs(ev.log_evidence - log_px) < 4 * ev.stderr, (ev, log_px)
    last = -np.asarray(fit.losses[-200:])
    # a bound: not significantly above log p(x)
    assert last.mean() - 4 * last.std() / math.sqrt(len(last)) < log_px, (last.mean(), last.std(), log_px)


def test_gibbs_z_conditional_is_exact_when_one_contribution_is_below_rounding():
    """A count explained by feature 0 (rate 1) and feature 1 (rate 1e-17, below float64 rounding
    of the sum): the log odds of z_n0 = 1 must be the finite x log((1 + 1e-17) / 1e-17) of the
    joint, not +inf (the incremental rate minus feature 0's term rounds to 0; an exact-zero rate
    is then taken for 'no other feature explains the count').  The same rounding residue, taken
    for a true rate, let the one-parameter sampler at K = 80 on Reuters reach a count of rate 0
    (multinomial allocation error)."""
    m = SparseIBPFactorization(2, prior="3ibp")
    f64 = dict(dtype=torch.float64)
    counts = torch.tensor([[2.0, 0.0]], **f64)
    z = torch.ones(1, 2, **f64)
    w = torch.ones(1, 2, **f64)
    phi = torch.tensor([[1.0, 0.5], [1e-17, 0.0]], **f64)
    probs = torch.tensor([0.6, 0.3], **f64)
    got = m.gibbs_z_log_odds(counts, z, w, phi, probs, 0)
    z0 = z.clone()
    z0[0, 0] = 0.0
    want = _joint(m, counts, z, w, phi, probs) - _joint(m, counts, z0, w, phi, probs)
    assert math.isfinite(want.item()) and got[0].item() == pytest.approx(want.item(), abs=1e-9)


# --------------------------------------------------------------------------- the hyperprior on alpha
def test_alpha_hyperprior_moves_target_the_exact_joint_of_stick_and_mass():
    r"""K = 1, Z fixed (m of N rows on): the stick move with the current alpha, then the conjugate
    draw alpha | nu ~ Gamma(a0 + 1, b0 - log nu), must leave p(nu, alpha | Z) invariant.  With alpha
    integrated out, p(nu | Z) is proportional to nu^(m-1) (1-nu)^(N-m) / (b0 - log nu)^(a0+1), and
    E[alpha | Z] = E[(a0 + 1) / (b0 - log nu)]: both by 1-D quadrature; the chain's means within 4
    batch-means SE."""
    from scipy.integrate import quad

    a0, b0, N, used = 20.0, 2.0, 30, 9  # prior mean alpha 10: far from the starting alpha = 1
    dens = lambda v: v ** (used - 1) * (1 - v) ** (N - used) / (b0 - math.log(v)) ** (a0 + 1)
    norm = quad(dens, 0, 1, epsabs=0, epsrel=1e-12)[0]
    mean_nu = quad(lambda v: v * dens(v), 0, 1, epsabs=0, epsrel=1e-12)[0] / norm
    mean_alpha = quad(lambda v: (a0 + 1) / (b0 - math.log(v)) * dens(v), 0, 1, epsabs=0, epsrel=1e-12)[0] / norm
    torch.manual_seed(9)
    m = SparseIBPFactorization(1, prior="ibp", alpha=1.0, alpha_prior=(a0, b0))
    Z = torch.zeros(N, 1, dtype=torch.float64)
    Z[:used] = 1.0
    sticks, alpha = torch.tensor([0.5], dtype=torch.float64), 1.0
    draws = []
    for _ in range(4000):
        sticks, _ = m._update_sticks(sticks, None, Z, 1.0, 1, alpha)
        alpha = m._sample_alpha(sticks)
        draws.append((float(sticks[0]), alpha))
    draws = np.asarray(draws[1000:])
    for j, want in enumerate([mean_nu, mean_alpha]):
        se = _batch_means_se(draws[:, j])
        assert abs(draws[:, j].mean() - want) < 4 * se, (j, draws[:, j].mean(), want, se)
    # and the hyperprior matters: the fixed-alpha chain's target mean of nu differs by > 8 SE
    assert abs(mean_nu - (1.0 + used) / (1.0 + N + 1)) > 8 * _batch_means_se(draws[:, 0])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(prior="3ibp", alpha_prior=(2.0, 1.0)), ValueError, "prior='ibp'"),
    (dict(prior="ibp", alpha_prior=2.0), TypeError, "pair"),
    (dict(prior="ibp", alpha_prior=(2.0, -1.0)), ValueError, "alpha_prior rate"),
])
def test_bad_alpha_prior_is_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseIBPFactorization(3, **kwargs)


def test_alpha_hyperprior_draws_are_kept_and_the_pyro_programs_refuse_it():
    counts, _ = SparseIBPFactorization.simulate(num_rows=15, num_items=6, num_features=2, seed=7)
    m = SparseIBPFactorization(4, prior="ibp", alpha_prior=(2.0, 1.0))
    with pytest.raises(ValueError, match="fit_gibbs only"):
        m.model(counts)
    with pytest.raises(ValueError, match="fit_gibbs only"):
        m.guide(counts)
    fit = m.fit_gibbs(counts, num_steps=12, warmup=6, seed=0, progress=False)
    assert fit.alpha.shape == (6,) and np.all(fit.alpha > 0) and len(set(fit.alpha.tolist())) > 1
    assert fit.to_inferencedata().posterior["alpha"].shape == (1, 6)
    assert SparseIBPFactorization(4, prior="ibp").fit_gibbs(counts, num_steps=4, seed=0, progress=False).alpha is None
