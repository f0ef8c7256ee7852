r"""SMC samplers for static models: adaptive likelihood tempering, and open-horizon SMC.

**Tempered SMC** (:class:`SMCSampler`; Del Moral, Doucet & Jasra 2006; Chopin &
Papaspiliopoulos 2020, ch. 17).  :math:`K` particles start from the prior (all latent sites
drawn by the model) and follow the path

.. math::

    \pi_\beta(z) \propto p(z)\, p(x \mid z)^{\beta}, \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_n = 1 .

Each step (i) picks :math:`\beta_{t+1}` by bisection so that the incremental weights
:math:`w^k = p(x \mid z^k)^{\beta_{t+1} - \beta_t}` have an effective sample size of
``target_ess`` :math:`\cdot K`, (ii) adds :math:`\log \frac1K \sum_k w^k` to :math:`\log\hat Z`
(the particles carry equal weights, having been resampled), (iii) resamples, and (iv) moves
every particle with ``num_moves`` HMC transitions that leave :math:`\pi_{\beta_{t+1}}`
invariant.  With fixed temperatures :math:`\hat Z` would be an unbiased estimate of
:math:`p(x)`; with temperatures chosen adaptively from the particles it is consistent, with a
bias that vanishes as :math:`K` grows (Beskos, Jasra, Kantas & Thiery 2016) — measured in
tutorial 05 on the regression fixture at :math:`K = 1000`: about 0.02 nats, gone with 20 moves
per temperature.  The HMC kernel works on
the model's unconstrained space (:class:`~ppl_lvm.traces.PotentialEnergy`), with the
particles' covariance as inverse mass matrix (dense up to 200 dimensions; the cloud knows the
posterior's scales and correlations), a step size adapted towards acceptance 0.65 between
moves and jittered per particle (log-uniform over one decade below it), and as many moves per
temperature as it takes the particles to decorrelate from where they started (at least
``num_moves``, at most ``max_moves``); ``num_leapfrog=1`` is MALA.  The last two matter once
a scale parameter is latent: on an AR(5) model with a HalfCauchy noise scale (195 points,
1000 particles, seeds 0-3) the log-evidence error against the exact value was -3.5 nats with a
diagonal metric and 5 fixed moves, -2.0 (mean; -1.1 to -3.4) with a dense one, and
+0.17 / +0.01 / -0.10 / -0.03 with the jitter and adaptive moves (11 moves per temperature on
average), because particles in the neck of the funnel between the scale and the coefficients
need steps far below those the mean acceptance selects.

**Open-horizon SMC** (:class:`OpenHorizonSMC`), for models whose data arrive in minibatches
through ``pyro.plate(..., subsample_size=B)``, following Zhao, Mair, Schön & Sjölund
(AISTATS 2024) for partially stochastic Bayesian neural networks: the particles over the
latent ("stochastic") sites persist across minibatches.  At each step, with minibatch
:math:`b` of :math:`B` points out of :math:`N`,

1. the particles are reweighted by the minibatch likelihood :math:`p(y_b \mid z^k, \psi)`,
   and resampled when the ESS falls below ``ess_threshold`` :math:`\cdot K`;
2. each particle moves by ``num_moves`` MALA/HMC steps on the minibatch posterior
   :math:`p(z)\,p(y_b \mid z, \psi)^{N/B}`;
3. the model's parameters :math:`\psi` (``pyro.param`` sites and ``PyroModule`` weights without
   priors: the deterministic part) take one optimizer step along the Fisher-identity gradient
   :math:`\frac NB \sum_k W^k \nabla_\psi \log p(y_b \mid z^k, \psi)`.

The horizon is open: the data stream cycles through the data set without end, so the particle
system is a stochastic approximation (it does not target the exact posterior after a fixed
number of epochs); what it delivers is a trained :math:`\psi` together with a particle
approximation of the stochastic sites' uncertainty.  It is not a posterior sampler for a
static model without minibatches: every step then reweights by the whole data set again
(measured on the eight-schools reference posterior: means 14 MCSE off, an sd 8x the
reference's), and the run warns; use :class:`SMCSampler` there.

References:

* Del Moral, Doucet, Jasra. *Sequential Monte Carlo samplers*. JRSS B 2006.
* Chopin, Papaspiliopoulos. *An Introduction to Sequential Monte Carlo*. Springer 2020.
* Beskos, Jasra, Kantas, Thiery. *On the convergence of adaptive sequential Monte Carlo
  methods*. Annals of Applied Probability 2016.
* Buchholz, Chopin, Jacob. *Adaptive tuning of Hamiltonian Monte Carlo within SMC*. Bayesian
  Analysis 2021 (mass matrix from the particles, step-size adaptation).
* Zhao, Mair, Schön, Sjölund. *On Feynman-Kac training of partial Bayesian neural networks*.
  AISTATS 2024.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Dict, NamedTuple, Optional

import torch
from pyro import poutine

from ..errors import DivergenceError, IncompatibleModelError
from ..traces import (CHAIN_PLATE, BatchedLogDensity, PotentialEnergy, draw_guide, draw_prior, log_mean_exp,
                      log_mean_exp_se, trace_program, validation_off)
from ..validation import check_choice, check_fraction, check_positive, check_positive_int
from .base import Backend
from .callbacks import progress_bar_class, progress_default
from .registry import register_backend
from .results import EvidenceEstimate
from .requirements import Requirements
from .particle_filter import RESAMPLERS

__all__ = ["SMCSampler", "OpenHorizonSMC", "SMCStepInfo", "OnlineSMCStepInfo"]


class SMCStepInfo(NamedTuple):
    """What one tempering step of :class:`SMCSampler` did (``SMCSampler.last_step``)."""

    beta: float                    #: the temperature reached
    log_evidence_increment: float  #: this step's :math:`\log \hat Z_t / \hat Z_{t-1}` (0 once beta = 1)
    ess: float                     #: the incremental weights' ESS before resampling
    moves: int                     #: HMC transitions made at this temperature
    acceptance: float              #: their mean acceptance rate


class OnlineSMCStepInfo(NamedTuple):
    """What one minibatch step of :class:`OpenHorizonSMC` did (``OpenHorizonSMC.last_step``)."""

    log_likelihood: float   #: the minibatch's log predictive :math:`\log \sum_k W_k p(y_b \mid z_k)`
    ess: float              #: the reweighted particles' ESS before resampling
    resampled: bool         #: whether the ESS fell below ``ess_threshold * num_particles``
    acceptance: float       #: the mean acceptance rate of this step's HMC moves


class _ParticleSampler(Backend):
    """Shared machinery: particles on unconstrained space, prior draws, HMC moves."""

    requires = Requirements(guide="optional", discrete_latents="refuse", latent_sites="need",
                            dependent_supports=False, improper_priors="need_guide")
    _capture_params = False
    _evidence_from_runs = True
    divergence_advice = ("Check the model's likelihood at draws from the prior (a prior far wider than "
                         "the data's scale, a likelihood undefined somewhere in its support), or pass "
                         "guide= to start the particles closer to the posterior.")

    def __init__(self, model, guide=None, optim=None, *, num_particles: int = 1000, num_moves: int = 5,
                 num_leapfrog: int = 5, leapfrog_step_size: float = 0.5, resampling: str = "systematic",
                 max_moves: Optional[int] = None, decorrelation: float = 0.1,
                 max_plate_nesting: Optional[int] = None, validate: bool = True):
        super().__init__(model, guide, optim, max_plate_nesting=max_plate_nesting, validate=validate)
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.num_moves = check_positive_int(num_moves, "num_moves")
        self.max_moves = self.num_moves if max_moves is None else check_positive_int(max_moves, "max_moves")
        if self.max_moves < self.num_moves:
            raise ValueError(f"max_moves={self.max_moves} is below num_moves={self.num_moves}; pass "
                             "max_moves >= num_moves (or None: exactly num_moves moves).")
        self.decorrelation = check_fraction(decorrelation, "decorrelation")
        self.moves_per_step = []
        self.num_leapfrog = check_positive_int(num_leapfrog, "num_leapfrog")
        self.leapfrog_step_size = check_positive(leapfrog_step_size, "leapfrog_step_size")
        self.resampling = check_choice(resampling, "resampling", RESAMPLERS)
        self.potential: Optional[PotentialEnergy] = None
        self._guide_density: Optional[BatchedLogDensity] = None
        self._u: Optional[Dict[str, torch.Tensor]] = None
        self.acceptance = []

    def _after_setup(self, structure, *args, **kwargs):
        try:
            self.potential = PotentialEnergy(self.model, structure, structure.max_plate_nesting)
            self._guide_density = None
        except ValueError as exc:
            raise IncompatibleModelError(str(exc)) from exc
        if self.guide is not None:
            extra = sorted(set(self.guide_structure.latent_sites) - set(structure.latent_sites))
            if extra:
                raise IncompatibleModelError(
                    f"The guide samples site(s) {extra} that are not latent sites of the model (auxiliary "
                    f"variables, as in autoguides); {type(self).__name__} needs the guide's density at given "
                    "latent values. Use a guide that samples the model's latent sites directly, or guide=None.")

    def _guide_log_prob(self, values, args, kwargs) -> torch.Tensor:
        """log q(z) of the guide at constrained ``values`` (``(K, *shape)``), per particle: the
        batched log-density engine run on the guide (:class:`~ppl_lvm.traces.BatchedLogDensity`)."""
        if self._guide_density is None:
            self._guide_density = BatchedLogDensity(self.guide, self.guide_structure, self.potential.ndim,
                                                    plate_name=CHAIN_PLATE)
        k = next(iter(values.values())).shape[0]
        with validation_off():  # a proposal off the support scores -inf and is rejected
            lp, _ = self._guide_density.log_probs(values, args, kwargs)
        return sum(BatchedLogDensity.per_draw(lp[n][0], k) for n in values)

    # ------------------------------------------------------------------ particles
    def _prior_draws(self, args, kwargs) -> Dict[str, torch.Tensor]:
        """K draws of the latent sites from the base distribution (the prior, or the guide when
        one is given), ``{site: (K, *shape)}`` on unconstrained space."""
        K, structure, pe = self.num_particles, self.structure, self.potential
        if self.guide is not None:
            return {n: t.detach() for n, t in
                    pe.unconstrain(draw_guide(self.model, self.guide, structure, K, args, kwargs)).items()}
        return {n: t.detach() for n, t in pe.unconstrain(draw_prior(self.model, structure, K, pe.ndim, args,
                                                                    kwargs)).items()}

    def _split_log_probs(self, u, args, kwargs):
        """(log base density + log|J|, log-likelihood ratio), each ``(K,)``, differentiable in ``u``.

        The base is the prior (the ratio is then the likelihood) or, with a guide, the guide
        (the ratio is log p(x, z) - log q(z))."""
        pe = self.potential
        values = pe.constrain(u)
        k = next(iter(values.values())).shape[0]
        lp = pe.log_probs(values, args, kwargs)
        ladj = pe.log_abs_det_jacobian(u, values)
        prior = ladj.new_zeros(k)
        lik = ladj.new_zeros(k)
        for name, (term, _) in lp.items():
            s = pe.per_chain(term, k)
            if self.structure.sites[name].is_observed:
                lik = lik + s
            else:
                prior = prior + s
        if self.guide is not None:
            log_q = self._guide_log_prob(values, args, kwargs)
            return ladj + log_q, prior + lik - log_q
        return ladj + prior, lik

    def _energy(self, u, beta, args, kwargs, lik_scale=1.0):
        u = {n: t.detach().requires_grad_(True) for n, t in u.items()}
        prior, lik = self._split_log_probs(u, args, kwargs)
        U = -(prior + beta * lik_scale * lik)
        grads = torch.autograd.grad(U.sum(), list(u.values()))
        return U.detach(), dict(zip(u, (g.detach() for g in grads))), lik.detach()

    #: the cloud's full covariance is the inverse mass matrix up to this many unconstrained dims
    dense_mass_max_dim: ClassVar[int] = 200
    #: per-particle random step sizes (see :meth:`_hmc_moves`); the tempered sampler uses them
    step_jitter: ClassVar[bool] = False

    def _hmc_moves(self, u, beta, args, kwargs, lik_scale=1.0, mass="cloud"):
        r"""HMC transitions per particle leaving :math:`\pi_\beta` invariant (vectorized).

        The inverse mass matrix :math:`\Sigma` (velocity :math:`= \Sigma p`) is the particle
        cloud's covariance on unconstrained space (``mass="cloud"``): dense when the latent
        dimension :math:`D` is at most :attr:`dense_mass_max_dim` and below :math:`K`, shrunk
        towards its diagonal by :math:`D/(D+K)`, else its diagonal; or ``1 / mean_k g_k^2``
        from the particles' gradients (``mass="gradient"``: for a Gaussian target
        :math:`E[g^2]` is the precision), which keeps its scale when resampling has collapsed
        the cloud.  A dense metric matters for correlated posteriors: on an AR(5) model with a
        latent noise scale the diagonal metric left the tempered log-evidence 3.5 nats low
        (5 moves) and 0.7 low (40 moves) against the exact value.

        At least ``num_moves`` transitions are made, then more (up to ``max_moves``) until the
        particles have decorrelated from where the moves began: the correlation across particles
        between the start and the current value, of every coordinate and of the
        log-likelihood (what the next incremental weights read), below ``decorrelation``
        (or 1.2 times the noise level of the largest of :math:`D+1` sample correlations of
        independent clouds, :math:`\sqrt{2 \log(2(D+1))/K}`, when that is larger): a particle left behind biases the next
        temperature's incremental weights, so the evidence (Chopin & Papaspiliopoulos 2020,
        sec. 17.2).
        """
        K = self.num_particles
        names = list(u)
        shapes = [tuple(u[n].shape[1:]) for n in names]
        sizes = [math.prod(sh) for sh in shapes]

        def flat(d):
            return torch.cat([d[n].reshape(K, -1) for n in names], -1)

        def unflat(x):
            return {n: t.reshape((K,) + sh) for n, t, sh in zip(names, x.split(sizes, -1), shapes)}

        x = flat(u)
        U, g, lik = self._energy(u, beta, args, kwargs, lik_scale)
        gx = flat(g)
        D = x.shape[1]
        tiny = torch.finfo(x.dtype).eps
        chol = None
        if mass == "gradient":
            var = 1.0 / (gx ** 2).mean(0).clamp_min(tiny)
        elif K > 1:
            var = x.var(0).clamp_min(tiny)
            if D <= self.dense_mass_max_dim and D < K:
                xc = x - x.mean(0)
                cov = xc.t() @ xc / (K - 1)
                lam = D / (D + K)
                cov = (1 - lam) * cov + lam * torch.diag(var)
                chol = torch.linalg.cholesky_ex(cov)[0]
                if not bool(torch.isfinite(chol).all()):
                    chol = None
                else:
                    var = cov
        else:
            var = torch.ones_like(x[0])

        def velocity(p):
            return p @ var if chol is not None else p * var

        def draw_momentum():
            z = torch.randn_like(x)
            if chol is None:
                return z / var.sqrt()
            # p ~ N(0, Sigma^{-1}): p = L^{-T} z with Sigma = L L^T
            return torch.linalg.solve_triangular(chol.t(), z.t(), upper=True).t()

        start = torch.cat([x, lik[:, None]], -1)
        # independent clouds still show sample correlations of order 1/sqrt(K): the largest of
        # D + 1 of them is about sqrt(2 log(2 (D + 1)) / K), which the threshold must clear
        threshold = max(self.decorrelation, 1.2 * math.sqrt(2.0 * math.log(2.0 * (D + 1)) / max(K, 1)))
        moves = 0
        while True:
            # each particle's step size is eps / 10^U, U ~ Uniform(0, 1), drawn afresh every move
            # (independent of its position, so each transition stays pi_beta-invariant): a cloud
            # spread across a funnel (a latent scale) has particles in the neck that need steps
            # far below those the mean acceptance selects, and without them they do not move
            eps = self.leapfrog_step_size
            eps_k = eps * torch.pow(10.0, -torch.rand_like(U))[:, None] if self.step_jitter else eps
            p = draw_momentum()
            kin0 = 0.5 * (p * velocity(p)).sum(-1)
            q = x
            pn = p - 0.5 * eps_k * gx
            for step in range(self.num_leapfrog):
                q = q + eps_k * velocity(pn)
                Un, gn_d, lik_n = self._energy(unflat(q), beta, args, kwargs, lik_scale)
                gn = flat(gn_d)
                pn = pn - (0.5 * eps_k if step == self.num_leapfrog - 1 else eps_k) * gn
            kin1 = 0.5 * (pn * velocity(pn)).sum(-1)
            log_accept = (U + kin0) - (Un + kin1)
            log_accept = torch.where(torch.isfinite(log_accept), log_accept, torch.full_like(log_accept, -math.inf))
            accept = torch.log(torch.rand_like(log_accept)) < log_accept
            x = torch.where(accept[:, None], q, x)
            gx = torch.where(accept[:, None], gn, gx)
            U = torch.where(accept, Un, U)
            lik = torch.where(accept, lik_n, lik)
            rate = float(accept.to(U.dtype).mean())
            self.acceptance.append(rate)
            # move the step size towards acceptance 0.65 (a multiplicative Robbins-Monro rule)
            self.leapfrog_step_size = float(min(max(eps * math.exp(rate - 0.65), 1e-4), 1e3))
            moves += 1
            if moves >= self.max_moves:
                break
            if moves >= self.num_moves and (
                    K < 3 or self._max_correlation(start, torch.cat([x, lik[:, None]], -1)) < threshold):
                break
        self.moves_per_step.append(moves)
        return unflat(x)

    @staticmethod
    def _max_correlation(a, b) -> float:
        """Largest over coordinates of the correlation across particles between ``a`` and ``b``."""
        ac, bc = a - a.mean(0), b - b.mean(0)
        den = (ac.pow(2).sum(0) * bc.pow(2).sum(0)).sqrt()
        ok = den > 0
        if not bool(ok.any()):
            return 0.0
        return float(((ac * bc).sum(0)[ok] / den[ok]).abs().max())

    def _resample(self, u, log_w):
        idx = RESAMPLERS[self.resampling](torch.softmax(log_w, 0))
        return {n: t[idx] for n, t in u.items()}

    # ------------------------------------------------------------------ results
    def _default_num_samples(self) -> int:
        return self.num_particles

    def particles(self) -> Dict[str, torch.Tensor]:
        """The current particles on the sites' supports, ``{site: (K, *shape)}``."""
        if self._u is None:
            raise RuntimeError("No particles yet: run the sampler first.")
        return {n: t.detach() for n, t in self.potential.constrain(self._u).items()}

    def _posterior_samples(self, num_samples, args, kwargs):
        parts = self.particles()
        K = self.num_particles
        if num_samples >= K:
            if num_samples > K:
                warnings.warn(f"{num_samples} draws asked for, the sampler holds {K} particles; returning "
                              "all of them.", RuntimeWarning, stacklevel=4)
            return parts
        idx = torch.randperm(K, device=next(iter(parts.values())).device)[:num_samples]
        return {n: t[idx] for n, t in parts.items()}

    def _smc_diagnostics(self) -> dict:
        """Facts about the particle system for ``sample_stats``' attributes."""
        last = self.moves_per_step[-1] if self.moves_per_step else 0
        acc = self.acceptance[-last:] if last else []
        out = {"sampler": "SMC: one population of particles, not MCMC chains (R-hat and ESS "
                          "computed by ArviZ on it say nothing about convergence)",
               "num_particles": self.num_particles,
               "move_acceptance": float(sum(acc) / len(acc)) if acc else float("nan")}
        if self._u is not None:
            first = next(iter(self._u.values()))
            out["unique_particles"] = int(torch.unique(first.reshape(first.shape[0], -1), dim=0).shape[0])
        return out

    def _inference_data_groups(self, num_samples, args, kwargs):
        draws = self._posterior_samples(num_samples, args, kwargs)
        n = next(iter(draws.values())).shape[0]

        def one_chain(v):  # the particles are one population, not independent chains
            return v.reshape((1,) + tuple(v.shape))

        groups = {"posterior": {k: one_chain(v) for k, v in draws.items()}}
        proto = trace_program(self.model, args, kwargs)
        groups["observed_data"] = {k: proto.nodes[k]["value"] for k in self.structure.observed_sites}
        lp = self.potential.log_probs(draws, args, kwargs)
        groups["sample_stats"] = {"lp": one_chain(sum(self.potential.per_chain(t, n) for t, _ in lp.values()))}
        if not self.structure.subsampled_plates:
            ll = self.potential.observation_log_likelihood(draws, args, kwargs, lp)
            groups["log_likelihood"] = {k: one_chain(v) for k, v in ll.items()}
        groups["_sample_stats_attrs"] = self._smc_diagnostics()
        return groups

    def _extra_state(self) -> dict:
        return {"u": self._u, "leapfrog_step_size": self.leapfrog_step_size, "moves_per_step": list(self.moves_per_step),
                "acceptance": list(self.acceptance)}

    def _load_extra_state(self, extra: dict) -> None:
        self._u = extra.get("u")
        self.leapfrog_step_size = float(extra.get("leapfrog_step_size", extra.get("step_size", self.leapfrog_step_size)))
        self.moves_per_step = list(extra.get("moves_per_step", []))
        self.acceptance = list(extra.get("acceptance", []))


