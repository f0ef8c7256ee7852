r"""Reference posteriors computed elsewhere, and a check of any backend against them.

Exact fixtures written by the people who wrote the backends share their blind spots, so this
battery holds posteriors whose ground truth was computed by someone else: posteriordb's
reference draws (Magnusson, Bürkner, Vehtari, *posteriordb: testing, benchmarking and developing
Bayesian inference algorithms*, 2024; https://github.com/stan-dev/posteriordb, BSD-3): 10 chains
x 10 000 iterations of Stan's NUTS, thinned to 10 x 1000 draws, with R-hat < 1.01 and
ESS checked by posteriordb.  Each posterior is a Pyro translation of the Stan program (module
:mod:`~ppl_lvm.testing.reference.posteriors`; the implicit flat priors and constraints are
stated there), its data, and the reference's moments (mean, sd, 5/25/50/75/95% quantiles per
parameter with their MCSE, computed by ArviZ from the reference draws; the draws themselves
are not shipped).  Where a log-evidence is known it is stored with how it was computed.

Usage::

    >>> from ppl_lvm.testing import reference_posteriors, check_against_reference
    >>> reference_posteriors()                       # name -> one-line description
    >>> res = check_against_reference("eight_schools_noncentered", "sghmc", num_samples=500)
    >>> print(res)                                   # per-parameter z-scores and sd ratios
    >>> res.worst_z, res.worst_sd_z, res.passed()

The z-score of a mean is :math:`(\hat\mu - \mu_{ref}) / \sqrt{MCSE^2 + MCSE_{ref}^2}`, with
our MCSE from ArviZ's bulk ESS for multi-chain samplers, and from the importance weights for
guide-based backends (their moments are importance-corrected by default: a guide is
approximate by design, so the check is of what importance sampling with it promises; pass
``draws="proposal"`` to check the raw guide).  The same for sds, with the MCSE of an sd.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Dict, Optional

import numpy as np
import torch

from . import posteriors as _models

__all__ = ["ReferencePosterior", "ReferenceCheck", "reference_posteriors", "load_reference",
           "check_against_reference", "REFERENCE_POSTERIORS"]


@dataclass(frozen=True)
class ReferencePosterior:
    """One posterior of the battery: its Pyro model, the posteriordb name, and what it tests.

    :ivar name: the battery's name (also the data file's name).
    :ivar model: the Pyro model; it takes the data as keyword tensors.
    :ivar posteriordb: posteriordb's posterior name (``<data>-<model>``), or ``None``.
    :ivar features: the shapes users meet that this posterior has (hierarchical, funnel, ...).
    :ivar derived: ``fn(samples, data) -> {name: (S, ...)}``: quantities the reference reports
        that are not latent sites of the model (e.g. theta of the non-centered eight schools).
    """

    name: str
    model: Callable
    posteriordb: Optional[str]
    description: str
    features: tuple = ()
    derived: Optional[Callable] = None
    proper_prior: bool = True
    #: ``fn(record) -> (state-space object, observations, exact log-likelihood)`` at the
    #: reference posterior mean, for ``backend="smc_filter"`` (``None``: no state-space form)
    state_space: Optional[Callable] = None

    def load(self, dtype=torch.float64, device=None) -> dict:
        """The data file: ``{"data": {name: tensor}, "reference": {...}, "log_evidence": ...}``."""
        raw = json.loads(resources.files(__package__).joinpath("data", f"{self.name}.json").read_text())
        data = {}
        for key, value in raw["data"].items():
            arr = np.asarray(value)
            if arr.ndim == 0 and key in raw.get("integer_data", ()):
                data[key] = int(arr)
            elif arr.ndim == 0:
                data[key] = float(arr)
            else:
                data[key] = torch.as_tensor(arr, dtype=dtype, device=device)
        raw["data"] = data
        return raw


def _nc_theta(samples, data):
    return {"theta": samples["mu"].unsqueeze(-1) + samples["tau"].unsqueeze(-1) * samples["theta_trans"]}


def _hmm_state_space(record):
    ref, y = record["reference"]["parameters"], record["data"]["y"]
    theta = torch.tensor([[ref["theta1[1]"]["mean"], ref["theta1[2]"]["mean"]],
                          [ref["theta2[1]"]["mean"], ref["theta2[2]"]["mean"]]], dtype=y.dtype, device=y.device)
    mu = torch.tensor([ref["mu[1]"]["mean"], ref["mu[2]"]["mean"]], dtype=y.dtype, device=y.device)
    return (_models.HMMStateSpace(theta, mu), y, float(_models.hmm_log_likelihood(theta, mu, y)))


def _garch_beta1(samples, data):
    return {"beta1": (1.0 - samples["alpha1"]) * samples["beta1_unit"]}


def _gp_f(samples, data):
    return {"f": _models.gp_pois_f(samples, data)}


REFERENCE_POSTERIORS: Dict[str, ReferencePosterior] = {p.name: p for p in [
    ReferencePosterior("eight_schools_noncentered", _models.eight_schools_noncentered,
                       "eight_schools-eight_schools_noncentered",
                       "eight schools, non-centered: 10 parameters, a latent scale tau",
                       ("hierarchical", "non-centered", "latent scale"), _nc_theta),
    ReferencePosterior("eight_schools_centered", _models.eight_schools_centered,
                       "eight_schools-eight_schools_noncentered",
                       "eight schools, centered: the funnel between tau and theta (reference from the "
                       "non-centered draws: the same posterior of mu, tau, theta)",
                       ("hierarchical", "centered", "funnel", "latent scale")),
    ReferencePosterior("kidiq_momiq", _models.kidscore_momiq, "kidiq-kidscore_momiq",
                       "linear regression on an uncentered predictor (intercept-slope correlation -0.99), "
                       "flat prior on beta", ("linear regression", "correlated", "improper prior"),
                       proper_prior=False),
    ReferencePosterior("kilpisjarvi", _models.kilpisjarvi, "kilpisjarvi_mod-kilpisjarvi",
                       "linear trend in years 1952-2013: alpha and beta correlated at -0.9999, scales "
                       "differing by 10^3", ("linear regression", "strong correlation", "improper prior"),
                       proper_prior=False),
    ReferencePosterior("sblrc_blr", _models.blr, "sblrc-blr",
                       "Bayesian linear regression, 5 correlated simulated predictors",
                       ("linear regression", "correlated")),
    ReferencePosterior("wells_dist", _models.logistic_wells_dist, None,
                       "logistic regression (switching wells against distance, 3020 households), flat "
                       "prior; reference by 2-d quadrature (posteriordb has no reference draws)",
                       ("logistic regression", "improper prior"), proper_prior=False),
    ReferencePosterior("arK", _models.ar_k, "arK-arK", "AR(5) time series, 200 points",
                       ("time series",)),
    ReferencePosterior("arma11", _models.arma11, "arma-arma11", "ARMA(1, 1) time series, 200 points",
                       ("time series", "correlated")),
    ReferencePosterior("garch11", _models.garch11, "garch-garch11",
                       "GARCH(1, 1) volatility: a latent scale recursion, a support that depends on "
                       "another parameter (beta1 < 1 - alpha1), flat priors",
                       ("time series", "latent scale", "dependent support", "improper prior"),
                       proper_prior=False),
    ReferencePosterior("garch11_unit_beta", _models.garch11_unit_beta, "garch-garch11",
                       "GARCH(1, 1) with beta1 = (1 - alpha1) u, u ~ Uniform(0, 1): the same posterior as "
                       "garch11 without the dependent support (reference from garch11's draws)",
                       ("time series", "latent scale", "improper prior"), _garch_beta1, proper_prior=False),
    ReferencePosterior("gp_regr", _models.gp_regr, "gp_pois_regr-gp_regr",
                       "Gaussian-process regression: length scale, amplitude, noise (11 points)",
                       ("Gaussian process", "latent scale")),
    ReferencePosterior("gp_pois_regr", _models.gp_pois_regr, "gp_pois_regr-gp_pois_regr",
                       "Poisson regression with a latent GP (non-centered), 13 parameters",
                       ("Gaussian process", "latent function", "non-centered"), _gp_f),
    ReferencePosterior("low_dim_gauss_mix", _models.low_dim_gauss_mix, "low_dim_gauss_mix-low_dim_gauss_mix",
                       "two-component normal mixture, ordered means, 1000 points",
                       ("mixture", "ordered")),
    ReferencePosterior("hmm_example", _models.hmm_example, "hmm_example-hmm_example",
                       "two-state Gaussian HMM with the states summed out (forward algorithm); simplex "
                       "transition rows, positive ordered means", ("time series", "HMM", "simplex", "ordered"),
                       state_space=_hmm_state_space),
]}


def reference_posteriors() -> Dict[str, str]:
    """``{name: description}`` of the battery's posteriors."""
    return {n: p.description for n, p in REFERENCE_POSTERIORS.items()}


def load_reference(name: str) -> ReferencePosterior:
    """The :class:`ReferencePosterior` called ``name`` (see :func:`reference_posteriors`)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    if name not in REFERENCE_POSTERIORS:
        raise ValueError(f"Unknown reference posterior {name!r}; available: {sorted(REFERENCE_POSTERIORS)}.")
    return REFERENCE_POSTERIORS[name]


from .check import ReferenceCheck, check_against_reference  # noqa: E402
