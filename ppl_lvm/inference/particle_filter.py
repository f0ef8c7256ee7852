r"""Particle filters for state-space models written to Pyro's ``SMCFilter`` contract.

A state-space model is an object with ``init(state, ...)`` and ``step(state, ...)`` methods
(and a proposal, the "guide", with the same methods that reads but never writes ``state``);
code written for :class:`pyro.infer.SMCFilter` runs unchanged.  :math:`K` particles are one
vectorized ``pyro.plate`` at ``dim = -(max_plate_nesting + 1)``.

**Weights and the evidence.**  At step :math:`t` each particle proposes :math:`z_t^k \sim
q(z_t \mid \text{state}^k)` (the transition itself when no guide is given: the bootstrap
filter) and gets the incremental weight

.. math::

    \log \alpha_t^k = \log p(z_t^k, y_t \mid \text{state}^k) - \log q(z_t^k \mid \text{state}^k).

With :math:`W_{t-1}^k` the normalized weights carried into the step (:math:`1/K` after a
resampling), the evidence increment is

.. math::

    \log \hat p(y_t \mid y_{<t}) = \log \sum_k W_{t-1}^k \alpha_t^k ,
    \qquad \log \hat Z = \sum_t \log \hat p(y_t \mid y_{<t}),

which stays unbiased for :math:`Z` (not its log) whether or not the step resampled, the
point that adaptive (ESS-triggered) implementations often get wrong (Del Moral, Doucet &
Jasra 2012).  Resampling is triggered when :math:`\mathrm{ESS} = 1/\sum_k (W_t^k)^2 <`
``ess_threshold`` :math:`\cdot K`; the decision is made on the device with ``torch.where``
(no host synchronization per step).  Schemes: systematic (default), stratified,
multinomial (Douc, Cappé & Moulines 2005).

**Gradients and learned parameters.**  :attr:`ParticleFilter.log_evidence_` is differentiable
in the parameters of the model and the proposal: particles are reparameterized draws and the
resampling indices are constants.  What happens to a particle's weight at a resampling step
is the choice (``resampling_gradient``):

* ``"fisher"`` (default; Scibior & Wood 2021): after resampling each particle's log-weight is
  :math:`\log W^{a} - \bot(\log W^{a}) - \log K`, equal to :math:`-\log K` in value but
  carrying the gradient of its ancestor's weight, so that :math:`\nabla_\theta \log\hat Z`
  is a consistent estimate of the score :math:`\nabla_\theta \log p_\theta(y)` (Fisher's
  identity): particle maximum likelihood for *model* parameters.
* ``"drop"`` (FIVO / VSMC: Maddison et al. 2017, Naesseth et al. 2018, Le et al. 2018): the
  weights restart at :math:`-\log K` with no gradient.  This ascends :math:`\mathbb
  E[\log\hat Z]` with the score-function term of the ancestor draws left out, a biased
  gradient.

Neither is an unbiased gradient of :math:`\mathbb E[\log \hat Z]` for *proposal*
parameters (the proposal does not change :math:`p(y)`, so "fisher" gives them no signal in
expectation, and on the linear-Gaussian fixture we measured the "drop" gradient pointing
away from the locally optimal proposal).  To learn a proposal, train with
``ess_threshold=0`` (no resampling: the objective is the sequential importance sampling
bound of AESMC/IWAE, whose reparameterized gradient is exact, with variance growing with the
sequence length) and filter with resampling afterwards.

**Smoothing** by backward simulation (Godsill, Doucet & West 2004): trajectories are drawn
backwards, :math:`j_T \sim W_T`, :math:`j_t \sim W_t^{i}\, p(z_{t+1}^{(j_{t+1})} \mid
\text{state}_t^{i})`, with the transition density evaluated by re-running the model's
``step`` for every (trajectory, particle) pair in one vectorized plate.

References:

* Gordon, Salmond, Smith. *Novel approach to nonlinear/non-Gaussian Bayesian state estimation*. 1993.
* Del Moral, Doucet, Jasra. *On adaptive resampling strategies for SMC*. Bernoulli 2012.
* Douc, Cappé, Moulines. *Comparison of resampling schemes for particle filtering*. 2005.
* Godsill, Doucet, West. *Monte Carlo smoothing for nonlinear time series*. JASA 2004.
* Naesseth, Linderman, Ranganath, Blei. *Variational Sequential Monte Carlo*. AISTATS 2018.
* Maddison et al. *Filtering Variational Objectives*. NeurIPS 2017.
* Le, Igl, Rainforth, Jin, Wood. *Auto-Encoding Sequential Monte Carlo*. ICLR 2018.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, NamedTuple, Optional, Sequence

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.smcfilter import SMCState
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..errors import IncompatibleModelError
from ..traces import log_mean_exp_se, validation_off, log_mean_exp
from ..validation import check_choice, check_positive_int
from .base import Backend, StepProposal
from .registry import register_backend
from .results import EvidenceEstimate
from .requirements import Requirements

__all__ = [
    "ParticleFilter",
    "SMCFilterBackend",
    "systematic_resample",
    "stratified_resample",
    "multinomial_resample",
    "effective_sample_size",
    "is_state_space_model",
    "FilterStepInfo",
]

PARTICLES = "_ppl_lvm_smc_particles"


# --------------------------------------------------------------------------- resampling
def _inverse_cdf(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Ancestor indices: for each sorted point u in [0, 1), the k with cdf_{k-1} <= u < cdf_k."""
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), points.contiguous(), right=True)
    return idx.clamp_(max=weights.shape[-1] - 1)


