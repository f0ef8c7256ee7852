"""Every registered backend x every registered model (the exact fixtures and library models).

Valid pairs must fit on small data and improve their objective; pairs that the backends'
declared requirements (``Backend.requires``) rule out must be refused up front with
``IncompatibleModelError``.  A new backend or model joins automatically through the registries;
what a backend accepts is read from its declaration, what a case is from the facts stated here
(checked against the traced programs).
"""

import inspect

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_lvm import IncompatibleModelError
from ppl_lvm.inference import BACKENDS
from ppl_lvm.inference.requirements import Requirements
from ppl_lvm.traces import dependent_support_sites, structure_from_trace, trace_program
from tests.helpers import minibatch_regression, minibatch_regression_data
from ppl_lvm.models import MODELS
from ppl_lvm.testing import FIXTURES, LinearGaussianSSM

#: (backend, model) pairs that must raise IncompatibleModelError besides what the backends'
#: declarations (``Backend.requires``) and the cases' facts below imply
EXPECTED_INCOMPATIBLE = set()

#: constructor options per backend for a short fit
BACKEND_OPTIONS = {
    "svi": dict(optim=lambda: pyro.optim.Adam({"lr": 0.05}), num_particles=8, vectorize_particles=True),
    "iwae": dict(optim=lambda: pyro.optim.Adam({"lr": 0.05}), num_particles=8),
    "chi2_vis": dict(optim=lambda: pyro.optim.Adam({"lr": 0.05}), num_particles=32),
    # the rmsprop preconditioner makes one step size fit models of very different curvature
    "sghmc": dict(step_size=1e-3, friction=0.1, num_chains=4, warmup=100, preconditioner="rmsprop"),
    "sgld": dict(step_size=1e-3, num_chains=4, warmup=100, preconditioner="rmsprop"),
    "smc_filter": dict(optim=lambda: pyro.optim.Adam({"lr": 0.05}), num_particles=100),
    "smc": dict(num_particles=100, num_moves=2, num_leapfrog=3),
    "smc_online": dict(optim=lambda: pyro.optim.Adam({"lr": 0.05}), num_particles=50, num_moves=2),
    "gflownet_em": dict(num_particles=16, hidden=(32,)),
}

NUM_STEPS = 300
#: backends whose one step is a whole pass over the data (a filter run): fewer steps
FEW_STEPS = {"smc_filter": 60, "smc": 40, "smc_online": 60}

#: facts about the cases, stated by hand (test_case_facts_match_the_traced_programs checks them
#: against the traced programs): which have discrete latent sites, which subsample a plate, which
#: of those have latents inside the subsampled plate, which have global latents with subsampling
DISCRETE_CASES = {"binary", "discrete_vae", "gp_mixture", "ibp"}
SUBSAMPLED_CASES = {"minibatch_regression", "minibatch_local"}
LOCAL_IN_SUBSAMPLED_CASES = {"minibatch_local"}
GLOBAL_WITH_SUBSAMPLING_CASES = {"minibatch_regression"}
#: latent_sde: its path site's support is pinned to the z0 draw (a dependent support)
DEPENDENT_SUPPORT_CASES = {"latent_sde"}


def _incompatible(backend_name, kind, short):
    """Whether the backend must refuse the case, from its declared requirements and the facts."""
    if (backend_name, short) in EXPECTED_INCOMPATIBLE:
        return True
    req = BACKENDS[backend_name].requires
    if (kind == "ssm") != (req.program == "state_space"):
        return True
    if kind == "ssm":
        return False
    discrete = short in DISCRETE_CASES
    return ((discrete and req.discrete_latents == "refuse")
            or (not discrete and req.discrete_latents == "need")
            or (short in SUBSAMPLED_CASES and req.subsampling == "refuse")
            or (short in LOCAL_IN_SUBSAMPLED_CASES and not req.latents_in_subsampled_plate)
            or (short in GLOBAL_WITH_SUBSAMPLING_CASES and not req.global_latents_with_subsampling)
            or (short in DEPENDENT_SUPPORT_CASES and not req.dependent_supports))


def _minibatch_regression():
    x, y = minibatch_regression_data()

    def guide(x, y):
        for name in ("a", "b"):
            loc = pyro.param(f"{name}_loc", torch.zeros((), dtype=x.dtype))
            scale = pyro.param(f"{name}_scale", torch.tensor(0.3, dtype=x.dtype), constraint=dist.constraints.positive)
            pyro.sample(name, dist.Normal(loc, scale))

    return minibatch_regression, guide, (x, y)


