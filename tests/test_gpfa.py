"""GPFA: exact E-step against a hand-built joint Gaussian, the linear-time (Kalman) form against
the dense form, monotone EM and latent recovery, leave-neuron-out against refitting without the
neuron, Poisson GPFA by SVI, S-GPFA, unequal lengths/irregular grids, broadcasting over particle
plates, input checks, devices and the plotting helper."""

import math

import numpy as np
import pyro
import pytest
import torch

import ppl_lvm
from ppl_lvm.models import GPFA, SharedGPFA
from ppl_lvm.models.gpfa import kernel_matrix, latent_r2
from ppl_lvm.traces import PotentialEnergy, structure_from_trace, trace_program

from tests.helpers import cuda_params

F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _joint_gaussian(C, d, R, K, times_len):
    """The whole trial as one Gaussian over (x in (latent, time) order, y in (time, neuron)
    order), built element by element."""
    q, T = K.shape[0], times_len
    D = C.shape[0]
    Kx = torch.block_diag(*K)  # (qT, qT), index i*T + t
    Cb = torch.zeros(T * D, q * T, dtype=F64)
    for t in range(T):
        for i in range(q):
            Cb[t * D:(t + 1) * D, i * T + t] = C[:, i]
    Sy = Cb @ Kx @ Cb.T + torch.diag(R.repeat(T))
    return Kx, Cb, Sy, d.repeat(T)


def _brute_posterior(C, d, R, K, y):
    """Posterior mean (T, q), per-time covariances (T, q, q) and log p(y) of one trial."""
    T, q = y.shape[0], K.shape[0]
    Kx, Cb, Sy, my = _joint_gaussian(C, d, R, K, T)
    gain = torch.linalg.solve(Sy, Cb @ Kx).T
    mean = gain @ (y.reshape(-1) - my)
    cov = Kx - gain @ Cb @ Kx
    cov = cov.reshape(q, T, q, T)
    per_t = torch.stack([cov[:, t, :, t] for t in range(T)])
    ll = torch.distributions.MultivariateNormal(my, Sy).log_prob(y.reshape(-1))
    return mean.reshape(q, T).T, per_t, ll


def _prior_K(kind, tau, times, eps=1e-3):
    T = times.shape[0]
    return (1 - eps) * kernel_matrix(kind, tau, times) + eps * torch.eye(T, dtype=F64)


def _small_case(kind, seed=0, q=2, D=4, T=6, n=3):
    g = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(T, generator=g, dtype=F64) + 0.2, 0)  # irregular grid
    y, _, truth = GPFA.simulate(num_trials=n, num_bins=T, num_latents=q, obs_dim=D, kernel=kind, times=times,
                                seed=seed)
    tau = torch.tensor([1.3, 2.9], dtype=F64)[:q]
    model = GPFA(q, D, kernel=kind, name=f"small_{kind}")
    model.set_params(truth["C"], truth["d"], tau, truth["R"])
    return model, y, times, truth, tau


@pytest.mark.parametrize("kind", ["rbf", "matern12", "matern32", "matern52"])
def test_kernel_matches_gpytorch(kind):
    """Our closed-form kernels equal gpytorch's (exact math)."""
    import gpytorch

    t = torch.linspace(0, 5, 9, dtype=F64)
    ls = torch.tensor([0.7, 2.0], dtype=F64)
    if kind == "rbf":
        k = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2]))
    else:
        k = gpytorch.kernels.MaternKernel(nu={"matern12": 0.5, "matern32": 1.5, "matern52": 2.5}[kind],
                                          batch_shape=torch.Size([2]))
    k = k.double()
    k.lengthscale = ls[:, None, None]
    ref = k(t[:, None], t[:, None]).to_dense()
    torch.testing.assert_close(kernel_matrix(kind, ls, t), ref, rtol=1e-10, atol=1e-12)
    # a gpytorch kernel sets the family and the initial timescales
    model = GPFA(2, 3, kernel=k)
    assert model.kind == kind
    torch.testing.assert_close(model.tau_init, ls)


