"""The step guard, for every backend: a step made to diverge changes nothing.

``DivergenceError`` says the step was not taken.  For each registered backend a few good steps
are taken, then a step is made to diverge, in two ways where the backend has parameters:

* the data are poisoned in place (an infinite value), which every backend meets early in its step;
* a hook turns one parameter's gradient into NaN, which is met late, after the step's
  proposal, reweighting or bookkeeping has been computed (where the old code had already
  changed state: SG-HMC moved a parameter, open-horizon SMC set ``.grad`` and GFlowNet-EM
  advanced its running loss, M-step counter and history).

After the error every parameter (unconstrained values), the optimizer's state, the backend's
counters, histories and every other attribute are compared bit for bit with a snapshot taken
before the step.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_lvm import DivergenceError
from ppl_lvm.inference import BACKENDS, get_backend

_SKIP_ATTRS = {"model", "guide", "optim", "structure", "guide_structure", "potential", "_evaluator", "elbo",
               "policy", "continuous_guide", "schedule", "temperature", "epsilon", "m_step_threshold"}


def _freeze(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, torch.nn.Module):
        return _freeze(x.state_dict())
    if isinstance(x, (list, tuple)):
        return [_freeze(v) for v in x]
    if isinstance(x, dict):
        return {k: _freeze(v) for k, v in x.items()}
    if isinstance(x, (int, float, str, bool, type(None))):
        return x
    return ("object", type(x).__name__)


def _snapshot(backend):
    # caches (``*_cache``) are pure functions of the data they are keyed on, not state of the fit
    attrs = {k: _freeze(v) for k, v in vars(backend).items() if k not in _SKIP_ATTRS and not k.endswith("_cache")}
    if getattr(backend, "policy", None) is not None:
        attrs["policy"] = _freeze(backend.policy)
    return {"attrs": attrs,
            "params": _freeze(pyro.get_param_store().get_state()["params"]),
            "optim": _freeze(backend.optim.get_state()) if backend.optim is not None else None}


def _differences(a, b, path="state"):
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or a.dtype != b.dtype:
            return [path]
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        return [] if bool(same.all()) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path} length {len(a)} -> {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


# --------------------------------------------------------------------------- models
def _regression_data(n=40):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, dtype=torch.float64, generator=g)
    y = 0.5 + 1.5 * x + 0.7 * torch.randn(n, dtype=torch.float64, generator=g)
    return x, y


def regression(x, y, subsample_size=None):
    """Gaussian regression with a learned noise scale (a model parameter)."""
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=x.dtype), constraint=dist.constraints.positive)
    a = pyro.sample("a", dist.Normal(torch.zeros((), dtype=x.dtype), 5.0))
    b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=x.dtype), 5.0))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal(a + b * x[idx], sigma), obs=y[idx])


def regression_guide(x, y, subsample_size=None):
    for name in ("a", "b"):
        loc = pyro.param(f"{name}_loc", torch.zeros((), dtype=x.dtype))
        scale = pyro.param(f"{name}_scale", torch.tensor(0.5, dtype=x.dtype), constraint=dist.constraints.positive)
        pyro.sample(name, dist.Normal(loc, scale))


def mixture(y):
    """Two-component mixture with discrete assignments and learned means (for GFlowNet-EM)."""
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=y.dtype))
    with pyro.plate("data", y.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.full((2,), 0.5, dtype=y.dtype)))
        pyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)


class _StateSpace:
    """AR(1) state-space model with a learned coefficient (for the particle filter)."""

    def init(self, state, initial=None):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
        pyro.sample("x", dist.Normal(z, 0.7), obs=initial)
        state["z"] = z

    def step(self, state, x=None):
        a = pyro.param("a", torch.tensor(0.5, dtype=torch.float64))
        z = pyro.sample("z", dist.Normal(a * state["z"], 0.5))
        pyro.sample("x", dist.Normal(z, 0.7), obs=x)
        state["z"] = z


def _case(name):
    """(backend, data args, data kwargs, a data tensor to poison, learned parameter or None)."""
    x, y = _regression_data()
    if name in ("svi", "iwae", "chi2_vis"):
        return get_backend(name)(regression, regression_guide), (x, y), {}, y, "sigma"
    if name in ("sghmc", "sgld"):
        return (get_backend(name)(regression, num_chains=2, warmup=20, num_samples=10, step_size=1e-3),
                (x, y), {}, y, "sigma")
    if name == "smc":
        def fixed_scale(x, y):
            a = pyro.sample("a", dist.Normal(torch.zeros((), dtype=x.dtype), 5.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(a * x, 1.0), obs=y)
        return get_backend(name)(fixed_scale, num_particles=50, max_moves=5), (x, y), {}, y, None
    if name == "smc_online":
        return (get_backend(name)(regression, num_particles=50), (x, y), {"subsample_size": 10}, y, "sigma")
    if name == "gflownet_em":
        g = torch.Generator().manual_seed(2)
        ys = torch.cat([torch.randn(15, dtype=torch.float64, generator=g) - 2,
                        torch.randn(15, dtype=torch.float64, generator=g) + 2])
        return get_backend(name)(mixture, num_particles=8, hidden=(16,), m_step_warmup=0), (ys,), {}, ys, "locs"
    if name == "smc_filter":
        g = torch.Generator().manual_seed(3)
        obs = torch.randn(12, dtype=torch.float64, generator=g)
        initial = obs[:1].clone()  # the filter refuses non-finite observations itself: poison the start
        return (get_backend(name)(_StateSpace(), num_particles=50), (obs[1:],),
                {"init_kwargs": {"initial": initial[0]}}, initial, "a")
    raise AssertionError(f"no guard case for backend {name!r}: add one")


def _run_good_steps(backend, args, kwargs, n=3):
    for _ in range(n):
        backend.step(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_a_step_on_poisoned_data_changes_nothing(name):
    pyro.set_rng_seed(0)
    backend, args, kwargs, data, _ = _case(name)
    _run_good_steps(backend, args, kwargs)
    before = _snapshot(backend)
    data.fill_(float("inf"))  # in place: the pre-flight check has already passed for these data
    with pytest.raises(DivergenceError) as err:
        backend.step(*args, **kwargs)
    assert err.value.step == 3
    assert _differences(before, _snapshot(backend)) == []


@pytest.mark.parametrize("name", sorted(n for n in BACKENDS if _case(n)[4] is not None))
def test_a_step_whose_parameter_gradient_is_nan_changes_nothing(name):
    pyro.set_rng_seed(0)
    backend, args, kwargs, _, param = _case(name)
    _run_good_steps(backend, args, kwargs)
    before = _snapshot(backend)
    hook = pyro.param(param).unconstrained().register_hook(lambda g: g * float("nan"))
    try:
        with pytest.raises(DivergenceError, match=f"gradient of parameter '{param}' is not finite") as err:
            backend.step(*args, **kwargs)
    finally:
        hook.remove()
    assert err.value.step == 3
    assert _differences(before, _snapshot(backend)) == []
    # and the backend continues from the state it kept
    backend.step(*args, **kwargs)
    assert backend.num_steps == 4


def test_every_registered_backend_has_a_guard_case():
    for name in BACKENDS:
        _case(name)
