r"""``check_against_reference``: fit a reference posterior with any backend and score the result.

For each parameter the reference reports, with :math:`\hat\mu, \hat s` our mean and sd and
:math:`\mu_r, s_r` the reference's,

.. math::

    z = \frac{\hat\mu - \mu_r}{\sqrt{\mathrm{MCSE}(\hat\mu)^2 + \mathrm{MCSE}(\mu_r)^2}}, \qquad
    z_{sd} = \frac{\hat s - s_r}{\sqrt{\mathrm{MCSE}(\hat s)^2 + \mathrm{MCSE}(s_r)^2}}, \qquad
    \text{ratio} = \hat s / s_r .

Our MCSE comes from the draws the backend returns:

* **samplers** (SG-HMC, SGLD, the SMC samplers): ArviZ's MCSE (bulk ESS over the chains; an SMC
  particle population is one "chain" in its stored order, where resampled descendants sit next
  to each other, so their correlation lowers the ESS).
* **guide-based backends** (SVI, IWAE, chi^2-VIS): the guide is approximate by design, so by
  default the moments are self-normalized importance-sampling estimates with the guide as
  proposal (what ``fit.log_evidence`` and resampled draws rely on), Pareto-smoothed
  (PSIS, Vehtari, Simpson, Gelman, Yao, Gabry 2024), with the delta-method MCSE
  :math:`\sqrt{\sum_k \bar w_k^2 (x_k - \hat\mu)^2}` and the PSIS :math:`\hat k` of the weights
  reported: above 0.7 the importance estimate, and hence the check, is unreliable (the result
  says so).  ``draws="proposal"`` checks the raw guide draws instead (iid, MCSE = sd/sqrt(S)).

Under a correct backend each z is approximately standard normal, so over ~10-25 parameters the
largest :math:`|z|` exceeds 4 with probability below 0.2%: :meth:`ReferenceCheck.passed` uses 4 by
default.  Samplers with a discretization bias (SGLD without a Metropolis correction, SG-HMC at
a finite step size) are approximate: their rows show how far.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pyro
import torch

from . import load_reference

__all__ = ["ReferenceCheck", "check_against_reference", "DEFAULT_OPTIONS"]

#: Options ``check_against_reference`` passes unless given: only run lengths and particle
#: counts (the backends' own defaults for everything else, as a new user would get them).
DEFAULT_OPTIONS = {
    "svi": {"num_steps": 3000},
    "iwae": {"num_steps": 3000},
    "chi2_vis": {"num_steps": 3000},
    "sghmc": {},
    "sgld": {},
    "smc": {},
    "smc_online": {},
}


@dataclass
class ReferenceCheck:
    """What :func:`check_against_reference` measured.

    :ivar rows: one dict per parameter: ``parameter, ref_mean, mean, mcse, ref_mcse, z, ref_sd,
        sd, sd_ratio, z_sd``.
    :ivar khat: PSIS k-hat of the importance weights (guide-based backends), else ``None``.
    :ivar log_evidence: ``(estimate, se, reference, reference_se, z)`` where both exist.
    :ivar seconds: wall time of the fit (not of the scoring).
    :ivar min_ess: the smallest bulk ESS (samplers) or importance ESS (guides) over parameters.
    """

    name: str
    backend: str
    rows: List[dict]
    seconds: float
    min_ess: float
    khat: Optional[float] = None
    log_evidence: Optional[tuple] = None
    notes: List[str] = field(default_factory=list)
    fit: object = None

    @property
    def worst_z(self) -> float:
        return max((abs(r["z"]) for r in self.rows), default=float("nan"))

    @property
    def worst_sd_z(self) -> float:
        return max((abs(r["z_sd"]) for r in self.rows), default=float("nan"))

    @property
    def worst_sd_ratio(self) -> float:
        """The sd ratio farthest from 1 (in log terms)."""
        return max((r["sd_ratio"] for r in self.rows), key=lambda v: abs(math.log(v)) if v > 0 else math.inf,
                   default=float("nan"))

    @property
    def ess_per_second(self) -> float:
        return self.min_ess / self.seconds if self.seconds > 0 else float("nan")

    @property
    def reliable(self) -> bool:
        """False where the scoring itself cannot be trusted (importance k-hat above 0.7)."""
        return self.khat is None or not (self.khat > 0.7)

    def passed(self, z: float = 4.0, sd_z: float = 4.0) -> bool:
        """Every mean within ``z`` and every sd within ``sd_z`` combined standard errors (and,
        where there are no moments, as for a filter, the log-evidence within ``z``)."""
        if not self.rows:
            return self.log_evidence is not None and abs(self.log_evidence[4]) <= z
        return self.worst_z <= z and self.worst_sd_z <= sd_z

    def __str__(self):
        head = (f"{self.name} / {self.backend}: worst |z| {self.worst_z:.2f}, worst |z_sd| {self.worst_sd_z:.2f}, "
                f"worst sd ratio {self.worst_sd_ratio:.3f}, {self.seconds:.1f} s, min ESS {self.min_ess:.0f}")
        if self.khat is not None:
            head += f", k-hat {self.khat:.2f}"
        if self.log_evidence is not None:
            e, se, r, rse, zz = self.log_evidence
            head += f"\n  log-evidence {e:.3f} +- {se:.3f} vs reference {r:.3f} +- {rse:.3f} (z {zz:.2f})"
        lines = [head, f"  {'parameter':<16}{'ref mean':>11}{'mean':>11}{'z':>7}{'ref sd':>10}{'sd':>10}{'ratio':>7}{'z_sd':>7}"]
        for r in self.rows:
            lines.append(f"  {r['parameter']:<16}{r['ref_mean']:>11.4g}{r['mean']:>11.4g}{r['z']:>7.2f}"
                         f"{r['ref_sd']:>10.4g}{r['sd']:>10.4g}{r['sd_ratio']:>7.3f}{r['z_sd']:>7.2f}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _flatten(samples: Dict[str, torch.Tensor], lead: int) -> Dict[str, np.ndarray]:
    """{site: (*lead_dims, *shape)} -> {"site" or "site[i]": (*lead_dims,)} (Stan's 1-based names)."""
    out = {}
    for name, v in samples.items():
        v = v.detach().cpu().double().numpy()
        shape = v.shape[lead:]
        if not shape:
            out[name] = v
            continue
        flat = v.reshape(v.shape[:lead] + (-1,))
        for i in range(flat.shape[-1]):
            idx = np.unravel_index(i, shape)
            out[f"{name}[{','.join(str(j + 1) for j in idx)}]"] = flat[..., i]
    return out


def _weighted_moments(x: np.ndarray, w: np.ndarray):
    """Self-normalized importance estimates of mean and sd with delta-method MCSEs."""
    m = float(np.sum(w * x))
    d2 = (x - m) ** 2
    v = float(np.sum(w * d2))
    sd = math.sqrt(max(v, 0.0))
    mcse_m = math.sqrt(float(np.sum(w ** 2 * d2)))
    mcse_v = math.sqrt(float(np.sum(w ** 2 * (d2 - v) ** 2)))
    return m, sd, mcse_m, (mcse_v / (2 * sd) if sd > 0 else 0.0)


def _chain_moments(x: np.ndarray):
    """x: (chains, draws) -> mean, sd, MCSE of each, bulk ESS (ArviZ)."""
    import arviz as az

    da = az.convert_to_dataset(x[None] if x.ndim == 1 else x)
    return (float(x.mean()), float(x.std(ddof=1)), float(az.mcse(da, method="mean")["x"]),
            float(az.mcse(da, method="sd")["x"]), float(az.ess(da, method="bulk")["x"]))


def _default_guide(model, dtype, device):
    import functools

    from pyro.infer.autoguide import AutoMultivariateNormal

    from ...traces import init_to_feasible_point

    return AutoMultivariateNormal(model, init_loc_fn=functools.partial(init_to_feasible_point, dtype=dtype,
                                                                       device=device))


def check_against_reference(name: str, backend, guide=None, *, num_samples: Optional[int] = None,
                            draws: str = "importance", seed: int = 0, dtype=torch.float64, device=None,
                            log_evidence: bool = True, **options) -> ReferenceCheck:
    """Fit the reference posterior ``name`` with ``backend`` and compare with the reference.

    :param name: see :func:`~ppl_lvm.testing.reference_posteriors`.
    :param backend: a registered backend name or a Backend subclass (your own too).
    :param guide: for guide-based backends; default a full-rank ``AutoMultivariateNormal``.
    :param num_samples: draws to score: guide draws (default 4000) or, for samplers, passed to
        ``to_inferencedata`` (default every kept draw).
    :param draws: guide-based backends: ``"importance"`` (importance-corrected moments, default)
        or ``"proposal"`` (the raw guide).
    :param seed: ``pyro.set_rng_seed`` before the fit; the param store is cleared.
    :param log_evidence: also compare ``fit.log_evidence`` where the reference has one.
    :param options: backend and run options (``num_steps``, ``optim``, ...), over
        :data:`DEFAULT_OPTIONS`.
    :returns: :class:`ReferenceCheck` (print it for the table).
    """
    from ...inference import GuidedBackend, get_backend

    post = load_reference(name)
    if draws not in ("importance", "proposal"):
        raise ValueError(f"draws must be 'importance' or 'proposal', got {draws!r}")
    cls = get_backend(backend)
    bname = getattr(cls, "name", None) or cls.__name__
    record = post.load(dtype=dtype, device=device)
    data = record["data"]
    ref = record["reference"]["parameters"]
    guided = issubclass(cls, GuidedBackend)
    opts = {**DEFAULT_OPTIONS.get(bname, {}), **options}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if guided and guide is None:
        guide = _default_guide(post.model, dtype, device)
    from ... import fit as run_fit

    if bname == "smc_filter":
        return _check_state_space(post, record, cls, bname, options, run_fit)
    t0 = time.perf_counter()
    fit = run_fit(post.model, guide, backend=cls, **opts, **data)
    seconds = time.perf_counter() - t0
    notes, khat = [], None

    with torch.no_grad():
        if guided:
            K = int(num_samples or 4000)
            b = fit.backend
            b.setup(*fit.args, **fit.kwargs)
            ev = b.evaluator
            gt = ev.guide_trace(K, fit.args, fit.kwargs)
            latents = ev.latent_values(gt, K)
            if post.derived is not None:
                latents = {**latents, **post.derived(latents, data)}
            flat = _flatten(latents, 1)
            if draws == "importance":
                lw = ev.log_weights(K, fit.args, fit.kwargs, guide_trace=gt).joint.double().cpu().numpy()
                from ...diagnostics import psis_khat

                khat = psis_khat(lw)
                # Pareto-smoothed weights (Vehtari et al. 2024; ArviZ's psislw): the largest raw
                # weights replaced by the fitted generalized-Pareto quantiles
                import arviz as az

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    smoothed, _ = az.psislw(lw.copy())
                w = np.exp(smoothed - smoothed.max())
                w = w / w.sum()
                min_ess = float(1.0 / np.sum(w ** 2))
                if khat > 0.7:
                    notes.append(f"importance k-hat {khat:.2f} > 0.7: the guide is a poor proposal and the "
                                 "importance-corrected moments (and so this check) are unreliable")
            else:
                w = np.full(K, 1.0 / K)
                min_ess = float(K)
            stats = {}
            for p in flat:
                if draws == "importance":
                    stats[p] = _weighted_moments(flat[p], w)
                else:
                    x = flat[p]
                    sd = float(x.std(ddof=1))
                    stats[p] = (float(x.mean()), sd, sd / math.sqrt(K), sd / math.sqrt(2 * (K - 1)))
        else:
            idata = fit.to_inferencedata(num_samples)
            post_ds = idata.posterior
            samples = {v: torch.as_tensor(post_ds[v].values) for v in post_ds.data_vars}
            C, S = next(iter(samples.values())).shape[:2]
            if post.derived is not None:
                flat_in = {k: v.reshape((C * S,) + v.shape[2:]) for k, v in samples.items()}
                extra = post.derived(flat_in, data)
                samples.update({k: v.reshape((C, S) + v.shape[1:]) for k, v in extra.items()})
            flat = _flatten(samples, 2)
            stats, ess = {}, []
            for p in flat:
                if p in ref:
                    m, sd, mm, ms, e = _chain_moments(flat[p])
                    stats[p] = (m, sd, mm, ms)
                    ess.append(e)
            min_ess = float(min(ess)) if ess else float("nan")

    missing = [p for p in ref if p not in stats]
    if missing:
        raise ValueError(f"The fit has no draws for reference parameter(s) {missing}; it returned {sorted(stats)}.")
    rows = []
    for p, r in ref.items():
        m, sd, mm, ms = stats[p]
        den = math.hypot(mm, r["mcse_mean"])
        den_sd = math.hypot(ms, r["mcse_sd"])
        rows.append({"parameter": p, "ref_mean": r["mean"], "mean": m, "mcse": mm, "ref_mcse": r["mcse_mean"],
                     "z": (m - r["mean"]) / den if den > 0 else math.inf,
                     "ref_sd": r["sd"], "sd": sd, "sd_ratio": sd / r["sd"],
                     "z_sd": (sd - r["sd"]) / den_sd if den_sd > 0 else math.inf})

    evidence = None
    ref_ev = record.get("log_evidence")
    if log_evidence and ref_ev is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                est = fit.log_evidence(4000) if guided else fit.log_evidence(num_runs=5)
        except (NotImplementedError, TypeError, ValueError) as exc:
            notes.append(f"no log-evidence: {exc}")
        else:
            e, se = float(est.log_evidence), float(est.stderr)
            den = math.hypot(se, ref_ev["se"])
            evidence = (e, se, ref_ev["estimate"], ref_ev["se"], (e - ref_ev["estimate"]) / den if den > 0 else math.inf)
    return ReferenceCheck(name, bname, rows, seconds, min_ess, khat, evidence, notes, fit)


def _check_state_space(post, record, cls, bname, options, run_fit):
    """``smc_filter``: filter the posterior's state-space form at the reference posterior mean
    and compare its log-evidence, log p(y | theta), with the exact forward-algorithm value."""
    from ...errors import IncompatibleModelError

    if post.state_space is None:
        with_form = [n for n, p in _registry().items() if p.state_space is not None]
        raise IncompatibleModelError(
            f"backend 'smc_filter' filters state-space objects; the reference posterior {post.name!r} has no "
            f"state-space form (those that have: {with_form}).")
    obj, y, exact = post.state_space(record)
    opts = {"num_particles": 1000, **options}
    evidence_particles = opts.pop("evidence_particles", opts["num_particles"])
    num_runs = opts.pop("num_runs", 10)
    t0 = time.perf_counter()
    fit = run_fit(obj, None, y[1:], (y[0],), backend=cls, **opts)  # y[0] goes to init
    est = fit.log_evidence(evidence_particles, num_runs=num_runs)
    seconds = time.perf_counter() - t0
    e, se = float(est.log_evidence), float(est.stderr)
    z = (e - exact) / se if se > 0 else math.inf
    note = ("the log-likelihood log p(y | theta) at the reference posterior mean against the forward algorithm "
            f"(exact); {num_runs} filters of {evidence_particles} particles")
    return ReferenceCheck(post.name, bname, [], seconds, float("nan"), None, (e, se, exact, 0.0, z), [note], fit)


def _registry():
    from . import REFERENCE_POSTERIORS

    return REFERENCE_POSTERIORS
