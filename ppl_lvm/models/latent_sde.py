r"""Latent stochastic differential equations (latent SDEs), with Brownian or fractional noise.

**Model** (Li, Wong, Chen & Duvenaud 2020).  A latent path :math:`z(t) \in \mathbb R^L` follows
the prior SDE and emits observations at (irregular) times :math:`t_1 < \dots < t_T`:

.. math::

    z(t_0) \sim \mathcal N(m, \mathrm{diag}\, s^2), \qquad
    dz = h_\theta(z, t)\,dt + g(z, t)\,dW(t), \qquad
    y_{t_i} \mid z(t_i) \sim \mathrm{Normal}/\mathrm{Laplace}\big(d_\theta(z(t_i)), \sigma_y\big),

with :math:`g` diagonal.  The posterior (the guide) is an SDE with the *same* diffusion and a
drift that sees a context :math:`c_t` computed by a GRU that reads the observations backwards
in time (so :math:`c_t` summarizes the observations after :math:`t`):

.. math::

    z(t_0) \sim \mathcal N(\mu_\phi(c_{t_0}), \mathrm{diag}\,\sigma_\phi^2(c_{t_0})), \qquad
    dz = f_\phi(z, c_t, t_{\mathrm{next}} - t)\,dt + g(z, t)\,dW(t),

with :math:`t_{\mathrm{next}}` the next observation time (an addition to Li et al.'s drift: the
bridge-like pull toward an observation depends on the time left until it).

With :math:`u = (f_\phi - h_\theta)/g` Girsanov's theorem gives the log density ratio of the
two path measures, :math:`\log \tfrac{dQ}{dP} = \int u^\top dW_Q + \tfrac12 \int |u|^2 dt`, so
the evidence lower bound is

.. math::

    \mathcal L = \mathbb E_Q\Big[\sum_i \log p(y_{t_i} \mid z(t_i))\Big]
        - \mathrm{KL}\big(q(z_0)\,\|\,p(z_0)\big)
        - \mathbb E_Q\Big[\int_{t_0}^{t_T} \tfrac12 |u(z, t)|^2\,dt\Big].

**As a Pyro program.**  The guide draws ``z0`` from :math:`q(z_0)` and then the whole path
(``z_path``: its values at the observation times, plus one channel holding the accumulated
path log-ratio) from the posterior SDE with ``torchsde.sdeint``; the path site is a ``Delta``
in the guide (log density 0: the density of :math:`Q` with respect to itself).  The model
draws ``z0`` from :math:`p(z_0)`, scores the path site with density 0 and adds the path's
log density :math:`\log dP/dQ` with ``pyro.factor("path_kl", -beta * log_ratio)``.  A model
run on its own (no guide) simulates the prior SDE, whose log-ratio channel is 0 (``dP/dP``).
So the ELBO that SVI computes is :math:`\mathcal L` above (tested to machine precision).

``path_kl="logqp"`` (the default, Li et al.'s estimator) takes the log-ratio from
``sdeint(..., logqp=True)``: :math:`\tfrac12\int|u|^2dt` per path, without the martingale
term :math:`\int u^\top dW`, whose mean is zero.  Its mean is right, so the ELBO and its
gradient are unbiased, but it is **not** an importance weight: IWAE, chi^2-VIS and
importance-sampled evidence estimates need ``path_kl="girsanov"``, which carries
:math:`\ell = \int \tfrac12|u|^2dt + \int u^\top dW` as an extra state of a general-noise SDE
(Itô Euler), so that :math:`\mathbb E_Q[e^{-\ell}] = 1` exactly.

**Learned posterior diffusion** (``posterior_diffusion="learned"``).  Discretized with Euler
steps of size :math:`h`, both SDEs are Gaussian Markov chains, and the shared-diffusion family
cannot represent the chain's exact posterior, whose transition variance before an observation
is :math:`g^2h/(1 + g^2 h P)` (:math:`P` the precision of what the future observations say
about the step's end): each step loses :math:`\tfrac12[x - \log(1+x)]`, :math:`x = g^2hP`,
and the ELBO's maximizer shrinks the diffusion by O(dt) (42% at dt 0.1 with observation noise
0.1, :func:`ou_euler_elbo_optimum`).  With ``"learned"`` the posterior's step is
:math:`z' \sim \mathcal N(z + f_\phi h,\ g^2 s^2 h)`, :math:`s^2 = e^{-h\rho}`, and the
path KL is the sum over steps of the Gaussian KL of the two transitions,

.. math::

    \mathrm{KL}_k = \frac{(f_\phi - h_\theta)^2 h}{2 g^2} + \tfrac12\big[s^2 - 1 - \log s^2\big],

carried as an extra state with drift :math:`\mathrm{KL}_k / h` (Euler integrates it exactly;
the step's :math:`h` is the solver's).  The family then contains the chain's exact posterior
(for a linear-Gaussian prior), so the ELBO's optimum is the Euler chain's log-evidence
(tested against a Kalman filter) and its maximizer the chain's maximum-likelihood estimate.  As
:math:`h \to 0` with :math:`\rho` bounded, :math:`s \to 1` and the variance term vanishes like
:math:`h\rho^2/4` per unit time: the continuous-time family of the shared case.  With
fractional noise the Brownian increments of each latent dimension (shared by :math:`z` and its
:math:`Y_k`) are scaled by :math:`s`, and the KL adds the same variance term per dimension to
:math:`\tfrac12 u^2 h`.  Only the per-step KL is available, not an importance weight (the
log-ratio has a term in the squared Brownian increment), so this is for the ELBO (SVI).

**Fractional noise** (``noise="fractional"``; Daems, Opper, Crevecoeur & Birdal, ICLR 2024).
Fractional Brownian motion of Hurst index :math:`H` (type II, Riemann-Liouville,
:math:`B_H(t) = \Gamma(H+\tfrac12)^{-1}\int_0^t (t-s)^{H-1/2}dW_s`) is approximated by
:math:`\hat B_H(t) = \sum_{k=1}^K \omega_k Y_k(t)`, :math:`dY_k = -\gamma_k Y_k\,dt + dW`
(one :math:`W` per latent dimension shared by its :math:`K` processes),
:math:`\gamma_k = r^{k-(K+1)/2}`, :math:`r = \gamma_{\max}^{2/(K-1)}`.  The weights minimizing
:math:`\int_0^T \mathbb E(B_H - \hat B_H)^2 dt` solve :math:`A\omega = b` with
:math:`A_{ij} = [T - (1 - e^{-(\gamma_i+\gamma_j)T})/(\gamma_i+\gamma_j)]/(\gamma_i+\gamma_j)`
and :math:`b_k = T\gamma_k^{-(H+1/2)}P(H+\tfrac12, \gamma_kT) -
(H+\tfrac12)\gamma_k^{-(H+3/2)}P(H+\tfrac32,\gamma_kT)`, computed by Gauss-Legendre
quadrature of :math:`b_k = \Gamma(H+\tfrac32)^{-1}\int_0^{T^{H+1/2}}(T - v^{1/(H+1/2)})
e^{-\gamma_k v^{1/(H+1/2)}}dv` so that a learned :math:`H` gets gradients.  The latent path
solves :math:`dz = h\,dt + g\,d\hat B_H`, i.e. on the Markov state :math:`(z, Y)`

.. math::

    dz = \big[h + g \textstyle\sum_k \omega_k(-\gamma_k Y_k + u)\big]dt + g\,(\textstyle\sum_k\omega_k)\,dW,
    \qquad dY_k = (-\gamma_k Y_k + u)\,dt + dW,

with :math:`u = 0` under the prior and a learned control :math:`u(z, Y, c_t)` (one per latent
dimension) under the posterior; :math:`\mathrm{KL} = \mathbb E\int \tfrac12|u|^2dt` is an
extra state (general noise: Itô Euler).  Stability of the explicit scheme needs
:math:`\gamma_{\max}\,dt < 1/2`.

References:

1. Li, Wong, Chen, Duvenaud. *Scalable gradients for stochastic differential equations*.
   AISTATS 2020 (the latent SDE, its ELBO and the stochastic adjoint; torchsde).
2. Kidger, Foster, Li, Lyons. *Efficient and accurate gradients for neural SDEs*. NeurIPS 2021.
3. Daems, Opper, Crevecoeur, Birdal. *Variational inference for SDEs driven by fractional noise*.
   ICLR 2024 (the Markov approximation of fBM and its optimal weights).
4. Harms, Stefanovits. *Affine representations of fractional processes with applications in
   mathematical finance*. Stoch. Proc. Appl. 2019 (fBM as a mixture of OU processes).
"""

from __future__ import annotations

import bisect
import math
import warnings
from typing import Dict, Optional, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torchsde
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn
from torch.distributions import constraints

from . import register_model, warn_if_name_in_use
from .vae import mlp
from ..numerics import tiny
from ..validation import check_choice, check_positive, check_positive_int, check_real

__all__ = ["LatentSDE", "LatentSDEStateSpace", "KLAnnealing", "fbm_weights", "fbm_b_closed_form", "fbm_b_quadrature",
           "fbm_gammas", "fbm_variance", "rl_fbm_covariance", "markov_fbm_variance", "union_grid", "simulate_ou",
           "simulate_fractional_ou", "fractional_ou_log_likelihood", "ou_euler_elbo_optimum",
           "ou_grid_elbo_optimum", "interval_steps"]

LIKELIHOODS = ("gaussian", "laplace")
NOISES = ("brownian", "fractional")
DRIFTS = ("neural", "ou")
DIFFUSIONS = ("neural", "constant")
DECODERS = ("neural", "linear", "identity")
PATH_KLS = ("logqp", "girsanov")
POSTERIOR_DIFFUSIONS = ("auto", "shared", "learned")
POSTERIOR_DRIFTS = ("auto", "full", "residual")
DIAGONAL_METHODS = ("euler", "milstein", "srk")
GENERAL_METHODS = ("euler",)


# =========================================================================== fractional noise
def fbm_gammas(num_ou: int, gamma_max: float, dtype=torch.float64, device=None) -> torch.Tensor:
    r""":math:`\gamma_k = r^{k-(K+1)/2}`, :math:`r = \gamma_{\max}^{2/(K-1)}`, :math:`k = 1..K`
    (geometric between :math:`1/\gamma_{\max}` and :math:`\gamma_{\max}`; ``K = 1`` gives
    :math:`\gamma_1 = 1`)."""
    K = check_positive_int(num_ou, "num_ou")
    gamma_max = check_positive(gamma_max, "gamma_max")
    if K == 1:
        return torch.ones(1, dtype=dtype, device=device)
    r = gamma_max ** (2.0 / (K - 1))
    k = torch.arange(1, K + 1, dtype=dtype, device=device)
    return r ** (k - (K + 1) / 2)


def _gram(gammas: torch.Tensor, T) -> torch.Tensor:
    r""":math:`A_{ij} = \int_0^T \mathrm{Cov}(Y_i(t), Y_j(t))\,dt`, with the limit
    :math:`T^2/2 - sT^3/6 + s^2T^4/24` for :math:`s = \gamma_i+\gamma_j \to 0`."""
    s = gammas[:, None] + gammas[None, :]
    sT = s * T
    small = sT < 1e-3
    safe = torch.where(small, torch.ones_like(s), s)
    exact = (T + torch.expm1(-safe * T) / safe) / safe
    series = T ** 2 / 2 - s * T ** 3 / 6 + s ** 2 * T ** 4 / 24
    return torch.where(small, series, exact)


def fbm_b_closed_form(hurst: float, gammas, T: float) -> np.ndarray:
    r""":math:`b_k = T\gamma_k^{-a}P(a, \gamma_kT) - a\gamma_k^{-a-1}P(a+1, \gamma_kT)`,
    :math:`a = H + 1/2`, with scipy's regularized lower incomplete gamma :math:`P`
    (float64 numpy; the reference the quadrature is tested against)."""
    from scipy.special import gammainc

    g = np.asarray(torch.as_tensor(gammas).detach().cpu(), dtype=np.float64)
    a = hurst + 0.5
    return T * g ** (-a) * gammainc(a, g * T) - a * g ** (-a - 1) * gammainc(a + 1, g * T)


