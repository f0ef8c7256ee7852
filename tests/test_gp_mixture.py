"""MultiTaskGPMixture (MagmaClust): the VE-step against dense joint-Gaussian computations, the
ELBO against the exact marginal likelihood, EM monotonicity, clustering and prediction on the
paper's simulation scheme, the Pyro program under TraceEnum SVI, and bad input."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import ppl_lvm
from ppl_lvm.models.gp_mixture import (MultiTaskGPMixture, PaddedMultivariateNormal, as_tasks, select_num_clusters,
                                       _grid)


def _small(num_tasks=5, seed=0):
    """Five short irregular tasks on a coarse grid (a dense computation is cheap)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 5, 9, dtype=torch.float64)
    tasks = []
    for i in range(num_tasks):
        n = 2 + i % 3
        pick = torch.sort(torch.randperm(9, generator=g)[:n]).values
        y = 2.0 * torch.sin(grid[pick]) + (i % 2) * 3.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        tasks.append((grid[pick], y))
    return tasks


def _fitted_small(K, tau=None):
    data = as_tasks(_small())
    mix = MultiTaskGPMixture(K, prior_mean=1.0)
    mix._build(data, init=dict(cluster_variance=2.0, cluster_lengthscale=1.3, task_variance=0.5,
                               task_lengthscale=0.7, noise=0.2))
    if tau is None:
        g = torch.Generator().manual_seed(3)
        tau = torch.softmax(torch.randn(data.num_tasks, K, generator=g, dtype=torch.float64), -1)
    return mix, data, tau


def _stacked(data, grid, idx, Psi, weights):
    """All tasks as one observation y = E mu + noise with block-diagonal noise covariance
    R = blockdiag(Psi_i / w_i): ``(E, y, R)``."""
    rows, blocks, ys = [], [], []
    for i in range(data.num_tasks):
        n = int(data.mask[i].sum())
        E = torch.zeros(n, grid.numel(), dtype=torch.float64)
        E[torch.arange(n), idx[i, :n]] = 1.0
        rows.append(E)
        blocks.append(Psi[i, :n, :n] / weights[i])
        ys.append(data.y[i, :n])
    return torch.cat(rows), torch.cat(ys), torch.block_diag(*blocks)


def _dense_tempered_posterior(mix, data, tau, k):
    """The posterior of mu_k on the grid given y_i ~ N(mu_k(t_i), Psi_i / tau_ik), built as one
    joint Gaussian over (mu, y_1..y_M) and conditioned densely: the VE-step's q(mu_k)."""
    grid, idx = _grid(data.t, data.mask)
    with torch.no_grad():
        C = mix._cluster_cov(grid).expand(mix.num_clusters, grid.numel(), grid.numel())[k]
        m = mix._prior_mean_values(grid)[k]
        Psi = mix._task_cov(data.t, data.mask)
    E, y, R = _stacked(data, grid, idx, Psi, tau[:, k])
    S = E @ C @ E.T + R
    gain = C @ E.T @ torch.linalg.inv(S)
    return m + gain @ (y - E @ m), C - gain @ E @ C


# --------------------------------------------------------------------------- exact answers
@pytest.mark.parametrize("K", [1, 2])
def test_ve_step_equals_dense_joint_gaussian(K):
    mix, data, tau = _fitted_small(K)
    grid, idx = _grid(data.t, data.mask)
    with torch.no_grad():
        m_hat, C_hat, _, _ = mix._hyper_posterior(grid, mix._statistics(data, grid, idx, tau))
    for k in range(K):
        mean, cov = _dense_tempered_posterior(mix, data, tau, k)
        torch.testing.assert_close(m_hat[k], mean, atol=1e-8, rtol=0)
        torch.testing.assert_close(C_hat[k], cov, atol=1e-8, rtol=0)


def test_magma_hyper_posterior_is_the_exact_gp_posterior_and_elbo_the_marginal_likelihood():
    """K = 1 (Magma), tau = 1: q(mu) is the exact GP posterior of the shared mean given every
    task, and the ELBO at it is the exact log marginal likelihood
    log N(y; E m, E C E^T + blockdiag(Psi_i)) (the bound is tight)."""
    mix, data, _ = _fitted_small(1)
    tau = torch.ones(data.num_tasks, 1, dtype=torch.float64)
    grid, idx = _grid(data.t, data.mask)
    with torch.no_grad():
        elbo, parts = mix._elbo(data, grid, idx, tau)
        C = mix._cluster_cov(grid)
        m = mix._prior_mean_values(grid)[0]
        Psi = mix._task_cov(data.t, data.mask)
    E, y, R = _stacked(data, grid, idx, Psi, tau[:, 0])
    S = E @ C @ E.T + R
    exact = dist.MultivariateNormal(E @ m, covariance_matrix=S).log_prob(y)
    assert abs(float(elbo) - float(exact)) < 1e-8 * abs(float(exact))
    gain = C @ E.T @ torch.linalg.inv(S)
    torch.testing.assert_close(parts["m_hat"][0], m + gain @ (y - E @ m), atol=1e-8, rtol=0)
    torch.testing.assert_close(parts["C_hat"][0], C - gain @ E @ C, atol=1e-8, rtol=0)


