"""ppl_lvm.distributions: the straight-through Bernoulli guide distribution."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lvm
from ppl_lvm.distributions import StraightThroughBernoulli, straight_through_as_bernoulli
from ppl_lvm.validation import check_model_guide


def test_draws_are_exact_bernoulli_draws_and_log_prob_is_the_pmf():
    torch.manual_seed(0)
    logits = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64)
    d = StraightThroughBernoulli(0.5, logits=logits)
    n = 40000
    z = d.sample((n,))
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logits)
    se = torch.sqrt(p * (1 - p) / n)
    assert torch.all((z.mean(0) - p).abs() <= 4 * se), (z.mean(0), p)
    value = z[:10]
    assert torch.allclose(d.log_prob(value), dist.Bernoulli(logits=logits).log_prob(value), atol=1e-12)
    assert d.support.is_discrete and d.has_rsample


def test_gradient_is_the_binary_concrete_one_passed_straight_through():
    logits = torch.tensor([-1.0, 0.3, 2.5], dtype=torch.float64, requires_grad=True)
    T = 0.4
    torch.manual_seed(3)
    z = StraightThroughBernoulli(T, logits=logits).rsample()
    z.sum().backward()
    torch.manual_seed(3)
    fl = torch.finfo(torch.float64).tiny
    u = torch.rand(3, dtype=torch.float64).clamp(fl, 1 - fl)
    noisy = logits.detach() + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(noisy / T)
    assert torch.equal(z.detach(), (noisy > 0).double())
    assert torch.allclose(logits.grad, soft * (1 - soft) / T, atol=1e-12)


def test_expand_keeps_the_class_and_temperature_and_bad_temperatures_are_refused():
    d = StraightThroughBernoulli(0.3, probs=torch.tensor([0.2, 0.7])).expand((4, 2))
    assert isinstance(d, StraightThroughBernoulli) and float(d.temperature) == pytest.approx(0.3)
    assert d.rsample().shape == (4, 2)
    for bad in (0.0, -1.0, float("nan"), torch.tensor([-0.5])):
        with pytest.raises(ValueError, match="temperature"):
            StraightThroughBernoulli(bad, logits=torch.zeros(2))
    with pytest.raises(TypeError, match="temperature"):
        StraightThroughBernoulli("hot", logits=torch.zeros(2))


# a two-component Normal mixture, one latent label per point: the exact posterior is enumerable
X = torch.tensor([-0.5, 0.4, 1.0, 1.6, 2.5, 3.0], dtype=torch.float64)
P, MU = 0.3, (0.0, 2.0)


def _model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(P, dtype=x.dtype)))
        pyro.sample("x", dist.Normal(MU[0] + (MU[1] - MU[0]) * z, 1.0), obs=x)


def _guide(x, straight_through=True):
    logits = pyro.param("logits", torch.zeros(len(x), dtype=x.dtype))
    with pyro.plate("data", len(x)):
        fn = StraightThroughBernoulli(0.5, logits=logits) if straight_through else dist.Bernoulli(logits=logits)
        pyro.sample("z", fn)


def _exact_log_evidence():
    lp0 = dist.Normal(MU[0], 1.0).log_prob(X) + math.log(1 - P)
    lp1 = dist.Normal(MU[1], 1.0).log_prob(X) + math.log(P)
    return float(torch.logaddexp(lp0, lp1).sum())


def test_straight_through_guide_matches_a_discrete_model_site_and_svi_evidence_is_exact():
    """The guide is discrete (validation accepts it at a Bernoulli site) and its importance
    weights are the discrete model's: the SVI fit's log-evidence estimate is unbiased for the
    exact log p(x) (a relaxed *density* in log q would be off by O(1) per point)."""
    pyro.clear_param_store()
    check_model_guide(_model, _guide, (X,), {})
    pyro.set_rng_seed(0)
    fit = ppl_lvm.fit(_model, _guide, X, backend="svi", num_steps=300, optim=pyro.optim.Adam({"lr": 0.05}),
                      progress=False)
    est = fit.log_evidence(4000)
    exact = _exact_log_evidence()
    assert abs(est.log_evidence - exact) <= 4 * est.stderr + 1e-9, (est, exact)


@pytest.mark.parametrize("backend", ["iwae", "chi2_vis"])
def test_importance_weighted_backends_draw_straight_through_sites_as_plain_bernoulli(backend):
    """IWAE / chi^2-VIS give a straight-through site the plain Bernoulli's score-function route
    (ppl_lvm.distributions): with the same seed the fit is the plain-Bernoulli guide's fit."""
    params = {}
    for st in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ppl_lvm.fit(_model, lambda x: _guide(x, st), X, backend=backend, num_steps=40,
                        optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
        warned = any("StraightThroughBernoulli" in str(w.message) for w in caught)
        assert warned == st
        params[st] = pyro.param("logits").detach().clone()
    assert torch.equal(params[True], params[False])


def test_straight_through_as_bernoulli_unwraps_independent():
    def g():
        pyro.sample("b", StraightThroughBernoulli(0.5, logits=torch.zeros(2, 3)).to_event(2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = pyro.poutine.trace(straight_through_as_bernoulli(g)).get_trace()
    fn = tr.nodes["b"]["fn"]
    assert isinstance(fn, dist.Independent) and type(fn.base_dist) is dist.Bernoulli
    assert fn.event_shape == (2, 3)
    assert straight_through_as_bernoulli(None) is None