#: Gauss-Legendre nodes/weights on [0, 1] per (number of nodes), cached in float64
_GL_CACHE: Dict[int, tuple] = {}


def _gauss_legendre(n: int):
    if n not in _GL_CACHE:
        x, w = np.polynomial.legendre.leggauss(n)
        _GL_CACHE[n] = ((x + 1) / 2, w / 2)
    return _GL_CACHE[n]


def fbm_b_quadrature(hurst, gammas: torch.Tensor, T: float, num_nodes: int = 48,
                     num_panels: int = 12) -> torch.Tensor:
    r""":math:`b_k = \Gamma(H+\tfrac32)^{-1}\int_0^{T^{a}}(T - v^{1/a})e^{-\gamma_k v^{1/a}}dv`,
    :math:`a = H + 1/2`, by composite Gauss-Legendre quadrature, differentiable in ``hurst``
    (a tensor) through ``torch.lgamma``.  The integrand varies fastest near :math:`v = 0`
    (:math:`v^{1/a}` has an unbounded derivative there for :math:`H > 1/2`, and
    :math:`e^{-\gamma v^{1/a}}` decays on a scale :math:`\gamma^{-a}`), so the panels are
    graded geometrically toward 0 (each half the width of the next)."""
    hurst = torch.as_tensor(hurst, dtype=gammas.dtype, device=gammas.device)
    a = hurst + 0.5
    upper = T ** a
    x, w = _gauss_legendre(num_nodes)
    x = torch.as_tensor(x, dtype=gammas.dtype, device=gammas.device)
    w = torch.as_tensor(w, dtype=gammas.dtype, device=gammas.device)
    # panel edges 0, 2^-(P-1), ..., 1/2, 1 (as fractions of the upper limit)
    edges = torch.cat([gammas.new_zeros(1),
                       2.0 ** torch.arange(-(num_panels - 1), 1, dtype=gammas.dtype, device=gammas.device)])
    lo, hi = edges[:-1], edges[1:]
    frac = lo[:, None] + (hi - lo)[:, None] * x[None, :]  # (P, n) in (0, 1)
    wts = ((hi - lo)[:, None] * w[None, :]).reshape(-1)
    v = upper * frac.reshape(-1)  # (P n,)
    s = v ** (1.0 / a)  # the time variable x = v^(1/a)
    integrand = (T - s)[None, :] * torch.exp(-gammas[:, None] * s[None, :])
    return upper * (integrand * wts).sum(-1) * torch.exp(-torch.lgamma(a + 1))


def fbm_weights(hurst, gammas: torch.Tensor, T: float) -> torch.Tensor:
    r"""Optimal weights :math:`\omega` of the Markov approximation (type II fBM): the solution
    of :math:`A\omega = b` (module docstring), in float64 and cast back to ``gammas``' dtype."""
    g64 = gammas.to(torch.float64)
    A = _gram(g64, float(T))
    b = fbm_b_quadrature(torch.as_tensor(hurst).to(g64), g64, float(T))
    return torch.linalg.solve(A, b).to(gammas.dtype)


def fbm_variance(hurst: float, t):
    r""":math:`\mathrm{Var}\,B_H(t) = t^{2H} / (2H\,\Gamma(H+\tfrac12)^2)` of type II fBM."""
    return t ** (2 * hurst) / (2 * hurst * math.gamma(hurst + 0.5) ** 2)


def markov_fbm_variance(omega: torch.Tensor, gammas: torch.Tensor, t):
    r""":math:`\mathrm{Var}\,\hat B_H(t) = \sum_{ij}\omega_i\omega_j(1 - e^{-(\gamma_i+\gamma_j)t})
    /(\gamma_i+\gamma_j)` (with the limit :math:`t` as :math:`\gamma_i+\gamma_j \to 0`)."""
    t = torch.as_tensor(t, dtype=gammas.dtype, device=gammas.device).reshape(-1, 1, 1)
    s = (gammas[:, None] + gammas[None, :])
    safe = torch.where(s > 0, s, torch.ones_like(s))
    cov = torch.where(s > 0, -torch.expm1(-safe * t) / safe, t.expand(-1, *s.shape))
    return torch.einsum("i,tij,j->t", omega, cov, omega)