@register_backend("smc")
class SMCSampler(_ParticleSampler):
    r"""Adaptive tempered SMC for static Pyro models with continuous latents (module docstring).

    Each :meth:`step` is one tempering iteration (choose the next :math:`\beta`, reweight,
    resample, move); once :math:`\beta = 1` further steps only move the particles (more
    decorrelated draws; the evidence is final).  ``run()`` with no ``num_steps`` runs until
    :math:`\beta = 1`.  The loss reported per step is :math:`-\log p(x, z)` averaged over the
    particles.

    :param model: a Pyro model with continuous latent sites and no subsampled plate.
    :param guide: optional base distribution: with a guide :math:`q` the path is
        :math:`\pi_\beta \propto q^{1-\beta} p(x, \cdot)^{\beta}` and the particles start from
        :math:`q` (e.g. an SVI fit), which shortens the path when :math:`q` is close to the
        posterior; the evidence estimate is unchanged in meaning. The guide must sample the
        model's latent sites directly (no auxiliary sites).
    :param int num_particles: :math:`K`.
    :param float target_ess: fraction of :math:`K` the incremental weights' ESS is held at.
    :param int num_moves: HMC transitions per particle per temperature, at least.
    :param max_moves: at most this many (default 50): moves continue while any coordinate's,
        or the log-likelihood's, correlation across particles with its value before the moves
        is above ``decorrelation`` (default 0.1).  ``max_moves=num_moves`` fixes the number.
    :param int num_leapfrog: leapfrog steps per transition (1 gives MALA).
    :param float leapfrog_step_size: initial leapfrog step size (in units of the particles' standard
        deviations; adapted towards acceptance 0.65).
    :param str resampling: ``"systematic"``, ``"stratified"`` or ``"multinomial"``.

    Attributes after a run: ``betas`` (the temperatures), ``log_evidence_`` (this run's
    :math:`\log\hat Z`), ``ess`` (per step), ``acceptance`` (per move), ``moves_per_step``.
    """

    name = "smc"
    valid_for = ("static Pyro models with continuous latents and no subsampled plate (tempered SMC "
                 "sampler with HMC moves; log-evidence)")
    step_jitter = True

    def __init__(self, model, guide=None, optim=None, *, num_particles: int = 1000, target_ess: float = 0.5,
                 num_moves: int = 5, num_leapfrog: int = 5, leapfrog_step_size: float = 0.5,
                 resampling: str = "systematic", max_steps: int = 1000, max_moves: Optional[int] = 50,
                 decorrelation: float = 0.1, max_plate_nesting: Optional[int] = None, validate: bool = True):
        if optim is not None:
            raise TypeError("The tempered SMC sampler learns no parameters, so it takes no optimizer (optim "
                            "must be None; model parameters are held at their values). To learn them with "
                            "particles use backend='smc_online', or fit them first with SVI.")
        super().__init__(model, guide, None, num_particles=num_particles, num_moves=num_moves,
                         num_leapfrog=num_leapfrog, leapfrog_step_size=leapfrog_step_size, resampling=resampling,
                         max_moves=max_moves, decorrelation=decorrelation,
                         max_plate_nesting=max_plate_nesting, validate=validate)
        self.target_ess = check_fraction(target_ess, "target_ess")
        #: what the last step did (:class:`SMCStepInfo`), ``None`` before the first
        self.last_step: Optional[SMCStepInfo] = None
        self.max_steps = check_positive_int(max_steps, "max_steps")
        self.beta = 0.0
        self.betas = [0.0]
        self.log_evidence_ = 0.0
        self.ess = []
        self._lik = None

    requires = Requirements(guide="optional", discrete_latents="refuse", latent_sites="need",
                            subsampling="refuse", dependent_supports=False, improper_priors="need_guide")

    @property
    def done(self) -> bool:
        """Whether the temperature has reached 1."""
        return self.beta >= 1.0

    def _next_beta(self, lik):
        """Largest beta' in (beta, 1] whose incremental weights keep ESS >= target * K."""
        K, beta = lik.shape[0], self.beta
        lik = torch.where(torch.isfinite(lik), lik, torch.full_like(lik, -math.inf))

        def ess(b):
            lw = (b - beta) * lik
            lw = lw - torch.logsumexp(lw, 0)
            return float(torch.exp(-torch.logsumexp(2 * lw, 0)))

        target = self.target_ess * K
        if ess(1.0) >= target:
            return 1.0
        lo, hi = beta, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if ess(mid) >= target:
                lo = mid
            else:
                hi = mid
        return max(lo, beta + 1e-12)

    def _step(self, *args, **kwargs) -> float:
        fresh = self._u is None
        u0 = self._prior_draws(args, kwargs) if fresh else self._u
        if fresh or not self.done:
            _, lik = self._split_log_probs(u0, args, kwargs)
            lik = lik.detach()
            if not bool(torch.isfinite(lik).any()):  # checked before anything is stored
                self._divergence("the log-likelihood is not finite for any particle")
            if fresh:
                self._u = u0
                self.beta, self.betas, self.log_evidence_, self.ess = 0.0, [0.0], 0.0, []
            new_beta = self._next_beta(lik)
            lw = (new_beta - self.beta) * torch.where(torch.isfinite(lik), lik, torch.full_like(lik, -math.inf))
            increment = float(log_mean_exp(lw, 0))
            self.log_evidence_ += increment
            norm = lw - torch.logsumexp(lw, 0)
            self.ess.append(float(torch.exp(-torch.logsumexp(2 * norm, 0))))
            self._u = self._resample(self._u, lw)
            self.beta = new_beta
            self.betas.append(new_beta)
            step_ess = self.ess[-1]
        else:
            increment, step_ess = 0.0, float("nan")
        self._u = self._hmc_moves(self._u, self.beta, args, kwargs)
        moves = self.moves_per_step[-1]
        self.last_step = SMCStepInfo(beta=self.beta, log_evidence_increment=increment,
                                     ess=step_ess, moves=moves,
                                     acceptance=float(sum(self.acceptance[-moves:]) / moves))
        with torch.no_grad():
            prior, lik = self._split_log_probs(self._u, args, kwargs)
            log_joint = prior + lik - self.potential.log_abs_det_jacobian(self._u, self.potential.constrain(self._u))
        return float(-log_joint.mean())

    def run(self, *args, num_steps: Optional[int] = None, progress: Optional[bool] = None, callbacks=(),
            average_last: Optional[float] = None, **kwargs):
        """Run tempering steps (until beta = 1 when ``num_steps`` is None) and return a Fit."""
        if average_last:
            raise TypeError("The tempered SMC sampler learns no parameters, so there are no iterates to "
                            "average: leave average_last out.")
        if num_steps is not None:
            return super().run(*args, num_steps=num_steps, progress=progress, callbacks=callbacks, **kwargs)

        args, kwargs = self._coerce(args, kwargs)
        tqdm = progress_bar_class()
        self.setup(*args, **kwargs)
        show = progress_default() if progress is None else bool(progress)
        bar = tqdm(total=1.0, disable=not show, desc="SMCSampler", bar_format="{l_bar}{bar}| beta={n:.3f}")
        try:
            while not self.done:
                if self.num_steps >= self.max_steps:
                    raise RuntimeError(f"SMCSampler reached max_steps={self.max_steps} at beta={self.beta:.4g}; "
                                       "raise max_steps or lower target_ess.")
                before = self.beta
                try:
                    self.step(*args, **kwargs)
                except DivergenceError as err:
                    err.fit = self.make_fit(args, kwargs)
                    raise
                bar.update(self.beta - before)
                for cb in callbacks:
                    if cb(self, self.num_steps - 1, self.losses[-1]):
                        return self.make_fit(args, kwargs)
        finally:
            bar.close()
        return self.make_fit(args, kwargs)

    def _smc_diagnostics(self) -> dict:
        out = super()._smc_diagnostics()
        out.update(particle_ess=float(self.ess[-1]) if self.ess else float("nan"),
                   min_particle_ess=float(min(self.ess)) if self.ess else float("nan"),
                   num_temperatures=len(self.betas) - 1, beta=float(self.beta),
                   log_evidence=float(self.log_evidence_))
        return out

    #: what every SMC estimate's note says about its error bar and bias
    _evidence_note = ("k-hat applies to importance weights; this is an SMC estimate. Adaptive temperatures "
                      "bias it by a few tenths of a nat at 1000 particles (reference battery: -0.14 on AR(5), "
                      "-0.27 on a 6-parameter regression); more particles or moves shrink it")

    def _log_evidence(self, num_particles, args, kwargs):
        """This run's :math:`\\log \\hat Z` (no error bar from one run), or with ``num_runs=R``
        the log of the mean :math:`\\hat Z` of R fresh tempered runs with ``num_particles`` each
        (default: this sampler's), with a delta-method standard error from their spread."""
        runs = kwargs.pop("num_runs", None)
        if runs is None:
            if num_particles is not None and num_particles != self.num_particles:
                raise ValueError(
                    f"This sampler ran with {self.num_particles} particles; its estimate cannot be given for "
                    f"num_particles={num_particles}. Pass num_runs=R to run R fresh samplers with "
                    f"{num_particles} particles each (an error bar from their spread).")
            if not self.done:
                raise ValueError(f"The sampler stopped at beta = {self.beta:.4g} < 1, so there is no estimate "
                                 "of the evidence yet; run it to the end (run() without num_steps).")
            return EvidenceEstimate(float(self.log_evidence_), float("nan"), float("nan"), self.num_particles,
                                    None, None, "this run's estimate: one run gives no error bar; "
                                    "fit.log_evidence(num_runs=R) runs R fresh samplers and takes the error bar "
                                    "from their spread. " + self._evidence_note)
        runs = check_positive_int(runs, "num_runs")
        num_particles = self.num_particles if num_particles is None else num_particles
        vals = []
        for _ in range(runs):
            fresh = SMCSampler(self.model, self.guide, num_particles=num_particles, target_ess=self.target_ess,
                               num_moves=self.num_moves, num_leapfrog=self.num_leapfrog,
                               leapfrog_step_size=self.leapfrog_step_size, resampling=self.resampling, max_steps=self.max_steps,
                               max_moves=self.max_moves, decorrelation=self.decorrelation,
                               max_plate_nesting=self.max_plate_nesting, validate=False)
            with torch.enable_grad():  # the HMC moves need gradients (Fit calls this under no_grad)
                fresh.run(*args, progress=False, **kwargs)
            vals.append(fresh.log_evidence_)
        v = torch.tensor(vals, dtype=torch.float64)
        se = float(log_mean_exp_se(v, 0)) if runs > 1 else float("nan")
        return EvidenceEstimate(float(log_mean_exp(v, 0)), se, float("nan"), num_particles * runs, None, None,
                                f"the mean of {runs} fresh runs (the error bar is their spread, not including "
                                "the bias). " + self._evidence_note)

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "beta": self.beta, "betas": list(self.betas),
                "log_evidence": self.log_evidence_, "ess": list(self.ess)}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.beta = float(extra.get("beta", 0.0))
        self.betas = list(extra.get("betas", [0.0]))
        self.log_evidence_ = float(extra.get("log_evidence", 0.0))
        self.ess = list(extra.get("ess", []))


