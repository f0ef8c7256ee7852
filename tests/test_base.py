"""The fit loop: NaN guard, callbacks, checkpoint/resume, registry."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lvm
from ppl_lvm import SVI, Checkpoint, DivergenceError, EarlyStopping
from ppl_lvm.inference import BACKENDS, Backend, get_backend, list_backends
from ppl_lvm.testing import NormalNormalGlobal, NormalNormalLocal


def _params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_stops_with_clear_error_and_keeps_last_good_state():
    x = torch.tensor([0.5, -0.2, 1.0])
    scale_holder = {"bad": False}

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("d", 3):
            loc = z * (torch.tensor(float("nan")) if scale_holder["bad"] else 1.0)
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    pyro.enable_validation(False)

    def poison(backend, step, loss):
        if step == 4:
            scale_holder["bad"] = True
        return False

    backend = SVI(model, guide, optim=pyro.optim.Adam({"lr": 0.1}))
    snapshots = []
    with pytest.raises(DivergenceError, match=r"step 5: the objective is nan.*update was skipped") as info:
        backend.run(x, num_steps=50, callbacks=[poison, lambda b, s, l: snapshots.append(_params()) and False])
    err = info.value
    assert err.step == 5 and backend.num_steps == 5
    assert err.fit is not None and len(err.fit.losses) == 5
    # parameters are those after the last finite step
    torch.testing.assert_close(_params()["m"], snapshots[-1]["m"])
    assert torch.isfinite(pyro.param("m")).all()


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_nan_gradient_is_caught_even_when_loss_is_finite():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        m = pyro.param("m", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(_NanGrad.apply(m), 1.0))

    backend = SVI(model, guide)
    with pytest.raises(DivergenceError, match="gradient of parameter 'm' is not finite"):
        backend.step()
    assert backend.num_steps == 0
    assert float(pyro.param("m").detach()) == 0.0
    assert pyro.param("m").unconstrained().grad is None or float(pyro.param("m").unconstrained().grad) == 0.0


def test_early_stopping_stops_the_run():
    fx = NormalNormalGlobal()
    stopper = EarlyStopping(patience=30, window=10)
    fit = SVI(fx.model, fx.guide, optim=pyro.optim.Adam({"lr": 0.1})).run(*fx.args, num_steps=5000, callbacks=[stopper])
    assert stopper.stopped_at is not None and fit.num_steps == stopper.stopped_at + 1 < 5000


def _make(fx):
    return SVI(fx.model, fx.guide, optim=pyro.optim.Adam({"lr": 0.05}), num_particles=2, vectorize_particles=True)


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    fx = NormalNormalLocal(num_data=10)
    pyro.set_rng_seed(123)
    _make(fx).run(*fx.args, num_steps=40)
    uninterrupted = _params()

    pyro.clear_param_store()
    pyro.set_rng_seed(123)
    first = _make(fx)
    fit = first.run(*fx.args, num_steps=25)
    fit.save(tmp_path / "ckpt.pt")
    # wreck the process state, as a new session would have it
    pyro.clear_param_store()
    pyro.set_rng_seed(999)
    torch.randn(17)

    resumed = _make(fx)
    fit2 = ppl_lvm.Fit.load(tmp_path / "ckpt.pt", resumed, *fx.args)
    assert fit2.num_steps == 25
    fit2 = resumed.run(*fx.args, num_steps=15)
    assert fit2.num_steps == 40 and len(fit2.losses) == 40
    resumed_params = _params()
    assert uninterrupted.keys() == resumed_params.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed_params[k]), k


def test_checkpoint_callback_writes_files(tmp_path):
    fx = NormalNormalGlobal()
    path = tmp_path / "every.pt"
    SVI(fx.model, fx.guide).run(*fx.args, num_steps=20, callbacks=[Checkpoint(path, every=10)])
    state = torch.load(path, weights_only=False)
    assert state["num_steps"] == 20 and state["backend"] == "SVI"


def test_loading_a_foreign_file_is_a_clear_error(tmp_path):
    fx = NormalNormalGlobal()
    torch.save({"x": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a ppl_lvm checkpoint"):
        SVI(fx.model, fx.guide).load(tmp_path / "junk.pt")


def test_registry_and_fit_shortcut():
    assert get_backend("svi") is SVI and get_backend(SVI) is SVI
    assert "svi" in list_backends() and all(issubclass(c, Backend) for c in BACKENDS.values())
    fx = NormalNormalGlobal()
    fit = ppl_lvm.fit(fx.model, fx.guide, *fx.args, backend="SVI", num_steps=30, optim=pyro.optim.Adam({"lr": 0.05}))
    assert isinstance(fit, ppl_lvm.Fit) and fit.num_steps == 30
    with pytest.raises(TypeError, match="Invalid option for backend 'svi'"):
        ppl_lvm.fit(fx.model, fx.guide, *fx.args, backend="svi", num_step=3)


def test_progress_bar_can_be_forced(capsys):
    fx = NormalNormalGlobal()
    SVI(fx.model, fx.guide).run(*fx.args, num_steps=10, progress=True)
    err = capsys.readouterr().err
    assert "SVI" in err and "10/10" in err and "loss=" in err


def test_predictive_and_posterior_sample_shapes():
    fx = NormalNormalLocal(num_data=8)
    fit = SVI(fx.model, fx.guide).run(*fx.args, num_steps=5)
    post = fit.posterior_samples(30)
    assert post["z"].shape == (30, 8)
    pred = fit.predictive(30)
    assert pred["x"].shape == (30, 8)
    # observed sites are replicated, not copied from the data
    assert float(pred["x"].std(0).min()) > 0.1
    assert not torch.equal(pred["x"][0], fx.args[0])
    with pytest.raises(ValueError, match="Unknown site"):
        fit.posterior_samples(5, sites=["nope"])


def test_plot_losses_returns_axes():
    import matplotlib

    matplotlib.use("Agg")
    fx = NormalNormalGlobal()
    fit = SVI(fx.model, fx.guide).run(*fx.args, num_steps=60)
    ax = fit.plot_losses(smooth=10)
    assert len(ax.lines) == 2 and ax.get_xlabel() == "step"


def test_log_loss_callback(caplog):
    import logging

    fx = NormalNormalGlobal()
    logger = ppl_lvm.LogLoss(every=10)
    with caplog.at_level(logging.INFO, logger="ppl_lvm"):
        SVI(fx.model, fx.guide).run(*fx.args, num_steps=30, callbacks=[logger])
    assert [s for s, _ in logger.history] == [9, 19, 29]
    assert "SVI step 30: loss" in caplog.text
    with pytest.raises(TypeError, match="each callback must be a callable"):
        SVI(fx.model, fx.guide).run(*fx.args, num_steps=3, callbacks=[object()])


def test_fit_methods_keep_the_data_when_only_keywords_are_given():
    fx = NormalNormalLocal(num_data=12)
    fit = SVI(fx.model, fx.guide).run(*fx.args, num_steps=5)
    assert fit.posterior_samples(4)["z"].shape == (4, 12)
    ev = fit.log_evidence(50)
    assert ev.pointwise.shape == (12,) and ev.pointwise_khat.shape == (12,)
    assert ev.log_evidence == pytest.approx(float(ev.pointwise.sum()))


def test_gradients_returns_an_estimate_without_updating():
    fx = NormalNormalGlobal()
    backend = SVI(fx.model, fx.guide, num_particles=4, vectorize_particles=True)
    backend.setup(*fx.args)
    before = _params()
    loss, grads = backend.gradients(*fx.args)
    assert set(grads) == {"normal_global.loc", "normal_global.scale"}
    assert all(torch.isfinite(g).all() for g in grads.values()) and loss > 0
    after = _params()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert backend.num_steps == 0


def test_keyword_only_override_keeps_positional_data():
    from ppl_lvm import IWAE
    from ppl_lvm.models import VAE

    x, _ = VAE.simulate(num_data=20, obs_dim=8, latent_dim=2)
    vae = VAE(8, latent_dim=2, hidden=(8,), name="kwonly")
    fit = IWAE(vae.model, vae.guide, num_particles=2).run(x, num_steps=3, subsample_size=5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ev = fit.log_evidence(20, subsample_size=None)  # keeps x, switches subsampling off
    assert ev.pointwise.shape == (20,)


def test_a_runaway_loss_is_divergence_not_a_result():
    """GPFA in float32 without initialize(): the ELBO estimate ran off to -1e27 (a covariance
    gone singular at float32 resolution) and was returned as a fit.  A loss below the lowest
    value any negative log-density of the model can take (ProgramStructure.loss_floor) now
    stops the run with DivergenceError, the update not applied, the fit so far in err.fit."""
    from ppl_lvm.errors import DivergenceError
    from ppl_lvm.models import GPFA

    y, times, _ = GPFA.simulate(obs_dim=30, seed=0, dtype=torch.float32)
    g = GPFA(3, 30, name="runaway")
    with pytest.raises(DivergenceError, match="below") as info, pytest.warns(RuntimeWarning, match="float64"):
        ppl_lvm.fit(g.model, g.guide, y, times, backend="svi", num_steps=200)
    fit = info.value.fit
    assert fit is not None and 0 < fit.num_steps < 200
    floor = fit.backend._loss_floor
    assert floor is not None and np.all(fit.losses >= floor)
    # the floor is far below any value a sane fit reaches: float64 runs to completion
    pyro.clear_param_store()
    y64, times64, _ = GPFA.simulate(num_trials=20, num_bins=20, obs_dim=30, seed=0)
    g = GPFA(3, 30, name="runaway64")
    fit = ppl_lvm.fit(g.model, g.guide, y64, times64, backend="svi", num_steps=100)
    assert fit.num_steps == 100 and fit.losses[-1] < fit.losses[0]