def test_collapsed_elbo_equals_the_explicit_elbo():
    mix, data, tau = _fitted_small(2)
    grid, idx = _grid(data.t, data.mask)
    with torch.no_grad():
        collapsed = float(mix._elbo(data, grid, idx, tau)[0])
    explicit = mix.explicit_elbo(data, tau)
    assert abs(collapsed - explicit) < 1e-9 * abs(explicit)


def test_expected_log_likelihood_against_monte_carlo():
    """E_q log N(y_i; mu_k(t_i), Psi_i) (the tau update's term, with the trace correction) against
    the mean over 20000 draws of q(mu_k), within 4 Monte Carlo standard errors."""
    mix, data, tau = _fitted_small(2)
    grid, idx = _grid(data.t, data.mask)
    with torch.no_grad():
        _, parts = mix._elbo(data, grid, idx, tau)
        ell = mix._expected_loglik(data, idx, parts["stats"], parts["m_hat"], parts["C_hat"])
        Lp = parts["stats"]["L_psi"]
        g = torch.Generator().manual_seed(0)
        for k in range(2):
            L = torch.linalg.cholesky(parts["C_hat"][k] + 1e-12 * torch.eye(grid.numel(), dtype=torch.float64))
            mu = parts["m_hat"][k] + (L @ torch.randn(grid.numel(), 20000, generator=g, dtype=torch.float64)).T
            lp = PaddedMultivariateNormal(mu[:, idx], Lp, data.mask).log_prob(data.y)  # (S, M)
            se = lp.std(0) / math.sqrt(lp.shape[0])
            z = (lp.mean(0) - ell[:, k]) / se
            assert bool((z.abs() < 4).all()), z


def test_padded_normal_is_the_normal_of_the_observed_entries():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.T + torch.eye(4, dtype=torch.float64)
    loc = torch.randn(4, generator=g, dtype=torch.float64)
    y = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])
    keep = mask.nonzero().squeeze(-1)
    sub = cov[keep][:, keep]
    padded = torch.eye(4, dtype=torch.float64)
    padded[keep.unsqueeze(-1), keep] = sub
    lp = PaddedMultivariateNormal(loc, torch.linalg.cholesky(padded), mask).log_prob(y)
    exact = dist.MultivariateNormal(loc[keep], covariance_matrix=sub).log_prob(y[keep])
    assert abs(float(lp - exact)) < 1e-12


# --------------------------------------------------------------------------- the fit
@pytest.fixture(scope="module")
def paper_fit():
    """The paper's scheme: 3 clusters, 50 training tasks x 30 points, and 40 held-out tasks."""
    tasks, truth = MultiTaskGPMixture.simulate(num_tasks=90, num_points=30, num_clusters=3, seed=4)
    mix = MultiTaskGPMixture(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an ELBO decrease would warn
        res = mix.fit_vem(tasks[:50], num_steps=40)
    return mix, res, tasks, truth


def test_elbo_never_decreases_and_converges(paper_fit):
    _, res, _, _ = paper_fit
    elbo = np.asarray(res.elbo)
    # coordinate ascent: each iteration's ELBO is at least the last one's, up to float64 rounding
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[:-1])), np.diff(elbo)
    assert res.converged and elbo[-1] > elbo[0]


def test_clusters_recovered(paper_fit):
    mix, _, _, truth = paper_fit
    ari = adjusted_rand_score(truth["assignments"][:50].numpy(), mix.assignments.numpy())
    assert ari >= 0.8, ari


def test_prediction_coverage_of_held_out_tasks(paper_fit):
    """40 held-out tasks, first 20 points observed, last 10 predicted: 400 points, so the 95%
    band's coverage has a binomial standard error of ~1.1%; the required 90-99% is -4.5 / +3.6
    of those (the points within a task are correlated, which only widens the spread)."""
    mix, _, tasks, _ = paper_fit
    hits, sq = [], []
    for t, y in tasks[50:]:
        p = mix.predict(t[:20], y[:20], t[20:])
        hits.append(((y[20:] >= p.lower) & (y[20:] <= p.upper)).double())
        sq.append((p.mean - y[20:]) ** 2)
    coverage = float(torch.cat(hits).mean())
    assert 0.90 <= coverage <= 0.99, coverage
    assert float(torch.cat(sq).mean()) < float(torch.cat([y[20:] for _, y in tasks[50:]]).var())