@register_backend("smc_online")
class OpenHorizonSMC(_ParticleSampler):
    r"""Open-horizon SMC over minibatches, with Fisher-identity training of the model's
    parameters (module docstring; Zhao et al. 2024).

    Each :meth:`step` takes the minibatch that the model's subsampled plate draws, reweights
    the particles by its likelihood, resamples when the ESS is low, moves them with MALA/HMC
    on the minibatch posterior, and updates the model's parameters.  The loss is
    :math:`-\frac NB \log \sum_k W^k p(y_b \mid z^k, \psi)`, the minibatch's predictive
    log-likelihood scaled to the data set.

    :param model: a Pyro model with continuous latent sites (the stochastic part) and
        parameters (the deterministic part); minibatches through ``pyro.plate(..., subsample_size=B)``.
    :param guide: optional; the particles then start from it, weighted by :math:`p(z)/q(z)`.
    :param optim: optimizer of the model's parameters (default Adam, lr 1e-2).
    :param int num_particles: :math:`K`.
    :param float ess_threshold: resample when ESS < ``ess_threshold * K``.
    :param int num_moves, num_leapfrog: MALA/HMC transitions per step (default 5 MALA steps: fewer
        let the cloud collapse under the repeated reweighting).
    :param float leapfrog_step_size: initial leapfrog step size (particle-scaled, adapted).
    """

    name = "smc_online"
    valid_for = ("Pyro models with continuous latents and (optionally) parameters, minibatches from "
                 "pyro.plate(subsample_size=B); particles persist across minibatches")

    def __init__(self, model, guide=None, optim=None, *, num_particles: int = 100, ess_threshold: float = 0.5,
                 num_moves: int = 5, num_leapfrog: int = 1, leapfrog_step_size: float = 0.2,
                 resampling: str = "systematic", max_plate_nesting: Optional[int] = None, validate: bool = True):
        super().__init__(model, guide, optim, num_particles=num_particles, num_moves=num_moves,
                         num_leapfrog=num_leapfrog, leapfrog_step_size=leapfrog_step_size, resampling=resampling,
                         max_plate_nesting=max_plate_nesting, validate=validate)
        self.ess_threshold = check_fraction(ess_threshold, "ess_threshold", open_low=False)
        self._log_w = None
        #: what the last step did (:class:`OnlineSMCStepInfo`), ``None`` before the first
        self.last_step: Optional[OnlineSMCStepInfo] = None

    requires = Requirements(guide="optional", discrete_latents="refuse", latent_sites="need",
                            latents_in_subsampled_plate=False, dependent_supports=False,
                            improper_priors="need_guide")

    def check_model(self, structure):
        if not structure.subsampled_plates:
            warnings.warn(
                "OpenHorizonSMC on a model without a subsampled plate: every step reweights the particles "
                "by the whole data set's likelihood again, so the weights target p(z) p(x | z)^t after t "
                "steps while the moves target the posterior, and the particles are not posterior draws "
                "(measured on the eight-schools reference posterior: means 14 MCSE off, an sd 8x the "
                "reference's). For a static model use backend='smc' (tempered SMC, with log-evidence); "
                "this backend is for minibatches, pyro.plate(..., subsample_size=B).",
                RuntimeWarning, stacklevel=4)

    def _scale(self):
        sub = self.structure.subsampled_plates
        return math.prod(p.scale for p in sub.values()) if sub else 1.0

    def _step(self, *args, **kwargs) -> float:
        # reweighting, the parameter gradients and the resampling are computed into locals and
        # committed together by _update_parameters once all are finite; the moves (which reject
        # non-finite proposals and cannot diverge) then run under the updated parameters
        K = self.num_particles
        u0, log_w0 = self._u, self._log_w
        if u0 is None:
            u0, log_w0 = self._prior_draws(args, kwargs), None
            if self.guide is not None:  # particles from the guide carry weights p(z) / q(z)
                with torch.no_grad():
                    values = self.potential.constrain(u0)
                    lp = self.potential.log_probs(values, args, kwargs)
                    lw = sum(self.potential.per_chain(t, K) for n, (t, _) in lp.items()
                             if not self.structure.sites[n].is_observed)
                    lw = lw - self._guide_log_prob(values, args, kwargs)
                    log_w0 = lw - torch.logsumexp(lw, 0)
        scale = self._scale()
        # one model run gives the minibatch likelihood per particle, with gradients for psi
        with poutine.trace(param_only=True) as capture:
            u = {n: t.detach() for n, t in u0.items()}
            pe = self.potential
            lp, fixed = pe.log_probs_and_subsamples(pe.constrain(u), args, kwargs)
        lik = sum(pe.per_chain(term, K) for name, (term, _) in lp.items()
                  if self.structure.sites[name].is_observed) / scale  # unscaled minibatch log-lik
        if not bool(torch.isfinite(lik).all()):
            self._divergence("the minibatch log-likelihood is not finite for some particle")
        prev = log_w0 if log_w0 is not None else lik.new_full((K,), -math.log(K))  # normalized
        log_w = prev + lik.detach()
        minibatch_log_lik = float(torch.logsumexp(log_w, 0))
        loss = -scale * minibatch_log_lik
        W = torch.softmax(log_w, 0)
        params = [s["value"].unconstrained() for s in capture.trace.nodes.values() if s["type"] == "param"]
        params = [p for p in params if p.requires_grad]
        pairs = []
        if params:
            # Fisher identity: (N/B) sum_k W_k grad_psi log p(y_b | z_k, psi)
            objective = -scale * (W.detach() * lik).sum()
            pairs = list(zip(params, torch.autograd.grad(objective, params, allow_unused=True)))
        log_w = log_w - torch.logsumexp(log_w, 0)
        ess = float(torch.exp(-torch.logsumexp(2 * log_w, 0)))
        u_next = u0
        if ess < self.ess_threshold * K:
            u_next = self._resample(u0, log_w)
            log_w = torch.full_like(log_w, -math.log(K))

        def commit():
            self._u, self._log_w = u_next, log_w.detach()

        self._update_parameters(pairs, commit=commit)
        # move on the minibatch posterior p(z) p(y_b | z)^(N/B), the same minibatch
        before = len(self.acceptance)
        self._u = self._hmc_moves(self._u, 1.0, args, kwargs, mass="gradient") if not fixed else \
            self._moves_on_minibatch(args, kwargs, fixed)
        rates = self.acceptance[before:]
        self.last_step = OnlineSMCStepInfo(log_likelihood=minibatch_log_lik, ess=ess,
                                           resampled=u_next is not u0,
                                           acceptance=sum(rates) / len(rates) if rates else float("nan"))
        return loss

    def _moves_on_minibatch(self, args, kwargs, fixed):
        # hold the subsample indices so that every move sees the step's minibatch
        self.potential.fixed_subsamples = fixed
        try:
            return self._hmc_moves(self._u, 1.0, args, kwargs, mass="gradient")
        finally:
            self.potential.fixed_subsamples = None

    def _posterior_samples(self, num_samples, args, kwargs):
        """Draws from the weighted particle system (resampled by weight)."""
        parts = self.particles()
        w = torch.softmax(self._log_w, 0) if self._log_w is not None else None
        if w is None:
            return super()._posterior_samples(num_samples, args, kwargs)
        idx = torch.multinomial(w, num_samples, replacement=True)
        return {n: t[idx] for n, t in parts.items()}

    def _default_num_samples(self) -> int:
        return self.num_particles

    def _smc_diagnostics(self) -> dict:
        out = super()._smc_diagnostics()
        if self._log_w is not None:
            out["particle_ess"] = float(torch.exp(-torch.logsumexp(2 * self._log_w, 0)))
        return out

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "log_w": self._log_w}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self._log_w = extra.get("log_w")