def _minibatch_local():
    g = torch.Generator().manual_seed(1)
    y = 2.0 + 1.5 * torch.randn(200, dtype=torch.float64, generator=g)

    def model(y):
        with pyro.plate("data", y.shape[0], subsample_size=20) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=y.dtype), 2.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])

    def guide(y):
        loc = pyro.param("z_loc", torch.zeros(y.shape[0], dtype=y.dtype))
        scale = pyro.param("z_scale", torch.ones(y.shape[0], dtype=y.dtype), constraint=dist.constraints.positive)
        with pyro.plate("data", y.shape[0], subsample_size=20) as idx:
            pyro.sample("z", dist.Normal(loc[idx], scale[idx]))

    return model, guide, (y,)


def _cases():
    cases = {}
    for name, cls in FIXTURES.items():
        def make(cls=cls, name=name):
            fx = cls(num_time_steps=10) if name == "lgssm" else cls()
            return fx.model, fx.guide, fx.args
        cases[f"fixture:{name}"] = make
    # state-space objects (Pyro's SMCFilter contract): only the particle filter runs them
    def make_ssm():
        fx = LinearGaussianSSM(num_time_steps=20)
        return (fx.smc_model(learn_transition=True), fx.smc_guide(), (fx.x[1:],),
                {"init_kwargs": {"initial": fx.x[0]}})
    cases["ssm:lgssm"] = make_ssm
    cases["subsampled:minibatch_regression"] = _minibatch_regression
    cases["subsampled:minibatch_local"] = _minibatch_local
    for name, factory in MODELS.items():
        def make(factory=factory):
            obj, args = factory()
            return obj.model, obj.guide, args
        cases[f"model:{name}"] = make
    return cases


CASES = _cases()


def _options(backend_name):
    opts = dict(BACKEND_OPTIONS.get(backend_name, {}))
    return {k: (v() if callable(v) and k == "optim" else v) for k, v in opts.items()}


# pairs that take > 20 s on the 2-core CI machine run in the slow step (the default suite's budget)
SLOW_PAIRS = {("smc", "model:gpfa")}


@pytest.mark.parametrize("backend_name,case", [
    pytest.param(b, c, marks=[pytest.mark.slow] if (b, c) in SLOW_PAIRS else [])
    for b in sorted(BACKENDS) for c in sorted(CASES)])
def test_backend_model_matrix(backend_name, case):
    model, guide, args, *kw = CASES[case]()
    kwargs = kw[0] if kw else {}
    backend = BACKENDS[backend_name](model, guide, **_options(backend_name))
    kind, short = case.split(":", 1)
    if _incompatible(backend_name, kind, short):
        with pytest.raises(IncompatibleModelError):
            backend.run(*args, num_steps=NUM_STEPS, **kwargs)
        assert backend.num_steps == 0
        return
    fit = backend.run(*args, num_steps=NUM_STEPS if backend_name not in FEW_STEPS else FEW_STEPS[backend_name],
                      **kwargs)
    losses = np.asarray(fit.losses)
    assert np.all(np.isfinite(losses))
    first, last = losses[:30].mean(), losses[-30:].mean()
    assert last < first, f"{backend_name} on {case}: objective did not improve ({first:.3f} -> {last:.3f})"


def test_every_backend_says_what_it_is_valid_for_and_declares_its_requirements():
    for name, cls in BACKENDS.items():
        assert cls.valid_for, f"backend {name} must say what it is valid for"
        assert isinstance(cls.requires, Requirements), f"backend {name} must declare requires = Requirements(...)"
        assert set(BACKEND_OPTIONS) >= {name} or not _required_args(cls), name


def _required_args(cls):
    """Constructor arguments without defaults besides model and guide (a backend with some
    needs matrix options to be built)."""
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items() if n not in ("self", "model", "guide")
            and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("case", sorted(c for c in CASES if not c.startswith("ssm:")))
def test_case_facts_match_the_traced_programs(case):
    """The hand-stated facts the matrix combines with the declarations are those of the programs."""
    model, guide, args, *kw = CASES[case]()
    st = structure_from_trace(trace_program(model, args, kw[0] if kw else {}))
    kind, short = case.split(":", 1)
    assert bool(st.discrete_latents) == (short in DISCRETE_CASES)
    assert bool(st.subsampled_plates) == (short in SUBSAMPLED_CASES)
    assert bool(st.latents_in_subsampled_plates) == (short in LOCAL_IN_SUBSAMPLED_CASES)
    assert bool(st.global_latents and st.subsampled_plates) == (short in GLOBAL_WITH_SUBSAMPLING_CASES)
    if kind != "ssm":
        assert bool(dependent_support_sites(model, args, kw[0] if kw else {})) == (short in DEPENDENT_SUPPORT_CASES)


def test_every_backend_takes_model_guide_optim_in_that_order():
    """The same keyword in the same position for every backend (the SMC sampler refuses a
    non-None optimizer, having no parameters to learn)."""
    for name, cls in BACKENDS.items():
        params = list(inspect.signature(cls.__init__).parameters)[1:4]
        assert params == ["model", "guide", "optim"], (name, params)
