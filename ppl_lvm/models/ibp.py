r"""Indian buffet priors and the sparse IBP factorization of count data.

**The priors.**  The three-parameter Indian buffet process (mass :math:`\alpha > 0`,
concentration :math:`c > -\sigma`, discount :math:`\sigma \in [0, 1)`; Teh & Görür 2009) is the
law of a binary matrix :math:`Z` (rows: data points, columns: features) built row by row: row
:math:`i` takes an existing feature :math:`k` with probability
:math:`(m_k - \sigma)/(i - 1 + c)` and
:math:`\mathrm{Poisson}\big(\alpha\,\Gamma(1+c)\Gamma(i-1+c+\sigma) / (\Gamma(i+c)\Gamma(c+\sigma))\big)`
new ones, so that

.. math::

    \mathbb E[K_N] = \alpha \sum_{i=1}^{N} \frac{\Gamma(1+c)\,\Gamma(i-1+c+\sigma)}{\Gamma(i+c)\,\Gamma(c+\sigma)}
    \quad\Big(= \alpha c\,(\psi(N+c) - \psi(c)) \text{ for } \sigma = 0,\ \alpha H_N \text{ for } c=1, \sigma=0\Big)

(:func:`expected_num_features`); :math:`\sigma > 0` gives power-law growth :math:`K_N \sim N^\sigma`.
Each row has :math:`\mathrm{Poisson}(\alpha)` features marginally.

Under a truncation to :math:`K` columns the prior is a Pyro program through stick-breaking:

* ``construction="ordered"`` (one-parameter IBP, :math:`c = 1, \sigma = 0`; Teh, Görür &
  Ghahramani 2007): :math:`\pi_{(k)} = \prod_{l \le k} \nu_l`, :math:`\nu_l \sim \mathrm{Beta}(\alpha, 1)`.
  The truncation drops :math:`\mathbb E\sum_{k > K} \pi_{(k)} = \alpha\,(\alpha/(1+\alpha))^K`
  expected features per row (geometric decay).
* ``construction="rounds"`` (three-parameter; Broderick, Jordan & Pitman 2012): round
  :math:`r = 1, 2, \dots` adds :math:`C_r \sim \mathrm{Poisson}(\alpha)` atoms, each with its own
  :math:`\pi = V_r \prod_{l<r} (1 - V_l)`, :math:`V_l \sim \mathrm{Beta}(1 - \sigma, c + l\sigma)`;
  the truncation keeps the first :math:`K` atoms in round order.  An atom of round :math:`r` has
  :math:`\mathbb E\pi_r = \frac{1-\sigma}{1+c+(r-1)\sigma}\prod_{l<r}\frac{c+l\sigma}{1+c+(l-1)\sigma}`,
  which decays geometrically, like :math:`(c/(1+c))^r`, for :math:`\sigma = 0`, but only like
  :math:`r^{-1/\sigma}` for :math:`\sigma > 0`: **the truncation error grows with** :math:`\sigma`
  (:meth:`IndianBuffet.truncation_bias` bounds it; at :math:`(\alpha, c, \sigma) = (3, 0.5, 0.5)`
  and :math:`N = 50` the bound falls only like :math:`300/(K/3)`).

The **restricted IBP** (Williamson, MacEachern & Xing 2013; Doshi-Velez & Williamson 2017)
replaces the independent Bernoulli draws of a row by a chosen law :math:`f` of the number of
active features :math:`J_n = \sum_k z_{nk}`:

.. math::

    p(z_n \mid \pi) = f(J_n)\,\frac{\prod_k \pi_k^{z_{nk}} (1 - \pi_k)^{1 - z_{nk}}}{\mathrm{PB}(J_n; \pi)},

with :math:`\mathrm{PB}` the Poisson-binomial pmf (:func:`poisson_binomial_log_pmf`, the
:math:`O(KJ)` recursion :math:`P_k(j) = P_{k-1}(j)(1 - \pi_k) + P_{k-1}(j-1)\pi_k`).  Under the
truncation :math:`J_n \le K`: :math:`f` is renormalized over the counts :math:`j \le K` with
:math:`\mathrm{PB}(j; \pi) > 0` (:class:`RestrictedBernoulliRows`).  With
:math:`f = \mathrm{PB}(\cdot; \pi)` the restricted law is the unrestricted one.

**The factorization** (:class:`SparseIBPFactorization`).  Pradier, Stojkoski, Utkovski, Kocarev
& Pérez-Cruz (2018) combine the three-parameter and the restricted IBP into one prior on the
binary matrix of a non-negative, doubly sparse Poisson factorization.  **Their full text was not
available to us**; the choices below where the abstract is silent are ours (standard ones):

.. math::

    x_{nd} \sim \mathrm{Poisson}\Big(\sum_k z_{nk} w_{nk} \phi_{kd}\Big), \quad
    w_{nk} \sim \mathrm{Gamma}(a_w, b_w), \quad
    \phi_{kd} = b_{kd}\, g_{kd}, \ b_{kd} \sim \mathrm{Bernoulli}(\rho),\ g_{kd} \sim \mathrm{Gamma}(a_\phi, b_\phi),

a spike-and-slab prior on the loadings (exact zeros: the second sparsity) with a fixed
``loading_density`` :math:`\rho`, and :math:`Z` from the (restricted) truncated IBP.  The
multinomial augmentation :math:`x_{nd} = \sum_k x_{ndk}`,
:math:`x_{ndk} \sim \mathrm{Poisson}(z_{nk} w_{nk} \phi_{kd})` makes :math:`w` and :math:`\phi`
conjugate; :meth:`SparseIBPFactorization.fit_gibbs` is the recommended route (module docstring
of the method).

References:

* Teh, Görür, Ghahramani. *Stick-breaking construction for the Indian buffet process*. AISTATS 2007.
* Teh, Görür. *Indian buffet processes with power-law behavior*. NeurIPS 2009.
* Broderick, Jordan, Pitman. *Beta processes, stick-breaking, and power laws*. Bayesian Analysis 2012.
* Williamson, MacEachern, Xing. *Restricting exchangeable nonparametric distributions*. NeurIPS 2013.
* Doshi-Velez, Williamson. *Restricted Indian buffet processes*. Statistics and Computing 2017.
* Pradier, Stojkoski, Utkovski, Kocarev, Pérez-Cruz. *Sparse three-parameter restricted Indian
  buffet process for understanding international trade*. ICASSP 2018 (abstract only).
* Zhou, Hannah, Dunson, Carin. *Beta-negative binomial process and Poisson factor analysis*.
  AISTATS 2012 (the multinomial augmentation of Poisson factorization).
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch.distributions import constraints

from ..distributions import StraightThroughBernoulli
from . import register_model, warn_if_name_in_use
from ..numerics import eps, tiny
from ..validation import check_choice, check_fraction, check_int, check_positive, check_positive_int, check_real

__all__ = ["expected_num_features", "poisson_binomial_log_pmf", "RestrictedBernoulliRows", "IndianBuffet",
           "SparseIBPFactorization", "IBPGibbsFit"]


# --------------------------------------------------------------------------- prior facts
def _check_ibp_params(alpha, concentration, discount):
    alpha = check_positive(alpha, "alpha")
    discount = check_real(discount, "discount", low=0.0, high=1.0, open_high=True)
    concentration = check_real(concentration, "concentration")
    if not concentration > -discount:
        raise ValueError(f"concentration must be > -discount (= {-discount:g}) for the three-parameter IBP, "
                         f"got {concentration!r}.")
    return alpha, concentration, discount


def expected_num_features(num_rows: int, alpha: float, concentration: float = 1.0, discount: float = 0.0) -> float:
    r""":math:`\mathbb E[K_N]` of the (untruncated) three-parameter IBP: the sum over rows of the
    Poisson means of new features (module docstring), in log space with ``scipy.special.gammaln``."""
    from scipy.special import gammaln

    n = check_positive_int(num_rows, "num_rows")
    alpha, c, s = _check_ibp_params(alpha, concentration, discount)
    i = np.arange(1, n + 1, dtype=np.float64)
    log_terms = gammaln(1 + c) + gammaln(i - 1 + c + s) - gammaln(i + c) - gammaln(c + s)
    return float(alpha * np.exp(log_terms).sum())


def _round_stick_means(concentration, discount, num_rounds):
    r""":math:`\mathbb E\pi_r` for rounds ``1..num_rounds`` of the three-parameter stick-breaking."""
    c, s = concentration, discount
    r = np.arange(1, num_rounds + 1, dtype=np.float64)
    log_keep = np.log((c + r * s) / (1 + c + (r - 1) * s))  # log E[1 - V_r]
    log_w = np.concatenate([[0.0], np.cumsum(log_keep)[:-1]])
    return np.exp(np.log((1 - s) / (1 + c + (r - 1) * s)) + log_w)


# --------------------------------------------------------------------------- Poisson-binomial
def poisson_binomial_log_pmf(probs: torch.Tensor, max_count: Optional[int] = None) -> torch.Tensor:
    r"""Log pmf of :math:`J = \sum_k B_k`, :math:`B_k \sim \mathrm{Bernoulli}(\pi_k)` independent, at
    :math:`j = 0..M` (``M = max_count``, default :math:`K`), batched over the leading dims of
    ``probs`` ``(..., K)``: the recursion :math:`P_k(j) = P_{k-1}(j)(1-\pi_k) + P_{k-1}(j-1)\pi_k`
    in log space, :math:`O(K M)`.  Returns ``(..., M + 1)``."""
    K = probs.shape[-1]
    M = K if max_count is None else int(max_count)
    logp, log1m = _log_probs(probs)
    table = probs.new_full(probs.shape[:-1] + (M + 1,), _NEG)
    table[..., 0] = 0.0
    pad = probs.new_full(probs.shape[:-1] + (1,), _NEG)
    for k in range(K):
        shifted = torch.cat([pad, table[..., :-1]], -1)
        table = torch.logaddexp(table + log1m[..., k:k + 1], shifted + logp[..., k:k + 1])
    return _finish(table)


#: the log of "impossible" inside the recursions: finite, so that gradients through logaddexp stay
#: finite (logaddexp(-inf, -inf) has a NaN gradient); entries below _NEG / 2 are returned as -inf
_NEG = -1.0e4


def _log_probs(probs):
    fl = tiny(probs.dtype)
    return torch.log(probs.clamp_min(fl)).clamp_min(_NEG), torch.log((1 - probs).clamp_min(fl)).clamp_min(_NEG)


def _finish(table):
    return torch.where(table < _NEG / 2, torch.full_like(table, -math.inf), table)


def _suffix_tables(probs: torch.Tensor) -> torch.Tensor:
    """``S[..., k, j] = log P(sum_{l >= k} B_l = j)`` for ``k = 0..K`` (``S[..., K, :]`` the empty sum)."""
    K = probs.shape[-1]
    logp, log1m = _log_probs(probs)
    table = probs.new_full(probs.shape[:-1] + (K + 1,), _NEG)
    table[..., 0] = 0.0
    pad = probs.new_full(probs.shape[:-1] + (1,), _NEG)
    out = [table]
    for k in range(K - 1, -1, -1):
        shifted = torch.cat([pad, table[..., :-1]], -1)
        table = torch.logaddexp(table + log1m[..., k:k + 1], shifted + logp[..., k:k + 1])
        out.append(table)
    return _finish(torch.stack(out[::-1], -2))


def _check_num_active(num_active):
    if not isinstance(num_active, torch.distributions.Distribution):
        raise TypeError(f"num_active must be a distribution over the number of active features per row "
                        f"(e.g. pyro.distributions.Poisson(3.) or a point mass), got {type(num_active).__name__}.")
    if tuple(num_active.batch_shape) != () or tuple(num_active.event_shape) != ():
        raise ValueError(f"num_active must be a scalar distribution (batch_shape () and event_shape ()), got "
                         f"batch_shape {tuple(num_active.batch_shape)}, event_shape {tuple(num_active.event_shape)}.")
    return num_active


def _num_active_log_pmf(num_active, K, like: torch.Tensor) -> torch.Tensor:
    """``log f(j)`` for ``j = 0..K`` in ``like``'s dtype and device (-inf off the support)."""
    j = torch.arange(K + 1, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        sup = num_active.support
    ok = sup.check(j) if sup is not None else torch.ones_like(j, dtype=torch.bool)
    vals = torch.full_like(j, -math.inf)
    if bool(ok.any()):
        vals[ok] = num_active.log_prob(j[ok]).to(like.dtype)
    return vals


class RestrictedBernoulliRows(TorchDistribution):
    r"""Rows of the restricted IBP given the feature probabilities (module docstring):
    :math:`p(z \mid \pi) = \tilde f(J)\prod_k \pi_k^{z_k}(1-\pi_k)^{1-z_k} / \mathrm{PB}(J; \pi)`,
    :math:`J = \sum_k z_k`, with :math:`\tilde f` the law ``num_active`` renormalized over the counts
    :math:`j \le K` with :math:`\mathrm{PB}(j; \pi) > 0` (the truncation).  ``log_prob`` is exact;
    ``sample`` draws :math:`J \sim \tilde f`, then :math:`z \mid J` sequentially from the
    conditional-Bernoulli law (suffix Poisson-binomial tables).

    :param probs: ``(..., K)`` feature probabilities in (0, 1).
    :param num_active: a scalar distribution over the non-negative integers (``log_prob`` at 0..K).
    """

    arg_constraints = {"probs": constraints.unit_interval}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = False

    def __init__(self, probs: torch.Tensor, num_active, validate_args=None):
        self.probs = probs
        self.num_active = _check_num_active(num_active)
        super().__init__(probs.shape[:-1], probs.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return RestrictedBernoulliRows(self.probs.expand(batch_shape + self.event_shape), self.num_active,
                                       validate_args=False)

    def _count_terms(self):
        """``log f~(j) - log PB(j; pi)`` for ``j = 0..K``, ``(..., K + 1)``."""
        K = self.probs.shape[-1]
        log_pb = poisson_binomial_log_pmf(self.probs)
        log_f = _num_active_log_pmf(self.num_active, K, self.probs).expand_as(log_pb)
        log_f = torch.where(torch.isfinite(log_pb), log_f, torch.full_like(log_f, -math.inf))
        log_f = log_f - torch.logsumexp(log_f, -1, keepdim=True)
        return log_f, log_pb

    def log_prob(self, value):
        probs = self.probs
        log_f, log_pb = self._count_terms()
        lb = (value * torch.log(probs) + (1 - value) * torch.log1p(-probs)).sum(-1)
        J = value.sum(-1).round().long()
        shape = torch.broadcast_shapes(J.shape, log_f.shape[:-1])
        J = J.expand(shape)
        lf = log_f.expand(shape + log_f.shape[-1:]).gather(-1, J.unsqueeze(-1)).squeeze(-1)
        lp = log_pb.expand(shape + log_pb.shape[-1:]).gather(-1, J.unsqueeze(-1)).squeeze(-1)
        out = lf + lb.expand(shape) - lp
        return torch.where(torch.isfinite(lf) & torch.isfinite(lp), out, torch.full_like(out, -math.inf))

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.batch_shape
            K = self.probs.shape[-1]
            probs = self.probs.expand(shape + (K,))
            log_f, _ = self._count_terms()
            J = dist.Categorical(logits=log_f.expand(shape + (K + 1,))).sample()
            suffix = _suffix_tables(probs)  # (..., K + 1, K + 1)
            logp = torch.log(probs)
            remaining = J.clone()
            z = torch.zeros_like(probs)
            for k in range(K):
                now = suffix[..., k, :].gather(-1, remaining.unsqueeze(-1)).squeeze(-1)
                nxt = suffix[..., k + 1, :].gather(-1, (remaining - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
                log_p1 = torch.where(remaining > 0, logp[..., k] + nxt - now, torch.full_like(now, -math.inf))
                zk = torch.bernoulli(torch.exp(log_p1).clamp(0.0, 1.0))
                z[..., k] = zk
                remaining = remaining - zk.long()
            return z


# --------------------------------------------------------------------------- the truncated IBP
class IndianBuffet(TorchDistribution):
    r"""The truncated (restricted) Indian buffet prior over a binary matrix ``(num_rows, truncation)``.

    ``sample()`` is the full prior: sticks by stick-breaking (``construction`` below), then rows
    given the sticks (independent Bernoulli, or :class:`RestrictedBernoulliRows` when
    ``num_active`` is given).  ``log_prob(value, probs)`` is **conditional on the sticks**: it
    returns :math:`\log p(Z \mid \pi)` (the sticks are separate latent variables of the Pyro
    model, see :meth:`sample_sticks`) and does not integrate them out.

    :param float alpha: mass :math:`\alpha > 0`.
    :param int num_rows: N.
    :param int truncation: K >= 1 columns.
    :param float concentration: c (> -discount), default 1.
    :param float discount: :math:`\sigma \in [0, 1)`, default 0.
    :param num_active: ``None`` (the IBP) or a distribution of the number of active features per
        row (the restricted IBP).
    :param str construction: ``"ordered"`` (Teh et al. 2007; only for c = 1, :math:`\sigma` = 0)
        or ``"rounds"`` (Broderick et al. 2012); default ``"ordered"`` when c = 1 and
        :math:`\sigma` = 0, else ``"rounds"``.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.boolean, 2)

    def __init__(self, alpha, num_rows, truncation, concentration=1.0, discount=0.0, num_active=None,
                 construction=None, dtype=torch.float64, device=None, validate_args=None):
        self.alpha, self.concentration, self.discount = _check_ibp_params(alpha, concentration, discount)
        self.num_rows = check_positive_int(num_rows, "num_rows")
        self.truncation = check_positive_int(truncation, "truncation")
        self.num_active = None if num_active is None else _check_num_active(num_active)
        one_param = self.concentration == 1.0 and self.discount == 0.0
        if construction is None:
            construction = "ordered" if one_param else "rounds"
        self.construction = check_choice(construction, "construction", ("ordered", "rounds"))
        if self.construction == "ordered" and not one_param:
            raise ValueError("construction='ordered' is the one-parameter IBP (concentration=1, discount=0); "
                             "use construction='rounds' for the three-parameter IBP.")
        self.dtype, self.device = dtype, device
        super().__init__(torch.Size(), torch.Size([self.num_rows, self.truncation]), validate_args=False)

    # ---- truncation
    def _max_rounds(self):
        K = self.truncation
        return int(math.ceil((K + 10.0 * math.sqrt(K) + 10.0) / self.alpha))

    def dropped_mass(self) -> float:
        r"""Expected number of features per row that the truncation drops (per-row mass of the
        sticks beyond column K): :math:`\alpha(\alpha/(1+\alpha))^K` (ordered); for rounds
        :math:`\sum_r \mathbb E\pi_r\,\mathbb E[\#\text{atoms of round } r \text{ beyond } K]`, the
        tail beyond :math:`10^6` rounds bounded by the integral of the power law."""
        a, K = self.alpha, self.truncation
        if self.construction == "ordered":
            return a * (a / (1 + a)) ** K
        from scipy.stats import poisson

        R = 10 ** 6
        means = _round_stick_means(self.concentration, self.discount, R)
        r = np.arange(0, R + 1, dtype=np.float64)
        lam = a * r
        # E[(S_r - K)^+] = lam - K + sum_{s<K} (K - s) pmf(s; lam), exact where it matters
        s = np.arange(K, dtype=np.float64)
        excess = lam - K
        near = lam < K + 40 * math.sqrt(K) + 40
        excess[near] += ((K - s)[None, :] * poisson.pmf(s[None, :], lam[near][:, None])).sum(-1)
        beyond = np.diff(excess)  # E[# atoms of round r with index > K]
        total = float((means * beyond).sum())
        s_ = self.discount
        if s_ > 0:
            tail = means[-1] * R * s_ / (1 - s_)
        else:
            q = self.concentration / (1 + self.concentration)
            tail = means[-1] * q / (1 - q)
        return total + a * tail

    def truncation_bias(self, num_rows: Optional[int] = None) -> float:
        r"""Upper bound on :math:`\mathbb E[K_N] - \mathbb E[K_N^{(K)}]`, the features the
        truncation loses among ``num_rows`` rows (default N): at most N times :meth:`dropped_mass`
        (each dropped atom is used by a row with probability at most its stick)."""
        n = self.num_rows if num_rows is None else check_positive_int(num_rows, "num_rows")
        return n * self.dropped_mass()

    # ---- sticks
    def sample_sticks(self, sample_shape=torch.Size()) -> torch.Tensor:
        r"""Feature probabilities ``(*sample_shape, K)`` from the stick-breaking construction."""
        shape = torch.Size(sample_shape)
        K, a = self.truncation, self.alpha
        kw = dict(dtype=self.dtype, device=self.device)
        if self.construction == "ordered":
            nu = torch.distributions.Beta(torch.tensor(a, **kw), torch.tensor(1.0, **kw)).sample(shape + (K,))
            return torch.cumprod(nu, -1)
        c, s = self.concentration, self.discount
        R = self._max_rounds()
        counts = torch.poisson(torch.full(shape + (R,), a, **kw))
        cum = torch.cumsum(counts, -1)
        slots = torch.arange(1, K + 1, **kw).expand(shape + (K,)).contiguous()
        rnd = torch.searchsorted(cum, slots)  # 0-based round of each slot (R: beyond the rounds drawn)
        present = rnd < R
        r1 = rnd.clamp_max(R - 1).to(self.dtype) + 1.0  # 1-based round
        if s == 0.0:
            # 1 - V_l ~ Beta(c, 1): -log prod_{l<r}(1 - V_l) ~ Gamma(r - 1, c)
            v = torch.distributions.Beta(torch.tensor(1.0, **kw), torch.tensor(c, **kw)).sample(shape + (K,))
            g = torch.distributions.Gamma((r1 - 1).clamp_min(tiny(self.dtype)), torch.tensor(c, **kw)).sample()
            g = torch.where(r1 > 1, g, torch.zeros_like(g))
            pi = v * torch.exp(-g)
        else:
            ls = torch.arange(1, R + 1, **kw)
            V = torch.distributions.Beta(torch.full((R,), 1 - s, **kw), c + ls * s).sample(shape + (K,))
            log_w = torch.cumsum(torch.log1p(-V), -1)
            log_w = torch.cat([torch.zeros_like(log_w[..., :1]), log_w[..., :-1]], -1)
            idx = (r1.long() - 1).unsqueeze(-1)
            pi = torch.exp(torch.log(V).gather(-1, idx) + log_w.gather(-1, idx)).squeeze(-1)
        return torch.where(present, pi, torch.zeros_like(pi))

    def rows(self, probs: torch.Tensor) -> TorchDistribution:
        """The law of one row given the sticks ``probs`` ``(..., K)`` (event shape ``(K,)``)."""
        if self.num_active is None:
            return dist.Bernoulli(probs=probs, validate_args=False).to_event(1)
        return RestrictedBernoulliRows(probs, self.num_active)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape)
        pi = self.sample_sticks(shape)
        probs = pi.unsqueeze(-2).expand(shape + (self.num_rows, self.truncation))
        if self.num_active is not None:
            # a stick of exactly 0 (an atom beyond the rounds drawn) makes PB degenerate: floor it
            probs = probs.clamp(tiny(self.dtype), 1 - eps(self.dtype))
        return self.rows(probs).sample()

    def log_prob(self, value, probs=None):
        r""":math:`\log p(Z \mid \pi) = \sum_n \log p(z_n \mid \pi)`, conditional on the sticks
        ``probs`` ``(..., K)`` (required: the marginal over the sticks has no closed form)."""
        if probs is None:
            raise ValueError("IndianBuffet.log_prob(value, probs) is the log-probability of Z given the "
                             "feature probabilities: pass probs= (e.g. from sample_sticks()).")
        return self.rows(probs.unsqueeze(-2)).log_prob(value).sum(-1)


# --------------------------------------------------------------------------- data checks
def _check_counts(counts, name="counts", num_items=None):
    """``counts`` as a float tensor ``(N, D)`` of non-negative integers (numpy accepted)."""
    if isinstance(counts, np.ndarray):
        if counts.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {counts.dtype}.")
        counts = torch.as_tensor(counts)
    if not torch.is_tensor(counts):
        raise TypeError(f"{name} must be a tensor (or numpy array) of shape (num_rows, num_items), got "
                        f"{type(counts).__name__}.")
    if counts.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_rows, num_items), got shape {tuple(counts.shape)}; "
                         "reshape a single row with counts.reshape(1, -1).")
    if counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {tuple(counts.shape)}).")
    if num_items is not None and counts.shape[1] != num_items:
        raise ValueError(f"{name} has {counts.shape[1]} columns but the model was fitted on {num_items} items.")
    if not counts.is_floating_point():
        counts = counts.to(torch.get_default_dtype())
    if not bool(torch.isfinite(counts).all()):
        raise ValueError(f"{name} contains NaN or inf; counts must be finite non-negative integers "
                         "(drop or impute the missing entries first).")
    if bool((counts < 0).any()):
        raise ValueError(f"{name} contains negative values (min {counts.min().item():g}); counts must be >= 0.")
    if bool((counts != counts.round()).any()):
        bad = counts[counts != counts.round()][0].item()
        raise ValueError(f"{name} must hold integer counts, found {bad:g}; round or rescale the data "
                         "(the likelihood is Poisson).")
    return counts


def _drop_plate_dim(value, event_dims):
    """A global site drawn inside a particle plate has shape ``(..., P, 1, *event)``: drop the data
    plate's ``1``."""
    if value.dim() >= event_dims + 2 and value.shape[-(event_dims + 1)] == 1:
        return value.squeeze(-(event_dims + 1))
    return value


def _progress(total, desc, progress=None):
    """A tqdm bar: ``progress=None`` follows the library default (on when interactive, off with
    ``PPL_LVM_PROGRESS=0``), ``True``/``False`` force it."""
    from ..inference.callbacks import progress_bar_class, progress_default

    if not (progress_default() if progress is None else bool(progress)):
        return None
    return progress_bar_class()(total=total, desc=desc, leave=False)


def _exact_where_cancelled(new_rate, bound, z, w, phi, nz, columns):
    r"""Rates at the non-zero counts after a move, exact where the incremental update may have
    cancelled.  ``new_rate`` is an incremental value (old rate plus changes) and ``bound`` a bound on
    its accumulated rounding error; where ``new_rate <= 1000 * bound`` (a rounding residue or a
    true 0 cannot be told apart, or the relative error could exceed 1e-3) the rate is recomputed as the sum of its non-negative terms, with the
    moved features' columns of ``z * w`` (``(N, K)``, formed only for the recomputed rows) replaced by ``columns``
    (``{feature: (N,) new z * w}``).  Returns the rates and their new error bounds (``K eps``
    times the rate where recomputed).  A rate is then exactly 0 only when no active feature
    has a non-zero loading there.  Without this, a residue of about :math:`10^{-16}` times an
    earlier, larger rate, taken for a true rate, scores :math:`x \log(\text{residue})` and can be
    accepted against prior odds of that size (the ordered sticks' late columns have them):
    the one-parameter sampler at K = 80 on Reuters reached a count with rate 0."""
    fl = eps(new_rate.dtype)
    suspect = new_rate <= 1000.0 * bound
    if not bool(suspect.any()):
        return new_rate, bound
    rows, cols = nz[0][suspect], nz[1][suspect]
    part = z[rows] * w[rows]
    for k, value in columns.items():
        part[:, k] = value[rows]
    out, out_bound = new_rate.clone(), bound.clone()
    out[suspect] = (part * phi[:, cols].T).sum(-1)
    out_bound[suspect] = fl * z.shape[1] * out[suspect]
    return out, out_bound


# --------------------------------------------------------------------------- the factorization
class SparseIBPFactorization(PyroModule):
    r"""Non-negative doubly sparse Poisson factorization with an Indian buffet prior on the
    binary feature matrix (module docstring for the model and our choices where the paper's
    full text was unavailable):

    .. math::

        x_{nd} \sim \mathrm{Poisson}\Big(\sum_k z_{nk} w_{nk} \phi_{kd}\Big),\quad
        z \sim \text{truncated (restricted) IBP},\quad w_{nk} \sim \mathrm{Gamma}(a_w, b_w),\quad
        \phi_{kd} = b_{kd} g_{kd}.

    **Sticks in the Pyro model.** ``prior="ibp"``: site ``nu`` (K,) Beta(:math:`\alpha`, 1),
    :math:`\pi = \mathrm{cumprod}(\nu)`.  ``"3ibp"`` / ``"restricted-3ibp"``: site ``v``, the
    :math:`\sum_k r_k` variables :math:`V_{kl} \sim \mathrm{Beta}(1-\sigma, c + l\sigma)`,
    :math:`l = 1..r_k`, flattened, with slot :math:`k` in round :math:`r_k = \lceil k/\alpha\rceil`
    and :math:`\pi_k = V_{k r_k}\prod_{l<r_k}(1 - V_{kl})`.  This
    fixes the number of atoms per round at its mean :math:`\alpha` instead of drawing it from a
    Poisson: each atom's stick law is Broderick et al.'s, and :math:`\mathbb E[K_N]` is exact for
    integer :math:`\alpha`, but the law of :math:`Z` is an approximation of the truncated process
    (:class:`IndianBuffet` samples the exact one).

    **Sites** (Pyro names): ``nu`` or ``v`` (global), ``phi_on`` (K, D) Bernoulli and ``phi_slab``
    (K, D) Gamma (global), and in the plate ``rows`` (subsampled with ``subsample_size``): ``z``
    (K,) binary, ``w`` (K,) Gamma, ``x`` observed.  ``point_estimates`` (a subset of
    ``{"sticks", "weights", "loadings"}``) turns those into parameters (``PyroParam``\ s of the
    module, learned by a backend's optimizer or GFlowNet-EM's M-step): the loadings then are
    dense.  The rate gets a floor of the dtype's ``eps`` so that an all-zero row of ``z`` is
    improbable, not impossible.

    ``fixed_values`` (a dict with any of ``"probs"`` ``(K,)``, ``"weights"`` ``(N, K)``,
    ``"loadings"`` ``(K, D)``) holds those quantities at given values: constants of the model
    (buffers of the module, moved by ``.to()``, cast to the data's dtype), neither parameters nor
    latent sites; with all three fixed the only latent site is ``z`` and its exact posterior is
    enumerable row by row (``tests/test_ibp.py`` checks the variational backends against it).

    **Guides.** :meth:`guide` with ``guide_family="structured"`` (the default) is the
    spike-and-slab structured mean field of Titsias & Lázaro-Gredilla (2011):

    .. math::

        q(z, w) = \prod_{nk} q(z_{nk})\, q(w_{nk} \mid z_{nk}),\quad
        q(w_{nk} \mid z_{nk} = 0) = p(w_{nk}) = \mathrm{Gamma}(a_w, b_w),\quad
        q(w_{nk} \mid z_{nk} = 1) = \mathrm{Gamma}(\hat a_{nk}, \hat b_{nk}),

    and the same for the loadings, :math:`q(b_{kd})\,q(g_{kd} \mid b_{kd})` with
    :math:`q(g_{kd} \mid b_{kd} = 0)` the prior :math:`\mathrm{Gamma}(a_\phi, b_\phi)`.  A weight
    (slab) whose feature (spike) is off does not enter the likelihood, so its exact conditional
    posterior is its prior: this guide contains it, and the ELBO's KL term of that entry is
    :math:`q(z_{nk}=1)\,\mathrm{KL}(\mathrm{Gamma}(\hat a, \hat b)\,\|\,\mathrm{Gamma}(a_w, b_w))`
    instead of the full KL of the plain mean field.  ``guide_family="mean-field"`` is the plain
    mean field :math:`q(z)q(w)q(b)q(g)` (every Gamma learned whatever the spike).  The sticks get
    a Beta per variable in both.  The binary sites ``z`` and ``phi_on`` are ``Bernoulli``
    (score-function gradients; ``binary_guide="score"``, the default) or
    :class:`ppl_lvm.distributions.StraightThroughBernoulli` (``binary_guide="relaxed"``: exact
    Bernoulli draws and pmf, so ELBO values, importance weights and ``Fit.log_evidence`` are the
    discrete model's; the binary-concrete relaxation's gradient at ``temperature`` passed
    straight through, a biased, low-variance gradient that the SVI backend and plain
    ``pyro.infer.SVI`` use, while IWAE and chi^2-VIS draw it as the plain Bernoulli); the
    structured guide reads their hard 0/1 values.  :meth:`continuous_guide`: the plain mean field
    without the binary sites, for ``gflownet_em``, whose policy builds ``z`` (the guide does not
    see ``z``, so it cannot be structured).  GFlowNet-EM
    refuses a model with both local (``z``) and global (``phi_on``) discrete sites
    (``IncompatibleModelError``): use ``point_estimates=("loadings",)`` with it (the loadings then
    are parameters learned in its M-step), as ``tests/test_ibp.py`` does.

    **Fast route.** :meth:`fit_gibbs` (Gibbs sampling with the multinomial augmentation),
    recommended for real matrices.

    :param int num_features_max: truncation K >= 1.
    :param str prior: ``"3ibp"``, ``"ibp"`` or ``"restricted-3ibp"``.
    :param float alpha: IBP mass (default 2).
    :param float concentration: c (3IBP; default 1).
    :param float discount: :math:`\sigma` (3IBP; default 0.25).
    :param num_active: law of the number of active features per row (``"restricted-3ibp"``; default
        ``Poisson(alpha)``, the unrestricted per-row law).
    :param weight_shape, weight_rate: :math:`a_w, b_w` (default 1, 1).
    :param loading_shape, loading_rate: :math:`a_\phi, b_\phi` (default 1, 1).
    :param float loading_density: :math:`\rho`, prior probability that a loading is non-zero (0.2).
    :param point_estimates: sites held as parameters instead of latents (see above).
    :param dict fixed_values: quantities held at given values, constants of the model (see above).
    :param str guide_family: ``"structured"`` (default) or ``"mean-field"`` (see Guides).
    :param alpha_prior: ``(a0, b0)``: a Gamma(a0, b0) hyperprior on :math:`\alpha` (``prior="ibp"``
        only, sampled by :meth:`fit_gibbs`, whose kept draws are ``IBPGibbsFit.alpha``; ``alpha``
        is then the chain's starting value).  Given the sticks :math:`\nu_k \sim \mathrm{Beta}(\alpha, 1)`
        it is conjugate: :math:`\alpha \mid \nu \sim \mathrm{Gamma}(a_0 + K, b_0 - \sum_k \log\nu_k)`.
        The Pyro model and guides refuse it (they use the fixed ``alpha``).
    :param str binary_guide: ``"score"`` (default) or ``"relaxed"`` (see Guides).
    :param float temperature: of the straight-through binary guide sites' relaxation (0.5).

    Reference for the structured guide: Titsias, Lázaro-Gredilla. *Spike and slab variational
    inference for multi-task and multiple kernel learning*. NeurIPS 2011.
    """

    def __init__(self, num_features_max: int, prior: str = "3ibp", alpha: float = 2.0,
                 concentration: Optional[float] = None, discount: Optional[float] = None, num_active=None,
                 weight_shape: float = 1.0, weight_rate: float = 1.0, loading_shape: float = 1.0,
                 loading_rate: float = 1.0, loading_density: float = 0.2, point_estimates: Sequence[str] = (),
                 temperature: float = 0.5, binary_guide: str = "score", guide_family: str = "structured",
                 fixed_values: Optional[Dict[str, torch.Tensor]] = None, alpha_prior=None, name: str = "ibp"):
        super().__init__(name)
        warn_if_name_in_use(self, name)
        self.K = check_positive_int(num_features_max, "num_features_max")
        self.prior = check_choice(prior, "prior", ("3ibp", "ibp", "restricted-3ibp"))
        if self.prior == "ibp":
            if concentration not in (None, 1.0) or discount not in (None, 0.0):
                raise ValueError("prior='ibp' is the one-parameter IBP (concentration 1, discount 0); for other "
                                 "values use prior='3ibp'.")
            concentration, discount = 1.0, 0.0
        concentration = 1.0 if concentration is None else concentration
        discount = 0.25 if discount is None else discount
        self.alpha, self.concentration, self.discount = _check_ibp_params(alpha, concentration, discount)
        if num_active is not None and self.prior != "restricted-3ibp":
            raise ValueError("num_active is the restricted IBP's law of features per row: use "
                             "prior='restricted-3ibp' with it.")
        if self.prior == "restricted-3ibp":
            self.num_active = (_check_num_active(num_active) if num_active is not None
                               else dist.Poisson(torch.tensor(float(self.alpha))))
        else:
            self.num_active = None
        self.weight_shape = check_positive(weight_shape, "weight_shape")
        self.weight_rate = check_positive(weight_rate, "weight_rate")
        self.loading_shape = check_positive(loading_shape, "loading_shape")
        self.loading_rate = check_positive(loading_rate, "loading_rate")
        self.loading_density = check_real(loading_density, "loading_density", low=0.0, high=1.0, open_low=True,
                                          open_high=True)
        if isinstance(point_estimates, str):
            point_estimates = (point_estimates,)
        point_estimates = tuple(point_estimates)
        for p in point_estimates:
            check_choice(p, "point_estimates entries", ("sticks", "weights", "loadings"))
        self.point_estimates = frozenset(point_estimates)
        self.temperature = check_positive(temperature, "temperature")
        self.binary_guide = check_choice(binary_guide, "binary_guide", ("score", "relaxed"))
        self.guide_family = check_choice(guide_family, "guide_family", ("structured", "mean-field"))
        self.fixed = self._check_fixed_values(fixed_values)
        self.alpha_prior = self._check_alpha_prior(alpha_prior)
        for key, value in self.fixed.items():
            self.register_buffer(f"fixed_{key}", value)
        self.name = name
        # round of each slot (1-based) for the fixed-count rounds construction
        if self.prior == "ibp":
            self.rounds = None
        else:
            k = np.arange(1, self.K + 1)
            self.rounds = np.ceil(k / self.alpha - 1e-12).astype(np.int64)
        self.num_rows = self.num_items = None
        self.gibbs_ = None

    # ------------------------------------------------------------------ parameters
    def _param(self, attr, init, constraint):
        if attr not in self._pyro_params:
            setattr(self, attr, PyroParam(init(), constraint=constraint))
        return getattr(self, attr)

    _FIXED_CLASH = {"probs": "sticks", "weights": "weights", "loadings": "loadings"}

    def _check_fixed_values(self, fixed_values):
        """``fixed_values`` checked (keys, tensors, finite, ranges, the shapes known before the data)."""
        if fixed_values is None:
            return {}
        if not isinstance(fixed_values, dict):
            raise TypeError(f"fixed_values must be a dict with keys among 'probs', 'weights', 'loadings', got "
                            f"{type(fixed_values).__name__}.")
        out = {}
        for key, value in fixed_values.items():
            check_choice(key, "fixed_values keys", ("probs", "weights", "loadings"))
            if self._FIXED_CLASH[key] in self.point_estimates:
                raise ValueError(f"fixed_values[{key!r}] fixes what point_estimates={sorted(self.point_estimates)} "
                                 f"learns ({self._FIXED_CLASH[key]!r}): use one or the other.")
            if isinstance(value, np.ndarray):
                value = torch.as_tensor(value)
            if not torch.is_tensor(value) or not value.is_floating_point():
                raise TypeError(f"fixed_values[{key!r}] must be a floating-point tensor, got "
                                f"{type(value).__name__}{'' if not torch.is_tensor(value) else ' of ' + str(value.dtype)}.")
            want_dim = 1 if key == "probs" else 2
            if value.dim() != want_dim or value.shape[-1 if key != "loadings" else 0] != self.K:
                shape = {"probs": "(K,)", "weights": "(num_rows, K)", "loadings": "(K, num_items)"}[key]
                raise ValueError(f"fixed_values[{key!r}] must have shape {shape} with K = num_features_max = "
                                 f"{self.K}, got {tuple(value.shape)}.")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"fixed_values[{key!r}] contains NaN or inf.")
            if key == "probs" and not bool(((value > 0) & (value < 1)).all()):
                raise ValueError(f"fixed_values['probs'] must lie in (0, 1), got min {value.min().item():g}, "
                                 f"max {value.max().item():g}.")
            if key == "weights" and not bool((value > 0).all()):
                raise ValueError(f"fixed_values['weights'] must be > 0 (Gamma weights), got min {value.min().item():g}.")
            if key == "loadings" and not bool((value >= 0).all()):
                raise ValueError(f"fixed_values['loadings'] must be >= 0, got min {value.min().item():g}.")
            out[key] = value.detach().clone()
        return out

    def _check_alpha_prior(self, alpha_prior):
        """``(shape, rate)`` of the Gamma hyperprior on alpha, or None."""
        if alpha_prior is None:
            return None
        if self.prior != "ibp":
            raise ValueError("alpha_prior is the Gamma hyperprior on the one-parameter IBP's mass (conjugate "
                             f"given its sticks): use it with prior='ibp', not prior={self.prior!r}.")
        if not isinstance(alpha_prior, (tuple, list)) or len(alpha_prior) != 2:
            raise TypeError(f"alpha_prior must be a pair (shape, rate) of the Gamma hyperprior on alpha, got "
                            f"{alpha_prior!r}.")
        return (check_positive(alpha_prior[0], "alpha_prior shape"), check_positive(alpha_prior[1], "alpha_prior rate"))

    def _check_pyro_program_options(self):
        if self.alpha_prior is not None:
            raise ValueError("alpha_prior (the Gamma hyperprior on alpha) is sampled by fit_gibbs only; the Pyro "
                             "model and guides use the fixed alpha. Build the model without alpha_prior for them.")

    def _fixed(self, key, like):
        """The fixed value of ``key`` in ``like``'s dtype and device."""
        return getattr(self, f"fixed_{key}").to(dtype=like.dtype, device=like.device)

    def _latent(self, key):
        """Whether ``key`` (``"sticks"``, ``"weights"``, ``"loadings"``) is a latent site group."""
        fixed_key = "probs" if key == "sticks" else key
        return key not in self.point_estimates and fixed_key not in self.fixed

    def _set_dims(self, counts):
        N, D = counts.shape
        if "weights" in self.fixed and self.fixed_weights.shape[0] != N:
            raise ValueError(f"fixed_values['weights'] has {self.fixed_weights.shape[0]} rows but counts has {N}.")
        if "loadings" in self.fixed and self.fixed_loadings.shape[1] != D:
            raise ValueError(f"fixed_values['loadings'] has {self.fixed_loadings.shape[1]} items (columns) but "
                             f"counts has {D}.")
        if self.num_items is None:
            self.num_rows, self.num_items = N, D
        elif (N, D) != (self.num_rows, self.num_items):
            raise ValueError(f"counts has shape {(N, D)} but this model's parameters were created for "
                             f"{(self.num_rows, self.num_items)}; build a new SparseIBPFactorization for new data.")

    def _stick_matrix_prior(self, like):
        """Beta parameters ``(K, R)`` of the rounds construction and the mask of used entries."""
        kw = dict(dtype=like.dtype, device=like.device)
        R = int(self.rounds.max())
        ls = torch.arange(1, R + 1, **kw)
        a = torch.full((self.K, R), 1.0 - self.discount, **kw)
        b = (self.concentration + ls * self.discount).expand(self.K, R).contiguous()
        mask = torch.as_tensor(np.arange(1, R + 1)[None, :] <= self.rounds[:, None], device=like.device)
        return a, b, mask

    def _stick_prior(self, like):
        """The prior of the stick site: ``nu`` (K,) or ``v``, the used entries of the (K, R) matrix
        (slot k's rounds 1..r_k, row-major), as a flat vector."""
        kw = dict(dtype=like.dtype, device=like.device)
        if self.prior == "ibp":
            return dist.Beta(torch.full((self.K,), self.alpha, **kw), torch.ones(self.K, **kw)).to_event(1)
        a, b, mask = self._stick_matrix_prior(like)
        return dist.Beta(a[mask], b[mask]).to_event(1)

    def _flat_to_matrix(self, v):
        K, R = self.K, int(self.rounds.max())
        mask = torch.as_tensor(np.arange(1, R + 1)[None, :] <= self.rounds[:, None], device=v.device)
        mat = v.new_full(v.shape[:-1] + (K, R), 0.5)
        mat[..., mask] = v
        return mat

    def _matrix_to_probs(self, sticks):
        fl = eps(sticks.dtype)
        sticks = sticks.clamp(fl, 1 - fl)
        idx = torch.as_tensor(self.rounds - 1, device=sticks.device)
        used = torch.as_tensor(np.arange(1, sticks.shape[-1] + 1)[None, :] <= self.rounds[:, None], device=sticks.device)
        sticks = torch.where(used, sticks, torch.full_like(sticks, 0.5))  # entries past a slot's round: unused
        log_w = torch.cumsum(torch.log1p(-sticks), -1)
        log_w = torch.cat([torch.zeros_like(log_w[..., :1]), log_w[..., :-1]], -1)
        gather = idx.expand(sticks.shape[:-1]).unsqueeze(-1)
        return torch.exp(torch.log(sticks).gather(-1, gather) + log_w.gather(-1, gather)).squeeze(-1)

    def sticks_to_probs(self, sticks: torch.Tensor) -> torch.Tensor:
        r"""Feature probabilities :math:`\pi` ``(..., K)`` from the stick site's value (``nu``
        ``(..., K)``, or ``v``: the used entries :math:`V_{kl}, l \le r_k`, flattened row-major)."""
        fl = eps(sticks.dtype)
        if self.prior == "ibp":
            return torch.cumprod(sticks.clamp(fl, 1 - fl), -1)
        return self._matrix_to_probs(self._flat_to_matrix(sticks))

    def _rows_dist(self, probs):
        fl = eps(probs.dtype)
        probs = probs.clamp(fl, 1 - fl)
        if self.num_active is None:
            return dist.Bernoulli(probs=probs).to_event(1)
        return RestrictedBernoulliRows(probs, self.num_active)

    @property
    def stick_site(self):
        return "nu" if self.prior == "ibp" else "v"

    # ------------------------------------------------------------------ Pyro programs
    @pyro_method
    def model(self, counts, subsample_size: Optional[int] = None):
        self._check_pyro_program_options()
        counts = _check_counts(counts)
        self._set_dims(counts)
        N, D = counts.shape
        K = self.K
        kw = dict(dtype=counts.dtype, device=counts.device)
        if "probs" in self.fixed:
            probs = self._fixed("probs", counts)
        elif "sticks" in self.point_estimates:
            probs = self._param("probs_point", lambda: torch.full((K,), 0.5, **kw), constraints.unit_interval)
        else:
            probs = self.sticks_to_probs(pyro.sample(self.stick_site, self._stick_prior(counts)))
        if "loadings" in self.fixed:
            phi = self._fixed("loadings", counts)
        elif "loadings" in self.point_estimates:
            phi = self._param("loadings_point", lambda: torch.ones(K, D, **kw) / D * counts.sum(1).mean(),
                              constraints.positive)
        else:
            on = pyro.sample("phi_on", dist.Bernoulli(torch.full((K, D), self.loading_density, **kw)).to_event(2))
            slab = pyro.sample("phi_slab", dist.Gamma(torch.full((K, D), self.loading_shape, **kw),
                                                      torch.full((K, D), self.loading_rate, **kw)).to_event(2))
            phi = _drop_plate_dim(on * slab, 2)
        if "weights" in self.fixed:
            w_all = self._fixed("weights", counts)
        elif "weights" in self.point_estimates:
            w_all = self._param("weights_point", lambda: torch.ones(N, K, **kw), constraints.positive)
        probs = _drop_plate_dim(probs, 1) if probs.dim() >= 3 else probs
        with pyro.plate("rows", N, subsample_size=subsample_size, dim=-1, device=counts.device) as idx:
            z = pyro.sample("z", self._rows_dist(probs.unsqueeze(-2)))
            if self._latent("weights"):
                w = pyro.sample("w", dist.Gamma(torch.full((K,), self.weight_shape, **kw),
                                                torch.full((K,), self.weight_rate, **kw)).to_event(1))
            else:
                w = w_all[idx]
            rate = torch.matmul(z * w, phi) + eps(counts.dtype)
            pyro.sample("x", dist.Poisson(rate, validate_args=False).to_event(1), obs=counts.index_select(0, idx))

    @staticmethod
    def _slab_given_spike(spike, shape, rate, prior_shape, prior_rate):
        r"""The structured guide's :math:`q(\text{slab} \mid \text{spike})`: the learned Gamma where the
        spike (a hard 0/1 value) is on, the prior Gamma where it is off (``spike=None``: the learned
        Gamma everywhere, the plain mean field)."""
        if spike is None:
            return dist.Gamma(shape, rate)
        on = spike > 0.5
        return dist.Gamma(torch.where(on, shape, torch.full_like(shape, prior_shape)),
                          torch.where(on, rate, torch.full_like(rate, prior_rate)))

    def _guide_sticks(self, counts, kw):
        if self._latent("sticks"):
            shape = tuple(self._stick_prior(counts).event_shape)
            a = self._param("q_sticks_a", lambda: torch.full(shape, 2.0, **kw), constraints.positive)
            b = self._param("q_sticks_b", lambda: torch.full(shape, 2.0, **kw), constraints.positive)
            pyro.sample(self.stick_site, dist.Beta(a, b).to_event(1))

    def _guide_loadings(self, counts, kw, binary):
        """``phi_on`` (when ``binary``) then ``phi_slab`` given it (structured) or not (mean field)."""
        if not self._latent("loadings"):
            return
        N, D = counts.shape
        K = self.K
        on = None
        if binary:
            ol = self._param("q_on_logits", lambda: torch.full((K, D), 3.0, **kw), constraints.real)
            on = pyro.sample("phi_on", self._binary_guide_dist(ol, kw).to_event(2))
        # started at a scale that puts the mean rate near the mean count, mostly switched on
        scale = float(counts.mean()) / (K * self.weight_shape / self.weight_rate) + eps(counts.dtype)
        sa = self._param("q_slab_shape", lambda: torch.full((K, D), 5.0, **kw), constraints.positive)
        sb = self._param("q_slab_rate", lambda: torch.full((K, D), 5.0 / scale, **kw), constraints.positive)
        spike = on if (binary and self.guide_family == "structured") else None
        pyro.sample("phi_slab", self._slab_given_spike(spike, sa, sb, self.loading_shape,
                                                       self.loading_rate).to_event(2))

    def _guide_rows(self, counts, subsample_size, kw, binary):
        N, D = counts.shape
        K = self.K
        if binary:
            zl = self._param("q_z_logits", lambda: torch.full((N, K), 3.0, **kw), constraints.real)
        weights = self._latent("weights")
        if weights:
            wm = self.weight_shape / self.weight_rate
            wa = self._param("q_w_shape", lambda: torch.full((N, K), 5.0, **kw), constraints.positive)
            wb = self._param("q_w_rate", lambda: torch.full((N, K), 5.0 / wm, **kw), constraints.positive)
        with pyro.plate("rows", N, subsample_size=subsample_size, dim=-1, device=counts.device) as idx:
            z = None
            if binary:
                z = pyro.sample("z", self._binary_guide_dist(zl[idx], kw).to_event(1))
            if weights:
                spike = z if (binary and self.guide_family == "structured") else None
                pyro.sample("w", self._slab_given_spike(spike, wa[idx], wb[idx], self.weight_shape,
                                                        self.weight_rate).to_event(1))

    def _binary_guide_dist(self, logits, kw):
        if self.binary_guide == "score":
            return dist.Bernoulli(logits=logits)
        return StraightThroughBernoulli(torch.tensor(self.temperature, **kw), logits=logits)

    @pyro_method
    def guide(self, counts, subsample_size: Optional[int] = None):
        """The guide over every latent site: structured spike-and-slab (default) or plain mean
        field, ``guide_family`` (class docstring)."""
        self._check_pyro_program_options()
        counts = _check_counts(counts)
        self._set_dims(counts)
        kw = dict(dtype=counts.dtype, device=counts.device)
        self._guide_sticks(counts, kw)
        self._guide_loadings(counts, kw, binary=True)
        self._guide_rows(counts, subsample_size, kw, binary=True)

    @pyro_method
    def continuous_guide(self, counts, subsample_size: Optional[int] = None):
        """The plain mean-field guide over the continuous latent sites only (for ``gflownet_em``)."""
        self._check_pyro_program_options()
        counts = _check_counts(counts)
        self._set_dims(counts)
        kw = dict(dtype=counts.dtype, device=counts.device)
        self._guide_sticks(counts, kw)
        self._guide_loadings(counts, kw, binary=False)
        self._guide_rows(counts, subsample_size, kw, binary=False)

    # ------------------------------------------------------------------ simulation
    @staticmethod
    def simulate(num_rows: int = 200, num_items: int = 40, num_features: int = 4, feature_prob: float = 0.4,
                 loading_density: float = 0.3, weight_mean: float = 5.0, seed: int = 0,
                 dtype=torch.float64):
        r"""Counts with known ground truth: :math:`z_{nk} \sim \mathrm{Bernoulli}(p)` (each row with at
        least one feature), :math:`w_{nk} \sim \mathrm{Gamma}(5, 5/\bar w)`, loadings non-zero on a random
        ``loading_density`` fraction of items (at least two per feature) with Gamma(2, 1) values.
        Returns ``(counts, truth)`` with ``truth = {"z", "weights", "loadings"}``."""
        N = check_positive_int(num_rows, "num_rows")
        D = check_positive_int(num_items, "num_items")
        K = check_positive_int(num_features, "num_features")
        p = check_fraction(feature_prob, "feature_prob")
        rho = check_fraction(loading_density, "loading_density")
        wm = check_positive(weight_mean, "weight_mean")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            z = (torch.rand(N, K) < p).to(dtype)
            empty = z.sum(1) == 0
            z[empty, torch.randint(K, (int(empty.sum()),))] = 1.0
            w = torch.distributions.Gamma(torch.tensor(5.0, dtype=dtype), torch.tensor(5.0 / wm, dtype=dtype)).sample((N, K))
            on = torch.rand(K, D) < rho
            for k in range(K):
                if on[k].sum() < 2:
                    on[k, torch.randperm(D)[:2]] = True
            phi = on.to(dtype) * (1.0 + torch.distributions.Gamma(torch.tensor(2.0, dtype=dtype),
                                                                  torch.tensor(1.0, dtype=dtype)).sample((K, D)))
            counts = torch.poisson((z * w) @ phi)
        return counts, {"z": z, "weights": w, "loadings": phi}

    # ------------------------------------------------------------------ Gibbs sampling
    def _log_p_z_given_probs(self, probs, m, n_rows, count_hist):
        r""":math:`\log p(Z \mid \pi)` up to terms free of :math:`\pi`, per feature ``(K,)`` when the
        rows are unrestricted, summed (a scalar in a ``(1,)`` tensor) when restricted."""
        fl = eps(probs.dtype)
        probs = probs.clamp(fl, 1 - fl)
        bern = m * torch.log(probs) + (n_rows - m) * torch.log1p(-probs)
        if self.num_active is None:
            return bern
        log_pb = poisson_binomial_log_pmf(probs)
        return (bern.sum(-1) - (count_hist * log_pb).sum(-1)).unsqueeze(-1)

    def _gibbs_probs(self, sticks):
        """Feature probabilities from the Gibbs sampler's sticks (``nu`` (K,) or the (K, R) matrix)."""
        return self.sticks_to_probs(sticks) if self.prior == "ibp" else self._matrix_to_probs(sticks)

    def _stick_log_prior(self, sticks, mask, alpha=None):
        if self.prior == "ibp":
            return ((self.alpha if alpha is None else alpha) - 1) * torch.log(sticks)
        R = sticks.shape[-1]
        ls = torch.arange(1, R + 1, dtype=sticks.dtype, device=sticks.device)
        lp = (-self.discount) * torch.log(sticks) + (self.concentration + ls * self.discount - 1) * torch.log1p(-sticks)
        return lp * mask

    def _update_sticks(self, sticks, mask, Z, step_size, num_moves, alpha=None):
        """Random-walk Metropolis on the logits of the stick variables given Z (exact target:
        stick prior times :math:`p(Z \\mid \\pi)`), coordinate by coordinate."""
        N = Z.shape[0]
        m = Z.sum(0)
        J = Z.sum(1).long()
        hist = torch.bincount(J, minlength=self.K + 1).to(Z.dtype)
        fl = eps(Z.dtype)
        accepted = total = 0

        def target(s):
            return self._log_p_z_given_probs(self._gibbs_probs(s), m, N, hist)

        for _ in range(num_moves):
            if self.prior == "ibp":
                for l in range(self.K):
                    cur = target(sticks).sum() + self._stick_log_prior(sticks, mask, alpha).sum() \
                        + torch.log(sticks[l] * (1 - sticks[l]))
                    prop = sticks.clone()
                    u = torch.logit(sticks[l]) + step_size * torch.randn((), dtype=Z.dtype, device=Z.device)
                    prop[l] = torch.sigmoid(u).clamp(fl, 1 - fl)
                    new = (target(prop).sum() + self._stick_log_prior(prop, mask, alpha).sum()
                           + torch.log(prop[l] * (1 - prop[l])))
                    if torch.log(torch.rand((), dtype=Z.dtype, device=Z.device)) < new - cur:
                        sticks = prop
                        accepted += 1
                    total += 1
            else:
                for l in range(sticks.shape[-1]):
                    col = mask[:, l]
                    if not bool(col.any()):
                        continue
                    prop = sticks.clone()
                    # a joint move (restricted prior) of n coordinates: step / sqrt(n)
                    step = step_size if self.num_active is None else step_size / math.sqrt(float(col.sum()))
                    u = torch.logit(sticks[:, l]) + step * torch.randn(self.K, dtype=Z.dtype, device=Z.device)
                    prop[:, l] = torch.where(col, torch.sigmoid(u).clamp(fl, 1 - fl), sticks[:, l])
                    # per slot: stick prior + Jacobian of the logit move (+ p(Z | pi) per feature,
                    # unrestricted); the restricted p(Z | pi) is one joint term, added once below
                    cur = (self._stick_log_prior(sticks, mask).sum(-1)
                           + torch.log(sticks[:, l] * (1 - sticks[:, l])) * col)
                    new = (self._stick_log_prior(prop, mask).sum(-1)
                           + torch.log(prop[:, l] * (1 - prop[:, l])) * col)
                    if self.num_active is None:
                        cur, new = cur + target(sticks), new + target(prop)
                    if self.num_active is None:  # independent across features: accept each
                        ok = (torch.log(torch.rand(self.K, dtype=Z.dtype, device=Z.device)) < new - cur) & col
                        sticks = torch.where(ok.unsqueeze(-1) & (torch.arange(sticks.shape[-1], device=Z.device) == l),
                                             prop, sticks)
                        accepted += int(ok.sum())
                        total += int(col.sum())
                    else:  # the Poisson-binomial normalizer couples the features: one joint move
                        log_a = (new - cur).sum() + (target(prop) - target(sticks)).sum()
                        if torch.log(torch.rand((), dtype=Z.dtype, device=Z.device)) < log_a:
                            sticks = prop
                            accepted += 1
                        total += 1
        return sticks, accepted / max(total, 1)

    def _sample_alpha(self, sticks):
        r"""One draw of :math:`\alpha \mid \nu \sim \mathrm{Gamma}(a_0 + K,\ b_0 - \sum_k \log \nu_k)`, the
        conditional of the Gamma hyperprior given the one-parameter sticks
        :math:`\nu_k \sim \mathrm{Beta}(\alpha, 1)` (density :math:`\alpha \nu^{\alpha - 1}`)."""
        a0, b0 = self.alpha_prior
        shape = torch.tensor(a0 + sticks.shape[-1], dtype=sticks.dtype, device=sticks.device)
        rate = b0 - torch.log(sticks).sum()
        return float(torch.distributions.Gamma(shape, rate).sample())

    def _z_log_odds_prior(self, probs, J_minus):
        """Prior log odds of :math:`z_{nk} = 1` given the row's other features (``J_minus`` ``(N,)``)."""
        fl = eps(probs.dtype)
        p = probs.clamp(fl, 1 - fl)
        lo = torch.log(p) - torch.log1p(-p)
        if self.num_active is None:
            return lo.expand(J_minus.shape)
        return lo + self._count_delta[J_minus]

    def _z_log_odds(self, vals, nz, rate_nz, err_nz, Z, W, Phi, phi_tot, J, probs, k):
        """Log odds of :math:`z_{nk} = 1` against 0 for every row given everything else (the Poisson
        likelihood of the row's counts and the prior odds); also the rate without feature k at
        the non-zero counts (with its rounding-error bound; ``err_nz`` bounds that of ``rate_nz``)
        and feature k's contribution there."""
        N, K = Z.shape
        dtype = Z.dtype
        fl = eps(dtype)
        contrib = W[nz[0], k] * Phi[k, nz[1]]
        zk = Z[:, k]
        r0 = rate_nz - zk[nz[0]] * contrib
        err0 = err_nz + fl * rate_nz
        r0, err0 = _exact_where_cancelled(r0, err0, Z, W, Phi, nz, {k: torch.zeros_like(zk)})
        r1 = r0 + contrib
        term = vals * (torch.log(r1.clamp_min(tiny(dtype))) - torch.log(r0.clamp_min(tiny(dtype))))
        term = torch.where(r0 > 0, term, torch.where(r1 > 0, torch.full_like(term, math.inf), torch.zeros_like(term)))
        ll = torch.zeros(N, dtype=dtype, device=Z.device).index_add_(0, nz[0], term) - W[:, k] * phi_tot[k]
        return ll + self._z_log_odds_prior(probs[k], J - zk.long()), r0, err0, contrib

    def _set_count_delta(self, probs, log_f):
        fl = eps(probs.dtype)
        log_pb = poisson_binomial_log_pmf(probs.clamp(fl, 1 - fl))
        ct = log_f - log_pb  # log f(j) - log PB(j)
        nxt = torch.cat([ct[1:], ct.new_full((1,), -math.inf)])
        self._count_delta = torch.nan_to_num(nxt - ct, nan=-math.inf)  # at j = J_minus: term(J+1) - term(J)

    def gibbs_z_log_odds(self, counts, z, weights, loadings, probs, feature: int) -> torch.Tensor:
        r"""The log odds that :meth:`fit_gibbs` uses for :math:`z_{nk} = 1` (``k = feature``) at a
        given state, all rows ``(N,)`` (exposed for checks against enumeration of the joint)."""
        counts = _check_counts(counts)
        nz = counts.nonzero(as_tuple=True)
        if self.num_active is not None:
            self._set_count_delta(probs, _num_active_log_pmf(self.num_active, self.K, counts))
        rate_nz = ((z * weights)[nz[0]] * loadings[:, nz[1]].T).sum(-1)
        J = z.sum(1).long()
        err_nz = eps(counts.dtype) * self.K * rate_nz
        return self._z_log_odds(counts[nz], nz, rate_nz, err_nz, z, weights, loadings, loadings.sum(1), J, probs,
                                int(feature))[0]

    def _gibbs_sweep(self, st: dict, dat: dict, it: int, relabel: bool, adapt: bool):
        """One sweep of :meth:`fit_gibbs` (steps 1-5 of its docstring) on the state ``st`` (``Z``,
        ``W``, ``Bm``, ``G``, ``sticks``, ``stick_step``; updated in place) for the data ``dat``.
        Returns the stick acceptance, the rates at the non-zero counts and the loadings."""
        Z, W, Bm, G, sticks, stick_step = st["Z"], st["W"], st["Bm"], st["G"], st["sticks"], st["stick_step"]
        nz, vals, tok_r, tok_c = dat["nz"], dat["vals"], dat["tok_r"], dat["tok_c"]
        mask, log_f, swap_pairs, stick_moves = dat["mask"], dat["log_f"], dat["swap_pairs"], dat["stick_moves"]
        N, K = Z.shape
        D = Bm.shape[1]
        dtype, device = Z.dtype, Z.device
        kw = dict(dtype=dtype, device=device)
        fl = eps(dtype)
        a_w, b_w, a_p, b_p, rho = (self.weight_shape, self.weight_rate, self.loading_shape, self.loading_rate,
                                   self.loading_density)
        Phi = Bm * G
        # 1. allocation of tokens
        if tok_r.numel():
            p_tok = (Z * W)[tok_r] * Phi[:, tok_c].T
            k_tok = torch.multinomial(p_tok.clamp_min(0), 1).squeeze(-1)
            Xnk = torch.zeros(N, K, **kw).index_put_((tok_r, k_tok), torch.ones_like(k_tok, dtype=dtype),
                                                     accumulate=True)
            Xkd = torch.zeros(K, D, **kw).index_put_((k_tok, tok_c), torch.ones_like(k_tok, dtype=dtype),
                                                     accumulate=True)
        else:
            Xnk, Xkd = torch.zeros(N, K, **kw), torch.zeros(K, D, **kw)
        # 2. weights
        W_post = torch.distributions.Gamma(a_w + Xnk, b_w + Phi.sum(1).expand(N, K)).sample()
        W_prior = torch.distributions.Gamma(torch.full((N, K), a_w, **kw), torch.full((N, K), b_w, **kw)).sample()
        W = torch.where(Z > 0, W_post, W_prior).clamp_min(tiny(dtype))
        # 3. loadings
        S = (Z * W).sum(0)
        log_on = math.log(rho) + a_p * (math.log(b_p) - torch.log(b_p + S))
        p_on = torch.sigmoid(log_on - math.log1p(-rho)).unsqueeze(-1).expand(K, D)
        Bm = torch.where(Xkd > 0, torch.ones_like(Xkd), torch.bernoulli(p_on))
        G_post = torch.distributions.Gamma(a_p + Xkd, (b_p + S).unsqueeze(-1).expand(K, D)).sample()
        G_prior = torch.distributions.Gamma(torch.full((K, D), a_p, **kw), torch.full((K, D), b_p, **kw)).sample()
        G = torch.where(Bm > 0, G_post, G_prior).clamp_min(tiny(dtype))
        Phi = Bm * G
        # 4. Z, feature by feature, all rows at once
        probs = self._gibbs_probs(sticks)
        if self.num_active is not None:
            self._set_count_delta(probs, log_f)
        rate_nz = ((Z * W)[nz[0]] * Phi[:, nz[1]].T).sum(-1)
        err_nz = fl * K * rate_nz  # a bound on rate_nz's rounding error, grown by every update below
        phi_tot = Phi.sum(1)
        J = Z.sum(1).long()
        for k in range(K):
            logit, r0, err0, contrib = self._z_log_odds(vals, nz, rate_nz, err_nz, Z, W, Phi, phi_tot, J, probs, k)
            zk = Z[:, k]
            J_minus = J - zk.long()
            new = torch.bernoulli(torch.sigmoid(logit))
            new = torch.where(torch.isnan(logit), zk, new)
            rate_nz = r0 + new[nz[0]] * contrib
            err_nz = err0 + fl * rate_nz
            J = J_minus + new.long()
            Z[:, k] = new
        # 4b. swap moves: row n exchanges its membership and weight between features k, l
        for _ in range(swap_pairs):
            k, l = torch.randperm(K, device=device)[:2].tolist()
            a = Z[:, k] * W[:, k]
            b = Z[:, l] * W[:, l]
            coef = b - a  # the rate changes by coef_n * (phi_k - phi_l)
            delta = coef[nz[0]] * (Phi[k, nz[1]] - Phi[l, nz[1]])
            new_err = err_nz + fl * (rate_nz + delta.abs())
            new_rate, new_err = _exact_where_cancelled(rate_nz + delta, new_err, Z, W, Phi, nz, {k: b, l: a})
            ok_rate = new_rate > 0
            term = torch.where(ok_rate, vals * (torch.log(new_rate.clamp_min(tiny(dtype)))
                                                - torch.log(rate_nz.clamp_min(tiny(dtype)))),
                               torch.full_like(new_rate, -math.inf))
            dll = torch.zeros(N, **kw).index_add_(0, nz[0], term) - coef * (phi_tot[k] - phi_tot[l])
            pk, pl = probs[k].clamp(fl, 1 - fl), probs[l].clamp(fl, 1 - fl)
            dprior = (Z[:, l] - Z[:, k]) * (torch.logit(pk) - torch.logit(pl))
            acc_sw = torch.log(torch.rand(N, **kw)) < dll + dprior
            acc_sw &= (Z[:, k] != Z[:, l]) | (W[:, k] != W[:, l])
            if bool(acc_sw.any()):
                zk, zl, wk, wl = Z[:, k].clone(), Z[:, l].clone(), W[:, k].clone(), W[:, l].clone()
                Z[:, k] = torch.where(acc_sw, zl, zk)
                Z[:, l] = torch.where(acc_sw, zk, zl)
                W[:, k] = torch.where(acc_sw, wl, wk)
                W[:, l] = torch.where(acc_sw, wk, wl)
                rate_nz = torch.where(acc_sw[nz[0]], new_rate, rate_nz)
                err_nz = torch.where(acc_sw[nz[0]], new_err, err_nz)
        # 4c. merge / split moves of one row between features k and l (reversible jump on
        # the weights): (1, 1) -> (1, 0) with w_k + w_l, or (1, 0) -> (1, 1) splitting w_k
        for _ in range(swap_pairs):
            k, l = torch.randperm(K, device=device)[:2].tolist()
            both = (Z[:, k] > 0) & (Z[:, l] > 0)
            only_k = (Z[:, k] > 0) & (Z[:, l] == 0)
            if not bool((both | only_k).any()):
                continue
            u = torch.rand(N, **kw).clamp(fl, 1 - fl)
            wk, wl = W[:, k], W[:, l]
            s_m = wk + wl
            coef = torch.where(both, wl, -(1 - u) * wk)  # rate change: coef * (phi_k - phi_l)
            delta = coef[nz[0]] * (Phi[k, nz[1]] - Phi[l, nz[1]])
            new_err = err_nz + fl * (rate_nz + delta.abs())
            new_rate, new_err = _exact_where_cancelled(rate_nz + delta, new_err, Z, W, Phi, nz,
                                                       {k: torch.where(both, s_m, u * wk),
                                                        l: torch.where(both, torch.zeros_like(wl), (1 - u) * wk)})
            term = torch.where(new_rate > 0, vals * (torch.log(new_rate.clamp_min(tiny(dtype)))
                                                     - torch.log(rate_nz.clamp_min(tiny(dtype)))),
                               torch.full_like(new_rate, -math.inf))
            dll = torch.zeros(N, **kw).index_add_(0, nz[0], term) - coef * (phi_tot[k] - phi_tot[l])

            def log_pw(x):
                return (a_w - 1) * torch.log(x.clamp_min(tiny(dtype))) - b_w * x

            # prior log odds of z_nl = 1 given the row's other features
            J_now = Z.sum(1).long()
            lo_l = self._z_log_odds_prior(probs[l], J_now - Z[:, l].long())
            log_merge = dll - lo_l + log_pw(s_m) - log_pw(wk) - log_pw(wl) - torch.log(s_m)
            log_split = dll + lo_l + log_pw(u * wk) + log_pw((1 - u) * wk) - log_pw(wk) + torch.log(wk)
            log_a = torch.where(both, log_merge, torch.where(only_k, log_split, torch.full_like(dll, -math.inf)))
            acc_m = torch.log(torch.rand(N, **kw)) < log_a
            if bool(acc_m.any()):
                w_aux = torch.distributions.Gamma(torch.full((N,), a_w, **kw), torch.full((N,), b_w, **kw)).sample()
                new_wk = torch.where(both, s_m, u * wk)
                new_wl = torch.where(both, w_aux, (1 - u) * wk).clamp_min(tiny(dtype))
                new_zl = torch.where(both, torch.zeros_like(wk), torch.ones_like(wk))
                W[:, k] = torch.where(acc_m, new_wk, wk)
                W[:, l] = torch.where(acc_m, new_wl, wl)
                Z[:, l] = torch.where(acc_m, new_zl, Z[:, l])
                rate_nz = torch.where(acc_m[nz[0]], new_rate, rate_nz)
                err_nz = torch.where(acc_m[nz[0]], new_err, err_nz)
        # 4d. relabeling: features k and l exchange their columns (z, w, loadings) whole;
        # the likelihood is unchanged, the prior odds decide (the ordered sticks tie a
        # column's prior probability to its position)
        m_k = Z.sum(0)
        lg = torch.logit(probs.clamp(fl, 1 - fl))
        for _ in range(swap_pairs if relabel else 0):  # warmup only: kept draws keep their labels
            k, l = torch.randperm(K, device=device)[:2].tolist()
            log_a = (m_k[l] - m_k[k]) * (lg[k] - lg[l])
            if bool(torch.log(torch.rand((), **kw)) < log_a):
                perm = torch.arange(K, device=device)
                perm[k], perm[l] = l, k
                Z, W, Bm, G, Phi = Z[:, perm], W[:, perm], Bm[perm], G[perm], Phi[perm]
                m_k = m_k[perm]
                phi_tot = phi_tot[perm]
        # 5. sticks
        alpha = st.get("alpha")
        sticks, acc = self._update_sticks(sticks, mask, Z, stick_step, stick_moves, alpha)
        if self.alpha_prior is not None:
            alpha = self._sample_alpha(sticks)
        if adapt:  # adapt the step toward acceptance 0.35 during warmup only
            stick_step *= math.exp((acc - 0.35) / math.sqrt(it + 1.0))
        st.update(Z=Z, W=W, Bm=Bm, G=G, sticks=sticks, stick_step=stick_step, alpha=alpha)
        return acc, rate_nz, Phi

    def _prepare_counts(self, counts):
        nz = counts.nonzero(as_tuple=True)
        vals = counts[nz]
        reps = vals.long()
        tok_r = torch.repeat_interleave(nz[0], reps)
        tok_c = torch.repeat_interleave(nz[1], reps)
        return nz, vals, tok_r, tok_c

    def fit_gibbs(self, counts, num_steps: int = 500, warmup: Optional[int] = None, thin: int = 1,
                  stick_step_size: float = 0.5, stick_moves: int = 2, seed: Optional[int] = None,
                  progress: Optional[bool] = None, init: str = "random",
                  swap_pairs: Optional[int] = None) -> "IBPGibbsFit":
        r"""Gibbs sampling of the posterior by the multinomial augmentation (the recommended route).

        One sweep (``num_steps`` sweeps, the first ``warmup`` (default half) discarded, every
        ``thin``-th kept):

        1. allocate every token of :math:`x_{nd}` to a feature,
           :math:`(x_{nd1}, \dots, x_{ndK}) \sim \mathrm{Mult}(x_{nd};\ z_{nk} w_{nk}\phi_{kd} / \lambda_{nd})`;
        2. :math:`w_{nk} \sim \mathrm{Gamma}(a_w + \sum_d x_{ndk},\ b_w + \sum_d \phi_{kd})` where
           :math:`z_{nk} = 1`, the prior otherwise;
        3. :math:`b_{kd} = 1` where :math:`\sum_n x_{ndk} > 0`, else
           :math:`P(b_{kd} = 1) = \rho (\frac{b_\phi}{b_\phi + S_k})^{a_\phi} / [\rho (\frac{b_\phi}{b_\phi + S_k})^{a_\phi} + 1 - \rho]`
           with :math:`S_k = \sum_n z_{nk} w_{nk}` (the slab integrated out); then
           :math:`g_{kd} \sim \mathrm{Gamma}(a_\phi + \sum_n x_{ndk}, b_\phi + S_k)` (prior where :math:`b = 0`);
        4. :math:`z_{nk}` for :math:`k = 1..K` in turn, all rows at once, from the exact
           conditional given :math:`w, \phi, \pi` and the row's other features (the Poisson
           likelihood with the allocation summed out, the IBP or restricted-IBP prior odds);
        5. the stick variables by random-walk Metropolis on their logits (``stick_moves`` passes,
           initial ``stick_step_size``, adapted toward an acceptance of 0.35 during warmup only),
           the target being the stick prior times :math:`p(Z \mid \pi)`; one variable at a time
           (ordered sticks), one round's variables of all slots at once (rounds: accepted slot by
           slot, or jointly under the restricted prior, whose normalizer couples them).

        Between 4 and 5, ``swap_pairs`` (default K) swap moves: for a random pair of features
        :math:`(k, l)`, every row proposes to exchange :math:`(z_{nk}, w_{nk})` with
        :math:`(z_{nl}, w_{nl})` (an involution, accepted with the Metropolis ratio of the
        likelihood and the prior odds), and as many merge/split moves: a row on both features
        proposes to drop :math:`l` and give :math:`k` the weight :math:`w_{nk} + w_{nl}`, a row on
        :math:`k` only proposes to split its weight :math:`u w_{nk}, (1-u) w_{nk}`,
        :math:`u \sim U(0, 1)`, between the two (reversible jump; Jacobian :math:`w_{nk} + w_{nl}`;
        the weight of an unused feature is a prior draw, as everywhere in the sampler).  Both
        merge split copies of one feature, the single-site sampler's slow state (docs/ibp.md has
        the measurements).  Then, during warmup only, ``swap_pairs`` relabeling moves exchange
        two features' columns whole (likelihood unchanged; accepted by the prior odds), so that a
        popular feature can reach a column of high prior probability (the ordered sticks tie the
        two); after warmup the labels stay put, so that the kept draws' per-feature summaries
        (usage, mean loadings) do not mix features.

        The concentration, discount and :math:`\rho` are fixed; the mass :math:`\alpha` too, unless
        ``alpha_prior`` is given (one-parameter IBP): then after the sticks, step 6 draws
        :math:`\alpha \sim \mathrm{Gamma}(a_0 + K, b_0 - \sum_k \log \nu_k)` and the stick moves use
        the current :math:`\alpha`.  Returns an
        :class:`IBPGibbsFit` (also kept as ``self.gibbs_``), with the kept draws.  A NaN in the
        log-likelihood stops the run with ``DivergenceError`` whose ``fit`` holds the draws so far.
        Warns when the truncation binds or the chain has visibly not converged
        (:meth:`IBPGibbsFit._warn_if_unreliable`).

        :param counts: ``(N, D)`` non-negative integer counts (tensor or numpy array).
        :param int num_steps: sweeps.
        :param int warmup: discarded sweeps (default ``num_steps // 2``); the stick step adapts and
            the relabeling moves run only then.
        :param int thin: keep every ``thin``-th sweep after warmup.
        :param float stick_step_size: initial random-walk step on the sticks' logits.
        :param int stick_moves: Metropolis passes over the sticks per sweep.
        :param int seed: ``torch.manual_seed`` before the run (``None``: the current RNG state).
        :param progress: ``None`` (library default), ``True`` or ``False``: the tqdm bar.
        :param str init: ``"random"`` (each row on about half of the features, at least one) or
            ``"one"`` (every row on feature 0 only; measured worse: all K features active after
            300 sweeps on the simulated 4-feature case).
        :param int swap_pairs: swap, merge/split and relabeling proposals per sweep (default K).
        """
        from ..errors import DivergenceError

        if self.fixed:
            raise ValueError(f"fit_gibbs samples every quantity of the model; fixed_values ({sorted(self.fixed)}) "
                             "applies to the Pyro model and guide only. Build the model without fixed_values "
                             "for fit_gibbs.")
        counts = _check_counts(counts)
        num_steps = check_positive_int(num_steps, "num_steps")
        warmup = num_steps // 2 if warmup is None else int(warmup)
        if not 0 <= warmup < num_steps:
            raise ValueError(f"warmup must be in [0, num_steps) = [0, {num_steps}), got {warmup!r}.")
        thin = check_positive_int(thin, "thin")
        stick_step_size = check_positive(stick_step_size, "stick_step_size")
        stick_moves = check_positive_int(stick_moves, "stick_moves")
        init = check_choice(init, "init", ("random", "one"))
        N, D = counts.shape
        K = self.K
        swap_pairs = K if swap_pairs is None else check_int(swap_pairs, "swap_pairs", minimum=0)
        if K < 2:
            swap_pairs = 0
        dtype, device = counts.dtype, counts.device
        kw = dict(dtype=dtype, device=device)
        if seed is not None:
            torch.manual_seed(int(seed))
        a_w, b_w, a_p, b_p = self.weight_shape, self.weight_rate, self.loading_shape, self.loading_rate
        nz, vals, tok_r, tok_c = self._prepare_counts(counts)
        fl = eps(dtype)
        # restricted prior: delta of log f~(j) - log PB(j; pi), recomputed after each stick move
        if self.num_active is not None:
            log_f = _num_active_log_pmf(self.num_active, K, counts)
        # ---- initial state: sticks from the prior, Z half on (every row at least one), loadings on
        if self.prior == "ibp":
            sticks, mask = torch.distributions.Beta(torch.full((K,), self.alpha, **kw), torch.ones(K, **kw)).sample(), None
        else:
            a_, b_, mask = self._stick_matrix_prior(counts)
            sticks = torch.distributions.Beta(a_, b_).sample()
        sticks = sticks.clamp(fl, 1 - fl)
        Z = torch.zeros(N, K, **kw)
        if init == "one":
            Z[:, 0] = 1.0
        else:
            Z = (torch.rand(N, K, **kw) < 0.5).to(dtype)
            Z[torch.arange(N, device=device), torch.randint(K, (N,), device=device)] = 1.0
        W = torch.distributions.Gamma(torch.full((N, K), a_w, **kw), torch.full((N, K), b_w, **kw)).sample()
        Bm = torch.ones(K, D, **kw)
        G = torch.distributions.Gamma(torch.full((K, D), a_p, **kw), torch.full((K, D), b_p, **kw)).sample()
        keep = {"zw": [], "loadings": [], "z": [], "probs": [], "num_active": [], "alpha": []}
        trace_ll, stick_acc = [], []
        bar = _progress(num_steps, "IBP Gibbs", progress)
        st = dict(Z=Z, W=W, Bm=Bm, G=G, sticks=sticks, stick_step=stick_step_size,
                  alpha=self.alpha if self.alpha_prior is not None else None)
        dat = dict(nz=nz, vals=vals, tok_r=tok_r, tok_c=tok_c, mask=mask,
                   log_f=log_f if self.num_active is not None else None, swap_pairs=swap_pairs,
                   stick_moves=stick_moves)
        start = time.perf_counter()

        def finish():
            return IBPGibbsFit(self, counts, keep, trace_ll, stick_acc, time.perf_counter() - start, warmup, thin)

        try:
            for it in range(num_steps):
                acc, rate_nz, Phi = self._gibbs_sweep(st, dat, it, relabel=it < warmup, adapt=it < warmup)
                Z, W, sticks = st["Z"], st["W"], st["sticks"]
                stick_acc.append(acc)
                # log-likelihood of the counts at this state
                ll_tot = float((vals * torch.log(rate_nz.clamp_min(tiny(dtype))) - torch.lgamma(vals + 1)).sum()
                               - ((Z * W).sum(0) * Phi.sum(1)).sum())
                if not math.isfinite(ll_tot):
                    raise DivergenceError(f"IBP Gibbs: the log-likelihood became {ll_tot} at sweep {it}; the draws "
                                          "kept so far are in err.fit.", step=it, fit=finish())
                trace_ll.append(ll_tot)
                if it >= warmup and (it - warmup) % thin == 0:
                    keep["zw"].append((Z * W).clone())
                    keep["loadings"].append(Phi.clone())
                    keep["z"].append(Z.clone())
                    keep["probs"].append(self._gibbs_probs(sticks).clone())
                    keep["num_active"].append(int((Z.sum(0) > 0).sum()))
                    if st["alpha"] is not None:
                        keep["alpha"].append(st["alpha"])
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self.gibbs_ = finish()
        self.gibbs_._warn_if_unreliable()
        return self.gibbs_


class IBPGibbsFit:
    r"""The kept draws of :meth:`SparseIBPFactorization.fit_gibbs` and what users need after a fit.

    Attributes: ``num_active`` (kept draws of the number of features used by at least one row),
    ``log_likelihood_trace`` (the counts' Poisson log-likelihood after each sweep),
    ``stick_acceptance`` (per sweep), ``elapsed`` (seconds); the draws ``zw`` (``z * w``),
    ``loadings``, ``z``, ``probs`` (lists of tensors).
    """

    def __init__(self, model, counts, keep, trace_ll, stick_acc, elapsed, warmup, thin):
        self.model, self.counts = model, counts
        self.zw, self.loadings, self.z, self.probs = keep["zw"], keep["loadings"], keep["z"], keep["probs"]
        self.num_active = np.asarray(keep["num_active"], dtype=np.int64)
        #: kept draws of the IBP mass (``alpha_prior``; None when alpha is fixed)
        self.alpha = np.asarray(keep["alpha"], dtype=np.float64) if keep.get("alpha") else None
        self.log_likelihood_trace = np.asarray(trace_ll)
        self.stick_acceptance = np.asarray(stick_acc)
        self.elapsed, self.warmup, self.thin = elapsed, warmup, thin

    @property
    def num_samples(self) -> int:
        return len(self.z)

    def _warn_if_unreliable(self):
        """Warn when the truncation binds (every column used in most kept draws) or the counts'
        log-likelihood still rises over the kept draws (the mean of their last fifth exceeds that
        of their first fifth by more than 4 standard errors of the difference)."""
        import warnings

        K = self.model.K
        if self.num_samples and float((self.num_active >= K).mean()) > 0.5:
            warnings.warn(f"IBP Gibbs: all {K} features are active in {float((self.num_active >= K).mean()):.0%} "
                          "of the kept draws: the truncation binds and the posterior of the number of features "
                          "is cut at num_features_max. Raise num_features_max.", UserWarning, stacklevel=3)
        kept = self.log_likelihood_trace[self.warmup:]
        n = len(kept) // 5
        if n >= 5:
            a, b = kept[:n], kept[-n:]
            se = math.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
            if b.mean() - a.mean() > 4 * se:
                warnings.warn(f"IBP Gibbs: the log-likelihood of the counts still rises over the kept draws "
                              f"({a.mean():.1f} -> {b.mean():.1f}); the chain has not converged: run more "
                              "num_steps or a longer warmup.", UserWarning, stacklevel=3)

    def _need(self):
        if not self.num_samples:
            raise ValueError("The fit kept no draws (num_steps <= warmup); run fit_gibbs longer.")

    def feature_count_posterior(self) -> Dict[int, float]:
        """Posterior probabilities of the number of active features ``{count: probability}``."""
        self._need()
        vals, cnt = np.unique(self.num_active, return_counts=True)
        return {int(v): float(c) / self.num_samples for v, c in zip(vals, cnt)}

    def feature_usage(self) -> torch.Tensor:
        """Posterior probability that row n uses feature k, ``(N, K)``."""
        self._need()
        return torch.stack(self.z).mean(0)

    def feature_order(self) -> torch.Tensor:
        """Features ordered by posterior usage (most used first)."""
        return torch.argsort(self.feature_usage().sum(0), descending=True)

    def active_features(self, min_usage: float = 0.5) -> torch.Tensor:
        """Features whose expected number of rows is at least ``min_usage`` (in usage order)."""
        order = self.feature_order()
        use = self.feature_usage().sum(0)
        return order[use[order] >= min_usage]

    def loadings_mean(self) -> torch.Tensor:
        """Posterior mean loadings ``(K, D)``."""
        self._need()
        return torch.stack(self.loadings).mean(0)

    def zero_loading_fraction(self, features=None) -> float:
        """Mean over draws of the fraction of exactly-zero loadings among ``features`` (default the
        active ones)."""
        self._need()
        f = self.active_features() if features is None else torch.as_tensor(features)
        if f.numel() == 0:
            return float("nan")
        return float(torch.stack([(phi[f] == 0).to(phi.dtype).mean() for phi in self.loadings]).mean())

    def top_items(self, labels: Optional[Sequence[str]] = None, num_items: int = 10, features=None):
        """``[(feature, [(label, mean loading), ...]), ...]`` for ``features`` (default the active ones),
        the ``num_items`` items with the largest posterior mean loadings."""
        num_items = check_positive_int(num_items, "num_items")
        phi = self.loadings_mean()
        D = phi.shape[1]
        if labels is not None and len(labels) != D:
            raise ValueError(f"labels has {len(labels)} entries but there are {D} items.")
        feats = self.active_features() if features is None else torch.as_tensor(features)
        out = []
        for k in feats.tolist():
            top = torch.argsort(phi[k], descending=True)[:num_items].tolist()
            out.append((k, [((labels[d] if labels is not None else d), float(phi[k, d])) for d in top]))
        return out

    def reconstruction(self) -> torch.Tensor:
        """Posterior mean of the Poisson rates ``(N, D)``."""
        self._need()
        return torch.stack([zw @ phi for zw, phi in zip(self.zw, self.loadings)]).mean(0)

    def heldout_log_likelihood(self, heldout, scale: float = 1.0, per_token: bool = True) -> float:
        r"""Log posterior predictive of held-out counts of the same rows and items,
        :math:`\sum_{nd} \log \frac1S \sum_s \mathrm{Poisson}(x^{\rm test}_{nd};\ \mathrm{scale}\cdot\lambda^{(s)}_{nd})`
        (``scale``: test/train exposure, e.g. 0.2/0.8 for an 80/20 token split), per held-out token
        by default.  The rate gets the Pyro model's floor ``eps(dtype)``: with exact-zero loadings a
        held-out count where every draw's rate is 0 would otherwise score :math:`-\infty`; with the
        floor it scores about :math:`\log(2.2\times10^{-16}) \approx -36` per token in float64."""
        self._need()
        x = _check_counts(heldout, "heldout", num_items=self.loadings[0].shape[1])
        if x.shape[0] != self.zw[0].shape[0]:
            raise ValueError(f"heldout has {x.shape[0]} rows, the fit {self.zw[0].shape[0]}.")
        scale = check_positive(scale, "scale")
        x = x.to(self.zw[0].dtype)
        acc = None
        for zw, phi in zip(self.zw, self.loadings):
            rate = scale * (zw @ phi) + eps(x.dtype)
            lp = x * torch.log(rate) - rate - torch.lgamma(x + 1)
            acc = lp if acc is None else torch.logaddexp(acc, lp)
        total = float((acc - math.log(self.num_samples)).sum())
        return total / float(x.sum()) if per_token else total

    def to_inferencedata(self):
        """ArviZ ``InferenceData`` of the kept draws, one chain: posterior ``num_active`` and
        ``probs`` (the feature probabilities, ``probs_dim_0`` = feature), sample_stats
        ``log_likelihood_counts`` (the counts' Poisson log-likelihood at each kept draw)."""
        import arviz as az

        self._need()
        kept = self.log_likelihood_trace[self.warmup::self.thin][: self.num_samples]
        posterior = {"num_active": self.num_active[None].astype(np.float64),
                     "probs": torch.stack(self.probs).cpu().numpy()[None]}
        if self.alpha is not None:
            posterior["alpha"] = self.alpha[None]
        return az.from_dict(posterior=posterior,
                            sample_stats={"log_likelihood_counts": np.asarray(kept)[None]})

    # ---- plots
    def plot_features(self, ax=None, max_rows: int = 200):
        """The posterior usage matrix (rows x features), features ordered by usage."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(6, 4))[1]
        use = self.feature_usage()[:max_rows]
        order = self.active_features(min_usage=0.5)
        ax.imshow(use[:, order].cpu().numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("feature (by usage)")
        ax.set_ylabel("row")
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([str(k) for k in order.tolist()], fontsize=7)
        ax.set_title("P(z_nk = 1)")
        return ax

    def plot_loadings(self, feature: int, labels: Optional[Sequence[str]] = None, num_items: int = 15, ax=None):
        """Bars of the largest posterior mean loadings of one feature, with item labels."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(5, 3))[1]
        (_, items), = self.top_items(labels, num_items, features=[int(feature)])
        ax.bar(range(len(items)), [v for _, v in items], color="C0")
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([str(lab) for lab, _ in items], rotation=70, fontsize=7)
        ax.set_title(f"feature {int(feature)}")
        ax.set_ylabel("loading")
        return ax

    def plot_feature_count(self, ax=None):
        """Bar plot of the posterior of the number of active features."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(4, 3))[1]
        post = self.feature_count_posterior()
        ax.bar(list(post), list(post.values()), color="C1")
        ax.set_xlabel("active features")
        ax.set_ylabel("posterior probability")
        return ax


@register_model("ibp")
def _matrix_case():
    counts, _ = SparseIBPFactorization.simulate(num_rows=12, num_items=6, num_features=2, seed=0)
    return (SparseIBPFactorization(3, prior="3ibp", point_estimates=("sticks", "weights", "loadings"),
                                   name="matrix_ibp"), (counts,))
