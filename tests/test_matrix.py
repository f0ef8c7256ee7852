"""Every registered backend x every registered model (the exact fixtures and library models).

Valid pairs must fit on small data and improve their objective; pairs listed in
``EXPECTED_INCOMPATIBLE`` must be refused up front with ``IncompatibleModelError``.  A new
backend or model joins automatically through the registries, so this table is the one place
to state which pairs are not valid.
"""

import numpy as np
import pyro
import pytest

from ppl_lvm import IncompatibleModelError
from ppl_lvm.inference import BACKENDS
from ppl_lvm.models import MODELS
from ppl_lvm.testing import FIXTURES, LinearGaussianSSM

#: (backend, model) pairs that must raise IncompatibleModelError (besides the rules below)
EXPECTED_INCOMPATIBLE = set()

#: gradient-based samplers (SG-MCMC moves, HMC moves) refuse discrete latents
CONTINUOUS_ONLY = {"sghmc", "sgld", "smc", "smc_online"}

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

#: backends that run only state-space objects, and those that run only Pyro programs
STATE_SPACE_ONLY = {"smc_filter"}

#: backends that need discrete latent sites (GFlowNet-EM's policy builds them), and the cases
#: that have some; every other case must be refused by them
DISCRETE_ONLY = {"gflownet_em"}
DISCRETE_CASES = {"binary", "discrete_vae"}


def _incompatible(backend_name, kind, short):
    if (backend_name, short) in EXPECTED_INCOMPATIBLE:
        return True
    if backend_name in DISCRETE_ONLY and short not in DISCRETE_CASES:
        return True
    if backend_name in CONTINUOUS_ONLY and short in DISCRETE_CASES:
        return True
    return (kind == "ssm") != (backend_name in STATE_SPACE_ONLY)


def _cases():
    cases = {}
    for name, cls in FIXTURES.items():
        def make(cls=cls, name=name):
            fx = cls(num_steps=10) if name == "lgssm" else cls()
            return fx.model, fx.guide, fx.args
        cases[f"fixture:{name}"] = make
    # state-space objects (Pyro's SMCFilter contract): only the particle filter runs them
    def make_ssm():
        fx = LinearGaussianSSM(num_steps=20)
        return (fx.smc_model(learn_transition=True), fx.smc_guide(), (fx.x[1:],),
                {"init_kwargs": {"initial": fx.x[0]}})
    cases["ssm:lgssm"] = make_ssm
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


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
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


def test_every_backend_has_matrix_options_or_defaults():
    for name, cls in BACKENDS.items():
        assert cls.valid_for, f"backend {name} must say what it is valid for"