# =========================================================================== data handling
def union_grid(times: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    r"""Put sequences observed at their own times on the union of their grids.

    :param times: ``B`` strictly increasing 1-d tensors (``T_b`` times each).
    :param values: ``B`` tensors ``(T_b, D)``.
    :returns: ``(ts, ys, mask)``: the sorted union ``ts`` ``(T,)``, ``ys`` ``(B, T, D)`` (zeros
        where a sequence has no observation) and ``mask`` ``(B, T)`` (True where observed).
    """
    if not isinstance(times, (list, tuple)) or not isinstance(values, (list, tuple)) or len(times) != len(values) \
            or not times:
        raise ValueError("times and values must be lists of the same (non-zero) length, one entry per sequence.")
    for b, (t, v) in enumerate(zip(times, values)):
        if not torch.is_tensor(t) or t.dim() != 1 or not torch.is_tensor(v) or v.dim() != 2 or v.shape[0] != t.shape[0]:
            raise ValueError(f"Sequence {b}: times must be 1-d (T_b,) and values (T_b, D) with the same T_b, got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__} and "
                             f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}.")
        if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            raise ValueError(f"times[{b}] must be strictly increasing (sort it and drop duplicated times).")
    ts = torch.unique(torch.cat([t.to(values[0].dtype) for t in times]))  # sorted
    B, T, D = len(times), ts.shape[0], values[0].shape[-1]
    ys = values[0].new_zeros(B, T, D)
    mask = torch.zeros(B, T, dtype=torch.bool, device=ts.device)
    for b, (t, v) in enumerate(zip(times, values)):
        idx = torch.searchsorted(ts, t.to(ts.dtype))
        ys[b, idx] = v
        mask[b, idx] = True
    return ts, ys, mask


# =========================================================================== networks
# The posterior network's time inputs, None: by noise (``LatentSDE._default_time_features``); a
# tuple of "gap" / "steps" / "bridge" overrides it (benchmarks/latent_sde_hurst.py compares them).
_TIME_FEATURES = None
STEPS_LEFT_CAP = 16.0  # the "steps" input saturates here (the measured fits had at most 10 steps per gap)


def _mlp(sizes, activation=nn.Softplus):
    """The library's MLP (:func:`ppl_lvm.models.vae.mlp`) with softplus activations (smooth
    drifts and diffusions)."""
    return mlp(sizes, activation)


class _DiagonalNets(nn.Module):
    r"""``L`` independent one-input MLPs :math:`g_i(z_i) = \mathrm{softplus}(\mathrm{MLP}_i(z_i))`
    evaluated in one batched call (diagonal noise whose :math:`i`-th entry depends on
    :math:`z_i` only, the condition torchsde's diagonal-noise Milstein/SRK schemes assume)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, hidden) / 2)
        self.b1 = nn.Parameter(torch.zeros(dim, hidden))
        self.w2 = nn.Parameter(torch.randn(dim, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(dim))

    def forward(self, z):  # z (N, L)
        h = nn.functional.softplus(z[..., None] * self.w1 + self.b1)
        return nn.functional.softplus((h * self.w2).sum(-1) + self.b2)


# =========================================================================== SDE objects for torchsde
def _solver_clock(ts: torch.Tensor) -> torch.Tensor:
    r"""The times handed to torchsde, in float64 whatever the data's dtype.  A float32 clock
    cannot keep a regular step grid on the observation times (its rounding, ~eps |t|, outgrows
    the 1e-9 step stretch of :meth:`LatentSDE._integrate`), which forced one ``sdeint`` call per
    observation interval (torchsde's per-call checks made a float32 training iteration 1.55x
    the plain torchsde loop's).  A grid that is regular up to its dtype's rounding
    (:math:`\max |\Delta t_i - \Delta t_j| \le 64\,\epsilon \max |t|`, e.g. ``linspace`` in
    float32) is replaced by the exact float64 grid ``t_0 + i (t_{T-1} - t_0)/(T - 1)``, a move
    of the times within their own rounding error; other grids are converted as they are."""
    out = ts.to(torch.float64)
    if ts.shape[0] > 2 and ts.dtype != torch.float64:
        gaps = out[1:] - out[:-1]
        tol = 64 * torch.finfo(ts.dtype).eps * float(out.abs().max())
        if float(gaps.max() - gaps.min()) <= tol:
            T = ts.shape[0]
            out = out[0] + torch.arange(T, dtype=torch.float64, device=ts.device) * ((out[-1] - out[0]) / (T - 1))
    return out


class _SDE(nn.Module):
    """The drift/diffusion functions torchsde integrates (see the module docstring).

    ``kind``: ``"diagonal"`` (Brownian, state ``z``; with ``posterior`` it also has ``h`` for
    ``logqp``), ``"girsanov"`` (Brownian, state ``[z, l]``, general noise), ``"learned"``
    (Brownian posterior with ``posterior_diffusion="learned"``, state ``[z, l]``, diagonal noise
    with a zero column for ``l``) or ``"fractional"`` (state ``[z, Y, l]``, general noise).
    ``step``: the Euler step of the current ``sdeint`` call (set by ``LatentSDE._integrate``),
    which the learned posterior diffusion's per-step KL needs.
    """

    sde_type = "ito"

    def __init__(self, owner: "LatentSDE", params: dict, kind: str, posterior: bool, ts=None, ctx=None,
                 fast_context: bool = True):
        super().__init__()
        self.owner, self.p, self.kind, self.posterior = owner, params, kind, posterior
        self.noise_type = "general" if kind in ("girsanov", "fractional") else "diagonal"
        self.ts, self.ctx = ts, ctx
        # per-time rows of the context (see ``_pre``); under the adjoint ``ctx`` itself is an
        # adjoint parameter, whose per-step gradient the adjoint forms either way
        self._ctx_rows = ctx.unbind(0) if ctx is not None and fast_context else ctx
        self.L = owner.latent_dim
        self.learned = posterior and owner.posterior_diffusion == "learned"
        self.residual = posterior and owner.posterior_drift == "residual"
        self.step = None
        self.rate_unit = None  # the module's nominal dt: the network outputs a = rho * dt
        self._times = None if ts is None else ts.tolist()
        self.time_unit = max((b - a for a, b in zip(self._times[:-1], self._times[1:])), default=1.0) \
            if self._times else 1.0
        self._pre = None
        net = owner.posterior_net
        if posterior and ctx is not None and fast_context and isinstance(net, nn.Sequential) \
                and isinstance(net[0], nn.Linear) and net[0].in_features > ctx.shape[-1] + len(owner._time_features):
            # the first layer's context columns applied once per observation time instead of once
            # per solver step: W [s, c, left] + b = W_s s + (W_c c + b) + w_left * left
            W, C = net[0].weight, ctx.shape[-1]
            F = len(owner._time_features)
            S = W.shape[1] - C - F
            self._w_state, self._w_left = W[:, :S].T, W[:, S + C:].T  # (S, hidden), (F, hidden)
            # one (N, hidden) tensor per observation time: indexing a (T, N, hidden) tensor at every
            # step would make every step's backward write a zero-filled (T, N, hidden) gradient
            self._pre = nn.functional.linear(ctx, W[:, S:S + C], net[0].bias).unbind(0)
            self._rest = net[1:]

    def _where(self, t):
        """Index of the next observation time (the context that summarizes what is still to be
        seen) and the time left until it (a Brownian bridge's drift toward an observation grows
        like 1 / (t_next - t), which the network cannot infer from ``c`` alone on an irregular
        grid)."""
        tf = float(t)
        i = min(bisect.bisect_right(self._times, tf), len(self._times) - 1)
        return i, max(self._times[i] - tf, 0.0)

    def _time_inputs(self, left):
        """The network's inputs for the time left until the next observation (floats)."""
        out = []
        for name in self.owner._time_features:
            if name == "gap":  # a fraction of the largest observation gap: of order one, smooth in t
                out.append(left / self.time_unit)
            elif name == "steps":  # the last steps before an observation; capped, so a long gap gives no huge input
                out.append(min(left / self.rate_unit, STEPS_LEFT_CAP))
            else:  # "bridge"
                out.append(self.rate_unit / (self.rate_unit + left))
        return out

    def _net(self, t, z, extra=None):
        i, left = self._where(t)
        feats = self._time_inputs(left)
        state = z if extra is None else torch.cat([z, extra], -1)
        if self._pre is not None:
            hid = torch.addmm(self._pre[i], state, self._w_state)
            for f, w in zip(feats, self._w_left):
                hid = hid + f * w
            return self._rest(hid)
        c = self._ctx_rows[i]
        return self.owner.posterior_net(torch.cat([state, c, c.new_tensor(feats).expand(c.shape[:-1] + (len(feats),))], -1))

    def post(self, t, z, extra=None, prior=None):
        """The posterior network: its drift (or, with fractional noise, control) ``(N, L)`` and,
        with ``posterior_diffusion="learned"``, ``a = rho * dt`` ``(N, L)`` (else None; see ``_variance_kl``)."""
        out = self._net(t, z, extra)
        drift, a = (out[..., :self.L], out[..., self.L:]) if self.learned else (out, None)
        if self.residual:  # the network's output is the correction to the prior drift (``prior``: its value)
            drift = drift + (self.prior_drift(t, z) if prior is None else prior)
        return drift, a

    def post_drift(self, t, z, extra=None):
        return self.post(t, z, extra)[0]

    def _variance_kl(self, a):
        r"""Per unit time, the variance part of the per-step Gaussian KL,
        :math:`\tfrac1{2h}[s^2 - 1 - \log s^2]` with :math:`s^2 = e^{-h\rho}` (``expm1``: no
        cancellation for small :math:`h\rho`), and the step's noise multiplier :math:`s`.  The
        network's output is :math:`a = \rho\, dt` (``dt`` the module's nominal step), the log
        variance reduction of one nominal step, of order one whatever ``dt``: the optimum
        :math:`\rho = \log(1 + g^2hP)/h` is of order :math:`1/dt` at coarse steps."""
        h = self.step
        a = torch.where(a > 0, a, 3.0 * torch.tanh(a / 3.0))  # inflation s^2 < e^3 per nominal step (C^1 at 0)
        hr = (h / self.rate_unit) * a
        return 0.5 * (torch.expm1(-hr) + hr) / h, torch.exp(-0.5 * hr)

    def prior_drift(self, t, z):
        return self.owner._prior_drift(z, t, self.p)

    def diffusion(self, t, z):
        return self.owner._diffusion(z, self.p)

    def f_and_g(self, t, y):
        """Drift and diffusion with one posterior-network evaluation (torchsde's Euler step calls
        this when it exists; ``f`` and ``g`` alone serve the other callers)."""
        if self.kind == "diagonal":
            return self.f(t, y), self.g(t, y)
        L = self.L
        z = y[..., :L]
        gz = self.diffusion(t, z)
        h = self.prior_drift(t, z)
        if self.kind in ("girsanov", "learned"):
            fz, rho = self.post(t, z, prior=h) if self.posterior else (h, None)
            u = (fz - h) / gz
            kl = 0.5 * (u * u)
            if self.kind == "learned":
                var_kl, s = self._variance_kl(rho)
                drift = torch.cat([fz, (kl + var_kl).sum(-1, keepdim=True)], -1)
                return drift, torch.cat([gz * s, torch.zeros_like(z[..., :1])], -1)
            drift = torch.cat([fz, kl.sum(-1, keepdim=True)], -1)
            return drift, torch.cat([torch.diag_embed(gz), u[..., None, :]], -2)
        # fractional
        K = self.owner.num_ou
        Y = y[..., L:L + L * K].reshape(y.shape[:-1] + (L, K))
        gam, om = self.p["gammas"], self.p["omega"]
        u, rho = self.post(t, z, Y.flatten(-2)) if self.posterior else (torch.zeros_like(z), None)
        dY = -gam * Y + u[..., None]
        dz = h + gz * (dY * om).sum(-1)
        kl = 0.5 * (u * u)
        s = None
        if rho is not None:
            var_kl, s = self._variance_kl(rho)
            kl = kl + var_kl
        drift = torch.cat([dz, dY.flatten(-2), kl.sum(-1, keepdim=True)], -1)
        eye = torch.diag_embed(torch.ones_like(z) if s is None else s)  # (N, L, L): column i scaled by s_i
        top = eye * (gz * om.sum())[..., :, None]
        ys = eye[..., :, None, :].expand(z.shape[:-1] + (L, K, L)).reshape(z.shape[:-1] + (L * K, L))
        last = torch.zeros_like(z)[..., None, :]
        if self.owner.path_kl == "girsanov" and self.posterior:
            last = u[..., None, :]
        return drift, torch.cat([top, ys, last], -2)

    # ---- diagonal (torchsde's logqp needs f, g, h)
    def f(self, t, y):
        if self.kind == "diagonal":
            return self.post_drift(t, y) if self.posterior else self.prior_drift(t, y)
        return self.f_and_g(t, y)[0]

    def h(self, t, y):
        return self.prior_drift(t, y)

    def g(self, t, y):
        if self.kind == "diagonal":
            return self.diffusion(t, y)
        return self.f_and_g(t, y)[1]


# =========================================================================== the path site
class _PathSupport(constraints.Constraint):
    """Support of a latent SDE path: real values, with the path's first point pinned to the
    initial state ``start`` (exposed as ``lower_bound``/``upper_bound`` of that point).  The pin
    depends on the ``z0`` draw, so backends that map every latent to unconstrained space with
    one fixed transform (SG-HMC, the SMC samplers) see a support that depends on another latent
    and refuse the model by name: a path of an SDE cannot be moved freely by a gradient sampler."""

    is_discrete = False
    event_dim = 2

    def __init__(self, start: torch.Tensor):
        self.lower_bound = start.detach()
        self.upper_bound = start.detach()
        super().__init__()

    def check(self, value):
        return torch.ones(value.shape[:-2], dtype=torch.bool, device=value.device)


class _PriorPath(dist.TorchDistribution):
    """The model's path site: ``sample()`` simulates the prior SDE (the log-ratio channel is
    0); ``log_prob`` is 0, the path's density being carried by the ``path_kl`` factor (module
    docstring)."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, simulate, start, event_shape):
        self._simulate, self._start = simulate, start
        super().__init__(batch_shape=start.shape[:-1], event_shape=event_shape, validate_args=False)

    @constraints.dependent_property(is_discrete=False, event_dim=2)
    def support(self):
        return _PathSupport(self._start)

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise NotImplementedError("draw several prior paths with a particle plate")
        return self._simulate()

    def log_prob(self, value):
        return value.new_zeros(value.shape[:-2])

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        start = self._start.expand(batch_shape + self._start.shape[-1:])
        sim = self._simulate
        return _PriorPath(lambda: _broadcast(sim(), batch_shape), start, self.event_shape)


def _broadcast(v, batch_shape):
    return v.expand(batch_shape + v.shape[-2:])


# =========================================================================== the model
class KLAnnealing:
    r"""KL annealing as in torchsde's latent-SDE example: the weight :math:`\beta` of the path
    and initial-state KL rises linearly from ``start`` to 1 over ``num_steps`` steps of a
    backend's ``run``; use as ``backend.run(..., callbacks=[KLAnnealing(sde, 1000)])``.  The
    objective is a lower bound on the evidence only once :math:`\beta = 1`."""

    def __init__(self, sde: "LatentSDE", num_steps: int, start: float = 0.0):
        self.sde = sde
        self.num_steps = check_positive_int(num_steps, "num_steps")
        self.start = check_real(start, "start", low=0.0, high=1.0)
        sde.kl_weight = self.weight(0)

    def weight(self, step: int) -> float:
        return min(1.0, self.start + (1 - self.start) * step / self.num_steps)

    def __call__(self, backend, step: int, loss: float) -> bool:
        self.sde.kl_weight = self.weight(step + 1)
        return False


class LatentSDE(PyroModule):
    r"""Latent SDE (module docstring): ``model(ts, ys, mask=None)`` / ``guide(ts, ys, mask=None)``.

    :param int obs_dim: D.  :param int latent_dim: L.  :param int context_dim: width of the GRU
        context.  :param int hidden_dim: width of the networks.
    :param str likelihood: ``"gaussian"`` or ``"laplace"`` (learned scale per observed dimension
        unless ``obs_scale`` fixes it).
    :param str noise: ``"brownian"`` or ``"fractional"``.
    :param str drift: prior drift, ``"neural"`` (an MLP of ``z``) or ``"ou"``
        (:math:`\theta \odot (\mu - z)`, learned ``theta``, ``mu``).
    :param str diffusion: ``"neural"`` (per-dimension MLPs of :math:`z_i`) or ``"constant"``
        (learned ``sigma`` per dimension).
    :param str decoder: ``"neural"``, ``"linear"`` or ``"identity"`` (needs ``obs_dim == latent_dim``).
    :param str method: torchsde solver (diagonal noise: euler, milstein, srk; general noise,
        i.e. ``noise="fractional"`` or ``path_kl="girsanov"``: euler).
    :param dt: solver step (``None``: half the smallest spacing of the grid, and for fractional
        noise at most :math:`0.49/\gamma_{\max}`).  Larger than the smallest observation spacing
        is refused.  Each observation interval is split into ``ceil(gap / dt)`` equal steps, so
        the observation times are points of the solver's grid (see ``_integrate``).
    :param bool adjoint: solve with ``torchsde.sdeint_adjoint`` (memory constant in the number of
        steps), passing every parameter the SDE depends on and the context as ``adjoint_params``;
        with ``path_kl="girsanov"`` the augmented general-noise SDE uses torchsde's Itô
        general-noise adjoint (Euler).  Refused with fractional noise (the error says why).
    :param str path_kl: ``"logqp"`` or ``"girsanov"`` (module docstring).
    :param obs_scale: a fixed observation scale (``None``: learned).
    :param int num_ou: K, OU processes per latent dimension (fractional noise).
    :param float gamma_max: largest OU rate (fractional noise).
    :param float hurst: initial (or, with ``learn_hurst=False``, fixed) Hurst index in (0, 1).
    :param gammas: explicit OU rates instead of the geometric grid (e.g. ``[0.0]`` with K = 1).
    :param float horizon: T of the fBM weights' objective (``None``: the span of the first data).
    :param str posterior_diffusion: ``"auto"`` (default: ``"learned"`` with ``path_kl="logqp"``
        and ``method="euler"``, else ``"shared"``), ``"shared"`` (the posterior SDE has the prior's
        diffusion, Li et al.'s family) or ``"learned"``: each Euler step of the posterior has its own variance,
        :math:`g^2 h\,e^{-h\rho}` with a log-variance rate :math:`\rho(z, c_t, t_{\rm next} - t)`
        from the posterior network, and the path KL is the exact KL of the Euler chains
        (module docstring, "Learned posterior diffusion").  Removes the O(dt) bias of the
        diffusion estimate that the shared family has at coarse ``dt``; needs
        ``path_kl="logqp"`` and ``method="euler"``.
    :param str posterior_drift: ``"auto"`` (default: ``"residual"`` with Brownian noise, else
        ``"full"``), ``"full"`` (the posterior network outputs the posterior drift
        :math:`f_\phi`, Li et al.'s and torchsde's example's form) or ``"residual"``
        (:math:`f_\phi = h_\theta + \mathrm{net}`, starting at the prior: the network learns only
        the correction, and a changed prior drift moves the posterior with it; the same family,
        easier to fit, see docs/latent_sde.md).  Brownian noise only (the fractional control is
        already relative to the prior).
    :param str name: prefix of the Pyro parameter names.
    """

    def __init__(self, obs_dim: int, latent_dim: int = 4, context_dim: int = 16, hidden_dim: int = 32,
                 likelihood: str = "gaussian", noise: str = "brownian", *, drift: str = "neural",
                 diffusion: str = "neural", decoder: str = "neural", method: str = "euler",
                 dt: Optional[float] = None, adjoint: bool = False, path_kl: str = "logqp",
                 obs_scale: Optional[float] = None, num_ou: int = 5, gamma_max: float = 20.0,
                 hurst: float = 0.5, learn_hurst: bool = True, gammas=None, horizon: Optional[float] = None,
                 posterior_diffusion: str = "auto", posterior_drift: str = "auto", name: str = "latent_sde"):
        super().__init__(name=name)
        warn_if_name_in_use(self, name)
        self.obs_dim = check_positive_int(obs_dim, "obs_dim")
        self.latent_dim = L = check_positive_int(latent_dim, "latent_dim")
        self.context_dim = C = check_positive_int(context_dim, "context_dim")
        self.hidden_dim = Hd = check_positive_int(hidden_dim, "hidden_dim")
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.noise = check_choice(noise, "noise", NOISES)
        self.drift = check_choice(drift, "drift", DRIFTS)
        self.diffusion_kind = check_choice(diffusion, "diffusion", DIFFUSIONS)
        self.decoder_kind = check_choice(decoder, "decoder", DECODERS)
        self.path_kl = check_choice(path_kl, "path_kl", PATH_KLS)
        self.posterior_diffusion = check_choice(posterior_diffusion, "posterior_diffusion", POSTERIOR_DIFFUSIONS)
        if self.posterior_diffusion == "auto":  # the learned step variance wherever it is available
            self.posterior_diffusion = "learned" if (self.path_kl == "logqp" and method == "euler") else "shared"
        self.posterior_drift = check_choice(posterior_drift, "posterior_drift", POSTERIOR_DRIFTS)
        if self.posterior_drift == "auto":
            self.posterior_drift = "residual" if self.noise == "brownian" else "full"
        if self.posterior_drift == "residual" and self.noise == "fractional":
            raise ValueError("posterior_drift='residual' is for noise='brownian': with fractional noise the posterior "
                             "network outputs the control u, which is already relative to the prior (u = 0).")
        if self.posterior_diffusion == "learned":
            if self.path_kl != "logqp":
                raise ValueError("posterior_diffusion='learned' needs path_kl='logqp': its per-step log-ratio has a "
                                 "term in the squared Brownian increment, which torchsde cannot carry as a state, so "
                                 "only the per-step KL (the ELBO's term) is available, not an importance weight. For "
                                 "IWAE / chi^2-VIS use posterior_diffusion='shared' with path_kl='girsanov'.")
            if method != "euler":
                raise ValueError(f"posterior_diffusion='learned' needs method='euler' (got {method!r}): its KL is the "
                                 "one between the Gaussian Euler transitions of posterior and prior.")
        if self.decoder_kind == "identity" and obs_dim != latent_dim:
            raise ValueError(f"decoder='identity' needs obs_dim == latent_dim, got {obs_dim} and {latent_dim}; "
                             "use decoder='linear'.")
        general = self.noise == "fractional" or self.path_kl == "girsanov"
        allowed = GENERAL_METHODS if general else DIAGONAL_METHODS
        if method not in allowed:
            why = ("the augmented state (fractional noise or path_kl='girsanov') has general noise, "
                   "for which torchsde's Ito solvers are" if general else "torchsde's Ito solvers for diagonal noise are")
            raise ValueError(f"method={method!r} is not available: {why} {allowed}.")
        self.method = method
        self.dt = None if dt is None else check_positive(dt, "dt")
        if not isinstance(adjoint, bool):
            raise TypeError(f"adjoint must be True or False, got {adjoint!r}.")
        if adjoint and self.noise == "fractional":
            raise ValueError("adjoint=True is not available with noise='fractional': torchsde 0.2.6's sdeint_adjoint "
                             "accepts this general-noise (Ito, adjoint method euler) SDE, but its gradients disagree "
                             "with the direct solver's and the gap does not shrink with dt. With the Hurst index "
                             "fixed the relative gap was 0.007, 0.019, 0.024 at gamma_max*dt 0.05, 0.025, 0.0125; the "
                             "Hurst index's gradient is then a sum of the fBM weights' gradients with large cancelling "
                             "coefficients d omega/dH (-2182, 4291, -2864, 894, -148 at H 0.3, gamma_max 5, T 1), so "
                             "it came out with the wrong sign (docs/latent_sde.md). Use adjoint=False.")
        self.adjoint = adjoint
        self.kl_weight = 1.0
        self.num_ou = check_positive_int(num_ou, "num_ou")
        self.gamma_max = check_positive(gamma_max, "gamma_max")
        self.horizon = None if horizon is None else check_positive(horizon, "horizon")
        if gammas is not None:
            gammas = torch.as_tensor(gammas, dtype=torch.get_default_dtype()).reshape(-1)
            if gammas.numel() != self.num_ou or bool((gammas < 0).any()):
                raise ValueError(f"gammas must be {self.num_ou} non-negative rates (num_ou), got {gammas.tolist()}.")
            self.gamma_max = float(gammas.max())  # the stability condition is on the fastest given rate
        elif self.noise == "fractional":
            gammas = fbm_gammas(self.num_ou, self.gamma_max, dtype=torch.get_default_dtype())
        self.register_buffer("gammas", gammas if gammas is not None else torch.zeros(0))
        hurst = check_real(hurst, "hurst", low=0.0, high=1.0, open_low=True, open_high=True)

        # ---- generative parameters
        self.pz0_loc = PyroParam(torch.zeros(L))
        self.pz0_scale = PyroParam(torch.ones(L), constraints.positive)
        if self.drift == "neural":
            self.prior_net = _mlp((L, Hd, Hd, L))
        else:
            self.theta = PyroParam(torch.ones(L), constraints.positive)
            self.mu = PyroParam(torch.zeros(L))
        if self.diffusion_kind == "neural":
            self.diffusion_net = _DiagonalNets(L, Hd)
        else:
            self.sigma = PyroParam(torch.full((L,), 0.5), constraints.positive)
        if self.decoder_kind == "neural":
            self.decoder = _mlp((L, Hd, obs_dim))
        elif self.decoder_kind == "linear":
            self.decoder = nn.Linear(L, obs_dim)
        if obs_scale is None:
            self.obs_scale = PyroParam(torch.full((obs_dim,), 0.1), constraints.positive)
        else:
            # a Python float, made a tensor in the module's dtype when read (a float32 buffer moved to
            # float64 was 0.10000000149 instead of 0.1)
            self._obs_scale_value = float(check_positive(obs_scale, "obs_scale"))
        if self.noise == "fractional":
            if learn_hurst:
                self.hurst = PyroParam(torch.tensor(hurst), constraints.interval(0.01, 0.99))
            else:
                self.register_buffer("fixed_hurst", torch.tensor(hurst))
        self.learn_hurst = learn_hurst
        # ---- inference networks
        self.encoder = nn.GRU(obs_dim + 1, Hd, batch_first=True)
        self.context_head = nn.Linear(Hd, C)
        self.qz0_net = nn.Linear(C, 2 * L)
        extra = L * self.num_ou if self.noise == "fractional" else 0
        out = 2 * L if self.posterior_diffusion == "learned" else L
        self._time_features = _TIME_FEATURES if _TIME_FEATURES is not None else self._default_time_features()
        self.posterior_net = _mlp((L + extra + C + len(self._time_features), Hd, Hd, out))
        # the log-variance rate rho starts at 0 (the shared diffusion); a residual drift at 0 (the prior)
        rows = slice(0, out) if self.posterior_drift == "residual" else slice(L, out)
        with torch.no_grad():
            self.posterior_net[-1].weight[rows].zero_()
            self.posterior_net[-1].bias[rows].zero_()

    @property
    def fixed_obs_scale(self) -> Optional[torch.Tensor]:
        """The fixed observation scale ``(D,)`` in the module's dtype and device (None if learned)."""
        value = self.__dict__.get("_obs_scale_value")
        return None if value is None else self._ref().new_full((self.obs_dim,), value)

    def _default_time_features(self):
        r"""The posterior network's inputs for the time left :math:`\tau = t_{\rm next} - t`.
        Always ``"gap"``, :math:`\tau / \Delta_{\max}` (the largest observation gap): of order
        one and smooth in :math:`t`, so the adjoint's backward solve sees the function the
        forward solve saw.  With fractional noise also ``"steps"``, :math:`\min(\tau / dt, 16)`, the
        number of solver steps left: the Euler chain's exact posterior control changes by O(1)
        between the last steps before an observation (a bridge's pull grows like :math:`1/\tau`),
        which the network resolves only on this scale.  Measured on H = 0.3 fractional-OU data
        (benchmarks/latent_sde_hurst.py, 600 steps): learned H 0.534 with "gap" alone, 0.389 with
        both (the exact Euler-chain MLE 0.351); a bounded :math:`dt/(dt + \tau)` instead gave
        0.459.  Brownian noise keeps "gap" alone: a step-scale input makes the drift vary by
        O(1) within a step, and the adjoint's gradients then stop converging as dt shrinks
        (measured with a step-scale input in place of "gap": relative adjoint-vs-direct gradient
        gaps 0.0049 / 0.0038 at dt 0.04 / 0.02 with ``path_kl="girsanov"``, against 0.0018 /
        0.00082 with "gap"); fractional noise has no adjoint (``adjoint=True`` is refused)."""
        return ("gap", "steps") if self.noise == "fractional" else ("gap",)

    # ------------------------------------------------------------------ pieces
    def _params(self, part: str) -> dict:
        """Read the PyroParams once per model/guide call (registers them with Pyro) and the
        fBM weights; ``part`` is ``"model"`` or ``"guide"``."""
        p = {"pz0_loc": self.pz0_loc, "pz0_scale": self.pz0_scale}
        if self.drift == "ou":
            p["theta"], p["mu"] = self.theta, self.mu
        if self.diffusion_kind == "constant":
            p["sigma"] = self.sigma
        p["obs_scale"] = self.fixed_obs_scale if self.fixed_obs_scale is not None else self.obs_scale
        if self.noise == "fractional":
            p["hurst_value"] = self.hurst if self.learn_hurst else self.fixed_hurst
        nets = [n for n in ("prior_net", "diffusion_net", "decoder") if hasattr(self, n)]
        if part == "guide":
            nets += ["encoder", "context_head", "qz0_net", "posterior_net"]
        for n in nets:
            pyro.module(f"{self._pyro_name}.{n}", getattr(self, n))
        return p

    def _prior_drift(self, z, t, p):
        if self.drift == "ou":
            return p["theta"] * (p["mu"] - z)
        return self.prior_net(z)

    def _diffusion(self, z, p):
        if self.diffusion_kind == "constant":
            return p["sigma"].expand(z.shape)
        return self.diffusion_net(z)

    def _decode(self, z):
        if self.decoder_kind == "identity":
            return z
        return self.decoder(z)

    def _ref(self):
        return next(self.encoder.parameters())

    def _check(self, ts, ys, mask, need_y=True):
        """Validate ``(ts, ys, mask)`` before any work; returns ``(ts, ys, mask)`` with NaN at
        masked-out entries replaced by 0 and ``mask`` ``(B, T)`` bool or None."""
        if not torch.is_tensor(ts) or ts.dim() != 1 or ts.numel() < 1:
            raise ValueError(f"ts must be a 1-d tensor of observation times (T,), got "
                             f"{tuple(ts.shape) if torch.is_tensor(ts) else type(ts).__name__}; for per-sequence "
                             "times put the sequences on the union grid with latent_sde.union_grid(...).")
        if not ts.is_floating_point() or not bool(torch.isfinite(ts).all()):
            raise ValueError("ts must hold finite floating-point times.")
        if ts.numel() > 1:
            d = ts[1:] - ts[:-1]
            if bool((d == 0).any()):
                i = int(torch.nonzero(d == 0)[0])
                raise ValueError(f"ts has a duplicated time {float(ts[i]):g} (positions {i} and {i + 1}); "
                                 "merge the observations at one time or drop the duplicate.")
            if bool((d < 0).any()):
                raise ValueError("ts must be sorted in increasing order (sort the times and the observations "
                                 "with the same permutation).")
        if not need_y:
            return ts, None, None
        if not torch.is_tensor(ys) or ys.dim() != 3 or ys.shape[1] != ts.shape[0] or ys.shape[2] != self.obs_dim:
            raise ValueError(f"ys must have shape (sequences, {ts.shape[0]} times (len(ts)), {self.obs_dim} "
                             f"(obs_dim)), got {tuple(ys.shape) if torch.is_tensor(ys) else type(ys).__name__}.")
        if ys.dtype != ts.dtype or ys.device != ts.device:
            raise ValueError(f"ts and ys must share dtype and device, got {ts.dtype}/{ts.device} and "
                             f"{ys.dtype}/{ys.device}.")
        ref = self._ref()
        if ref.dtype != ys.dtype or ref.device != ys.device:
            raise ValueError(f"The data are {ys.dtype} on {ys.device} but the module's parameters are {ref.dtype} "
                             f"on {ref.device}; call .to(ys.dtype) / .to(ys.device) on the LatentSDE first.")
        if mask is not None:
            if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(ys.shape[:2]):
                raise ValueError(f"mask must be a bool tensor of shape {tuple(ys.shape[:2])} (sequences, times), "
                                 f"got {tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}"
                                 f"{'' if not torch.is_tensor(mask) else ' ' + str(mask.dtype)}.")
            bad = ~torch.isfinite(ys) & mask[..., None]
            if bool(bad.any()):
                raise ValueError(f"ys has {int(bad.sum())} NaN/inf value(s) at observed (mask True) entries; set "
                                 "mask False there.")
            ys = torch.where(mask[..., None], ys, torch.zeros_like(ys))
            if bool(mask.all()):
                mask = None
        elif not bool(torch.isfinite(ys).all()):
            raise ValueError(f"ys has {int((~torch.isfinite(ys)).sum())} NaN/inf value(s); pass mask= (False at "
                             "missing entries) or remove them.")
        self._solver_dt(ts)  # the dt checks, before any work
        return ts, ys, mask

    def _solver_dt(self, ts) -> float:
        if ts.numel() < 2:
            return self.dt if self.dt is not None else 0.1
        min_gap = float((ts[1:] - ts[:-1]).min())
        if self.dt is not None and self.dt > min_gap * (1 + 1e-9):
            raise ValueError(f"dt={self.dt:g} is larger than the smallest observation spacing {min_gap:g}; the "
                             "fixed-step solver would step over observation times (and interpolate between "
                             f"steps). Use dt <= {min_gap:g}.")
        dt = self.dt if self.dt is not None else min_gap / 2
        if self.noise == "fractional" and self.gamma_max * dt >= 0.5:
            if self.dt is not None:
                raise ValueError(f"Fractional noise needs gamma_max * dt < 0.5 for a stable explicit scheme "
                                 f"(the fastest OU process, rate {self.gamma_max:g}), got dt={dt:g} "
                                 f"(product {self.gamma_max * dt:g}). Use dt < {0.5 / self.gamma_max:g} or a "
                                 "smaller gamma_max.")
            dt = 0.49 / self.gamma_max
        return dt

    def _fbm_params(self, p, ts):
        if self.noise != "fractional":
            return p
        T = self.horizon if self.horizon is not None else float(ts[-1] - ts[0]) if ts.numel() > 1 else 1.0
        gam = self.gammas.to(ts.dtype)
        p["gammas"] = gam
        p["omega"] = fbm_weights(p["hurst_value"], gam, T)
        return p

    def _kind(self, posterior: bool) -> str:
        if self.noise == "fractional":
            return "fractional"
        if posterior and self.posterior_diffusion == "learned":
            return "learned"
        return "girsanov" if (self.path_kl == "girsanov" and posterior) else "diagonal"

    def _context(self, ts, ys, mask):
        """GRU over reversed time: ``ctx`` ``(T, B, C)``; ``ctx[i]`` summarizes ``y_i..y_T``."""
        m = ys.new_ones(ys.shape[:2]) if mask is None else mask.to(ys.dtype)
        inp = torch.cat([ys * m[..., None], m[..., None]], -1).flip(1)
        out, _ = self.encoder(inp)
        return self.context_head(out.flip(1)).transpose(0, 1)

    def _integrate(self, sde, y0, ts, dt, logqp=False, bm=None, adjoint_params=None):
        r"""Solve over ``ts`` one observation interval at a time, each split into
        :math:`n_i = \lceil (t_i - t_{i-1}) / dt \rceil` equal steps, so that every observation
        time is a point of the solver's grid.  (One ``sdeint`` call over all of ``ts`` with a
        fixed ``dt`` steps across observation times and returns *linear interpolations* of the
        two straddling steps there, torchsde's ``integrate``: the path at ``t_i`` is then not a
        state of the Euler chain, and a step that straddles ``t_i`` uses the drift input of the
        interval before it.)  Each step is stretched by a relative 1e-9 so that the ``n_i``-th
        step is clipped exactly onto ``t_i`` (torchsde clips at ``ts[-1]``) instead of leaving a
        rounding sliver, on which torchsde 0.2.6's ``BrownianInterval`` never finishes.
        On a regular grid the same steps are taken in one ``sdeint`` call (Python overhead: one
        call per interval made the torchsde-example benchmark 1.45x slower than one call).
        Returns ``(T, N, S)`` states (and with ``logqp`` the ``(T - 1, N)`` per-interval
        log-ratios), like ``sdeint``."""
        kw = dict(method=self.method)
        adjoint = self.adjoint and torch.is_grad_enabled()
        if bm is None:
            bm = self._brownian(sde, y0, ts, logqp)
        if ts.shape[0] > 2:
            gaps = ts[1:] - ts[:-1]
            eps = torch.finfo(ts.dtype).eps
            regular = float(gaps.max() - gaps.min()) <= 1e-12 * float(gaps.max())
            n_all = math.ceil(float(gaps.max()) / dt - 1e-9) * (ts.shape[0] - 1)
            h = float(gaps.max()) / math.ceil(float(gaps.max()) / dt - 1e-9)
            # one call only if the 1e-9 stretch per step outgrows the time arithmetic's rounding
            # (eps |t| per step: float64 yes, float32 no) and its accumulation over all steps stays
            # below 1e-4 of a step
            if regular and 1e-9 * h > 64 * eps * float(ts.abs().max()) and 1e-9 * n_all < 1e-4:
                # a regular grid: one call, the same equal steps.  The 1e-9 stretch keeps the
                # step grid a relative ~1e-9 of a step *after* each observation time, so the
                # returned value there is the Euler state up to that fraction of one step's
                # increment, and a step starting at an observation time sees the next interval.
                gap = float(gaps.max())
                n = max(1, math.ceil(gap / dt - 1e-9))
                step = dict(kw, dt=gap / n * (1 + 1e-9), bm=bm)
                sde.step = step["dt"]
                if adjoint:
                    return torchsde.sdeint_adjoint(sde, y0, ts, logqp=logqp, adjoint_params=adjoint_params, **step)
                return torchsde.sdeint(sde, y0, ts, logqp=logqp, **step)
        outs, logrs, y = [y0], [], y0
        for a, b in zip(ts[:-1], ts[1:]):
            gap = float(b - a)
            n = max(1, math.ceil(gap / dt - 1e-9))
            pair = torch.stack([a, b])
            over = max(1e-9 * gap, 64 * torch.finfo(ts.dtype).eps * max(abs(float(a)), abs(float(b))))
            step = dict(kw, dt=(gap + over) / n, bm=bm)  # the n-th step overshoots b and is clipped onto it
            sde.step = step["dt"]
            if adjoint:
                res = torchsde.sdeint_adjoint(sde, y, pair, logqp=logqp, adjoint_params=adjoint_params, **step)
            else:
                res = torchsde.sdeint(sde, y, pair, logqp=logqp, **step)
            if logqp:
                res, lr = res
                logrs.append(lr[-1])
            y = res[-1]
            outs.append(y)
        path = torch.stack(outs, 0)
        if logqp:
            return path, (torch.stack(logrs, 0) if logrs else y0.new_zeros(0, y0.shape[0]))
        return path

    def _brownian(self, sde, y0, ts, logqp):
        """The Brownian motion of one solve over ``ts`` (all its intervals), seeded from torch's
        generator: torchsde's default draws its seed from numpy's global generator, so
        ``torch.manual_seed`` alone left fits irreproducible (``pyro.set_rng_seed`` seeds both).
        Noise channels: the state's (plus ``logqp``'s log-ratio channel) for diagonal noise, one
        per latent dimension for general noise."""
        if sde.noise_type == "diagonal":
            m = y0.shape[-1] + (1 if logqp else 0)
        else:
            m = self.latent_dim
        levy = {"srk": "space-time"}.get(self.method, "none")
        seed = int(torch.randint(0, 2 ** 31 - 1, ()))
        return torchsde.BrownianInterval(t0=float(ts[0]), t1=float(ts[-1]), size=(y0.shape[0], m), dtype=y0.dtype,
                                         device=y0.device, levy_area_approximation=levy, entropy=seed)

    def _adjoint_params(self, p, ctx, posterior):
        """Every tensor the SDE's drift and diffusion depend on: the networks' parameters, the
        constrained PyroParam values, and the context (whose gradient reaches the encoder)."""
        out = []
        for n in ("prior_net", "diffusion_net") + (("posterior_net",) if posterior else ()):
            if hasattr(self, n):
                out += list(getattr(self, n).parameters())
        for k in ("theta", "mu", "sigma", "omega"):  # omega: the fBM weights, a function of a learned H
            if k in p:
                out.append(p[k])
        if ctx is not None:
            out.append(ctx)
        return tuple(t for t in out if t.requires_grad)

    def _initial_state(self, z0, kind):
        if kind == "diagonal":
            return z0
        extra = z0.new_zeros(z0.shape[:-1] + (self.latent_dim * self.num_ou,)) if kind == "fractional" else None
        parts = [z0] + ([extra] if extra is not None else []) + [z0.new_zeros(z0.shape[:-1] + (1,))]
        return torch.cat(parts, -1)

    def _solve(self, p, z0, ts, dt, posterior, ctx=None, bm=None, state0=None, obs_ts=None):
        r"""Integrate from ``z0`` ``(..., L)`` (or a full augmented ``state0``) over ``ts``:
        returns the path ``(..., T, L)``, the accumulated log-ratio ``(..., T)`` and the final
        augmented state ``(..., S)``.  ``ctx`` ``(T_obs, B, C)`` lives on the observation times
        ``obs_ts`` (default ``ts``), which the posterior drift looks up whatever the grid."""
        kind = self._kind(posterior)
        lead = z0.shape[:-1]
        flat = z0.reshape(-1, z0.shape[-1])
        y0 = self._initial_state(flat, kind) if state0 is None else state0.reshape(-1, state0.shape[-1])
        if ctx is not None and len(lead) > 1:  # (T, B, C) -> (T, N, C), particles outermost
            Tc, Bc, Cc = ctx.shape
            ctx = ctx.reshape((Tc,) + (1,) * (len(lead) - 1) + (Bc, Cc)).expand((Tc,) + lead + (Cc,))
            ctx = ctx.reshape(Tc, -1, Cc)
        ts_data = ts
        ts = _solver_clock(ts)
        obs_ts = ts if obs_ts is None or obs_ts is ts_data else _solver_clock(obs_ts)
        adjoint = self.adjoint and torch.is_grad_enabled()
        sde = _SDE(self, p, kind, posterior, ts=obs_ts, ctx=ctx, fast_context=not adjoint)
        sde.rate_unit = dt
        T = ts.shape[0]
        if kind == "diagonal" and posterior:
            ys, logr = self._integrate(sde, y0, ts, dt, logqp=True, bm=bm,
                                       adjoint_params=self._adjoint_params(p, ctx, True))
            cum = torch.cat([logr.new_zeros(1, logr.shape[1]), logr.cumsum(0)], 0)
            path, state = ys, ys[-1]
        else:
            ys = self._integrate(sde, y0, ts, dt, bm=bm, adjoint_params=self._adjoint_params(p, ctx, posterior))
            L = self.latent_dim
            path, state = ys[..., :L], ys[-1]
            cum = ys[..., -1] if kind != "diagonal" else ys.new_zeros(ys.shape[:2])
        path = path.transpose(0, 1).reshape(lead + (T, self.latent_dim))
        cum = cum.transpose(0, 1).reshape(lead + (T,))
        return path, cum, state.reshape(lead + state.shape[-1:])

    def _obs_dist(self, path, p):
        loc = self._decode(path)
        scale = p["obs_scale"]
        if self.likelihood == "laplace":
            return dist.Laplace(loc, scale)
        return dist.Normal(loc, scale)

    # ------------------------------------------------------------------ Pyro programs
    @pyro_method
    def model(self, ts: torch.Tensor, ys: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
              bm=None):
        """The generative model; ``ys=None`` gives one prior draw.  ``bm``: a torchsde Brownian
        motion for the prior path when the model runs on its own (unused under a guide)."""
        ts, ys, mask = self._check(ts, ys, mask, need_y=ys is not None)
        p = self._fbm_params(self._params("model"), ts)
        dt = self._solver_dt(ts)
        B = 1 if ys is None else ys.shape[0]
        L, T = self.latent_dim, ts.shape[0]
        with pyro.plate("sequences", B, dim=-1):
            z0 = pyro.sample("z0", dist.Normal(p["pz0_loc"], p["pz0_scale"]).to_event(1))

            def simulate():
                with torch.no_grad():
                    path, _, _ = self._solve(p, z0, ts, dt, posterior=False, bm=bm)
                return torch.cat([path, path.new_zeros(path.shape[:-1] + (1,))], -1)

            value = pyro.sample("z_path", _PriorPath(simulate, z0, torch.Size((T, L + 1))))
            path, log_ratio = value[..., :L], value[..., -1, L]
            pyro.factor("path_kl", -self.kl_weight * log_ratio)
            fn = self._obs_dist(path, p)
            if mask is not None:
                fn = fn.mask(mask[..., None])
            return pyro.sample("y", fn.to_event(2), obs=ys)

    @pyro_method
    def guide(self, ts: torch.Tensor, ys: torch.Tensor, mask: Optional[torch.Tensor] = None, bm=None):
        """Posterior: ``z0`` from the context at ``ts[0]``, then the posterior SDE's path
        (``bm``: a torchsde Brownian motion of size (draws, noise dims), e.g. to reproduce a path;
        with ``path_kl="logqp"`` torchsde integrates the log-ratio as one more diagonal-noise
        state, so the size is (draws, latent_dim + 1))."""
        ts, ys, mask = self._check(ts, ys, mask)
        p = self._fbm_params(self._params("guide"), ts)
        dt = self._solver_dt(ts)
        ctx = self._context(ts, ys, mask)
        h = self.qz0_net(ctx[0])
        L = self.latent_dim
        loc, scale = h[..., :L], nn.functional.softplus(h[..., L:]) + tiny(ys.dtype) ** 0.25
        with pyro.plate("sequences", ys.shape[0], dim=-1):
            z0 = pyro.sample("z0", dist.Normal(loc, scale).to_event(1))
            self._warn_coarse_dt(z0, p, dt)
            path, cum, _ = self._solve(p, z0, ts, dt, posterior=True, ctx=ctx, bm=bm)
            value = torch.cat([path, cum[..., None]], -1)
            pyro.sample("z_path", dist.Delta(value, event_dim=2))

    def _warn_coarse_dt(self, z0, p, dt):
        r"""Warn (once per module) when :math:`x = g^2 dt / \sigma_y^2 > 0.1` (largest diffusion at
        the ``z0`` draws, smallest observation scale): the discretized ELBO then underestimates
        the diffusion, because the posterior shares the prior's diffusion and each Euler step
        before an observation loses :math:`\tfrac12[x - \log(1 + x)]` nats against the
        chain's exact posterior (:func:`ou_euler_elbo_optimum`)."""
        if getattr(self, "_warned_dt", False) or self.noise != "brownian" or self.posterior_diffusion == "learned":
            return
        with torch.no_grad():
            g = self._diffusion(z0.detach(), p).max()
            x = float(g * g * dt / p["obs_scale"].detach().min() ** 2)
        if x > 0.1:
            self._warned_dt = True
            warnings.warn(f"diffusion^2 * dt / obs_scale^2 = {x:.3g} > 0.1: the posterior's Euler steps before "
                          "each observation are wide against the observation noise, and the discretized latent-SDE "
                          "ELBO is maximized at a too small diffusion (and drift rate). On OU data its exact "
                          "maximizer has sigma 42% low at dt 0.1 and 10% low at dt 0.01 (noise 0.1, x = 2.5 and "
                          "0.25; docs/latent_sde.md): the bias is O(dt). Use posterior_diffusion='learned' (its ELBO "
                          "has the Euler chain's exact posterior; with posterior_drift='residual' it is easier to "
                          f"fit) or a smaller dt, e.g. dt <= {dt * 0.1 / x:.3g} "
                          "for x <= 0.1.", UserWarning, stacklevel=3)

    def _params_plain(self) -> dict:
        """The constrained parameter values outside a Pyro context."""
        with pyro.poutine.block():
            return self._params("guide")

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def predict(self, ts: torch.Tensor, ys: torch.Tensor, ts_future: torch.Tensor, mask=None,
                num_samples: int = 100, quantiles=(0.05, 0.5, 0.95)) -> dict:
        r"""Posterior predictive paths at ``ts_future`` given the data: ``num_samples`` draws of
        ``z0`` and the posterior SDE over the data's span, then the prior SDE beyond the last
        observation time.  Returns ``dict(latent (S, B, F, L), mean (S, B, F, D) (decoded),
        y (S, B, F, D) (with observation noise), quantiles (Q, B, F, D) of y, q (the levels))``.
        Times inside the data's span are interpolation (the posterior), times after it forecasts."""
        ts, ys, mask = self._check(ts, ys, mask)
        S = check_positive_int(num_samples, "num_samples")
        if not torch.is_tensor(ts_future) or ts_future.dim() != 1 or ts_future.numel() < 1:
            raise ValueError("ts_future must be a non-empty 1-d tensor of times.")
        ts_future = ts_future.to(ts.dtype)
        if float(ts_future.min()) < float(ts[0]):
            raise ValueError(f"ts_future must not start before the first observation time {float(ts[0]):g}.")
        p = self._fbm_params(self._params_plain(), ts)
        dt = self._solver_dt(ts)
        ctx = self._context(ts, ys, mask)
        h = self.qz0_net(ctx[0])
        L = self.latent_dim
        loc, scale = h[..., :L], nn.functional.softplus(h[..., L:]) + tiny(ys.dtype) ** 0.25
        z0 = loc + scale * torch.randn((S,) + loc.shape, dtype=loc.dtype, device=loc.device)
        inside = ts_future[ts_future <= ts[-1]]
        after = ts_future[ts_future > ts[-1]]
        grid = torch.unique(torch.cat([ts, inside]))
        path, _, state = self._solve(p, z0, grid, dt, posterior=True,
                                     ctx=ctx, obs_ts=ts)
        outs = [path[..., torch.searchsorted(grid, inside), :]] if inside.numel() else []
        if after.numel():
            g2 = torch.cat([ts[-1:], after])
            kind = self._kind(False)
            if kind == "diagonal":
                start = state[..., :L]
            else:  # fractional: keep Y, restart the log-ratio channel
                start = torch.cat([state[..., :-1], state.new_zeros(state.shape[:-1] + (1,))], -1)
            p2, _, _ = self._solve(p, start[..., :L], g2, dt, posterior=False,
                                   state0=None if kind == "diagonal" else start)
            outs.append(p2[..., 1:, :])
        latent = torch.cat(outs, -2)
        mean = self._decode(latent)
        y = self._obs_dist(latent, p).sample()
        q = torch.as_tensor(quantiles, dtype=y.dtype, device=y.device)
        return dict(latent=latent, mean=mean, y=y, quantiles=torch.quantile(y, q, dim=0), q=q)

    @torch.no_grad()
    def sample(self, ts: torch.Tensor, num_samples: int = 1) -> dict:
        """Draws from the prior: ``dict(latent (S, T, L), mean (S, T, D), y (S, T, D))``."""
        ts, _, _ = self._check(ts, None, None, need_y=False)
        S = check_positive_int(num_samples, "num_samples")
        p = self._fbm_params(self._params_plain(), ts)
        dt = self._solver_dt(ts)
        z0 = dist.Normal(p["pz0_loc"], p["pz0_scale"]).sample((S,))
        latent, _, _ = self._solve(p, z0, ts, dt, posterior=False)
        mean = self._decode(latent)
        return dict(latent=latent, mean=mean, y=self._obs_dist(latent, p).sample())

    # ------------------------------------------------------------------ plots
    def plot(self, ts, ys, mask=None, ts_future=None, num_samples: int = 50, sequence: int = 0, dim: int = 0,
             ax=None, num_paths: int = 10):
        """Data (points), posterior paths (thin lines) and the 90% band of y over the data's span
        and ``ts_future`` (a forecast beyond it) for one sequence and observed dimension; returns
        the matplotlib axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 3))
        grid = torch.linspace(float(ts[0]), float(ts[-1]), 100, dtype=ts.dtype, device=ts.device)
        if ts_future is not None:
            grid = torch.unique(torch.cat([grid, ts_future.to(ts.dtype)]))
        pred = self.predict(ts, ys, grid, mask=mask, num_samples=num_samples, quantiles=(0.05, 0.5, 0.95))
        g = grid.cpu().numpy()
        qs = pred["quantiles"][:, sequence, :, dim].cpu().numpy()
        ax.fill_between(g, qs[0], qs[2], alpha=0.25, label="90% band of y")
        for s in range(min(num_paths, num_samples)):
            ax.plot(g, pred["mean"][s, sequence, :, dim].cpu().numpy(), lw=0.6, color="C1", alpha=0.6,
                    label="posterior paths" if s == 0 else None)
        m = slice(None) if mask is None else mask[sequence].cpu().numpy()
        ax.plot(ts.cpu().numpy()[m], ys[sequence, :, dim].cpu().numpy()[m], "k.", label="data")
        if ts_future is not None:
            ax.axvline(float(ts[-1]), color="gray", ls=":", lw=1)
        ax.set_xlabel("t")
        ax.set_ylabel(f"y[{dim}]")
        ax.legend(loc="best", fontsize=8)
        return ax

    # ------------------------------------------------------------------ state-space form
    def state_space(self, ts: torch.Tensor, dt: Optional[float] = None) -> "LatentSDEStateSpace":
        r"""The prior as a discrete-time state-space model for the particle filter
        (``backend="smc_filter"``; Pyro's ``SMCFilter`` contract): see :class:`LatentSDEStateSpace`.
        ``ts`` are the observation times of one sequence; between them the SDE is discretized
        by Euler-Maruyama with ``ceil(gap / dt)`` equal substeps (``dt``: the module's, or half the
        smallest gap).  Brownian noise only."""
        if self.noise != "brownian":
            raise ValueError("state_space() is for noise='brownian'; the fractional state (z, Y) is not "
                             "discretized here.")
        ts, _, _ = self._check(ts, None, None, need_y=False)
        if dt is None:
            dt = self.dt if self.dt is not None else (_min_gap(ts, 0.1) / 2)
        dt = check_positive(dt, "dt")
        return LatentSDEStateSpace(self, ts, dt)

    @pyro_method
    def _ssm_init(self, state, initial=None):
        p = self._params("model")
        z = pyro.sample("z", dist.Normal(p["pz0_loc"], p["pz0_scale"]).to_event(1))
        if initial is not None:
            pyro.sample("y", self._obs_dist(z, p).to_event(1), obs=initial)
        state["z"] = z

    @pyro_method
    def _ssm_step(self, state, substeps: int, h: float, y=None):
        p = self._params("model")
        z = state["z"]
        for j in range(substeps):
            loc = z + self._prior_drift(z, None, p) * h
            z = pyro.sample(f"z_{j}", dist.Normal(loc, self._diffusion(z, p) * math.sqrt(h)).to_event(1))
        if y is not None:
            pyro.sample("y", self._obs_dist(z, p).to_event(1), obs=y)
        state["z"] = z

    # ------------------------------------------------------------------ simulators
    @staticmethod
    def simulate(num_sequences: int = 32, num_time_steps: int = 50, theta: float = 1.0, mu: float = 0.5,
                 sigma: float = 0.5, obs_scale: float = 0.05, t_end: float = 5.0, seed: int = 0,
                 dtype=torch.float64):
        """Ornstein-Uhlenbeck data (see :func:`simulate_ou`): ``(ts, ys, truth)``."""
        return simulate_ou(num_sequences, num_time_steps, theta, mu, sigma, obs_scale, t_end, seed, dtype)


class LatentSDEStateSpace:
    r"""A latent SDE's prior as a state-space model (Pyro's ``SMCFilter`` contract), from
    :meth:`LatentSDE.state_space`.

    ``init(state, initial=None)`` draws :math:`z_{t_0} \sim \mathcal N(m, s^2)` (site ``"z"``)
    and observes ``initial`` (:math:`y_{t_0}`, shape ``(D,)``) if given; ``step(state, y)``
    moves the state over the next observation interval by :math:`n = \lceil \Delta / dt \rceil`
    Euler-Maruyama substeps of size :math:`h = \Delta / n`,
    :math:`z \leftarrow \mathcal N(z + h_\theta(z)h,\ g(z)^2 h)` (sites ``"z_0".."z_{n-1}"``), and
    observes :math:`y_{t_{i+1}}`.  The filter's data are ``ys[1:]`` of one sequence with
    ``init_kwargs={"initial": ys[0]}``.  With an OU prior, a linear decoder and Gaussian noise
    this is a linear-Gaussian state-space model, so the filter's evidence is checked against a
    Kalman filter.  Its parameters are the LatentSDE's, so ``smc_filter`` learns them by
    particle maximum likelihood.
    """

    def __init__(self, owner: LatentSDE, ts: torch.Tensor, dt: float):
        self.owner, self.ts, self.dt = owner, ts, dt
        gaps = (ts[1:] - ts[:-1]).tolist()
        self.substeps = [max(1, math.ceil(g / dt - 1e-9)) for g in gaps]
        self.h = [g / n for g, n in zip(gaps, self.substeps)]

    def init(self, state, initial=None):
        self._i = 0  # the interval the next step() covers (an SMCState holds only tensors)
        self.owner._ssm_init(state, initial)

    def step(self, state, y=None):
        i = getattr(self, "_i", None)
        if i is None:
            raise RuntimeError("Call init(...) before step(...).")
        self._i = i + 1
        if i >= len(self.substeps):
            raise ValueError(f"step() called more times than there are observation intervals ({len(self.substeps)}: "
                             "pass ys[1:] of a sequence observed at ts).")
        self.owner._ssm_step(state, self.substeps[i], self.h[i], y)

    def kalman_log_evidence(self, ys: torch.Tensor) -> torch.Tensor:
        r"""Exact :math:`\log p(y_{t_0..t_T})` of the discretized model when it is linear-Gaussian
        (``drift="ou"``, ``diffusion="constant"``, ``decoder`` ``"identity"``/``"linear"``,
        Gaussian likelihood), by a Kalman filter; ``ys`` ``(T, D)``."""
        m = self.owner
        if not (m.drift == "ou" and m.diffusion_kind == "constant" and m.decoder_kind in ("identity", "linear")
                and m.likelihood == "gaussian"):
            raise ValueError("kalman_log_evidence needs drift='ou', diffusion='constant', a linear or identity "
                             "decoder and likelihood='gaussian' (a linear-Gaussian model).")
        with torch.no_grad():
            p = m._params_plain()
            L = m.latent_dim
            eye = torch.eye(L, dtype=ys.dtype, device=ys.device)
            if m.decoder_kind == "identity":
                C, d = eye, ys.new_zeros(L)
            else:
                C, d = m.decoder.weight, m.decoder.bias
            R = torch.diag(p["obs_scale"] ** 2)
            A1 = lambda h: eye - h * torch.diag(p["theta"])
            b1 = lambda h: h * p["theta"] * p["mu"]
            Q1 = lambda h: h * torch.diag(p["sigma"] ** 2)
            mean, P = p["pz0_loc"].clone(), torch.diag(p["pz0_scale"] ** 2)
            ll = ys.new_zeros(())
            for i in range(ys.shape[0]):
                if i > 0:
                    for _ in range(self.substeps[i - 1]):
                        h = self.h[i - 1]
                        mean = A1(h) @ mean + b1(h)
                        P = A1(h) @ P @ A1(h).T + Q1(h)
                S = C @ P @ C.T + R
                e = ys[i] - (C @ mean + d)
                ll = ll + dist.MultivariateNormal(torch.zeros_like(e), S).log_prob(e)
                K = P @ C.T @ torch.linalg.inv(S)
                mean = mean + K @ e
                P = (eye - K @ C) @ P
            return ll


def _min_gap(grid, default):
    return float((grid[1:] - grid[:-1]).min()) if grid.numel() > 1 else default


# =========================================================================== simulators
def rl_fbm_covariance(hurst: float, times) -> np.ndarray:
    r"""Covariance of type II (Riemann-Liouville) fBM at positive ``times`` (float64 numpy):
    for :math:`s \le t`, with :math:`a = H - 1/2`,

    .. math::

        \mathrm{Cov}(B_H(s), B_H(t)) = \Gamma(H+\tfrac12)^{-2}\int_0^s (t-r)^a (s-r)^a dr
        = \frac{s^{a+1} t^a}{(a+1)\,\Gamma(H+\tfrac12)^2}\;{}_2F_1\big(-a, 1; a+2; s/t\big)

    (substitute :math:`r = s(1-v)` and expand :math:`(1 - vs/t)^a`), which at :math:`s = t`
    gives :math:`t^{2H}/(2H\,\Gamma(H+\tfrac12)^2)`."""
    from scipy.special import gamma as G, hyp2f1

    t = np.asarray(times, dtype=np.float64)
    a = hurst - 0.5
    ti, si = np.meshgrid(t, t, indexing="ij")
    lo, hi = np.minimum(ti, si), np.maximum(ti, si)
    return lo ** (a + 1) * hi ** a / (a + 1) * hyp2f1(-a, 1.0, a + 2, lo / hi) / G(hurst + 0.5) ** 2


def simulate_ou(num_sequences: int = 32, num_time_steps: int = 50, theta: float = 1.0, mu: float = 0.5,
                sigma: float = 0.5, obs_scale: float = 0.05, t_end: float = 5.0, seed: int = 0,
                dtype=torch.float64):
    r"""Exact Ornstein-Uhlenbeck paths :math:`dz = \theta(\mu - z)dt + \sigma dW` on a regular
    grid of ``num_time_steps`` times in ``[0, t_end]``, :math:`z_0` from the stationary law
    :math:`\mathcal N(\mu, \sigma^2/2\theta)`, transitions
    :math:`z_{t+\Delta} \mid z_t \sim \mathcal N(\mu + (z_t - \mu)e^{-\theta\Delta},
    \sigma^2(1 - e^{-2\theta\Delta})/2\theta)`, observed with N(0, obs_scale^2) noise.
    Returns ``(ts, ys (B, T, 1), truth)``."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.linspace(0.0, t_end, num_time_steps, dtype=dtype)
    B = num_sequences
    z = torch.empty(B, num_time_steps, dtype=dtype)
    sd0 = sigma / math.sqrt(2 * theta)
    z[:, 0] = mu + sd0 * torch.randn(B, generator=g, dtype=dtype)
    for i in range(1, num_time_steps):
        a = math.exp(-theta * float(ts[i] - ts[i - 1]))
        sd = sd0 * math.sqrt(1 - a * a)
        z[:, i] = mu + (z[:, i - 1] - mu) * a + sd * torch.randn(B, generator=g, dtype=dtype)
    ys = z + obs_scale * torch.randn(B, num_time_steps, generator=g, dtype=dtype)
    return ts, ys[..., None], dict(z=z, theta=theta, mu=mu, sigma=sigma, obs_scale=obs_scale)


def simulate_fractional_ou(hurst: float, num_sequences: int = 16, num_time_steps: int = 60, theta: float = 1.0,
                           sigma: float = 0.5, obs_scale: float = 0.02, t_end: float = 6.0, seed: int = 0,
                           dtype=torch.float64):
    r"""Fractional OU paths :math:`z(t) = \sigma\int_0^t e^{-\theta(t-s)}dB_H(s)`, :math:`z_0 = 0`,
    with :math:`B_H` type II (Riemann-Liouville) fBM: :math:`B_H` is exact in distribution at the
    points of a grid 8 times finer than the output (Cholesky factor of
    :func:`rl_fbm_covariance`); the OU filter integral is approximated on that fine grid (exact
    decay, each increment weighted at its interval's midpoint).
    Returns ``(ts, ys (B, T, 1), truth)``."""
    fine = 8
    n = (num_time_steps - 1) * fine + 1
    tf = np.linspace(0.0, t_end, n)[1:]
    cov = rl_fbm_covariance(hurst, tf)
    Lc = np.linalg.cholesky(cov + 1e-12 * np.eye(n - 1))
    rng = np.random.default_rng(seed)
    bh = Lc @ rng.standard_normal((n - 1, num_sequences))  # (n-1, B)
    bh = np.vstack([np.zeros((1, num_sequences)), bh])
    dB = np.diff(bh, axis=0)
    h = t_end / (n - 1)
    z = np.zeros((n, num_sequences))
    for i in range(1, n):  # exact OU decay over a fine step, increment entering at its midpoint
        z[i] = z[i - 1] * math.exp(-theta * h) + sigma * math.exp(-theta * h / 2) * dB[i - 1]
    zc = z[::fine].T
    ts = torch.linspace(0.0, t_end, num_time_steps, dtype=dtype)
    ys = torch.as_tensor(zc, dtype=dtype) + obs_scale * torch.as_tensor(
        rng.standard_normal(zc.shape), dtype=dtype)
    return ts, ys[..., None], dict(z=torch.as_tensor(zc, dtype=dtype), hurst=hurst, theta=theta, sigma=sigma)


# =========================================================================== exact diagnostics (linear case)
def fractional_ou_log_likelihood(ts, ys, hurst: float, theta: float, sigma: float, obs_scale: float,
                                 num_ou: int = 5, gamma_max: float = 20.0, horizon: Optional[float] = None,
                                 dt: Optional[float] = None, init_scale: float = 1e-3) -> float:
    r"""Exact log-likelihood :math:`\log p(y)` of the Markov-fBM OU model that :class:`LatentSDE`
    fits with ``noise="fractional", drift="ou", mu=0, diffusion="constant", decoder="identity"``
    (1-d latent), by a Kalman filter on the linear-Gaussian state :math:`x = (z, Y_1..Y_K)`:

    .. math::

        dY_k = -\gamma_k Y_k\,dt + dW, \qquad
        dz = \Big[-\theta z - \sigma \sum_k \omega_k\gamma_k Y_k\Big]dt + \sigma\Big(\sum_k\omega_k\Big)dW,

    :math:`z(0) \sim \mathcal N(0, \texttt{init\_scale}^2)`, :math:`Y(0) = 0`,
    :math:`y_i \sim \mathcal N(z(t_i), \texttt{obs\_scale}^2)`; :math:`\gamma, \omega` as
    :func:`fbm_gammas`, :func:`fbm_weights` (``horizon``: T, default the span of ``ts``).
    ``dt=None``: exact transitions (Van Loan's matrix exponential for the process noise);
    else the Euler chain that ``LatentSDE`` integrates (``ceil(gap / dt)`` equal steps per
    interval), whose maximizer is the target of the ELBO with ``posterior_diffusion="learned"``.
    ``ys`` ``(B, T)`` or ``(B, T, 1)`` (sequences independent)."""
    from scipy.linalg import expm

    t = np.asarray(ts, dtype=np.float64).reshape(-1)
    y = np.asarray(ys, dtype=np.float64)
    y = y[..., 0] if y.ndim == 3 else y
    if y.ndim != 2 or y.shape[1] != t.shape[0]:
        raise ValueError(f"ys must have shape (sequences, {t.shape[0]} (len(ts))[, 1]), got {np.shape(ys)}.")
    K = check_positive_int(num_ou, "num_ou")
    T = float(t[-1] - t[0]) if horizon is None else check_positive(horizon, "horizon")
    g = fbm_gammas(K, gamma_max).numpy()
    om = fbm_weights(hurst, torch.as_tensor(g), T).numpy()
    A = np.zeros((K + 1, K + 1))
    A[0, 0], A[0, 1:], A[1:, 1:] = -theta, -sigma * om * g, -np.diag(g)
    Bv = np.concatenate([[sigma * om.sum()], np.ones(K)])[:, None]

    def transition(gap):
        if dt is None:  # F = exp(A gap), Q = int_0^gap exp(A s) B B^T exp(A^T s) ds
            M = np.zeros((2 * (K + 1),) * 2)
            M[:K + 1, :K + 1], M[:K + 1, K + 1:], M[K + 1:, K + 1:] = -A, Bv @ Bv.T, A.T
            E = expm(M * gap)
            F = E[K + 1:, K + 1:].T
            return F, F @ E[:K + 1, K + 1:]
        n = max(1, math.ceil(gap / dt - 1e-9))
        h = gap / n
        F1, Q1 = np.eye(K + 1) + A * h, Bv @ Bv.T * h
        F, Q = np.eye(K + 1), np.zeros((K + 1, K + 1))
        for _ in range(n):
            F, Q = F1 @ F, F1 @ Q @ F1.T + Q1
        return F, Q

    m = np.zeros((y.shape[0], K + 1))
    P = np.zeros((K + 1, K + 1))
    P[0, 0] = init_scale ** 2
    ll = 0.0
    for i in range(len(t)):
        if i > 0:
            F, Q = transition(t[i] - t[i - 1])
            m, P = m @ F.T, F @ P @ F.T + Q
        S = P[0, 0] + obs_scale ** 2
        e = y[:, i] - m[:, 0]
        ll += float((-0.5 * (np.log(2 * np.pi * S) + e * e / S)).sum())
        gain = P[:, 0] / S
        m, P = m + e[:, None] * gain[None, :], P - np.outer(gain, P[0, :])
    return ll


def ou_euler_elbo_optimum(ts, ys, theta: float, mu: float, sigma: float, obs_scale: float, pz0_loc: float,
                          pz0_scale: float, dt: float, free_variance: bool = False, return_messages: bool = False):
    r"""The largest ELBO that *any* posterior of the latent-SDE family can reach on a 1-d OU prior
    with Gaussian observations, once the SDEs are discretized as :class:`LatentSDE` does (each
    observation interval split into :math:`\lceil \mathrm{gap}/dt \rceil` equal Euler steps of
    size :math:`h`), computed exactly by dynamic programming.

    The discretized prior is the chain :math:`z_{k+1} \sim \mathcal N(F_k(z_k), \sigma^2 h)`,
    :math:`F_k(z) = z + \theta(\mu - z)h`; the posterior family is
    :math:`z_{k+1} \sim \mathcal N(m_k(z_k), \sigma^2 h)` with *any* mean function (the posterior
    SDE shares the prior's diffusion, which keeps the continuous-time KL finite) and any
    Gaussian :math:`q(z_0)`.  Entropy and transition terms cancel up to
    :math:`-\sum_k \mathbb E(m_k - F_k)^2 / 2\sigma^2 h` (the path KL torchsde's ``logqp``
    accumulates), so the ELBO is a linear-quadratic control problem: with the value function
    :math:`V_k(z) = -\tfrac12 P_k z^2 + p_k z + c_k` (observations at grid point ``k`` and
    later), :math:`a = 1/\sigma^2 h`,

    .. math::

        m_k^*(z) = \frac{F_k(z) + \sigma^2 h\,p_{k+1}}{1 + \sigma^2 h P_{k+1}},\qquad
        V_k(z) = \mathrm{obs}_k(z) - \frac{aP_{k+1}}{2(a+P_{k+1})} F_k(z)^2 + \frac{a\,p_{k+1}}{a+P_{k+1}} F_k(z)
            + \frac{p_{k+1}^2}{2(a+P_{k+1})} - \tfrac12 P_{k+1}\sigma^2 h + c_{k+1},

    and the optimum is :math:`\log \int p(z_0) e^{V_0(z_0)} dz_0`.  Compared with the exact
    posterior of the chain (whose transition variance is :math:`1/(a + P_{k+1})`), each step
    loses :math:`\tfrac12[x_k - \log(1 + x_k)]`, :math:`x_k = \sigma^2 h P_{k+1}`: large on the
    steps before an observation when :math:`\sigma^2 h` is not small against
    :math:`\mathrm{obs\_scale}^2`, and smaller for a smaller :math:`\sigma`, which is why the
    ELBO's maximizer shrinks the diffusion.  ``free_variance=True`` lets the posterior's
    transition variance be free too; the optimum is then the chain's exact log-evidence (a
    check of the bookkeeping against a Kalman filter).

    :param ts: observation times ``(T,)``.  :param ys: observations ``(B, T)`` or ``(B, T, 1)``
        (float64 numpy or tensor).  :returns: the optimum per sequence ``(B,)`` (numpy); with
        ``return_messages`` also the per-interval lists of per-step ``(P_{k+1}, p_{k+1})``
        (``steps[i][j]`` for the ``j``-th step of interval ``i``) and ``(P_0, p_0)``.
    """
    check_positive(dt, "dt")
    t = np.asarray(torch.as_tensor(ts).detach().cpu(), dtype=np.float64)
    steps = [interval_steps(float(gap), dt) for gap in np.diff(t)]
    return ou_grid_elbo_optimum(ts, ys, theta, mu, sigma, obs_scale, pz0_loc, pz0_scale, steps,
                                free_variance=free_variance, return_messages=return_messages)


def interval_steps(gap: float, dt: float, ratio: float = 1.0) -> np.ndarray:
    r"""The Euler step sizes :class:`LatentSDE` takes across one observation interval of length
    ``gap``: :math:`n = \lceil \mathrm{gap}/dt \rceil` steps (the same count for every grid),
    :math:`h_j = \mathrm{gap}\, r^j (1 - r) / (1 - r^n)`, :math:`j = 0..n-1`, so consecutive
    steps shrink by the factor ``ratio`` :math:`= r \in (0, 1]` toward the observation that ends
    the interval (``ratio=1``: ``n`` equal steps ``gap / n``, today's grid).  The steps sum to
    ``gap`` up to rounding; the last one is set to close the interval exactly."""
    n = max(1, math.ceil(gap / dt - 1e-9))
    if ratio == 1.0:
        return np.full(n, gap / n)
    w = ratio ** np.arange(n, dtype=np.float64)
    h = gap * w / w.sum()
    h[-1] = gap - h[:-1].sum()
    return h


def ou_grid_elbo_optimum(ts, ys, theta: float, mu: float, sigma: float, obs_scale: float, pz0_loc: float,
                         pz0_scale: float, steps, free_variance: bool = False, return_messages: bool = False):
    r""":func:`ou_euler_elbo_optimum` on an arbitrary Euler grid: ``steps[i]`` holds the step
    sizes :math:`h_{i,0}, \dots, h_{i,n_i-1}` of observation interval ``i`` (from ``ts[i]`` to
    ``ts[i+1]``; they must sum to the gap), e.g. ``[interval_steps(gap, dt, ratio) for gap in
    diff(ts)]``.  The same linear-quadratic dynamic program, with the step's own :math:`h` in
    :math:`F_k(z) = z + \theta(\mu - z)h_k`, :math:`a_k = 1/\sigma^2 h_k` and the per-step loss
    :math:`\tfrac12[x_k - \log(1 + x_k)]`, :math:`x_k = \sigma^2 h_k P_{k+1}`, against the
    chain's exact posterior.  On equal steps it is the same arithmetic as
    :func:`ou_euler_elbo_optimum` (tested for exact equality); ``free_variance=True`` gives the
    chain's Kalman log-evidence on any grid.  Returns as :func:`ou_euler_elbo_optimum`
    (messages ``steps_out[i][j] = (P_{k+1}, p_{k+1})`` after step ``j`` of interval ``i``)."""
    t = np.asarray(torch.as_tensor(ts).detach().cpu(), dtype=np.float64)
    y = np.asarray(torch.as_tensor(ys).detach().cpu(), dtype=np.float64)
    if y.ndim == 3:
        if y.shape[-1] != 1:
            raise ValueError(f"the OU ELBO optimum is for 1-d observations, got ys of shape {y.shape}.")
        y = y[..., 0]
    if y.ndim != 2 or y.shape[1] != t.shape[0]:
        raise ValueError(f"ys must have shape (sequences, len(ts)={t.shape[0]}), got {y.shape}.")
    for name, v in (("theta", theta), ("sigma", sigma), ("obs_scale", obs_scale), ("pz0_scale", pz0_scale)):
        check_positive(v, name)
    if len(steps) != t.shape[0] - 1:
        raise ValueError(f"steps must hold one array of step sizes per observation interval ({t.shape[0] - 1}), "
                         f"got {len(steps)}.")
    steps = [np.asarray(s, dtype=np.float64).reshape(-1) for s in steps]
    for i, s in enumerate(steps):
        gap = t[i + 1] - t[i]
        if s.size < 1 or not np.all(s > 0) or abs(s.sum() - gap) > 1e-9 * gap:
            raise ValueError(f"steps[{i}] must be positive step sizes summing to the gap {gap:g}, got {s.tolist()}.")
    r2 = obs_scale ** 2
    obs_c = -0.5 * math.log(2 * math.pi * r2)
    P = np.full(y.shape[0], 1 / r2)
    p = y[:, -1] / r2
    c = obs_c - y[:, -1] ** 2 / (2 * r2)
    out_steps = []
    for i in range(t.shape[0] - 1, 0, -1):
        seq = []
        for h in steps[i - 1][::-1]:  # backward over the steps of this interval
            s2h, a = sigma ** 2 * h, 1 / (sigma ** 2 * h)
            alpha, beta = 1 - theta * h, theta * mu * h
            seq.append((P.copy(), p.copy()))
            if free_variance:
                c = c - 0.5 * np.log1p(s2h * P)
            else:
                c = c - 0.5 * P * s2h
            Pn, pn = a * P / (a + P), a * p / (a + P)
            c = c + p ** 2 / (2 * (a + P)) - 0.5 * Pn * beta ** 2 + pn * beta
            P, p = Pn * alpha ** 2, alpha * (pn - Pn * beta)
        out_steps.append(seq[::-1])
        yo = y[:, i - 1]
        P, p, c = P + 1 / r2, p + yo / r2, c + obs_c - yo ** 2 / (2 * r2)
    s02 = pz0_scale ** 2
    out = c - 0.5 * np.log1p(s02 * P) + 0.5 * ((pz0_loc / s02 + p) ** 2 / (1 / s02 + P) - pz0_loc ** 2 / s02)
    if return_messages:
        return out, out_steps[::-1], (P, p)
    return out


# =========================================================================== matrix case
@register_model("latent_sde")
def _matrix_case():
    # path_kl="girsanov": the importance-weighted backends (IWAE, chi^2-VIS) need exact log-ratios
    ts, ys, _ = simulate_ou(num_sequences=4, num_time_steps=6, t_end=1.5, seed=0)
    torch.manual_seed(0)
    m = LatentSDE(1, latent_dim=1, context_dim=4, hidden_dim=8, drift="ou", diffusion="constant",
                  decoder="identity", dt=0.15, path_kl="girsanov", name="matrix_latent_sde").to(torch.float64)
    return m, (ts, ys)
