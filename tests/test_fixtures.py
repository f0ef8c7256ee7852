"""Tests of the exact-answer fixtures in :mod:`ppl_lvm.testing.fixtures`.

Every exact answer is checked against a computation that shares no code with
the fixture: grid quadrature, dense multivariate normals, brute-force
enumeration, Pyro's TraceEnum_ELBO, or the identity
``log p(x) = log p(x | z) + log p(z) - log p(z | x)`` at an arbitrary ``z``.
"""

import itertools
import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SMCFilter, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.poutine.util import prune_subsample_sites

from ppl_lvm.testing import (
    FIXTURES,
    ConjugateLinearRegression,
    BinaryLatents,
    ExactFixture,
    LinearGaussianSSM,
    NormalNormalGlobal,
    NormalNormalLocal,
)

ALL_NAMES = sorted(FIXTURES)


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _log_trapezoid(log_f, grid, dim=-1):
    """log of the trapezoid integral of exp(log_f) over ``grid``."""
    shift = log_f.max(dim, keepdim=True).values
    return torch.trapezoid((log_f - shift).exp(), grid, dim=dim).log() + shift.squeeze(dim)


# ---------------------------------------------------------------------------
# registry / generic API
# ---------------------------------------------------------------------------


def test_registry_and_class_attributes():
    assert set(FIXTURES) == {"normal_global", "normal_local", "linreg", "lgssm", "binary"}
    for name, cls in FIXTURES.items():
        assert issubclass(cls, ExactFixture)
        assert cls.name == name
    assert LinearGaussianSSM.max_plate_nesting == 0 and LinearGaussianSSM.is_state_space
    assert BinaryLatents.has_discrete_latents
    for cls in (NormalNormalGlobal, NormalNormalLocal, ConjugateLinearRegression, BinaryLatents):
        assert cls.max_plate_nesting == 1
        assert not cls.is_state_space
    for cls in (NormalNormalGlobal, NormalNormalLocal, ConjugateLinearRegression, LinearGaussianSSM):
        assert not cls.has_discrete_latents


@pytest.mark.parametrize("name", ALL_NAMES)
def test_generic_api(name):
    fix = FIXTURES[name]()
    assert isinstance(fix.args, tuple) and fix.kwargs == {}
    for a in fix.args:
        assert a.dtype == torch.float64 and a.device.type == "cpu"
    mean, sd = fix.exact_posterior_mean(), fix.exact_posterior_sd()
    assert set(mean) == set(sd) == set(fix.truth) == set(fix.latent_sites)
    assert isinstance(fix.exact_log_evidence(), float)
    assert math.isfinite(fix.exact_log_evidence())

    # latent site shapes in the model match the exact answers
    tr = poutine.trace(fix.model).get_trace(*fix.args, **fix.kwargs)
    latents = {
        n: s for n, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and n != "data"
    }
    assert set(latents) == set(mean)
    for n, s in latents.items():
        assert s["value"].shape == mean[n].shape == sd[n].shape == fix.truth[n].shape
        assert mean[n].dtype == sd[n].dtype == torch.float64
        assert (sd[n] >= 0).all()

    # guide covers exactly the latent sites; its params are name-prefixed
    gtr = poutine.trace(fix.guide).get_trace(*fix.args, **fix.kwargs)
    gsites = {n for n, s in gtr.nodes.items() if s["type"] == "sample" and n != "data"}
    assert gsites == set(mean)
    params = {n for n, s in gtr.nodes.items() if s["type"] == "param"}
    assert params and all(p.startswith(name + ".") for p in params)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_seeding_is_private_and_reproducible(name):
    state = torch.get_rng_state()
    a, b, c = FIXTURES[name](seed=3), FIXTURES[name](seed=3), FIXTURES[name](seed=4)
    assert torch.equal(torch.get_rng_state(), state), "construction touched the global RNG"
    for ta, tb in zip(a.args, b.args):
        assert torch.equal(ta, tb)
    assert any(not torch.equal(ta, tc) for ta, tc in zip(a.args, c.args))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_float32(name):
    fix = FIXTURES[name](dtype=torch.float32)
    assert all(a.dtype == torch.float32 for a in fix.args)
    assert all(v.dtype == torch.float32 for v in fix.exact_posterior_mean().values())
    tr = poutine.trace(poutine.replay(fix.model, poutine.trace(fix.guide).get_trace(*fix.args)))
    assert torch.isfinite(tr.get_trace(*fix.args).log_prob_sum())
    # the exact answers barely depend on the data precision
    ref = FIXTURES[name](dtype=torch.float64).exact_log_evidence()
    assert fix.exact_log_evidence() == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------------------