def systematic_resample(weights: torch.Tensor) -> torch.Tensor:
    r"""Systematic resampling: one uniform shift, points :math:`(j + u)/K`. Returns ``(K,)`` indices.

    O(K) without a search: the number of points below :math:`c_k` (the cumulative weight) is
    :math:`\lceil K c_k - u \rceil`, so scattering a one at each such count and taking the
    cumulative sum gives, for every point, the number of :math:`c_k` at or below it.
    """
    k = weights.shape[-1]
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    u = torch.rand((), dtype=weights.dtype, device=weights.device)
    below = torch.ceil(k * cdf - u).clamp_(0, k).long()
    counts = torch.zeros(k + 1, dtype=torch.long, device=weights.device)
    counts.scatter_add_(0, below, torch.ones_like(below))
    return counts[:-1].cumsum(0).clamp_(max=k - 1)


def stratified_resample(weights: torch.Tensor) -> torch.Tensor:
    """Stratified resampling: one uniform per stratum, points :math:`(k + u_k)/K`."""
    k = weights.shape[-1]
    u = torch.rand(k, dtype=weights.dtype, device=weights.device)
    points = (torch.arange(k, dtype=weights.dtype, device=weights.device) + u) / k
    return _inverse_cdf(weights, points)


def multinomial_resample(weights: torch.Tensor) -> torch.Tensor:
    """Multinomial resampling: K i.i.d. draws from the weights (sorted uniforms, same law)."""
    k = weights.shape[-1]
    points = torch.rand(k, dtype=weights.dtype, device=weights.device).sort().values
    return _inverse_cdf(weights, points)


RESAMPLERS = {
    "systematic": systematic_resample,
    "stratified": stratified_resample,
    "multinomial": multinomial_resample,
}


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """:math:`1 / \\sum_k W_k^2` for normalized weights :math:`W \\propto e^{\\text{log\\_weights}}`."""
    lw = log_weights - torch.logsumexp(log_weights, -1, keepdim=True)
    return torch.exp(-torch.logsumexp(2 * lw, -1))


def is_state_space_model(obj) -> bool:
    """Whether ``obj`` follows Pyro's ``SMCFilter`` contract (``init`` and ``step`` methods)."""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "step", None))


# --------------------------------------------------------------------------- scoring
def _per_particle(lp: torch.Tensor, k: int, batch_dims: int) -> torch.Tensor:
    """Sum a site's log-density over everything but the particle dim -> ``(K,)``."""
    if lp.dim() < batch_dims:
        return lp.sum().expand(k)
    lp = lp.movedim(lp.dim() - batch_dims, 0)
    return lp.reshape(lp.shape[0], -1).sum(-1).expand(k)


class _Scorer(Messenger):
    """Accumulate per-particle log-densities of sample sites without building a Trace.

    With ``replay`` the latent sites take the given values (the proposal's draws).
    """

    def __init__(self, num_particles: int, batch_dims: int, replay: Optional[dict] = None):
        super().__init__()
        self.k, self.batch_dims, self.replay = num_particles, batch_dims, replay
        self.values: Dict[str, torch.Tensor] = {}
        self.latent = None
        self.observed = None

    def _pyro_sample(self, msg):
        if self.replay is not None and not msg["is_observed"] and msg["name"] in self.replay:
            msg["value"] = self.replay[msg["name"]]
            msg["done"] = True

    def _pyro_post_sample(self, msg):
        if site_is_subsample(msg):
            return
        fn, value = msg["fn"], msg["value"]
        lp = scale_and_mask(fn.log_prob(value), msg["scale"], msg["mask"])
        lp = _per_particle(lp, self.k, self.batch_dims)
        if msg["is_observed"]:
            self.observed = lp if self.observed is None else self.observed + lp
        else:
            if self.replay is not None and msg["name"] not in self.replay:
                raise ValueError(
                    f"The model samples site {msg['name']!r}, which the proposal (guide) did not; "
                    "the guide's init/step must sample every latent site of the model's. (In "
                    "ParticleFilter.smooth this means model.step named its sites differently when "
                    "called again for a past step: make step depend only on state and its "
                    "arguments, e.g. pass the time step as an argument rather than counting on self.)"
                )
            self.values[msg["name"]] = value
            self.latent = lp if self.latent is None else self.latent + lp


