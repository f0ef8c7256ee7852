r"""Gaussian-process factor analysis (GPFA) and its relatives.

Model (Yu, Cunningham, Santhanam, Ryu, Shenoy & Sahani 2009).  For each trial, at time points
:math:`t_1 < \dots < t_T` (equal or unequal numbers per trial, irregular spacing allowed),

.. math::

    x_i(\cdot) \sim \mathcal{GP}\big(0,\ (1-\epsilon)\,k_{\tau_i}(t, t') + \epsilon\,\delta_{tt'}\big),
    \quad i = 1..q, \qquad
    y_t \mid x_t \sim \mathcal N(C x_t + d,\ R), \quad R = \mathrm{diag}(r_1..r_D),

with :math:`k` an RBF (Yu et al.'s choice, :math:`k = \exp(-(t-t')^2 / 2\tau^2)`) or Matérn
kernel of timescale :math:`\tau_i`, unit prior variance (the scale lives in :math:`C`) and a
small fixed GP noise variance :math:`\epsilon` (``1e-3``).  ``likelihood="poisson"`` replaces
the Gaussian observation by :math:`y_{tj} \sim \mathrm{Poisson}(g(c_j^\top x_t + d_j))` with
:math:`g = \exp` or softplus (spike counts).

**Exact EM** (:meth:`GPFA.fit_em`, Gaussian observations).  The E-step is closed form.  With
:math:`K = \mathrm{blockdiag}(K_1..K_q) = LL^\top` over the :math:`qT` stacked latents,
:math:`M = C^\top R^{-1} C` and :math:`h = (I_T \otimes C^\top R^{-1})(y - d)`,

.. math::

    B = I + L^\top (M \otimes I_T) L, \qquad
    \Sigma_{x\mid y} = L B^{-1} L^\top, \qquad \mu_{x\mid y} = \Sigma_{x\mid y} h,

    \log p(y) = -\tfrac12\Big[(y-d)^\top R^{-1}(y-d) - h^\top \mu_{x\mid y}
        + T \log|2\pi R| + \log|B|\Big].

:math:`\Sigma` and :math:`\log|B|` depend only on the time grid, so trials are grouped by
length and grid: one batched Cholesky per length over the distinct grids, the trials' means
as multiple right-hand sides.  The M-step is closed form in :math:`(C, d)` (a joint linear
regression on :math:`[\mathbb E x_t, 1]`) and in :math:`R` (floored at ``min_var_frac`` times
each neuron's variance), and takes a few L-BFGS steps on :math:`\log\tau` of the expected
complete-data log-likelihood :math:`\sum_i -\tfrac12[\mathrm{tr}(K_i^{-1}\mathbb E x_i x_i^\top)
+ \log|K_i|]` (Yu et al. 2009, section 2 and appendix).  The exact marginal log-likelihood is
tracked every iteration and never decreases.

**Linear-time form** (``method="kalman"``, Matérn kernels :math:`\nu \in \{1/2, 3/2, 5/2\}`).
A Matérn GP is the first coordinate of a linear SDE :math:`\dot s = F s + L w` (Hartikainen &
Särkkä 2010); between time points :math:`s_{t} = A_t s_{t-1} + q_t`,
:math:`A_t = e^{F\Delta_t}`, :math:`Q_t = P_\infty - A_t P_\infty A_t^\top`.  With the nugget
:math:`x_t = H s_t + \sqrt\epsilon\, w_t` the observations enter only through the
:math:`q`-dimensional pseudo-observation :math:`z_t = M^{-1} h_t` with noise
:math:`M^{-1} + \epsilon I`, because
:math:`\mathcal N(y_t \mid Cx_t + d, R) = \mathcal N(z_t \mid x_t, M^{-1})\,c(y_t)`.  A Kalman
filter and RTS smoother over the joint state of all latents (batched over trials; the
covariance recursions are shared by the trials of one grid) give the same posterior and the
same :math:`\log p(y)` as the dense form in :math:`O(T q^3 m^3)` instead of
:math:`O(T^3 q^3)`; EM then treats the state path as the complete data, and the timescale
M-step uses the smoothed pairwise moments :math:`\mathbb E[s_t s_{t-1}^\top]` (the
state-space EM of the cvHM line of work, Dowling, Zhao & Park 2023).

**Other parts.** :meth:`GPFA.transform` returns posterior means and covariances, the
orthonormalized latents :math:`\tilde x = S V^\top x` from :math:`C = U S V^\top`, and
:meth:`GPFA.leave_neuron_out_error` Yu et al.'s model-selection criterion (each neuron
predicted from the others' posterior).  ``model``/``guide`` make GPFA an ordinary Pyro program
for every backend; the guide is a structured Gaussian per trial and latent (mean and full
Cholesky factor over the trial's time points), which with ``likelihood="poisson"`` is the
variational Poisson GPFA fitted by SVI.  :class:`SharedGPFA` shares the latent trajectories
between subjects, each with its own :math:`(C_s, d_s, R_s)` (S-GPFA), fitted by the same EM.

References:

1. Yu, Cunningham, Santhanam, Ryu, Shenoy, Sahani. *Gaussian-process factor analysis for
   low-dimensional single-trial analysis of neural population activity*. J. Neurophysiol. 2009.
2. Hartikainen, Särkkä. *Kalman filtering and smoothing solutions to temporal Gaussian process
   regression models*. MLSP 2010.
3. Dowling, Zhao, Park. *Linear time GPs for inferring latent trajectories from neural spike
   trains* (cvHM). ICML 2023.
4. Zhao, Park. *Variational latent Gaussian process for recovering single-trial dynamics from
   population spike trains*. Neural Computation 2017 (Poisson GPFA by variational inference).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch.distributions import constraints

from . import register_model, warn_if_name_in_use
from ..numerics import safe_cholesky, tiny

__all__ = ["GPFA", "SharedGPFA", "kernel_matrix", "latent_r2"]

KERNELS = ("rbf", "matern12", "matern32", "matern52")
_STATE_ORDER = {"matern12": 1, "matern32": 2, "matern52": 3}
_ALIASES = {"se": "rbf", "squared_exponential": "rbf", "exponential": "matern12", "ou": "matern12"}


# =========================================================================== kernels
def _parse_kernel(kernel, num_latents):
    """``(kind, tau_init or None)`` from a name or a gpytorch RBF/Matérn kernel."""
    if kernel is None:
        return "rbf", None
    if isinstance(kernel, str):
        kind = _ALIASES.get(kernel.lower(), kernel.lower())
        if kind not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS} or a gpytorch RBFKernel/MaternKernel, "
                             f"got {kernel!r}.")
        return kind, None
    try:
        import gpytorch
    except ImportError:  # pragma: no cover - gpytorch is a dependency
        gpytorch = None
    if gpytorch is not None and isinstance(kernel, gpytorch.kernels.Kernel):
        if isinstance(kernel, gpytorch.kernels.RBFKernel):
            kind = "rbf"
        elif isinstance(kernel, gpytorch.kernels.MaternKernel):
            kind = {0.5: "matern12", 1.5: "matern32", 2.5: "matern52"}[float(kernel.nu)]
        else:
            raise TypeError(f"GPFA takes gpytorch RBFKernel or MaternKernel (unit variance, one timescale "
                            f"per latent), got {type(kernel).__name__}.")
        ls = kernel.lengthscale.detach().reshape(-1)
        if ls.numel() not in (1, num_latents):
            raise ValueError(f"The kernel's lengthscale has {ls.numel()} entries; build it with "
                             f"batch_shape=torch.Size([{num_latents}]) or a single lengthscale.")
        return kind, ls.expand(num_latents).clone()
    raise TypeError(f"kernel must be a name {KERNELS} or a gpytorch RBFKernel/MaternKernel, "
                    f"got {type(kernel).__name__}.")


def kernel_matrix(kind: str, tau: torch.Tensor, t1: torch.Tensor, t2: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Unit-variance stationary kernel :math:`k_{\tau_i}(t, t')`, shape ``(..., q, T1, T2)`` for
    timescales ``tau`` ``(..., q)`` and times ``(..., T1)``, ``(..., T2)``.  ``kind``: ``"rbf"``
    (:math:`e^{-r^2/2}`), ``"matern12"`` (:math:`e^{-r}`), ``"matern32"``
    (:math:`(1+\sqrt3 r)e^{-\sqrt3 r}`), ``"matern52"``
    (:math:`(1+\sqrt5 r+\tfrac53 r^2)e^{-\sqrt5 r}`), :math:`r = |t-t'|/\tau` (gpytorch's
    parametrization)."""
    t2 = t1 if t2 is None else t2
    diff = t1[..., None, :, None] - t2[..., None, None, :]
    scale = tau[..., :, None, None]
    if kind == "rbf":
        return torch.exp(-0.5 * (diff / scale) ** 2)
    r = diff.abs() / scale
    if kind == "matern12":
        return torch.exp(-r)
    if kind == "matern32":
        a = math.sqrt(3.0) * r
        return (1 + a) * torch.exp(-a)
    if kind == "matern52":
        a = math.sqrt(5.0) * r
        return (1 + a + a * a / 3) * torch.exp(-a)
    raise ValueError(f"unknown kernel {kind!r}")


