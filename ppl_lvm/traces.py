r"""Shared trace machinery: what every backend needs to know about a Pyro program.

Two jobs live here, both built only on Pyro's effect handlers:

1. **Site classification** (:func:`inspect_program`, :class:`ProgramStructure`): run a model
   (or guide) once on the user's arguments and record each sample site — observed or latent,
   discrete or continuous, reparameterizable or not, which plates it sits in and whether
   those plates are subsampled.  Backends check their requirements on this structure before
   any optimisation step.

2. **Vectorized importance log-weights** (:class:`ParticleEvaluator`): with :math:`K`
   particles :math:`z_k \sim q(z \mid x)` drawn in one vectorized ``pyro.plate``,

   .. math::

       \log w_k = \log p(x, z_k) - \log q(z_k \mid x).

   For a model whose latents are *local* to a data plate (one latent per data point) the
   weight factorizes over data points, :math:`\log w_{k} = g_k + \sum_i \ell_{ik}`, and the
   per-datapoint terms :math:`\ell_{ik}` are kept separate (:class:`LogWeights`), which is
   what the IWAE bound per data point and the low-variance evidence estimator
   :math:`\log \hat p(x) = g + \sum_i \log \tfrac1K \sum_k e^{\ell_{ik}}` need.

Particles are a plate at ``dim = -(max_plate_nesting + 1)``.  A model that does not
broadcast over an extra batch dimension on the left is evaluated with ``torch.func.vmap``
over the particles instead (the guide must still broadcast); :class:`ParticleEvaluator`
picks the mode once, by comparing both on a few particles, and reports it in ``mode``.

References:

* Burda, Grosse, Salakhutdinov. *Importance Weighted Autoencoders*. ICLR 2016.
* Pyro's ``pyro.infer.importance`` and ``vectorize_particles`` for the trace recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import pyro
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro.distributions.util import scale_and_mask
from pyro.util import get_rng_state, set_rng_state

__all__ = [
    "PlateInfo",
    "SiteInfo",
    "ProgramStructure",
    "inspect_program",
    "trace_program",
    "preserved_rng",
    "LogWeights",
    "PlateSums",
    "BatchedLogDensity",
    "ParticleEvaluator",
    "PotentialEnergy",
    "draw_guide",
    "draw_prior",
    "pad_left",
    "log_mean_exp_se",
    "log_mean_exp",
    "validation_off",
    "is_improper",
    "dependent_support_sites",
    "dependent_support_message",
    "init_to_feasible_point",
]

PARTICLE_PLATE = "_ppl_lvm_particles"
#: key of the summed-out block of a model whose enumerated sites lie outside the data plate
ENUMERATED_BLOCK = "_ppl_lvm_enumerated"


@contextlib.contextmanager
def preserved_rng():
    """Run a block without changing torch's, numpy's and Python's random states.

    Prototype traces use it, so that validating a model does not shift the random stream
    of the fit that follows (a resumed run then matches an uninterrupted one exactly).
    """
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@dataclasses.dataclass(frozen=True)
class PlateInfo:
    """A ``pyro.plate`` seen in a trace: full ``size``, ``subsample_size`` and ``dim``."""

    name: str
    size: int
    subsample_size: int
    dim: Optional[int]

    @property
    def subsampled(self) -> bool:
        return self.subsample_size != self.size

    @property
    def scale(self) -> float:
        """The factor N/B that Pyro applies to log-probabilities inside the plate."""
        return self.size / self.subsample_size


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """One sample site of a prototype trace."""

    name: str
    is_observed: bool
    is_discrete: bool
    has_rsample: bool
    plates: Tuple[str, ...]  # names, outermost first
    value_shape: Tuple[int, ...]
    batch_shape: Tuple[int, ...]
    event_shape: Tuple[int, ...]
    distribution: str
    support: object
    enumerate: Optional[str] = None

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)


@dataclasses.dataclass
class ProgramStructure:
    """Sites and plates of one run of a Pyro program (see :func:`inspect_program`)."""

    sites: Dict[str, SiteInfo]
    plates: Dict[str, PlateInfo]
    max_plate_nesting: int
    data_plate: Optional[str] = None

    @property
    def latent_sites(self) -> Dict[str, SiteInfo]:
        return {n: s for n, s in self.sites.items() if not s.is_observed}

    @property
    def observed_sites(self) -> Dict[str, SiteInfo]:
        return {n: s for n, s in self.sites.items() if s.is_observed}

    @property
    def discrete_latents(self) -> Dict[str, SiteInfo]:
        return {n: s for n, s in self.latent_sites.items() if s.is_discrete}

    @property
    def continuous_latents(self) -> Dict[str, SiteInfo]:
        return {n: s for n, s in self.latent_sites.items() if not s.is_discrete}

    @property
    def subsampled_plates(self) -> Dict[str, PlateInfo]:
        return {n: p for n, p in self.plates.items() if p.subsampled}

    @property
    def local_latents(self) -> Dict[str, SiteInfo]:
        """Latent sites inside the data plate (one copy per data point)."""
        if self.data_plate is None:
            return {}
        return {n: s for n, s in self.latent_sites.items() if self.data_plate in s.plates}

    @property
    def latents_in_subsampled_plates(self) -> list:
        """Names of latent sites inside a subsampled plate (one value per minibatch point)."""
        sub = self.subsampled_plates
        return sorted(n for n, s in self.latent_sites.items() if any(p in sub for p in s.plates))

    @property
    def global_latents(self) -> Dict[str, SiteInfo]:
        local = self.local_latents
        return {n: s for n, s in self.latent_sites.items() if n not in local}

    def loss_floor(self, dtype: torch.dtype) -> Optional[float]:
        r"""The lowest value a negative log-density estimate of this program can take with
        parameters in ``dtype``'s range: :math:`-2 c \sum_s n_s` with :math:`c = -\log`
        ``finfo(dtype).tiny`` and :math:`n_s` the site's scalar elements (times its plates'
        N/B).  A proper density of one scalar element exceeds :math:`e^{c}` only with a scale
        below the smallest normal number, and a guide's :math:`-\log q` at its own draw is
        bounded alike, so a loss below the floor is numerical garbage (a runaway fit), never
        a result.  ``None`` where a ``pyro.factor`` (unbounded by construction) is present."""
        c = -math.log(torch.finfo(dtype).tiny)
        total = 0.0
        for s in self.sites.values():
            if s.distribution == "Unit":
                return None
            scale = math.prod(self.plates[p].scale for p in s.plates if p in self.plates)
            total += max(1, math.prod(s.value_shape)) * scale
        return -2.0 * c * total

    def describe(self) -> str:
        """A table of the sites, for error messages and ``repr``."""
        rows = []
        for s in self.sites.values():
            kind = "observed" if s.is_observed else "latent"
            cont = "discrete" if s.is_discrete else "continuous"
            plates = ",".join(s.plates) or "-"
            rows.append(
                f"  {s.name:<20} {kind:<8} {cont:<10} {s.distribution:<22} "
                f"shape={tuple(s.value_shape)} plates={plates}"
            )
        return "\n".join(rows)


def _is_discrete(fn) -> bool:
    support = getattr(fn, "support", None)
    if support is None:
        return False
    with contextlib.suppress(NotImplementedError, AttributeError):
        return bool(support.is_discrete)
    return False


def _site_info(site) -> SiteInfo:
    fn = site["fn"]
    value = site["value"]
    plates = tuple(
        f.name
        for f in sorted(site["cond_indep_stack"], key=lambda f: -f.dim if f.dim is not None else 0)
        if f.vectorized
    )
    infer = site.get("infer") or {}
    return SiteInfo(
        name=site["name"],
        is_observed=bool(site["is_observed"]),
        is_discrete=_is_discrete(fn),
        has_rsample=bool(getattr(fn, "has_rsample", False)),
        plates=plates,
        value_shape=tuple(value.shape) if torch.is_tensor(value) else (),
        batch_shape=tuple(getattr(fn, "batch_shape", ())),
        event_shape=tuple(getattr(fn, "event_shape", ())),
        distribution="ImproperUniform" if is_improper(fn) else type(fn).__name__,
        support=getattr(fn, "support", None),
        enumerate=infer.get("enumerate"),
    )


def _choose_data_plate(sites: Dict[str, SiteInfo], plates: Dict[str, PlateInfo]) -> Optional[str]:
    """The plate shared by every observed site; the outermost one that holds latents wins."""
    observed = [s for s in sites.values() if s.is_observed]
    if not observed:
        return None
    common = set(observed[0].plates)
    for s in observed[1:]:
        common &= set(s.plates)
    if not common:
        return None
    # outermost first: the most negative dim
    ordered = sorted(common, key=lambda n: plates[n].dim if plates[n].dim is not None else 0)
    for name in ordered:
        if any(name in s.plates for s in sites.values() if not s.is_observed):
            return name
    return ordered[0]


def structure_from_trace(trace, data_plate: Optional[str] = None) -> ProgramStructure:
    """Build a :class:`ProgramStructure` from an executed (non-vectorized) trace."""
    sites: Dict[str, SiteInfo] = {}
    plates: Dict[str, PlateInfo] = {}
    max_nesting = 0
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site_is_subsample(site):
            continue
        for f in site["cond_indep_stack"]:
            if not f.vectorized:
                continue
            full = f.full_size if f.full_size is not None else f.size
            plates.setdefault(f.name, PlateInfo(f.name, int(full), int(f.size), f.dim))
            if f.dim is not None:
                max_nesting = max(max_nesting, -f.dim)
        sites[name] = _site_info(site)
    if data_plate is not None and data_plate not in plates:
        raise ValueError(
            f"data_plate={data_plate!r} is not a plate of the model; its plates are "
            f"{sorted(plates) or 'none'}."
        )
    chosen = data_plate or _choose_data_plate(sites, plates)
    return ProgramStructure(sites, plates, max_nesting, chosen)


def _describe_args(args, kwargs) -> str:
    def one(v):
        if torch.is_tensor(v):
            return f"Tensor(dtype={v.dtype}, shape={tuple(v.shape)})"
        return type(v).__name__
    parts = [f"arg{i}={one(a)}" for i, a in enumerate(args)]
    parts += [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no arguments"


def init_to_feasible_point(site, dtype=None, device=None):
    """The point of ``site``'s support at zero on the unconstrained space, without needing a
    sample (Pyro's ``init_to_feasible`` draws once for the shape, which an ``ImproperUniform``
    prior cannot); usable as an autoguide's ``init_loc_fn`` (pass ``dtype`` with
    ``functools.partial`` for improper sites, which carry no dtype)."""
    fn = site["fn"]
    if dtype is None:
        ref = site.get("value")
        if torch.is_tensor(ref) and ref.is_floating_point():
            dtype = ref.dtype
        else:  # the distribution's own dtype; an ImproperUniform holds no tensor to say it
            try:
                dtype = fn.sample().dtype
            except NotImplementedError:
                dtype = torch.get_default_dtype()
    if device is None:
        ref = site.get("value")
        device = ref.device if torch.is_tensor(ref) else None
    transform = torch.distributions.biject_to(fn.support)
    shape = transform.inverse_shape(tuple(fn.batch_shape) + tuple(fn.event_shape))
    return transform(torch.zeros(shape, dtype=dtype, device=device))


def _sample_or_feasible(site, dtype=None, device=None):
    """A prototype value for ``site``: a draw, or where the distribution cannot be sampled
    (``ImproperUniform``, which holds no tensor to take a dtype from) a feasible point of its
    support in ``dtype`` (the data's)."""
    try:
        return site["fn"].sample()
    except NotImplementedError:
        return init_to_feasible_point(site, dtype=dtype, device=device)


def _data_dtype_device(args, kwargs):
    """Dtype and device of the first floating-point tensor among the data, else ``(None, None)``."""
    for v in list(args) + list(kwargs.values()):
        if torch.is_tensor(v) and v.is_floating_point():
            return v.dtype, v.device
    return None, None


def is_improper(fn) -> bool:
    """Whether a distribution is (or wraps) Pyro's ``ImproperUniform``."""
    while fn is not None:
        if isinstance(fn, pyro.distributions.ImproperUniform):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def dependent_support_sites(model: Callable, args: Sequence, kwargs: dict, tries: int = 2,
                            skip: Sequence[str] = ()) -> list:
    """Latent sites whose support changes from one run of the model to the next (e.g.
    ``Uniform(0, 1 - alpha)``, a bound that depends on another latent).  A transform to the
    unconstrained space taken from one prototype trace is wrong for them, so the backends
    that build one (:class:`PotentialEnergy`) refuse such a model by name.  Found by running the
    model ``tries + 1`` times with different random draws and comparing the supports' bounds."""
    def bounds(support):
        out = []
        for attr in ("lower_bound", "upper_bound"):
            b = getattr(support, attr, None)
            if torch.is_tensor(b):
                out.append(b.detach())
        base = getattr(support, "base_constraint", None)
        return out + (bounds(base) if base is not None else [])

    runs = []
    with preserved_rng():
        for seed in range(tries + 1):
            pyro.set_rng_seed(1000 + seed)
            tr = trace_program(model, args, kwargs)
            runs.append({n: bounds(s["fn"].support) for n, s in tr.nodes.items()
                         if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
                         and n not in skip})
    dependent = []
    for name, first in runs[0].items():
        for other in runs[1:]:
            again = other.get(name, [])
            if len(again) != len(first) or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, again)):
                dependent.append(name)
                break
    return dependent


