r"""Mixture of multi-task Gaussian processes (MagmaClust): cluster-specific mean processes,
clustering and prediction for functional data.

Tasks :math:`i = 1..M` (curves: children's growth, athletes' performances, patients'
trajectories) are observed at their own inputs :math:`t_i` (:math:`N_i` points each); clusters
:math:`k = 1..K`:

.. math::

    Z_i \sim \mathrm{Categorical}(\pi), \qquad
    \mu_k \sim \mathcal{GP}(m_k, C_{\gamma_k}), \qquad
    f_i \sim \mathcal{GP}(0, \Sigma_{\theta_i}), \qquad
    y_i(t) = \mu_k(t) + f_i(t) + \varepsilon, \ \varepsilon \sim \mathcal N(0, \sigma_i^2)
    \ \text{ when } Z_i = k,

so :math:`y_i \mid \mu_k \sim \mathcal N(\mu_k(t_i), \Psi_i)`,
:math:`\Psi_i = \Sigma_{\theta_i}(t_i, t_i) + \sigma_i^2 I`.  :math:`K = 1` is Magma (one shared
mean process).  The mean processes live on the union grid :math:`T` (size :math:`P`) of all
observed inputs.  Hyperparameters are shared or separate over clusters (:math:`\gamma`) and over
tasks (:math:`\theta, \sigma`): the paper's four hypotheses H00, Hk0, H0i, Hki.

**Variational EM** (:meth:`MultiTaskGPMixture.fit_vem`; Leroy et al. 2023, Sec. 3) with
:math:`q(Z, \mu) = \prod_i q(Z_i) \prod_k q(\mu_k)`.  With :math:`\tilde\Psi_i^{-1}` the
inverse of :math:`\Psi_i` zero-padded to :math:`T`,
:math:`A_k = \sum_i \tau_{ik} \tilde\Psi_i^{-1}` and
:math:`s_k = \sum_i \tau_{ik} \tilde\Psi_i^{-1} \tilde y_i`, the optimal Gaussian factor is

.. math::

    \hat C_k = (C_k^{-1} + A_k)^{-1}, \qquad \hat m_k = \hat C_k (C_k^{-1} m_k + s_k),

and the optimal assignment factor

.. math::

    \tau_{ik} \propto \pi_k \, \mathcal N(y_i; \hat m_k(t_i), \Psi_i)
    \exp\!\big(-\tfrac12 \operatorname{tr}(\Psi_i^{-1} \hat C_k(t_i, t_i))\big)

(normalized by log-sum-exp).  Here both are computed without :math:`C_k^{-1}` (an RBF Gram
matrix on a fine grid is singular to working precision): with :math:`C_k = L L^\top`,
:math:`B = I + L^\top A_k L`, :math:`\hat C_k = L B^{-1} L^\top` and
:math:`\hat m_k = m_k + \hat C_k (s_k - A_k m_k)`.

The hyperparameters are updated with :math:`\tau` fixed by maximizing the ELBO *jointly* over
:math:`q(\mu)` and the hyperparameters (L-BFGS): for fixed :math:`\tau` the maximum over
:math:`q(\mu_k)` is available in closed form, the log-normalizer of
:math:`p(\mu_k) \prod_i \mathcal N(y_i; \mu_k(t_i), \Psi_i)^{\tau_{ik}}`,

.. math::

    \log Z_k = c_k + s_k^\top m_k - \tfrac12 m_k^\top A_k m_k
    + \tfrac12 \lVert \mathrm{chol}(B)^{-1} L^\top v_k \rVert^2 - \tfrac12 \log\det B,
    \quad v_k = s_k - A_k m_k,

with :math:`c_k = \sum_i \tau_{ik} [-\tfrac{N_i}2 \log 2\pi - \tfrac12 \log\det\Psi_i -
\tfrac12 y_i^\top \Psi_i^{-1} y_i]`.  This ascends the same ELBO as the paper's separate
M-step objectives (:math:`\gamma_k` from :math:`\log\mathcal N(\hat m_k; m_k, C_{\gamma_k}) -
\tfrac12\operatorname{tr}(C_{\gamma_k}^{-1}\hat C_k)`, :math:`(\theta_i, \sigma_i)` from
:math:`\sum_k \tau_{ik}[\log \mathcal N(y_i; \hat m_k, \Psi_i) -
\tfrac12\operatorname{tr}(\Psi_i^{-1}\hat C_k)]`), has the same fixed points, and never forms
:math:`C_k^{-1}`.  Then :math:`\tau` (closed form above) and :math:`\pi_k = \frac1M\sum_i
\tau_{ik}`.  Every update is a coordinate ascent of the ELBO, so the ELBO never decreases (a
decrease beyond rounding is warned about).  Initialization: k-means (scikit-learn, 50 starts) on
the curves interpolated to a common grid.

**Prediction** for a new task (:meth:`predict`): each cluster's hyper-posterior recomputed on
:math:`T \cup t_* \cup t_{pred}`; membership :math:`\tau_{*k} \propto \pi_k \mathcal N(y_*;
\hat m_k(t_*), \Gamma_k)`, :math:`\Gamma_k = \Psi_* + \hat C_k(t_*, t_*)`; per cluster the GP
conditional of :math:`y(t_{pred})` given :math:`y_*` under :math:`\mathcal N(\hat m_k,
\Sigma_{\theta_*} + \hat C_k + \sigma_*^2 I)`; the prediction is the mixture
:math:`\sum_k \tau_{*k} \mathcal N(\mu^p_k, V^p_k)`.

**Number of clusters** (:func:`select_num_clusters`): the variational BIC, ELBO
:math:`- \tfrac12 (\#\text{hyperparameters} + K - 1) \log M`.

The same model is a Pyro program (:meth:`model`/:meth:`guide`): :math:`\mu` is one latent site
``"mu"`` of shape ``(K, P)``, :math:`Z` the discrete site ``"z"`` in the plate ``"tasks"``,
marked for parallel enumeration (SVI with ``loss="enum"`` sums it out exactly) or left to
``backend="gflownet_em"`` (``enumerate_assignments=False``).

References:

1. Leroy, Latouche, Guedj, Gey. *Cluster-specific predictions with multi-task Gaussian
   processes*. JMLR 24, 2023 (MagmaClust).
2. Leroy, Latouche, Guedj, Gey. *MAGMA: inference and prediction using multi-task Gaussian
   processes with common mean*. Machine Learning 111, 2022 (Magma, K = 1).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from . import register_model, warn_if_name_in_use
from ..numerics import eps, safe_cholesky
from ..validation import check_positive_int

__all__ = ["MultiTaskGPMixture", "MixturePrediction", "PaddedMultivariateNormal", "TaskData",
           "as_tasks", "select_num_clusters"]

LOG_2PI = math.log(2 * math.pi)


# =========================================================================== data
@dataclass
class TaskData:
    """Ragged tasks padded to one tensor: ``t``, ``y`` ``(M, N)`` (``N`` the longest task;
    padding: ``t`` repeats the task's first input, ``y`` is 0), ``mask`` ``(M, N)`` (True where
    observed), ``ids`` the task labels."""

    t: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    ids: list

    @property
    def num_tasks(self) -> int:
        return self.t.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def task(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``i``-th task's ``(t, y)`` without padding."""
        m = self.mask[i]
        return self.t[i][m], self.y[i][m]

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, y, mask)``: the arguments of :meth:`MultiTaskGPMixture.model`."""
        return self.t, self.y, self.mask


def _as_1d(v, name, dtype, device):
    if isinstance(v, str) or not hasattr(v, "__len__") and not torch.is_tensor(v):
        raise TypeError(f"{name} must be a sequence of numbers (a list, numpy array or tensor), "
                        f"got {type(v).__name__}.")
    try:
        out = torch.as_tensor(np.asarray(v.detach().cpu() if torch.is_tensor(v) else v, dtype=float),
                              dtype=dtype, device=device)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must hold numbers; got {v!r:.80}.") from None
    if out.dim() != 1:
        out = out.reshape(-1) if out.dim() == 2 and 1 in out.shape else out
    if out.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(out.shape)}.")
    return out


def as_tasks(data, task: Optional[str] = None, t: Optional[str] = None, y: Optional[str] = None,
             dtype: torch.dtype = torch.float64, device=None) -> TaskData:
    """Ragged functional data as :class:`TaskData`, checked before any work.

    ``data`` is one of: a :class:`TaskData`; a list of ``(t_i, y_i)`` pairs; a dict
    ``{task id: (t_i, y_i)}``; a long table (pandas ``DataFrame``) with one row per observation
    and the columns named by ``task``, ``t`` and ``y``; or padded tensors ``(t, y, mask)``
    as a tuple.  Raises ``ValueError`` for a task with no points, NaN or infinite values,
    mismatched ``t``/``y`` lengths, and ``TypeError`` for anything else."""
    if isinstance(data, TaskData):
        return data
    if hasattr(data, "columns") and hasattr(data, "groupby"):  # a pandas DataFrame
        missing = [c for c in (task, t, y) if c is None or c not in data.columns]
        if missing:
            raise ValueError(f"A long table needs task=, t= and y= naming its columns; columns are "
                             f"{list(data.columns)}, missing or unnamed: {missing}.")
        pairs = {k: (g[t].to_numpy(), g[y].to_numpy()) for k, g in data.groupby(task, sort=True)}
        return as_tasks(pairs, dtype=dtype, device=device)
    if (isinstance(data, tuple) and len(data) == 3 and all(torch.is_tensor(v) for v in data)
            and data[0].dim() == 2):
        tt, yy, mm = data
        if tt.shape != yy.shape or mm.shape != tt.shape:
            raise ValueError(f"padded (t, y, mask) must share one shape (M, N); got {tuple(tt.shape)}, "
                             f"{tuple(yy.shape)}, {tuple(mm.shape)}.")
        pairs = [(tt[i][mm[i].bool()], yy[i][mm[i].bool()]) for i in range(tt.shape[0])]
        return as_tasks(pairs, dtype=dtype, device=device)
    if isinstance(data, dict):
        ids, pairs = list(data.keys()), list(data.values())
    elif isinstance(data, (list, tuple)):
        ids, pairs = list(range(len(data))), list(data)
    else:
        raise TypeError("data must be a list of (t, y) pairs, a dict {task: (t, y)}, a pandas DataFrame "
                        f"with task=, t=, y= columns, or TaskData; got {type(data).__name__}.")
    if not pairs:
        raise ValueError("data holds no tasks.")
    ts, ys = [], []
    for k, pair in zip(ids, pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"task {k!r}: expected a pair (t, y), got {type(pair).__name__}"
                            f"{'' if not hasattr(pair, '__len__') else f' of length {len(pair)}'}.")
        ti = _as_1d(pair[0], f"task {k!r}: t", dtype, device)
        yi = _as_1d(pair[1], f"task {k!r}: y", dtype, device)
        if ti.shape != yi.shape:
            raise ValueError(f"task {k!r}: t has {ti.numel()} points but y has {yi.numel()}; they must match.")
        if ti.numel() == 0:
            raise ValueError(f"task {k!r} has no observed points; drop it from the training data "
                             "(predict() handles a task with none).")
        if not bool(torch.isfinite(ti).all() and torch.isfinite(yi).all()):
            raise ValueError(f"task {k!r} has NaN or infinite values in t or y; drop or impute those points.")
        order = torch.argsort(ti)
        ts.append(ti[order])
        ys.append(yi[order])
    N = max(len(v) for v in ts)
    tt = torch.stack([torch.cat([v, v[:1].expand(N - len(v))]) for v in ts])
    yy = torch.stack([torch.cat([v, v.new_zeros(N - len(v))]) for v in ys])
    mm = torch.stack([torch.arange(N, device=tt.device) < len(v) for v in ts])
    return TaskData(tt, yy, mm, ids)


def _grid(t: torch.Tensor, mask: torch.Tensor, *extra: torch.Tensor):
    """The union grid of the observed inputs (and ``extra`` inputs) and each input's index."""
    pieces = [t[mask]] + [e.reshape(-1) for e in extra]
    grid = torch.unique(torch.cat(pieces))  # sorted
    idx = torch.searchsorted(grid, t.contiguous())
    return grid, idx.clamp_max(grid.numel() - 1)