def test_predict_with_one_point_and_with_none(paper_fit):
    mix, _, tasks, _ = paper_fit
    t_pred = torch.linspace(0, 10, 7, dtype=torch.float64)
    prior = mix.predict(None, None, t_pred)
    torch.testing.assert_close(prior.tau, mix.pi)          # no data: the prior mixture
    one = mix.predict(tasks[60][0][:1], tasks[60][1][:1], t_pred)
    assert abs(float(one.tau.sum()) - 1) < 1e-12 and bool((one.variance > 0).all())
    assert bool((one.lower < one.mean).all() and (one.mean < one.upper).all())
    draws = one.sample(4000, generator=torch.Generator().manual_seed(0))
    # the sample mean of the mixture against its mean: 4 standard errors
    se = one.variance.sqrt() / math.sqrt(4000)
    assert bool(((draws.mean(0) - one.mean).abs() < 4 * se).all())


def test_mixture_quantiles_invert_its_cdf(paper_fit):
    mix, _, tasks, _ = paper_fit
    p = mix.predict(tasks[70][0][:3], tasks[70][1][:3], torch.linspace(0, 10, 5, dtype=torch.float64))
    sd = p.covariances.diagonal(dim1=-2, dim2=-1).sqrt()
    for q in (0.025, 0.5, 0.975):
        x = p.quantile(q)
        cdf = (p.tau[:, None] * torch.distributions.Normal(p.means, sd).cdf(x)).sum(0)
        torch.testing.assert_close(cdf, torch.full_like(cdf, q), atol=1e-9, rtol=0)


def test_plots(paper_fit):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mix, _, tasks, _ = paper_fit
    assert mix.plot_clusters() is not None
    p = mix.predict(tasks[55][0][:20], tasks[55][1][:20], torch.linspace(0, 10, 50, dtype=torch.float64))
    assert p.plot(truth=(tasks[55][0][20:], tasks[55][1][20:])) is not None
    assert p.plot_density(num_y=40) is not None
    plt.close("all")


@pytest.mark.slow
def test_separate_task_hyperparameters_fit_and_predict():
    tasks, truth = MultiTaskGPMixture.simulate(num_tasks=24, num_points=15, num_clusters=2, seed=5)
    mix = MultiTaskGPMixture(2, shared_hp_tasks=False, shared_hp_clusters=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = mix.fit_vem(tasks[:20], num_steps=15)
    elbo = np.asarray(res.elbo)
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[:-1]))
    # one kernel per task and per cluster: (outputscale, lengthscale) x (20 + 2) + 20 noises
    assert mix.num_hyperparameters == 2 * 20 + 2 * 2 + 20
    p = mix.predict(tasks[22][0][:10], tasks[22][1][:10], tasks[22][0][10:])
    assert bool(torch.isfinite(p.mean).all()) and bool((p.variance > 0).all())


@pytest.mark.slow
def test_vbic_chooses_the_true_number_of_clusters():
    """10 data sets by the paper's scheme (3 clusters, 50 x 30): V-BIC over K = 1..5 picks K = 3
    in most of them (the count is asserted at >= 6 of 10)."""
    hits = []
    for rep in range(10):
        tasks, _ = MultiTaskGPMixture.simulate(num_tasks=50, num_points=30, num_clusters=3, seed=100 + rep)
        table, _ = select_num_clusters(tasks, candidates=range(1, 6), num_steps=20)
        hits.append(int(table.loc[table.vbic.idxmax(), "K"]))
    print("V-BIC choices over 10 data sets:", hits)
    assert sum(k == 3 for k in hits) >= 6, hits


