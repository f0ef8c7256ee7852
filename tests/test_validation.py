"""Bad input gets a clear ValueError/TypeError before any step is taken."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lvm
from ppl_lvm import SVI, ModelGuideMismatchError
from ppl_lvm.models import BayesianLinearRegression
from ppl_lvm.testing import NormalNormalGlobal, NormalNormalLocal


def _no_step_taken(backend):
    return backend.num_steps == 0 and backend.losses == []


def test_nan_data_raises_before_any_step():
    fx = NormalNormalGlobal()
    x = fx.args[0].clone()
    x[3] = float("nan")
    backend = SVI(fx.model, fx.guide)
    with pytest.raises(ValueError, match=r"argument 0 \('x'\) \(shape \(50,\)\) contains 1 NaN value\(s\), the first at index \(3,\)"):
        backend.run(x, num_steps=5)
    assert _no_step_taken(backend)


def test_inf_in_nested_and_keyword_data():
    def model(data, extra=None):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=data["x"])

    with pytest.raises(ValueError, match=r"keyword argument 'extra'\[1\].*inf"):
        SVI(model, lambda data, extra=None: None).step({"x": torch.zeros(())}, extra=[torch.ones(2), torch.tensor([1.0, float("inf")])])


def test_nan_in_data_closed_over_by_the_model():
    y = torch.tensor([0.0, float("nan")])

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("d", 2):
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    pyro.enable_validation(False)  # Pyro's own support check would otherwise fire first
    with pytest.raises(ValueError, match="observed value of site 'y'"):
        SVI(model, guide).step()


def test_guide_missing_a_latent_site():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("d", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, s), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    backend = SVI(model, guide)
    with pytest.raises(ModelGuideMismatchError, match=r"no sample site for 1 latent site.*\n  s: HalfNormal"):
        backend.run(torch.randn(5), num_steps=3)
    assert _no_step_taken(backend)


def test_guide_with_an_extra_site_or_an_observed_site():
    def model(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def typo_guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("muu", dist.Normal(0.0, 1.0))

    def obs_guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'muu'.*does not have"):
        SVI(model, typo_guide).step(torch.tensor(0.5))
    with pytest.raises(ModelGuideMismatchError, match="which the model observes"):
        SVI(model, obs_guide).step(torch.tensor(0.5))


def test_guide_with_wrong_support_or_wrong_shape():
    def model(x):
        s = pyro.sample("s", dist.HalfNormal(1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.sample("x", dist.Normal(w.sum(-1), s), obs=x)

    def bad_support(x):
        pyro.sample("s", dist.Normal(-3.0, 0.01))
        pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def bad_shape(x):
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("w", dist.Normal(torch.zeros(4), 1.0).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match="outside the support"):
        SVI(model, bad_support).step(torch.tensor(0.5))

    def real_guide_for_positive_site(x):  # its draws are positive, but its support is not
        pyro.sample("s", dist.Normal(5.0, 0.01))
        pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match="Site 's'.*outside the support"):
        SVI(model, real_guide_for_positive_site).step(torch.tensor(0.5))
    with pytest.raises(ModelGuideMismatchError, match=r"Site 'w'.*shape \(4,\).*\(3,\)"):
        SVI(model, bad_shape).step(torch.tensor(0.5))


def test_wrong_shaped_input_is_reported_with_the_argument_shapes():
    fx = NormalNormalLocal(num_data=20)
    backend = SVI(fx.model, fx.guide)
    backend.step(*fx.args)  # creates per-datapoint guide params of size 20
    n = backend.num_steps
    with pytest.raises(ValueError, match=r"(shape|size)"):
        backend.step(torch.randn(25, dtype=torch.float64))
    assert backend.num_steps == n


def test_library_model_checks_shapes():
    reg = BayesianLinearRegression(3)
    X, y, _ = BayesianLinearRegression.simulate(num_features=3)
    with pytest.raises(ValueError, match=r"X must be a tensor of shape \(N, 3\)"):
        SVI(reg.model, reg.guide).step(X[:, :2], y)
    with pytest.raises(ValueError, match=r"y must be a tensor of shape \(200,\)"):
        SVI(reg.model, reg.guide).step(X, y[:-1])


def test_bad_constructor_arguments():
    fx = NormalNormalGlobal()
    with pytest.raises(TypeError, match="model must be a callable"):
        SVI("model", fx.guide)
    with pytest.raises(TypeError, match="optim must be a pyro.optim optimizer"):
        SVI(fx.model, fx.guide, optim=torch.optim.Adam)
    with pytest.raises(ValueError, match="loss must be one of"):
        SVI(fx.model, fx.guide, loss="renyi")
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        SVI(fx.model, fx.guide, num_particles=0)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        SVI(fx.model, fx.guide).run(*fx.args, num_steps=0)
    with pytest.raises(ValueError, match="Unknown backend 'nuts'"):
        ppl_lvm.fit(fx.model, fx.guide, *fx.args, backend="nuts")
    with pytest.raises(ValueError, match="max_plate_nesting=0 but the model/guide use 1"):
        SVI(fx.model, fx.guide, max_plate_nesting=0).step(*fx.args)


def test_vectorized_svi_refuses_a_model_that_does_not_broadcast():
    x = torch.randn(6)

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = torch.stack([z] * x.shape[0], dim=-1).reshape(x.shape[0]) if z.dim() == 0 else z.sum() + 0 * x
        with pyro.plate("d", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match="does not broadcast over a particle plate"):
        SVI(model, guide, num_particles=4, vectorize_particles=True).step(x)
    SVI(model, guide, num_particles=4, vectorize_particles=False).step(x)  # the loop is fine


def test_mixture_prior_with_a_normal_guide_is_accepted():
    def model():
        mix = dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), dist.Normal(torch.tensor([-1.0, 1.0]), 1.0))
        pyro.sample("z", mix)

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    SVI(model, guide).step()

    def positive_model():
        pyro.sample("s", dist.HalfNormal(1.0).expand([2]).to_event(1))

    def real_guide():
        pyro.sample("s", dist.Normal(torch.full((2,), 5.0), 0.01).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match="outside the support"):
        SVI(positive_model, real_guide).step()


def test_safe_cholesky_follows_the_dtype():
    """A PSD matrix that is singular after rounding factors with a jitter tied to eps; an indefinite
    one is refused with a clear error."""
    from ppl_lvm.numerics import safe_cholesky

    for dtype in (torch.float32, torch.float64):
        v = torch.randn(5, 1, dtype=dtype)
        a = v @ v.t()  # rank one: the plain factorization fails
        factor = safe_cholesky(a)
        assert torch.isfinite(factor).all()
        err = (factor @ factor.t() - a).abs().max() / a.diagonal().mean()
        # the first jitter, 10 eps times the mean diagonal, suffices here (measured 10-14 eps)
        assert float(err) < 100 * torch.finfo(dtype).eps
        with pytest.raises(ValueError, match="not positive semi-definite"):
            safe_cholesky(-torch.eye(3, dtype=dtype))