# =========================================================================== distribution
class PaddedMultivariateNormal(TorchDistribution):
    r"""A multivariate normal over the observed entries of a padded vector.

    ``loc`` ``(..., N)``, ``scale_tril`` ``(..., N, N)`` the Cholesky factor of the covariance
    padded with the identity on unobserved entries, ``mask`` ``(..., N)``.  ``log_prob`` is the
    exact :math:`\log\mathcal N` of the observed entries (padding contributes nothing);
    ``sample`` puts 0 on padded entries.  Lets tasks of different lengths share one batch."""

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc, scale_tril, mask, validate_args=None):
        batch = torch.broadcast_shapes(loc.shape[:-1], scale_tril.shape[:-2], mask.shape[:-1])
        N = loc.shape[-1]
        self.loc = loc.expand(batch + (N,))
        self.scale_tril = scale_tril.expand(batch + (N, N))
        self.mask = mask.expand(batch + (N,))
        super().__init__(batch, torch.Size([N]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        N = self.event_shape[0]
        return PaddedMultivariateNormal(self.loc.expand(batch_shape + (N,)),
                                        self.scale_tril.expand(batch_shape + (N, N)),
                                        self.mask.expand(batch_shape + (N,)))

    def log_prob(self, value):
        diff = torch.where(self.mask, value - self.loc, torch.zeros((), dtype=self.loc.dtype, device=self.loc.device))
        shape = torch.broadcast_shapes(diff.shape[:-1], self.scale_tril.shape[:-2])
        L = self.scale_tril.expand(shape + self.scale_tril.shape[-2:])
        z = torch.linalg.solve_triangular(L, diff.expand(shape + diff.shape[-1:]).unsqueeze(-1), upper=False).squeeze(-1)
        half_logdet = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        n = self.mask.sum(-1).to(self.loc.dtype)
        return -0.5 * z.pow(2).sum(-1) - half_logdet - 0.5 * n * LOG_2PI

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        e = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        x = self.loc + (self.scale_tril @ e.unsqueeze(-1)).squeeze(-1)
        return torch.where(self.mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# =========================================================================== kernels
def _make_kernel(spec, batch_shape: torch.Size):
    """A gpytorch ``ScaleKernel`` around ``spec`` (a gpytorch kernel class such as
    ``RBFKernel``/``MaternKernel``, or a callable ``batch_shape -> gpytorch kernel``)."""
    import gpytorch

    if isinstance(spec, type) and issubclass(spec, gpytorch.kernels.Kernel):
        base = spec(batch_shape=batch_shape)
    elif callable(spec) and not isinstance(spec, gpytorch.kernels.Kernel):
        base = spec(batch_shape)
        if not isinstance(base, gpytorch.kernels.Kernel):
            raise TypeError(f"a kernel factory must return a gpytorch kernel, got {type(base).__name__}.")
    else:
        raise TypeError("kernel must be a gpytorch kernel class (e.g. gpytorch.kernels.RBFKernel) or a "
                        f"callable batch_shape -> gpytorch kernel; got {spec!r:.80}.")
    return gpytorch.kernels.ScaleKernel(base, batch_shape=batch_shape)


def _gram(kernel, x1, x2=None):
    x2 = x1 if x2 is None else x2
    return kernel(x1.unsqueeze(-1), x2.unsqueeze(-1)).to_dense()


def _positive(raw, dtype):
    return torch.nn.functional.softplus(raw) + eps(dtype)


def _positive_inv(value):
    value = torch.as_tensor(value)
    return value + torch.log(-torch.expm1(-value))


# =========================================================================== results
@dataclass
class MixturePrediction:
    r"""A new task's prediction: the mixture :math:`\sum_k \tau_{*k} \mathcal N(\mu_k,
    V_k)` at the inputs ``t``.

    ``tau`` ``(K,)`` the membership probabilities; ``means`` ``(K, Q)`` and ``covariances``
    ``(K, Q, Q)`` per cluster; ``mean``/``variance`` ``(Q,)`` the mixture's moments;
    ``lower``/``upper`` the mixture's equal-tailed credible band at ``level`` (quantiles of the
    mixture itself, not mean ± z sd)."""

    t: torch.Tensor
    tau: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    level: float
    observed: Tuple[torch.Tensor, torch.Tensor]

    @property
    def mean(self) -> torch.Tensor:
        return (self.tau[:, None] * self.means).sum(0)

    @property
    def variance(self) -> torch.Tensor:
        v = self.covariances.diagonal(dim1=-2, dim2=-1)
        return (self.tau[:, None] * (v + self.means ** 2)).sum(0) - self.mean ** 2

    def quantile(self, q: float) -> torch.Tensor:
        """The mixture's marginal ``q``-quantile at each input (bisection on its CDF)."""
        sd = self.covariances.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().clamp_min(eps(self.means.dtype))
        lo = (self.means - 10 * sd).min(0).values
        hi = (self.means + 10 * sd).max(0).values
        normal = torch.distributions.Normal(self.means, sd)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            cdf = (self.tau[:, None] * normal.cdf(mid)).sum(0)
            lo, hi = torch.where(cdf < q, mid, lo), torch.where(cdf < q, hi, mid)
        return 0.5 * (lo + hi)

    @property
    def lower(self) -> torch.Tensor:
        return self.quantile((1 - self.level) / 2)

    @property
    def upper(self) -> torch.Tensor:
        return self.quantile((1 + self.level) / 2)

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """The mixture's marginal log density at values ``y`` ``(..., Q)`` (pointwise in t)."""
        sd = self.covariances.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        lp = torch.distributions.Normal(self.means, sd).log_prob(y.unsqueeze(-2))  # (..., K, Q)
        return torch.logsumexp(lp + self.tau.log()[:, None], -2)

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``num_samples`` joint sample paths ``(num_samples, Q)``: a cluster from ``tau``, then a
        path from its Gaussian."""
        num_samples = check_positive_int(num_samples, "num_samples")
        k = torch.multinomial(self.tau, num_samples, replacement=True, generator=generator)
        L = safe_cholesky(self.covariances)
        e = torch.randn(num_samples, self.means.shape[-1], dtype=self.means.dtype, device=self.means.device,
                        generator=generator)
        return self.means[k] + (L[k] @ e.unsqueeze(-1)).squeeze(-1)

    def plot(self, ax=None, components: bool = True, truth=None):
        """The mixture's mean and band, each cluster's mean (line width by tau) and the observed
        points; ``truth=(t, y)`` adds held-out points."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(7, 4))[1]
        t = self.t.detach().cpu().numpy()
        ax.fill_between(t, self.lower.cpu().numpy(), self.upper.cpu().numpy(), color="C0", alpha=0.25,
                        label=f"{int(round(100 * self.level))}% band (mixture)")
        ax.plot(t, self.mean.cpu().numpy(), color="C0", lw=2, label="mixture mean")
        if components:
            for k in range(self.tau.numel()):
                if float(self.tau[k]) > 1e-3:
                    ax.plot(t, self.means[k].cpu().numpy(), "--", color=f"C{k + 1}",
                            lw=0.5 + 2 * float(self.tau[k]), label=f"cluster {k} (tau={float(self.tau[k]):.2f})")
        to, yo = self.observed
        if to.numel():
            ax.plot(to.cpu().numpy(), yo.cpu().numpy(), "ko", ms=4, label="observed")
        if truth is not None:
            ax.plot(np.asarray(truth[0]), np.asarray(truth[1]), "kx", ms=5, label="held out")
        ax.set_xlabel("t")
        ax.set_ylabel("y")
        ax.legend(fontsize=7)
        return ax

    def plot_density(self, ax=None, num_y: int = 200):
        """A heatmap of the predictive density over (t, y)."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(7, 4))[1]
        lo, hi = float(self.quantile(0.001).min()), float(self.quantile(0.999).max())
        ys = torch.linspace(lo, hi, num_y, dtype=self.means.dtype, device=self.means.device)
        dens = self.log_density(ys[:, None].expand(num_y, self.t.numel())).exp()
        ax.pcolormesh(self.t.cpu().numpy(), ys.cpu().numpy(), dens.cpu().numpy(), shading="auto", cmap="magma")
        to, yo = self.observed
        if to.numel():
            ax.plot(to.cpu().numpy(), yo.cpu().numpy(), "wo", ms=3)
        ax.set_xlabel("t")
        ax.set_ylabel("y")
        return ax


@dataclass
class VEMResult:
    """What :meth:`MultiTaskGPMixture.fit_vem` returns: the ELBO per iteration, whether it
    converged, the iterations run and the training time (s)."""

    elbo: List[float]
    converged: bool
    num_iterations: int
    seconds: float


# =========================================================================== the model
class MultiTaskGPMixture(PyroModule):
    r"""Mixture of multi-task GPs (MagmaClust; :math:`K = 1` is Magma).  See the module
    docstring for the model, the variational EM and the prediction.

    :param int num_clusters: :math:`K`.
    :param kernel_cluster: the mean processes' kernel :math:`C_\gamma`: a gpytorch kernel class
        (default ``gpytorch.kernels.RBFKernel``) or a callable ``batch_shape -> kernel``; it is
        wrapped in a ``ScaleKernel`` (a variance).
    :param kernel_task: the tasks' kernel :math:`\Sigma_\theta` (the same forms).
    :param bool shared_hp_clusters: one :math:`\gamma` for all clusters (else one per cluster).
    :param bool shared_hp_tasks: one :math:`(\theta, \sigma)` for all tasks (else one per task).
    :param prior_mean: :math:`m_k`: ``"data"`` (default: the pooled mean of the training
        outputs, a constant), a number, a callable ``t -> m(t)``, or a sequence of :math:`K`
        of those (one per cluster).
    :param bool enumerate_assignments: in :meth:`model`, mark ``"z"`` for parallel enumeration
        (SVI with ``loss="enum"`` sums it out exactly); ``False`` leaves it a sampled discrete
        site (for ``gflownet_em``, or a guide that samples it).
    :param bool guide_assignments: :meth:`guide` also samples ``"z"`` from a per-task
        categorical :math:`q(Z_i) = \mathrm{Cat}(\tau_i)` (score-function gradients under
        ``svi``/``iwae``/``chi2_vis``; ``gflownet_em`` uses only the guide's ``"mu"``).  Default:
        ``not enumerate_assignments``.
    :param str name: the prefix of this module's parameters in Pyro's param store.
    """

    def __init__(self, num_clusters: int, kernel_cluster=None, kernel_task=None, shared_hp_clusters: bool = True,
                 shared_hp_tasks: bool = True, prior_mean="data", enumerate_assignments: bool = True,
                 guide_assignments: Optional[bool] = None, name: str = "gp_mixture"):
        super().__init__(name)
        warn_if_name_in_use(self, name)
        import gpytorch

        self.num_clusters = check_positive_int(num_clusters, "num_clusters")
        for flag, label in ((shared_hp_clusters, "shared_hp_clusters"), (shared_hp_tasks, "shared_hp_tasks"),
                            (enumerate_assignments, "enumerate_assignments")):
            if not isinstance(flag, bool):
                raise TypeError(f"{label} must be True or False, got {flag!r}.")
        self.shared_hp_clusters = shared_hp_clusters
        self.shared_hp_tasks = shared_hp_tasks
        self.enumerate_assignments = enumerate_assignments
        guide_assignments = (not enumerate_assignments) if guide_assignments is None else guide_assignments
        if not isinstance(guide_assignments, bool):
            raise TypeError(f"guide_assignments must be True, False or None, got {guide_assignments!r}.")
        if guide_assignments and enumerate_assignments:
            raise ValueError("guide_assignments=True samples z in the guide, which enumeration would sum out; "
                             "use enumerate_assignments=False with it.")
        self.guide_assignments = guide_assignments
        self.kernel_cluster_spec = kernel_cluster or gpytorch.kernels.RBFKernel
        self.kernel_task_spec = kernel_task or gpytorch.kernels.RBFKernel
        _make_kernel(self.kernel_cluster_spec, torch.Size())  # fail early on a bad kernel
        _make_kernel(self.kernel_task_spec, torch.Size())
        self._check_prior_mean(prior_mean)
        self.prior_mean = prior_mean
        self.hp: Optional[torch.nn.ModuleDict] = None  # built on the first data (sizes depend on M)
        self.tau: Optional[torch.Tensor] = None        # (M, K) training memberships
        self.train_data: Optional[TaskData] = None
        self._m0: Optional[float] = None

    # ------------------------------------------------------------------ hyperparameters
    def _check_prior_mean(self, pm):
        def ok(v):
            return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) or callable(v) \
                or (isinstance(v, str) and v == "data")
        if isinstance(pm, (list, tuple)):
            if len(pm) != self.num_clusters or not all(ok(v) for v in pm):
                raise ValueError(f"prior_mean as a sequence needs {self.num_clusters} entries (numbers, callables "
                                 f"or 'data'), got {pm!r:.80}.")
        elif not ok(pm):
            raise TypeError(f"prior_mean must be 'data', a finite number, a callable t -> m(t) or a sequence of "
                            f"{self.num_clusters} of those; got {pm!r:.80}.")

    @property
    def num_hyperparameters(self) -> int:
        """The free hyperparameters (kernel parameters and noise; not pi), as counted by V-BIC."""
        if self.hp is None:
            raise RuntimeError("The model has no hyperparameters yet: fit it (fit_vem) first.")
        return sum(p.numel() for n, p in self.hp.named_parameters() if not n.startswith("logits"))

    def _build(self, data: TaskData, init: Optional[dict] = None):
        """Create the hyperparameters for data like ``data`` (sizes, dtype, device), with
        data-driven starting values (or ``init``: ``cluster_variance``, ``cluster_lengthscale``,
        ``task_variance``, ``task_lengthscale``, ``noise``)."""
        K, M = self.num_clusters, data.num_tasks
        y, mask, t = data.y, data.mask, data.t
        dtype, device = y.dtype, y.device
        yv = y[mask]
        var = float(yv.var()) if yv.numel() > 1 else 1.0
        var = var if var > 0 else 1.0
        span = float(t[mask].max() - t[mask].min()) or 1.0
        # within-task spread (what the task process and the noise must explain)
        n = mask.sum(-1).clamp_min(1)
        mean_i = (y * mask).sum(-1) / n
        within = float((((y - mean_i[:, None]) * mask) ** 2).sum() / mask.sum().clamp_min(1))
        start = dict(cluster_variance=var, cluster_lengthscale=span / 8, task_variance=max(0.5 * within, 1e-3 * var),
                     task_lengthscale=span / 8, noise=max(0.1 * within, 1e-3 * var))
        start.update(init or {})
        kc = _make_kernel(self.kernel_cluster_spec, torch.Size([] if self.shared_hp_clusters else [K]))
        kt = _make_kernel(self.kernel_task_spec, torch.Size([] if self.shared_hp_tasks else [M]))
        kc, kt = kc.to(dtype=dtype, device=device), kt.to(dtype=dtype, device=device)
        with torch.no_grad():
            kc.outputscale = torch.full_like(kc.outputscale, start["cluster_variance"])
            kt.outputscale = torch.full_like(kt.outputscale, start["task_variance"])
            if hasattr(kc.base_kernel, "lengthscale") and kc.base_kernel.lengthscale is not None:
                kc.base_kernel.lengthscale = torch.full_like(kc.base_kernel.lengthscale, start["cluster_lengthscale"])
            if hasattr(kt.base_kernel, "lengthscale") and kt.base_kernel.lengthscale is not None:
                kt.base_kernel.lengthscale = torch.full_like(kt.base_kernel.lengthscale, start["task_lengthscale"])
        raw_noise = _positive_inv(torch.full((1 if self.shared_hp_tasks else M,), float(start["noise"]),
                                             dtype=dtype, device=device))
        self.hp = torch.nn.ModuleDict({"cluster": kc, "task": kt})
        self.hp.register_parameter("raw_noise", torch.nn.Parameter(raw_noise))
        self.hp.register_parameter("logits_pi", torch.nn.Parameter(torch.zeros(K, dtype=dtype, device=device)))
        self._m0 = float(yv.mean())
        self._num_tasks_built = M

    def _ensure_hp(self, data: TaskData):
        if self.hp is None:
            self._build(data)
            return
        if not self.shared_hp_tasks and data.num_tasks != self._num_tasks_built:
            raise ValueError(f"This model has one task hyperparameter set per training task ({self._num_tasks_built} "
                             f"tasks) but got {data.num_tasks} tasks; use predict() for new tasks, or "
                             "shared_hp_tasks=True.")

    @property
    def pi(self) -> torch.Tensor:
        """The mixing proportions ``(K,)``."""
        return torch.softmax(self.hp.logits_pi, -1)

    def noise(self) -> torch.Tensor:
        """The noise variances :math:`\\sigma_i^2` ``(1,)`` shared or ``(M,)``."""
        return _positive(self.hp.raw_noise, self.hp.raw_noise.dtype)

    def _prior_mean_values(self, grid: torch.Tensor) -> torch.Tensor:
        """``(K, P)`` prior means on ``grid``."""
        specs = self.prior_mean if isinstance(self.prior_mean, (list, tuple)) else [self.prior_mean] * self.num_clusters
        rows = []
        for s in specs:
            if isinstance(s, str):  # "data"
                rows.append(torch.full_like(grid, self._m0 if self._m0 is not None else 0.0))
            elif callable(s):
                v = torch.as_tensor(s(grid), dtype=grid.dtype, device=grid.device)
                if v.shape != grid.shape:
                    raise ValueError(f"prior_mean(t) returned shape {tuple(v.shape)} for t of shape {tuple(grid.shape)}.")
                rows.append(v)
            else:
                rows.append(torch.full_like(grid, float(s)))
        return torch.stack(rows)

    def _cluster_cov(self, grid):
        r"""Prior covariances of the mean processes on ``grid``: ``(P, P)`` with shared cluster
        hyperparameters, else ``(K, P, P)``.  A relative jitter of :math:`\sqrt{\epsilon}`
        (float64: 1.5e-8 of the variance) is part of the prior: an RBF Gram matrix on a fine grid
        is singular to working precision without it."""
        K, P = self.num_clusters, grid.numel()
        C = _gram(self.hp["cluster"], grid if self.shared_hp_clusters else grid.expand(K, P))
        jitter = eps(grid.dtype) ** 0.5 * C.diagonal(dim1=-2, dim2=-1).mean(-1)
        return C + jitter[..., None, None] * torch.eye(P, dtype=grid.dtype, device=grid.device)

    def _task_cov(self, t, mask, task_index=None):
        """Padded :math:`\\Psi_i` ``(M, N, N)``: identity on padding (its Cholesky factor too)."""
        kt = self.hp["task"]
        S = _gram(kt, t)  # (M, N, N) with batch (M,) or shared
        noise = self.noise()
        if task_index is not None and not self.shared_hp_tasks:
            noise = noise[task_index]
        noise = noise.expand(t.shape[0])
        pair = mask.unsqueeze(-1) & mask.unsqueeze(-2)
        eye = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
        Psi = torch.where(pair, S + noise[:, None, None] * eye, torch.zeros((), dtype=t.dtype, device=t.device))
        return Psi + torch.diag_embed((~mask).to(t.dtype))

    # ------------------------------------------------------------------ the VE-step
    def _statistics(self, data: TaskData, grid, idx, tau):
        """Per task the padded :math:`\\Psi_i^{-1}` and :math:`\\Psi_i^{-1} y_i`, and per cluster
        :math:`A_k` ``(K, P, P)``, :math:`s_k` ``(K, P)`` and :math:`c_k` ``(K,)``."""
        t, y, mask = data.t, data.y, data.mask
        M, N = t.shape
        P, K = grid.numel(), self.num_clusters
        Psi = self._task_cov(t, mask)
        L = safe_cholesky(Psi)
        Psi_inv = torch.cholesky_inverse(L)
        pair = mask.unsqueeze(-1) & mask.unsqueeze(-2)
        Psi_inv = torch.where(pair, Psi_inv, torch.zeros((), dtype=t.dtype, device=t.device))
        r = (Psi_inv @ y.unsqueeze(-1)).squeeze(-1)  # zero on padding (y is 0 there)
        flat = (idx.unsqueeze(-1) * P + idx.unsqueeze(-2)).reshape(-1)  # (M N N,)
        vals = (tau.transpose(0, 1)[:, :, None, None] * Psi_inv).reshape(K, -1)
        A = torch.zeros(K, P * P, dtype=t.dtype, device=t.device).index_add(1, flat, vals).reshape(K, P, P)
        s = torch.zeros(K, P, dtype=t.dtype, device=t.device).index_add(
            1, idx.reshape(-1), (tau.transpose(0, 1)[:, :, None] * r).reshape(K, -1))
        logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        n = mask.sum(-1).to(t.dtype)
        per_task = -0.5 * n * LOG_2PI - 0.5 * logdet - 0.5 * (y * r).sum(-1)  # (M,)
        c = tau.transpose(0, 1) @ per_task
        return dict(L_psi=L, Psi_inv=Psi_inv, A=A, s=s, c=c, per_task=per_task)

    def _factors(self, grid, stats):
        r"""What both forms of the optimal :math:`q(\mu)` start from: the prior mean ``m``
        ``(K, P)``, the prior's Cholesky factor ``Lc``, the Cholesky factor ``LB`` of
        :math:`B = I + L^\top A L` and :math:`v = s - A m`."""
        m = self._prior_mean_values(grid)
        Lc = safe_cholesky(self._cluster_cov(grid))
        A, s = stats["A"], stats["s"]
        B = torch.eye(grid.numel(), dtype=grid.dtype, device=grid.device) + Lc.transpose(-1, -2) @ A @ Lc
        LB = torch.linalg.cholesky(0.5 * (B + B.transpose(-1, -2)))
        v = s - (A @ m.unsqueeze(-1)).squeeze(-1)
        return m, Lc, LB, v

    def _hyper_posterior(self, grid, stats, need_kl=True):
        """``(m_hat (K, P), C_hat (K, P, P), log Z (K,), KL (K,) or None)`` without :math:`C^{-1}`."""
        m, Lc, LB, v = self._factors(grid, stats)
        A, s = stats["A"], stats["s"]
        W = torch.linalg.solve_triangular(LB, Lc.transpose(-1, -2), upper=False)  # LB^-1 L^T
        C_hat = W.transpose(-1, -2) @ W
        Wv = (W @ v.unsqueeze(-1)).squeeze(-1)
        m_hat = m + (W.transpose(-1, -2) @ Wv.unsqueeze(-1)).squeeze(-1)
        logdet_B = 2 * LB.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        mAm = (m * (A @ m.unsqueeze(-1)).squeeze(-1)).sum(-1)
        log_z = stats["c"] + (s * m).sum(-1) - 0.5 * mAm + 0.5 * Wv.pow(2).sum(-1) - 0.5 * logdet_B
        if not need_kl:
            return m_hat, C_hat, log_z, None
        # KL(q || p) = 1/2 [tr(B^-1) + |B^-1 L^T v|^2 - P + log det B]
        Binv = torch.cholesky_inverse(LB)
        u = (Binv @ (Lc.transpose(-1, -2) @ v.unsqueeze(-1))).squeeze(-1)
        kl = 0.5 * (Binv.diagonal(dim1=-2, dim2=-1).sum(-1) + u.pow(2).sum(-1) - grid.numel() + logdet_B)
        return m_hat, C_hat, log_z, kl

    def _whitened_posterior(self, grid, stats):
        r"""The optimal :math:`q(\mu_k)` in the prior's whitened coordinates: ``(a (K, P), S (K,
        P, P))`` with :math:`\hat m_k = m_k + L a_k`, :math:`\hat C_k = L S S^\top L^\top`
        (:math:`a = B^{-1} L^\top v`, :math:`S S^\top = B^{-1}`)."""
        _, Lc, LB, v = self._factors(grid, stats)
        a = torch.cholesky_solve((Lc.transpose(-1, -2) @ v.unsqueeze(-1)), LB).squeeze(-1)
        Binv = torch.cholesky_inverse(LB)
        return a, safe_cholesky(0.5 * (Binv + Binv.transpose(-1, -2)))

    def _expected_loglik(self, data: TaskData, idx, stats, m_hat, C_hat):
        r""":math:`E_{q(\mu_k)} \log \mathcal N(y_i; \mu_k(t_i), \Psi_i)` ``(M, K)``."""
        y, mask = data.y, data.mask
        Lp, Psi_inv = stats["L_psi"], stats["Psi_inv"]
        mk = m_hat[:, idx]                                    # (K, M, N)
        diff = torch.where(mask, y - mk, torch.zeros((), dtype=y.dtype, device=y.device))
        z = torch.linalg.solve_triangular(Lp, diff.unsqueeze(-1), upper=False).squeeze(-1)
        n = mask.sum(-1).to(y.dtype)
        logn = -0.5 * z.pow(2).sum(-1) - Lp.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * n * LOG_2PI
        Ck = C_hat[:, idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (K, M, N, N)
        tr = (Psi_inv * Ck).sum((-1, -2))
        return (logn - 0.5 * tr).transpose(0, 1)

    def _elbo(self, data, grid, idx, tau, stats=None, need_kl=False):
        """The full ELBO at the optimal q(mu) for ``tau`` and the current hyperparameters (the
        collapsed bound), with its pieces."""
        stats = stats or self._statistics(data, grid, idx, tau)
        m_hat, C_hat, log_z, kl = self._hyper_posterior(grid, stats, need_kl=need_kl)
        log_pi = torch.log_softmax(self.hp.logits_pi, -1)
        entropy_z = -torch.special.xlogy(tau, tau).sum()
        assign = (tau * log_pi).sum() + entropy_z
        return log_z.sum() + assign, dict(m_hat=m_hat, C_hat=C_hat, kl=kl, stats=stats, assign=assign)

    def explicit_elbo(self, data=None, tau=None) -> float:
        r"""The ELBO written term by term, :math:`\sum_{ik} \tau_{ik} E_q \log \mathcal N(y_i;
        \mu_k(t_i), \Psi_i) - \sum_k \mathrm{KL}(q(\mu_k) \| p(\mu_k)) + \sum_{ik} \tau_{ik}
        (\log \pi_k - \log \tau_{ik})` at the optimal :math:`q(\mu)` (a check on the collapsed
        form that :meth:`fit_vem` maximizes: the two are equal)."""
        data = self.train_data if data is None else as_tasks(data)
        tau = self.tau if tau is None else tau
        grid, idx = _grid(data.t, data.mask)
        with torch.no_grad():
            _, parts = self._elbo(data, grid, idx, tau, need_kl=True)
            ell = self._expected_loglik(data, idx, parts["stats"], parts["m_hat"], parts["C_hat"])
            return float((tau * ell).sum() - parts["kl"].sum() + parts["assign"])

    def _update_tau(self, data, idx, parts):
        ell = self._expected_loglik(data, idx, parts["stats"], parts["m_hat"], parts["C_hat"])
        logits = torch.log_softmax(self.hp.logits_pi, -1) + ell
        return torch.softmax(logits, -1)

    # ------------------------------------------------------------------ fitting
    def _kmeans_init(self, data: TaskData, seed: int, grid: Optional[torch.Tensor] = None):
        """k-means (50 starts) on the curves linearly interpolated to 20 common inputs: the
        one-hot memberships ``(M, K)``, and with ``grid`` also the clusters' mean curves on it."""
        from sklearn.cluster import KMeans

        t, y, mask = (v.detach().cpu().numpy() for v in (data.t, data.y, data.mask))
        lo, hi = t[mask].min(), t[mask].max()
        common = np.linspace(lo, hi, 20) if grid is None else grid.detach().cpu().numpy()
        X = np.stack([np.interp(common, t[i][mask[i]], y[i][mask[i]]) for i in range(t.shape[0])])
        K = self.num_clusters
        labels = KMeans(K, n_init=50, random_state=seed).fit_predict(X) if K > 1 else np.zeros(len(X), int)
        tau = torch.zeros(t.shape[0], K, dtype=data.y.dtype, device=data.y.device)
        tau[torch.arange(t.shape[0]), torch.as_tensor(labels, device=tau.device)] = 1.0
        if grid is None:
            return tau
        centres = np.stack([X[labels == k].mean(0) for k in range(K)])
        return tau, torch.as_tensor(centres, dtype=data.y.dtype, device=data.y.device)

    def _lbfgs(self, objective, params, max_iter):
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            loss = -objective()
            if not torch.isfinite(loss):
                raise FloatingPointError
            loss.backward()
            return loss
        opt.step(closure)

    def fit_vem(self, data, num_steps: int = 50, tol: float = 1e-6, hp_steps: int = 20, init_tau=None,
                seed: int = 0, progress: Optional[bool] = None, **data_kw) -> VEMResult:
        r"""Fit by variational EM (the module docstring gives the updates).

        :param data: the training tasks (anything :func:`as_tasks` accepts; ``task=``, ``t=``,
            ``y=`` name a long table's columns).
        :param int num_steps: at most this many EM iterations (hyperparameters, then
            :math:`\tau`, then :math:`\pi`).
        :param float tol: stop when the ELBO rises by less than ``tol * |ELBO|``.
        :param int hp_steps: L-BFGS iterations per hyperparameter update.
        :param init_tau: ``(M, K)`` starting memberships (default: k-means, 50 starts).
        :returns: :class:`VEMResult` (the ELBO per iteration).
        """
        from ..inference.callbacks import progress_bar_class, progress_default

        data = as_tasks(data, **data_kw)
        num_steps = check_positive_int(num_steps, "num_steps")
        hp_steps = check_positive_int(hp_steps, "hp_steps")
        M, K = data.num_tasks, self.num_clusters
        if K > M:
            raise ValueError(f"num_clusters={K} is larger than the number of tasks ({M}); use at most {M} clusters.")
        if self.hp is None or (not self.shared_hp_tasks and self._num_tasks_built != M):
            self._build(data)
        grid, idx = _grid(data.t, data.mask)
        if init_tau is not None:
            tau = torch.as_tensor(init_tau, dtype=data.y.dtype, device=data.y.device)
            if tau.shape != (M, K) or not bool(torch.isfinite(tau).all()) or bool((tau < 0).any()):
                raise ValueError(f"init_tau must be non-negative with shape ({M}, {K}).")
            tau = tau / tau.sum(-1, keepdim=True)
        else:
            tau = self._kmeans_init(data, seed) if K > 1 else torch.ones(M, 1, dtype=data.y.dtype, device=data.y.device)
        with torch.no_grad():
            self.hp.logits_pi.copy_(tau.mean(0).clamp_min(eps(tau.dtype)).log())
        params = [p for n, p in self.hp.named_parameters() if not n.startswith("logits")]
        history: List[float] = []
        start = time.perf_counter()
        converged = False
        show = progress_default() if progress is None else progress
        bar = progress_bar_class()(total=num_steps, desc="VEM", disable=not show, leave=False)
        it = 0
        try:
            for it in range(1, num_steps + 1):
                # 1. hyperparameters and q(mu) jointly, tau fixed (kept only if the ELBO rose); the
                #    ELBO before the step is the last iteration's (same hyperparameters, tau and pi)
                if history:
                    before = history[-1]
                else:
                    with torch.no_grad():
                        before = float(self._elbo(data, grid, idx, tau)[0])
                saved = [p.detach().clone() for p in params]
                parts = None
                try:
                    self._lbfgs(lambda: self._elbo(data, grid, idx, tau)[0], params, hp_steps)
                    with torch.no_grad():
                        after, parts = self._elbo(data, grid, idx, tau)
                    if not math.isfinite(float(after)) or float(after) < before:
                        raise FloatingPointError
                except (FloatingPointError, ValueError, RuntimeError):  # a failed line search: keep the old values
                    parts = None
                    with torch.no_grad():
                        for p, v in zip(params, saved):
                            p.copy_(v)
                # 2. tau given q(mu); 3. pi given tau
                with torch.no_grad():
                    if parts is None:
                        _, parts = self._elbo(data, grid, idx, tau)
                    if K > 1:
                        tau = self._update_tau(data, idx, parts)
                        self.hp.logits_pi.copy_(tau.mean(0).clamp_min(eps(tau.dtype)).log())
                    elbo = float(self._elbo(data, grid, idx, tau)[0])
                if history and elbo < history[-1] - 1e-8 * abs(history[-1]):
                    warnings.warn(f"The ELBO decreased at VEM iteration {it} ({history[-1]:.6f} -> {elbo:.6f}); "
                                  "the fit may be numerically unstable (try float64 or rescale t and y).",
                                  RuntimeWarning, stacklevel=2)
                history.append(elbo)
                bar.update(1)
                bar.set_postfix(elbo=f"{elbo:.3f}")
                if len(history) > 1 and abs(history[-1] - history[-2]) < tol * abs(history[-2]):
                    converged = True
                    break
        finally:
            bar.close()
        self.tau = tau.detach()
        self.train_data = data
        if not converged:
            warnings.warn(f"VEM did not converge in {num_steps} iterations (last ELBO change "
                          f"{history[-1] - history[-2] if len(history) > 1 else float('nan'):.3g}); "
                          "raise num_steps.", RuntimeWarning, stacklevel=2)
        return VEMResult(history, converged, it, time.perf_counter() - start)

    @property
    def elbo(self) -> float:
        """The ELBO of the fitted model on its training data."""
        self._require_fit()
        grid, idx = _grid(self.train_data.t, self.train_data.mask)
        with torch.no_grad():
            return float(self._elbo(self.train_data, grid, idx, self.tau)[0])

    def vbic(self) -> float:
        r"""Variational BIC: ELBO :math:`- \tfrac12 (\#\text{hyperparameters} + K - 1) \log M`."""
        self._require_fit()
        M = self.train_data.num_tasks
        return self.elbo - 0.5 * (self.num_hyperparameters + self.num_clusters - 1) * math.log(M)

    def _require_fit(self):
        if self.tau is None:
            raise RuntimeError("The model is not fitted: call fit_vem(data) first.")

    def hyper_posterior(self, grid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(grid, m_hat (K, P), C_hat (K, P, P))``: each cluster's mean process given the
        training tasks, on the union grid of their inputs and ``grid`` (extra inputs)."""
        self._require_fit()
        d = self.train_data
        extra = () if grid is None else (torch.as_tensor(grid, dtype=d.t.dtype, device=d.t.device),)
        g, idx = _grid(d.t, d.mask, *extra)
        with torch.no_grad():
            stats = self._statistics(d, g, idx, self.tau)
            m_hat, C_hat, _, _ = self._hyper_posterior(g, stats)
        return g, m_hat, C_hat

    @property
    def assignments(self) -> torch.Tensor:
        """The training tasks' most probable clusters ``(M,)``."""
        self._require_fit()
        return self.tau.argmax(-1)

    # ------------------------------------------------------------------ prediction
    def _new_task_hp(self, t_obs, y_obs, m_hat_obs, C_hat_obs, steps=50):
        """Task kernel and noise for a new task: the shared ones, or (separate task
        hyperparameters) fitted to its points by maximizing the mixture's marginal likelihood
        (starting from the training tasks' mean), or the mean alone for fewer than 3 points."""
        import copy

        kt = self.hp["task"]
        if self.shared_hp_tasks:
            return kt, self.noise()[0]
        new = _make_kernel(self.kernel_task_spec, torch.Size()).to(dtype=t_obs.dtype, device=t_obs.device)
        with torch.no_grad():
            for (n, p_new), (_, p_old) in zip(new.named_parameters(), kt.named_parameters()):
                p_new.copy_(p_old.mean(0).reshape(p_new.shape))
        raw_noise = torch.nn.Parameter(self.hp.raw_noise.detach().mean().reshape(()).clone())
        if t_obs.numel() >= 3:
            log_pi = torch.log_softmax(self.hp.logits_pi.detach(), -1)
            eye = torch.eye(t_obs.numel(), dtype=t_obs.dtype, device=t_obs.device)

            def objective():
                G = _gram(new, t_obs) + _positive(raw_noise, t_obs.dtype) * eye + C_hat_obs
                L = safe_cholesky(G)
                lp = torch.distributions.MultivariateNormal(m_hat_obs, scale_tril=L).log_prob(y_obs)
                return torch.logsumexp(lp + log_pi, -1)
            saved = copy.deepcopy(new.state_dict()), raw_noise.detach().clone()
            try:
                self._lbfgs(objective, list(new.parameters()) + [raw_noise], steps)
                if not math.isfinite(float(objective())):
                    raise FloatingPointError
            except (FloatingPointError, ValueError, RuntimeError):
                new.load_state_dict(saved[0])
                with torch.no_grad():
                    raw_noise.copy_(saved[1])
        return new, _positive(raw_noise.detach(), t_obs.dtype)

    def predict(self, t_new=None, y_new=None, t_pred=None, level: float = 0.95, include_noise: bool = True) -> MixturePrediction:
        r"""Predict a new task at ``t_pred`` from its observed points ``(t_new, y_new)`` (none,
        one or many: with none the prediction is the prior mixture with :math:`\tau_* = \pi`).

        Returns a :class:`MixturePrediction` (memberships, per-cluster and mixture moments,
        credible band at ``level``, ``sample``, ``plot``, ``plot_density``).  ``include_noise``:
        predict noisy observations (default) rather than the latent curve."""
        self._require_fit()
        d = self.train_data
        dtype, device = d.t.dtype, d.t.device
        t_new = torch.zeros(0, dtype=dtype, device=device) if t_new is None else _as_1d(t_new, "t_new", dtype, device)
        y_new = torch.zeros(0, dtype=dtype, device=device) if y_new is None else _as_1d(y_new, "y_new", dtype, device)
        if t_pred is None:
            raise ValueError("t_pred (the inputs to predict at) is required.")
        t_pred = _as_1d(t_pred, "t_pred", dtype, device)
        if t_new.shape != y_new.shape:
            raise ValueError(f"t_new has {t_new.numel()} points but y_new has {y_new.numel()}; they must match.")
        if t_pred.numel() == 0:
            raise ValueError("t_pred is empty.")
        for v, name in ((t_new, "t_new"), (y_new, "y_new"), (t_pred, "t_pred")):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name} has NaN or infinite values.")
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level!r}.")
        with torch.no_grad():
            grid, m_hat, C_hat = self.hyper_posterior(torch.cat([t_new, t_pred]))
            io = torch.searchsorted(grid, t_new)
            ip = torch.searchsorted(grid, t_pred)
            log_pi = torch.log_softmax(self.hp.logits_pi, -1)
        kt, noise = self._new_task_hp(t_new, y_new, m_hat[:, io], C_hat[:, io][:, :, io])
        with torch.no_grad():
            allt = torch.cat([t_new, t_pred])
            ia = torch.cat([io, ip])
            no = t_new.numel()
            G = _gram(kt, allt) + C_hat[:, ia][:, :, ia]  # (K, n+Q, n+Q)
            eye_o = torch.eye(no, dtype=dtype, device=device)
            mean_a = m_hat[:, ia]
            if include_noise:
                G[:, no:, no:] = G[:, no:, no:] + noise * torch.eye(t_pred.numel(), dtype=dtype, device=device)
            if no:
                Goo = G[:, :no, :no] + noise * eye_o
                Lo = safe_cholesky(Goo)
                lp = torch.distributions.MultivariateNormal(mean_a[:, :no], scale_tril=Lo).log_prob(y_new)
                tau = torch.softmax(lp + log_pi, -1)
                Gpo = G[:, no:, :no]
                sol = torch.cholesky_solve((y_new - mean_a[:, :no]).unsqueeze(-1), Lo)
                means = mean_a[:, no:] + (Gpo @ sol).squeeze(-1)
                V = torch.linalg.solve_triangular(Lo, Gpo.transpose(-1, -2), upper=False)
                cov = G[:, no:, no:] - V.transpose(-1, -2) @ V
            else:
                tau = log_pi.exp()
                means, cov = mean_a, G
            cov = 0.5 * (cov + cov.transpose(-1, -2))
        return MixturePrediction(t_pred, tau, means, cov, float(level), (t_new, y_new))

    # ------------------------------------------------------------------ Pyro programs
    def _register_hp(self):
        """Register the hyperparameters in Pyro's param store as this module's (the module's
        tensors are the store's, so an optimizer stepping one steps the other)."""
        store = pyro.get_param_store()
        for n, p in self.hp.named_parameters():
            full = f"{self._pyro_name}.hp.{n}"
            if full in store and store[full].unconstrained() is not p:
                del store[full]
            pyro.param(full, p)

    def _program_data(self, t, y, mask):
        if not (torch.is_tensor(t) and torch.is_tensor(y)):
            raise TypeError("model/guide take padded tensors (t, y, mask): build them with "
                            "MultiTaskGPMixture.pad(data) (or as_tasks(data).tensors()).")
        if t.dim() != 2 or t.shape != y.shape:
            raise ValueError(f"t and y must be padded (M, N) tensors of one shape; got {tuple(t.shape)} and "
                             f"{tuple(y.shape)}.")
        mask = torch.ones_like(t, dtype=torch.bool) if mask is None else mask.bool()
        if mask.shape != t.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, t has {tuple(t.shape)}.")
        return TaskData(t, y, mask, list(range(t.shape[0])))

    @staticmethod
    def pad(data, **kw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, y, mask)`` padded tensors for :meth:`model`/:meth:`guide` from anything
        :func:`as_tasks` accepts."""
        return as_tasks(data, **kw).tensors()

    def model(self, t, y, mask=None):
        r"""The generative model as a Pyro program over padded tasks ``t``, ``y``, ``mask``
        ``(M, N)``: ``"mu"`` ``(K, P)`` the mean processes on the union grid, ``"z"`` the
        assignments in the plate ``"tasks"``, ``"y"`` the observed curves."""
        data = self._program_data(t, y, mask)
        self._ensure_hp(data)
        self._register_hp()
        grid, idx = _grid(data.t, data.mask)
        C = self._cluster_cov(grid)
        m = self._prior_mean_values(grid)
        L = safe_cholesky(C).expand(m.shape + m.shape[-1:])
        mu = pyro.sample("mu", dist.MultivariateNormal(m, scale_tril=L).to_event(1))
        L_psi = safe_cholesky(self._task_cov(data.t, data.mask))
        infer = {"enumerate": "parallel"} if self.enumerate_assignments else {}
        with pyro.plate("tasks", data.num_tasks, dim=-1):
            z = pyro.sample("z", dist.Categorical(self.pi), infer=infer)
            loc = Vindex(mu)[..., z, :]  # (..., M, P)
            shape = torch.broadcast_shapes(loc.shape[:-1], idx.shape[:-1])
            loc_obs = loc.expand(shape + loc.shape[-1:]).gather(-1, idx.expand(shape + idx.shape[-1:]))
            pyro.sample("y", PaddedMultivariateNormal(loc_obs, L_psi, data.mask), obs=data.y)

    def guide(self, t, y, mask=None):
        r"""A full-rank Gaussian per cluster over its mean process on the union grid, in the
        prior's whitened coordinates (as GPyTorch's whitened variational strategy):
        :math:`\mu_k = m_k + L_k (a_k + S_k \epsilon)`, :math:`C_k = L_k L_k^\top`, so
        :math:`q(\mu_k) = \mathcal N(m_k + L_k a_k, L_k S_k S_k^\top L_k^\top)` stays inside the
        prior's support however ill-conditioned :math:`C_k` is (an RBF kernel on a fine grid).
        Initialized at the optimal :math:`q(\mu)` of the VE-step for the fitted memberships (or,
        before a fit, for k-means memberships: distinct clusters break the symmetry that a start
        at the prior would keep).  ``"z"`` is left to enumeration or to gflownet_em unless
        ``guide_assignments``."""
        data = self._program_data(t, y, mask)
        self._ensure_hp(data)
        grid, idx = _grid(data.t, data.mask)
        K, P = self.num_clusters, grid.numel()
        name = self._pyro_name
        store = pyro.get_param_store()
        start = None
        if f"{name}.mu_whitened_loc" not in store or store[f"{name}.mu_whitened_loc"].shape != (K, P):
            with torch.no_grad():
                fitted = self.tau is not None and self.tau.shape == (data.num_tasks, K)
                tau = self.tau if fitted else self._kmeans_init(data, 0)
                start = self._whitened_posterior(grid, self._statistics(data, grid, idx, tau))
        a = pyro.param(f"{name}.mu_whitened_loc", lambda: start[0].clone())
        S = pyro.param(f"{name}.mu_whitened_scale_tril", lambda: start[1].clone(),
                       constraint=constraints.lower_cholesky)
        L = safe_cholesky(self._cluster_cov(grid)).expand(K, P, P)
        loc = self._prior_mean_values(grid) + (L @ a.unsqueeze(-1)).squeeze(-1)
        pyro.sample("mu", dist.MultivariateNormal(loc, scale_tril=L @ S).to_event(1))
        if self.guide_assignments:
            M = data.num_tasks
            fitted = self.tau is not None and self.tau.shape == (M, K)
            logits = pyro.param(f"{name}.z_logits", lambda: (self.tau.clamp_min(1e-3).log() if fitted else
                                                               data.y.new_zeros(M, K)))
            with pyro.plate("tasks", M, dim=-1):
                pyro.sample("z", dist.Categorical(logits=logits))

    def guide_mean_processes(self, t, y, mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(grid, mean (K, P))``: the guide's current mean of each cluster's mean process (after
        fitting the Pyro program with a backend), on the union grid of the data."""
        data = self._program_data(t, y, mask)
        grid, _ = _grid(data.t, data.mask)
        store = pyro.get_param_store()
        key = f"{self._pyro_name}.mu_whitened_loc"
        if key not in store:
            raise RuntimeError("The guide has not run yet: fit the model/guide pair with a backend first.")
        with torch.no_grad():
            L = safe_cholesky(self._cluster_cov(grid))
            return grid, self._prior_mean_values(grid) + (L @ store[key].unsqueeze(-1)).squeeze(-1)

    def memberships(self, t, y, mask=None, mu=None) -> torch.Tensor:
        r"""``(M, K)``: :math:`p(Z_i = k \mid y_i, \mu) \propto \pi_k \mathcal N(y_i;
        \mu_k(t_i), \Psi_i)` for mean processes ``mu`` ``(K, P)`` on the data's union grid
        (default: the guide's mean, :meth:`guide_mean_processes`)."""
        data = self._program_data(t, y, mask)
        grid, idx = _grid(data.t, data.mask)
        if mu is None:
            mu = self.guide_mean_processes(t, y, mask)[1]
        if mu.shape != (self.num_clusters, grid.numel()):
            raise ValueError(f"mu must have shape ({self.num_clusters}, {grid.numel()}), got {tuple(mu.shape)}.")
        with torch.no_grad():
            L = safe_cholesky(self._task_cov(data.t, data.mask))
            lp = PaddedMultivariateNormal(mu[:, idx], L, data.mask).log_prob(data.y)  # (K, M)
            return torch.softmax(lp + torch.log_softmax(self.hp.logits_pi, -1)[:, None], 0).transpose(0, 1)

    # ------------------------------------------------------------------ simulation
    @staticmethod
    def simulate(num_tasks: int = 50, num_points: int = 30, num_clusters: int = 3, grid=None,
                 shared_hp_tasks: bool = False, seed: int = 0, dtype=torch.float64):
        r"""Data by the paper's scheme (Leroy et al. 2023, Sec. 6; MagmaClustR's ``simu_db``):
        on the grid ``0, 0.05, ..., 10`` each cluster's mean process is a draw of
        :math:`\mathcal{GP}(a t + b, C_\gamma)` with :math:`a \sim U[-2, 2]`,
        :math:`b \sim U[20, 30]` and an RBF kernel of variance :math:`e^{U[4, 5]}` and squared
        lengthscale :math:`e^{U[0, 1]}`; each task picks a cluster uniformly, ``num_points``
        inputs of the grid at random, and adds an RBF task process (variance
        :math:`e^{U[1, 2]}`, squared lengthscale :math:`e^{U[0, 1]}`, one draw per task unless
        ``shared_hp_tasks``) and noise of variance :math:`U[0, 0.2]`.

        Returns ``(tasks, truth)``: a list of ``(t_i, y_i)`` and a dict with ``assignments``
        ``(M,)``, ``grid``, ``mean_processes`` ``(K, P)`` and each task's ``curve`` (noise-free
        ``y_i`` on the whole grid, for held-out checks)."""
        num_tasks = check_positive_int(num_tasks, "num_tasks")
        num_points = check_positive_int(num_points, "num_points")
        num_clusters = check_positive_int(num_clusters, "num_clusters")
        g = torch.Generator().manual_seed(int(seed))
        grid = torch.arange(0, 10.0001, 0.05, dtype=dtype) if grid is None else torch.as_tensor(grid, dtype=dtype)
        P = grid.numel()
        if num_points > P:
            raise ValueError(f"num_points={num_points} exceeds the grid's {P} points.")

        def u(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)

        def rbf(var, ell2):
            d2 = (grid[:, None] - grid[None, :]) ** 2
            return var * torch.exp(-0.5 * d2 / ell2)

        def draw(mean, cov):
            L = safe_cholesky(cov + 1e-8 * cov.diagonal().mean() * torch.eye(P, dtype=dtype))
            return mean + L @ torch.randn(P, generator=g, dtype=dtype)
        mus = torch.stack([draw(u(-2, 2, 1) * grid + u(20, 30, 1), rbf(math.exp(float(u(4, 5, 1))),
                                                                          math.exp(float(u(0, 1, 1)))))
                           for _ in range(num_clusters)])
        z = torch.randint(num_clusters, (num_tasks,), generator=g)
        shared = (math.exp(float(u(1, 2, 1))), math.exp(float(u(0, 1, 1))), float(u(0, 0.2, 1)))
        tasks, curves, noises = [], [], []
        for i in range(num_tasks):
            v, ell2, s2 = shared if shared_hp_tasks else (math.exp(float(u(1, 2, 1))), math.exp(float(u(0, 1, 1))),
                                                          float(u(0, 0.2, 1)))
            curve = draw(mus[z[i]], rbf(v, ell2))
            pick = torch.sort(torch.randperm(P, generator=g)[:num_points]).values
            y = curve[pick] + math.sqrt(s2) * torch.randn(num_points, generator=g, dtype=dtype)
            tasks.append((grid[pick], y))
            curves.append(curve)
            noises.append(s2)
        return tasks, {"assignments": z, "grid": grid, "mean_processes": mus, "curves": torch.stack(curves),
                       "noise": torch.tensor(noises, dtype=dtype)}

    # ------------------------------------------------------------------ plots
    def plot_clusters(self, ax=None, band: float = 0.95):
        """The training curves coloured by their most probable cluster, with each cluster's
        mean process and its ``band`` credible band (the hyper-posterior)."""
        import matplotlib.pyplot as plt

        self._require_fit()
        ax = ax or plt.subplots(figsize=(8, 4.5))[1]
        d = self.train_data
        lab = self.assignments.cpu().numpy()
        for i in range(d.num_tasks):
            ti, yi = d.task(i)
            ax.plot(ti.cpu().numpy(), yi.cpu().numpy(), "-", color=f"C{lab[i] % 10}", alpha=0.35, lw=0.8)
        g, m_hat, C_hat = self.hyper_posterior()
        z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + band) / 2)))
        sd = C_hat.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        gn = g.cpu().numpy()
        for k in range(self.num_clusters):
            ax.plot(gn, m_hat[k].cpu().numpy(), color=f"C{k % 10}", lw=2.5, label=f"cluster {k} (pi={float(self.pi[k]):.2f})")
            ax.fill_between(gn, (m_hat[k] - z * sd[k]).cpu().numpy(), (m_hat[k] + z * sd[k]).cpu().numpy(),
                            color=f"C{k % 10}", alpha=0.2)
        ax.set_xlabel("t")
        ax.set_ylabel("y")
        ax.legend(fontsize=8)
        return ax


