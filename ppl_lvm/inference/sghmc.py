r"""Stochastic-gradient MCMC: SG-HMC and SGLD on any continuous Pyro model.

The sampler moves :math:`C` chains of the model's latent variables on unconstrained space
(:class:`~ppl_lvm.traces.PotentialEnergy`: Pyro's ``biject_to`` transforms plus their
log-Jacobians).  Minibatches come from the model's own
``pyro.plate(..., subsample_size=B)``: the plate scales the minibatch likelihood by
:math:`N/B`, so the potential :math:`\tilde U` of each step is an unbiased estimate of the
full-data potential :math:`U`.  Pyro's and NumPyro's HMC/NUTS refuse subsampled plates; this
backend is built for them.

**SG-HMC** (Chen, Fox & Guestrin 2014, eq. 15, in the "SGD with momentum" parametrization,
learning rate :math:`\eta = \epsilon^2`, friction :math:`\alpha = \epsilon C`, unit mass):

.. math::

    v &\leftarrow (1 - \alpha)\, v - \eta\, G \nabla \tilde U(u)
          + \mathcal N\!\big(0,\; 2 (\alpha - \hat\beta)\, \eta\, G\big), \\
    u &\leftarrow u + v,

with :math:`\hat\beta = \eta G V / 2` estimated from the minibatch gradient noise variance
:math:`V` during warmup for models that subsample (0 otherwise; Chen et al.'s eq. 15 with their
noise estimate), and preconditioner :math:`G = I` for a given step size (rmsprop for
``step_size="auto"``).  With :math:`\alpha = 1` the momentum
is forgotten at every step and the update is **SGLD** (Welling & Teh 2011),
:math:`u \leftarrow u - \eta \nabla\tilde U + \mathcal N(0, 2\eta)`.

``preconditioner="rmsprop"`` uses :math:`G = \operatorname{diag}\big(1/(\lambda + \sqrt{V})\big)`
with :math:`V` a running average of squared gradients (pSGLD, Li, Chen, Carlson & Carin 2016).
:math:`V` adapts during warmup only and is then frozen, so that the kept draws come from a
sampler with a constant preconditioner, for which the correction term :math:`\Gamma` that
pSGLD drops is exactly zero.

**Structured SG-MCMC** (Alexos, Boyd & Mandt 2022): with ``groups=[[...], [...]]`` the latent
sites are split into groups; group :math:`i` moves on the potential averaged over the other
groups' earlier chain states,
:math:`U_i(u_i) = \mathbb E_{u_{-i} \sim \text{buffer}}\, U(u_i, u_{-i})`, which aims at the
factorized approximation :math:`\prod_i q_i(u_i)`, :math:`q_i \propto \exp(-U_i)`, and mixes
faster when the groups are strongly coupled in the posterior.  The target is approximate: the
buffer holds the chain's own recent states, which are correlated with the group that moves on
them, and one stored state per step is a noisy gradient.  Measured on a 2-d Gaussian with
posterior correlation -0.8 (``tests/test_sghmc.py``, step size 0.01, friction 0.5): the sd is
12-13% above the mean-field sd with a buffer of 200-2000 states (the exact marginal is 67%
above it), 39% above with a buffer of 20; means are right.  ``coupling=\rho`` uses the other
groups' *current* state with probability :math:`\rho` (the paper's dropout variant:
:math:`\rho = 1` is ordinary SG-HMC, :math:`\rho = 0` fully factorized).  All groups are
evaluated in one batched model run.

Model parameters (``pyro.param``, ``PyroModule`` weights without priors) are fitted during
warmup by stochastic-approximation EM (the optimizer ascends the chain-averaged log-joint),
then frozen, so the kept draws target a fixed posterior.

References:

* Chen, Fox, Guestrin. *Stochastic Gradient Hamiltonian Monte Carlo*. ICML 2014.
* Welling, Teh. *Bayesian Learning via Stochastic Gradient Langevin Dynamics*. ICML 2011.
* Li, Chen, Carlson, Carin. *Preconditioned SGLD for Deep Neural Networks*. AAAI 2016.
* Zhang, Li, Zhang, Chen, Wilson. *Cyclical SG-MCMC for Bayesian Deep Learning*. ICLR 2020.
* Alexos, Boyd, Mandt. *Structured Stochastic Gradient MCMC*. ICML 2022.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from pyro import poutine

from ..errors import IncompatibleModelError
from ..traces import PotentialEnergy, ProgramStructure, draw_guide, draw_prior, trace_program
from ..validation import check_positive, check_positive_int
from .base import Backend
from .registry import register_backend
from .requirements import Requirements

__all__ = ["SGHMC", "SGLD", "ConstantStepSize", "PolynomialDecay", "CyclicalStepSize", "sghmc_update", "SGHMCStepInfo"]


# --------------------------------------------------------------------------- step-size schedules
class ConstantStepSize:
    """:math:`\\eta_t = \\eta`."""

    def __init__(self, step_size: float):
        self.step_size = check_positive(step_size, "step_size")

    def __call__(self, t: int) -> float:
        return self.step_size

    def explore(self, t: int) -> bool:
        """Whether step ``t`` is an exploration step (no noise, no draw kept)."""
        return False

    def __repr__(self):
        return f"{type(self).__name__}({self.step_size:g})"


class PolynomialDecay(ConstantStepSize):
    """:math:`\\eta_t = \\eta_0\\,(1 + t/\\tau)^{-\\gamma}` (Welling & Teh 2011 use
    :math:`\\gamma \\in (0.5, 1]`, which satisfies the Robbins-Monro conditions).

    :param step_size: :math:`\\eta_0`.
    :param decay_steps: :math:`\\tau`, the step at which the step size has fallen by :math:`2^{-\\gamma}`.
    :param power: :math:`\\gamma` (default 0.55).
    """

    def __init__(self, step_size: float, decay_steps: float = 1000.0, power: float = 0.55):
        super().__init__(step_size)
        self.decay_steps = check_positive(decay_steps, "decay_steps")
        self.power = check_positive(power, "power")

    def __call__(self, t: int) -> float:
        return self.step_size * (1.0 + t / self.decay_steps) ** (-self.power)

    def __repr__(self):
        return f"PolynomialDecay({self.step_size:g}, decay_steps={self.decay_steps:g}, power={self.power:g})"


class CyclicalStepSize(ConstantStepSize):
    """Cosine cycles (Zhang et al. 2020, eq. 1):
    :math:`\\eta_t = \\tfrac{\\eta_0}{2}\\big(\\cos(\\pi\\, r_t) + 1\\big)`, :math:`r_t` the position
    within the current cycle in :math:`[0, 1)`.

    Steps with :math:`r_t <` ``exploration`` explore (momentum SGD, no noise, nothing kept);
    the rest of each cycle samples.  The schedule counts steps from the start of the run,
    warmup included.

    :param step_size: :math:`\\eta_0`, the largest step size.
    :param cycle_length: steps per cycle.
    :param exploration: fraction of each cycle spent exploring (default 0.5).
    """

    def __init__(self, step_size: float, cycle_length: int = 1000, exploration: float = 0.5):
        super().__init__(step_size)
        self.cycle_length = check_positive_int(cycle_length, "cycle_length")
        if not isinstance(exploration, numbers.Real) or not 0.0 <= exploration < 1.0:
            raise ValueError(f"exploration must be a fraction in [0, 1), got {exploration!r}")
        self.exploration = float(exploration)

    def _position(self, t: int) -> float:
        return (t % self.cycle_length) / self.cycle_length

    def __call__(self, t: int) -> float:
        return 0.5 * self.step_size * (math.cos(math.pi * self._position(t)) + 1.0)

    def explore(self, t: int) -> bool:
        return self._position(t) < self.exploration

    def __repr__(self):
        return (f"CyclicalStepSize({self.step_size:g}, cycle_length={self.cycle_length}, "
                f"exploration={self.exploration:g})")


class SGHMCStepInfo(NamedTuple):
    """What one SG-HMC step did (``SGHMC.last_step``)."""

    potential: torch.Tensor  #: the potential per chain at the position the step started from
    step_size: float         #: eta used
    kept: bool               #: whether the new position was stored as a draw


def sghmc_update(position: torch.Tensor, momentum: torch.Tensor, gradient: torch.Tensor, step_size: float,
                 friction: float, preconditioner=1.0, noise_variance: Optional[torch.Tensor] = None,
                 inject_noise: bool = True):
    r"""One SG-HMC transition of one site, a pure function (Chen, Fox & Guestrin 2014, eq. 15,
    preconditioned as in Li et al. 2016):

    .. math::

        v' = (1 - \alpha) v - \eta G \nabla \tilde U(u) + \mathcal N\big(0, 2 (\alpha - \hat\beta) \eta G\big),
        \qquad u' = u + v',

    with friction :math:`\alpha`, step size :math:`\eta`, preconditioner :math:`G` and
    :math:`\hat\beta = \eta G V / 2` (never above :math:`\alpha`) for a minibatch gradient noise
    variance :math:`V` (``noise_variance``; ``None``: :math:`\hat\beta = 0`).  Without
    ``inject_noise`` (an exploration phase) it is momentum SGD.  Returns ``(u', v')``.
    """
    v = (1.0 - friction) * momentum - step_size * preconditioner * gradient
    if inject_noise:
        room = friction if noise_variance is None else \
            (friction - 0.5 * step_size * preconditioner * noise_variance).clamp_min(0.0)
        v = v + torch.sqrt(2.0 * step_size * preconditioner * room * torch.ones_like(gradient)) \
            * torch.randn_like(gradient)
    return position + v, v


def _schedule(step_size):
    if isinstance(step_size, ConstantStepSize):
        return step_size
    if isinstance(step_size, numbers.Real) and not isinstance(step_size, bool):
        return ConstantStepSize(step_size)
    raise TypeError(
        "step_size must be a positive number or a schedule (ConstantStepSize, PolynomialDecay, "
        f"CyclicalStepSize), got {type(step_size).__name__}."
    )


# --------------------------------------------------------------------------- the sampler
@register_backend("sghmc")
class SGHMC(Backend):
    r"""Stochastic-gradient Hamiltonian Monte Carlo with many chains in one tensor program.

    See the module docstring for the update, the preconditioner and the structured variant.

    :param model: a Pyro model whose latent sites are all continuous; minibatches through
        ``pyro.plate(name, N, subsample_size=B)``.
    :param guide: optional; when given, the chains start at draws from it (e.g. after an SVI
        fit). Otherwise see ``init``.
    :param step_size: ``"auto"`` (default), :math:`\eta` (a float) or a schedule
        (:class:`ConstantStepSize`, :class:`PolynomialDecay`, :class:`CyclicalStepSize`).
        ``"auto"`` (with the rmsprop preconditioner): a mode search first.  Without minibatches
        (and without model parameters or groups) each chain runs L-BFGS to its mode and starts
        one conditional sd (:math:`H_{ii}^{-1/2}`, the Hessian diagonal) away from it, with
        rmsprop's average started at :math:`H_{ii}` (its stationary value for a Gaussian);
        otherwise, or where L-BFGS does not converge (an unbounded density such as a centered
        funnel), the first fifth of warmup descends each chain's minibatch potential with Adam
        (rate decaying to 1% of :attr:`auto_search_lr`).  Measured on posteriordb's kidiq
        regression (uncentered predictor, intercept-slope correlation -0.99): the Adam search
        left every chain descending after 2000 steps (means 64 MCSE off, an sd 10.7x the
        reference's); the L-BFGS start gives means within 0.1 MCSE and sds 0.92x, with a
        warning that names the correlation (the diagonal preconditioner mixes slowly along it:
        ESS 5).  From the middle of warmup a second minibatch gradient at the same positions
        estimates the gradient noise variance :math:`V` per coordinate, and :math:`\eta`
        becomes the largest value with :math:`\hat\beta = \eta G V / 2 \le \alpha / 2` and
        preconditioned curvature :math:`\eta G c \le 0.3`, with :math:`c = \max(1/\sigma^2,
        E[g^2])` (:math:`\sigma^2` the chains' variance, :math:`E[g^2]` rmsprop's average, the
        precision's diagonal at stationarity: the marginal variance alone under-states the
        curvature of a correlated posterior, and over-states the step while chains still
        drift; it let the step grow from 1e-3 to 5.6e4 and diverge on posteriordb's sblrc);
        frozen after warmup.  Measured on a regression with N = 2000, B = 100: sds 0.94-1.05x the
        exact ones (the old default step 1e-3 diverged; with rmsprop it gave 1.37-1.77x).  The
        price is mixing: the noise-limited step needs about N/B steps per independent draw,
        and the end-of-run ESS warning says when the run was too short.  A given :math:`\eta`:
        the potential is a sum over all :math:`N` data points, so :math:`\eta` must shrink
        roughly like :math:`1/N`; without a preconditioner the update is stable for
        :math:`\eta \lambda_{\max} < 2(2-\alpha)`, :math:`\lambda_{\max}` the largest
        curvature of :math:`U`.  With either, models that subsample get Chen et al.'s noise
        correction (the injected noise is :math:`2(\alpha - \hat\beta)\eta G`, :math:`V`
        estimated in the second half of warmup, which costs one more gradient per step there)
        and a warning when :math:`\hat\beta / \alpha > 0.5` at the end of warmup.
    :param friction: :math:`\alpha \in (0, 1]` (1 gives SGLD).
    :param num_chains: chains run side by side (vectorized).
    :param num_samples: draws kept per chain by a default :meth:`run` (per chain, as in Pyro's
        ``MCMC``; ``Fit`` methods such as ``posterior_samples(num_samples)`` count draws in all).
    :param warmup: steps discarded at the start (parameters and preconditioner adapt here).
    :param thin: keep every ``thin``-th step after warmup.
    :param preconditioner: ``"auto"`` (default: rmsprop with ``step_size="auto"``, none with a
        given step size), ``None`` or ``"rmsprop"`` (pSGLD-style diagonal preconditioner).
    :param rmsprop_decay: running-average decay of the squared gradients (default 0.99).
    :param rmsprop_eps: :math:`\lambda`, added to :math:`\sqrt V` (default 1e-5).
    :param init: ``"uniform"`` (uniform on :math:`[-r, r]` in unconstrained space, like Stan
        and Pyro's ``init_to_uniform``), ``"prior"`` (draws from the prior), or a dict
        ``{site: value}`` (constrained values, broadcast to every chain and jittered by
        ``init_radius`` times a standard normal in unconstrained space).
    :param init_radius: :math:`r` (default 2).
    :param groups: structured SG-MCMC: a list of lists of site names; unnamed sites form one
        more group.
    :param coupling: :math:`\rho \in [0, 1]`, the probability of using the other groups'
        current state rather than a stored one (structured SG-MCMC only).
    :param buffer_size: number of past states per chain kept for structured SG-MCMC.
    :param optim: optimizer of the model's parameters during warmup (default Adam, lr 1e-2).
    :param learn_params: fit the model's parameters during warmup (default ``True``).
    :param noise_correction: subtract the estimated minibatch gradient noise
        :math:`\hat\beta` from the injected noise (default ``True``; models that subsample
        only).  ``False`` is the plain :math:`\hat\beta = 0` sampler, whose minibatch bias
        tutorial 04 studies (the noise is still estimated, for the warning).
    :param shared_minibatch: ``False`` (default): every chain draws its own minibatch (one
        vmapped model run per step), so the chains are independent and R-hat, ESS and Monte
        Carlo errors mean what they say. ``True``: all chains share one minibatch in one plate
        run (faster for models that broadcast), but the minibatch noise is then common to the
        chains and correlates them (measured: correlation 0.82 between chains with B = 50 of
        N = 1000), which makes R-hat and ESS over-optimistic.

    **Choosing the step size.**  On a Gaussian posterior with curvature :math:`\lambda` along
    some direction, the minibatch noise inflates the variance along it by about
    :math:`1 + \eta\lambda (N/B - 1) / (2\alpha)` (sampling without replacement), and the
    discretization by a further :math:`O(\eta\lambda/\alpha)`.  Keep
    :math:`\eta\lambda_{\max}(N/B - 1)/(2\alpha)` small for the stiffest direction (the
    largest eigenvalue of the likelihood's Hessian, about :math:`N/\sigma^2` for a regression
    with standardized inputs); marginal R-hat and ESS do not reveal this bias (tutorial 04).

    Draws' ``sample_stats``: ``lp`` (the full-data log-joint of the kept draw, computed in
    ``to_inferencedata`` when the data are not subsampled), ``potential_energy`` (the
    minibatch potential of the state the kept step started from) and ``step_size``.

    Example::

        >>> sampler = SGHMC(model, step_size=1e-4, friction=0.1, num_chains=4,
        ...                 num_samples=1000, warmup=1000)
        >>> fit = sampler.run(X, y)           # model(X, y) subsamples its data plate
        >>> idata = fit.to_inferencedata()    # (chain, draw) for az.summary / az.rhat / az.ess
    """

    name = "sghmc"
    requires = Requirements(guide="optional", discrete_latents="refuse", latent_sites="need",
                            latents_in_subsampled_plate=False, dependent_supports=False)
    _capture_params = False
    valid_for = ("models whose latent sites are all continuous, with or without minibatches "
                 "from pyro.plate(subsample_size=B); local latents only without subsampling")

    #: the adaptive step size's starting (and largest) value, in rmsprop-preconditioned units
    auto_initial_step: float = 1e-3
    #: Adam's learning rate in the mode search that opens an adaptive warmup
    auto_search_lr: float = 0.05

    def __init__(self, model, guide=None, optim=None, *, step_size="auto", friction: float = 0.1, num_chains: int = 4,
                 num_samples: int = 1000, warmup: int = 1000, thin: int = 1,
                 preconditioner: Optional[str] = "auto", rmsprop_decay: float = 0.99,
                 rmsprop_eps: float = 1e-5, init="uniform", init_radius: float = 2.0,
                 groups: Optional[Sequence[Sequence[str]]] = None, coupling: float = 0.0,
                 buffer_size: int = 100, learn_params: bool = True, shared_minibatch: bool = False,
                 noise_correction: bool = True,
                 max_plate_nesting: Optional[int] = None, data_plate: Optional[str] = None,
                 validate: bool = True):
        super().__init__(model, guide, optim, max_plate_nesting=max_plate_nesting,
                         data_plate=data_plate, validate=validate)
        self._auto = isinstance(step_size, str)
        if self._auto and step_size != "auto":
            raise ValueError(f"step_size must be a positive number, a schedule or 'auto', got {step_size!r}")
        self.schedule = ConstantStepSize(self.auto_initial_step) if self._auto else _schedule(step_size)
        if isinstance(friction, bool) or not isinstance(friction, numbers.Real) or not 0.0 < friction <= 1.0:
            raise ValueError(f"friction must be in (0, 1] (1 gives SGLD), got {friction!r}")
        self.friction = float(friction)
        self.num_chains = check_positive_int(num_chains, "num_chains")
        self.num_samples = check_positive_int(num_samples, "num_samples")
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        self.warmup = int(warmup)
        self.thin = check_positive_int(thin, "thin")
        if preconditioner not in (None, "rmsprop", "auto"):
            raise ValueError(f"preconditioner must be None, 'rmsprop' or 'auto', got {preconditioner!r}")
        if preconditioner == "auto":  # rmsprop with the adaptive step size, none with a given one
            preconditioner = "rmsprop" if self._auto else None
        self.preconditioner = preconditioner
        if not 0.0 < rmsprop_decay < 1.0:
            raise ValueError(f"rmsprop_decay must be in (0, 1), got {rmsprop_decay!r}")
        self.rmsprop_decay = float(rmsprop_decay)
        self.rmsprop_eps = check_positive(rmsprop_eps, "rmsprop_eps")
        if not (init in ("uniform", "prior") or isinstance(init, dict)):
            raise ValueError(f"init must be 'uniform', 'prior' or a dict {{site: value}}, got {init!r}")
        self.init = init
        self.init_radius = check_positive(init_radius, "init_radius")
        if groups is not None:
            if isinstance(groups, (str, bytes)) or not all(
                    isinstance(g, (list, tuple)) and g and all(isinstance(n, str) for n in g) for g in groups):
                raise TypeError("groups must be a list of non-empty lists of site names, "
                                "e.g. groups=[['w1', 'b1'], ['w2', 'b2']].")
            flat = [n for g in groups for n in g]
            if len(flat) != len(set(flat)):
                raise ValueError(f"groups must not share sites; got {groups!r}")
            groups = [list(g) for g in groups]
        self.groups = groups
        if not isinstance(coupling, numbers.Real) or not 0.0 <= coupling <= 1.0:
            raise ValueError(f"coupling must be a probability in [0, 1], got {coupling!r}")
        self.coupling = float(coupling)
        self.buffer_size = check_positive_int(buffer_size, "buffer_size")
        self.learn_params = bool(learn_params)
        self.shared_minibatch = bool(shared_minibatch)
        self.noise_correction = bool(noise_correction)
        self.potential: Optional[PotentialEnergy] = None
        self._reset_chains()

    def _reset_chains(self):
        self._u: Optional[Dict[str, torch.Tensor]] = None   # unconstrained positions (C, ...)
        self._v: Optional[Dict[str, torch.Tensor]] = None   # momenta
        self._sq: Optional[Dict[str, torch.Tensor]] = None  # rmsprop running squared gradients
        self._buffer: Optional[Dict[str, torch.Tensor]] = None  # (S, C, ...) past states
        self._buffer_count = 0
        self._draws: List[Dict[str, torch.Tensor]] = []
        self._draw_potential: List[torch.Tensor] = []
        self._draw_step_size: List[float] = []
        self._group_of: Dict[str, int] = {}
        self._convergence: Optional[Dict[str, object]] = None
        self._noise_var: Optional[Dict[str, torch.Tensor]] = None  # minibatch gradient noise (1, ...)
        self._noise_count = 0
        self._search = None  # Adam moments of the mode search (step_size='auto')
        self._mode_found = False  # L-BFGS found the mode at step 0 (no Adam search then)
        #: what the last step did (:class:`SGHMCStepInfo`), ``None`` before the first
        self.last_step: Optional[SGHMCStepInfo] = None
        self._positions = None  # (count, mean, M2) of the chains' positions in the noise window
        self._auto_step = self.auto_initial_step
        self.noise_ratio_: Optional[float] = None

    # ------------------------------------------------------------------ checks and setup
    def check_model(self, structure: ProgramStructure) -> None:
        if self.groups is not None:
            unknown = sorted({n for g in self.groups for n in g} - set(structure.latent_sites))
            if unknown:
                raise ValueError(f"groups name site(s) {unknown} that are not latent sites of the model; "
                                 f"latent sites are {sorted(structure.latent_sites)}.")

    def _after_setup(self, structure: ProgramStructure, *args, **kwargs) -> None:
        try:
            self.potential = PotentialEnergy(self.model, structure, structure.max_plate_nesting)
        except ValueError as exc:
            raise IncompatibleModelError(str(exc)) from exc
        self.potential.independent_minibatches = not self.shared_minibatch
        if self._u is not None:
            proto = trace_program(self.model, args, kwargs)
            for name in structure.latent_sites:
                if name not in self._u:
                    raise ValueError(
                        f"The data changed the model's latent sites (new site {name!r}); the chains "
                        "cannot continue. Build a new sampler for these data.")
                shape = tuple(self.potential.transforms[name].inv(proto.nodes[name]["value"]).shape)
                if tuple(self._u[name].shape[1:]) != shape:
                    raise ValueError(
                        f"The data changed the shape of latent site {name!r} from "
                        f"{tuple(self._u[name].shape[1:])} to {shape} (unconstrained); the chains "
                        "cannot continue. Build a new sampler for these data.")
        if self.groups is not None:
            self._after_setup_groups()

    # ------------------------------------------------------------------ initialisation
    def _initial_values(self, args, kwargs) -> Dict[str, torch.Tensor]:
        C = self.num_chains
        structure = self.structure
        pe = self.potential
        proto = trace_program(self.model, args, kwargs)
        ref = {n: proto.nodes[n]["value"].detach() for n in structure.latent_sites}
        if self.guide is not None:
            return pe.unconstrain(draw_guide(self.model, self.guide, structure, C, args, kwargs))
        if self.init == "prior":
            return pe.unconstrain(draw_prior(self.model, structure, C, pe.ndim, args, kwargs))
        given = self.init if isinstance(self.init, dict) else {}
        unknown = sorted(set(given) - set(structure.latent_sites))
        if unknown:
            raise ValueError(f"init names site(s) {unknown} that are not latent sites; latent sites "
                             f"are {sorted(structure.latent_sites)}.")
        out = {}
        for n, x0 in ref.items():
            if n in given:  # the given value, jittered per chain
                v = torch.as_tensor(given[n], dtype=x0.dtype, device=x0.device)
                if tuple(v.shape) != tuple(x0.shape):
                    raise ValueError(f"init[{n!r}] has shape {tuple(v.shape)}, the site has {tuple(x0.shape)}.")
                u0 = pe.transforms[n].inv(v)
                out[n] = u0.expand((C,) + tuple(u0.shape)) + self.init_radius * torch.randn(
                    (C,) + tuple(u0.shape), dtype=u0.dtype, device=u0.device)
            else:  # uniform on [-r, r] in unconstrained space
                u0 = pe.transforms[n].inv(x0)
                out[n] = (torch.rand((C,) + tuple(u0.shape), dtype=u0.dtype, device=u0.device) * 2 - 1) \
                    * self.init_radius
        return out

    def _initial_chains(self, args, kwargs):
        """``(u, v, sq)``: initial positions, zero momenta, no preconditioner (nothing stored)."""
        u = self._initial_values(args, kwargs)
        bad = [n for n, t in u.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"The initial values of site(s) {bad} are not finite on unconstrained space; "
                             "pass init='uniform' or finite values inside the support.")
        u = {n: t.detach().clone() for n, t in u.items()}
        return u, {n: torch.zeros_like(t) for n, t in u.items()}, None

    def _init_chains(self, args, kwargs):
        self._u, self._v, self._sq = self._initial_chains(args, kwargs)

    # ------------------------------------------------------------------ one step
    def _structured_inputs(self, u):
        """Positions for the G x C batch: group g's copy holds its own current state and the
        other groups' states drawn from the buffer (or current, with probability rho)."""
        C, G = self.num_chains, self._num_groups
        S = min(self._buffer_count, self.buffer_size)
        ref = next(iter(u.values()))
        if S == 0:
            return {n: t.repeat((G,) + (1,) * (t.dim() - 1)) for n, t in u.items()}
        # one stored state per (copy, other group, chain), the groups drawn independently
        idx = torch.randint(0, S, (G, G, C), device=ref.device)
        use_current = torch.rand((G, G, C), device=ref.device) < self.coupling
        out = {}
        for n, t in u.items():
            h = self._group_of[n]
            stored = self._buffer[n][idx[:, h], torch.arange(C, device=ref.device)]  # (G, C, ...)
            keep = use_current[:, h]
            keep = keep.reshape(keep.shape + (1,) * (t.dim() - 1))
            other = torch.where(keep, t.detach().unsqueeze(0), stored)
            copies = [t if g == h else other[g] for g in range(G)]
            out[n] = torch.cat(copies, 0)
        return out

    def _potential_and_grads(self, args, kwargs, u, learn):
        names = list(u)
        with poutine.trace(param_only=True) as capture:
            if self.groups is None:
                U = self.potential(u, args, kwargs)
            else:
                U = self.potential(self._structured_inputs(u), args, kwargs)
        params = []
        if learn:
            params = [site["value"].unconstrained() for site in capture.trace.nodes.values()
                      if site["type"] == "param"]
            params = [p for p in params if p.requires_grad]
        total = U.sum()
        grads = torch.autograd.grad(total, [u[n] for n in names] + params, allow_unused=True)
        g = {n: (gr if gr is not None else torch.zeros_like(u[n])) for n, gr in zip(names, grads)}
        pg = list(zip(params, grads[len(names):]))
        return U.detach(), g, pg

    divergence_advice = ("Lower the step size (it must shrink like 1/N with N data points), raise the "
                         "friction, or use preconditioner='rmsprop'.")

    def _step(self, *args, **kwargs) -> float:
        # Nothing on self (chains, momenta, preconditioner, noise estimate, step size, draws) nor
        # any model parameter changes until the whole step is known to be finite: the step's
        # state is built in locals and committed by _update_parameters, the one guarded path.
        if self._u is None:
            u0, v0, sq0 = self._initial_chains(args, kwargs)
        else:
            u0, v0, sq0 = self._u, self._v, self._sq
        t = self.num_steps
        mode_found = self._mode_found
        if self._auto and t == 0 and not mode_found:
            found = self._lbfgs_mode(u0, args, kwargs)
            if found is not None:  # before this step's gradients, which are then at the mode
                (u0, sq0), mode_found = found, True
        eta = self._auto_step if self._auto else float(self.schedule(t))
        explore = False if self._auto else bool(self.schedule.explore(t))
        in_warmup = t < self.warmup
        learn = self.learn_params and in_warmup
        u = {n: x.detach().requires_grad_(True) for n, x in u0.items()}
        U, grads, param_grads = self._potential_and_grads(args, kwargs, u, learn)

        finite = torch.stack([torch.isfinite(U).all()] + [torch.isfinite(g).all() for g in grads.values()])
        if not bool(finite.all()):
            if not bool(torch.isfinite(U).all()):
                chains = torch.nonzero(~torch.isfinite(U)).flatten().tolist()
                self._divergence(f"the potential energy is not finite in chain(s) {chains}")
            bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
            self._divergence(f"the gradient of the potential at site(s) {bad} is not finite")

        if self._auto and t < self.warmup // 5 and not mode_found:
            return self._mode_search_step(U, grads, param_grads, (u0, v0, sq0))
        alpha = self.friction
        new_u, new_v = {}, {}
        sq = sq0
        if self.preconditioner == "rmsprop":
            if sq is None:
                sq = {n: g.detach() ** 2 for n, g in grads.items()}
            elif in_warmup:
                b = self.rmsprop_decay
                sq = {n: b * sq[n] + (1 - b) * grads[n].detach() ** 2 for n in grads}
        noise, noise_count = self._noise_var, self._noise_count
        if in_warmup and not explore and self._estimating_noise(t):
            noise, noise_count = self._noise_update(u0, args, kwargs, grads)
        for n, g in grads.items():
            precond = 1.0 if sq is None else 1.0 / (self.rmsprop_eps + sq[n].sqrt())
            # Chen et al.'s correction: the minibatch gradient already carries noise of variance
            # eta^2 G^2 V per step, so the injected noise is 2 (alpha - beta_hat) eta G
            v_noise = noise[n] if noise is not None and self.noise_correction else None
            new_u[n], new_v[n] = sghmc_update(u0[n], v0[n], g.detach(), eta, alpha, precond, v_noise,
                                              inject_noise=not explore)
        if not all(bool(torch.isfinite(x).all()) for x in new_u.values()):
            self._divergence("the proposed position is not finite")

        def commit():  # everything checked: the preconditioner, noise estimate, step size, chains
            self._mode_found = mode_found
            self._sq, self._noise_var, self._noise_count = sq, noise, noise_count
            if in_warmup and self._auto and t >= self.warmup // 2:
                self._track_positions(new_u)
                if noise is not None and noise_count >= 10 or noise is None and self._positions[0] >= 20:
                    self._auto_step = self._noise_limited_step(sq, noise)
            if t == self.warmup - 1:
                self._warn_noise_dominates(eta if not self._auto else self._auto_step)
            self._u, self._v = new_u, new_v
            if self.groups is not None:
                self._push_buffer(new_u)
            kept = not in_warmup and not explore and (t - self.warmup) % self.thin == 0
            self.last_step = SGHMCStepInfo(U[: self.num_chains].detach(), float(eta), kept)
            if kept:
                with torch.no_grad():
                    self._draws.append({n: x.detach().clone() for n, x in self.potential.constrain(new_u).items()})
                # the potential was evaluated before the move; it is the energy of the previous state
                self._draw_potential.append(U[: self.num_chains].clone())
                self._draw_step_size.append(eta)

        # the model parameters' SAEM step ascends the log-joint averaged over the U.shape[0] copies
        self._update_parameters(param_grads, commit=commit, scale=1.0 / U.shape[0])
        return float(U.mean())

    #: L-BFGS iterations of the mode search of a model without minibatches (step_size='auto')
    auto_lbfgs_iterations: int = 500

    def _lbfgs_mode(self, u, args, kwargs):
        """``step_size="auto"`` on a model without subsampled plates, model parameters or
        structured groups: move every chain to its nearest mode with L-BFGS (strong-Wolfe line
        search, deterministic gradients) before sampling, starting from positions ``u``, and
        return ``(positions, preconditioner)`` when it converged (every gradient coordinate below
        a tenth of sqrt(H_ii), i.e. within 0.1 conditional sd of the mode), else ``None`` (an unbounded
        density such as a centered hierarchical funnel, whose density grows without limit as
        the scale goes to 0; the Adam search runs instead).  Nothing is stored.  Adam with a
        fixed rate needed far more than warmup/5 steps on ill-conditioned posteriors (kidiq:
        the potential 4e3 above the mode's after 2000 steps, every chain stuck)."""
        if self.structure.subsampled_plates or self.groups is not None:
            return None
        with torch.no_grad(), poutine.trace(param_only=True) as capture:
            U0 = self.potential(u, args, kwargs)
        if any(site["type"] == "param" for site in capture.trace.nodes.values()) and self.learn_params:
            return None
        if U0.shape[0] != self.num_chains or not bool(torch.isfinite(U0).all()):
            return None
        # one L-BFGS per chain (a joint run over the chains' summed potentials lets one chain's
        # curvature set the line search for all: 3 of 4 chains 50-250 nats short of the mode
        # after 200 iterations on the sblrc regression)
        current = {n: t.detach().clone() for n, t in u.items()}
        for c in range(self.num_chains):
            mine = {n: t[c].clone().requires_grad_(True) for n, t in current.items()}
            opt = torch.optim.LBFGS(list(mine.values()), lr=1.0, max_iter=self.auto_lbfgs_iterations,
                                    history_size=20, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-9, tolerance_change=1e-12)

            def closure():
                opt.zero_grad()
                full = {n: torch.cat([current[n][:c], mine[n].unsqueeze(0), current[n][c + 1:]]) for n in current}
                total = self.potential(full, args, kwargs)[c]
                total.backward()
                return total
            try:
                with poutine.block(hide_types=["param"]):
                    opt.step(closure)
            except (RuntimeError, ValueError):
                return None
            current = {n: torch.cat([current[n][:c], mine[n].detach().unsqueeze(0), current[n][c + 1:]])
                       for n in current}
        new = {n: t.detach().requires_grad_(True) for n, t in current.items()}
        U1 = self.potential(new, args, kwargs)
        g1 = torch.autograd.grad(U1.sum(), list(new.values()), allow_unused=True)
        g1 = [g if g is not None else torch.zeros_like(new[n]) for n, g in zip(new, g1)]
        if not bool(torch.isfinite(U1).all()):
            return None  # a non-finite gradient fails the convergence test below (NaN <= x is False)
        # at the mode the gradient vanishes, so rmsprop's E[g^2] would start at 0 (an infinite
        # preconditioner) and the chains' spread too: start both from the curvature instead.
        # For a Gaussian E[g_i^2] = H_ii, the diagonal of the precision (Hessian), and
        # 1/H_ii is the conditional variance: each chain starts one conditional sd away.
        hdiag = self._hessian_diagonal(new, args, kwargs)
        if hdiag is None:
            return None
        # converged: every chain within a tenth of a conditional sd of its mode, |g_i| <= 0.1 sqrt(H_ii)
        if not all(bool((g.abs() <= 0.1 * hdiag[n].sqrt()).all()) for n, g in zip(new, g1)):
            return None
        return {n: (t.detach() + torch.randn_like(t) * hdiag[n].rsqrt()).detach() for n, t in new.items()}, hdiag

    def _hessian_diagonal(self, u, args, kwargs, exact_up_to: int = 200, probes: int = 64):
        """The diagonal of the potential's Hessian per chain, ``{site: (C, ...)}``: exact
        (one Hessian-vector product per coordinate, all chains at once, their Hessian being
        block-diagonal) up to ``exact_up_to`` coordinates, else Hutchinson's estimate
        E[v * Hv] with ``probes`` Rademacher vectors.  ``None`` if it is not finite; values
        floored at ``finfo.tiny``."""
        names = list(u)
        x = {n: t.detach().requires_grad_(True) for n, t in u.items()}
        total = self.potential(x, args, kwargs).sum()
        grads = torch.autograd.grad(total, [x[n] for n in names], create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x[n]) for n, g in zip(names, grads)]
        sizes = [x[n][0].numel() for n in names]
        D = sum(sizes)
        diag = {n: torch.zeros_like(x[n]) for n in names}

        def hvp(vs):
            dot = sum((g * v).sum() for g, v in zip(grads, vs))
            out = torch.autograd.grad(dot, [x[n] for n in names], retain_graph=True, allow_unused=True)
            return [o if o is not None else torch.zeros_like(x[n]) for n, o in zip(names, out)]
        if D <= exact_up_to:
            for si, n in enumerate(names):
                for i in range(sizes[si]):
                    vs = [torch.zeros_like(x[m]) for m in names]
                    vs[si].reshape(vs[si].shape[0], -1)[:, i] = 1.0
                    col = hvp(vs)[si]
                    diag[n].reshape(diag[n].shape[0], -1)[:, i] = col.reshape(col.shape[0], -1)[:, i]
        else:
            for _ in range(probes):
                vs = [torch.randint_like(x[m], 2) * 2.0 - 1.0 for m in names]
                for n, v, hv in zip(names, vs, hvp(vs)):
                    diag[n] = diag[n] + v * hv / probes
        diag = {n: d.detach() for n, d in diag.items()}
        if not all(bool(torch.isfinite(d).all()) for d in diag.values()):
            return None
        return {n: d.clamp_min(torch.finfo(d.dtype).tiny) for n, d in diag.items()}

    def _mode_search_step(self, U, grads, param_grads, start) -> float:
        """``step_size='auto'``, first fifth of warmup: every chain descends its own minibatch
        potential with Adam (lr :attr:`auto_search_lr`, decaying geometrically to 1% of it, on
        unconstrained space, no noise, no draws), so that sampling starts in the posterior's bulk whatever the initial values'
        gradients (1e8 at a uniform start on unscaled regressions)."""
        b1, b2 = 0.9, 0.999
        m, v2, k = self._search if self._search is not None else (
            {n: torch.zeros_like(g) for n, g in grads.items()}, {n: torch.zeros_like(g) for n, g in grads.items()}, 0)
        # the rate decays geometrically to 1% of its start over the search, so that the chains
        # settle within ~lr/100 of the mode: a fixed rate hovers lr away from it, which for a
        # posterior sd of 1e-3 (a regression on unscaled predictors) is 50 sd, a potential 1e5
        # above the mode's
        lr = self.auto_search_lr * 0.01 ** (k / max(1, self.warmup // 5 - 1))
        k += 1
        tiny = torch.finfo(next(iter(grads.values())).dtype).eps
        m = {n: b1 * m[n] + (1 - b1) * g.detach() for n, g in grads.items()}
        v2 = {n: b2 * v2[n] + (1 - b2) * g.detach() ** 2 for n, g in grads.items()}
        u0, v0, sq0 = start
        new_u = {n: u0[n] - lr * (m[n] / (1 - b1 ** k)) / ((v2[n] / (1 - b2 ** k)).sqrt() + tiny)
                 for n in grads}
        if not all(bool(torch.isfinite(x).all()) for x in new_u.values()):
            self._divergence("the proposed position is not finite")

        def commit():
            self._search = (m, v2, k)
            self._u, self._v, self._sq = new_u, v0, sq0
        self._update_parameters(param_grads, commit=commit, scale=1.0 / U.shape[0])
        return float(U.mean())

    # ------------------------------------------------------------------ gradient noise
    def _estimating_noise(self, t: int) -> bool:
        """Whether warmup step ``t`` also estimates the minibatch gradient noise (the second
        half of warmup, for models that subsample)."""
        return bool(self.structure.subsampled_plates) and t >= self.warmup // 2

    def _noise_update(self, u, args, kwargs, grads):
        r"""The running mean of the minibatch gradient noise variance :math:`V` per coordinate,
        updated with one more pair: a second gradient at the same positions on independent
        minibatches, :math:`V \approx (g_1 - g_2)^2 / 2` averaged over chains.  Returns the
        new ``(mean, count)`` without committing them."""
        u2 = {n: x.detach().requires_grad_(True) for n, x in u.items()}
        _, g2, _ = self._potential_and_grads(args, kwargs, u2, learn=False)
        C = self.num_chains
        pair = {n: 0.5 * (grads[n].detach()[:C] - g2[n][:C]).pow(2).mean(0, keepdim=True) for n in g2}
        count = self._noise_count + 1
        if self._noise_var is None:
            return pair, count
        return {n: self._noise_var[n] + (pair[n] - self._noise_var[n]) / count for n in pair}, count

    def _noise_ratio(self, eta, sq, noise) -> float:
        r""":math:`\max_i \hat\beta_i / \alpha` with :math:`\hat\beta = \eta G V / 2`."""
        worst = 0.0
        for n, v in noise.items():
            precond = 1.0 if sq is None else 1.0 / (self.rmsprop_eps + sq[n].sqrt())
            worst = max(worst, float((0.5 * eta * precond * v).max()) / self.friction)
        return worst

    def _track_positions(self, u):
        """Running mean and variance of the chains' positions (pooled over chains and steps):
        this step's C positions merged into ``(count, mean, M2)`` (Chan, Golub & LeVeque)."""
        C = self.num_chains
        batch_mean = {n: t[:C].detach().mean(0) for n, t in u.items()}
        batch_m2 = {n: (t[:C].detach() - batch_mean[n]).pow(2).sum(0) for n, t in u.items()}
        if self._positions is None:
            self._positions = (C, batch_mean, batch_m2)
            return
        count, mean, m2 = self._positions
        total = count + C
        delta = {n: batch_mean[n] - mean[n] for n in mean}
        self._positions = (total, {n: mean[n] + delta[n] * (C / total) for n in mean},
                           {n: m2[n] + batch_m2[n] + delta[n].pow(2) * (count * C / total) for n in mean})

    def _noise_limited_step(self, sq, noise) -> float:
        r"""The adaptive step size: the largest :math:`\eta` with (i) minibatch noise at most half
        the friction's budget, :math:`\max_i \hat\beta_i = \eta G_i V_i / 2 \le \alpha/2`, and
        (ii) a preconditioned curvature :math:`h_i = \eta G_i / \sigma_i^2 \le 0.3`, with
        :math:`\sigma_i^2` the chains' variance over the warmup window (the posterior's, for
        which :math:`1/\sigma_i^2` is the curvature of a Gaussian); at :math:`h = 0.3` the
        discretization widens a Gaussian's sd by 4% (exact Lyapunov computation of the linear
        recursion), below the Monte Carlo error of a short run."""
        per_unit = 0.0 if noise is None else self._noise_ratio(1.0, sq, noise)
        eta = math.inf if per_unit <= 0 else 0.5 / per_unit
        count, _, m2 = self._positions if self._positions is not None else (0, None, None)
        if count >= 20:
            worst = 0.0
            for n, v in m2.items():
                var = (v / (count - 1)).clamp_min(torch.finfo(v.dtype).tiny)
                precond = 1.0 if sq is None else 1.0 / (self.rmsprop_eps + sq[n].sqrt())
                # the curvature 1/sigma^2 from the chains' marginal variance is too low where
                # the posterior is correlated (the conditional variance is smaller) or the
                # chains still drift; E[g^2] (the rmsprop average) is the diagonal of the
                # precision for a Gaussian, 1 / the conditional variance, and only grows
                # while the chains drift, so the larger of the two is used
                curvature = 1.0 / var if sq is None else torch.maximum(1.0 / var, sq[n])
                worst = max(worst, float((precond * curvature).max()))
            if worst > 0:
                eta = min(eta, 0.3 / worst)
        return self.auto_initial_step if not math.isfinite(eta) else eta

    def _warn_noise_dominates(self, eta):
        if self._noise_var is None:
            return
        ratio = self._noise_ratio(eta, self._sq, self._noise_var)
        self.noise_ratio_ = ratio
        if ratio > 0.5:
            safe = 0.5 * eta / ratio
            warnings.warn(
                f"{type(self).__name__}: the minibatch gradient noise dominates the friction: its "
                f"estimated share beta_hat / alpha reaches {ratio:.2f} (above 1 the sampler cannot "
                "compensate it, and the posterior comes out too wide). Lower the step size to "
                f"about {safe:.3g}, raise the friction or the minibatch size, or use "
                "step_size='auto'.", RuntimeWarning, stacklevel=4)

    def _push_buffer(self, u):
        S = self.buffer_size
        if self._buffer is None:
            self._buffer = {n: x.new_zeros((S,) + tuple(x.shape)) for n, x in u.items()}
        slot = self._buffer_count % S
        for n, x in u.items():
            self._buffer[n][slot] = x.detach()
        self._buffer_count += 1

    # ------------------------------------------------------------------ results
    def _default_num_steps(self) -> int:
        keep = self.num_samples * self.thin
        exploring = getattr(self.schedule, "exploration", 0.0)
        if exploring:  # a cyclical schedule keeps draws only in the sampling part of each cycle
            keep = math.ceil(keep / (1.0 - exploring))
        return self.warmup + keep

    @property
    def preconditioner_scale(self) -> Optional[Dict[str, torch.Tensor]]:
        r"""The rmsprop preconditioner :math:`G = 1/(\lambda + \sqrt V)` per site, ``(C, ...)``
        (frozen after warmup), or ``None`` without a preconditioner."""
        if self._sq is None:
            return None
        return {n: 1.0 / (self.rmsprop_eps + v.sqrt()) for n, v in self._sq.items()}

    def _default_num_samples(self) -> int:
        return max(1, len(self._draws) * self.num_chains)

    @property
    def num_draws(self) -> int:
        """Draws kept per chain so far."""
        return len(self._draws)

    def samples(self, group_by_chain: bool = True) -> Dict[str, torch.Tensor]:
        """Every kept draw: ``{site: (chain, draw, *shape)}`` (or ``(chain * draw, *shape)``)."""
        if not self._draws:
            raise RuntimeError(
                f"No draws kept yet: {self.num_steps} steps taken, warmup is {self.warmup}. Run the "
                "sampler past warmup (run() with no num_steps runs warmup + num_samples * thin)."
            )
        out = {}
        for n in self._draws[0]:
            x = torch.stack([d[n] for d in self._draws], 1)  # (C, D, ...)
            out[n] = x if group_by_chain else x.reshape((-1,) + tuple(x.shape[2:]))
        return out

    def _thinned(self, num_samples):
        """``{site: (C, d, ...)}`` with at most ``num_samples`` draws in all, evenly spaced per chain."""
        by_chain = self.samples()
        D = self.num_draws
        per_chain = max(1, min(D, num_samples // self.num_chains))
        idx = torch.linspace(0, D - 1, per_chain).round().long()
        return {n: x[:, idx] for n, x in by_chain.items()}, idx

    def _posterior_samples(self, num_samples, args, kwargs):
        total = self.num_draws * self.num_chains
        if num_samples > total and self._draws:
            warnings.warn(f"{num_samples} draws asked for, {total} kept ({self.num_chains} chains x "
                          f"{self.num_draws}); returning all of them.", RuntimeWarning, stacklevel=4)
        draws, _ = self._thinned(num_samples)
        return {n: x.reshape((-1,) + tuple(x.shape[2:])) for n, x in draws.items()}

    def _inference_data_groups(self, num_samples, args, kwargs):
        draws, idx = self._thinned(num_samples)
        C, d = self.num_chains, idx.numel()
        potential = torch.stack(self._draw_potential, 1)[:, idx]  # (C, d)
        step_size = torch.tensor(self._draw_step_size, dtype=torch.float64)[idx].expand(C, d)
        groups = {"posterior": draws,
                  "sample_stats": {"potential_energy": potential, "step_size": step_size}}
        proto = trace_program(self.model, args, kwargs)
        groups["observed_data"] = {n: proto.nodes[n]["value"] for n in self.structure.observed_sites}
        sub = self.structure.subsampled_plates
        if sub:
            warnings.warn(
                f"The model subsamples plate(s) {sorted(sub)} with these arguments, so the "
                "log_likelihood group (for az.loo/az.waic) is left out. Pass arguments that switch "
                "subsampling off, e.g. fit.to_inferencedata(None, X, y, subsample_size=None).",
                RuntimeWarning, stacklevel=4)
            return groups
        flat = {n: x.reshape((C * d,) + tuple(x.shape[2:])) for n, x in draws.items()}
        loglik, lp = {}, []
        chunk = 512
        for start in range(0, C * d, chunk):
            part = {n: x[start:start + chunk] for n, x in flat.items()}
            log_probs = self.potential.log_probs(part, args, kwargs)
            for n, v in self.potential.observation_log_likelihood(part, args, kwargs, log_probs).items():
                loglik.setdefault(n, []).append(v)
            k = next(iter(part.values())).shape[0]
            lp.append(sum(self.potential.per_chain(v[0], k) for v in log_probs.values()))
        groups["log_likelihood"] = {n: torch.cat(v).reshape((C, d) + tuple(v[0].shape[1:]))
                                    for n, v in loglik.items()}
        groups["sample_stats"]["lp"] = torch.cat(lp).reshape(C, d)
        return groups

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict:
        return {
            "u": self._u, "v": self._v, "sq": self._sq, "buffer": self._buffer,
            "buffer_count": self._buffer_count, "draws": self._draws,
            "draw_potential": self._draw_potential, "draw_step_size": self._draw_step_size,
            "noise_var": self._noise_var, "noise_count": self._noise_count, "auto_step": self._auto_step,
            "search": self._search, "positions": self._positions,
        }

    def _load_extra_state(self, extra: dict) -> None:
        self._reset_chains()
        self._u, self._v, self._sq = extra.get("u"), extra.get("v"), extra.get("sq")
        self._buffer, self._buffer_count = extra.get("buffer"), int(extra.get("buffer_count", 0))
        self._draws = list(extra.get("draws") or [])
        self._draw_potential = list(extra.get("draw_potential") or [])
        self._draw_step_size = list(extra.get("draw_step_size") or [])
        self._noise_var, self._noise_count = extra.get("noise_var"), int(extra.get("noise_count", 0))
        self._auto_step = float(extra.get("auto_step", self.auto_initial_step))
        self._search = extra.get("search")
        self._positions = extra.get("positions")
        if self.structure is not None and self.groups is not None:
            self._after_setup_groups()

    def _after_setup_groups(self):
        named = {n for g in self.groups for n in g}
        rest = [n for n in self.structure.latent_sites if n not in named]
        all_groups = self.groups + ([rest] if rest else [])
        self._group_of = {n: i for i, g in enumerate(all_groups) for n in g}
        self._num_groups = len(all_groups)

    #: a run warns when the largest split R-hat exceeds this ...
    rhat_threshold: float = 1.01
    #: ... or the smallest bulk ESS falls below this many per chain (as PyMC and NumPyro do)
    min_ess_per_chain: float = 100.0

    def convergence(self) -> Dict[str, object]:
        """Split R-hat and bulk ESS (ArviZ, rank-normalized) of every kept coordinate:
        ``{"max_rhat", "min_ess_bulk", "worst_rhat_site", "worst_ess_site"}``."""
        import arviz as az
        import numpy as np

        by_chain = self.samples()
        worst = {"max_rhat": float("nan"), "min_ess_bulk": float("nan"),
                 "worst_rhat_site": None, "worst_ess_site": None}
        for n, x in by_chain.items():
            if x.shape[1] < 4:
                continue
            data = az.convert_to_dataset({n: x.detach().cpu().double().numpy()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rhat = np.asarray(az.rhat(data)[n].values, dtype=float).reshape(-1) if x.shape[0] > 1 \
                    else np.full(1, np.nan)
                ess = np.asarray(az.ess(data, method="bulk")[n].values, dtype=float).reshape(-1)
            if np.isfinite(rhat).any() and not np.nanmax(rhat) <= worst["max_rhat"]:
                worst["max_rhat"], worst["worst_rhat_site"] = float(np.nanmax(rhat)), n
            if np.isfinite(ess).any() and not np.nanmin(ess) >= worst["min_ess_bulk"]:
                worst["min_ess_bulk"], worst["worst_ess_site"] = float(np.nanmin(ess)), n
        return worst

    def run(self, *args, num_steps: Optional[int] = None, progress: Optional[bool] = None,
            callbacks=(), **kwargs):
        """As :meth:`Backend.run`; at the end, when draws were kept, a ``RuntimeWarning`` if the
        chains have not mixed: max split R-hat > :attr:`rhat_threshold` (1.01) or min bulk ESS
        below :attr:`min_ess_per_chain` (100) per chain.  ``convergence()`` gives the numbers,
        and the fit's ``repr`` shows them."""
        fit = super().run(*args, num_steps=num_steps, progress=progress, callbacks=callbacks, **kwargs)
        if self._draws:
            self._warn_unconverged()
        return fit

    def _warn_unconverged(self):
        c = self.convergence()
        self._convergence = c
        problems = []
        if c["max_rhat"] > self.rhat_threshold:
            problems.append(f"split R-hat up to {c['max_rhat']:.3f} (site {c['worst_rhat_site']!r}) > "
                            f"{self.rhat_threshold}")
        if c["min_ess_bulk"] < self.min_ess_per_chain * self.num_chains:
            problems.append(f"bulk ESS down to {c['min_ess_bulk']:.0f} (site {c['worst_ess_site']!r}) over "
                            f"{self.num_chains} chains, under {self.min_ess_per_chain:g} per chain")
        if problems:
            advice = self._correlation_advice()
            warnings.warn(
                f"{type(self).__name__}: the chains have not mixed: {'; '.join(problems)}. The posterior "
                "summaries are unreliable: run longer (num_samples, warmup), use more chains, or a "
                f"preconditioner.{advice}", RuntimeWarning, stacklevel=3)

    def _correlation_advice(self, threshold: float = 0.9, max_dim: int = 500) -> str:
        """A sentence naming the strongest posterior correlation of the kept draws (pooled over
        chains, on the unconstrained space) when it exceeds ``threshold``: the diagonal
        preconditioner moves slowly along such a ridge (the reference battery's kidiq and
        kilpisjarvi regressions, correlation -0.99 and -0.9999), so the fix is the
        parameterization, not a longer run.  Empty otherwise, or above ``max_dim`` coordinates."""
        names, cols = [], []
        try:
            for n in self._draws[0]:
                x = self.potential.unconstrain({n: torch.stack([d[n] for d in self._draws])[:, : self.num_chains]})[n]
                flat = x.reshape(x.shape[0] * x.shape[1], -1)
                for i in range(flat.shape[1]):
                    names.append(n if flat.shape[1] == 1 else f"{n}[{i}]")
                    cols.append(flat[:, i])
        except (RuntimeError, ValueError):  # e.g. a support that depends on another site
            return ""
        if len(cols) < 2 or len(cols) > max_dim:
            return ""
        corr = torch.corrcoef(torch.stack(cols).double())
        corr = torch.nan_to_num(corr).fill_diagonal_(0.0)
        k = int(corr.abs().argmax())
        i, j = divmod(k, corr.shape[0])
        rho = float(corr[i, j])
        if abs(rho) < threshold:
            return ""
        return (f" The draws show a strong posterior correlation ({rho:.3f} between {names[i]!r} and "
                f"{names[j]!r} on the unconstrained space), along which a diagonal preconditioner moves "
                "slowly: reparameterize (e.g. center and scale the predictors of a regression), or use "
                "backend='smc' where the prior is proper (its moves use the particles' full covariance).")

    def _fit_summary(self) -> str:
        c = getattr(self, "_convergence", None)
        if not c:
            return ""
        return f", max_rhat={c['max_rhat']:.3f}, min_ess_bulk={c['min_ess_bulk']:.0f}"

    def __repr__(self):
        return (f"{type(self).__name__}(chains={self.num_chains}, steps={self.num_steps}, "
                f"draws={self.num_draws}, step_size={'auto: %.3g' % self._auto_step if self._auto else repr(self.schedule)}, "
                f"friction={self.friction:g})")


@register_backend("sgld")
class SGLD(SGHMC):
    r"""Stochastic-gradient Langevin dynamics (Welling & Teh 2011): SG-HMC with friction 1,

    .. math:: u \leftarrow u - \eta\, G \nabla \tilde U(u) + \mathcal N(0, 2 \eta G),

    with ``preconditioner="rmsprop"`` giving pSGLD (Li et al. 2016). Takes every option of
    :class:`SGHMC` except ``friction``.
    """

    name = "sgld"
    valid_for = SGHMC.valid_for

    def __init__(self, model, guide=None, optim=None, **options):
        if "friction" in options:
            raise TypeError("SGLD has no friction option (it is SG-HMC with friction=1); use SGHMC "
                            "to choose the friction.")
        super().__init__(model, guide, optim, friction=1.0, **options)
