"""First-use friction: where keywords go, non-tensor data, enumerated sites under backends that
cannot sum them out, progress bars without ipywidgets."""
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lvm
from ppl_lvm.errors import ModelGuideMismatchError
from ppl_lvm.models import VAE
from ppl_lvm.testing import ConjugateLinearRegression


def test_model_keywords_given_to_fit_reach_the_model():
    """ppl_lvm.fit(vae.model, vae.guide, x, backend="svi", subsample_size=100) was refused as
    an invalid backend option; the model takes it, so it goes to the model."""
    x = (torch.rand(300, 16) < 0.3).float()
    vae = VAE(16, latent_dim=2, hidden=(8,))
    fit = ppl_lvm.fit(vae.model, vae.guide, x, backend="svi", num_steps=3, subsample_size=100)
    assert fit.kwargs == {"subsample_size": 100}
    assert fit.backend.structure.subsampled_plates
    with pytest.raises(TypeError, match="Invalid option for backend 'svi': 'subsample_sise' is neither one of its options.*nor a keyword of the model"):
        ppl_lvm.fit(vae.model, vae.guide, x, backend="svi", num_steps=3, subsample_sise=100)


def test_numpy_data_are_converted_and_strings_refused_by_name():
    fx = ConjugateLinearRegression(num_data=40, num_features=2, seed=0)
    X, y = fx.args[0], fx.args[1]
    fit = ppl_lvm.fit(fx.model, fx.guide, X.numpy(), y.numpy(), backend="svi", num_steps=5)
    assert torch.is_tensor(fit.args[0]) and fit.args[0].dtype == X.dtype
    assert fit.posterior_samples(4, X.numpy(), y.numpy())["w"].shape == (4, 2)
    with pytest.raises(TypeError, match=r"argument 1 \('y'\) is a str"):
        ppl_lvm.fit(fx.model, fx.guide, X, "y.csv", backend="svi", num_steps=5)
    with pytest.raises(TypeError, match="dtype <U1"):
        ppl_lvm.fit(fx.model, fx.guide, X, np.array(["a"] * 40), backend="svi", num_steps=5)


def test_an_enumerated_site_under_a_backend_that_cannot_sum_it_says_what_can():
    def model(x):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(p), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(z * 2.0, 1.0), obs=x)

    def guide(x):
        pyro.sample("p", dist.Beta(pyro.param("a", torch.tensor(2.0)), pyro.param("b", torch.tensor(2.0))))

    x = torch.randn(20)
    for backend, opts in (("iwae", {}), ("svi", {"loss": "trace"})):
        with pytest.raises(ModelGuideMismatchError, match="loss='enum'") as err:
            ppl_lvm.fit(model, guide, x, backend=backend, num_steps=2, **opts)
        assert "mark it with" not in str(err.value)
    ppl_lvm.fit(model, guide, x, backend="svi", loss="enum", num_steps=2)


def test_progress_bar_falls_back_to_text_without_ipywidgets(monkeypatch):
    import sys

    from ppl_lvm.inference.callbacks import progress_bar_class

    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # "in Jupyter"
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    import tqdm.std

    assert progress_bar_class() is tqdm.std.tqdm


def test_predictive_has_the_shapes_of_posterior_samples():
    fx = ConjugateLinearRegression(num_data=30, num_features=5, seed=0)
    fit = ppl_lvm.fit(fx.model, fx.guide, *fx.args, backend="svi", num_steps=5)
    pred = fit.predictive(5)
    assert pred["w"].shape == fit.posterior_samples(5)["w"].shape == (5, 5)
    assert pred["y"].shape == (5, 30)


def test_a_checkpoint_from_another_optimizer_is_refused(tmp_path):
    fx = ConjugateLinearRegression(num_data=30, num_features=2, seed=0)
    a = ppl_lvm.SVI(fx.model, fx.guide, optim=pyro.optim.Adam({"lr": 0.01}))
    a.run(*fx.args, num_steps=3)
    a.save(tmp_path / "ck.pt")
    b = ppl_lvm.SVI(fx.model, fx.guide, optim=pyro.optim.SGD({"lr": 0.01}))
    with pytest.raises(ValueError, match="optimizer Adam.*SGD"):
        b.load(tmp_path / "ck.pt")
    ppl_lvm.SVI(fx.model, fx.guide, optim=pyro.optim.Adam({"lr": 0.01})).load(tmp_path / "ck.pt")


def test_vae_has_plot_helpers():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ppl_lvm.models import VAE

    x, _ = VAE.simulate(num_data=20, obs_dim=16, latent_dim=2, seed=0)
    vae = VAE(16, latent_dim=2, hidden=(8,), name="plot_vae")
    axes = vae.plot_reconstructions(x, num=4)          # 16 pixels: shown as 4 x 4 images
    assert len(axes) == 2 and len(axes[0]) == 4
    assert vae.plot_reconstructions(x, num=3, image_shape=(2, 8)) is not None
    with pytest.raises(ValueError, match="image_shape"):
        vae.plot_reconstructions(x, image_shape=(3, 3))
    ax = vae.plot_latent(x, labels=np.arange(20) % 3)
    assert ax.get_xlabel().startswith("z[0]")
    assert vae.encode(x).shape == (20, 2)
    plt.close("all")


def test_one_name_for_a_fitted_objects_log_evidence():
    """ParticleFilter.log_evidence_ and SMCSampler.log_evidence_ (the running estimate);
    Fit.log_evidence() the estimate with its standard error; the old filter name warns."""
    from ppl_lvm import ParticleFilter, SMCSampler
    from ppl_lvm.testing import ConjugateLinearRegression, LinearGaussianSSM

    fx = LinearGaussianSSM(num_time_steps=10, seed=0)
    pf = ParticleFilter(fx.smc_model(), None, 200)
    lz = pf.filter(fx.x[1:], init_kwargs={"initial": fx.x[0]})
    assert torch.equal(lz, pf.log_evidence_)
    with pytest.warns(FutureWarning, match="log_evidence_"):
        assert torch.equal(pf.log_evidence, pf.log_evidence_)
    reg = ConjugateLinearRegression(num_data=20, num_features=2, seed=0)
    s = SMCSampler(reg.model, num_particles=100)
    fit = s.run(*reg.args)
    assert isinstance(s.log_evidence_, float)
    assert fit.log_evidence().log_evidence == s.log_evidence_


def test_library_models_name_their_sites_plainly():
    """One site-name convention: sample sites are plain names (parameters carry the module's
    name as a prefix, so two instances do not share them)."""
    from ppl_lvm.models import BNNLV
    from ppl_lvm.traces import trace_program

    x = torch.randn(10, 1, dtype=torch.float64)
    y = torch.randn(10, 1, dtype=torch.float64)
    m = BNNLV(1, 1, hidden=(4,), name="sites")
    tr = trace_program(m.model, (x, y), {})
    sites = {n for n, s in tr.nodes.items() if s["type"] == "sample" and not n.startswith("_")}
    assert {"w0", "b0", "w1", "b1", "z", "y"} <= sites and not any(n.startswith("sites.") for n in sites)
    gtr = pyro.poutine.trace(m.guide).get_trace(x, y)
    params = {n for n, s in gtr.nodes.items() if s["type"] == "param"}
    assert params and all(n.startswith("sites.") for n in params)
