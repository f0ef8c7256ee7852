r"""What a backend needs from a model, declared as data and checked by one shared function.

Each backend class sets ``requires = Requirements(...)``.  :meth:`Backend.setup
<ppl_lvm.inference.base.Backend.setup>` calls :func:`check_requirements` once per data
signature, before the first step; it refuses a model the backend cannot run with an
:class:`~ppl_lvm.errors.IncompatibleModelError` that names the offending site(s) and the
registered backends whose declarations accept the model, and ``ppl-lvm backends`` /
:func:`~ppl_lvm.inference.registry.list_backends` print the same declarations.  What depends on a
backend's *options* (SVI's ``loss='enum'``, GFlowNet-EM's ``sleep_every``) stays in that
backend's ``check_model``.

The habit is torchsde's (``SDE_TYPES``/``NOISE_TYPES`` checked against each solver's declared
support) applied to Pyro programs: the facts about a program come from one traced
:class:`~ppl_lvm.traces.ProgramStructure`, the facts about a backend from its declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from ..errors import IncompatibleModelError

__all__ = ["Requirements", "check_program", "check_requirements", "describe", "backends_accepting", "program_kind"]

_CHOICES = {
    "program": ("callable", "state_space"),
    "guide": ("required", "optional"),
    "discrete_latents": ("allow", "refuse", "need"),
    "latent_sites": ("allow", "need"),
    "subsampling": ("allow", "refuse"),
    "improper_priors": ("allow", "need_guide"),
}


@dataclass(frozen=True)
class Requirements:
    """A backend's declared requirements (each field names one property of a model).

    :param program: ``"callable"`` (a Pyro model function or ``PyroModule``) or
        ``"state_space"`` (an object with ``init(state, ...)``/``step(state, ...)``, Pyro's
        ``SMCFilter`` contract).
    :param guide: ``"required"`` or ``"optional"`` (the backend builds its own, or uses a given
        guide as a starting point or proposal).
    :param discrete_latents: ``"allow"``, ``"refuse"`` (gradient moves on continuous space) or
        ``"need"`` (the backend samples discrete latents and has nothing to do without them).
    :param latent_sites: ``"need"``: a model without latent sample sites is refused.
    :param subsampling: ``"refuse"``: a model that subsamples a plate is refused (the backend
        needs the full likelihood).
    :param latents_in_subsampled_plate: whether latent sites may sit inside a subsampled plate
        (a sampler's state cannot cover the data points outside each minibatch).
    :param global_latents_with_subsampling: whether global latents may be combined with a
        subsampled plate (an importance-weighted bound over the joint has no unbiased
        minibatch estimate).
    :param dependent_supports: whether a latent's support may depend on another latent's value
        (backends that map every site to unconstrained space with one fixed transform refuse).
    :param improper_priors: ``"allow"`` or ``"need_guide"`` (the backend draws from the prior
        unless a guide is given, and an ``ImproperUniform`` prior cannot be sampled).
    """

    program: str = "callable"
    guide: str = "required"
    discrete_latents: str = "allow"
    latent_sites: str = "allow"
    subsampling: str = "allow"
    latents_in_subsampled_plate: bool = True
    global_latents_with_subsampling: bool = True
    dependent_supports: bool = True
    improper_priors: str = "allow"

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"Requirements.{name} must be one of {choices}, got {getattr(self, name)!r}.")

    def lines(self) -> List[str]:
        """The declaration in words, one line per restriction (what ``ppl-lvm backends`` prints)."""
        out = []
        if self.program == "state_space":
            out.append("runs state-space objects with init(state, ...)/step(state, ...), not Pyro functions")
        out.append("guide: required" if self.guide == "required" else "guide: optional")
        if self.discrete_latents == "refuse":
            out.append("continuous latents only (discrete ones: enumerate them or use gflownet_em)")
        elif self.discrete_latents == "need":
            out.append("needs discrete latent sites")
        if self.latent_sites == "need":
            out.append("needs at least one latent sample site")
        if self.subsampling == "refuse":
            out.append("full likelihood: no subsampled plates")
        if not self.latents_in_subsampled_plate:
            out.append("no latent sites inside a subsampled plate")
        if not self.global_latents_with_subsampling:
            out.append("no global latents together with a subsampled plate")
        if not self.dependent_supports:
            out.append("no latent whose support depends on another latent")
        if self.improper_priors == "need_guide":
            out.append("improper (ImproperUniform) priors only with a guide")
        return out


def program_kind(model) -> str:
    """``"state_space"`` for an object with ``init``/``step`` methods that is not itself
    callable, else ``"callable"``."""
    if not callable(model) and callable(getattr(model, "init", None)) and callable(getattr(model, "step", None)):
        return "state_space"
    return "callable"


def _registry() -> Dict[str, type]:
    from .registry import BACKENDS

    return BACKENDS


def backends_accepting(**facts) -> List[str]:
    """Names of the registered backends whose declarations accept a model with the given facts
    (keywords of :class:`Requirements`, e.g. ``discrete_latents=True``)."""
    ok = []
    for name, cls in _registry().items():
        r = cls.requires
        if facts.get("program", "callable") != r.program:
            continue
        if facts.get("discrete_latents") is True and r.discrete_latents == "refuse":
            continue
        if facts.get("discrete_latents") is False and r.discrete_latents == "need":
            continue
        if facts.get("subsampling") and r.subsampling == "refuse":
            continue
        if facts.get("latents_in_subsampled_plate") and not r.latents_in_subsampled_plate:
            continue
        if facts.get("global_latents_with_subsampling") and not r.global_latents_with_subsampling:
            continue
        if facts.get("dependent_supports") and not r.dependent_supports:
            continue
        if facts.get("improper_priors") and r.improper_priors != "allow":
            continue
        ok.append(name)
    return ok


def _fit_list(**facts) -> str:
    names = backends_accepting(**facts)
    return ", ".join(f"'{n}'" for n in names) if names else "none registered"


def check_program(backend) -> None:
    """Refuse a state-space object given to a backend for Pyro programs, and the reverse."""
    req: Requirements = type(backend).requires
    who = type(backend).__name__
    kind = program_kind(backend.model)
    if kind != req.program:
        if kind == "state_space":
            raise IncompatibleModelError(
                f"{who} runs Pyro programs (callables); this model is a state-space object with "
                "init(state, ...)/step(state, ...) methods. Filter it with backend='smc_filter' "
                f"(backends for state-space objects: {_fit_list(program='state_space')}).")
        raise IncompatibleModelError(
            f"backend {type(backend).name!r} runs state-space model objects with init(state, ...) and "
            f"step(state, ...) methods (Pyro's SMCFilter contract); got {type(backend.model).__name__}. "
            "For a static Pyro model use the tempered SMC sampler, backend='smc' (backends for Pyro "
            f"programs: {_fit_list(program='callable')}).")


def check_requirements(backend, structure, args=(), kwargs=None) -> None:
    """Raise :class:`~ppl_lvm.errors.IncompatibleModelError` if ``backend``'s declared
    requirements refuse its Pyro program, whose traced structure is ``structure``
    (:class:`~ppl_lvm.traces.ProgramStructure`); ``args``/``kwargs`` are the data."""
    req: Requirements = type(backend).requires
    who = type(backend).__name__
    discrete = sorted(structure.discrete_latents)
    if req.discrete_latents == "refuse" and discrete:
        raise IncompatibleModelError(
            f"{who} moves continuous variables along gradients, but the model has discrete latent "
            f"site(s) {discrete}. Marginalize them by enumeration (infer={{'enumerate': 'parallel'}} "
            "with SVI and loss='enum') or sample them with backend='gflownet_em' (backends that "
            f"accept discrete latents: {_fit_list(discrete_latents=True)}).")
    if req.discrete_latents == "need" and not discrete:
        raise IncompatibleModelError(
            f"{who} samples discrete latent variables, but the model has none (latent sites: "
            f"{sorted(structure.latent_sites) or 'none'}). Use backend='svi', 'iwae' or 'sghmc' for "
            f"continuous latents (backends for them: {_fit_list(discrete_latents=False)}).")
    if req.latent_sites == "need" and not structure.latent_sites:
        raise IncompatibleModelError(
            "The model has no latent sample sites, so there is nothing to sample. Give its unknowns "
            "priors with pyro.sample, or fit point estimates with SVI and an empty guide.")
    sub = sorted(structure.subsampled_plates)
    if req.subsampling == "refuse" and sub:
        raise IncompatibleModelError(
            f"{who} needs the full likelihood, but the model subsamples plate(s) {sub}. Pass "
            "arguments that switch subsampling off (subsample_size=None), or use a backend for "
            f"minibatches: {_fit_list(subsampling=True)} (e.g. backend='smc_online' or 'sghmc').")
    trapped = list(structure.latents_in_subsampled_plates)
    if not req.latents_in_subsampled_plate and trapped:
        raise IncompatibleModelError(
            f"Latent site(s) {trapped} sit inside the subsampled plate(s) {sub}: {who}'s particles or "
            "chains cannot persist across minibatches (they would need a state for the data points "
            "outside each minibatch). Switch subsampling off (subsample_size=None), make them global, "
            "or fit local latents with an amortized guide (backends that accept them: "
            f"{_fit_list(subsampling=True, latents_in_subsampled_plate=True)}).")
    if not req.global_latents_with_subsampling and structure.global_latents and sub:
        raise IncompatibleModelError(
            f"{who}: the model has global latent site(s) {sorted(structure.global_latents)} and "
            f"subsamples plate(s) {sub}. The importance-weighted bound over the joint has no unbiased "
            "minibatch estimate; fit on full batches (subsample_size=None), make the global sites "
            "parameters, or use backend='svi', whose ELBO is unbiased under subsampling.")
    if req.improper_priors == "need_guide" and backend.guide is None:
        improper = sorted(n for n, s in structure.latent_sites.items() if s.distribution == "ImproperUniform")
        if improper:
            raise IncompatibleModelError(
                f"The prior of latent site(s) {improper} is improper (ImproperUniform: a flat prior, as "
                f"Stan gives a parameter without a prior statement); {who} starts from the prior, which "
                "cannot be sampled. Give the site(s) a proper prior, or pass a guide= (the start is then "
                f"the guide, weighted by prior / guide); {_fit_list(improper_priors=True)} accept "
                "improper priors.")
    if not req.dependent_supports:
        from ..traces import dependent_support_message, dependent_support_sites

        dependent = dependent_support_sites(backend.model, args, kwargs or {},
                                            skip=tuple(structure.latents_in_subsampled_plates))
        if dependent:
            raise IncompatibleModelError(dependent_support_message(who, dependent))


def describe(cls) -> str:
    """One paragraph on a backend class: what it is valid for, then its declaration."""
    parts = [cls.valid_for] if cls.valid_for else []
    parts += cls.requires.lines()
    return "; ".join(parts)