class FilterStepInfo(NamedTuple):
    """What one time step of :class:`ParticleFilter` did (``ParticleFilter.last_step``)."""

    log_increment: torch.Tensor  #: :math:`\log \hat p(y_t \mid y_{<t})`
    ess: torch.Tensor            #: effective sample size of the weights before resampling
    resampled: torch.Tensor      #: whether the step resampled (0-dim bool)


def _plain_attributes(obj) -> dict:
    """The plain Python scalars (``int``, ``float``, ``bool``, ``str``) among ``obj``'s
    attributes: what a state-space object may keep on ``self`` between steps (Pyro's
    ``SimpleHarmonicModel`` counts its steps in ``self.t`` to name its sites)."""
    d = getattr(obj, "__dict__", None) or {}
    return {k: v for k, v in d.items() if type(v) in (int, float, bool, str)}


def _restore_attributes(obj, snapshot: dict) -> None:
    for k, v in snapshot.items():
        setattr(obj, k, v)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(())


# --------------------------------------------------------------------------- the filter
class ParticleFilter:
    r"""A vectorized particle filter with exact evidence bookkeeping (module docstring).

    Drop-in for :class:`pyro.infer.SMCFilter`: ``init(*args)``, ``step(*args)``,
    ``get_empirical()`` and ``state`` behave the same, and in addition

    * :attr:`log_evidence_` holds :math:`\log\hat Z` of the steps so far (a tensor, differentiable
      in the model's and guide's parameters);
    * :meth:`history` returns per step the ESS before resampling, whether it resampled, the
      evidence increment, and the filtering mean and variance of every ``state`` entry;
    * :meth:`smooth` draws smoothed trajectories by backward simulation
      (``store_particles=True``);
    * :meth:`filter` runs ``init`` and then ``step`` over a sequence of observations.

    :param model: object with ``init(state, ...)`` and ``step(state, ...)``.
    :param guide: proposal object with the same methods, or ``None`` for the bootstrap filter
        (propose from the model's own transition).
    :param int num_particles: :math:`K`.
    :param int max_plate_nesting: plate dims the model uses (particles go left of them).
    :param float ess_threshold: resample when ESS < ``ess_threshold * K``; 1 resamples at
        every step, 0 never.
    :param str resampling: ``"systematic"``, ``"stratified"`` or ``"multinomial"``.
    :param bool record: keep the per-step diagnostics of :meth:`history`.
    :param bool store_particles: keep every step's particles and weights (for :meth:`smooth`).
    :param str resampling_gradient: how gradients pass a resampling step (module docstring):
        ``"fisher"`` (default) or ``"drop"``.
    """

    def __init__(self, model, guide=None, num_particles: int = 1000, max_plate_nesting: int = 0, *,
                 ess_threshold: float = 0.5, resampling: str = "systematic", record: bool = True,
                 store_particles: bool = False, resampling_gradient: str = "fisher"):
        if not is_state_space_model(model):
            raise IncompatibleModelError(
                f"A particle filter needs a state-space model object with init(state, ...) and "
                f"step(state, ...) methods (Pyro's SMCFilter contract); got {type(model).__name__}. "
                "For a static model (a plain Pyro function) use the tempered SMC sampler, "
                "backend='smc'."
            )
        if guide is not None and not is_state_space_model(guide):
            raise TypeError(f"guide must be None (bootstrap filter) or an object with init(state, ...) and "
                            f"step(state, ...) methods; got {type(guide).__name__}.")
        self.model, self.guide = model, guide
        self.num_particles = check_positive_int(num_particles, "num_particles")
        if isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, int) or max_plate_nesting < 0:
            raise ValueError(f"max_plate_nesting must be a non-negative int, got {max_plate_nesting!r}")
        self.max_plate_nesting = max_plate_nesting
        if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, numbers.Real) \
                or not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1] (resample when ESS < threshold * K), "
                             f"got {ess_threshold!r}")
        self.ess_threshold = float(ess_threshold)
        self.resampling = check_choice(resampling, "resampling", RESAMPLERS)
        self.record = bool(record)
        self.store_particles = bool(store_particles)
        self.resampling_gradient = check_choice(resampling_gradient, "resampling_gradient", ("fisher", "drop"))
        self.reset()

    def reset(self) -> None:
        """Forget all particles, weights and history (``init`` calls it)."""
        self.state = SMCState(self.num_particles)
        self._log_w: Optional[torch.Tensor] = None  # normalized log-weights carried into the next step
        self._log_z: Optional[torch.Tensor] = None
        self.num_time_steps = 0  # time steps filtered so far (init counts as one)
        self._hist: Dict[str, list] = {"ess": [], "resampled": [], "log_increment": []}
        self._moments: Dict[str, List[tuple]] = {}
        self._stored: List[dict] = []
        #: what the last time step did (:class:`FilterStepInfo`), ``None`` before the first
        self.last_step: Optional[FilterStepInfo] = None

    # ------------------------------------------------------------------ public API
    def init(self, *args, **kwargs) -> None:
        """Run ``model.init`` (and ``guide.init``) on fresh particles and weight them."""
        self.reset()
        self._advance("init", args, kwargs)

    def step(self, *args, **kwargs) -> None:
        """One filtering step: propose, weight, update the evidence, maybe resample."""
        if self._log_w is None:
            raise RuntimeError("Call init(...) before step(...).")
        self._advance("step", args, kwargs)

    def filter(self, observations, init_args: Sequence = (), init_kwargs: Optional[dict] = None):
        """``init(*init_args, **init_kwargs)`` then ``step(y)`` for each ``y`` in ``observations``.

        ``observations``: a tensor (time in dim 0) or a sequence of per-step arguments (a tuple
        per step is unpacked as positional arguments).  Returns :attr:`log_evidence_`.
        """
        self.init(*init_args, **(init_kwargs or {}))
        for y in observations:
            if isinstance(y, tuple):
                self.step(*y)
            else:
                self.step(y)
        self._check_finite()
        return self.log_evidence_

    @property
    def log_evidence(self) -> torch.Tensor:
        """Deprecated name of :attr:`log_evidence_` (one name for a fitted object's running
        estimate, as ``SMCSampler.log_evidence_``; ``Fit.log_evidence()`` is the estimate with
        its standard error)."""
        import warnings

        warnings.warn("ParticleFilter.log_evidence is deprecated: use ParticleFilter.log_evidence_ (the running "
                      "estimate, as SMCSampler.log_evidence_), or Fit.log_evidence() for an estimate with its "
                      "standard error.", FutureWarning, stacklevel=2)
        return self.log_evidence_

    @property
    def log_evidence_(self) -> torch.Tensor:
        r""":math:`\log \hat Z` of the steps so far (0-dim tensor, differentiable in the model's
        and proposal's parameters)."""
        if self._log_z is None:
            raise RuntimeError("The filter has not been run: call init(...) first.")
        self._check_finite()
        return self._log_z

    @property
    def log_weights(self) -> torch.Tensor:
        """Normalized log-weights of the current particles, shape ``(K,)``."""
        if self._log_w is None:
            raise RuntimeError("The filter has not been run: call init(...) first.")
        return self._log_w

    def get_empirical(self) -> Dict[str, "pyro.distributions.Empirical"]:
        """``{state key: Empirical}`` over the current particles and weights (as Pyro's)."""
        import pyro.distributions as dist

        return {key: dist.Empirical(value, self._log_w) for key, value in self.state.items()}

    def history(self) -> Dict[str, torch.Tensor]:
        """Per-step diagnostics, each a tensor with time in dim 0: ``ess`` (before resampling),
        ``resampled`` (bool), ``log_increment``, and ``mean/<key>``, ``var/<key>`` for every
        ``state`` entry (filtering moments, weighted before resampling)."""
        if not self.record:
            raise RuntimeError("This filter was built with record=False.")
        out = {k: torch.stack(v) for k, v in self._hist.items() if v}
        for key, vals in self._moments.items():
            out[f"mean/{key}"] = torch.stack([m for m, _ in vals])
            out[f"var/{key}"] = torch.stack([v for _, v in vals])
        return out

    # ------------------------------------------------------------------ internals
    def _run_programs(self, method, args, kwargs, state, k, replay_values=None):
        batch_dims = self.max_plate_nesting + 1
        model_fn = getattr(self.model, method)
        with poutine.block(hide_types=["sample"]), pyro.plate(PARTICLES, k, dim=-batch_dims):
            if replay_values is not None:  # fixed latent values (backward simulation)
                m = _Scorer(k, batch_dims, replay=replay_values)
                with m:
                    model_fn(state, *args, **kwargs)
                return m, None
            if self.guide is None:
                m = _Scorer(k, batch_dims)
                with m:
                    model_fn(state, *args, **kwargs)
                return m, None
            g = _Scorer(k, batch_dims)
            with state._lock(), g:
                getattr(self.guide, method)(state, *args, **kwargs)
            m = _Scorer(k, batch_dims, replay=g.values)
            with m:
                model_fn(state, *args, **kwargs)
            return m, g

    def _advance(self, method, args, kwargs):
        """One time step: propose and weigh, record, resample (each its own piece below)."""
        attrs = (_plain_attributes(self.model), _plain_attributes(self.guide)) if self.store_particles else None
        m, incr = self._weigh(method, args, kwargs)
        k = self.num_particles
        if self._log_w is None:
            self._log_w = torch.full((k,), -math.log(k), dtype=incr.dtype, device=incr.device)
            self._log_z = incr.new_zeros(())
        lw = self._log_w + incr
        log_norm = torch.logsumexp(lw, 0)
        self._log_z = self._log_z + log_norm
        lw = lw - log_norm
        ess = torch.exp(-torch.logsumexp(2 * lw.detach(), 0))
        self._record(method, args, kwargs, m, lw, ess, log_norm, attrs)
        lw, resampled = self._resample(lw, ess)
        if self.record:
            self._hist["resampled"].append(resampled)
        self._log_w = lw
        self.num_time_steps += 1
        self.last_step = FilterStepInfo(log_increment=log_norm.detach(), ess=ess, resampled=resampled)

    def _weigh(self, method, args, kwargs):
        """Propose :math:`z_t^k` and return ``(model scorer, log incremental weights (K,))``:
        :math:`\\log \\alpha_t^k = \\log p(z_t^k, y_t \\mid \\text{state}^k) - \\log q(z_t^k \\mid
        \\text{state}^k)` (the bootstrap's q is the transition, leaving the observation term)."""
        k = self.num_particles
        if self.num_time_steps == 0:  # validate the distributions' arguments on the first step only
            m, g = self._run_programs(method, args, kwargs, self.state, k)
        else:
            with validation_off():
                m, g = self._run_programs(method, args, kwargs, self.state, k)
        if m.latent is None and m.observed is None:
            raise ValueError(f"model.{method} has no sample sites; each step must sample or observe something.")
        if g is not None:
            missing = sorted(set(g.values) - set(m.values))
            if missing:
                raise ValueError(f"The guide's {method} samples site(s) {missing} that the model's {method} "
                                 "does not; the proposal must sample exactly the model's latent sites.")
        terms = [m.observed] if g is None else [m.latent, m.observed] + ([-g.latent] if g.latent is not None else [])
        ref = m.latent if m.latent is not None else m.observed
        return m, sum((t for t in terms if t is not None), ref.new_zeros(k))

    def _record(self, method, args, kwargs, m, lw, ess, log_norm, attrs=None):
        """History (ESS, evidence increments, weighted state moments) and stored particles."""
        k = self.num_particles
        if self.record:
            self._hist["ess"].append(ess)
            self._hist["log_increment"].append(log_norm.detach())
            w = lw.detach().exp()
            for key, value in self.state.items():
                v = value.detach()
                wv = w.reshape((k,) + (1,) * (v.dim() - 1))
                mean = (wv * v).sum(0)
                var = (wv * (v - mean) ** 2).sum(0)
                self._moments.setdefault(key, []).append((mean, var))
        if self.store_particles:
            self._stored.append({
                "state": {key: v.detach() for key, v in self.state.items()},
                "sites": {n: v.detach() for n, v in m.values.items()},
                "log_w": lw.detach(), "method": method, "args": args, "kwargs": kwargs,
                "attrs": attrs,  # the objects' plain attributes as this step found them
            })

    def _resample(self, lw, ess):
        """Resample the state when the ESS is below ``ess_threshold * K``; returns the carried
        log-weights and whether it resampled (a 0-dim bool tensor).  On an accelerator the decision
        stays on the device (no host synchronization); on the CPU a Python branch skips the work
        when the ESS is high."""
        k = self.num_particles
        if self.ess_threshold <= 0.0:
            return lw, torch.zeros((), dtype=torch.bool, device=lw.device)
        if lw.device.type == "cpu" and self.ess_threshold < 1.0 and not bool(ess < self.ess_threshold * k):
            return lw, torch.zeros((), dtype=torch.bool)
        idx = RESAMPLERS[self.resampling](lw.detach().exp())
        if self.resampling_gradient == "fisher" and lw.requires_grad:
            # value -log K, gradient of the ancestors' weights (Scibior & Wood 2021)
            resampled_lw = lw[idx] - lw[idx].detach() - math.log(k)
        else:
            resampled_lw = torch.full_like(lw, -math.log(k))
        if self.ess_threshold < 1.0:
            do = ess < self.ess_threshold * k
            idx = torch.where(do, idx, torch.arange(k, device=idx.device))
            lw = torch.where(do, resampled_lw, lw)
        else:
            do = torch.ones((), dtype=torch.bool, device=lw.device)
            lw = resampled_lw
        for key, value in list(self.state.items()):
            dict.__setitem__(self.state, key, value[idx])
        return lw, do

    def _check_finite(self):
        if self._log_z is not None and not bool(torch.isfinite(self._log_z)):
            incs = self._hist.get("log_increment") or []
            bad = next((t for t, v in enumerate(incs) if not bool(torch.isfinite(v))), None)
            where = f" at step {bad} (0 = init)" if bad is not None else ""
            raise FloatingPointError(
                f"The particle filter's log-evidence is {float(self._log_z.detach())}{where}: every particle got "
                "zero (or NaN) weight. Use more particles, a proposal closer to the data (a guide), "
                "or check the observation model."
            )

    # ------------------------------------------------------------------ smoothing
    @torch.no_grad()
    def smooth(self, num_trajectories: int = 100) -> Dict[str, torch.Tensor]:
        r"""Draw smoothed trajectories by backward simulation (needs ``store_particles=True``).

        The transition density of step :math:`t` is evaluated by calling ``model.step`` again,
        after the filter has finished, with the arguments step :math:`t` received and with the
        model's plain attributes (``int``/``float``/``bool``/``str``: a step counter such as
        Pyro's ``SimpleHarmonicModel.t``) set back to what step :math:`t` found; they are
        restored to their final values afterwards.  Anything else the model keeps on ``self``
        between steps (tensors, lists) is not replayed: ``step`` must otherwise depend only on
        ``state`` and its arguments.

        Returns ``{state key: (M, T, ...)}`` and ``{"site/<name>": (M, T, ...)}`` for the latent
        sites: :math:`M` draws from :math:`p(z_{0:T} \mid y_{0:T})`, with T the number of
        ``init`` + ``step`` calls.  Cost :math:`O(T M K)` evaluations of the transition, batched
        per time step.
        """
        num_trajectories = check_positive_int(num_trajectories, "num_trajectories")
        if not self.store_particles or not self._stored:
            raise RuntimeError("Backward simulation needs the particles of every step: build the filter with "
                               "store_particles=True and run it first.")
        M, K, stored = num_trajectories, self.num_particles, self._stored
        final = (_plain_attributes(self.model), _plain_attributes(self.guide))
        try:
            return self._backward_simulation(M, K, stored)
        finally:
            _restore_attributes(self.model, final[0])
            _restore_attributes(self.guide, final[1])

    def _backward_simulation(self, M, K, stored):
        T = len(stored)
        last = stored[-1]
        j = torch.distributions.Categorical(logits=last["log_w"]).sample((M,))
        states = [None] * T
        sites = [None] * T
        states[-1] = {key: v[j] for key, v in last["state"].items()}
        sites[-1] = {n: v[j] for n, v in last["sites"].items()}
        for t in range(T - 2, -1, -1):
            cur, nxt = stored[t], stored[t + 1]
            # pair (m, i) at position m * K + i: particle i of step t, trajectory m's next value
            rep_state = SMCState(M * K)
            for key, v in cur["state"].items():
                dict.__setitem__(rep_state, key, v.repeat((M,) + (1,) * (v.dim() - 1)))
            cond = {n: v.repeat_interleave(K, dim=0) for n, v in sites[t + 1].items()}
            if nxt.get("attrs") is not None:
                _restore_attributes(self.model, nxt["attrs"][0])
            scorer, _ = self._run_programs(nxt["method"], nxt["args"], nxt["kwargs"], rep_state, M * K,
                                           replay_values=cond)
            trans = scorer.latent.reshape(M, K)
            j = torch.distributions.Categorical(logits=cur["log_w"].unsqueeze(0) + trans).sample()
            states[t] = {key: v[j] for key, v in cur["state"].items()}
            sites[t] = {n: v[j] for n, v in cur["sites"].items()}
        out = {key: torch.stack([s[key] for s in states], 1) for key in states[-1]}
        # sites sampled at every step under one name (a model that names its sites per step,
        # "z_1", "z_2", ..., carries its trajectory in the state keys only)
        for n in [n for n in sites[-1] if all(n in s for s in sites)]:
            out[f"site/{n}"] = torch.stack([s[n] for s in sites], 1)
        return out

    def filtering_draws(self, num_samples: int) -> Dict[str, torch.Tensor]:
        r"""Draws from each step's filtering distribution :math:`p(z_t \mid y_{0:t})`,
        ``{state key: (num_samples, T, ...)}`` (needs ``store_particles=True``): at every step
        ``num_samples`` particles drawn by their weights, independently across steps (these are
        marginals, not trajectories: :meth:`smooth` gives those)."""
        num_samples = check_positive_int(num_samples, "num_samples")
        if not self.store_particles or not self._stored:
            raise RuntimeError("Filtering draws need the particles of every step: build the filter with "
                               "store_particles=True and run it first.")
        per_step = []
        for st in self._stored:
            j = torch.distributions.Categorical(logits=st["log_w"]).sample((num_samples,))
            per_step.append({key: v[j] for key, v in st["state"].items()})
        return {key: torch.stack([d[key] for d in per_step], 1) for key in per_step[-1]}


