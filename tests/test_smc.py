"""Particle filter, smoothing and learned parameters against the Kalman filter / RTS smoother.

Tolerances come from standard errors over independent runs (fixed seeds).  Note that
E[log Z-hat] sits below log Z by about Var(log Z-hat)/2 (Jensen); the estimator of Z itself,
log-mean-exp over runs, is unbiased in Z and is tested as well.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lvm
from ppl_lvm import IncompatibleModelError
from ppl_lvm.inference.particle_filter import (
    ParticleFilter,
    SMCFilterBackend,
    effective_sample_size,
    multinomial_resample,
    stratified_resample,
    systematic_resample,
)
from ppl_lvm.testing import LinearGaussianSSM
from ppl_lvm.traces import log_mean_exp

from tests.helpers import cuda_params

NUM_RUNS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("proposal, threshold", [
    ("bootstrap", 1.0), ("bootstrap", 0.5), ("prior_guide", 0.5), ("locally_optimal", 0.5),
])
def test_lgssm_evidence_and_filtering_means(proposal, threshold):
    fx = LinearGaussianSSM(num_time_steps=100, seed=0)
    kf = fx.kalman_filter()
    guide = {"bootstrap": None, "prior_guide": fx.smc_guide(),
             "locally_optimal": fx.smc_guide(locally_optimal=True)}[proposal]
    log_z, means, resampled = [], [], []
    for _ in range(NUM_RUNS):
        pf = ParticleFilter(fx.smc_model(), guide, 1000, ess_threshold=threshold)
        log_z.append(pf.filter(fx.x[1:], init_kwargs={"initial": fx.x[0]}))
        h = pf.history()
        means.append(h["mean/z"])
        resampled.append(int(h["resampled"].sum()))
    v = torch.stack(log_z)
    se = float(v.std() / math.sqrt(NUM_RUNS))
    assert abs(float(v.mean()) - kf["log_evidence"]) < 3 * se + 1e-9, (float(v.mean()), kf["log_evidence"], se)
    # the unbiased-in-Z estimator: log of the mean of the runs' Z-hat
    lme = float(log_mean_exp(v, 0))
    assert abs(lme - kf["log_evidence"]) < 3 * se + 0.5 * float(v.var()), (lme, kf["log_evidence"])
    err = (torch.stack(means).mean(0) - kf["filter_mean"]).abs().max()
    assert float(err) < 0.1
    if threshold < 1.0:
        assert 0 < np.mean(resampled) < 100  # adaptive: some steps resample, some do not
    else:
        assert resampled[0] == 100


def test_evidence_exact_for_a_single_step_without_resampling_bias():
    """One observation, prior proposal: Z-hat = mean_k p(x | z_k), unbiased; over many
    repeats the mean of Z-hat matches p(x) within 3 standard errors."""
    fx = LinearGaussianSSM(num_time_steps=1, seed=1)
    exact = math.exp(fx.kalman_filter()["log_evidence"])
    zs = []
    for _ in range(400):
        pf = ParticleFilter(fx.smc_model(), None, 50, ess_threshold=0.5)
        pf.init(initial=fx.x[0])
        zs.append(float(pf.log_evidence_.exp()))
    zs = np.array(zs)
    assert abs(zs.mean() - exact) < 3 * zs.std() / math.sqrt(len(zs))


@pytest.mark.parametrize("resample", [systematic_resample, stratified_resample, multinomial_resample])
def test_resampling_schemes_are_unbiased(resample):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(7, generator=g, dtype=torch.float64) ** 3
    w = w / w.sum()
    reps, k = 4000, 7
    counts = torch.zeros(reps, k, dtype=torch.float64)
    for r in range(reps):
        counts[r] = torch.bincount(resample(w), minlength=k).to(torch.float64)
    mean, se = counts.mean(0), counts.std(0) / math.sqrt(reps)
    z = (mean - k * w) / se.clamp_min(1e-12)
    ok = (se > 0) | ((mean - k * w).abs() < 1e-12)
    assert bool(ok.all())
    assert float(z[se > 0].abs().max()) < 4.5  # 7 coordinates, family-wise ~5e-5 per side
    if resample is systematic_resample:  # systematic keeps every count within one of K * w
        assert float((counts - k * w).abs().max()) < 1 + 1e-9


def test_effective_sample_size():
    lw = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert float(effective_sample_size(lw)) == pytest.approx(1 / (0.25 + 0.0625 * 2))
    assert float(effective_sample_size(torch.zeros(10))) == pytest.approx(10.0)


# --------------------------------------------------------------------------- Pyro contract
class _Oscillator:
    """A model written for pyro.infer.SMCFilter: 2-d latent rotation, noisy first coordinate.
    Site names change with the step, state["z"] holds the current latent (particles first)."""

    def __init__(self, angle=0.2, process=0.1, obs=0.3):
        c, s = math.cos(angle), math.sin(angle)
        self.A = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        self.process, self.obs = process, obs
        self.t = 0

    def init(self, state, initial):
        self.t = 0
        state["z"] = pyro.sample("z_init", dist.Normal(initial, self.process).to_event(1))

    def step(self, state, y=None):
        self.t += 1
        z = pyro.sample(f"z_{self.t}", dist.Normal(state["z"] @ self.A.T, self.process).to_event(1))
        pyro.sample(f"y_{self.t}", dist.Normal(z[..., 0], self.obs), obs=y)
        state["z"] = z


class _OscillatorGuide(_Oscillator):
    def init(self, state, initial):
        self.t = 0
        pyro.sample("z_init", dist.Normal(initial, self.process).to_event(1))

    def step(self, state, y=None):
        self.t += 1
        pyro.sample(f"z_{self.t}", dist.Normal(state["z"] @ self.A.T, self.process).to_event(1))


def _kalman_2d(model, z0, ys):
    A, Q, r2 = model.A.numpy(), model.process ** 2 * np.eye(2), model.obs ** 2
    m, P = z0.numpy().copy(), Q.copy()
    means = []
    for y in ys.numpy():
        m, P = A @ m, A @ P @ A.T + Q
        s = P[0, 0] + r2
        gain = P[:, 0] / s
        m = m + gain * (y - m[0])
        P = P - np.outer(gain, P[0, :])
        means.append(m.copy())
    return np.array(means)


def test_pyro_smcfilter_model_runs_unchanged():
    g = torch.Generator().manual_seed(0)
    truth = _Oscillator()
    z = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ys = []
    for _ in range(40):
        z = truth.A @ z + 0.1 * torch.randn(2, generator=g, dtype=torch.float64)
        ys.append(z[0] + 0.3 * torch.randn((), generator=g, dtype=torch.float64))
    ys = torch.stack(ys)
    z0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    exact = _kalman_2d(truth, z0, ys)

    # Pyro's own filter, the same calls
    pyro_smc = pyro.infer.SMCFilter(_Oscillator(), _OscillatorGuide(), num_particles=2000, max_plate_nesting=0)
    ours = ParticleFilter(_Oscillator(), _OscillatorGuide(), num_particles=2000, max_plate_nesting=0)
    ours_means, pyro_means = [], []
    for smc, store in ((pyro_smc, pyro_means), (ours, ours_means)):
        smc.init(initial=z0)
        for y in ys:
            smc.step(y)
            store.append(smc.get_empirical()["z"].mean.detach().numpy())
    ours_means, pyro_means = np.array(ours_means), np.array(pyro_means)
    assert np.abs(ours_means - exact).max() < 0.1
    assert np.abs(pyro_means - exact).max() < 0.1
    assert ours.num_time_steps == 41 and np.isfinite(float(ours.log_evidence_))


# --------------------------------------------------------------------------- smoothing
def test_backward_simulation_matches_rts_smoother():
    fx = LinearGaussianSSM(num_time_steps=50, seed=0)
    rts = fx.kalman_smoother()
    K, M = 1000, 300
    pf = ParticleFilter(fx.smc_model(), fx.smc_guide(locally_optimal=True), K, store_particles=True)
    pf.filter(fx.x[1:], init_kwargs={"initial": fx.x[0]})
    draws = pf.smooth(M)
    assert draws["z"].shape == (M, 50) and draws["site/z"].shape == (M, 50)
    # standard error of the smoothed mean: M draws plus the particle approximation (ESS >= K/2)
    se = (rts["var"] * (1.0 / M + 2.0 / K)).sqrt()
    z = (draws["z"].mean(0) - rts["mean"]) / se
    assert float((z ** 2).mean()) < 1 + 4 * math.sqrt(2 / 50), float((z ** 2).mean())
    assert float(z.abs().max()) < 4.5
    ratio = draws["z"].var(0) / rts["var"]
    assert abs(float(ratio.mean()) - 1) < 0.1


def test_smooth_needs_stored_particles():
    fx = LinearGaussianSSM(num_time_steps=5, seed=0)
    pf = ParticleFilter(fx.smc_model(), None, 10)
    pf.filter(fx.x[1:], init_kwargs={"initial": fx.x[0]})
    with pytest.raises(RuntimeError, match="store_particles"):
        pf.smooth(5)


# --------------------------------------------------------------------------- gradients
class _ParamLGSSM:
    def __init__(self, a):
        self.a = a

    def init(self, state, initial=None):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
        pyro.sample("x", dist.Normal(z, 0.7), obs=initial)
        state["z"] = z

    def step(self, state, x=None):
        a = self.a if self.a is not None else pyro.param("a", torch.tensor(0.5, dtype=torch.float64))
        z = pyro.sample("z", dist.Normal(a * state["z"], 0.5))
        pyro.sample("x", dist.Normal(z, 0.7), obs=x)
        state["z"] = z


def _exact_loglik(x, a):
    f = LinearGaussianSSM(num_time_steps=len(x), transition=a, seed=0)
    f.x = x
    return f.kalman_filter()["log_evidence"]


def test_fisher_resampling_gradient_is_consistent_for_model_parameters():
    """d log Z-hat / d a, averaged over runs, against the exact score from the Kalman filter
    (central differences); the "drop" treatment (FIVO) is biased here by more than 3 se."""
    fx = LinearGaussianSSM(num_time_steps=50, seed=3)
    x, a0, h = fx.x, 0.7, 1e-5
    exact = (_exact_loglik(x, a0 + h) - _exact_loglik(x, a0 - h)) / (2 * h)
    grads = {}
    for rg in ("fisher", "drop"):
        gs = []
        for _ in range(80):
            a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
            pf = ParticleFilter(_ParamLGSSM(a), None, 1000, resampling_gradient=rg, record=False)
            (g,) = torch.autograd.grad(pf.filter(x[1:], init_kwargs={"initial": x[0]}), [a])
            gs.append(float(g))
        grads[rg] = (np.mean(gs), np.std(gs) / math.sqrt(len(gs)))
    m, se = grads["fisher"]
    assert abs(m - exact) < 3 * se, (m, se, exact)
    m, se = grads["drop"]
    assert abs(m - exact) > 3 * se, (m, se, exact)


def test_backend_learns_the_transition_by_particle_maximum_likelihood():
    fx = LinearGaussianSSM(num_time_steps=100, seed=3)
    x = fx.x
    grid = np.linspace(0.6, 1.0, 81)
    a_mle = grid[int(np.argmax([_exact_loglik(x, float(a)) for a in grid]))]
    backend = SMCFilterBackend(_ParamLGSSM(None), None, pyro.optim.Adam({"lr": 0.02}), num_particles=200)
    fit = backend.run(x[1:], init_kwargs={"initial": x[0]}, num_steps=150)
    a = pyro.param("a").item()
    assert abs(a - a_mle) < 0.05, (a, a_mle)
    assert fit.losses[-20:].mean() < fit.losses[:5].mean()
    est = fit.log_evidence(500, num_runs=5)
    assert abs(est.log_evidence - _exact_loglik(x, a)) < 4 * est.stderr + 0.2
    traj = fit.posterior_samples(50)
    assert traj["z"].shape == (50, 100)


# --------------------------------------------------------------------------- refusals
def test_static_model_refused_by_filter():
    def model(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(IncompatibleModelError, match="backend='smc'"):
        ParticleFilter(model, None, 10)
    with pytest.raises(IncompatibleModelError, match="backend='smc'"):
        SMCFilterBackend(model).run(torch.zeros(3), num_steps=1)


@pytest.mark.parametrize("bad, match", [
    (dict(ess_threshold=1.5), "ess_threshold"),
    (dict(resampling="residual"), "resampling"),
    (dict(num_particles=0), "num_particles"),
    (dict(resampling_gradient="score"), "resampling_gradient"),
])
def test_bad_filter_options(bad, match):
    fx = LinearGaussianSSM(num_time_steps=3)
    opts = dict(num_particles=10)
    opts.update(bad)
    with pytest.raises(ValueError, match=match):
        ParticleFilter(fx.smc_model(), None, **opts)


def test_step_before_init_and_failed_filter():
    fx = LinearGaussianSSM(num_time_steps=3)
    pf = ParticleFilter(fx.smc_model(), None, 10)
    with pytest.raises(RuntimeError, match="init"):
        pf.step(fx.x[0])

    class Impossible:
        def init(self, state):
            state["z"] = pyro.sample("z", dist.Uniform(torch.zeros((), dtype=torch.float64), 1.0))

        def step(self, state, y):
            z = pyro.sample("z", dist.Uniform(torch.zeros((), dtype=torch.float64), 1.0))
            pyro.sample("y", dist.Uniform(z - 0.5, z), obs=y)  # y = 5 has zero density
            state["z"] = z

    # (with validation on, torch already refuses y outside the support; off, the weights are -inf)
    with pyro.validation_enabled(False), pytest.raises(FloatingPointError, match="step 1"):
        ParticleFilter(Impossible(), None, 10).filter(torch.tensor([5.0], dtype=torch.float64))


@pytest.mark.parametrize("device", cuda_params())
def test_filter_device_follows_model(device):
    fx = LinearGaussianSSM(num_time_steps=10, seed=0, device=device)
    pf = ParticleFilter(fx.smc_model(), None, 100)
    log_z = pf.filter(fx.x[1:], init_kwargs={"initial": fx.x[0]})
    assert log_z.device.type == device


class _LinearProposal:
    """Proposal N(cz * z_prev + cx * x_t, s^2) with learnable coefficients (bootstrap at start)."""

    def init(self, state, initial=None):
        pyro.sample("z", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))

    def step(self, state, x=None):
        cz = pyro.param("p.cz", torch.tensor(0.9, dtype=torch.float64))
        cx = pyro.param("p.cx", torch.tensor(0.0, dtype=torch.float64))
        s = pyro.param("p.s", torch.tensor(0.5, dtype=torch.float64), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(cz * state["z"] + cx * x, s))


def test_proposal_learned_without_resampling_approaches_the_locally_optimal_one():
    """Trained with ess_threshold=0 (the SIS bound, exact reparameterized gradient), the linear
    proposal moves from the bootstrap (0.9, 0, 0.5) to near the locally optimal proposal
    p(z_t | z_{t-1}, x_t) = N(v a / q^2 z + v / r^2 x, v), v = 1 / (1/q^2 + 1/r^2): (0.596, 0.338,
    0.407).  The SIS optimum in this family conditions on x_t only, as the locally optimal
    proposal does, but weighs the whole sequence, so the two agree only approximately: 15%."""
    fx = LinearGaussianSSM(num_time_steps=40, seed=0)
    backend = SMCFilterBackend(fx.smc_model(), _LinearProposal(), pyro.optim.Adam({"lr": 0.02}),
                               num_particles=50, ess_threshold=0.0)
    backend.run(fx.x[1:], init_kwargs={"initial": fx.x[0]}, num_steps=200)
    v = 1 / (1 / fx.process_scale ** 2 + 1 / fx.obs_scale ** 2)
    optimal = {"p.cz": v * fx.transition / fx.process_scale ** 2, "p.cx": v / fx.obs_scale ** 2, "p.s": math.sqrt(v)}
    for name, target in optimal.items():
        assert abs(pyro.param(name).item() / target - 1) < 0.15, (name, pyro.param(name).item(), target)
    # filtering with the learned proposal keeps the evidence right
    vals = []
    for _ in range(NUM_RUNS):
        pf = ParticleFilter(fx.smc_model(), _LinearProposal(), 200, record=False)
        with torch.no_grad():
            vals.append(pf.filter(fx.x[1:], init_kwargs={"initial": fx.x[0]}))
    v = torch.stack(vals)
    assert abs(float(v.mean()) - fx.exact_log_evidence()) < 3 * float(v.std()) / math.sqrt(NUM_RUNS)


# --------------------------------------------------------------------------- Pyro's counter pattern
class _CountingLGSSM:
    """The LinearGaussianSSM fixture written in the style of Pyro's SimpleHarmonicModel: a step
    counter on ``self`` names the sites ``z_1``, ``z_2``, ... (allowed by Pyro's SMCFilter
    contract)."""

    def __init__(self, fx):
        self.fx, self.t = fx, 0

    def init(self, state, initial=None):
        self.t = 0
        f = self.fx
        z = pyro.sample("z_0", dist.Normal(torch.zeros((), dtype=f.dtype), f.init_scale))
        pyro.sample("x_0", dist.Normal(z, f.obs_scale), obs=initial)
        state["z"] = z

    def step(self, state, x=None):
        self.t += 1
        f = self.fx
        z = pyro.sample(f"z_{self.t}", dist.Normal(f.transition * state["z"], f.process_scale))
        pyro.sample(f"x_{self.t}", dist.Normal(z, f.obs_scale), obs=x)
        state["z"] = z


def test_filter_fit_is_first_class_for_a_counting_model():
    """ppl_lvm.fit(..., backend="smc_filter", init_kwargs=...) on a model that counts its steps
    on self: smoothed draws against the RTS smoother, ArviZ groups with a time dimension,
    the run's ESS history in sample_stats, and the log-evidence against the Kalman filter."""
    import arviz as az

    pyro.set_rng_seed(0)
    fx = LinearGaussianSSM(num_time_steps=30, seed=2)
    model = _CountingLGSSM(fx)
    fit = ppl_lvm.fit(model, None, fx.x[1:], backend="smc_filter", num_particles=2000, num_steps=1,
                      init_kwargs={"initial": fx.x[0]}, progress=False)
    rts = fx.kalman_smoother()
    M = 400
    draws = fit.posterior_samples(M)
    assert draws["z"].shape == (M, 30) and model.t == 29  # the counter is left as filtering left it
    # bootstrap filter: ESS well below K; allow the particle term with ESS >= K/10
    se = (rts["var"] * (1.0 / M + 10.0 / 2000)).sqrt()
    z = (draws["z"].mean(0) - rts["mean"]) / se
    assert float(z.abs().max()) < 4.5, z
    idata = fit.to_inferencedata(M)
    assert isinstance(idata, az.InferenceData)
    assert idata.posterior["z"].dims == ("chain", "draw", "time") and idata.posterior["z"].shape == (1, M, 30)
    assert idata.posterior["z_filtered"].shape == (1, M, 30)
    ess = idata.sample_stats["filter_ess"]
    assert ess.dims == ("chain", "draw", "time") and float(ess.max()) <= 2000 and float(ess.min()) > 0
    assert idata.observed_data["observations"].shape == (29,)
    run_lz = float(idata.sample_stats.attrs["log_evidence"])
    # the filtering draws' mean at the last step against the Kalman filter's (the smoothing and
    # filtering distributions agree there)
    kf = fx.kalman_filter()
    last = idata.posterior["z_filtered"].values[0, :, -1]
    assert abs(last.mean() - float(kf["filter_mean"][-1])) < 4 * math.sqrt(float(kf["filter_var"][-1]) * (1 / M + 10 / 2000))
    est = fit.log_evidence(num_runs=8)
    exact = float(fx.exact_log_evidence())
    assert abs(est.log_evidence - exact) < 4 * est.stderr + 0.05, (est, exact)
    assert abs(run_lz - exact) < 1.0
