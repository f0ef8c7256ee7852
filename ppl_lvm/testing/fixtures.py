"""Exact-answer test fixtures.

Every fixture is a small Pyro model together with simulated data and the
*exact* answers an inference backend should recover: the log evidence
:math:`\\log p(x)` and the posterior marginal means and standard deviations.
The answers come from conjugate Gaussian algebra, a Kalman filter/smoother or
exhaustive enumeration, never from sampling.

Conventions shared by all fixtures:

* ``fixture.model(*fixture.args, **fixture.kwargs)`` runs the model and
  ``fixture.guide(*fixture.args, **fixture.kwargs)`` the guide.
* Guide parameters are :func:`pyro.param` sites named ``"<fixture.name>.<what>"``
  and start away from the posterior (location 0, scale 1, probability 0.5).
* Model and guide broadcast under an extra outer
  ``pyro.plate("particles", K, dim=-(max_plate_nesting + 1))``.
* Data are simulated with a private :class:`torch.Generator` seeded by ``seed``;
  the global torch RNG is never touched by construction.
"""

import math

import torch

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from ..validation import check_int, check_positive, check_real

__all__ = [
    "ExactFixture",
    "NormalNormalGlobal",
    "NormalNormalLocal",
    "ConjugateLinearRegression",
    "LinearGaussianSSM",
    "BinaryLatents",
    "FIXTURES",
]

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# argument checking (user input -> ValueError / TypeError, never assert)
# ---------------------------------------------------------------------------


def _check_subsample_size(subsample_size, size):
    if subsample_size is None:
        return None
    subsample_size = check_int(subsample_size, "subsample_size", minimum=1)
    if subsample_size > size:
        raise ValueError(
            f"subsample_size={subsample_size} exceeds the number of data points {size}; "
            f"pass subsample_size <= {size} or None for no subsampling"
        )
    return subsample_size