def dependent_support_message(backend: str, sites: Sequence[str]) -> str:
    """The refusal for :func:`dependent_support_sites`."""
    return (f"The support of latent site(s) {list(sites)} depends on other latent sites (its bounds change "
            f"between runs of the model, e.g. Uniform(0, 1 - a), or a constraint built from other latents "
            f"such as a distribution over whole paths); {backend} maps every site to an "
            "unconstrained space with one fixed transform, which would be wrong for it (on the garch11 "
            "reference posterior it produced values outside the support). For bounded scalars, "
            "reparameterize: sample u ~ Uniform(0, 1) and set the site to low + (high - low) * u "
            "(pyro.deterministic), the same distribution as Uniform(low, high); otherwise use a "
            "guide-based backend (svi, iwae, chi2_vis) with a guide that draws the site inside its "
            "current support.")


def trace_program(fn: Callable, args: Sequence, kwargs: dict, *, role: str = "model", replay=None):
    """Run ``fn(*args, **kwargs)`` once under ``poutine.trace`` without moving the RNG.

    Errors raised by the program become a ``ValueError`` that shows the arguments' shapes,
    since a wrong-shaped input is by far the most common cause.
    """
    runner = fn if replay is None else poutine.replay(fn, trace=replay)
    if replay is None:  # a site that cannot be sampled (an improper prior) gets a feasible value
        import functools

        from pyro.infer.autoguide.initialization import InitMessenger

        dtype, device = _data_dtype_device(args, kwargs)
        runner = InitMessenger(functools.partial(_sample_or_feasible, dtype=dtype, device=device))(runner)
    with preserved_rng():
        try:
            trace = poutine.trace(runner).get_trace(*args, **kwargs)
        except (ValueError, RuntimeError, IndexError, TypeError) as exc:
            raise ValueError(
                f"Running the {role} on the given data failed before inference started:\n"
                f"  {type(exc).__name__}: {exc}\n"
                f"The {role} was called with {_describe_args(args, kwargs)}. Check that the data "
                f"shapes match the {role}'s plates and parameters, and that model and guide take "
                "the same arguments."
            ) from exc
    return trace