def _prior_cov(kind, tau, times, eps, mask=None):
    """:math:`(1-\\epsilon)k + \\epsilon I`, ``(..., q, T, T)``; padded points (``mask`` False)
    become independent N(0, 1) latents that no observation touches."""
    T = times.shape[-1]
    eye = torch.eye(T, dtype=times.dtype, device=times.device)
    K = (1 - eps) * kernel_matrix(kind, tau, times) + eps * eye
    if mask is not None:
        m = mask.to(times.dtype)[..., None, :]
        K = K * m[..., :, None] * m[..., None, :] + torch.diag_embed(1 - m).expand_as(K)
    return K


def _state_space(kind, tau):
    """Matérn SDE in companion form (Hartikainen & Särkkä 2010): feedback matrix ``F`` and
    stationary covariance ``Pinf`` of unit variance, each ``(..., q, m, m)``."""
    m = _STATE_ORDER[kind]
    lam = {"matern12": 1.0, "matern32": math.sqrt(3.0), "matern52": math.sqrt(5.0)}[kind] / tau
    z = torch.zeros_like(lam)
    o = torch.ones_like(lam)
    if m == 1:
        F = -lam[..., None, None]
        P = o[..., None, None]
    elif m == 2:
        F = torch.stack([torch.stack([z, o], -1), torch.stack([-lam ** 2, -2 * lam], -1)], -2)
        P = torch.stack([torch.stack([o, z], -1), torch.stack([z, lam ** 2], -1)], -2)
    else:
        k = lam ** 2 / 3
        F = torch.stack([torch.stack([z, o, z], -1), torch.stack([z, z, o], -1),
                         torch.stack([-lam ** 3, -3 * lam ** 2, -3 * lam], -1)], -2)
        P = torch.stack([torch.stack([o, z, -k], -1), torch.stack([z, k, z], -1),
                         torch.stack([-k, z, lam ** 4], -1)], -2)
    return F, P


def _transitions(kind, tau, times, eps):
    """``A`` ``(G, T-1, q, m, m)``, ``Q`` (same) and ``Pinf`` ``(q, m, m)`` for grids ``(G, T)``,
    scaled by the GP's variance :math:`1-\\epsilon`."""
    F, P = _state_space(kind, tau)
    P = (1 - eps) * P
    dt = (times[..., 1:] - times[..., :-1])[..., None, None, None]  # (G, T-1, 1, 1, 1)
    if F.shape[-1] == 1:
        A = torch.exp(F * dt)
    else:
        A = torch.linalg.matrix_exp(F * dt)
    Q = P - A @ P @ A.transpose(-1, -2)
    return A, 0.5 * (Q + Q.transpose(-1, -2)), P


def _blockdiag(X):
    """``(..., q, m, m)`` -> block-diagonal ``(..., q*m, q*m)``."""
    q, m = X.shape[-3], X.shape[-1]
    eye = torch.eye(q, dtype=X.dtype, device=X.device)
    out = X[..., :, :, None, :] * eye[:, None, :, None]
    return out.reshape(X.shape[:-3] + (q * m, q * m))


# =========================================================================== data handling
class _Data:
    """Trials padded to ``(N, T, D)``, times ``(N, T)``, lengths and a validity mask."""

    def __init__(self, y, times, lengths):
        self.y, self.times, self.lengths = y, times, lengths
        self.N, self.T, self.D = y.shape
        self.full = bool((lengths == self.T).all())
        self.mask = None if self.full else (torch.arange(self.T, device=y.device) < lengths[:, None])
        self.shared = self.full and bool((times == times[:1]).all())
        self._groups = None

    def groups(self):
        """Trials grouped by length, each with its distinct grids: list of dicts with ``idx``
        (trial indices), ``y`` ``(n, T, D)``, ``grids`` ``(G, T)``, ``gidx`` ``(n,)`` and
        ``counts`` ``(G,)``."""
        if self._groups is not None:
            return self._groups
        out = []
        for L in torch.unique(self.lengths).tolist():
            idx = torch.nonzero(self.lengths == L).reshape(-1)
            # stationary kernels see only time differences: grids equal up to a shift share
            # one prior (and one posterior covariance), e.g. the segments of long trials
            t = self.times.index_select(0, idx)[:, :L]
            t = t - t[:, :1]
            if self.shared:
                grids, gidx = t[:1], torch.zeros(len(idx), dtype=torch.long, device=t.device)
            else:
                grids, gidx = torch.unique(t, dim=0, return_inverse=True)
            counts = torch.bincount(gidx, minlength=grids.shape[0]).to(self.y.dtype)
            out.append(dict(idx=idx, y=self.y.index_select(0, idx)[:, :L], grids=grids, gidx=gidx, counts=counts))
        self._groups = out
        return out

    def valid_y(self):
        """Observed rows ``(sum of lengths, D)``."""
        return self.y[self.mask] if self.mask is not None else self.y.reshape(-1, self.D)

    def segment(self, length):
        """Cut every trial into consecutive pieces of ``length`` points (the last may be shorter)."""
        ys, ts = [], []
        for n in range(self.N):
            L = int(self.lengths[n])
            for s in range(0, L, length):
                e = min(L, s + length)
                ys.append(self.y[n, s:e])
                ts.append(self.times[n, s:e])
        return _pad(ys, ts)


def _pad(ys, ts):
    T = max(v.shape[0] for v in ys)
    N, D = len(ys), ys[0].shape[-1]
    y = ys[0].new_zeros(N, T, D)
    times = ts[0].new_zeros(N, T)
    lengths = torch.tensor([v.shape[0] for v in ys], device=y.device)
    for n, (v, t) in enumerate(zip(ys, ts)):
        L = v.shape[0]
        y[n, :L] = v
        times[n, :L] = t
        if L < T:  # padding continues the grid so that grids stay distinct and increasing
            step = (t[-1] - t[-2]) if L > 1 else t.new_tensor(1.0)
            times[n, L:] = t[-1] + step * torch.arange(1, T - L + 1, dtype=t.dtype, device=t.device)
    return _Data(y, times, lengths)


def _shape(v):
    return tuple(v.shape) if torch.is_tensor(v) else type(v).__name__


def _as_data(y, times, lengths, obs_dim, counts=False) -> _Data:
    """Validate and pad the user's ``(y, times, lengths)``; every check runs before any work."""
    if isinstance(y, (list, tuple)):
        if not y:
            raise ValueError("y is an empty list; pass at least one trial.")
        for n, v in enumerate(y):
            if not torch.is_tensor(v) or v.dim() != 2 or v.shape[-1] != obs_dim or v.shape[0] < 1:
                raise ValueError(f"y[{n}] must be a tensor of shape (T_n, {obs_dim}), got {_shape(v)}.")
            if not v.is_floating_point():
                raise TypeError(f"y[{n}] must be a floating-point tensor (counts as float), got {v.dtype}.")
            if v.dtype != y[0].dtype or v.device != y[0].device:
                raise ValueError("All trials of y must share one dtype and device.")
        if lengths is not None:
            raise ValueError("lengths is only for padded tensors; a list of trials carries its own lengths.")
        if times is None:
            times = [torch.arange(v.shape[0], dtype=v.dtype, device=v.device) for v in y]
        if not isinstance(times, (list, tuple)) or len(times) != len(y):
            raise ValueError(f"With y a list of {len(y)} trials, times must be None or a list of {len(y)} "
                             f"1-d tensors, got {_shape(times) if not isinstance(times, (list, tuple)) else len(times)}.")
        for n, (v, t) in enumerate(zip(y, times)):
            if not torch.is_tensor(t) or t.shape != (v.shape[0],):
                raise ValueError(f"times[{n}] must have shape ({v.shape[0]},) to match y[{n}], got {_shape(t)}.")
        ys = list(y)
        ts = [t.to(dtype=ys[0].dtype, device=ys[0].device) for t in times]
        _check_values(torch.cat(ys), torch.cat(ts), counts)
        for n, t in enumerate(ts):
            if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
                raise ValueError(f"times[{n}] must be strictly increasing.")
        return _pad(ys, ts)
    if not torch.is_tensor(y):
        raise TypeError(f"y must be a tensor (trials, time points, {obs_dim}) or a list of (T_n, {obs_dim}) "
                        f"tensors, got {type(y).__name__}.")
    if y.dim() == 2 and y.shape[-1] == obs_dim:
        raise ValueError(f"y has shape {tuple(y.shape)}; pass one trial as y.unsqueeze(0) (shape (1, T, {obs_dim})).")
    if y.dim() != 3 or y.shape[-1] != obs_dim or y.shape[0] < 1 or y.shape[1] < 1:
        raise ValueError(f"y must have shape (trials, time points, {obs_dim}), got {_shape(y)}.")
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor (counts as float), got {y.dtype}.")
    N, T, _ = y.shape
    if times is None:
        times = torch.arange(T, dtype=y.dtype, device=y.device)
    if not torch.is_tensor(times):
        raise TypeError(f"times must be a tensor of shape ({T},) or ({N}, {T}), got {type(times).__name__}.")
    if times.shape == (T,):
        times = times.expand(N, T)
    elif times.shape != (N, T):
        raise ValueError(f"times must have shape ({T},) or ({N}, {T}) to match y {tuple(y.shape)}, "
                         f"got {tuple(times.shape)}.")
    times = times.to(dtype=y.dtype, device=y.device)
    if lengths is None:
        lengths = torch.full((N,), T, dtype=torch.long, device=y.device)
    else:
        lengths = torch.as_tensor(lengths, device=y.device)
        if lengths.shape != (N,) or lengths.is_floating_point() or bool((lengths < 1).any()) or bool((lengths > T).any()):
            raise ValueError(f"lengths must be {N} integers in [1, {T}], got {lengths.tolist()}.")
        lengths = lengths.long()
    mask = torch.arange(T, device=y.device) < lengths[:, None]
    _check_values(y[mask], times[mask], counts)
    if T > 1:
        inc = (times[:, 1:] > times[:, :-1]) | ~mask[:, 1:]
        if not bool(inc.all()):
            n = int(torch.nonzero(~inc.all(-1))[0])
            raise ValueError(f"times must be strictly increasing within each trial (trial {n} is not).")
    data = _Data(y, times.contiguous(), lengths)
    if not data.full:  # refill padding as a continuing grid (its values are never used)
        return _pad([y[n, :int(L)] for n, L in enumerate(lengths)], [times[n, :int(L)] for n, L in enumerate(lengths)])
    return data


