r"""Diagnostics: ArviZ conversion and the PSIS :math:`\hat k` of importance weights.

``to_inferencedata`` builds an :class:`arviz.InferenceData` through ``arviz.from_dict``, which
exists both in arviz 0.23 (what pip gives on Python 3.11) and in arviz 1.x, so the library does
not depend on ``arviz.from_pyro`` (gone in 1.x).

References:

* Vehtari, Simpson, Gelman, Yao, Gabry. *Pareto Smoothed Importance Sampling*. JMLR 2024.
* Zhang, Stephens. *A new and efficient estimation method for the generalized Pareto
  distribution*. Technometrics 2009.
"""

from __future__ import annotations

import inspect
import math
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["psis_khat", "psis_khats", "to_inferencedata", "groups_to_inferencedata"]


def _gpd_fit_shape(x: np.ndarray) -> float:
    """Shape :math:`k` of a generalized Pareto fit to positive exceedances ``x`` (sorted).

    Zhang & Stephens (2009) profile-likelihood-weighted estimator, with the weak prior
    towards :math:`k = 0.5` of Vehtari et al. (2024, appendix):
    :math:`\\hat k \\leftarrow (n \\hat k + 10 \\cdot 0.5) / (n + 10)`.
    """
    n = x.shape[0]
    prior_bs, prior_k = 3.0, 10.0
    m = 30 + int(math.sqrt(n))
    j = np.arange(1, m + 1, dtype=float)
    quartile = x[int(n / 4.0 + 0.5) - 1]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (j - 0.5))) / (prior_bs * quartile)
    k_theta = np.log1p(-theta[:, None] * x[None, :]).mean(axis=1)
    log_lik = n * (np.log(-theta / k_theta) - k_theta - 1.0)
    weights = 1.0 / np.exp(log_lik[None, :] - log_lik[:, None]).sum(axis=1)
    theta_hat = float(np.sum(theta * weights))
    k = float(np.mean(np.log1p(-theta_hat * x)))
    return (n * k + prior_k * 0.5) / (n + prior_k)


def psis_khat(log_weights) -> float:
    r"""Pareto :math:`\hat k` of a set of importance log-weights.

    The largest :math:`M = \min(S/5, 3\sqrt S)` weights are fitted with a generalized Pareto
    distribution above the :math:`(M+1)`-th largest; :math:`\hat k` is its shape.  Read it as
    Vehtari et al. (2024) do: below about 0.5–0.7 the importance-sampling estimate is
    reliable; above 0.7 the weights' variance is effectively infinite and estimates (e.g.
    the log-evidence) can be far off even when their standard error looks small.

    :param log_weights: 1-d tensor or array of log-weights (any scale: only ratios matter).
        A 2-d ``(K, B)`` input returns the largest :math:`\hat k` over the B columns.
    :returns: :math:`\hat k` as a float (``nan`` when there are too few weights, S < 10,
        or the tail is constant).
    """
    lw = log_weights.detach().cpu().double().numpy() if torch.is_tensor(log_weights) \
        else np.asarray(log_weights, dtype=float)
    if lw.ndim == 2:
        ks = psis_khats(lw)
        return float(np.nanmax(ks)) if np.isfinite(ks).any() else float("nan")
    if lw.ndim != 1:
        raise ValueError(f"psis_khat expects a 1-d or 2-d array of log-weights, got shape {lw.shape}")
    lw = lw[np.isfinite(lw)]
    s = lw.shape[0]
    if s < 10:
        return float("nan")
    m = int(math.ceil(min(0.2 * s, 3.0 * math.sqrt(s))))
    lw = np.sort(lw - lw.max())
    tail = lw[-m:]
    cutoff = lw[-m - 1]
    exceed = np.exp(tail) - np.exp(cutoff)
    if not np.all(np.isfinite(exceed)) or exceed[-1] <= 0 or np.all(exceed == exceed[0]):
        return float("nan")
    exceed = np.sort(exceed)
    if exceed[0] <= 0:
        exceed = exceed[exceed > 0]
        if exceed.shape[0] < 5:
            return float("nan")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        k = _gpd_fit_shape(exceed)
    return k if math.isfinite(k) else float("nan")


def psis_khats(log_weights) -> np.ndarray:
    """:func:`psis_khat` of each column of a ``(K, B)`` array of log-weights."""
    lw = log_weights.detach().cpu().double().numpy() if torch.is_tensor(log_weights) \
        else np.asarray(log_weights, dtype=float)
    if lw.ndim != 2:
        raise ValueError(f"psis_khats expects a 2-d (K, B) array of log-weights, got shape {lw.shape}")
    return np.array([psis_khat(lw[:, b]) for b in range(lw.shape[1])])


def _to_numpy(value) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def groups_to_inferencedata(groups: Dict[str, Dict[str, object]], attrs: Optional[dict] = None):
    """Build ``arviz.InferenceData`` from ``{group: {variable: array}}``.

    Arrays of ``posterior``, ``sample_stats`` and ``log_likelihood`` (and
    ``posterior_predictive``) must have leading ``(chain, draw)`` dims; ``observed_data`` has
    none.  Works with arviz 0.23 (keyword groups) and arviz 1.x (one dict of groups).
    """
    import arviz as az

    groups = dict(groups)
    stats_attrs = groups.pop("_sample_stats_attrs", None)  # group-level facts (e.g. the IS pool's ESS)
    dims = groups.pop("_dims", None)  # named dimensions past (chain, draw), e.g. {"z": ["time"]}
    clean = {g: {k: _to_numpy(v) for k, v in d.items()} for g, d in groups.items() if d}
    params = inspect.signature(az.from_dict).parameters
    extra = {"dims": dims} if dims and "dims" in params else {}
    if "posterior" in params:  # arviz < 1.0
        idata = az.from_dict(**clean, **extra)
    else:  # arviz >= 1.0 takes one mapping of groups
        idata = az.from_dict(clean, **extra)
    if stats_attrs and hasattr(idata, "sample_stats"):
        idata.sample_stats.attrs.update({k: (float(v) if isinstance(v, (int, float)) else str(v))
                                         for k, v in stats_attrs.items()})
    if attrs:
        for group in getattr(idata, "groups", lambda: [])():
            with_attrs = getattr(idata, group, None)
            if with_attrs is not None and hasattr(with_attrs, "attrs"):
                with_attrs.attrs.update({k: str(v) for k, v in attrs.items()})
    return idata


def to_inferencedata(fit, num_samples=None, **kwargs):
    """Convert a :class:`~ppl_lvm.inference.results.Fit` to ``arviz.InferenceData``.

    Groups: ``posterior`` in ``(chain, draw, ...)``, ``sample_stats`` (backend-specific, e.g.
    the importance log-weight of each guide draw), ``log_likelihood`` per observation (so
    ``az.loo`` works) and ``observed_data``.  Equivalent to ``fit.to_inferencedata(...)``.
    """
    return fit.to_inferencedata(num_samples=num_samples, **kwargs)