def inspect_program(fn: Callable, *args, data_plate: Optional[str] = None, **kwargs) -> ProgramStructure:
    """Classify the sample sites of one run of a Pyro program.

    :param fn: a model or guide.
    :param data_plate: the plate that indexes data points; found automatically as the
        outermost plate shared by all observed sites that also holds latent sites.
    :returns: :class:`ProgramStructure`.

    Example::

        >>> structure = inspect_program(model, x)
        >>> structure.local_latents.keys(), structure.subsampled_plates.keys()
    """
    return structure_from_trace(trace_program(fn, args, kwargs), data_plate=data_plate)


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """:math:`\\log \\frac1K \\sum_k e^{x_k}` along ``dim``, computed stably."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def log_mean_exp_se(lw: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Delta-method standard error of :func:`log_mean_exp`: sd(w) / (sqrt(K) mean(w)).

    Computed from self-normalized weights so that nothing overflows.
    """
    k = lw.shape[dim]
    w = torch.exp(lw - lw.amax(dim=dim, keepdim=True))
    mean = w.mean(dim)
    sd = w.std(dim, unbiased=True) if k > 1 else torch.zeros_like(mean)
    return sd / (math.sqrt(k) * mean)


@dataclasses.dataclass
class LogWeights:
    r"""Per-particle importance log-weights, split into global and per-datapoint parts.

    ``global_`` has shape ``(K,)``: every term outside the data plate (global latents and
    observations, already scaled as Pyro scales them).  ``local`` has shape ``(K, B)``: the
    per-datapoint sum over the sites inside the data plate *without* the plate's N/B
    subsampling factor, which is kept in ``local_scale``.  Thus

    .. math:: \log w_k = g_k + \frac{N}{B} \sum_{i=1}^{B} \ell_{ik}.

    ``has_global_latents`` says whether :math:`g_k` varies with the particles (a global latent
    site exists); if it does not, the per-datapoint factorization of the evidence applies.
    """

    global_: torch.Tensor
    local: Optional[torch.Tensor]
    local_scale: float
    data_plate: Optional[str]
    has_global_latents: bool

    @classmethod
    def cat(cls, parts: Sequence["LogWeights"]) -> "LogWeights":
        """Particles of several evaluations of the same model (e.g. chunks) as one set."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return cls(torch.cat([p.global_ for p in parts]),
                   None if first.local is None else torch.cat([p.local for p in parts]),
                   first.local_scale, first.data_plate, any(p.has_global_latents for p in parts))

    @property
    def num_particles(self) -> int:
        return self.global_.shape[0]

    @property
    def joint(self) -> torch.Tensor:
        """:math:`\\log w_k` of the whole joint, shape ``(K,)``."""
        if self.local is None:
            return self.global_
        return self.global_ + self.local_scale * self.local.sum(-1)

    @property
    def factorizes(self) -> bool:
        """True when the weight is a product over data points (no particle-dependent global term)."""
        if self.local is None or self.has_global_latents:
            return False
        return bool(torch.all(self.global_ == self.global_[0]))

    def log_evidence(self) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Importance-sampling estimate of :math:`\log p(x)` and its standard error.

        With global latents: :math:`\log \frac1K \sum_k w_k` over the joint weights.  With only
        local latents each data point gets its own K particles,
        :math:`\hat p(x) = e^{g} \prod_i \frac1K \sum_k e^{\ell_{ik}}`, an unbiased estimate
        with far lower variance; standard errors add in quadrature over data points.
        """
        if not self.factorizes:
            return self.is_log_likelihood(), log_mean_exp_se(self.joint, 0)
        se = self.local_scale * log_mean_exp_se(self.local, 0).pow(2).sum().sqrt()
        return self.is_log_likelihood(), se

    @property
    def particle_weights(self) -> torch.Tensor:
        """The log-weights that are normalized over particles: ``(K, B)`` per data point where
        the weight factorizes, else the joint ``(K,)``."""
        return self.local if self.factorizes else self.joint

    def reduce(self, per_weight: torch.Tensor) -> torch.Tensor:
        """Sum a quantity shaped like ``particle_weights`` without its particle dim over data
        points, with the minibatch factor N/B where the weights factorize."""
        return self.local_scale * per_weight.sum() if self.factorizes else per_weight.sum()

    @property
    def constant(self) -> torch.Tensor:
        """The particle-independent part of the log-weight where it factorizes (else 0)."""
        return self.global_.mean() if self.factorizes else self.global_.new_zeros(())

    def is_log_likelihood(self) -> torch.Tensor:
        r"""The importance-sampled log-likelihood of these particles, a scalar: per data point
        :math:`g + \frac{N}{B} \sum_i \log \frac1K \sum_k e^{\ell_{ik}}` where the weights
        factorize, else :math:`\log \frac1K \sum_k w_k`.  Its expectation is IWAE's bound."""
        return self.constant + self.reduce(log_mean_exp(self.particle_weights, 0))

    def weights_for_diagnostics(self) -> torch.Tensor:
        """Log-weights whose tail the PSIS k-hat should judge: ``(K,)`` or ``(K, B)``."""
        return self.particle_weights


def pad_left(t: torch.Tensor, ndim: int, site: str) -> torch.Tensor:
    if t.dim() > ndim:
        raise ValueError(
            f"Site {site!r} has log_prob shape {tuple(t.shape)}, with more batch dimensions than "
            f"its plates declare ({ndim - 1}). Declare the missing dimensions with pyro.plate "
            "or move them into the event shape with .to_event(n)."
        )
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))


def draw_prior(model, structure: "ProgramStructure", num_draws: int, ndim: int, args, kwargs) -> Dict[str, torch.Tensor]:
    """``num_draws`` joint draws of the latent sites from the model's prior,
    ``{site: (num_draws, *site shape)}`` (parameters are not traced: ``poutine.block``).

    One model run inside a plate of ``num_draws`` at ``dim=-ndim`` where the model broadcasts
    over it (every site's value then holds ``num_draws`` times its shape); otherwise, for a
    model that does not broadcast, one run per draw.
    """
    names = list(structure.latent_sites)
    batched = _prior_draws_in_plate(model, structure, names, num_draws, ndim, args, kwargs)
    if batched is not None:
        return batched
    draws = []
    with torch.no_grad():
        for _ in range(num_draws):
            tr = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(*args, **kwargs)
            draws.append({n: tr.nodes[n]["value"] for n in names})
    return {n: torch.stack([d[n] for d in draws]).detach() for n in names}


def draw_guide(model, guide, structure: "ProgramStructure", num_draws: int, args, kwargs) -> Dict[str, torch.Tensor]:
    """``num_draws`` joint draws of the latent sites from the guide, ``{site: (num_draws, *site
    shape)}``, detached: one vectorized guide run (:class:`ParticleEvaluator`), the starting
    chains or particles of a sampler that was given a guide."""
    ev = ParticleEvaluator(model, guide, structure, structure.max_plate_nesting)
    with torch.no_grad():
        vals = ev.latent_values(ev.guide_trace(num_draws, args, kwargs), num_draws)
    return {n: v.detach() for n, v in vals.items()}


def _prior_draws_in_plate(model, structure, names, k, ndim, args, kwargs):
    """The vectorized draws of :func:`draw_prior`, or ``None`` when the model does not broadcast."""
    def in_plate(*a, **kw):
        with pyro.plate("_ppl_lvm_prior_draws", k, dim=-ndim):
            return model(*a, **kw)
    try:
        with torch.no_grad():
            tr = poutine.trace(poutine.block(in_plate, hide_types=["param"])).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a model that fails inside the plate does not broadcast
        return None
    out = {}
    for n in names:
        v = tr.nodes[n]["value"]
        shape = tuple(structure.sites[n].value_shape)
        if v.numel() != k * math.prod(shape):
            return None
        out[n] = v.reshape((k,) + shape).detach()
    return out