def _check_values(y, t, counts):
    if not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).sum())
        raise ValueError(f"y contains {bad} NaN/inf value(s); remove or impute them before fitting.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("times contain NaN/inf values.")
    if counts and (bool((y < 0).any()) or bool((y != torch.round(y)).any())):
        raise ValueError("likelihood='poisson' needs non-negative integer counts in y.")


# =========================================================================== E-steps
def _obs_terms(C, d, R, y):
    """:math:`M = C^\\top R^{-1}C` and :math:`h_t = C^\\top R^{-1}(y_t - d)` ``(n, T, q)`` and
    :math:`\\sum_t (y_t-d)^\\top R^{-1}(y_t-d)` ``(n,)``."""
    CR = C / R[:, None]
    r = y - d
    return C.t() @ CR, r @ CR, (r * r / R).sum((-1, -2))


def _dense_estep(kind, tau, eps, grids, gidx, M, h, need_cov=True):
    """Exact posterior of the latents for trials sharing grids (module docstring).

    :param grids: ``(G, T)``; ``gidx`` ``(n,)`` the grid of each trial.
    :param M: ``(..., q, q)``; ``h`` ``(..., n, T, q)`` (``...``: e.g. leave-one-neuron-out variants).
    :returns: mean ``(..., n, T, q)``, ``h^T mu`` ``(..., n)``, ``log|B|`` per trial ``(..., n)``,
        and (``need_cov``) ``Sigma`` ``(..., G, q, T, q, T)`` shared by the trials of a grid.
    """
    G, T = grids.shape
    q = tau.shape[-1]
    L = torch.linalg.cholesky(_prior_cov(kind, tau, grids, eps))  # (G, q, T, T)
    LtL = torch.einsum("gius,gjut->gisjt", L, L)
    B = M[..., None, :, None, :, None] * LtL
    B = B.reshape(B.shape[:-4] + (q * T, q * T)) + torch.eye(q * T, dtype=L.dtype, device=L.device)
    LB = torch.linalg.cholesky(B)  # (..., G, qT, qT)
    logdetB = 2 * torch.diagonal(LB, dim1=-2, dim2=-1).log().sum(-1)  # (..., G)
    hq = h.transpose(-1, -2)  # (..., n, q, T)
    batch = hq.shape[:-3]
    n = hq.shape[-3]
    if G == 1:
        Lth = torch.einsum("...nqu,qus->...nqs", hq, L[0])
        rhs = Lth.reshape(batch + (n, q * T)).transpose(-1, -2)  # (..., qT, n)
        v = torch.cholesky_solve(rhs, LB[..., 0, :, :]).transpose(-1, -2).reshape(batch + (n, q, T))
        mean = torch.einsum("qts,...nqs->...nqt", L[0], v)
        logdet_n = logdetB[..., :1].expand(batch + (n,))
    else:
        Lg = L.index_select(0, gidx)
        Lth = torch.einsum("...nqu,nqus->...nqs", hq, Lg)
        LBn = LB.index_select(-3, gidx)
        v = torch.cholesky_solve(Lth.reshape(batch + (n, q * T, 1)), LBn).reshape(batch + (n, q, T))
        mean = torch.einsum("nqts,...nqs->...nqt", Lg, v)
        logdet_n = logdetB.index_select(-1, gidx)
    quad = (Lth * v).sum((-1, -2))
    Sigma = None
    if need_cov:
        Binv = torch.cholesky_inverse(LB).reshape(LB.shape[:-2] + (q, T, q, T))
        Sigma = torch.einsum("gitu,...giujw,gjsw->...gitjs", L, Binv, L)
    return mean.transpose(-1, -2), quad, logdet_n, Sigma


def _kalman_estep(kind, tau, eps, grids, gidx, M, h, need_stats=True):
    """The same posterior by Kalman filtering and RTS smoothing over the joint Matérn state
    (module docstring), linear in T.  Batched over trials (and any leading dims of ``M``/``h``);
    the covariance recursions run once per grid.

    :returns: dict with ``mean`` ``(..., n, T, q)`` (latents), ``cov`` ``(..., G, T, q, q)``
        (per-time posterior covariance of the latents), ``pseudo_ll`` ``(..., n)`` (the
        pseudo-observations' log-likelihood), ``logdetM``, and with ``need_stats`` the smoothed
        state moments ``ms`` ``(..., n, T, S)``, ``Ps`` ``(..., G, T, S, S)``, ``Pc``
        ``(..., G, T-1, S, S)`` (= Cov(s_t, s_{t-1})).
    """
    G, T = grids.shape
    q = tau.shape[-1]
    m = _STATE_ORDER[kind]
    S = q * m
    A, Q, Pinf = _transitions(kind, tau, grids, eps)  # (G, T-1, q, m, m), (q, m, m)
    A, Q, P0 = _blockdiag(A), _blockdiag(Q), _blockdiag(Pinf)  # (G, T-1, S, S), (S, S)
    sel = torch.arange(q, device=grids.device) * m
    eye_q = torch.eye(q, dtype=M.dtype, device=M.device)
    LM = torch.linalg.cholesky(M)
    Minv = torch.cholesky_inverse(LM)
    logdetM = 2 * torch.diagonal(LM, dim1=-2, dim2=-1).log().sum(-1)
    Nz = Minv + eps * eye_q  # (..., q, q)
    z = torch.einsum("...ab,...ntb->...nta", Minv, h)  # (..., n, T, q)
    batch = M.shape[:-2]
    # ---- covariance recursions, one per grid: (..., G, ...)
    Pp_l, Pf_l, K_l, LS_l = [], [], [], []
    Pf = None
    for t in range(T):
        Pp = P0.expand(batch + (G, S, S)) if t == 0 else A[:, t - 1] @ Pf @ A[:, t - 1].transpose(-1, -2) + Q[:, t - 1]
        HP = Pp[..., sel, :]
        Sm = HP[..., sel] + Nz[..., None, :, :]
        LS = torch.linalg.cholesky(Sm)
        W = torch.cholesky_solve(HP, LS)  # S^-1 H P  (..., G, q, S)
        Kg = W.transpose(-1, -2)
        Pf = Pp - Kg @ HP
        Pf = 0.5 * (Pf + Pf.transpose(-1, -2))
        Pp_l.append(Pp), Pf_l.append(Pf), K_l.append(Kg), LS_l.append(LS)
    Pp_a, Pf_a, K_a, LS_a = (torch.stack(v, -3) for v in (Pp_l, Pf_l, K_l, LS_l))  # (..., G, T, ...)

    def per_trial(X, dim):  # grid-indexed -> trial-indexed (broadcast when one grid)
        return X if G == 1 else X.index_select(dim, gidx)

    Kn = per_trial(K_a, -4)
    An = per_trial(A, 0)
    # ---- mean recursions, batched over trials
    n = h.shape[-3]
    mf = h.new_zeros(h.shape[:-2] + (S,))
    mp_l, mf_l, e_l = [], [], []
    for t in range(T):
        mp = mf if t == 0 else (An[..., t - 1, :, :] @ mf[..., None])[..., 0]
        e = z[..., t, :] - mp[..., sel]
        mf = mp + (Kn[..., t, :, :] @ e[..., None])[..., 0]
        mp_l.append(mp), mf_l.append(mf), e_l.append(e)
    mp_a, mf_a, e_a = (torch.stack(v, -2) for v in (mp_l, mf_l, e_l))  # (..., n, T, ·)
    LSn = per_trial(LS_a, -4)
    white = torch.linalg.solve_triangular(LSn, e_a[..., None], upper=False)[..., 0]
    logdetS = 2 * torch.diagonal(LS_a, dim1=-2, dim2=-1).log().sum((-1, -2))  # (..., G)
    pseudo_ll = -0.5 * (white.pow(2).sum((-1, -2)) + per_trial(logdetS, -1) + T * q * math.log(2 * math.pi))
    if G == 1:
        pseudo_ll = pseudo_ll.expand(batch + (n,)) if pseudo_ll.shape[-1] == 1 else pseudo_ll
    # ---- RTS smoother: gains batched over time, recursions sequential
    if T > 1:
        AP = A @ Pf_a[..., :-1, :, :]  # A_{t+1} Pf_t
        Gain = torch.linalg.solve(Pp_a[..., 1:, :, :], AP).transpose(-1, -2)  # (..., G, T-1, S, S)
    Ps_l, ms_l = [Pf_a[..., T - 1, :, :]], [mf_a[..., T - 1, :]]
    Gn = per_trial(Gain, -4) if T > 1 else None
    for t in range(T - 2, -1, -1):
        Gt = Gain[..., t, :, :]
        Ps_l.append(Pf_a[..., t, :, :] + Gt @ (Ps_l[-1] - Pp_a[..., t + 1, :, :]) @ Gt.transpose(-1, -2))
        ms_l.append(mf_a[..., t, :] + (Gn[..., t, :, :] @ (ms_l[-1] - mp_a[..., t + 1, :])[..., None])[..., 0])
    Ps = torch.stack(Ps_l[::-1], -3)
    ms = torch.stack(ms_l[::-1], -2)
    # ---- latents x_t = H s_t + sqrt(eps) w_t: posterior given s and y is N(Bx (Hs/eps + h), Bx)
    Bx = torch.linalg.inv(eye_q / eps + M)  # (..., q, q)
    mean = torch.einsum("...ab,...ntb->...nta", Bx, ms[..., sel] / eps + h)
    PsH = Ps[..., sel][..., sel, :]  # (..., G, T, q, q)
    Bxg = Bx[..., None, None, :, :]
    cov = Bxg + Bxg @ PsH @ Bxg / eps ** 2
    out = dict(mean=mean, cov=cov, pseudo_ll=pseudo_ll, logdetM=logdetM, hz=(h * z).sum((-1, -2)))
    if need_stats:
        Pc = Ps[..., 1:, :, :] @ Gain.transpose(-1, -2) if T > 1 else None
        out.update(ms=ms, Ps=Ps, Pc=Pc, A=A, Q=Q, P0=P0)
    return out


# =========================================================================== metrics
def latent_r2(target: torch.Tensor, predictors: torch.Tensor) -> torch.Tensor:
    r"""Coefficient of determination of a least-squares regression (with intercept) of each
    column of ``target`` ``(..., k)`` on all columns of ``predictors`` ``(..., p)``, rows
    flattened: ``(k,)``.  Invariant to invertible affine maps of ``predictors``, which is what
    latent recovery needs (latents are identified up to such a map)."""
    Yt = target.reshape(-1, target.shape[-1]).double()
    X = predictors.reshape(-1, predictors.shape[-1]).double()
    X = torch.cat([X, torch.ones_like(X[:, :1])], -1)
    coef = torch.linalg.lstsq(X, Yt).solution
    resid = Yt - X @ coef
    return 1 - resid.pow(2).sum(0) / (Yt - Yt.mean(0)).pow(2).sum(0)


# =========================================================================== the model
class GPFA(PyroModule):
    r"""Gaussian-process factor analysis (module docstring for the model and the algorithms).

    :param int num_latents: q, the number of latent trajectories.
    :param int obs_dim: D, the number of observed dimensions (neurons).
    :param kernel: ``"rbf"`` (default), ``"matern12"``, ``"matern32"``, ``"matern52"``, or a
        gpytorch ``RBFKernel``/``MaternKernel`` (its family, and its lengthscale as the initial
        timescale, in the units of ``times``).  GPFA owns the timescales :math:`\tau`
        (parameter ``tau``, one per latent) and fixes the prior variance at one.
    :param str likelihood: ``"gaussian"`` or ``"poisson"`` (spike counts).
    :param str link: ``"exp"`` (default) or ``"softplus"``, for ``likelihood="poisson"``.
    :param float gp_noise: :math:`\epsilon`, the fixed GP noise variance (default 1e-3).
    :param tau_init: initial timescale(s); default: the kernel's lengthscale when a gpytorch
        kernel is given, else 5 median time steps of the first data seen.
    :param str method: E-step ``"dense"``, ``"kalman"`` (linear time, Matérn kernels only) or
        ``"auto"`` (Kalman for Matérn kernels on trials longer than 64 points).
    :param str name: prefix of sites and parameters.

    Data: ``y`` of shape ``(trials, T, D)`` (with optional ``lengths`` ``(trials,)`` for padded
    trials of unequal length) or a list of ``(T_n, D)`` tensors; ``times`` ``None`` (0, 1, 2,
    ...), ``(T,)`` shared, ``(trials, T)`` or a list of ``(T_n,)`` (irregular grids allowed,
    strictly increasing).

    **With the Pyro backends** (``model``/``guide``): on first use the model's parameters start
    from PCA (:math:`C, d, R`) and the timescales from ``tau_init``, and the guide at half the
    prior's Cholesky factor; :meth:`initialize` starts instead from a short exact EM with the
    guide at that fit's posterior (recommended for Poisson GPFA).  Use float64 data: in float32
    the guide's T x T Cholesky factors lose its density under SVI beyond about 20 time points
    (the guide warns; such a fit ends with ``DivergenceError``).

    Example::

        >>> y, times, truth = GPFA.simulate(num_trials=100, num_bins=50, obs_dim=50)
        >>> gpfa = GPFA(3, 50)
        >>> gpfa.fit_em(y, times)                         # exact EM
        >>> out = gpfa.transform(y, times)                # posterior and orthonormalized latents
        >>> counts = GPFA(3, 50, likelihood="poisson")    # variational Poisson GPFA
        >>> counts.initialize(y_counts, times)
        >>> # the guide's Cholesky factors need a smaller step than the rest: with one learning rate
        >>> # (0.02) tutorial 07 measured the timescales collapsing to ~1 bin (ELBO -96,891 vs -96,453)
        >>> lr = lambda module, name: {"lr": 1e-3 if name.endswith("x_scale_tril") else 0.02}
        >>> fit = ppl_lvm.fit(counts.model, counts.guide, y_counts, times, backend="svi", num_steps=2000,
        ...                   optim=pyro.optim.Adam(lr))
    """

    def __init__(self, num_latents: int, obs_dim: int, kernel=None, likelihood: str = "gaussian",
                 link: str = "exp", gp_noise: float = 1e-3, tau_init=None, method: str = "auto",
                 name: str = "gpfa"):
        super().__init__(name=name)
        warn_if_name_in_use(self, name)
        for label, value in (("num_latents", num_latents), ("obs_dim", obs_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if likelihood not in ("gaussian", "poisson"):
            raise ValueError(f"likelihood must be 'gaussian' or 'poisson', got {likelihood!r}")
        if link not in ("exp", "softplus"):
            raise ValueError(f"link must be 'exp' or 'softplus', got {link!r}")
        if not isinstance(gp_noise, (int, float)) or not 0 < gp_noise < 1:
            raise ValueError(f"gp_noise must be a number in (0, 1), got {gp_noise!r}")
        if method not in ("auto", "dense", "kalman"):
            raise ValueError(f"method must be 'auto', 'dense' or 'kalman', got {method!r}")
        self.num_latents, self.obs_dim = num_latents, obs_dim
        self.kind, kernel_tau = _parse_kernel(kernel, num_latents)
        if method == "kalman" and self.kind == "rbf":
            raise ValueError("method='kalman' needs a Matérn kernel (matern12/32/52); the RBF kernel has no "
                             "finite state-space form. Use method='dense' or kernel='matern32'.")
        if tau_init is not None:
            tau_init = torch.as_tensor(tau_init, dtype=torch.float64).reshape(-1)
            if tau_init.numel() not in (1, num_latents) or not bool((tau_init > 0).all()):
                raise ValueError(f"tau_init must be a positive number or {num_latents} positive numbers.")
            tau_init = tau_init.expand(num_latents).clone()
        self.tau_init = tau_init if tau_init is not None else kernel_tau
        self.likelihood, self.link, self.eps, self.method, self.name = likelihood, link, float(gp_noise), method, name
        self.em_history_: List[float] = []

    # ------------------------------------------------------------------ data and parameters
    def _data(self, y, times=None, lengths=None) -> _Data:
        return _as_data(y, times, lengths, self.obs_dim, counts=self.likelihood == "poisson")

    def _method(self, data, method=None):
        method = method or self.method
        if method not in ("auto", "dense", "kalman"):
            raise ValueError(f"method must be 'auto', 'dense' or 'kalman', got {method!r}")
        if method == "auto":
            return "kalman" if self.kind != "rbf" and data.T > 64 else "dense"
        if method == "kalman" and self.kind == "rbf":
            raise ValueError("method='kalman' needs a Matérn kernel.")
        return method

    #: the guide warns about float32 data above this many time points per trial
    float32_max_bins: int = 20

    @property
    def initialized(self) -> bool:
        return "C" in self._pyro_params

    def _set_param(self, name, value, constraint=constraints.real):
        value = value.detach()
        if name not in self._pyro_params:
            setattr(self, name, PyroParam(value.clone(), constraint))
            return
        getattr(self, name)  # sync module and param store
        raw = torch.distributions.transform_to(self._pyro_params[name][0]).inv(value)
        targets = [getattr(self, name + "_unconstrained")]
        store = pyro.get_param_store()
        full = f"{self._pyro_name}.{name}" if self._pyro_name else name  # PyroModule's naming rule
        if full in store:
            targets.append(store[full].unconstrained())
        with torch.no_grad():
            for p in targets:
                p.data = raw.clone()

    def get_params(self) -> Dict[str, torch.Tensor]:
        """Current ``C`` ``(D, q)``, ``d`` ``(D,)``, ``R`` ``(D,)`` (Gaussian) and ``tau`` ``(q,)``."""
        if not self.initialized:
            raise RuntimeError("GPFA has no parameters yet: call fit_em/initialize, or run the model once.")
        out = {"C": self.C.detach(), "d": self.d.detach(), "tau": self.tau.detach()}
        if self.likelihood == "gaussian":
            out["R"] = self.R.detach()
        return out

    def set_params(self, C, d, tau, R=None):
        """Set the parameters (e.g. a ground truth or another fit's)."""
        q, D = self.num_latents, self.obs_dim
        if C.shape != (D, q) or d.shape != (D,) or torch.as_tensor(tau).shape != (q,):
            raise ValueError(f"need C ({D}, {q}), d ({D},), tau ({q},).")
        self._set_param("C", C)
        self._set_param("d", d)
        self._set_param("tau", torch.as_tensor(tau, dtype=C.dtype, device=C.device), constraints.positive)
        if self.likelihood == "gaussian":
            if R is None or R.shape != (D,) or not bool((R > 0).all()):
                raise ValueError(f"need positive R of shape ({D},) for the Gaussian likelihood.")
            self._set_param("R", R, constraints.positive)

    def _pca_init(self, data):
        """Probabilistic-PCA (factor-analysis-like) starting point, in the data's dtype/device."""
        Y = data.valid_y()
        q = self.num_latents
        mu = Y.mean(0)
        var = Y.var(0, unbiased=False).clamp_min(tiny(Y.dtype))
        cov = torch.cov(Y.t(), correction=0) if Y.shape[0] > 1 else torch.diag(var)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.flip(1)
        noise = evals[q:].mean() if evals.numel() > q else evals.new_tensor(0.0)
        C = evecs[:, :q] * (evals[:q] - noise).clamp_min(1e-6 * float(var.mean())).sqrt()
        R = (var - (C * C).sum(-1)).clamp_min(0.01 * var)
        if self.likelihood == "poisson":  # delta method around the mean rate: log-rate ~ log mu + (y-mu)/mu
            rate = mu.clamp_min(0.05)
            if self.link == "exp":
                d, slope = rate.log(), rate
            else:
                d = rate + torch.log(-torch.expm1(-rate))  # softplus^-1
                slope = torch.sigmoid(d)
            C = C / slope[:, None]
            mu = d
        if self.tau_init is not None:
            tau = self.tau_init.to(Y)
        else:
            dt = (data.times[:, 1:] - data.times[:, :-1])
            if data.mask is not None:
                dt = dt[data.mask[:, 1:]]
            step = dt.median() if dt.numel() else Y.new_tensor(1.0)
            tau = (5 * step).expand(q).clone()
        return dict(C=C, d=mu, R=R, tau=tau)

    def _ensure_params(self, data):
        y = data.y
        if not self.initialized:
            init = self._pca_init(data)
            self._set_param("C", init["C"])
            self._set_param("d", init["d"])
            self._set_param("tau", init["tau"], constraints.positive)
            if self.likelihood == "gaussian":
                self._set_param("R", init["R"], constraints.positive)
            return
        if self.C.dtype != y.dtype or self.C.device != y.device:  # parameters follow the data
            for k, v in self.get_params().items():
                self._set_param(k, v.to(y), constraints.real if k in ("C", "d") else constraints.positive)

    # ------------------------------------------------------------------ Pyro model and guide
    @pyro_method
    def model(self, y, times=None, lengths=None, subsample_size: Optional[int] = None):
        """:math:`x \\sim` GP prior per trial and latent, :math:`y \\sim` Normal/Poisson.  Sites
        ``{name}.x`` ``(trials, q, T)`` (event ``(q, T)``) and ``{name}.y`` in the plate
        ``{name}.trials`` (dim -1); broadcasts over particle/chain plates on the left."""
        data = self._data(y, times, lengths)
        self._ensure_params(data)
        q = self.num_latents
        C, d, tau = self.C, self.d, self.tau
        with pyro.plate(f"{self.name}.trials", data.N, subsample_size=subsample_size, dim=-1,
                        device=data.y.device) as ind:
            mask = None if data.mask is None else data.mask.index_select(0, ind)
            if data.shared:
                L = torch.linalg.cholesky(_prior_cov(self.kind, tau, data.times[0], self.eps))
                prior = dist.MultivariateNormal(data.y.new_zeros(data.T), scale_tril=L).expand([len(ind), q])
            else:
                L = torch.linalg.cholesky(_prior_cov(self.kind, tau, data.times.index_select(0, ind), self.eps, mask))
                prior = dist.MultivariateNormal(data.y.new_zeros(data.T), scale_tril=L)
            x = pyro.sample(f"{self.name}.x", prior.to_event(1))
            f = torch.einsum("dq,...nqt->...ntd", C, x) + d
            if self.likelihood == "gaussian":
                obs = dist.Normal(f, self.R.sqrt())
            else:
                rate = torch.exp(f) if self.link == "exp" else torch.nn.functional.softplus(f)
                obs = dist.Poisson(rate)
            if mask is not None:
                obs = obs.mask(mask[..., None])
            pyro.sample(f"{self.name}.y", obs.to_event(2), obs=data.y.index_select(0, ind))
        return f

    @pyro_method
    def guide(self, y, times=None, lengths=None, subsample_size: Optional[int] = None):
        """Structured Gaussian per trial and latent: :math:`q(x_{ni}) = \\mathcal N(m_{ni},
        L_{ni}L_{ni}^\\top)` over the trial's time points (full Cholesky factor), independent
        across latents and trials.  Starts at the prior's shape scaled by 1/2 (or at the
        Gaussian-GPFA posterior after :meth:`initialize`)."""
        data = self._data(y, times, lengths)
        self._ensure_params(data)
        N, T, q = data.N, data.T, self.num_latents
        if data.y.dtype == torch.float32 and T > self.float32_max_bins and not getattr(self, "_warned_float32", False):
            self._warned_float32 = True
            warnings.warn(
                f"GPFA's structured guide over {T} time points in float32: its full T x T Cholesky "
                "factors grow ill-conditioned under SVI, and float32's 7 digits then lose the "
                "guide's density (measured: log q at its own draw fell from 2.6e4 to -7.2e8 within "
                "15 steps at T = 50 and the ELBO ran off to -1e27). Pass float64 data "
                "(y.double(), times.double()) for the Pyro backends, or use fit_em.",
                RuntimeWarning, stacklevel=3)
        loc = pyro.param(f"{self.name}.x_loc", lambda: data.y.new_zeros(N, q, T))

        def init_scale():
            K = _prior_cov(self.kind, self.tau.detach(), data.times if not data.shared else data.times[0],
                           self.eps, data.mask)
            return (0.5 * torch.linalg.cholesky(K)).expand(N, q, T, T).clone()

        scale_tril = pyro.param(f"{self.name}.x_scale_tril", init_scale, constraint=constraints.lower_cholesky)
        if loc.shape != (N, q, T) or scale_tril.shape != (N, q, T, T):
            raise ValueError(f"The guide's parameters were built for data of shape {tuple(loc.shape)} (trials, "
                             f"q, T), got ({N}, {q}, {T}); clear them with pyro.clear_param_store() or use "
                             "another name.")
        with pyro.plate(f"{self.name}.trials", N, subsample_size=subsample_size, dim=-1,
                        device=data.y.device) as ind:
            pyro.sample(f"{self.name}.x", dist.MultivariateNormal(
                loc.index_select(0, ind), scale_tril=scale_tril.index_select(0, ind)).to_event(1))

    def initialize(self, y, times=None, lengths=None, em_iters: int = 20, method=None, glm_iters: int = 50):
        """Starting point for the Pyro backends: a short Gaussian EM, and the guide at that fit's
        exact posterior.  For the Poisson likelihood the EM runs on the counts, and ``(C, d)``
        then come from a Poisson regression (L-BFGS, ``glm_iters`` iterations) of the counts on
        the Gaussian posterior means.  Returns ``self``."""
        data = self._data(y, times, lengths)
        if self.likelihood == "gaussian":
            self.fit_em(y, times, lengths, max_iter=em_iters, method=method)
            P = self.get_params()
        else:
            g = GPFA(self.num_latents, self.obs_dim, kernel=self.kind, gp_noise=self.eps, method=self.method,
                     tau_init=self.tau_init, name=f"{self.name}._init")
            g.fit_em(data.y, data.times, data.lengths, max_iter=em_iters, method=method)
            P = g.get_params()
            self._ensure_params(data)
            C, d = self._poisson_regression(data, g._posterior(data, P, method)["mean"], glm_iters)
            self._set_param("C", C)
            self._set_param("d", d)
            self._set_param("tau", P["tau"], constraints.positive)
        post = (self if self.likelihood == "gaussian" else g)._posterior(data, P, method="dense", need_cov=True)
        loc = post["mean"].transpose(-1, -2).contiguous()  # (N, q, T)
        blocks = post["cov_full"]  # (N, q, T, T)
        scale = safe_cholesky(blocks)
        store = pyro.get_param_store()
        for key in (f"{self.name}.x_loc", f"{self.name}.x_scale_tril"):
            if key in store:
                del store[key]
        pyro.param(f"{self.name}.x_loc", loc)
        pyro.param(f"{self.name}.x_scale_tril", scale, constraint=constraints.lower_cholesky)
        return self

    def _poisson_regression(self, data, X, iters):
        """Maximum-likelihood ``(C, d)`` of the Poisson observation model given latents ``X``
        ``(trials, T, q)`` (a GLM per neuron, all neurons at once; convex for the exp link)."""
        mask = data.mask
        Xv = X[mask] if mask is not None else X.reshape(-1, X.shape[-1])
        Yv = data.valid_y()
        rate = Yv.mean(0).clamp_min(0.05)
        d0 = rate.log() if self.link == "exp" else rate + torch.log(-torch.expm1(-rate))
        W = torch.cat([Xv.new_zeros(Yv.shape[1], Xv.shape[1]), d0[:, None]], -1).requires_grad_(True)
        Xa = torch.cat([Xv, torch.ones_like(Xv[:, :1])], -1)
        opt = torch.optim.LBFGS([W], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            f = Xa @ W.t()
            lam = torch.exp(f) if self.link == "exp" else torch.nn.functional.softplus(f)
            loss = (lam - Yv * (f if self.link == "exp" else lam.clamp_min(tiny(lam.dtype)).log())).mean()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        W = W.detach()
        return W[:, :-1].contiguous(), W[:, -1].contiguous()

    # ------------------------------------------------------------------ exact inference
    def _posterior(self, data, P, method=None, need_cov=False, need_stats=False):
        """E-step over all trials.  Returns ``mean`` ``(N, T, q)``, ``cov`` ``(N, T, q, q)`` (per
        time point), ``ll`` ``(N,)`` and, with ``need_cov`` and the dense method, ``cov_full``
        ``(N, q, T, T)``; with ``need_stats`` the M-step's sufficient statistics."""
        method = self._method(data, method)
        C, d, R, tau = P["C"], P["d"], P["R"], P["tau"]
        N, T, q, D = data.N, data.T, self.num_latents, self.obs_dim
        mean = data.y.new_zeros(N, T, q)
        cov = data.y.new_zeros(N, T, q, q) if (need_cov or need_stats) else None
        cov_full = data.y.new_zeros(N, q, T, T) if (need_cov and method == "dense") else None
        ll = data.y.new_zeros(N)
        logdetR = R.log().sum()
        stats = dict(Sxx=C.new_zeros(q, q), Sx=C.new_zeros(q), Syx=C.new_zeros(D, q), tau=[])
        for grp in data.groups():
            yg, grids, gidx, counts = grp["y"], grp["grids"], grp["gidx"], grp["counts"]
            L = yg.shape[1]
            M, h, rRr = _obs_terms(C, d, R, yg)
            if method == "dense":
                mu, quad, logdetB, Sigma = _dense_estep(self.kind, tau, self.eps, grids, gidx, M, h,
                                                        need_cov=need_cov or need_stats)
                llg = -0.5 * (rRr - quad + L * (D * math.log(2 * math.pi) + logdetR) + logdetB)
                if Sigma is not None:
                    covg = torch.einsum("gitjt->gtij", Sigma)  # (G, L, q, q)
                    blocks = torch.diagonal(Sigma, dim1=-4, dim2=-2).permute(0, 3, 1, 2)  # (G, q, L, L)
                    if cov_full is not None:
                        cov_full[grp["idx"], :, :L, :L] = blocks.index_select(0, gidx)
                if need_stats:
                    S = torch.zeros_like(blocks).index_add_(0, gidx, torch.einsum("nti,nsi->nits", mu, mu))
                    stats["tau"].append(("dense", grids, counts, S + counts[:, None, None, None] * blocks))
            else:
                out = _kalman_estep(self.kind, tau, self.eps, grids, gidx, M, h, need_stats=need_stats)
                mu, covg = out["mean"], out["cov"]
                const = (-0.5 * (rRr - out["hz"]) - 0.5 * L * (D - q) * math.log(2 * math.pi)
                         - 0.5 * L * (logdetR + out["logdetM"]))
                llg = out["pseudo_ll"] + const
                if need_stats:
                    ms, Ps, Pc = out["ms"], out["Ps"], out["Pc"]
                    G = grids.shape[0]
                    Phi = torch.zeros_like(Ps).index_add_(0, gidx, torch.einsum("nta,ntb->ntab", ms, ms))
                    Phi = Phi + counts[:, None, None, None] * Ps
                    Psi = None
                    if L > 1:
                        Psi = torch.zeros(G, L - 1, *Ps.shape[-2:], dtype=Ps.dtype, device=Ps.device)
                        Psi = Psi.index_add_(0, gidx, torch.einsum("nta,ntb->ntab", ms[:, 1:], ms[:, :-1]))
                        Psi = Psi + counts[:, None, None, None] * Pc
                    stats["tau"].append(("kalman", grids, counts, (Phi, Psi)))
            idx = grp["idx"]
            mean[idx, :L] = mu
            ll[idx] = llg
            if cov is not None:
                cov[idx, :L] = covg.index_select(0, gidx) if covg.shape[0] > 1 else covg.expand(len(idx), L, q, q)
            if need_stats:
                stats["Sxx"] += torch.einsum("nti,ntj->ij", mu, mu) + torch.einsum("g,gtij->ij", counts, covg)
                stats["Sx"] += mu.sum((0, 1))
                stats["Syx"] += torch.einsum("ntd,nti->di", yg, mu)
        out = dict(mean=mean, cov=cov, ll=ll, method=method)
        if cov_full is not None:
            out["cov_full"] = cov_full
        if need_stats:
            out["stats"] = stats
        return out

    def _tau_objective(self, log_tau, tau_stats):
        """Expected complete-data log prior of the latent paths, as a function of log tau."""
        tau = log_tau.exp()
        total = log_tau.new_zeros(())
        for kind, grids, counts, S in tau_stats:
            if kind == "dense":
                K = _prior_cov(self.kind, tau, grids, self.eps)  # (G, q, T, T)
                LK = torch.linalg.cholesky(K)
                tr = torch.diagonal(torch.cholesky_solve(S, LK), dim1=-2, dim2=-1).sum(-1)  # (G, q)
                logdet = 2 * torch.diagonal(LK, dim1=-2, dim2=-1).log().sum(-1)
                total = total - 0.5 * (tr + counts[:, None] * logdet).sum()
            else:
                Phi, Psi = S
                q, m = self.num_latents, _STATE_ORDER[self.kind]

                def blocks(X):
                    X = X.reshape(X.shape[:-2] + (q, m, q, m))
                    return torch.diagonal(X, dim1=-4, dim2=-2).permute(*range(X.dim() - 4), -1, -3, -2)

                Phi_b = blocks(Phi)  # (G, T, q, m, m)
                A, Q, P0 = _transitions(self.kind, tau, grids, self.eps)
                L0 = torch.linalg.cholesky(P0)
                tr0 = torch.diagonal(torch.cholesky_solve(Phi_b[:, 0], L0), dim1=-2, dim2=-1).sum(-1)
                ld0 = 2 * torch.diagonal(L0, dim1=-2, dim2=-1).log().sum(-1)
                total = total - 0.5 * (tr0 + counts[:, None] * ld0).sum()
                if Psi is not None:
                    Psi_b = blocks(Psi)
                    At = A.transpose(-1, -2)
                    E = Phi_b[:, 1:] - A @ Psi_b.transpose(-1, -2) - Psi_b @ At + A @ Phi_b[:, :-1] @ At
                    LQ = torch.linalg.cholesky(Q)
                    tr = torch.diagonal(torch.cholesky_solve(E, LQ), dim1=-2, dim2=-1).sum(-1)
                    ld = 2 * torch.diagonal(LQ, dim1=-2, dim2=-1).log().sum(-1)
                    total = total - 0.5 * (tr + counts[:, None, None] * ld).sum()
        return total

    def _mstep(self, P, stats, moments, tau_steps, floor, learn_tau):
        Ntot, Sy, Syy = moments
        q = self.num_latents
        A = P["C"].new_zeros(q + 1, q + 1)
        A[:q, :q], A[:q, q], A[q, :q], A[q, q] = stats["Sxx"], stats["Sx"], stats["Sx"], Ntot
        Bm = torch.cat([stats["Syx"], Sy[:, None]], -1)  # (D, q+1)
        Cd = torch.linalg.solve(A, Bm.t()).t()
        C, d = Cd[:, :q], Cd[:, q]
        R = ((Syy - (Cd * Bm).sum(-1)) / Ntot).clamp_min(floor)
        tau = P["tau"]
        if learn_tau and tau_steps > 0:
            log_tau = tau.log().clone().requires_grad_(True)
            norm = float(Ntot)
            with torch.enable_grad():
                start = float(self._tau_objective(log_tau.detach(), stats["tau"]))
                opt = torch.optim.LBFGS([log_tau], max_iter=tau_steps, line_search_fn="strong_wolfe")

                def closure():
                    opt.zero_grad()
                    loss = -self._tau_objective(log_tau, stats["tau"]) / norm
                    loss.backward()
                    return loss

                opt.step(closure)
                end = float(self._tau_objective(log_tau.detach(), stats["tau"]))
            if math.isfinite(end) and end >= start:  # the M-step must not decrease the objective
                tau = log_tau.detach().exp()
        return dict(C=C, d=d, R=R, tau=tau)

    def fit_em(self, y, times=None, lengths=None, max_iter: int = 100, tol: float = 1e-8,
               method: Optional[str] = None, tau_steps: int = 10, min_var_frac: float = 0.01,
               segment_length: Optional[int] = None, learn_tau: bool = True, init: Optional[str] = None,
               verbose: bool = False) -> List[float]:
        r"""Exact EM for Gaussian GPFA (module docstring).

        :param max_iter: EM iterations at most.
        :param tol: stop when the log-likelihood rises by less than ``tol * |log-likelihood|``.
        :param method: E-step ``"dense"`` / ``"kalman"`` / ``"auto"`` (default: the model's).
        :param tau_steps: L-BFGS iterations on :math:`\log\tau` per M-step.
        :param min_var_frac: floor of :math:`R_j` as a fraction of neuron j's variance.
        :param segment_length: fit on the trials cut into pieces of this many points (as
            Elephant does for long trials; the fitted parameters apply to whole trials).
        :param init: ``"pca"`` to restart from PCA; default: keep parameters set before
            (``set_params``, an earlier fit), else PCA.
        :returns: the exact marginal log-likelihood before each iteration and after the last
            (also stored in ``em_history_``).
        """
        if self.likelihood != "gaussian":
            raise ValueError("fit_em is exact EM for likelihood='gaussian'; fit Poisson GPFA with a Pyro "
                             "backend: initialize(y, times), then ppl_lvm.fit(gpfa.model, gpfa.guide, y, "
                             "times, backend='svi').")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
        if init not in (None, "pca"):
            raise ValueError(f"init must be None or 'pca', got {init!r}")
        data = self._data(y, times, lengths)
        if segment_length is not None:
            if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 2:
                raise ValueError(f"segment_length must be an int >= 2, got {segment_length!r}")
            data = data.segment(segment_length)
        if init == "pca" or not self.initialized:
            P = self._pca_init(data)
        else:
            self._ensure_params(data)
            P = self.get_params()
        Yv = data.valid_y()
        moments = (Yv.new_tensor(float(Yv.shape[0])), Yv.sum(0), (Yv * Yv).sum(0))
        floor = min_var_frac * Yv.var(0, unbiased=False).clamp_min(tiny(Yv.dtype))
        P["R"] = P["R"].clamp_min(floor)
        history = []
        for it in range(max_iter + 1):
            post = self._posterior(data, P, method, need_stats=it < max_iter)
            ll = float(post["ll"].sum())
            if not math.isfinite(ll):
                raise FloatingPointError(f"EM iteration {it}: the log-likelihood is not finite; the "
                                         "parameters were left at the previous iteration's values.")
            history.append(ll)
            if verbose:
                print(f"EM {it}: log-likelihood {ll:.4f}")
            if it == max_iter or (it > 0 and ll - history[-2] < tol * abs(ll)):
                break
            P = self._mstep(P, post["stats"], moments, tau_steps, floor, learn_tau)
        self.set_params(P["C"], P["d"], P["tau"], P["R"])
        self.em_history_ = history
        return history

    def log_likelihood(self, y, times=None, lengths=None, method=None) -> torch.Tensor:
        """Exact :math:`\\log p(y_n)` per trial (Gaussian), ``(trials,)``."""
        data = self._data(y, times, lengths)
        self._require_gaussian("log_likelihood")
        return self._posterior(data, self.get_params(), method)["ll"]

    def _require_gaussian(self, what):
        if self.likelihood != "gaussian":
            raise ValueError(f"{what} is exact for likelihood='gaussian'; for Poisson GPFA the guide's "
                             f"parameters ({self.name}.x_loc, {self.name}.x_scale_tril) are the posterior.")
        if not self.initialized:
            raise RuntimeError("Fit the model first (fit_em) or set_params().")

    def orthonormal_basis(self):
        """``(U, S V^T)`` from the SVD :math:`C = U S V^\\top`: orthonormalized latents are
        :math:`\\tilde x = S V^\\top x` and :math:`Cx = U\\tilde x` (Yu et al. 2009)."""
        U, S, Vh = torch.linalg.svd(self.C.detach(), full_matrices=False)
        return U, S[:, None] * Vh

    def transform(self, y, times=None, lengths=None, method=None) -> Dict[str, torch.Tensor]:
        """Posterior of the latents given the fitted parameters (Gaussian GPFA).

        :returns: dict with ``mean`` ``(trials, T, q)``, ``cov`` ``(trials, T, q, q)`` (marginal
            per time point), ``mean_orth``/``cov_orth`` (orthonormalized, dimensions ordered by
            explained variance), ``log_likelihood`` ``(trials,)``, ``lengths``; padded points
            (unequal lengths) are zero.
        """
        data = self._data(y, times, lengths)
        self._require_gaussian("transform")
        post = self._posterior(data, self.get_params(), method, need_cov=True)
        _, W = self.orthonormal_basis()
        mean, cov = post["mean"], post["cov"]
        if data.mask is not None:
            mean = mean * data.mask[..., None]
            cov = cov * data.mask[..., None, None]
        return dict(mean=mean, cov=cov, mean_orth=mean @ W.t(), cov_orth=W @ cov @ W.t(),
                    log_likelihood=post["ll"], lengths=data.lengths, method=post["method"])

    def leave_neuron_out_error(self, y, times=None, lengths=None, method=None, num_dims: Optional[Sequence[int]] = None,
                               chunk: int = 8):
        r"""Yu et al.'s cross-validation criterion: each neuron predicted from the posterior of
        the latents given the *other* neurons, :math:`\hat y_j = c_j^\top \mathbb E[x \mid
        y_{-j}] + d_j`; returns the summed squared error (a tensor ``(D,)`` per neuron).  With
        ``num_dims`` (a list of p), the reduced models of the top-p orthonormalized dimensions
        :math:`\hat y_j = U_{j,1:p}\,(S V^\top \mathbb E[x \mid y_{-j}])_{1:p} + d_j`: a dict
        ``{p: (D,)}``.  Removing neuron j changes only :math:`M` and :math:`h` (rank one), so
        all neurons run as one batch dimension (in chunks of ``chunk`` neurons)."""
        data = self._data(y, times, lengths)
        self._require_gaussian("leave_neuron_out_error")
        method = self._method(data, method)
        P = self.get_params()
        C, d, R, tau = P["C"], P["d"], P["R"], P["tau"]
        D = self.obs_dim
        U, W = self.orthonormal_basis()
        dims = [self.num_latents] if num_dims is None else list(num_dims)
        if any(not isinstance(p, int) or not 1 <= p <= self.num_latents for p in dims):
            raise ValueError(f"num_dims must be ints in [1, {self.num_latents}], got {dims!r}")
        err = {p: C.new_zeros(D) for p in dims}
        for grp in data.groups():
            yg, grids, gidx = grp["y"], grp["grids"], grp["gidx"]
            M, h, _ = _obs_terms(C, d, R, yg)
            r = yg - d  # (n, T, D)
            for s in range(0, D, chunk):
                js = torch.arange(s, min(D, s + chunk), device=C.device)
                cj = C.index_select(0, js)  # (k, q)
                Rj = R.index_select(0, js)
                Mj = M - torch.einsum("ka,kb->kab", cj, cj) / Rj[:, None, None]
                hj = h - torch.einsum("ntk,ka->knta", r.index_select(-1, js), cj / Rj[:, None])
                if method == "dense":
                    mu = _dense_estep(self.kind, tau, self.eps, grids, gidx, Mj, hj, need_cov=False)[0]
                else:
                    mu = _kalman_estep(self.kind, tau, self.eps, grids, gidx, Mj, hj, need_stats=False)["mean"]
                xo = mu @ W.t()  # (k, n, T, q) orthonormalized
                target = yg.index_select(-1, js).permute(2, 0, 1)  # (k, n, T)
                Uj = U.index_select(0, js)
                for p in dims:
                    pred = (xo[..., :p] * Uj[:, None, None, :p]).sum(-1) + d.index_select(0, js)[:, None, None]
                    err[p][js] += (pred - target).pow(2).sum((-1, -2))
        return err[dims[0]] if num_dims is None else err

    # ------------------------------------------------------------------ simulation and plots
    @staticmethod
    def simulate(num_trials: int = 100, num_bins: int = 50, num_latents: int = 3, obs_dim: int = 50,
                 kernel: str = "rbf", tau=None, likelihood: str = "gaussian", link: str = "exp",
                 gp_noise: float = 1e-3, noise_range=(0.1, 0.5), loading_scale: Optional[float] = None,
                 base_rate: float = 1.0, times: Optional[torch.Tensor] = None, seed: int = 0,
                 dtype: torch.dtype = torch.float64):
        """Draw trials from the model: ``(y, times, truth)`` with ``y`` ``(trials, T, D)``,
        ``times`` ``(T,)`` (default 0..T-1, or given ``(T,)``/``(trials, T)``) and ``truth`` with
        ``x`` ``(trials, T, q)``, ``C``, ``d``, ``tau`` and ``R`` (Gaussian) or ``rate`` (Poisson:
        counts per bin, :math:`d_j = \\log` ``base_rate``).  Timescales default to spread
        between 3 and 8 time units."""
        kind, _ = _parse_kernel(kernel, num_latents)
        g = torch.Generator().manual_seed(seed)
        q, D = num_latents, obs_dim
        if times is None:
            times = torch.arange(num_bins, dtype=dtype)
        times = times.to(dtype)
        tau = torch.linspace(3.0, 8.0, q, dtype=dtype) if tau is None else torch.as_tensor(tau, dtype=dtype).expand(q)
        K = _prior_cov(kind, tau, times, gp_noise)
        Lk = torch.linalg.cholesky(K)  # (q, T, T) or (trials, q, T, T)
        z = torch.randn(num_trials, q, times.shape[-1], 1, generator=g, dtype=dtype)
        x = (Lk @ z)[..., 0].transpose(-1, -2)  # (trials, T, q)
        if likelihood == "gaussian":
            C = torch.randn(D, q, generator=g, dtype=dtype) * (loading_scale or 1.0)
            d = torch.randn(D, generator=g, dtype=dtype)
            lo, hi = noise_range
            R = lo + (hi - lo) * torch.rand(D, generator=g, dtype=dtype)
            y = x @ C.t() + d + R.sqrt() * torch.randn(num_trials, times.shape[-1], D, generator=g, dtype=dtype)
            return y, times, dict(x=x, C=C, d=d, R=R, tau=tau)
        if likelihood != "poisson":
            raise ValueError(f"likelihood must be 'gaussian' or 'poisson', got {likelihood!r}")
        C = torch.randn(D, q, generator=g, dtype=dtype) * (loading_scale or 0.5)
        f = x @ C.t()
        if link == "exp":
            d = torch.full((D,), math.log(base_rate), dtype=dtype) - 0.5 * (C * C).sum(-1)  # mean rate = base_rate
            rate = torch.exp(f + d)
        else:
            d = torch.full((D,), base_rate, dtype=dtype)
            rate = torch.nn.functional.softplus(f + d)
        y = torch.poisson(rate, generator=g)
        return y, times, dict(x=x, C=C, d=d, tau=tau, rate=rate)

    @staticmethod
    def plot_latents(latents, times=None, trials=None, dims=None, axes=None, truth=None, **plot_kw):
        """One panel per latent dimension, one line per trial: ``latents`` ``(trials, T, q)`` (e.g.
        ``transform(...)["mean_orth"]``); ``truth`` (same shape) is drawn dashed.  Returns the
        array of axes."""
        import matplotlib.pyplot as plt
        import numpy as np

        if not torch.is_tensor(latents) or latents.dim() != 3:
            raise ValueError(f"latents must be a tensor (trials, T, q), got {_shape(latents)}")
        lat = latents.detach().cpu().numpy()
        N, T, q = lat.shape
        trials = list(range(min(N, 10))) if trials is None else list(trials)
        dims = list(range(q)) if dims is None else list(dims)
        t = np.arange(T) if times is None else times.detach().cpu().numpy()
        if axes is None:
            _, axes = plt.subplots(len(dims), 1, figsize=(7, 1.8 * len(dims)), sharex=True, squeeze=False)
            axes = axes[:, 0]
        axes = np.atleast_1d(axes)
        for ax, i in zip(axes, dims):
            for n in trials:
                tn = t if t.ndim == 1 else t[n]
                line = ax.plot(tn, lat[n, :, i], lw=1, **plot_kw)[0]
                if truth is not None:
                    ax.plot(tn, truth[n, :, i].detach().cpu().numpy(), ls="--", lw=1, color=line.get_color())
            ax.set_ylabel(f"latent {i + 1}")
        axes[-1].set_xlabel("time")
        return axes


@register_model("gpfa")
def _matrix_case():
    y, times, _ = GPFA.simulate(num_trials=4, num_bins=6, num_latents=2, obs_dim=5, seed=0, dtype=torch.float32)
    return GPFA(2, 5, name="matrix_gpfa"), (y, times)


class SharedGPFA(GPFA):
    r"""Shared GPFA over subjects (S-GPFA): one set of latent trajectories per trial, seen by
    every subject through its own loadings,

    .. math::

        y^{(s)}_t = C_s x_t + d_s + \varepsilon^{(s)}_t, \qquad
        \varepsilon^{(s)}_t \sim \mathcal N(0, R_s), \quad s = 1..S,

    with the GP prior of :class:`GPFA` on :math:`x`.  Because every :math:`R_s` is diagonal,
    the subjects stacked along the neuron axis form one GPFA with
    :math:`C = [C_1; \dots; C_S]`, so exact EM, the Kalman form, ``transform`` and
    leave-neuron-out all apply unchanged; ``model`` observes each subject at its own site
    ``{name}.y{s}``.  Data: a list of ``S`` tensors ``(trials, T, D_s)`` recorded on the same
    trials and time points.

    :param int num_latents: q.
    :param obs_dims: ``[D_1, ..., D_S]``.

    Other options as :class:`GPFA`.  :meth:`subject_params` returns ``(C_s, d_s, R_s)``.
    """

    def __init__(self, num_latents: int, obs_dims: Sequence[int], name: str = "sgpfa", **kw):
        obs_dims = list(obs_dims)
        if not obs_dims or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in obs_dims):
            raise ValueError(f"obs_dims must be a non-empty list of positive ints, got {obs_dims!r}")
        if kw.get("likelihood", "gaussian") != "gaussian":
            raise ValueError("SharedGPFA has Gaussian observations.")
        super().__init__(num_latents, sum(obs_dims), name=name, **kw)
        self.obs_dims = obs_dims
        self._offsets = [0] + list(torch.cumsum(torch.tensor(obs_dims), 0).tolist())

    def _stack(self, ys):
        if not isinstance(ys, (list, tuple)) or len(ys) != len(self.obs_dims):
            raise ValueError(f"SharedGPFA takes a list of {len(self.obs_dims)} tensors (one per subject), got "
                             f"{type(ys).__name__ if not isinstance(ys, (list, tuple)) else len(ys)}.")
        for s, (v, D) in enumerate(zip(ys, self.obs_dims)):
            if not torch.is_tensor(v) or v.dim() != 3 or v.shape[-1] != D or v.shape[:2] != ys[0].shape[:2]:
                raise ValueError(f"subject {s}: y must have shape (trials, T, {D}) with the same trials and "
                                 f"time points as subject 0 {tuple(ys[0].shape[:2])}, got {_shape(v)}.")
        return torch.cat(list(ys), -1)

    def _data(self, y, times=None, lengths=None) -> _Data:
        return super()._data(self._stack(y) if isinstance(y, (list, tuple)) else y, times, lengths)

    def subject_params(self, s: int):
        """``(C_s, d_s, R_s)`` of subject ``s``."""
        a, b = self._offsets[s], self._offsets[s + 1]
        P = self.get_params()
        return P["C"][a:b], P["d"][a:b], P["R"][a:b]

    @pyro_method
    def model(self, y, times=None, lengths=None, subsample_size: Optional[int] = None):
        """Shared latents ``{name}.x``; subject ``s`` observed at ``{name}.y{s}``."""
        data = self._data(y, times, lengths)
        self._ensure_params(data)
        q = self.num_latents
        with pyro.plate(f"{self.name}.trials", data.N, subsample_size=subsample_size, dim=-1,
                        device=data.y.device) as ind:
            mask = None if data.mask is None else data.mask.index_select(0, ind)
            if data.shared:
                L = torch.linalg.cholesky(_prior_cov(self.kind, self.tau, data.times[0], self.eps))
                prior = dist.MultivariateNormal(data.y.new_zeros(data.T), scale_tril=L).expand([len(ind), q])
            else:
                L = torch.linalg.cholesky(_prior_cov(self.kind, self.tau, data.times.index_select(0, ind),
                                                     self.eps, mask))
                prior = dist.MultivariateNormal(data.y.new_zeros(data.T), scale_tril=L)
            x = pyro.sample(f"{self.name}.x", prior.to_event(1))
            f = torch.einsum("dq,...nqt->...ntd", self.C, x) + self.d
            yb = data.y.index_select(0, ind)
            scale = self.R.sqrt()
            for s in range(len(self.obs_dims)):
                a, b = self._offsets[s], self._offsets[s + 1]
                obs = dist.Normal(f[..., a:b], scale[a:b])
                if mask is not None:
                    obs = obs.mask(mask[..., None])
                pyro.sample(f"{self.name}.y{s}", obs.to_event(2), obs=yb[..., a:b])
        return f

    @staticmethod
    def simulate_subjects(obs_dims=(30, 20), num_trials: int = 50, num_bins: int = 50, num_latents: int = 3,
                          seed: int = 0, **kw):
        """``(ys, times, truth)``: one GPFA draw split by neurons into subjects."""
        y, times, truth = GPFA.simulate(num_trials, num_bins, num_latents, sum(obs_dims), seed=seed, **kw)
        ys = list(torch.split(y, list(obs_dims), -1))
        return ys, times, truth