# =========================================================================== model selection
def select_num_clusters(data, candidates: Sequence[int] = range(1, 8), seed: int = 0, num_steps: int = 50,
                        **model_kw):
    """Fit a :class:`MultiTaskGPMixture` for each ``K`` in ``candidates`` and score it by the
    variational BIC (ELBO - (#hyperparameters + K - 1) log(M) / 2).

    Returns ``(table, best)``: a pandas DataFrame with columns ``K``, ``elbo``,
    ``num_hyperparameters``, ``vbic``, ``seconds`` (one row per candidate) and the fitted model
    with the largest V-BIC.  ``model_kw`` go to the constructor (kernels, hypotheses)."""
    import pandas as pd

    data = as_tasks(data)
    ks = [check_positive_int(k, "candidates entry") for k in candidates]
    if not ks:
        raise ValueError("candidates is empty.")
    too_many = [k for k in ks if k > data.num_tasks]
    if too_many:
        raise ValueError(f"candidates {too_many} exceed the number of tasks ({data.num_tasks}).")
    rows, best, best_score = [], None, -math.inf
    for k in ks:
        mix = MultiTaskGPMixture(k, **model_kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = mix.fit_vem(data, num_steps=num_steps, seed=seed, progress=False)
        score = mix.vbic()
        rows.append({"K": k, "elbo": res.elbo[-1], "num_hyperparameters": mix.num_hyperparameters,
                     "vbic": score, "converged": res.converged, "seconds": res.seconds})
        if score > best_score:
            best, best_score = mix, score
    return pd.DataFrame(rows), best


@register_model("gp_mixture")
def _matrix_case():
    tasks, _ = MultiTaskGPMixture.simulate(num_tasks=6, num_points=4, num_clusters=2,
                                           grid=torch.linspace(0, 10, 12, dtype=torch.float32), seed=0,
                                           dtype=torch.float32)
    data = as_tasks(tasks, dtype=torch.float32)
    return MultiTaskGPMixture(2, enumerate_assignments=False, name="matrix_gp_mixture"), data.tensors()