def _num_draws(values, num_draws):
    if num_draws is not None:
        return int(num_draws)
    if not values:
        raise ValueError("num_draws is needed when there are no latent values (every latent enumerated).")
    return next(iter(values.values())).shape[0]


def _reference(values, args):
    """A tensor whose device new indices should follow: a value, else the first tensor argument."""
    for v in list(values.values()) + [a for a in args if torch.is_tensor(a)]:
        return v
    return torch.zeros(())


class BatchedLogDensity:
    r"""Per-site log-densities of a model at :math:`K` sets of latent values in one call: the
    one batched log-density engine, behind :class:`ParticleEvaluator` (guide particles) and
    :class:`PotentialEnergy` (chains and SMC particles on unconstrained space).

    The :math:`K` draws are a ``pyro.plate`` at ``dim=-ndim``, left of the model's own plates,
    when the model broadcasts over it (one model run for all draws); otherwise the conditioned
    model is mapped over them with ``torch.func.vmap`` (argument validation off inside, which
    vmap needs for data-dependent checks).  Which one is decided once (``mode="auto"``), on
    the first evaluation, from three draws evaluated both ways on the same minibatch: the plate
    run is used only where it gives the same log-densities (:func:`_pick_mode`).

    :param model: the model.
    :param ProgramStructure structure: its prototype structure.
    :param int ndim: dims of every returned term: the draws' dim plus the model's batch dims.
    :param str mode: ``"auto"``, ``"plate"`` or ``"vmap"``.
    :param str plate_name: name of the plate holding the draws.
    """

    def __init__(self, model, structure: "ProgramStructure", ndim: int, mode: str = "auto",
                 plate_name: str = "_ppl_lvm_draws"):
        from .validation import check_choice

        check_choice(mode, "mode", ("auto", "plate", "vmap"))
        self.model = model
        self.structure = structure
        self.ndim = int(ndim)
        self.mode = mode
        self.plate_name = plate_name

    def layout(self, value: torch.Tensor, name: str) -> torch.Tensor:
        """``(K, *site shape)`` -> the site's layout inside the draws' plate (singleton dims between
        the draws' dim and the site's own batch dims)."""
        info = self.structure.sites[name]
        pad = self.ndim - 1 - len(info.batch_shape)
        return value.reshape((value.shape[0],) + (1,) * pad + tuple(info.value_shape))

    def random_subsamples(self, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The indices each subsampled plate would draw (a random subset), shared by all K draws."""
        return {n: torch.randperm(p.size, device=like.device)[: p.subsample_size]
                for n, p in self.structure.subsampled_plates.items()}

    def plate_log_probs(self, values, fixed=None, args=(), kwargs=None, num_draws: Optional[int] = None):
        """One model run inside the draws' plate, conditioned on ``values`` (``(K, *shape)``) and on
        ``fixed`` (``{plate: indices}``, subsample sites; a fresh minibatch where absent).  Returns
        ``({site: (scaled, unscaled log_prob)}, {plate: indices used})``.  ``num_draws`` is K when
        ``values`` is empty (every latent enumerated)."""
        k = _num_draws(values, num_draws)
        laid = {n: self.layout(v, n) for n, v in values.items()}
        if fixed:
            laid.update(fixed)

        def in_draws(*a, **kw):
            with pyro.plate(self.plate_name, k, dim=-self.ndim):
                return self.model(*a, **kw)

        trace = poutine.trace(poutine.condition(in_draws, data=laid)).get_trace(*args, **(kwargs or {}))
        trace.compute_log_prob()
        out = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or name not in self.structure.sites:
                continue
            out[name] = (pad_left(site["log_prob"], self.ndim, name),
                         pad_left(site["unscaled_log_prob"], self.ndim, name))
        used = {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample" and site_is_subsample(s)}
        return out, used

    def vmap_log_probs(self, values, fixed, args=(), kwargs=None):
        """The conditioned model mapped over the K draws with vmap; ``fixed`` holds the subsample
        indices (shared by all draws), and ``values`` may carry per-draw subsample indices."""
        return _vmapped_log_probs(self.model, values, fixed, list(self.structure.sites), self.ndim, args,
                                  kwargs or {})

    def choose_mode(self, values, fixed=None, args=(), kwargs=None, num_draws: Optional[int] = None) -> str:
        """Decide between ``"plate"`` and ``"vmap"`` from three of the draws (RNG left untouched)."""
        k = min(3, _num_draws(values, num_draws))
        few = {n: v[:k].detach() for n, v in values.items()}
        plate_err = vmap_err = a = b = None
        with preserved_rng():
            try:
                a, used = self.plate_log_probs(few, fixed, args, kwargs, num_draws=k)
            except Exception as exc:  # noqa: BLE001 - any failure means the model does not broadcast
                plate_err, used = exc, (dict(fixed) if fixed else self.random_subsamples(_reference(few, args)))
            try:  # the same minibatch as the plate run
                b = self.vmap_log_probs(few, used, args, kwargs)
            except Exception as exc:  # noqa: BLE001
                vmap_err = exc
        self.mode = _pick_mode(a, b, k, plate_err, vmap_err, "draws")
        return self.mode

    def log_probs(self, values, args=(), kwargs=None, fixed=None):
        """``({site: (scaled log_prob, unscaled log_prob)}, {plate: indices used})`` at ``values``
        (``(K, *site shape)``), K in dim 0 and :attr:`ndim` dims, plates aligned right."""
        if self.mode == "auto":
            self.choose_mode(values, fixed, args, kwargs)
        if self.mode == "plate":
            return self.plate_log_probs(values, fixed, args, kwargs)
        used = dict(fixed) if fixed else self.random_subsamples(_reference(values, args))
        return self.vmap_log_probs(values, used, args, kwargs), used

    @staticmethod
    def per_draw(term: torch.Tensor, k: int) -> torch.Tensor:
        """A term ``(K or 1, ...)`` summed to ``(K,)``."""
        return term.expand((k,) + tuple(term.shape[1:])).reshape(k, -1).sum(-1)

    def observation_log_likelihood(self, log_probs, k: int) -> Dict[str, torch.Tensor]:
        """``{observed site: (K, *batch shape)}`` unscaled log-likelihood of each observation
        (a term keyed by something other than a site, e.g. an enumerated block per data point,
        comes back as ``(K, B)``)."""
        out = {}
        for name, (_, ulp) in log_probs.items():
            info = self.structure.sites.get(name)
            if info is not None and not info.is_observed:
                continue
            ulp = ulp.expand((k,) + tuple(ulp.shape[1:]))
            shape = tuple(info.batch_shape) if info is not None else None
            out[name] = ulp.reshape((k,) + shape) if shape is not None and ulp[0].numel() == math.prod(shape) \
                else ulp.reshape(k, -1)
        return out


class _EngineView:
    """What :class:`ParticleEvaluator` and :class:`PotentialEnergy` share: the engine in
    ``self.density`` and its plate-or-vmap ``mode``."""

    density: BatchedLogDensity

    @property
    def mode(self) -> str:
        """``"plate"``, ``"vmap"`` or ``"auto"`` (not decided yet): see :class:`BatchedLogDensity`."""
        return self.density.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.density.mode = value


class ParticleEvaluator(_EngineView):
    """Draw K guide particles in one vectorized plate and score them under the model.

    :param model: the model, a callable Pyro program.
    :param guide: the guide; it must broadcast over a particle plate on the left.
    :param model_structure: :class:`ProgramStructure` of the model's prototype trace.
    :param int max_plate_nesting: plate dims used by model and guide (particles go left of it).
    :param str mode: ``"plate"`` (run the model inside the particle plate), ``"vmap"`` (map the
        conditioned model over particles with ``torch.func.vmap``) or ``"auto"`` (decide on the
        first call by comparing both on a few particles).
    """

    def __init__(self, model, guide, model_structure: ProgramStructure, max_plate_nesting: int,
                 mode: str = "auto"):
        self.model = model
        self.guide = guide
        self.structure = model_structure
        self.max_plate_nesting = int(max_plate_nesting)
        self.density = BatchedLogDensity(model, model_structure, self.max_plate_nesting + 1, mode,
                                         plate_name=PARTICLE_PLATE)

    @staticmethod
    def subsamples(guide_trace) -> Dict[str, torch.Tensor]:
        """``{plate: indices}`` of the guide's plates (the model reuses its minibatch), without the
        particle plate."""
        return {n: s["value"] for n, s in guide_trace.nodes.items()
                if s["type"] == "sample" and site_is_subsample(s) and n != PARTICLE_PLATE}

    @property
    def particle_dim(self) -> int:
        return -(self.max_plate_nesting + 1)

    def _in_particles(self, fn, num_particles: int):
        def wrapped(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, num_particles, dim=self.particle_dim):
                return fn(*args, **kwargs)
        return wrapped

    # ----------------------------------------------------------------- guide side
    def guide_trace(self, num_particles: int, args, kwargs):
        """The guide traced once inside a particle plate of size ``num_particles``."""
        try:
            return poutine.trace(self._in_particles(self.guide, num_particles)).get_trace(*args, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(
                "The guide failed when run inside a vectorized particle plate "
                f"(pyro.plate at dim={self.particle_dim}): {exc}\nWrite the guide so that it "
                "broadcasts over extra batch dimensions on the left: index with `...`, declare "
                "plates with pyro.plate(..., dim=-k), and pass max_plate_nesting if the guide "
                "uses more plate dims than the model."
            ) from exc

    def latent_values(self, guide_trace, num_particles: int) -> Dict[str, torch.Tensor]:
        """Latent values from a vectorized guide trace, as ``(K, *site shape)`` tensors."""
        out = {}
        for name, info in self.structure.latent_sites.items():
            site = guide_trace.nodes.get(name)
            if site is None:
                continue
            out[name] = self._particles_first(site["value"], info, num_particles, event_dim=len(site["fn"].event_shape))
        return out

    def _particles_first(self, value, info: SiteInfo, num_particles: int, event_dim: int):
        pos = self.particle_dim - event_dim
        if value.dim() < -pos:
            value = value.reshape((1,) * (-pos - value.dim()) + tuple(value.shape))
        value = value.movedim(pos, 0)
        target = (num_particles,) + tuple(info.value_shape)
        value = value.expand((num_particles,) + tuple(value.shape[1:]))
        if value[0].numel() == math.prod(info.value_shape):
            return value.reshape(target)
        return value.expand(target)

    # ----------------------------------------------------------------- model side

    def enumerated_sites(self, guide_trace) -> Tuple[str, ...]:
        """Model latent sites marked for enumeration that the guide does not sample: they are
        summed out exactly (:meth:`_model_log_probs_enum`) wherever the model is scored."""
        return tuple(n for n, s in self.structure.latent_sites.items()
                     if s.enumerate is not None and n not in guide_trace.nodes)

    def _model_log_probs_enum(self, guide_trace, num_particles, args, kwargs):
        r"""Model log-densities with the enumerated sites summed out (Pyro's enumeration).

        The model is run on the guide's K particles under ``poutine.enum``: every site marked
        ``infer={"enumerate": ...}`` and absent from the guide gets a dimension of its own left
        of the model's plates.  Sites whose log-density does not touch such a dimension are
        returned as by :meth:`model_log_probs`.  The others (the enumerated sites and every
        site that depends on them) form one *block*, contracted by Pyro's tensor variable
        elimination in the log semiring (:func:`_contract_enumerated`), so that for data point
        :math:`i`

        .. math:: b_{ki} = \log \sum_{z_i} p(z_i \mid \theta_k)\, p(x_i \mid z_i, \theta_k),

        the marginal log-density of data point :math:`i` given particle :math:`k`'s other
        latents (enumerated sites in nested plates are summed inside their plates).  When every
        block site lies in the data plate the block is returned per data point under the key of
        its one observed site (or the data plate's name when there are several); otherwise (an
        enumerated site outside the data plate couples the data points) as one term per
        particle under :data:`ENUMERATED_BLOCK`.  :attr:`block_sites` records the block's sites.

        The particles are a plate where the model broadcasts over one (:meth:`resolve_mode`);
        otherwise the model is enumerated once per particle (``torch.func.vmap`` cannot map
        Pyro's enumeration), which is slow for many particles: write the model to broadcast
        (``Vindex``, ``...`` indexing) for fast results.

        Reference: Obermeyer, Bingham, Jankowiak, Chen, Pradhan, Goodman. *Tensor variable
        elimination for plated factor graphs*. ICML 2019.
        """
        ndim = self.max_plate_nesting + 1
        if self.resolve_mode(args, kwargs) == "plate":
            model = poutine.replay(self._in_particles(self.model, num_particles), trace=guide_trace)
            model = poutine.enum(model, first_available_dim=self.particle_dim - 1)
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            out, names = _contract_enumerated(trace, self.structure, ndim, PARTICLE_PLATE)
        else:
            values = self.latent_values(guide_trace, num_particles)
            fixed = {n: s["value"] for n, s in guide_trace.nodes.items()
                     if s["type"] == "sample" and site_is_subsample(s)}
            # torch.func.vmap cannot map Pyro's enumeration (poutine.enum reads ``.data``), so a
            # model that does not broadcast over particles is enumerated one particle at a time
            # (used for results, not inside training steps)
            runs = []
            for k in range(num_particles):
                conditioned = poutine.condition(self.model, data={**{n: v[k] for n, v in values.items()}, **fixed})
                enumerated = poutine.enum(conditioned, first_available_dim=-(self.max_plate_nesting + 1))
                with validation_off():
                    runs.append(_contract_enumerated(poutine.trace(enumerated).get_trace(*args, **kwargs),
                                                     self.structure, ndim - 1, None))
            names = runs[0][1]
            out = {n: tuple(_pad_after_first(torch.stack([r[0][n][i] for r in runs]), ndim, n) for i in (0, 1))
                   for n in runs[0][0]}
        self.block_sites = names
        return out

    def resolve_mode(self, args, kwargs) -> str:
        """Decide (once) between ``"plate"`` and ``"vmap"`` for these arguments; return it."""
        if self.mode == "auto":
            with preserved_rng():  # deciding the mode must not shift the fit's random stream
                gt = self.guide_trace(3, args, kwargs)
            self.density.choose_mode(self.latent_values(gt, 3), self.subsamples(gt), args, kwargs, num_draws=3)
        return self.mode

    def model_log_probs(self, guide_trace, num_particles, args, kwargs):
        """Dict site -> (scaled log_prob, unscaled log_prob), particles in dim 0.

        Both tensors have ``max_plate_nesting + 1`` dims, the plates' dims aligned right.  The
        model is conditioned on the guide's latent values and minibatch (the engine,
        :class:`BatchedLogDensity`); enumerated sites are summed out
        (:meth:`_model_log_probs_enum`).
        """
        if self.enumerated_sites(guide_trace):
            return self._model_log_probs_enum(guide_trace, num_particles, args, kwargs)
        self.resolve_mode(args, kwargs)
        values = self.latent_values(guide_trace, num_particles)
        return self.density.log_probs(values, args, kwargs, fixed=self.subsamples(guide_trace))[0]

    # ----------------------------------------------------------------- weights
    def _accumulator(self, num_particles: int) -> "PlateSums":
        return PlateSums.for_structure(self.structure, num_particles, self.max_plate_nesting + 1)

    def _guide_sites(self, guide_trace, names=None):
        """Guide sample sites that enter log q: the model's latents and auxiliary sites."""
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if name not in self.structure.latent_sites and not (site.get("infer") or {}).get("is_auxiliary"):
                continue
            if names is not None and name not in names:
                continue
            yield name, site, tuple(f.name for f in site["cond_indep_stack"] if f.vectorized)

    def log_weights(self, num_particles: int, args, kwargs, guide_trace=None, model_lp=None,
                    detach_guide_params: bool = False) -> LogWeights:
        """:class:`LogWeights` of ``num_particles`` fresh particles (or of ``guide_trace``).

        ``model_lp``, the output of :meth:`model_log_probs` for ``guide_trace``, saves a model run.
        With ``detach_guide_params`` the guide's log-density is evaluated with its distribution
        parameters detached (gradients then reach the guide only through the sampled values:
        the "sticking the landing" and DReG estimators need this).
        """
        if guide_trace is None:
            guide_trace = self.guide_trace(num_particles, args, kwargs)
        if model_lp is None:
            model_lp = self.model_log_probs(guide_trace, num_particles, args, kwargs)
        guide_trace.compute_log_prob()
        acc = self._accumulator(num_particles)
        ndim = self.max_plate_nesting + 1
        for name, (lp, _) in model_lp.items():
            plates, is_latent = self._term_plates(name)
            acc.add(lp, plates, is_latent)
        # log q (autoguides draw through auxiliary sites and put the Jacobian on a Delta site)
        for name, site, plates in self._guide_sites(guide_trace):
            lq = site["log_prob"]
            if detach_guide_params:
                lq = detach_distribution(site["fn"], name).log_prob(site["value"])
                lq = scale_and_mask(lq, site["scale"], site["mask"])
            acc.add(-pad_left(lq, ndim, name), plates, True)
        return acc.log_weights()

    def guide_log_probs(self, guide_trace, num_particles: int, names=None,
                        detach_values: bool = False) -> LogWeights:
        """log q of the named guide sites (all when ``None``), split like :class:`LogWeights`.

        With ``detach_values`` the density is evaluated at detached values, so that gradients
        reach the guide's parameters only through log q itself (score-function estimators).
        """
        guide_trace.compute_log_prob()
        acc = self._accumulator(num_particles)
        ndim = self.max_plate_nesting + 1
        import pyro.distributions as dist

        for name, site, plates in self._guide_sites(guide_trace, names):
            lq = site["log_prob"]
            if detach_values and isinstance(site["fn"], dist.Delta):
                # an autoguide's z = T(u): at a fixed sample its log-Jacobian does not depend on
                # q's parameters (they enter through the auxiliary site u)
                lq = lq.detach()
            elif detach_values and torch.is_tensor(site["value"]) and site["value"].requires_grad:
                lq = scale_and_mask(site["fn"].log_prob(site["value"].detach()), site["scale"], site["mask"])
            acc.add(pad_left(lq, ndim, name), plates, True)
        return acc.log_weights()

    def _term_plates(self, name):
        """Plates and latent-ness of a term of :meth:`model_log_probs` (a site or the block of
        summed-out enumerated sites)."""
        info = self.structure.sites.get(name)
        if info is not None:
            return info.plates, not info.is_observed
        if name == ENUMERATED_BLOCK:
            return (), True
        return (name,), True  # the enumerated block per data point, keyed by the data plate

    def per_observation_log_likelihood(self, guide_trace, num_particles, args, kwargs, model_lp=None):
        r"""Dict observed site -> ``(K, *batch shape)`` unscaled log-likelihood per observation.

        Enumerated sites are summed out: the observations that depend on them get the marginal
        :math:`\log p(x_i \mid \text{the guide's latents})` per data point, under the name of
        their one observed site (or of the data plate when several observed sites share the
        enumerated latents).  When an enumerated site outside the data plate couples the data
        points there is no per-observation log-likelihood: ``ValueError``.
        """
        if model_lp is None:
            model_lp = self.model_log_probs(guide_trace, num_particles, args, kwargs)
        if ENUMERATED_BLOCK in model_lp:
            raise ValueError(
                f"Enumerated site(s) {list(self.block_sites[ENUMERATED_BLOCK])} lie outside the data "
                "plate, so the observations are not independent given the guide's latents and have "
                "no per-observation log-likelihood (for LOO). Sample the site in the guide instead, "
                "or move it into the data plate.")
        return self.density.observation_log_likelihood(model_lp, num_particles)



def _pick_mode(a, b, k, plate_err, vmap_err, what) -> str:
    """Choose "plate" or "vmap" from the two evaluations of the same K draws (``None`` where the
    evaluation failed): the plate run is used only where it gives the same log-densities."""
    if a is not None and b is not None:
        def total(lp, n):
            v = lp[n][0]
            return v.expand((k,) + tuple(v.shape[1:])).reshape(k, -1).sum(-1)

        same = set(a) == set(b) and all(torch.allclose(total(a, n), total(b, n), rtol=1e-4, atol=1e-4)
                                        for n in a)
        return "plate" if same else "vmap"
    if a is not None:
        return "plate"
    if b is not None:
        return "vmap"
    raise ValueError(
        f"Could not evaluate the model on a batch of {what}, neither by running it inside a "
        f"plate ({type(plate_err).__name__}: {plate_err}) nor with torch.func.vmap "
        f"({type(vmap_err).__name__}: {vmap_err}). Make the model broadcast over extra batch "
        "dimensions on the left (index with `...`, use pyro.plate(..., dim=-k) for every batch "
        "dimension)."
    ) from plate_err


def _pad_after_first(t: torch.Tensor, ndim: int, site: str) -> torch.Tensor:
    """``(K, *batch)`` -> ``(K, 1, ..., *batch)`` with ``ndim`` dims (vmapped results)."""
    if t.dim() > ndim:
        raise ValueError(f"Site {site!r} has more batch dims than max_plate_nesting allows.")
    return t.reshape((t.shape[0],) + (1,) * (ndim - t.dim()) + tuple(t.shape[1:]))


def _contract_enumerated(trace, structure: ProgramStructure, ndim: int, lead_plate: Optional[str]):
    """Split an enumerated model trace into plain terms and the summed-out enumerated block.

    Returns ``({name: (scaled log_prob, unscaled log_prob)}, {block key: block site names})``
    with ``ndim``-dim tensors (plates aligned right; ``lead_plate``, the particle plate, kept as
    a dim of its own).  See :meth:`ParticleEvaluator._model_log_probs_enum`.
    """
    from collections import OrderedDict

    from pyro.ops import packed
    from pyro.ops.contract import contract_to_tensor
    from pyro.ops.rings import LogRing
    from pyro.poutine.util import prune_subsample_sites

    trace = prune_subsample_sites(trace)
    trace.compute_log_prob()
    trace.pack_tensors()
    symbol = trace.plate_to_symbol
    plate_syms = set(symbol.values())
    enum_syms = set()
    for site in trace.nodes.values():
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None:
            enum_syms |= set(site["packed"]["unscaled_log_prob"]._pyro_dims) - plate_syms
    data_plate = structure.data_plate
    out, block, scales, block_names = {}, OrderedDict(), set(), []
    in_data_plate = data_plate is not None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name not in structure.sites:
            continue
        ulp = site["packed"]["unscaled_log_prob"]
        if enum_syms.isdisjoint(ulp._pyro_dims):
            out[name] = (pad_left(site["log_prob"], ndim, name), pad_left(site["unscaled_log_prob"], ndim, name))
            continue
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        ordinal = frozenset(symbol[f.name] for f in frames if f.size > 1)
        block.setdefault(ordinal, []).append(packed.scale_and_mask(ulp, mask=site["packed"]["mask"]))
        scale = site["scale"]
        scales.add(float(scale.max()) if torch.is_tensor(scale) else float(scale))
        block_names.append(name)
        in_data_plate = in_data_plate and any(f.name == data_plate for f in frames)
    if not block:
        return out, {}
    if len(scales) > 1:
        raise ValueError(
            f"The enumerated sites and the sites that depend on them ({block_names}) carry "
            f"different scales {sorted(scales)} (poutine.scale, or plates subsampled differently); "
            "summing them out needs one scale. Put them in the same subsampled plate.")
    target = {symbol[p] for p in ([lead_plate] if lead_plate else []) + ([data_plate] if in_data_plate else [])
              if p in symbol}
    total = contract_to_tensor(block, enum_syms, target_ordinal=frozenset(target), ring=LogRing())
    total = pad_left(packed.unpack(total, trace.symbol_to_dim), ndim, "enumerated block")
    observed = [n for n in block_names if structure.sites[n].is_observed]
    if not in_data_plate:
        key = ENUMERATED_BLOCK
    elif len(observed) == 1 and structure.sites[observed[0]].plates == (data_plate,):
        key = observed[0]
    else:
        key = data_plate
    out[key] = (total * scales.pop(), total)
    return out, {key: tuple(block_names)}


def _vmapped_log_probs(model, values, fixed, names, ndim, args, kwargs):
    """Map the model conditioned on ``values`` (``(K, *shape)`` tensors) over K with vmap.

    Returns ``{site: (scaled log_prob, unscaled log_prob)}`` with K in dim 0 and ``ndim`` dims.
    ``fixed`` conditions sites shared by all K (the subsample indices of plates).
    """

    def one(vals):
        with validation_off():
            tr = poutine.trace(poutine.condition(model, data={**vals, **fixed})).get_trace(*args, **kwargs)
            tr.compute_log_prob()
        return {n: (tr.nodes[n]["log_prob"], tr.nodes[n]["unscaled_log_prob"]) for n in names}

    mapped = torch.func.vmap(one, randomness="different")(values)
    # vmap puts particles first; the site's own batch dims align to the right
    return {name: (_pad_after_first(lp, ndim, name), _pad_after_first(ulp, ndim, name))
            for name, (lp, ulp) in mapped.items()}


class PlateSums:
    """Sum per-particle log-density terms into a global ``(K,)`` part and a local ``(K, B)`` part
    (per data point of the data plate, unscaled), giving :class:`LogWeights`."""

    @classmethod
    def for_structure(cls, structure: "ProgramStructure", k: int, ndim: int) -> "PlateSums":
        """The accumulator for K draws of a model with this structure, terms with ``ndim`` dims."""
        data_plate = structure.data_plate
        if data_plate is None:
            return cls(k, ndim, None, None, 1.0, 0)
        info = structure.plates[data_plate]
        return cls(k, ndim, data_plate, ndim + info.dim, info.scale, info.subsample_size)

    def __init__(self, k, ndim, data_plate, plate_pos, local_scale, width):
        self.k, self.ndim = k, ndim
        self.data_plate, self.plate_pos = data_plate, plate_pos
        self.local_scale, self.width = local_scale, width
        self.global_ = None
        self.local = None
        self.has_global_latents = False

    def add(self, term, plates, is_latent):
        k = self.k
        term = term.expand((k,) + tuple(term.shape[1:]))
        if self.data_plate is not None and self.data_plate in plates:
            dims = [d for d in range(1, self.ndim) if d != self.plate_pos]
            red = term.sum(dims) if dims else term
            red = red.expand(k, self.width) / self.local_scale
            self.local = red if self.local is None else self.local + red
        else:
            red = term.reshape(k, -1).sum(-1)
            self.global_ = red if self.global_ is None else self.global_ + red
            if is_latent:
                self.has_global_latents = True

    def log_weights(self) -> LogWeights:
        global_ = self.global_
        if global_ is None:  # every term lies in the data plate (or there are none)
            ref = self.local
            global_ = ref.new_zeros(self.k) if ref is not None else torch.zeros(self.k)
        return LogWeights(global_, self.local, self.local_scale,
                          self.data_plate if self.local is not None else None, self.has_global_latents)


def detach_distribution(fn, site: str = "?"):
    """A copy of distribution ``fn`` whose parameters are detached from the autograd graph.

    Supports the distributions guides are made of: any distribution rebuilt from its
    ``arg_constraints`` parameters (Normal, LogNormal, Gamma, Beta, Bernoulli, Categorical, ...),
    MultivariateNormal (through ``scale_tril``), and the wrappers Independent, Expanded and
    Masked.  An autoguide's ``Delta`` site is returned as it is: its density is the
    log-Jacobian of the transform at the sample, which depends on q's parameters only through
    the sample (the auxiliary site before it carries q's parameters).  Anything else raises
    ``ValueError`` naming the site.
    """
    import pyro.distributions as dist

    if isinstance(fn, dist.Delta):
        # an autoguide's site z = T(u): its log_density -log|dT/du| is a function of the
        # sample, not of q's parameters, so it keeps its path derivative (detaching it biased
        # STL/DReG on constrained sites) and its event_dim
        return fn
    if isinstance(fn, dist.Independent):
        return dist.Independent(detach_distribution(fn.base_dist, site), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return detach_distribution(fn.base_dist, site).expand(fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        return detach_distribution(fn.base_dist, site).mask(fn._mask)
    if isinstance(fn, (dist.MultivariateNormal, torch.distributions.MultivariateNormal)):
        return type(fn)(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    params = {}
    for key in getattr(fn, "arg_constraints", {}):
        if key in ("probs", "logits") and key not in fn.__dict__:
            continue  # torch keeps only one of the two parametrizations ...
        if key == "probs" and "logits" in fn.__dict__:
            continue  # ... and caches the other once used: rebuild from logits alone
        value = getattr(fn, key, None)
        if torch.is_tensor(value):
            params[key] = value.detach()
    try:
        new = type(fn)(**params, validate_args=False)
    except TypeError as exc:
        raise ValueError(
            f"Cannot evaluate the guide's {type(fn).__name__} at site {site!r} with its parameters "
            "detached (needed by the 'stl' and 'dreg' gradient estimators). Use "
            "gradient='pathwise', or a guide built from Normal/LogNormal/MultivariateNormal-type "
            "distributions."
        ) from exc
    if tuple(new.batch_shape) != tuple(fn.batch_shape):
        new = new.expand(fn.batch_shape)
    return new


# --------------------------------------------------------------------------- potential energy
CHAIN_PLATE = "_ppl_lvm_chains"


@contextlib.contextmanager
def validation_off():
    """Switch Pyro's and torch.distributions' argument validation off inside the block: a
    proposal that leaves the support numerically (``exp(u)`` underflowing to 0) then gives a
    non-finite log-density, which samplers reject, instead of an exception."""
    torch_default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(torch_default)




def _subsets(rows: int, size: int, k: int, device) -> torch.Tensor:
    """``rows`` independent uniform subsets of ``k`` of ``range(size)`` (without replacement).

    For small ``k / size`` draw with replacement and redraw the rare rows with a repeat, O(k)
    per row; otherwise the ``k`` largest of ``size`` uniforms, O(size) per row.
    """
    if k * 20 > size:
        return torch.rand(rows, size, device=device).topk(k, -1).indices
    idx = torch.randint(0, size, (rows, k), device=device)
    for _ in range(100):
        srt = idx.sort(-1).values
        bad = (srt[:, 1:] == srt[:, :-1]).any(-1)
        if not bool(bad.any()):
            return idx
        idx[bad] = torch.randint(0, size, (int(bad.sum()), k), device=device)
    return torch.rand(rows, size, device=device).topk(k, -1).indices


class PotentialEnergy(_EngineView):
    r"""A model's potential energy on unconstrained space, for :math:`C` chains at once.

    Every continuous latent site :math:`x_s` with support :math:`S_s` is written as
    :math:`x_s = T_s(u_s)` with :math:`T_s = ` ``biject_to(S_s)`` (Pyro's transforms, as in
    its HMC), and

    .. math::

        U(u) = -\log p\big(\mathcal{D}, T(u)\big)
               - \sum_s \log\left|\det \frac{\partial T_s}{\partial u_s}\right| .

    The log-joint comes from a trace of the model conditioned on :math:`T(u)`, so every
    ``poutine.scale`` and every subsampled ``pyro.plate`` keeps its scale: with a plate of
    ``size=N, subsample_size=B`` each call evaluates the likelihood of a fresh minibatch
    multiplied by :math:`N/B`, an unbiased estimate of the full-data potential (the stochastic
    potential of SG-MCMC, Welling & Teh 2011; Chen, Fox & Guestrin 2014).

    The :math:`C` chains are a ``pyro.plate`` left of the model's own plates (one model run for
    all chains, one shared minibatch); a model that does not broadcast over it is mapped with
    ``torch.func.vmap`` instead (``mode``; chosen on the first call by comparing both).  With
    ``independent_minibatches`` (SG-HMC's default) every chain gets its own minibatch: the
    model is mapped with vmap over chains and per-chain subsample indices, whatever ``mode``
    says (``mode`` then describes only full-data and shared evaluations).

    :param model: the model.
    :param ProgramStructure structure: its prototype structure (latent sites must be continuous).
    :param int max_plate_nesting: plate dims the model uses.
    :param str mode: ``"auto"``, ``"plate"`` or ``"vmap"``.
    """

    def __init__(self, model, structure: ProgramStructure, max_plate_nesting: int, mode: str = "auto"):
        from torch.distributions import biject_to

        self.model = model
        self.structure = structure
        self.sites = list(structure.latent_sites)
        self.transforms = {}
        for name in self.sites:
            info = structure.sites[name]
            if info.is_discrete:  # scored at given values (GFlowNet-EM), never moved by gradients
                continue
            try:
                self.transforms[name] = biject_to(info.support)
            except NotImplementedError as exc:
                raise ValueError(
                    f"Latent site {name!r} has support {info.support}, which has no bijection to "
                    "unconstrained space in torch.distributions.biject_to; gradient-based samplers "
                    "cannot move it."
                ) from exc
        batch = max([len(s.batch_shape) for s in structure.sites.values()] + [int(max_plate_nesting)])
        self.ndim = batch + 1  # chains + batch dims
        self.density = BatchedLogDensity(model, structure, self.ndim, mode, plate_name=CHAIN_PLATE)
        #: ``{plate name: indices}`` to hold the minibatch fixed across calls (``None``: a fresh
        #: minibatch per call, as the model's plates draw them)
        self.fixed_subsamples: Optional[Dict[str, torch.Tensor]] = None
        #: give every chain its own minibatch (a vmapped run with per-chain subsample indices)
        #: instead of one minibatch shared by all chains in a plate run
        self.independent_minibatches = False

    # ---------------------------------------------------------------- transforms
    def constrain(self, unconstrained: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Map ``{site: (C, *unconstrained shape)}`` to the sites' supports."""
        return {n: self.transforms[n](u) for n, u in unconstrained.items()}

    def unconstrain(self, values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Inverse of :meth:`constrain`."""
        return {n: self.transforms[n].inv(v) for n, v in values.items()}

    def log_abs_det_jacobian(self, unconstrained, values) -> torch.Tensor:
        """:math:`\\sum_s \\log|\\det \\partial T_s/\\partial u_s|` per chain, shape ``(C,)``."""
        total = None
        for n, u in unconstrained.items():
            ladj = self.transforms[n].log_abs_det_jacobian(u, values[n])
            ladj = ladj.reshape(u.shape[0], -1).sum(-1)
            total = ladj if total is None else total + ladj
        return total

    # ---------------------------------------------------------------- model evaluation
    def layout(self, value: torch.Tensor, name: str) -> torch.Tensor:
        """``(C, *site shape)`` laid out inside the chains' plate (:meth:`BatchedLogDensity.layout`)."""
        return self.density.layout(value, name)

    def log_probs(self, values: Dict[str, torch.Tensor], args, kwargs) -> Dict[str, tuple]:
        """``{site: (scaled log_prob, unscaled log_prob)}`` of every sample site at ``values``.

        ``values`` are constrained ``(C, *site shape)`` tensors; results have the chains in
        dim 0 and :attr:`ndim` dims (plates aligned right).  Argument validation is off here
        (the model was validated at setup): a value that leaves the support numerically, such
        as ``exp(u)`` underflowing to 0 in a proposal, gives a non-finite energy, which samplers
        reject, instead of an exception.
        """
        num_chains = next(iter(values.values())).shape[0]
        with validation_off():
            if self._per_chain_minibatches(num_chains):
                return self.density.vmap_log_probs({**values, **self._per_chain_subsamples(values)}, {}, args, kwargs)
            return self.density.log_probs(values, args, kwargs, fixed=self.fixed_subsamples)[0]

    def _per_chain_minibatches(self, num_chains):
        return (self.independent_minibatches and num_chains > 1 and not self.fixed_subsamples
                and bool(self.structure.subsampled_plates))

    def _per_chain_subsamples(self, values):
        ref = next(iter(values.values()))
        c = ref.shape[0]
        return {n: _subsets(c, p.size, p.subsample_size, ref.device)
                for n, p in self.structure.subsampled_plates.items()}

    def log_probs_and_subsamples(self, values, args, kwargs):
        """:meth:`log_probs` plus ``{plate name: indices}`` of the minibatch it used (to condition
        further runs on the same minibatch with ``poutine.condition``)."""
        with validation_off():
            return self.density.log_probs(values, args, kwargs, fixed=self.fixed_subsamples)

    @staticmethod
    def per_chain(term: torch.Tensor, num_chains: int) -> torch.Tensor:
        """A term ``(C or 1, ...)`` summed to ``(C,)``."""
        return BatchedLogDensity.per_draw(term, num_chains)

    def __call__(self, unconstrained: Dict[str, torch.Tensor], args, kwargs) -> torch.Tensor:
        """:math:`U(u)` per chain, shape ``(C,)`` (differentiable in ``u`` and the model's params)."""
        values = self.constrain(unconstrained)
        num_chains = next(iter(values.values())).shape[0]
        lp = self.log_probs(values, args, kwargs)
        log_joint = sum(self.per_chain(v[0], num_chains) for v in lp.values())
        return -(log_joint + self.log_abs_det_jacobian(unconstrained, values))

    def log_joint(self, values: Dict[str, torch.Tensor], args, kwargs) -> torch.Tensor:
        """:math:`\\log p(\\mathcal{D}, x)` per chain at constrained ``values`` (no Jacobian)."""
        num_chains = next(iter(values.values())).shape[0]
        lp = self.log_probs(values, args, kwargs)
        return sum(self.per_chain(v[0], num_chains) for v in lp.values())

    def observation_log_likelihood(self, values, args, kwargs, log_probs=None) -> Dict[str, torch.Tensor]:
        """``{observed site: (C, *batch shape)}`` unscaled log-likelihood of each observation."""
        num_chains = next(iter(values.values())).shape[0]
        if log_probs is None:
            log_probs = self.log_probs(values, args, kwargs)
        return self.density.observation_log_likelihood(log_probs, num_chains)
