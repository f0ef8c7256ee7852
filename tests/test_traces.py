import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from ppl_lvm.traces import ParticleEvaluator, inspect_program, log_mean_exp, preserved_rng
from ppl_lvm.testing import NormalNormalGlobal, NormalNormalLocal, BinaryLatents


def mixed_model(x, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1) as ind:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        c = pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(z + c, 0.5), obs=x[ind])


def test_inspect_classifies_sites_and_plates():
    x = torch.randn(10)
    s = inspect_program(mixed_model, x, subsample_size=4)
    assert set(s.latent_sites) == {"mu", "z", "c"}
    assert set(s.observed_sites) == {"x"}
    assert set(s.discrete_latents) == {"c"}
    assert s.sites["z"].has_rsample and not s.sites["c"].has_rsample
    assert s.data_plate == "data"
    assert set(s.local_latents) == {"z", "c"} and set(s.global_latents) == {"mu"}
    plate = s.plates["data"]
    assert (plate.size, plate.subsample_size, plate.dim) == (10, 4, -1)
    assert plate.subsampled and plate.scale == pytest.approx(2.5)
    assert s.max_plate_nesting == 1
    assert "observed" in s.describe() and "mu" in s.describe()


def test_inspect_does_not_move_the_rng():
    x = torch.randn(10)
    pyro.set_rng_seed(3)
    a = torch.rand(3)
    pyro.set_rng_seed(3)
    inspect_program(mixed_model, x)
    b = torch.rand(3)
    assert torch.equal(a, b)


def test_preserved_rng_restores_state():
    pyro.set_rng_seed(1)
    with preserved_rng():
        torch.randn(100)
    first = torch.randn(2)
    pyro.set_rng_seed(1)
    assert torch.equal(first, torch.randn(2))


def test_unknown_data_plate_is_a_clear_error():
    with pytest.raises(ValueError, match="not a plate of the model"):
        inspect_program(mixed_model, torch.randn(5), data_plate="rows")


def _manual_log_weights(fixture, values, k):
    """Reference: score each particle separately with non-vectorized traces."""
    out = []
    for i in range(k):
        data = {n: v[i] for n, v in values.items()}
        gtr = poutine.trace(poutine.condition(fixture.guide, data=data)).get_trace(*fixture.args)
        mtr = poutine.trace(poutine.condition(fixture.model, data=data)).get_trace(*fixture.args)
        out.append(mtr.log_prob_sum() - gtr.log_prob_sum())
    return torch.stack(out)


@pytest.mark.parametrize("fixture_cls", [NormalNormalGlobal, NormalNormalLocal])
@pytest.mark.parametrize("mode", ["plate", "vmap"])
def test_vectorized_log_weights_match_particle_by_particle(fixture_cls, mode):
    fx = fixture_cls(seed=1)
    s = inspect_program(fx.model, *fx.args)
    ev = ParticleEvaluator(fx.model, fx.guide, s, s.max_plate_nesting, mode=mode)
    k = 6
    gt = ev.guide_trace(k, fx.args, {})
    lw = ev.log_weights(k, fx.args, {}, guide_trace=gt)
    ref = _manual_log_weights(fx, ev.latent_values(gt, k), k)
    torch.testing.assert_close(lw.joint, ref, rtol=1e-10, atol=1e-10)
    if fixture_cls is NormalNormalLocal:
        assert lw.local.shape == (k, fx.args[0].shape[0]) and not lw.has_global_latents
        assert lw.factorizes
    else:
        assert lw.has_global_latents and not lw.factorizes


def test_local_weights_scale_with_subsampling():
    """Per-datapoint terms exclude N/B; the joint weight applies it once, outside."""
    x = torch.randn(12, dtype=torch.float64)

    def model(x):
        with pyro.plate("data", 12, subsample_size=4, dim=-1) as ind:
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[ind])

    def guide(x):
        with pyro.plate("data", 12, subsample_size=4, dim=-1):
            pyro.sample("z", dist.Normal(torch.full((), 0.3, dtype=x.dtype), 1.0))

    s = inspect_program(model, x)
    ev = ParticleEvaluator(model, guide, s, 1, mode="plate")
    lw = ev.log_weights(5, (x,), {})
    assert lw.local.shape == (5, 4) and lw.local_scale == pytest.approx(3.0)
    gt = ev.guide_trace(5, (x,), {})
    lw = ev.log_weights(5, (x,), {}, guide_trace=gt)
    idx = gt.nodes["data"]["value"]
    z = gt.nodes["z"]["value"]  # (5, 4)
    ref = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x[idx]) - dist.Normal(0.3, 1.0).log_prob(z)
    torch.testing.assert_close(lw.local, ref)
    torch.testing.assert_close(lw.joint, 3.0 * ref.sum(-1))


def test_vmap_fallback_for_a_model_that_does_not_broadcast():
    x = torch.randn(8, dtype=torch.float64)

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        # stacks one copy of z per data point: only right for a scalar z
        loc = torch.stack([z] * x.shape[0], dim=-1).reshape(x.shape[0])
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.full((), 0.2, dtype=x.dtype), 0.7))

    s = inspect_program(model, x)
    ev = ParticleEvaluator(model, guide, s, 1)
    gt = ev.guide_trace(4, (x,), {})
    lw = ev.log_weights(4, (x,), {}, guide_trace=gt)
    assert ev.mode == "vmap"
    z = gt.nodes["z"]["value"].reshape(4)
    ref = (dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z[:, None], 1.0).log_prob(x).sum(-1)
           - dist.Normal(0.2, 0.7).log_prob(z))
    torch.testing.assert_close(lw.joint, ref)


def test_broadcasting_model_keeps_plate_mode():
    fx = BinaryLatents(seed=0)
    s = inspect_program(fx.model, *fx.args)
    ev = ParticleEvaluator(fx.model, fx.guide, s, s.max_plate_nesting)
    assert ev.resolve_mode(fx.args, {}) == "plate"


def test_log_mean_exp_is_stable():
    x = torch.tensor([1000.0, 1000.0, -1000.0, 999.0], dtype=torch.float64)
    expected = 1000.0 + math.log((2 + math.exp(-1.0)) / 4)
    assert float(log_mean_exp(x)) == pytest.approx(expected)


def test_latent_values_are_particles_first():
    fx = NormalNormalLocal(seed=0)
    s = inspect_program(fx.model, *fx.args)
    ev = ParticleEvaluator(fx.model, fx.guide, s, 1)
    vals = ev.latent_values(ev.guide_trace(7, fx.args, {}), 7)
    assert vals["z"].shape == (7, fx.args[0].shape[0])


def test_an_improper_site_gets_a_feasible_prototype_value_in_the_datas_dtype():
    import pyro.distributions as dist
    from torch.distributions import constraints
    from ppl_lvm.traces import trace_program

    def model(y):
        s = pyro.sample("s", dist.ImproperUniform(constraints.positive, (), (2,)))
        pyro.sample("y", dist.Normal(0.0, s).to_event(1), obs=y)

    tr = trace_program(model, (torch.zeros(2, dtype=torch.float64),), {})
    value = tr.nodes["s"]["value"]
    assert value.dtype == torch.float64 and value.device.type == "cpu" and bool((value > 0).all())