# --------------------------------------------------------------------------- the Pyro program
@pytest.mark.slow
def test_enumerated_svi_reaches_the_vem_assignments():
    """A small case: SVI with loss='enum' (z summed out exactly) on the model/guide pair, started
    from random memberships, gives the same clusters as fit_vem (ARI 1.0); memberships from the
    trained guide's mean processes."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    tasks, truth = MultiTaskGPMixture.simulate(num_tasks=12, num_points=8, num_clusters=2, seed=6,
                                               grid=torch.linspace(0, 10, 25, dtype=torch.float64))
    vem = MultiTaskGPMixture(2, name="vem")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vem.fit_vem(tasks, num_steps=30)
    mix = MultiTaskGPMixture(2, name="svi_mix")
    mix._build(as_tasks(tasks))
    with torch.no_grad():  # the same hyperparameters: SVI infers mu and z
        for p, q in zip(mix.hp.parameters(), vem.hp.parameters()):
            p.copy_(q)
    t, y, mask = MultiTaskGPMixture.pad(tasks)
    # start the guide from near-uniform random memberships (its start is the VE-step's q(mu) for
    # them: both clusters near the pooled mean)
    w = 0.5 + 0.05 * torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mix.tau = torch.stack([w, 1 - w], -1)
    with torch.no_grad():
        mix.guide(t, y, mask)
    start = mix.memberships(t, y, mask).argmax(-1)
    assert adjusted_rand_score(vem.assignments.numpy(), start.numpy()) < 1.0  # SVI has work to do
    fit = ppl_lvm.fit(mix.model, mix.guide, t, y, mask, backend="svi", loss="enum", num_steps=1500,
                      optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
    assert np.isfinite(fit.losses[-1])
    labels = mix.memberships(t, y, mask).argmax(-1)  # at the guide's mean processes
    assert adjusted_rand_score(vem.assignments.numpy(), labels.numpy()) == 1.0
    assert adjusted_rand_score(truth["assignments"].numpy(), labels.numpy()) == 1.0


def test_model_log_likelihood_is_the_mixture_marginal():
    """The Pyro model's log p(y | mu) with z summed out equals sum_i logsumexp_k (log pi_k +
    log N(y_i; mu_k(t_i), Psi_i)) computed directly."""
    mix, data, _ = _fitted_small(2)
    t, y, mask = data.tensors()
    grid, idx = _grid(t, mask)
    mu = torch.randn(2, grid.numel(), dtype=torch.float64)
    cond = pyro.poutine.condition(mix.model, data={"mu": mu})
    tr = pyro.poutine.trace(pyro.poutine.enum(pyro.infer.config_enumerate(cond), first_available_dim=-2)).get_trace(t, y, mask)
    tr.compute_log_prob()
    lp_y = tr.nodes["y"]["log_prob"]   # (K, 1, M) enumerated
    lp_z = tr.nodes["z"]["log_prob"]
    marginal = torch.logsumexp((lp_y + lp_z).reshape(2, -1), 0).sum()
    with torch.no_grad():
        L = torch.linalg.cholesky(mix._task_cov(t, mask))
        direct = torch.logsumexp(PaddedMultivariateNormal(mu[:, idx], L, mask).log_prob(y) + mix.pi.log()[:, None], 0).sum()
    assert abs(float(marginal - direct)) < 1e-10


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_any_work():
    good = _small()
    with pytest.raises(ValueError, match="NaN"):
        as_tasks([(torch.tensor([0.0, 1.0]), torch.tensor([1.0, float("nan")]))])
    with pytest.raises(ValueError, match="no observed points"):
        as_tasks(good + [(torch.zeros(0), torch.zeros(0))])
    with pytest.raises(ValueError, match="must match"):
        as_tasks([(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 2.0]))])
    with pytest.raises(TypeError, match="pair"):
        as_tasks([torch.tensor([0.0, 1.0])])
    with pytest.raises(TypeError, match="list of"):
        as_tasks("data.csv")
    with pytest.raises(ValueError, match="larger than the number of tasks"):
        MultiTaskGPMixture(9).fit_vem(good)
    with pytest.raises(ValueError, match="positive"):
        MultiTaskGPMixture(0)
    with pytest.raises(TypeError, match="gpytorch kernel"):
        MultiTaskGPMixture(2, kernel_cluster="rbf")
    with pytest.raises(ValueError, match="prior_mean"):
        MultiTaskGPMixture(2, prior_mean=[1.0])
    with pytest.raises(TypeError, match="prior_mean"):
        MultiTaskGPMixture(2, prior_mean="zero")
    with pytest.raises(RuntimeError, match="fit_vem"):
        MultiTaskGPMixture(2).predict([1.0], [2.0], [3.0])
    mix = MultiTaskGPMixture(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mix.fit_vem(good, num_steps=2)
    with pytest.raises(ValueError, match="must match"):
        mix.predict([1.0, 2.0], [2.0], [3.0])
    with pytest.raises(ValueError, match="NaN"):
        mix.predict([1.0], [2.0], [float("nan")])
    with pytest.raises(ValueError, match="t_pred"):
        mix.predict([1.0], [2.0], None)


def test_long_table_input():
    pd = pytest.importorskip("pandas")
    rows = [(k, float(t), float(y)) for k, (ts, ys) in enumerate(_small()) for t, y in zip(ts, ys)]
    df = pd.DataFrame(rows, columns=["subject", "age", "height"])
    data = as_tasks(df, task="subject", t="age", y="height")
    ref = as_tasks(_small())
    torch.testing.assert_close(data.y, ref.y)
    torch.testing.assert_close(data.mask, ref.mask)
    with pytest.raises(ValueError, match="task=, t= and y="):
        as_tasks(df, task="subject")
