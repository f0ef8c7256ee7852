"""DiscreteVAE: the exact likelihood by enumeration, importance sampling against it, the
baselines' objectives, and input checks."""

import itertools
import math

import pytest
import torch

from ppl_lvm.models import DiscreteVAE


def _small(seed=0):
    torch.manual_seed(seed)
    dv = DiscreteVAE(16, grid=(3,), codebook=3, embed_dim=4, hidden=(8,), name="t_dvae").double()
    x, _ = DiscreteVAE.simulate(num_data=7, obs_dim=16, grid=(3,), codebook=3, seed=seed)
    return dv, x.double()


def test_exact_log_likelihood_equals_brute_force_enumeration():
    dv, x = _small()
    states = torch.tensor(list(itertools.product(range(3), repeat=3)))  # 27 code grids
    lj = torch.stack([dv.log_joint(x, s.expand(x.shape[0], 3)) for s in states])  # (27, N)
    assert torch.allclose(dv.exact_log_likelihood(x, chunk=5), lj.logsumexp(0), atol=1e-10)
    # the uniform prior: log p(x, z) = log p(x | z) - L log C
    z = states[4].expand(x.shape[0], 3)
    lik = torch.distributions.Bernoulli(logits=dv.decode(z)).log_prob(x).sum(-1)
    assert torch.allclose(dv.log_joint(x, z), lik - 3 * math.log(3))


def test_importance_sampling_is_unbiased_for_the_likelihood():
    """IS with an arbitrary full-support proposal: exp of the per-image estimate averages to p(x)
    (40 repeats of K = 200), within 4 standard errors per image."""
    dv, x = _small(1)
    torch.manual_seed(0)
    logits = torch.randn(x.shape[0], 3, 3, dtype=x.dtype)
    exact = dv.exact_log_likelihood(x).exp()
    reps = torch.stack([dv.importance_log_likelihood(x, logits, num_samples=200, chunk=64).exp()
                        for _ in range(40)])
    se = reps.std(0) / math.sqrt(reps.shape[0])
    assert torch.all((reps.mean(0) - exact).abs() < 4 * se + 1e-12), (reps.mean(0), exact, se)


def test_baseline_objectives_are_finite_and_train_the_decoder():
    dv, x = _small(2)
    for loss_fn in (lambda: dv.relaxed_loss(x, temperature=0.7), lambda: dv.relaxed_loss(x, hard=True),
                    lambda: dv.vq_loss(x)):
        dv.zero_grad()
        loss = loss_fn()
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in dv.decoder.parameters()]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    codes, h = dv.vq_codes(x)
    assert codes.shape == (x.shape[0], 3) and h.shape == (x.shape[0], 3, 4)
    assert dv.reconstruct(x).shape == x.shape and dv.sample(5).shape == (5, 16)


def test_bad_input_is_refused():
    dv, x = _small()
    with pytest.raises(ValueError, match="shape"):
        dv.model(x[:, :10])
    with pytest.raises(ValueError, match="binary"):
        dv.model(x * 0.5)
    with pytest.raises(ValueError, match="grid"):
        DiscreteVAE(16, grid=(0, 2))
    with pytest.raises(ValueError, match="codebook"):
        DiscreteVAE(16, codebook=0)
    big = DiscreteVAE(16, grid=(4, 4), codebook=8)
    with pytest.raises(ValueError, match="max_states"):
        big.exact_log_likelihood(x.float())
