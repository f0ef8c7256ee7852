r"""Results and update machinery shared by the guide-based backends (SVI, IWAE, chi^2-VIS):
importance-sampling evidence with the guide as proposal, importance-resampled draws, ArviZ groups."""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple, Optional

import numpy as np
import torch
from pyro import poutine

from ..traces import LogWeights, log_mean_exp, trace_program
from ..validation import check_positive_int
from .base import Backend
from .results import EvidenceEstimate, iid_chains

__all__ = ["GuidedBackend", "ParticlePass"]


class ParticlePass(NamedTuple):
    """One vectorized draw of K guide particles scored under the model (see
    :meth:`GuidedBackend._particle_pass`)."""

    guide_trace: object
    model_lp: dict
    log_weights: LogWeights
    model_params: list
    guide_params: list


def _accumulate(params, grads):
    for p, g in zip(params, grads):
        if g is None:
            continue
        p.grad = g if p.grad is None else p.grad + g


class GuidedBackend(Backend):
    r"""A backend whose posterior is a guide :math:`q(z \mid x)` (SVI, IWAE, chi^2-VIS).

    Provides the results every such backend shares:

    * posterior samples: the guide run once inside a vectorized particle plate;
    * log-evidence by importance sampling with the guide as proposal,
      :math:`\log \hat p(x) = \log \frac1K \sum_k p(x, z_k) / q(z_k \mid x)` (per data point
      where the latents are all local), with a delta-method standard error and the PSIS
      :math:`\hat k` of the weights (a ``RuntimeWarning`` above 0.7);
    * ArviZ groups: guide draws as the posterior, per-observation log-likelihoods, and the
      draws' importance log-weights in ``sample_stats`` (``log_importance_weight``).

    **Which draws.**  ``draws="proposal"`` returns the guide's own draws :math:`z \sim q`.
    ``draws="resampled"`` returns sampling-importance-resampling draws (Rubin 1988): a pool
    of ``num_samples`` guide draws is resampled with replacement in proportion to
    :math:`w = p(x, z) / q(z \mid x)` (per data point where the weights factorize, i.e. only
    local latents; jointly otherwise), which is the importance-weighted posterior that IWAE and
    chi^2-VIS target; ``sample_stats`` then holds ``proposal_index`` (the pool draw behind
    each draw; per data point where resampled per data point it is the first point's) and the
    attributes ``importance_ess`` (Kish's ESS of the pool's weights, the smallest over data
    points) and ``importance_khat`` (PSIS :math:`\hat k`, the largest).  Duplicated draws make
    ArviZ's ESS honest about the pool's ESS.  ``default_draws``: ``"proposal"`` for SVI (its
    answer is q), ``"resampled"`` for IWAE and chi^2-VIS.
    """

    #: a run ends with the mean of its last 20% of iterates (Backend.run's average_last)
    average_last: ClassVar[float] = 0.2
    #: which draws posterior_samples/to_inferencedata return when not told ("proposal" or "resampled")
    default_draws: ClassVar[str] = "proposal"
    draws_choices: ClassVar[tuple] = ("resampled", "proposal")

    #: importance samples of ``Fit.log_evidence()`` when not told
    evidence_particles: int = 1000
    #: particles scored per vectorized pass when estimating the evidence
    evidence_chunk_size: int = 1000
    #: what the importance-sampling proposal is, for warnings
    proposal_description: ClassVar[str] = "the guide"
    _capture_params = False  # _loss_and_grads of guided backends returns (loss, params)
    _resolved_gradient: Optional[str] = None

    @property
    def gradient_estimator(self) -> Optional[str]:
        """The gradient estimator in use for the guide, once the model has been seen (backends
        that choose one: IWAE's "dreg"/"pathwise"/"stl", VIS's "score"/"pathwise")."""
        return self._resolved_gradient

    # ------------------------------------------------------------------ shared update machinery
    def _non_reparameterized_sites(self, structure) -> tuple:
        """Guide sites of the model's latents that need score-function gradients
        (discrete, or without ``rsample``).  A straight-through site
        (:class:`ppl_lvm.distributions.StraightThroughBernoulli`) counts as discrete here: its
        pathwise gradient is a surrogate for the single-sample ELBO (Pyro's ``Trace_ELBO``, the
        SVI backend), and inside an importance-weighted objective it estimates nothing (see that
        module's docstring), so IWAE and chi^2-VIS give it score-function gradients."""
        return tuple(n for n, s in self.guide_structure.latent_sites.items()
                     if n in structure.latent_sites and (s.is_discrete or not s.has_rsample))

    def _warn_if_still_falling(self, num_steps: int) -> None:
        """Warn when the objective still falls at the end of the run: the mean over the last
        10% of the steps is more than 3 standard errors below the mean over the 10% before
        (standard errors from 10 batch means per window, which allows for the autocorrelation
        of stochastic-gradient losses).  Runs shorter than 200 steps are not judged."""
        import warnings

        if num_steps < 200 or len(self.losses) < num_steps:
            return
        w = num_steps // 10
        recent = np.asarray(self.losses[-2 * w:], dtype=float)
        if not np.all(np.isfinite(recent)):
            return
        before, last = recent[:w], recent[w:]
        b = w // 10
        means = [x[: b * 10].reshape(10, b).mean(1) for x in (before, last)]
        se = math.sqrt(sum(float(m.var(ddof=1)) / 10 for m in means))
        drop = float(before.mean() - last.mean())
        if se > 0 and drop > 3 * se:
            warnings.warn(
                f"{type(self).__name__}: the loss was still falling when the run ended (the last {w} steps "
                f"average {drop:.4g} below the {w} before, {drop / se:.1f} standard errors): the fit has not "
                "converged, and its posterior and evidence are not yet the optimum's. Run longer "
                "(num_steps; EarlyStopping(patience=...) stops once it flattens), raise the learning rate, "
                "or standardize the data (predictors on very different scales slow every optimizer).",
                RuntimeWarning, stacklevel=4)

    def _warn_poor_guide(self, khat: float, what: str) -> None:
        """The PSIS diagnostic of a variational fit (Yao, Vehtari, Simpson, Gelman 2018, "Yes,
        but did it work?"): above 0.7 the guide misses mass the posterior has.  Measured on the
        reference battery's centered eight schools (a funnel): k-hat 1.0, means up to 84 MCSE
        off, sds 0.04x."""
        import warnings

        if khat > 0.7:
            warnings.warn(
                f"{type(self).__name__}: PSIS k-hat of the guide's importance weights is {khat:.2f} > 0.7 "
                f"(Yao et al. 2018): {self.proposal_description} misses part of the posterior, so {what} "
                "misstate it (typically too narrow). Fit longer, use a richer guide (e.g. "
                "AutoMultivariateNormal, a flow), reparameterize (non-centered hierarchies), or use a "
                "sampler (backend='smc' or 'sghmc').", RuntimeWarning, stacklevel=4)

    def _particle_pass(self, num_particles, args, kwargs) -> ParticlePass:
        """Draw K particles from the guide, score them under the model, and record which
        parameters the guide (phi) and the model (theta) used.  Parameters used by both count
        as model parameters."""
        ev = self.evaluator
        with poutine.trace(param_only=True) as gcap:
            gt = ev.guide_trace(num_particles, args, kwargs)
        with poutine.trace(param_only=True) as mcap:
            model_lp = ev.model_log_probs(gt, num_particles, args, kwargs)
        lw = ev.log_weights(num_particles, args, kwargs, guide_trace=gt, model_lp=model_lp)
        guide_params = {s["value"].unconstrained() for s in gcap.trace.nodes.values() if s["type"] == "param"}
        model_params = {s["value"].unconstrained() for s in mcap.trace.nodes.values() if s["type"] == "param"}
        return ParticlePass(gt, model_lp, lw, list(model_params), list(guide_params - model_params))

    def _fresh_log_weights(self, args, kwargs, num_particles: Optional[int] = None):
        """:class:`~ppl_lvm.traces.LogWeights` of fresh particles, without gradients (K defaults
        to the backend's ``num_particles``)."""
        self.setup(*args, **kwargs)
        k = self.num_particles if num_particles is None else check_positive_int(num_particles, "num_particles")
        with torch.no_grad():
            return self.evaluator.log_weights(k, args, kwargs)

    def log_weights(self, *args, num_particles: Optional[int] = None, **kwargs):
        """Importance log-weights of fresh guide particles (no gradients), as
        :class:`~ppl_lvm.traces.LogWeights`: ``.joint`` ``(K,)``, per data point ``.local``
        ``(K, B)``, ``.is_log_likelihood()``."""
        return self._fresh_log_weights(args, kwargs, num_particles)

    def log_chi2_objective(self, *args, num_particles: Optional[int] = None, **kwargs) -> float:
        r""":math:`\log \hat V = \log \frac1K \sum_k w_k^2` with fresh particles (per data point
        where the weights factorize): the forward-:math:`\chi^2` quality of the guide as a
        proposal, :math:`\approx 2 \log p(x) + \log(1 + \chi^2(p \| q))`; lower is better."""
        lw = self._fresh_log_weights(args, kwargs, num_particles)
        return float(lw.reduce(log_mean_exp(2.0 * lw.particle_weights, 0)))

    @staticmethod
    def _apply_gradients(model_objective, guide_objective, model_params, guide_params) -> None:
        """Set ``.grad`` to minus the gradient of ``model_objective`` for the model's parameters
        and of ``guide_objective`` for the guide's (both objectives are maximized).  When the
        two are the same tensor a single backward pass serves both."""
        if guide_objective is model_objective:
            params = model_params + guide_params
            if params:
                _accumulate(params, torch.autograd.grad(-model_objective, params, allow_unused=True))
            return
        if model_params:
            _accumulate(model_params, torch.autograd.grad(-model_objective, model_params,
                                                          retain_graph=bool(guide_params), allow_unused=True))
        if guide_params:
            _accumulate(guide_params, torch.autograd.grad(-guide_objective, guide_params, allow_unused=True))

    def _vectorized_guide_draws(self, num_samples, args, kwargs):
        """``(evaluator, guide trace, {site: (num_samples, *shape)})`` of one vectorized guide run."""
        ev = self.evaluator
        gt = ev.guide_trace(num_samples, args, kwargs)
        return ev, gt, ev.latent_values(gt, num_samples)

    def _posterior_samples(self, num_samples, args, kwargs, draws=None):
        ev, gt, latents = self._vectorized_guide_draws(num_samples, args, kwargs)
        if (draws or self.default_draws) == "proposal":
            return latents
        lw = ev.log_weights(num_samples, args, kwargs, guide_trace=gt)
        pick, _ = self._resampler(lw, num_samples)
        return {n: pick(v, n) for n, v in latents.items()}

    def _resampler(self, lw: LogWeights, num_samples: int):
        """``(pick, indices)``: ``pick(tensor (K, *shape), site) -> (num_samples, *shape)``
        resamples by the normalized weights (sampling importance resampling), per data point
        where they factorize; ``indices`` are the pool draws chosen, ``(num_samples,)`` or
        ``(num_samples, B)``."""
        s = self.structure
        if not lw.factorizes:
            idx = torch.multinomial(torch.softmax(lw.joint, 0), num_samples, replacement=True)
            return (lambda v, name=None: v.index_select(0, idx)), idx
        # (num_samples, B): data point b's draws come from its own weights
        idx = torch.multinomial(torch.softmax(lw.local, 0).t(), num_samples, replacement=True).t()
        data_plate = s.plates[s.data_plate]

        def pick(v, name):
            info = s.sites.get(name)
            if info is None and name == s.data_plate:  # enumerated block per data point (K, B)
                return torch.gather(v, 0, idx)
            if info is None or s.data_plate not in info.plates:
                return v[:num_samples] if v.shape[0] >= num_samples else v.expand((num_samples,) + v.shape[1:])
            axis = 1 + len(info.batch_shape) + data_plate.dim  # the data plate's axis in v
            shape = [num_samples] + [1] * (v.dim() - 1)
            shape[axis] = idx.shape[1]
            index = idx.reshape(shape).expand((num_samples,) + tuple(v.shape[1:]))
            return torch.gather(v, 0, index)
        return pick, idx

    def _check_evidence_inputs(self):
        s = self.structure
        sub = s.subsampled_plates
        if sub:
            raise ValueError(
                f"The model subsamples plate(s) {sorted(sub)}; the log-evidence needs every data "
                "point. Pass arguments that switch subsampling off, e.g. "
                "fit.log_evidence(1000, x, subsample_size=None)."
            )
        if self.guide_structure is not None:
            missing = [n for n, i in s.latent_sites.items()
                       if n not in self.guide_structure.latent_sites and i.enumerate is None]
            if missing:  # enumerated sites are summed out exactly by the evaluator
                raise ValueError(
                    f"Latent site(s) {missing} are neither sampled by the guide nor marked for "
                    "enumeration; importance sampling with the guide as proposal needs every "
                    "latent site in the guide or enumerated (infer={'enumerate': 'parallel'})."
                )

    def _importance_log_weights(self, num_particles, args, kwargs):
        """:class:`~ppl_lvm.traces.LogWeights` of ``num_particles`` guide draws, in chunks."""
        ev = self.evaluator
        parts = []
        left = num_particles
        while left > 0:
            k = min(left, self.evidence_chunk_size)
            parts.append(ev.log_weights(k, args, kwargs))
            left -= k
        return LogWeights.cat(parts)

    def _log_evidence(self, num_particles, args, kwargs):
        import warnings
        from ..diagnostics import psis_khat, psis_khats

        self._check_evidence_inputs()
        if num_particles is None:
            num_particles = self.evidence_particles
        lw = self._importance_log_weights(num_particles, args, kwargs)
        est, se = lw.log_evidence()
        diag = lw.weights_for_diagnostics()
        pointwise = pointwise_khat = None
        if diag.dim() == 2:  # per data point where the weights factorize; report the largest
            pointwise_khat = psis_khats(diag)
            khat = float(np.nanmax(pointwise_khat)) if np.isfinite(pointwise_khat).any() else float("nan")
            pointwise = log_mean_exp(diag, 0).detach().cpu().numpy()
        else:
            khat = psis_khat(diag)
        note = None
        if khat > 0.7:
            where = (f" for at least one of the {diag.shape[1]} data points" if diag.dim() == 2 else "")
            warnings.warn(
                f"PSIS k-hat of the importance weights is {khat:.2f} > 0.7{where}: "
                f"{self.proposal_description} is a poor proposal there and the log-evidence estimate "
                "is unreliable. Fit longer, use a richer proposal, or more particles.",
                RuntimeWarning, stacklevel=3)
        elif not math.isfinite(khat):
            distinct = int(torch.unique(diag.reshape(diag.shape[0], -1)[:, 0]).numel())
            note = (f"k-hat not computed: PSIS fits a generalized Pareto tail to the largest weights, "
                    f"and these weights take few distinct values ({distinct} at the first data point: "
                    f"{self.proposal_description} puts its draws on few states). Bounded weights have a "
                    "finite variance, so the standard error applies.")
        return EvidenceEstimate(float(est), float(se), float(khat), int(num_particles), pointwise, pointwise_khat,
                                note)

    def _inference_data_groups(self, num_samples, args, kwargs, draws=None):
        from ..diagnostics import psis_khat

        ev, gt, latents = self._vectorized_guide_draws(num_samples, args, kwargs)
        model_lp = ev.model_log_probs(gt, num_samples, args, kwargs)  # one model run serves both
        loglik = ev.per_observation_log_likelihood(gt, num_samples, args, kwargs, model_lp=model_lp)
        lw = ev.log_weights(num_samples, args, kwargs, guide_trace=gt, model_lp=model_lp)
        guide_proto = trace_program(self.guide, args, kwargs, role="guide")
        proto = trace_program(self.model, args, kwargs, replay=guide_proto)
        observed = {n: proto.nodes[n]["value"] for n in self.structure.observed_sites}
        cd = iid_chains(num_samples)
        groups = {"observed_data": observed}
        if (draws or self.default_draws) == "proposal":
            groups.update(posterior={n: cd(v) for n, v in latents.items()},
                          sample_stats={"log_importance_weight": cd(lw.joint)},
                          log_likelihood={n: cd(v) for n, v in loglik.items()})
            self._warn_poor_guide(psis_khat(lw.particle_weights), "its draws")
            return groups
        pick, idx = self._resampler(lw, num_samples)
        x = lw.particle_weights
        ess = float((1.0 / torch.softmax(x, 0).pow(2).sum(0)).min())
        self._warn_poor_guide(psis_khat(x), "the importance-resampled draws")
        groups.update(posterior={n: cd(pick(v, n)) for n, v in latents.items()},
                      sample_stats={"proposal_index": cd(idx if idx.dim() == 1 else idx[:, 0])},
                      log_likelihood={n: cd(pick(v, n)) for n, v in loglik.items()})
        groups["_sample_stats_attrs"] = {"draws": "resampled", "importance_ess": ess,
                                         "importance_khat": psis_khat(x)}
        return groups