# --------------------------------------------------------------------------- backend
@register_backend("smc_filter")
class SMCFilterBackend(Backend):
    r"""Particle filtering through the backend contract, with learned proposals.

    Each :meth:`step` runs a :class:`ParticleFilter` over the whole sequence and, when the model
    or guide has parameters, takes one optimizer step ascending :math:`\log\hat Z` (variational
    SMC / FIVO; resampling treated as constant, see the module docstring).  The loss is
    :math:`-\log\hat Z`.

    Data convention: ``step(observations, init_args=(), init_kwargs=None)`` calls
    ``init(state, *init_args, **init_kwargs)`` and then ``step(state, y)`` for each ``y`` in
    ``observations`` (time in dim 0).

    :param model: state-space model object (``init``/``step``).
    :param guide: proposal object, or ``None`` for the bootstrap filter.
    :param optim: optimizer for the parameters (default Adam, lr 1e-2).
    :param num_particles: :math:`K`.
    :param ess_threshold, resampling, resampling_gradient, max_plate_nesting: as for
        :class:`ParticleFilter` (see its module docstring on learning proposals).
    """

    name = "smc_filter"
    requires = Requirements(program="state_space", guide="optional")
    _capture_params = False
    _evidence_from_runs = True
    valid_for = ("state-space model objects with init(state, ...)/step(state, ...) (Pyro's SMCFilter "
                 "contract); exact log-evidence, smoothing, model parameters by particle maximum likelihood")

    def __init__(self, model, guide=None, optim=None, *, num_particles: int = 100, ess_threshold: float = 0.5,
                 resampling: str = "systematic", resampling_gradient: str = "fisher",
                 max_plate_nesting: int = 0, validate: bool = True):
        super().__init__(model, guide, optim, max_plate_nesting=max_plate_nesting, validate=validate)
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.ess_threshold = ess_threshold
        self.resampling = resampling
        self.resampling_gradient = resampling_gradient
        self.filter_ = None

    def _make_filter(self, num_particles=None, **extra) -> ParticleFilter:
        return ParticleFilter(self.model, self.guide, num_particles or self.num_particles,
                              self.max_plate_nesting, ess_threshold=self.ess_threshold,
                              resampling=self.resampling, resampling_gradient=self.resampling_gradient,
                              **extra)

    def _check_state_space_data(self, observations=None, init_args=(), init_kwargs=None, **_options):
        self._make_filter()  # validates the options
        if observations is None:
            raise ValueError("Pass the observations: step(observations, init_args=(), init_kwargs=None).")
        if torch.is_tensor(observations) and self.validate and not bool(torch.isfinite(observations).all()):
            raise ValueError("observations contain NaN or inf; remove or impute them before filtering.")

    def _run_filter(self, observations, init_args, init_kwargs, **extra):
        pf = self._make_filter(**extra)
        with poutine.trace(param_only=True) as capture:
            log_z = pf.filter(observations, init_args, init_kwargs)
        params = [s["value"].unconstrained() for s in capture.trace.nodes.values() if s["type"] == "param"]
        return pf, log_z, [p for p in params if p.requires_grad]

    def _step(self, observations=None, init_args=(), init_kwargs=None) -> float:
        try:
            pf, log_z, params = self._run_filter(observations, init_args, init_kwargs)
        except FloatingPointError as err:  # every particle lost its weight at some time step
            self._divergence(str(err).rstrip("."))

        def commit():
            self.filter_ = pf

        if params and log_z.requires_grad:
            return self._gradient_step(lambda: self._backward(log_z, params, commit))
        loss = float(-log_z)
        if not math.isfinite(loss):
            self._divergence(f"the log-evidence estimate is {-loss}")
        commit()
        return loss

    @staticmethod
    def _backward(log_z, params, commit):
        loss = -log_z
        loss.backward()
        return StepProposal(float(loss.detach()), params, commit)

    def _default_num_steps(self) -> int:
        return 1

    def _log_evidence(self, num_particles, args, kwargs):
        """Mean of ``num_runs`` (keyword, default 10) independent filters' :math:`\\hat Z`."""
        runs = int(kwargs.pop("num_runs", 10))
        num_particles = self.num_particles if num_particles is None else num_particles
        observations, init_args, init_kwargs = self._unpack(args, kwargs)
        vals = []
        for _ in range(runs):
            _, log_z, _ = self._run_filter(observations, init_args, init_kwargs, num_particles=num_particles,
                                           record=False)
            vals.append(log_z.detach())
        v = torch.stack(vals)
        est = log_mean_exp(v, 0)
        se = log_mean_exp_se(v, 0) if runs > 1 else torch.tensor(float("nan"))
        return EvidenceEstimate(float(est), float(se), float("nan"), num_particles * runs, None, None,
                                "k-hat applies to importance weights; this is an SMC estimate (the "
                                "error bar is the spread of independent runs)")

    @staticmethod
    def _unpack(args, kwargs):
        observations = args[0] if args else kwargs.get("observations")
        init_args = args[1] if len(args) > 1 else kwargs.get("init_args", ())
        init_kwargs = args[2] if len(args) > 2 else kwargs.get("init_kwargs")
        return observations, init_args, init_kwargs

    def _posterior_samples(self, num_samples, args, kwargs):
        """Smoothed trajectories ``{state key: (num_samples, T, ...)}`` by backward simulation."""
        observations, init_args, init_kwargs = self._unpack(args, kwargs)
        pf = self._make_filter(store_particles=True, record=False)
        with torch.no_grad():
            pf.filter(observations, init_args, init_kwargs)
        return pf.smooth(num_samples)

    def _inference_data_groups(self, num_samples, args, kwargs):
        r"""A fresh filter run (with the fitted parameters) in ArviZ's groups, time as a named
        dimension ``"time"`` (0 = ``init``):

        * ``posterior``: ``num_samples`` smoothed trajectories of every state key (backward
          simulation), and ``<key>_filtered``: draws of each step's filtering distribution
          :math:`p(z_t \mid y_{0:t})` (independent across steps);
        * ``sample_stats``: the run's per-step ``filter_ess`` (before resampling),
          ``resampled`` and ``log_evidence_increment`` :math:`\log \hat p(y_t \mid y_{<t})`,
          the same for every draw of the run; ``attrs`` hold the run's ``log_evidence``;
        * ``observed_data``: the observations (a tensor, time in dim 0).

        There is no ``log_likelihood`` group: leave-one-out over the time steps of a
        state-space model is not what ``az.loo`` assumes."""
        observations, init_args, init_kwargs = self._unpack(args, kwargs)
        pf = self._make_filter(store_particles=True, record=True)
        with torch.no_grad():
            log_z = pf.filter(observations, init_args, init_kwargs)
            smoothed = pf.smooth(num_samples)
            filtered = pf.filtering_draws(num_samples)
        hist = pf.history()
        M = num_samples
        post, dims = {}, {}
        for key, v in smoothed.items():
            if key.startswith("site/"):
                continue
            post[key] = v.unsqueeze(0)
            dims[key] = ["time"] + [f"{key}_dim_{i}" for i in range(v.dim() - 2)]
        for key, v in filtered.items():
            name = f"{key}_filtered"
            post[name] = v.unsqueeze(0)
            dims[name] = ["time"] + [f"{key}_dim_{i}" for i in range(v.dim() - 2)]
        T = next(iter(smoothed.values())).shape[1]
        stats = {}
        for name, key in (("filter_ess", "ess"), ("resampled", "resampled"), ("log_evidence_increment", "log_increment")):
            h = hist[key].reshape(T).to(torch.float64)
            stats[name] = h.expand(1, M, T)
            dims[name] = ["time"]
        groups = {"posterior": post, "sample_stats": stats, "_dims": dims,
                  "_sample_stats_attrs": {"log_evidence": float(log_z), "num_particles": self.num_particles}}
        if torch.is_tensor(observations):
            groups["observed_data"] = {"observations": observations}
            dims["observations"] = ["observed_time"] + [f"observations_dim_{i}" for i in range(observations.dim() - 1)]
        return groups