# exact answers vs independent computations
# ---------------------------------------------------------------------------


def test_normal_global_against_quadrature_and_mvn():
    fix = NormalNormalGlobal()
    x = fix.x
    # brute-force quadrature over z on a fine grid wide enough for the posterior
    grid = torch.linspace(float(x.mean()) - 6.0, float(x.mean()) + 6.0, 40001, dtype=torch.float64)
    log_f = dist.Normal(fix.prior_loc, fix.prior_scale).log_prob(grid) + dist.Normal(
        grid.unsqueeze(-1), fix.obs_scale
    ).log_prob(x).sum(-1)
    log_z = _log_trapezoid(log_f, grid)
    assert fix.exact_log_evidence() == pytest.approx(float(log_z), abs=1e-6)

    w = (log_f - log_z).exp()
    m = torch.trapezoid(w * grid, grid)
    v = torch.trapezoid(w * (grid - m) ** 2, grid)
    assert float(fix.exact_posterior_mean()["z"]) == pytest.approx(float(m), abs=1e-6)
    assert float(fix.exact_posterior_sd()["z"]) == pytest.approx(float(v.sqrt()), abs=1e-6)

    # dense marginal Gaussian of x
    n = fix.num_data
    cov = fix.obs_scale**2 * torch.eye(n, dtype=x.dtype)
    cov = cov + fix.prior_scale**2 * torch.ones(n, n, dtype=x.dtype)
    mvn = dist.MultivariateNormal(torch.full((n,), fix.prior_loc, dtype=x.dtype), covariance_matrix=cov)
    assert fix.exact_log_evidence() == pytest.approx(float(mvn.log_prob(x)), abs=1e-9)


def test_normal_local_against_quadrature():
    fix = NormalNormalLocal()
    x = fix.x
    grid = torch.linspace(-30.0, 30.0, 60001, dtype=torch.float64)
    # log p(z_i = g, x_i) for every data point i (rows) and grid point g (cols)
    log_f = dist.Normal(fix.prior_loc, fix.prior_scale).log_prob(grid) + dist.Normal(
        grid, fix.obs_scale
    ).log_prob(x.unsqueeze(-1))
    log_z = _log_trapezoid(log_f, grid)
    assert fix.exact_log_evidence() == pytest.approx(float(log_z.sum()), abs=1e-6)

    w = (log_f - log_z.unsqueeze(-1)).exp()
    m = torch.trapezoid(w * grid, grid)
    v = torch.trapezoid(w * (grid - m.unsqueeze(-1)) ** 2, grid)
    torch.testing.assert_close(fix.exact_posterior_mean()["z"], m, atol=1e-6, rtol=0)
    torch.testing.assert_close(fix.exact_posterior_sd()["z"], v.sqrt(), atol=1e-6, rtol=0)