@pytest.mark.parametrize("kind", ["rbf", "matern32"])
def test_dense_estep_matches_joint_gaussian(kind):
    """The batched E-step equals conditioning the hand-built joint Gaussian of (x, y), to 1e-8."""
    model, y, times, truth, tau = _small_case(kind)
    out = model.transform(y, times, method="dense")
    K = _prior_K(kind, tau, times)
    for n in range(y.shape[0]):
        mean, cov, ll = _brute_posterior(truth["C"], truth["d"], truth["R"], K, y[n])
        torch.testing.assert_close(out["mean"][n], mean, rtol=0, atol=1e-8)
        torch.testing.assert_close(out["cov"][n], cov, rtol=0, atol=1e-8)
        assert abs(float(out["log_likelihood"][n] - ll)) < 1e-8


@pytest.mark.parametrize("kind", ["matern12", "matern32", "matern52"])
def test_kalman_form_matches_dense_form(kind):
    """The linear-time Kalman/RTS E-step gives the dense form's log-likelihood, means and
    covariances on short irregular trials of unequal lengths (float64, 1e-8)."""
    model, y, times, truth, tau = _small_case(kind, T=9, n=4)
    ys = [y[0], y[1, :5], y[2, :9], y[3, :2]]
    ts = [times, times[:5], times + 0.37, times[:2] * 1.5]
    dense = model.transform(ys, ts, method="dense")
    kal = model.transform(ys, ts, method="kalman")
    assert kal["method"] == "kalman" and dense["method"] == "dense"
    torch.testing.assert_close(kal["log_likelihood"], dense["log_likelihood"], rtol=0, atol=1e-8)
    torch.testing.assert_close(kal["mean"], dense["mean"], rtol=0, atol=1e-8)
    torch.testing.assert_close(kal["cov"], dense["cov"], rtol=0, atol=1e-8)
    # and both equal the joint Gaussian for the shortened trial
    K = _prior_K(kind, tau, ts[3])
    _, _, ll = _brute_posterior(truth["C"], truth["d"], truth["R"], K, ys[3])
    assert abs(float(kal["log_likelihood"][3] - ll)) < 1e-8