def _check_dtype(dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point torch.dtype such as torch.float64, got {dtype!r}")
    return dtype


def _const(ref, value):
    """``value`` as a tensor with the dtype and device of ``ref``."""
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------


class ExactFixture:
    """Base class of the exact-answer fixtures.

    Subclasses set the class attributes :attr:`name`, :attr:`max_plate_nesting`,
    :attr:`has_discrete_latents` and :attr:`is_state_space`, simulate data in
    ``__init__`` and implement :meth:`model`, :meth:`guide` and the ``exact_*``
    methods.

    :param int seed: seed of the private :class:`torch.Generator` used to
        simulate the data (the global RNG is not touched).
    :param torch.dtype dtype: floating point dtype of all tensors.
    :param device: device the data are moved to after simulation (on CPU);
        ``None`` means CPU.
    """

    name: str = "exact_fixture"
    max_plate_nesting: int = 0
    has_discrete_latents: bool = False
    is_state_space: bool = False

    def __init__(self, seed=0, dtype=torch.float64, device=None):
        self.seed = check_int(seed, "seed", minimum=0)
        self.dtype = _check_dtype(dtype)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        #: true values of the latent sites used to simulate the data
        self.truth = {}

    # -- simulation helpers -------------------------------------------------
    def _generator(self):
        return torch.Generator(device="cpu").manual_seed(self.seed)

    # Draws are made in float64 on CPU and then cast, so the simulated data are
    # the same (up to rounding) for every dtype and device.
    def _randn(self, generator, *shape):
        draw = torch.randn(shape, generator=generator, dtype=torch.float64)
        return draw.to(dtype=self.dtype, device=self.device)

    def _rand(self, generator, *shape):
        draw = torch.rand(shape, generator=generator, dtype=torch.float64)
        return draw.to(dtype=self.dtype, device=self.device)

    def _tensor(self, value):
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)

    # -- interface ------------------------------------------------------------
    @property
    def args(self):
        """Positional data arguments of :meth:`model` and :meth:`guide`."""
        raise NotImplementedError

    @property
    def kwargs(self):
        """Keyword arguments of :meth:`model` and :meth:`guide` (a fresh dict)."""
        return {}

    @property
    def latent_sites(self):
        """Names of the latent sample sites, in model order."""
        return tuple(self.exact_posterior_mean().keys())

    def model(self, *args, **kwargs):
        raise NotImplementedError

    def guide(self, *args, **kwargs):
        raise NotImplementedError

    def exact_log_evidence(self):
        """Exact :math:`\\log p(x)` as a Python float."""
        raise NotImplementedError

    def exact_posterior_mean(self):
        """Dict mapping each latent site name to its exact posterior mean."""
        raise NotImplementedError

    def exact_posterior_sd(self):
        """Dict mapping each latent site name to its exact marginal posterior sd."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed}, dtype={self.dtype})"


# ---------------------------------------------------------------------------
# 1. global Gaussian mean
# ---------------------------------------------------------------------------


class _NormalNormal(ExactFixture):
    """Shared constructor of the two normal-normal fixtures (one global or N local latents)."""

    max_plate_nesting = 1
    default_num_data = 50
    local_latents = False

    def __init__(
        self,
        num_data=None,
        prior_loc=0.5,
        prior_scale=2.0,
        obs_scale=1.0,
        subsample_size=None,
        seed=0,
        dtype=torch.float64,
        device=None,
    ):
        super().__init__(seed=seed, dtype=dtype, device=device)
        num_data = self.default_num_data if num_data is None else num_data
        self.num_data = check_int(num_data, "num_data")
        self.prior_loc = check_real(prior_loc, "prior_loc")
        self.prior_scale = check_positive(prior_scale, "prior_scale")
        self.obs_scale = check_positive(obs_scale, "obs_scale")
        self.subsample_size = _check_subsample_size(subsample_size, self.num_data)

        g = self._generator()
        shape = (self.num_data,) if self.local_latents else ()
        z = self.prior_loc + self.prior_scale * self._randn(g, *shape)
        self.x = z + self.obs_scale * self._randn(g, self.num_data)
        self.truth = {"z": z}

    @property
    def args(self):
        return (self.x,)


class NormalNormalGlobal(_NormalNormal):
    """One global Gaussian latent observed through ``num_data`` noisy copies.

    .. math::

        z \\sim \\mathcal{N}(\\mu_0, \\sigma_0^2), \\qquad
        x_i \\mid z \\sim \\mathcal{N}(z, \\sigma^2), \\quad i = 1..N.

    Posterior: :math:`z \\mid x \\sim \\mathcal{N}(m, v)` with
    :math:`v^{-1} = \\sigma_0^{-2} + N \\sigma^{-2}` and
    :math:`m = v(\\mu_0 \\sigma_0^{-2} + \\sigma^{-2} \\sum_i x_i)`.
    Evidence: :math:`x \\sim \\mathcal{N}(\\mu_0 \\mathbf 1,
    \\sigma^2 I + \\sigma_0^2 \\mathbf 1 \\mathbf 1^\\top)`.

    ``args == (x,)``; the guide is :math:`z \\sim \\mathcal{N}(\\text{loc}, \\text{scale})`,
    which contains the exact posterior.

    :param int num_data: :math:`N`.
    :param float prior_loc: :math:`\\mu_0`.
    :param float prior_scale: :math:`\\sigma_0`.
    :param float obs_scale: :math:`\\sigma`.
    :param subsample_size: if not ``None`` the data plate subsamples this many
        points per model call.
    """

    name = "normal_global"
    default_num_data = 50

    @property
    def args(self):
        return (self.x,)

    def model(self, x):
        loc = _const(x, self.prior_loc)
        z = pyro.sample("z", dist.Normal(loc, _const(x, self.prior_scale)))
        with pyro.plate(
            "data", x.shape[0], subsample_size=self.subsample_size, dim=-1, device=x.device
        ) as ind:
            pyro.sample("x", dist.Normal(z, _const(x, self.obs_scale)), obs=x.index_select(0, ind))

    def guide(self, x):
        loc = pyro.param(f"{self.name}.loc", lambda: torch.zeros((), dtype=x.dtype, device=x.device))
        scale = pyro.param(
            f"{self.name}.scale",
            lambda: torch.ones((), dtype=x.dtype, device=x.device),
            constraint=constraints.positive,
        )
        pyro.sample("z", dist.Normal(loc, scale))

    def _posterior(self):
        prec = self.prior_scale**-2 + self.num_data * self.obs_scale**-2
        var = 1.0 / prec
        mean = var * (self.prior_loc * self.prior_scale**-2 + self.x.sum() * self.obs_scale**-2)
        return mean, self._tensor(var)

    def exact_posterior_mean(self):
        return {"z": self._posterior()[0]}

    def exact_posterior_sd(self):
        return {"z": self._posterior()[1].sqrt()}

    def exact_log_evidence(self):
        # Closed form of log N(x; mu0 1, s^2 I + s0^2 1 1^T) via the matrix
        # determinant lemma and Sherman-Morrison (O(N) instead of O(N^3)).
        n, s2, s02 = self.num_data, self.obs_scale**2, self.prior_scale**2
        r = self.x - self.prior_loc
        logdet = n * math.log(s2) + math.log1p(n * s02 / s2)
        quad = (r.pow(2).sum() - s02 * r.sum().pow(2) / (s2 + n * s02)) / s2
        return float(-0.5 * (n * _LOG_2PI + logdet + quad))


# ---------------------------------------------------------------------------
# 2. local Gaussian latents
# ---------------------------------------------------------------------------


class NormalNormalLocal(_NormalNormal):
    """One Gaussian latent per data point.

    .. math::

        z_i \\sim \\mathcal{N}(\\mu_0, \\sigma_0^2), \\qquad
        x_i \\mid z_i \\sim \\mathcal{N}(z_i, \\sigma^2), \\quad i = 1..N.

    Posterior: independent :math:`z_i \\mid x_i \\sim \\mathcal{N}(m_i, v)` with
    :math:`v^{-1} = \\sigma_0^{-2} + \\sigma^{-2}`,
    :math:`m_i = v(\\mu_0 \\sigma_0^{-2} + x_i \\sigma^{-2})`.
    Evidence: :math:`\\sum_i \\log \\mathcal{N}(x_i; \\mu_0, \\sigma_0^2 + \\sigma^2)`.

    ``args == (x,)``. The guide has per-point parameters ``loc`` and ``scale``
    of shape ``(N,)`` indexed by the data plate's (sub)sample indices, so it
    contains the exact posterior.
    """

    name = "normal_local"
    default_num_data = 20
    local_latents = True

    def _plate(self, x):
        return pyro.plate(
            "data", x.shape[0], subsample_size=self.subsample_size, dim=-1, device=x.device
        )

    def model(self, x):
        with self._plate(x) as ind:
            z = pyro.sample(
                "z", dist.Normal(_const(x, self.prior_loc), _const(x, self.prior_scale))
            )
            pyro.sample("x", dist.Normal(z, _const(x, self.obs_scale)), obs=x.index_select(0, ind))

    def guide(self, x):
        n = x.shape[0]
        loc = pyro.param(f"{self.name}.loc", lambda: torch.zeros(n, dtype=x.dtype, device=x.device))
        scale = pyro.param(
            f"{self.name}.scale",
            lambda: torch.ones(n, dtype=x.dtype, device=x.device),
            constraint=constraints.positive,
        )
        with self._plate(x) as ind:
            pyro.sample("z", dist.Normal(loc.index_select(-1, ind), scale.index_select(-1, ind)))

    def _posterior_var(self):
        return 1.0 / (self.prior_scale**-2 + self.obs_scale**-2)

    def exact_posterior_mean(self):
        v = self._posterior_var()
        return {"z": v * (self.prior_loc * self.prior_scale**-2 + self.x * self.obs_scale**-2)}

    def exact_posterior_sd(self):
        sd = math.sqrt(self._posterior_var())
        return {"z": torch.full_like(self.x, sd)}

    def exact_log_evidence(self):
        marginal_scale = math.sqrt(self.prior_scale**2 + self.obs_scale**2)
        lp = dist.Normal(_const(self.x, self.prior_loc), _const(self.x, marginal_scale)).log_prob(self.x)
        return float(lp.sum())


# ---------------------------------------------------------------------------
# 3. Bayesian linear regression
# ---------------------------------------------------------------------------


class ConjugateLinearRegression(ExactFixture):
    """Bayesian linear regression with known noise and no bias: a conjugate model with an exact
    posterior (the library's model :class:`ppl_lvm.models.BayesianLinearRegression`, with an
    intercept and a learned noise scale, is a different thing with a different name).

    .. math::

        w \\sim \\mathcal{N}(0, \\tau^2 I_D), \\qquad
        y_n \\mid w \\sim \\mathcal{N}(X_n^\\top w, \\sigma^2), \\quad n = 1..N,

    with :math:`X \\in \\mathbb{R}^{N \\times D}` simulated standard normal.
    Posterior: :math:`w \\mid y \\sim \\mathcal{N}(\\mu, \\Sigma)`,
    :math:`\\Sigma^{-1} = \\tau^{-2} I + \\sigma^{-2} X^\\top X`,
    :math:`\\mu = \\sigma^{-2} \\Sigma X^\\top y` (full covariance, see
    :meth:`exact_posterior_cov`). Evidence:
    :math:`y \\sim \\mathcal{N}(0, \\sigma^2 I + \\tau^2 X X^\\top)`.

    ``args == (X, y)``. The guide is mean-field,
    :math:`w \\sim \\mathcal{N}(\\text{loc}, \\operatorname{diag}(\\text{scale}^2))`,
    so it does *not* contain the exact posterior.
    """

    name = "linreg"
    max_plate_nesting = 1

    def __init__(
        self,
        num_data=100,
        num_features=3,
        prior_scale=1.0,
        noise_scale=0.5,
        subsample_size=None,
        seed=0,
        dtype=torch.float64,
        device=None,
    ):
        super().__init__(seed=seed, dtype=dtype, device=device)
        self.num_data = check_int(num_data, "num_data")
        self.num_features = check_int(num_features, "num_features")
        self.prior_scale = check_positive(prior_scale, "prior_scale")
        self.noise_scale = check_positive(noise_scale, "noise_scale")
        self.subsample_size = _check_subsample_size(subsample_size, self.num_data)

        g = self._generator()
        self.X = self._randn(g, self.num_data, self.num_features)
        w = self.prior_scale * self._randn(g, self.num_features)
        self.y = self.X @ w + self.noise_scale * self._randn(g, self.num_data)
        self.truth = {"w": w}

    @property
    def args(self):
        return (self.X, self.y)

    def model(self, X, y):
        d = X.shape[-1]
        w = pyro.sample(
            "w",
            dist.Normal(X.new_zeros(()), _const(X, self.prior_scale)).expand([d]).to_event(1),
        )
        with pyro.plate(
            "data", X.shape[0], subsample_size=self.subsample_size, dim=-1, device=X.device
        ) as ind:
            X_sub = X.index_select(0, ind)
            # w has shape batch + (D,) with the plate dim (size 1) at batch[-1],
            # so multiply-and-sum gives batch[:-1] + (n,) for any extra batch dims.
            mean = (X_sub * w).sum(-1)
            pyro.sample("y", dist.Normal(mean, _const(X, self.noise_scale)), obs=y.index_select(0, ind))

    def guide(self, X, y):
        d = X.shape[-1]
        loc = pyro.param(f"{self.name}.loc", lambda: torch.zeros(d, dtype=X.dtype, device=X.device))
        scale = pyro.param(
            f"{self.name}.scale",
            lambda: torch.ones(d, dtype=X.dtype, device=X.device),
            constraint=constraints.positive,
        )
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

    def _posterior(self):
        """Return (mean, cov, cholesky factor of the precision)."""
        d = self.num_features
        eye = torch.eye(d, dtype=self.X.dtype, device=self.X.device)
        precision = eye / self.prior_scale**2 + self.X.T @ self.X / self.noise_scale**2
        chol = torch.linalg.cholesky(precision)
        cov = torch.cholesky_inverse(chol)
        mean = cov @ (self.X.T @ self.y) / self.noise_scale**2
        return mean, cov, chol

    def exact_posterior_mean(self):
        return {"w": self._posterior()[0]}

    def exact_posterior_cov(self):
        """Exact posterior covariance :math:`\\Sigma` of ``w``, shape ``(D, D)``."""
        return self._posterior()[1]

    def exact_posterior_sd(self):
        return {"w": self._posterior()[1].diagonal().sqrt()}

    def exact_log_evidence(self):
        # Woodbury / determinant lemma in the D-dimensional weight space:
        #   y^T C^{-1} y = |y|^2 / s^2 - mu^T Lambda mu
        #   log|C| = N log s^2 + D log tau^2 + log|Lambda|
        # where C = s^2 I + tau^2 X X^T and Lambda is the posterior precision.
        mean, _, chol = self._posterior()
        n, d = self.num_data, self.num_features
        s2, t2 = self.noise_scale**2, self.prior_scale**2
        logdet = n * math.log(s2) + d * math.log(t2) + 2.0 * chol.diagonal().log().sum()
        lam_mu = chol.T @ mean
        quad = self.y.pow(2).sum() / s2 - lam_mu.pow(2).sum()
        return float(-0.5 * (n * _LOG_2PI + logdet + quad))


# ---------------------------------------------------------------------------
# 4. scalar linear Gaussian state space model
# ---------------------------------------------------------------------------


class LinearGaussianSSM(ExactFixture):
    """Scalar linear Gaussian state space model (AR(1) latent + noisy observations).

    .. math::

        z_0 \\sim \\mathcal{N}(0, s_0^2), \\quad
        z_t \\mid z_{t-1} \\sim \\mathcal{N}(a z_{t-1}, q^2), \\quad
        x_t \\mid z_t \\sim \\mathcal{N}(z_t, r^2), \\quad t = 0..T-1.

    Sites are ``"z_{t}"`` and ``"x_{t}"``; ``args == (x,)`` with ``x`` of shape
    ``(T,)``. The exact log evidence comes from :meth:`kalman_filter`, the exact
    posterior marginals from :meth:`kalman_smoother` (Rauch-Tung-Striebel).
    The guide is mean-field over the ``z_t``; the exact posterior is a
    correlated Gaussian so the guide does not contain it.

    :meth:`smc_model` and :meth:`smc_guide` return objects usable with
    :class:`pyro.infer.SMCFilter` (site ``"z"``, state key ``"z"``).

    :param int num_time_steps: :math:`T`.
    :param float transition: :math:`a`.
    :param float init_scale: :math:`s_0`.
    :param float process_scale: :math:`q`.
    :param float obs_scale: :math:`r`.
    """

    name = "lgssm"
    max_plate_nesting = 0
    is_state_space = True

    def __init__(
        self,
        num_time_steps=100,
        transition=0.9,
        init_scale=1.0,
        process_scale=0.5,
        obs_scale=0.7,
        seed=0,
        dtype=torch.float64,
        device=None,
    ):
        super().__init__(seed=seed, dtype=dtype, device=device)
        self.num_time_steps = check_int(num_time_steps, "num_time_steps")
        self.transition = check_real(transition, "transition")
        self.init_scale = check_positive(init_scale, "init_scale")
        self.process_scale = check_positive(process_scale, "process_scale")
        self.obs_scale = check_positive(obs_scale, "obs_scale")

        g = self._generator()
        T = self.num_time_steps
        eps = self._randn(g, T)
        z = torch.empty(T, dtype=self.dtype, device=self.device)
        z[0] = self.init_scale * eps[0]
        for t in range(1, T):
            z[t] = self.transition * z[t - 1] + self.process_scale * eps[t]
        self.x = z + self.obs_scale * self._randn(g, T)
        self.truth = {f"z_{t}": z[t] for t in range(T)}

    @property
    def args(self):
        return (self.x,)

    def model(self, x):
        a = _const(x, self.transition)
        q = _const(x, self.process_scale)
        r = _const(x, self.obs_scale)
        z = None
        for t in pyro.markov(range(x.shape[-1])):
            if z is None:
                prior = dist.Normal(x.new_zeros(()), _const(x, self.init_scale))
            else:
                prior = dist.Normal(a * z, q)
            z = pyro.sample(f"z_{t}", prior)
            pyro.sample(f"x_{t}", dist.Normal(z, r), obs=x[..., t])

    def guide(self, x):
        T = x.shape[-1]
        loc = pyro.param(f"{self.name}.loc", lambda: torch.zeros(T, dtype=x.dtype, device=x.device))
        scale = pyro.param(
            f"{self.name}.scale",
            lambda: torch.ones(T, dtype=x.dtype, device=x.device),
            constraint=constraints.positive,
        )
        for t in range(T):
            pyro.sample(f"z_{t}", dist.Normal(loc[t], scale[t]))

    # -- exact inference ----------------------------------------------------
    def kalman_filter(self):
        """Run the Kalman filter on the fixture's data.

        :returns: dict with ``"log_evidence"`` (float), ``"filter_mean"`` and
            ``"filter_var"`` (:math:`E[z_t \\mid x_{0:t}]`,
            :math:`Var[z_t \\mid x_{0:t}]`, shape ``(T,)``), and
            ``"pred_mean"``, ``"pred_var"`` (one-step predictions
            :math:`p(z_t \\mid x_{0:t-1})`, shape ``(T,)``).
        """
        a, q2, r2 = self.transition, self.process_scale**2, self.obs_scale**2
        xs = self.x.tolist()
        m_pred, p_pred = 0.0, self.init_scale**2
        log_ev = 0.0
        fm, fv, pm, pv = [], [], [], []
        for xt in xs:
            pm.append(m_pred)
            pv.append(p_pred)
            s = p_pred + r2  # predictive variance of x_t
            resid = xt - m_pred
            log_ev += -0.5 * (_LOG_2PI + math.log(s) + resid * resid / s)
            gain = p_pred / s
            m = m_pred + gain * resid
            p = p_pred * r2 / s
            fm.append(m)
            fv.append(p)
            m_pred, p_pred = a * m, a * a * p + q2
        return {
            "log_evidence": log_ev,
            "filter_mean": self._tensor(fm),
            "filter_var": self._tensor(fv),
            "pred_mean": self._tensor(pm),
            "pred_var": self._tensor(pv),
        }

    def kalman_smoother(self):
        """Rauch-Tung-Striebel smoother.

        :returns: dict with ``"mean"`` and ``"var"`` (:math:`E[z_t \\mid x]`,
            :math:`Var[z_t \\mid x]`, shape ``(T,)``) and ``"lag_one_cov"``
            (:math:`Cov[z_t, z_{t+1} \\mid x]`, shape ``(T-1,)``).
        """
        f = self.kalman_filter()
        a = self.transition
        fm, fv = f["filter_mean"].tolist(), f["filter_var"].tolist()
        pm, pv = f["pred_mean"].tolist(), f["pred_var"].tolist()
        T = len(fm)
        sm, sv = fm[:], fv[:]
        cross = [0.0] * (T - 1)
        for t in range(T - 2, -1, -1):
            gain = fv[t] * a / pv[t + 1]
            sm[t] = fm[t] + gain * (sm[t + 1] - pm[t + 1])
            sv[t] = fv[t] + gain * gain * (sv[t + 1] - pv[t + 1])
            cross[t] = gain * sv[t + 1]
        return {"mean": self._tensor(sm), "var": self._tensor(sv), "lag_one_cov": self._tensor(cross)}

    def exact_log_evidence(self):
        return float(self.kalman_filter()["log_evidence"])

    def exact_posterior_mean(self):
        mean = self.kalman_smoother()["mean"]
        return {f"z_{t}": mean[t] for t in range(self.num_time_steps)}

    def exact_posterior_sd(self):
        sd = self.kalman_smoother()["var"].sqrt()
        return {f"z_{t}": sd[t] for t in range(self.num_time_steps)}

    # -- SMC interface ------------------------------------------------------
    def smc_model(self, learn_transition=False):
        """Model object for :class:`pyro.infer.SMCFilter`.

        ``init(state, initial=None)`` samples :math:`z_0` (site ``"z"``) and,
        if ``initial`` (the observation :math:`x_0`) is given, observes it
        (site ``"x"``). ``step(state, x=None)`` samples :math:`z_t` from the
        transition and observes ``x`` if given. ``state["z"]`` holds the
        current state, so after ``init(initial=x[0])`` and ``step(x=x[t])`` for
        ``t = 1..k``, ``smc.get_empirical()["z"]`` approximates the filtering
        distribution :math:`p(z_k \\mid x_{0:k})`.

        With ``learn_transition=True`` the transition :math:`a` is the Pyro parameter
        ``"lgssm.transition"`` (initialised at 0.5), to be learned by particle maximum likelihood.
        """
        return _LGSSMSMCModel(self, learn_transition)

    def smc_guide(self, locally_optimal=False):
        """Proposal object for :class:`pyro.infer.SMCFilter` matching :meth:`smc_model`.

        :param bool locally_optimal: if ``False`` (default) propose from the
            transition prior (bootstrap filter); if ``True`` propose from
            :math:`p(z_t \\mid z_{t-1}, x_t)`, the locally optimal proposal.
        """
        if not isinstance(locally_optimal, bool):
            raise TypeError(f"locally_optimal must be True or False, got {locally_optimal!r}")
        return _LGSSMSMCGuide(self, locally_optimal)


def _as_obs(value, like_dtype, device):
    if value is None:
        return None
    return torch.as_tensor(value, dtype=like_dtype, device=device)


class _LGSSMSMCModel:
    """SMCFilter model for :class:`LinearGaussianSSM` (see ``smc_model``)."""

    def __init__(self, fixture, learn_transition=False):
        self.fixture = fixture
        self.learn_transition = bool(learn_transition)

    def _consts(self):
        f = self.fixture
        a, s0, q, r = tuple(
            torch.tensor(v, dtype=f.dtype, device=f.device)
            for v in (f.transition, f.init_scale, f.process_scale, f.obs_scale)
        )
        if self.learn_transition:
            a = pyro.param(f"{f.name}.transition", lambda: torch.tensor(0.5, dtype=f.dtype, device=f.device))
        return a, s0, q, r

    def init(self, state, initial=None):
        f = self.fixture
        _, s0, _, r = self._consts()
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=f.dtype, device=f.device), s0))
        initial = _as_obs(initial, f.dtype, f.device)
        if initial is not None:
            pyro.sample("x", dist.Normal(z, r), obs=initial)
        state["z"] = z

    def step(self, state, x=None):
        f = self.fixture
        a, _, q, r = self._consts()
        z = pyro.sample("z", dist.Normal(a * state["z"], q))
        x = _as_obs(x, f.dtype, f.device)
        if x is not None:
            pyro.sample("x", dist.Normal(z, r), obs=x)
        state["z"] = z


class _LGSSMSMCGuide:
    """SMCFilter proposal for :class:`LinearGaussianSSM` (see ``smc_guide``)."""

    def __init__(self, fixture, locally_optimal):
        self.fixture = fixture
        self.locally_optimal = locally_optimal

    def _propose(self, prior_loc, prior_var, x):
        f = self.fixture
        if self.locally_optimal and x is not None:
            # Gaussian prior times Gaussian likelihood N(x; z, r^2).
            r2 = f.obs_scale**2
            var = 1.0 / (1.0 / prior_var + 1.0 / r2)
            loc = var * (prior_loc / prior_var + x / r2)
        else:
            var, loc = prior_var, prior_loc
        pyro.sample("z", dist.Normal(loc, torch.as_tensor(math.sqrt(var), dtype=f.dtype, device=f.device)))

    def init(self, state, initial=None):
        f = self.fixture
        loc = torch.zeros((), dtype=f.dtype, device=f.device)
        self._propose(loc, f.init_scale**2, _as_obs(initial, f.dtype, f.device))

    def step(self, state, x=None):
        f = self.fixture
        loc = f.transition * state["z"]
        self._propose(loc, f.process_scale**2, _as_obs(x, f.dtype, f.device))


# ---------------------------------------------------------------------------
# 5. binary latents (enumerable)
# ---------------------------------------------------------------------------


class BinaryLatents(ExactFixture):
    """A shared binary latent vector observed through a linear Gaussian map.

    .. math::

        z_j \\sim \\operatorname{Bernoulli}(\\pi_j), \\quad j = 0..J-1, \\qquad
        x_n \\mid z \\sim \\mathcal{N}(W z, \\sigma^2 I_D), \\quad n = 1..N,

    with a fixed :math:`W \\in \\mathbb{R}^{D \\times J}` (entries
    :math:`\\mathcal{N}(0, \\omega^2)`, simulated at construction and stored as
    ``self.W``). Each :math:`z_j` is its own site ``"z_{j}"``. The exact
    posterior and :math:`\\log p(x) = \\operatorname{logsumexp}_z \\log p(x, z)`
    come from enumerating all :math:`2^J` states (:meth:`exact_posterior_table`).
    :meth:`exact_posterior_mean` gives :math:`P(z_j = 1 \\mid x)`.

    ``args == (x,)`` with ``x`` of shape ``(N, D)``. The model broadcasts over
    extra leading batch dims of each ``z_j`` (parallel enumeration or vectorized
    particles); enumeration is left to the caller (e.g.
    :func:`pyro.infer.config_enumerate`). The guide is independent Bernoulli
    with probabilities ``"binary.probs"`` (shape ``(J,)``, initialised to 0.5).

    :param int num_data: :math:`N`.
    :param int obs_dim: :math:`D`.
    :param prior_probs: :math:`\\pi`, a sequence of :math:`J \\le 16`
        probabilities in :math:`(0, 1)`.
    :param float obs_scale: :math:`\\sigma`.
    :param float weight_scale: :math:`\\omega`; the default 0.2 keeps the
        posterior uncertain (marginals away from 0 and 1) for the default sizes.
    """

    name = "binary"
    max_plate_nesting = 1
    has_discrete_latents = True

    _MAX_LATENTS = 16

    def __init__(
        self,
        num_data=10,
        obs_dim=6,
        prior_probs=(0.3, 0.5, 0.6, 0.2),
        obs_scale=0.5,
        weight_scale=0.2,
        seed=0,
        dtype=torch.float64,
        device=None,
    ):
        super().__init__(seed=seed, dtype=dtype, device=device)
        self.num_data = check_int(num_data, "num_data")
        self.obs_dim = check_int(obs_dim, "obs_dim")
        self.obs_scale = check_positive(obs_scale, "obs_scale")
        self.weight_scale = check_positive(weight_scale, "weight_scale")
        try:
            probs = [float(p) for p in prior_probs]
        except (TypeError, ValueError):
            raise TypeError(
                "prior_probs must be a sequence of probabilities, e.g. prior_probs=(0.3, 0.5)"
            ) from None
        if not 1 <= len(probs) <= self._MAX_LATENTS:
            raise ValueError(
                f"prior_probs must have between 1 and {self._MAX_LATENTS} entries "
                f"(exact enumeration costs 2**J states), got {len(probs)}"
            )
        for p in probs:
            if not 0.0 < p < 1.0:
                raise ValueError(f"every prior probability must lie strictly in (0, 1), got {p}")
        self.prior_probs = tuple(probs)
        self.num_latents = len(probs)

        g = self._generator()
        J = self.num_latents
        self.W = self.weight_scale * self._randn(g, self.obs_dim, J)
        u = self._rand(g, J)
        z = (u < self._tensor(probs)).to(self.dtype)
        noise = self._randn(g, self.num_data, self.obs_dim)
        self.x = self.W @ z + self.obs_scale * noise
        self.truth = {f"z_{j}": z[j] for j in range(J)}

    @property
    def args(self):
        return (self.x,)

    def model(self, x):
        W = self.W.to(dtype=x.dtype, device=x.device)
        probs = _const(x, self.prior_probs)
        mean = None
        for j in range(self.num_latents):
            z_j = pyro.sample(f"z_{j}", dist.Bernoulli(probs[j]))
            # z_j has shape batch (possibly with enumeration / particle dims);
            # appending a trailing dim keeps those dims aligned on the left.
            term = z_j.unsqueeze(-1) * W[:, j]
            mean = term if mean is None else mean + term
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            pyro.sample("x", dist.Normal(mean, _const(x, self.obs_scale)).to_event(1), obs=x)

    def guide(self, x):
        J = self.num_latents
        probs = pyro.param(
            f"{self.name}.probs",
            lambda: torch.full((J,), 0.5, dtype=x.dtype, device=x.device),
            constraint=constraints.unit_interval,
        )
        for j in range(J):
            pyro.sample(f"z_{j}", dist.Bernoulli(probs[j]))

    def _log_joint_table(self):
        J = self.num_latents
        codes = torch.arange(2**J, device=self.device)
        bits = torch.arange(J - 1, -1, -1, device=self.device)
        # state k written in binary, z_0 being the most significant bit
        states = ((codes.unsqueeze(-1) >> bits) & 1).to(self.dtype)
        probs = self._tensor(self.prior_probs)
        log_prior = (states * probs.log() + (1 - states) * torch.log1p(-probs)).sum(-1)
        means = states @ self.W.T  # (S, D)
        log_lik = dist.Normal(means.unsqueeze(-2), self.obs_scale).log_prob(self.x).sum((-1, -2))
        return states, log_prior + log_lik

    def exact_posterior_table(self):
        """All :math:`2^J` states and their posterior probabilities.

        :returns: ``(states, probs)`` with ``states`` of shape ``(2**J, J)``
            (0./1. entries, state ``k`` is ``k`` in binary with ``z_0`` the most
            significant bit) and ``probs`` of shape ``(2**J,)`` summing to one.
        """
        states, log_joint = self._log_joint_table()
        return states, (log_joint - log_joint.logsumexp(0)).exp()

    def exact_log_evidence(self):
        return float(self._log_joint_table()[1].logsumexp(0))

    def exact_posterior_mean(self):
        states, probs = self.exact_posterior_table()
        marg = probs @ states
        return {f"z_{j}": marg[j] for j in range(self.num_latents)}

    def exact_posterior_sd(self):
        return {k: (p * (1 - p)).clamp(min=0).sqrt() for k, p in self.exact_posterior_mean().items()}


FIXTURES = {
    cls.name: cls
    for cls in (
        NormalNormalGlobal,
        NormalNormalLocal,
        ConjugateLinearRegression,
        LinearGaussianSSM,
        BinaryLatents,
    )
}