def test_linreg_against_dense_mvn_and_identity():
    fix = ConjugateLinearRegression()
    X, y = fix.args
    n, d = X.shape
    cov_y = fix.noise_scale**2 * torch.eye(n, dtype=X.dtype) + fix.prior_scale**2 * X @ X.T
    dense = dist.MultivariateNormal(torch.zeros(n, dtype=X.dtype), covariance_matrix=cov_y).log_prob(y)
    assert fix.exact_log_evidence() == pytest.approx(float(dense), abs=1e-8)

    # Gaussian conditioning of the joint (w, y) gives the posterior.
    cov_wy = fix.prior_scale**2 * X.T  # Cov(w, y), shape (D, N)
    gain = torch.linalg.solve(cov_y, cov_wy.T).T
    post_mean = gain @ y
    post_cov = fix.prior_scale**2 * torch.eye(d, dtype=X.dtype) - gain @ cov_wy.T
    torch.testing.assert_close(fix.exact_posterior_mean()["w"], post_mean, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(fix.exact_posterior_cov(), post_cov, atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(fix.exact_posterior_sd()["w"], post_cov.diagonal().sqrt())

    # log p(y) = log p(y | w) + log p(w) - log p(w | y) at arbitrary w, using the model itself
    post = dist.MultivariateNormal(post_mean, covariance_matrix=post_cov)
    for w in (torch.zeros(d, dtype=X.dtype), fix.truth["w"] + 0.3):
        cond = poutine.condition(fix.model, data={"w": w})
        log_joint = poutine.trace(cond).get_trace(X, y).log_prob_sum()
        assert fix.exact_log_evidence() == pytest.approx(float(log_joint - post.log_prob(w)), abs=1e-8)


def _dense_lgssm(fix):
    """Dense joint Gaussian of (z, x) for a small LinearGaussianSSM."""
    T, dtype = fix.num_time_steps, fix.dtype
    # z = B e with e = (z_0, process noise_1..T-1), B[t, s] = a^(t - s) for s <= t
    idx = torch.arange(T)
    powers = (idx.unsqueeze(-1) - idx).clamp(min=0).to(dtype)
    B = torch.where(idx.unsqueeze(-1) >= idx, fix.transition**powers, torch.zeros((), dtype=dtype))
    e_var = torch.full((T,), fix.process_scale**2, dtype=dtype)
    e_var[0] = fix.init_scale**2
    cov_z = B @ torch.diag(e_var) @ B.T
    cov_x = cov_z + fix.obs_scale**2 * torch.eye(T, dtype=dtype)
    return cov_z, cov_x


def test_lgssm_against_dense_gaussian():
    fix = LinearGaussianSSM(num_time_steps=5, seed=1)
    x = fix.x
    cov_z, cov_x = _dense_lgssm(fix)
    zeros = torch.zeros(5, dtype=x.dtype)
    dense_log_ev = dist.MultivariateNormal(zeros, covariance_matrix=cov_x).log_prob(x)
    assert fix.exact_log_evidence() == pytest.approx(float(dense_log_ev), abs=1e-10)

    gain = cov_z @ torch.linalg.inv(cov_x)
    post_mean = gain @ x
    post_cov = cov_z - gain @ cov_z
    smooth = fix.kalman_smoother()
    torch.testing.assert_close(smooth["mean"], post_mean)
    torch.testing.assert_close(smooth["var"], post_cov.diagonal())
    torch.testing.assert_close(smooth["lag_one_cov"], post_cov.diagonal(1))
    mean, sd = fix.exact_posterior_mean(), fix.exact_posterior_sd()
    for t in range(5):
        assert float(mean[f"z_{t}"]) == pytest.approx(float(post_mean[t]), abs=1e-10)
        assert float(sd[f"z_{t}"]) == pytest.approx(float(post_cov[t, t].sqrt()), abs=1e-10)

    # filter at t equals dense conditioning on x_{0:t}
    filt = fix.kalman_filter()
    for t in range(5):
        k = t + 1
        g = cov_z[t, :k] @ torch.linalg.inv(cov_x[:k, :k])
        assert float(filt["filter_mean"][t]) == pytest.approx(float(g @ x[:k]), abs=1e-10)
        assert float(filt["filter_var"][t]) == pytest.approx(float(cov_z[t, t] - g @ cov_z[:k, t]), abs=1e-10)

    # identity log p(x) = log p(x, z) - log p(z | x), with log p(x, z) from the Pyro model
    post = dist.MultivariateNormal(post_mean, covariance_matrix=post_cov)
    z = fix.x * 0.5 - 0.1
    cond = poutine.condition(fix.model, data={f"z_{t}": z[t] for t in range(5)})
    log_joint = poutine.trace(cond).get_trace(x).log_prob_sum()
    assert fix.exact_log_evidence() == pytest.approx(float(log_joint - post.log_prob(z)), abs=1e-10)


def test_lgssm_default_size_smoother_consistent():
    fix = LinearGaussianSSM()
    filt, smooth = fix.kalman_filter(), fix.kalman_smoother()
    assert filt["filter_mean"].shape == smooth["mean"].shape == (100,)
    # the last smoothed marginal is the last filtered one; smoothing never inflates variance
    assert float(smooth["mean"][-1]) == float(filt["filter_mean"][-1])
    assert (smooth["var"] <= filt["filter_var"] + 1e-12).all()
    assert (smooth["var"] > 0).all()


def test_binary_against_brute_force_loop():
    fix = BinaryLatents()
    x, W = fix.x, fix.W
    J = fix.num_latents
    log_joints, states = [], []
    for bits in itertools.product((0.0, 1.0), repeat=J):
        lp = sum(math.log(p if b else 1.0 - p) for b, p in zip(bits, fix.prior_probs))
        data = {f"z_{j}": torch.tensor(b, dtype=x.dtype) for j, b in enumerate(bits)}
        cond = poutine.condition(fix.model, data=data)
        tr = poutine.trace(cond).get_trace(x)
        log_lik = dist.Normal(W @ torch.tensor(bits, dtype=x.dtype), fix.obs_scale).log_prob(x).sum()
        # the Pyro model agrees with the hand-written joint
        assert float(tr.log_prob_sum()) == pytest.approx(lp + float(log_lik), abs=1e-10)
        log_joints.append(lp + float(log_lik))
        states.append(bits)
    log_joints = torch.tensor(log_joints, dtype=torch.float64)
    log_z = float(log_joints.logsumexp(0))
    assert fix.exact_log_evidence() == pytest.approx(log_z, abs=1e-10)

    probs = (log_joints - log_z).exp()
    tab_states, tab_probs = fix.exact_posterior_table()
    assert tab_states.shape == (2**J, J) and tab_probs.shape == (2**J,)
    torch.testing.assert_close(tab_states, torch.tensor(states, dtype=torch.float64))
    torch.testing.assert_close(tab_probs, probs)
    marg = probs @ torch.tensor(states, dtype=torch.float64)
    mean, sd = fix.exact_posterior_mean(), fix.exact_posterior_sd()
    for j in range(J):
        assert float(mean[f"z_{j}"]) == pytest.approx(float(marg[j]), abs=1e-10)
        assert float(sd[f"z_{j}"]) == pytest.approx(math.sqrt(marg[j] * (1 - marg[j])), abs=1e-10)
    # the default weight scale keeps the posterior genuinely uncertain
    assert any(0.05 < float(p) < 0.95 for p in marg)


def test_binary_trace_enum_elbo_gives_exact_evidence():
    fix = BinaryLatents()
    model = config_enumerate(fix.model, "parallel")

    def empty_guide(x):
        pass

    elbo = TraceEnum_ELBO(max_plate_nesting=fix.max_plate_nesting)
    assert -elbo.loss(model, empty_guide, *fix.args) == pytest.approx(fix.exact_log_evidence(), abs=1e-9)


@pytest.mark.parametrize("name", ["normal_global", "normal_local"])
def test_guide_family_contains_posterior(name):
    # With the guide at the exact posterior, log p(x, z) - log q(z) = log p(x)
    # for *every* z, so a single-sample ELBO term is exact (zero variance).
    fix = FIXTURES[name]()
    pyro.param(f"{name}.loc", fix.exact_posterior_mean()["z"].clone())
    pyro.param(
        f"{name}.scale", fix.exact_posterior_sd()["z"].clone(), constraint=dist.constraints.positive
    )
    for _ in range(3):
        gtr = poutine.trace(fix.guide).get_trace(*fix.args)
        mtr = poutine.trace(poutine.replay(fix.model, trace=gtr)).get_trace(*fix.args)
        elbo_term = (mtr.log_prob_sum() - gtr.log_prob_sum()).detach()
        assert float(elbo_term) == pytest.approx(fix.exact_log_evidence(), abs=1e-9)


# ---------------------------------------------------------------------------
# broadcasting under a vectorized particle plate
# ---------------------------------------------------------------------------


def _in_particle_plate(fn, num_particles, max_plate_nesting):
    def wrapped(*args, **kwargs):
        with pyro.plate("particles", num_particles, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return wrapped


PARTICLE_CASES = [(name, {}) for name in ALL_NAMES] + [
    ("normal_global", {"subsample_size": 7}),
    ("normal_local", {"subsample_size": 7}),
    ("linreg", {"subsample_size": 7}),
]


@pytest.mark.parametrize("name,ctor_kwargs", PARTICLE_CASES, ids=lambda v: str(v))
def test_particle_plate_broadcasting(name, ctor_kwargs):
    K = 5
    fix = FIXTURES[name](**ctor_kwargs)
    P = fix.max_plate_nesting
    guide = _in_particle_plate(fix.guide, K, P)
    model = _in_particle_plate(fix.model, K, P)
    gtr = poutine.trace(guide).get_trace(*fix.args, **fix.kwargs)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*fix.args, **fix.kwargs)
    gtr = prune_subsample_sites(gtr)
    mtr = prune_subsample_sites(mtr)
    gtr.compute_log_prob()
    mtr.compute_log_prob()

    latent = set(fix.exact_posterior_mean())
    for tr in (gtr, mtr):
        seen = set()
        for n, site in tr.nodes.items():
            if site["type"] != "sample":
                continue
            shape = site["log_prob"].shape
            assert len(shape) >= P + 1, (n, shape)
            if not site["is_observed"]:
                seen.add(n)
                assert shape[-(P + 1)] == K, (n, shape)
                assert site["value"].shape[: len(shape)][-(P + 1)] == K
            else:
                assert shape[-(P + 1)] in (1, K), (n, shape)
        assert seen == latent
        assert torch.isfinite(tr.log_prob_sum())

    # particle k of the vectorized model log-density equals an unvectorized run
    # conditioned on particle k's latent values (checks nothing mixes particles).
    if not ctor_kwargs:
        k = 3
        shapes = {n: v.shape for n, v in fix.exact_posterior_mean().items()}
        data = {n: mtr.nodes[n]["value"][k].reshape(shapes[n]) for n in latent}
        single = poutine.trace(poutine.condition(fix.model, data=data)).get_trace(*fix.args)
        vec_k = sum(
            s["log_prob"].expand((K,) + s["log_prob"].shape[1:])[k].sum()
            for s in mtr.nodes.values()
            if s["type"] == "sample"
        )
        assert float(vec_k.detach()) == pytest.approx(float(single.log_prob_sum().detach()), abs=1e-9)


@pytest.mark.parametrize("name,ctor_kwargs", PARTICLE_CASES, ids=lambda v: str(v))
def test_pyro_vectorized_trace_elbo(name, ctor_kwargs):
    # Pyro's own particle vectorization uses the same outer-plate convention.
    fix = FIXTURES[name](**ctor_kwargs)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=fix.max_plate_nesting)
    loss = elbo.loss(fix.model, fix.guide, *fix.args, **fix.kwargs)
    assert math.isfinite(loss)
    if name in ("normal_global", "normal_local") and not ctor_kwargs:
        # at the exact posterior every particle's ELBO term is exactly log p(x)
        pyro.clear_param_store()
        pyro.param(f"{name}.loc", fix.exact_posterior_mean()["z"].clone())
        pyro.param(
            f"{name}.scale", fix.exact_posterior_sd()["z"].clone(), constraint=dist.constraints.positive
        )
        loss = elbo.loss(fix.model, fix.guide, *fix.args)
        assert -loss == pytest.approx(fix.exact_log_evidence(), abs=1e-9)


def test_binary_broadcasts_with_enumeration_and_particles():
    fix = BinaryLatents()
    K = 7
    model = _in_particle_plate(fix.model, K, 1)
    guide = _in_particle_plate(fix.guide, K, 1)
    gtr = poutine.trace(guide).get_trace(fix.x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(fix.x)
    mtr.compute_log_prob()
    for j in range(fix.num_latents):
        assert mtr.nodes[f"z_{j}"]["value"].shape == (K, 1)
    assert mtr.nodes["x"]["log_prob"].shape == (K, fix.num_data)

    # parallel enumeration in the model, particles outside: every z_j gets its own
    # enumeration dim to the left of the particle dim, and x broadcasts over all.
    enum_model = poutine.enum(config_enumerate(model, "parallel"), first_available_dim=-3)
    tr = poutine.trace(enum_model).get_trace(fix.x)
    tr.compute_log_prob()
    J = fix.num_latents
    for j in range(J):
        v = tr.nodes[f"z_{j}"]["value"]
        assert v.shape == (2,) + (1,) * (j + 2)
    assert tr.nodes["x"]["log_prob"].shape == (2,) * J + (K, fix.num_data)


# ---------------------------------------------------------------------------
# subsampling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["normal_global", "normal_local", "linreg"])
def test_subsampling_indexes_data(name):
    fix = FIXTURES[name](subsample_size=4)
    gtr = poutine.trace(fix.guide).get_trace(*fix.args)
    mtr = poutine.trace(poutine.replay(fix.model, trace=gtr)).get_trace(*fix.args)
    ind = mtr.nodes["data"]["value"]
    assert ind.shape == (4,)
    obs_name = "y" if name == "linreg" else "x"
    obs = fix.args[-1]
    torch.testing.assert_close(mtr.nodes[obs_name]["value"], obs[ind])
    if name == "normal_local":
        # guide and model share the same subsample indices
        assert torch.equal(gtr.nodes["data"]["value"], ind)
        assert mtr.nodes["z"]["value"].shape == (4,)
    # subsampling does not change the exact answers
    full = FIXTURES[name]()
    assert fix.exact_log_evidence() == full.exact_log_evidence()


# ---------------------------------------------------------------------------
# SMCFilter compatibility
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("locally_optimal", [False, True])
def test_smc_filter_matches_kalman(locally_optimal):
    pyro.set_rng_seed(0)
    fix = LinearGaussianSSM()
    num_particles = 2000
    smc = SMCFilter(
        fix.smc_model(), fix.smc_guide(locally_optimal=locally_optimal),
        num_particles=num_particles, max_plate_nesting=0,
    )
    kf = fix.kalman_filter()
    x = fix.x
    means = []
    smc.init(initial=x[0])
    means.append(float(smc.get_empirical()["z"].mean))
    for t in range(1, fix.num_time_steps):
        smc.step(x=x[t])
        means.append(float(smc.get_empirical()["z"].mean))
    means = torch.tensor(means, dtype=torch.float64)
    # Tolerances. A weighted particle mean has Monte Carlo standard error about
    # sqrt(filter_var / ESS); the naive unit below uses ESS = num_particles.
    # The real error is larger: Pyro resamples only once ESS < num_particles / 2,
    # resampling adds noise, and an outlying observation (this data set has a
    # 3-sigma one at t = 48) makes the incremental weights very uneven. So we
    # allow a factor 3 for the ESS loss and 5 of the resulting standard errors,
    # i.e. 15 naive units at the final step. (Over 200 seeds the final-step error
    # never exceeded 3.3 naive units for either proposal.) Every step is checked
    # through the root mean square of the standardized errors, which is ~1.5 for
    # a correct filter and ~46 for one that is off by one time step.
    naive_se = (kf["filter_var"] / num_particles).sqrt()
    z = (means - kf["filter_mean"]) / naive_se
    assert abs(float(z[-1])) < 5.0 * 3.0, f"final-step error = {float(z[-1]):.2f} naive SE"
    assert float(z.pow(2).mean().sqrt()) < 4.0, f"rms error = {float(z.pow(2).mean().sqrt()):.2f} naive SE"
    emp = smc.get_empirical()["z"]
    # the weighted particle variance: relative standard error sqrt(2 / ESS), with the same factor 3
    # for the ESS loss as above and 5 standard errors
    assert abs(float(emp.variance) / float(kf["filter_var"][-1]) - 1) < 5 * math.sqrt(2 * 3.0 / num_particles)


def test_smc_objects_without_observation():
    # with no observations the filter just propagates the prior
    pyro.set_rng_seed(1)
    fix = LinearGaussianSSM(init_scale=1.0, transition=0.5, process_scale=0.5)
    smc = SMCFilter(fix.smc_model(), fix.smc_guide(), num_particles=4000, max_plate_nesting=0)
    smc.init()
    smc.step()
    # Var z_1 = a^2 s0^2 + q^2 = 0.5
    emp = smc.get_empirical()["z"]
    assert abs(float(emp.mean)) < 5 * math.sqrt(0.5 / 4000)
    # equal weights: the sample variance of 4000 draws has standard error 0.5 * sqrt(2 / 4000)
    assert abs(float(emp.variance) - 0.5) < 4 * 0.5 * math.sqrt(2 / 4000)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs,exc",
    [
        (NormalNormalGlobal, {"num_data": 0}, ValueError),
        (NormalNormalGlobal, {"num_data": 2.5}, TypeError),
        (NormalNormalGlobal, {"num_data": True}, TypeError),
        (NormalNormalGlobal, {"prior_scale": -1.0}, ValueError),
        (NormalNormalGlobal, {"obs_scale": 0.0}, ValueError),
        (NormalNormalGlobal, {"prior_loc": float("nan")}, ValueError),
        (NormalNormalGlobal, {"subsample_size": 51}, ValueError),
        (NormalNormalGlobal, {"subsample_size": 0}, ValueError),
        (NormalNormalGlobal, {"dtype": torch.int64}, TypeError),
        (NormalNormalGlobal, {"seed": -1}, ValueError),
        (NormalNormalGlobal, {"seed": "0"}, TypeError),
        (NormalNormalLocal, {"num_data": -3}, ValueError),
        (NormalNormalLocal, {"obs_scale": -0.1}, ValueError),
        (NormalNormalLocal, {"prior_scale": "big"}, TypeError),
        (ConjugateLinearRegression, {"num_features": 0}, ValueError),
        (ConjugateLinearRegression, {"noise_scale": -0.5}, ValueError),
        (ConjugateLinearRegression, {"prior_scale": float("inf")}, ValueError),
        (ConjugateLinearRegression, {"subsample_size": 101}, ValueError),
        (LinearGaussianSSM, {"num_time_steps": 0}, ValueError),
        (LinearGaussianSSM, {"process_scale": -0.5}, ValueError),
        (LinearGaussianSSM, {"init_scale": 0.0}, ValueError),
        (LinearGaussianSSM, {"transition": float("nan")}, ValueError),
        (BinaryLatents, {"num_data": 0}, ValueError),
        (BinaryLatents, {"obs_dim": 0}, ValueError),
        (BinaryLatents, {"prior_probs": (0.3, 1.0)}, ValueError),
        (BinaryLatents, {"prior_probs": ()}, ValueError),
        (BinaryLatents, {"prior_probs": (0.5,) * 17}, ValueError),
        (BinaryLatents, {"prior_probs": 0.5}, TypeError),
        (BinaryLatents, {"obs_scale": -1.0}, ValueError),
    ],
)
def test_bad_constructor_input(cls, kwargs, exc):
    with pytest.raises(exc):
        cls(**kwargs)


def test_bad_smc_guide_flag():
    with pytest.raises(TypeError):
        LinearGaussianSSM(num_time_steps=3).smc_guide(locally_optimal="yes")