def test_unequal_lengths_equal_separate_trials():
    """Padding and grouping do not leak between trials: each trial's posterior in a ragged
    batch equals the posterior of that trial on its own (dense, grids batched by length)."""
    model, y, times, _, _ = _small_case("rbf", T=8, n=4)
    ys = [y[0], y[1, :5], y[2, :5], y[3, :3]]
    ts = [times, times[:5], times[:5] * 0.8, times[:3]]
    out = model.transform(ys, ts)
    for n in range(4):
        alone = model.transform(ys[n][None], ts[n])
        L = ys[n].shape[0]
        torch.testing.assert_close(out["mean"][n, :L], alone["mean"][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(out["log_likelihood"][n], alone["log_likelihood"][0], rtol=0, atol=1e-9)
        assert bool((out["mean"][n, L:] == 0).all())


def test_model_log_density_with_padding_is_sum_over_trials():
    """In the Pyro model, padded points touch no observation and their latents are independent
    N(0, 1) dummies: the log joint of a ragged batch equals the sum of the single-trial log
    joints at the same latent values plus the dummies' standard-normal log-density."""
    model, y, times, _, _ = _small_case("matern32", T=7, n=2)
    ys, ts = [y[0], y[1, :4]], [times, times[:4]]
    tr = trace_program(model.model, (ys, ts), {})
    x = tr.nodes["small_matern32.x"]["value"].detach()
    total = trace_program(pyro.poutine.condition(model.model, {"small_matern32.x": x}), (ys, ts), {}).log_prob_sum()
    parts = 0.0
    for n, L in enumerate([7, 4]):
        cond = pyro.poutine.condition(model.model, {"small_matern32.x": x[n:n + 1, :, :L]})
        parts = parts + trace_program(cond, (ys[n][None], ts[n]), {}).log_prob_sum()
    dummies = torch.distributions.Normal(0.0, 1.0).log_prob(x[1, :, 4:]).sum()
    assert abs(float((total - parts - dummies).detach())) < 1e-9


@pytest.fixture(scope="module")
def fitted_50():
    """3 latents, 50 neurons, 100 trials of 50 bins; exact EM with the RBF kernel."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the function-level one_thread
    try:
        y, times, truth = GPFA.simulate(num_trials=100, num_bins=50, num_latents=3, obs_dim=50, seed=0)
        model = GPFA(3, 50, name="fit50")
        history = model.fit_em(y, times, max_iter=40, tol=0.0)
    finally:
        torch.set_num_threads(threads)
    return model, y, times, truth, history


def test_em_is_monotone_and_recovers_latents(fitted_50):
    model, y, times, truth, history = fitted_50
    h = np.asarray(history)
    assert len(h) == 41
    # exact EM never decreases the marginal likelihood (slack: float64 rounding of a sum of 250k terms)
    assert np.all(np.diff(h) >= -1e-9 * abs(h[-1])), np.diff(h).min()
    assert h[-1] - h[0] > 100.0  # it moved away from the PCA start
    out = model.transform(y, times)
    r2_true_on_fit = latent_r2(out["mean"], truth["x"])  # each inferred dim from the true latents
    r2_fit_on_true = latent_r2(truth["x"], out["mean"])  # and each true dim from the inferred ones
    assert bool((r2_true_on_fit >= 0.85).all()), r2_true_on_fit
    assert bool((r2_fit_on_true >= 0.85).all()), r2_fit_on_true


def test_orthonormalized_latents(fitted_50):
    """C x = U x_orth with U orthonormal, and the orthonormalized dims are ordered by scale."""
    model, y, times, _, _ = fitted_50
    out = model.transform(y[:5], times)
    U, W = model.orthonormal_basis()
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(out["mean_orth"] @ U.T, out["mean"] @ model.C.detach().T, rtol=0, atol=1e-9)
    torch.testing.assert_close(out["cov_orth"], W @ out["cov"] @ W.T)
    S = torch.linalg.svdvals(model.C.detach())
    assert bool((S[:-1] >= S[1:]).all())


def test_leave_neuron_out_equals_refitting_without_the_neuron():
    """Yu et al.'s criterion computed in one batch equals, neuron by neuron, the posterior of a
    model whose j-th neuron was removed; the Kalman form gives the same numbers."""
    model, y, times, truth, tau = _small_case("matern32", D=5, T=7, n=3)
    err = model.leave_neuron_out_error(y, times, method="dense")
    err_k = model.leave_neuron_out_error(y, times, method="kalman")
    torch.testing.assert_close(err_k, err, rtol=1e-9, atol=1e-9)
    for j in range(5):
        keep = [k for k in range(5) if k != j]
        sub = GPFA(2, 4, kernel="matern32", name=f"lno{j}")
        sub.set_params(truth["C"][keep], truth["d"][keep], tau, truth["R"][keep])
        mu = sub.transform(y[..., keep], times)["mean"]
        pred = mu @ truth["C"][j] + truth["d"][j]
        assert abs(float((pred - y[..., j]).pow(2).sum() - err[j])) < 1e-8
    reduced = model.leave_neuron_out_error(y, times, num_dims=[1, 2])
    torch.testing.assert_close(reduced[2], err)
    assert float(reduced[1].sum()) >= float(err.sum()) - 1e-9  # fewer dims predict worse here


def test_kalman_em_is_monotone_and_linear_time_fit_recovers():
    """EM with the state-space E-step (complete data = the Matérn state path) never decreases
    the exact log-likelihood, and recovers the latents of long trials."""
    y, times, truth = GPFA.simulate(num_trials=10, num_bins=300, num_latents=3, obs_dim=30, kernel="matern32",
                                    tau=[10.0, 20.0, 30.0], seed=4)
    model = GPFA(3, 30, kernel="matern32", method="kalman", tau_init=5.0, name="kal")
    h = np.asarray(model.fit_em(y, times, max_iter=15, tol=0.0))
    assert np.all(np.diff(h) >= -1e-9 * abs(h[-1])), np.diff(h).min()
    r2 = latent_r2(truth["x"], model.transform(y, times)["mean"])
    assert bool((r2 >= 0.85).all()), r2
    # the timescales moved from 5 towards the truth (the slowest latent is well above 5)
    assert float(model.tau.detach().max()) > 10.0


def test_poisson_gpfa_svi_recovers_latents():
    """Variational Poisson GPFA (structured Gaussian guide, generic SVI backend) on simulated
    counts: R^2 >= 0.7 per true latent, and SVI improves on its Gaussian-EM starting point."""
    y, times, truth = GPFA.simulate(num_trials=20, num_bins=40, num_latents=3, obs_dim=50, likelihood="poisson",
                                    seed=2)
    model = GPFA(3, 50, likelihood="poisson", name="pois")
    model.initialize(y, times, em_iters=15)
    start = latent_r2(truth["x"], pyro.param("pois.x_loc").detach().transpose(-1, -2))
    fit = ppl_lvm.fit(model.model, model.guide, y, times, backend="svi", num_steps=500,
                      optim=pyro.optim.Adam({"lr": 0.02}), progress=False)
    losses = np.asarray(fit.losses)
    assert losses[-50:].mean() < losses[:50].mean()
    r2 = latent_r2(truth["x"], pyro.param("pois.x_loc").detach().transpose(-1, -2))
    assert bool((r2 >= 0.7).all()), r2
    assert float(r2.mean()) > float(start.mean()), (start, r2)


def test_shared_gpfa_is_gpfa_on_stacked_subjects():
    """S-GPFA's EM equals GPFA's on the subjects stacked along neurons (exact), its Pyro model
    observes each subject at its own site with the same log joint, and sharing the latents
    recovers them better than the smaller subject alone."""
    ys, times, truth = SharedGPFA.simulate_subjects((12, 4), num_trials=30, num_bins=25, seed=3,
                                                    noise_range=(1.0, 2.0))
    shared = SharedGPFA(3, [12, 4], name="sg")
    h1 = shared.fit_em(ys, times, max_iter=10, tol=0.0)
    stacked = GPFA(3, 16, name="st")
    h2 = stacked.fit_em(torch.cat(ys, -1), times, max_iter=10, tol=0.0)
    np.testing.assert_allclose(h1, h2, rtol=1e-12)
    C1, d1, R1 = shared.subject_params(1)
    torch.testing.assert_close(C1, stacked.C.detach()[12:])
    tr = trace_program(shared.model, (ys, times), {})
    assert {"sg.y0", "sg.y1"} <= set(tr.nodes)
    x = tr.nodes["sg.x"]["value"].detach()
    lp_shared = trace_program(pyro.poutine.condition(shared.model, {"sg.x": x}), (ys, times), {}).log_prob_sum()
    lp_stack = trace_program(pyro.poutine.condition(stacked.model, {"st.x": x}), (torch.cat(ys, -1), times),
                             {}).log_prob_sum()
    assert abs(float((lp_shared - lp_stack).detach())) < 1e-8
    alone = GPFA(3, 4, name="alone")
    alone.fit_em(ys[1], times, max_iter=10, tol=0.0)
    r2_shared = latent_r2(truth["x"], shared.transform(ys, times)["mean"])
    r2_alone = latent_r2(truth["x"], alone.transform(ys[1], times)["mean"])
    assert float(r2_shared.min()) > float(r2_alone.min())


def test_model_broadcasts_over_a_particle_plate():
    """The vectorized potential (chain plate on the left) equals one evaluation per chain."""
    model, y, times, _, _ = _small_case("rbf", T=5, n=3)
    tr = trace_program(model.model, (y, times), {})
    st = structure_from_trace(tr)
    pe = PotentialEnergy(model.model, st, st.max_plate_nesting)
    draws = [trace_program(model.model, (y, times), {}) for _ in range(3)]
    values = {n: torch.stack([d.nodes[n]["value"].detach() for d in draws]) for n in st.latent_sites}
    u = pe.unconstrain(values)
    U = pe(u, (y, times), {})
    assert pe.mode == "plate"
    for c in range(3):
        single = PotentialEnergy(model.model, st, st.max_plate_nesting, mode="vmap")(
            {n: v[c:c + 1] for n, v in u.items()}, (y, times), {})
        torch.testing.assert_close(U[c], single[0])


def _bad_calls():
    y = torch.randn(3, 6, 4, dtype=F64)
    t = torch.arange(6, dtype=F64)
    nan = y.clone()
    nan[1, 2, 3] = float("nan")
    back = t.clone()
    back[3] = 1.0
    return [
        ((y[..., :3], t), ValueError, "shape"),
        ((y[0], t), ValueError, "unsqueeze"),
        ((nan, t), ValueError, "NaN"),
        ((y, t[:5]), ValueError, "times must have shape"),
        ((y, back), ValueError, "strictly increasing"),
        ((y.numpy(), t), TypeError, "tensor"),
        ((y.long(), t), TypeError, "floating"),
        (([y[0], y[1, :3]], [t]), ValueError, "list of 2"),
        (([y[0], y[1, :3]], [t, t]), ValueError, "times\\[1\\]"),
    ]


@pytest.mark.parametrize("args, exc, match", _bad_calls())
@pytest.mark.parametrize("entry", ["model", "fit_em", "transform"])
def test_bad_input_is_refused_before_any_work(args, exc, match, entry):
    model = GPFA(2, 4, name="bad")
    with pytest.raises(exc, match=match):
        if entry == "model":
            model.model(*args)
        elif entry == "fit_em":
            model.fit_em(*args)
        else:
            model.set_params(torch.randn(4, 2, dtype=F64), torch.zeros(4, dtype=F64), torch.ones(2, dtype=F64),
                             torch.ones(4, dtype=F64))
            model.transform(*args)
    assert entry == "transform" or not model.initialized  # nothing was set up


@pytest.mark.parametrize("kwargs, match", [
    (dict(likelihood="bernoulli"), "likelihood"),
    (dict(kernel="periodic"), "kernel"),
    (dict(kernel="rbf", method="kalman"), "Matérn"),
    (dict(gp_noise=0.0), "gp_noise"),
    (dict(tau_init=-1.0), "tau_init"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPFA(2, 4, **kwargs)


def test_poisson_input_and_em_refusals():
    model = GPFA(2, 4, likelihood="poisson", name="pbad")
    y = torch.ones(2, 5, 4, dtype=F64)
    with pytest.raises(ValueError, match="integer counts"):
        model.model(y * 0.5)
    with pytest.raises(ValueError, match="exact EM"):
        model.fit_em(y)
    with pytest.raises(ValueError, match="lengths"):
        GPFA(2, 4, name="lbad").model(y, None, torch.tensor([5, 6]))


@pytest.mark.parametrize("device", cuda_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_follow_the_data(device, dtype):
    y, times, truth = GPFA.simulate(num_trials=8, num_bins=12, num_latents=2, obs_dim=6, seed=5, dtype=dtype)
    y, times = y.to(device), times.to(device)
    for method, kernel in (("dense", "rbf"), ("kalman", "matern32")):
        model = GPFA(2, 6, kernel=kernel, method=method, name=f"dev_{method}")
        h = model.fit_em(y, times, max_iter=5)
        assert all(math.isfinite(v) for v in h)
        out = model.transform(y, times)
        assert out["mean"].device.type == device and out["mean"].dtype == dtype
        assert model.C.device.type == device and model.C.dtype == dtype
        tr = trace_program(model.model, (y, times), {})
        assert tr.nodes[f"dev_{method}.x"]["value"].dtype == dtype


def test_plot_latents_returns_axes():
    import matplotlib

    matplotlib.use("Agg")
    y, times, truth = GPFA.simulate(num_trials=3, num_bins=10, num_latents=2, obs_dim=5, seed=1)
    axes = GPFA.plot_latents(truth["x"], times, truth=truth["x"])
    assert len(axes) == 2 and len(axes[0].lines) == 6
    with pytest.raises(ValueError, match="latents"):
        GPFA.plot_latents(truth["x"][0])
