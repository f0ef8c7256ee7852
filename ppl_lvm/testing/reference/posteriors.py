r"""Pyro translations of posteriordb's Stan programs (same priors, same parameterization).

Each function is a Pyro model taking the posterior's data as keyword tensors (the names of the
Stan ``data`` block).  Stan adds nothing to the log density for a parameter without a ``~``
statement, so such a parameter has a flat prior on its declared support: written here as
:class:`pyro.distributions.ImproperUniform` and said in a comment.  Stan's ``cauchy``/``normal``
on a parameter declared ``<lower=0>`` is the half-Cauchy/half-normal (Stan drops the factor 2,
a constant; the Pyro models are normalized, which matters only for the log-evidence).

Source: posteriordb, https://github.com/stan-dev/posteriordb (BSD-3), commit
28f8d3d6e975315f42aa274a8399f21e07a43b30; the Stan program of each model is quoted in its
docstring's first line by name (``posterior_database/models/stan/<name>.stan``).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["SortedNormal", "HMMStateSpace", "hmm_log_likelihood"]


class SortedNormal(dist.TorchDistribution):
    r"""Independent normals restricted to increasing order, Stan's ``ordered[n] mu;
    mu ~ normal(loc, scale)`` (optionally ``positive_ordered``: also restricted to mu > 0).

    Density on the ordered set: :math:`\prod_k N(\mu_k; m_k, s_k) / P(\text{ordered}[, >0])`.
    With exchangeable components (equal ``loc`` and ``scale``, not positive) the normalizer is
    exactly :math:`1/n!` and ``sample`` sorts iid normals.  Otherwise the normalizer is taken as
    1 (Stan's own density, unnormalized) and ``sample`` sorts draws, which is the exact
    distribution only when the order constraint holds with probability ~1 under the
    independent normals (as in posteriordb's ``hmm_example``, P = 0.9987); the docstring of the
    model says which.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}

    def __init__(self, loc, scale, positive=False, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        self.positive = positive
        n = self.loc.shape[-1]
        exchangeable = bool((self.loc == self.loc[..., :1]).all() and (self.scale == self.scale[..., :1]).all())
        self._log_norm = math.lgamma(n + 1) if (exchangeable and not positive) else 0.0
        super().__init__(self.loc.shape[:-1], self.loc.shape[-1:], validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.positive_ordered_vector if self.positive else constraints.ordered_vector

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            x = torch.normal(self.loc.expand(self.shape(sample_shape)), self.scale.expand(self.shape(sample_shape)))
            if self.positive:
                x = x.abs()
            return x.sort(-1).values

    def log_prob(self, value):
        return dist.Normal(self.loc, self.scale).log_prob(value).sum(-1) + self._log_norm

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = SortedNormal(self.loc.expand(batch_shape + self.event_shape),
                           self.scale.expand(batch_shape + self.event_shape), positive=self.positive)
        return new


def _flat(ref, support, event_shape=()):
    """Stan's implicit prior on a parameter without a ``~`` statement: flat on its declared
    support (improper)."""
    return dist.ImproperUniform(support, (), event_shape)


def _c(ref, value):
    """A constant with the data's dtype and device."""
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


# --- hierarchical -----------------------------------------------------------------------------

def eight_schools_noncentered(J, y, sigma):
    """``eight_schools_noncentered``: theta = mu + tau * theta_trans, theta_trans ~ N(0, 1);
    mu ~ N(0, 5); tau ~ half-Cauchy(0, 5) (``real<lower=0> tau; tau ~ cauchy(0, 5)``)."""
    mu = pyro.sample("mu", dist.Normal(_c(y, 0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(_c(y, 5.0)))
    with pyro.plate("schools", int(J)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(_c(y, 0.0), 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)


def eight_schools_centered(J, y, sigma):
    """``eight_schools_centered``: theta ~ N(mu, tau); the same posterior of (mu, tau, theta)
    as the non-centered program (posteriordb's reference draws come from that one)."""
    mu = pyro.sample("mu", dist.Normal(_c(y, 0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(_c(y, 5.0)))
    with pyro.plate("schools", int(J)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


# --- regression -------------------------------------------------------------------------------

def kidscore_momiq(N, kid_score, mom_iq):
    """``kidscore_momiq``: kid_score ~ N(beta[1] + beta[2] mom_iq, sigma); beta flat on R^2
    (no prior in the Stan program: improper); sigma ~ half-Cauchy(0, 2.5)."""
    beta = pyro.sample("beta", _flat(kid_score, constraints.real_vector, (2,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_c(kid_score, 2.5)))
    with pyro.plate("data", int(N)):
        pyro.sample("kid_score", dist.Normal(beta[..., 0] + beta[..., 1] * mom_iq, sigma), obs=kid_score)


def kilpisjarvi(N, x, y, xpred, pmualpha, psalpha, pmubeta, psbeta):
    """``kilpisjarvi``: y ~ N(alpha + beta x, sigma), x the years 1952-2013 (uncentered, so
    alpha and beta are correlated at about -0.9999); alpha ~ N(pmualpha, psalpha),
    beta ~ N(pmubeta, psbeta); sigma flat on (0, inf) (no prior in the Stan program: improper)."""
    alpha = pyro.sample("alpha", dist.Normal(_c(y, pmualpha), _c(y, psalpha)))
    beta = pyro.sample("beta", dist.Normal(_c(y, pmubeta), _c(y, psbeta)))
    sigma = pyro.sample("sigma", _flat(y, constraints.positive))
    with pyro.plate("data", int(N)):
        pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def blr(N, D, X, y):
    """``blr`` (posteriordb's ``sblrc``: simulated, correlated predictors): y ~ N(X beta, sigma);
    beta ~ N(0, 10) (D = 5); sigma ~ half-normal(0, 10)."""
    beta = pyro.sample("beta", dist.Normal(_c(y, 0.0), 10.0).expand([int(D)]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(_c(y, 10.0)))
    mean = (beta.unsqueeze(-2) * X).sum(-1)                       # (..., N)
    pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y)


def logistic_wells_dist(N, switched, dist_):
    """``wells_dist``: switched ~ Bernoulli(logit^-1(beta[1] + beta[2] dist)); beta flat on
    R^2 (no prior in the Stan program: improper).  ``dist_`` is the Stan data ``dist`` (renamed:
    ``dist`` is the distributions module here)."""
    beta = pyro.sample("beta", _flat(dist_, constraints.real_vector, (2,)))
    logits = beta[..., :1] + beta[..., 1:] * dist_
    pyro.sample("switched", dist.Bernoulli(logits=logits).to_event(1), obs=switched)


# --- time series ------------------------------------------------------------------------------

def ar_k(K, T, y):
    """``arK``: y[t] ~ N(alpha + sum_k beta[k] y[t-k], sigma) for t > K; alpha ~ N(0, 10),
    beta ~ N(0, 10) (K = 5), sigma ~ half-Cauchy(0, 2.5)."""
    K, T = int(K), int(T)
    alpha = pyro.sample("alpha", dist.Normal(_c(y, 0.0), 10.0))
    beta = pyro.sample("beta", dist.Normal(_c(y, 0.0), 10.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_c(y, 2.5)))
    lags = torch.stack([y[K - k:T - k] for k in range(1, K + 1)], -1)   # (T-K, K): y[t-k]
    mean = alpha.unsqueeze(-1) + (beta.unsqueeze(-2) * lags).sum(-1)
    pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y[K:])


def _garch_observe(T, y, sigma1, mu, alpha0, alpha1, beta1):
    """y ~ N(mu, sigma[t]) with the GARCH(1, 1) variance recursion from sigma[1] = sigma1."""
    var = torch.as_tensor(sigma1, dtype=y.dtype) ** 2 * torch.ones_like(mu * alpha0 * alpha1 * beta1)
    variances = [var]
    for t in range(1, int(T)):
        var = alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * var
        variances.append(var)
    scale = torch.stack(variances, -1).sqrt()
    pyro.sample("y", dist.Normal(mu.unsqueeze(-1), scale).to_event(1), obs=y)


def garch11(T, y, sigma1):
    """``garch11``: y[t] ~ N(mu, sigma[t]), sigma[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2 +
    beta1 sigma[t-1]^2, sigma[1] = sigma1.  Stan declares mu (real), alpha0 (<lower=0>),
    alpha1 (<lower=0, upper=1>), beta1 (<lower=0, upper=1-alpha1>) with no prior: flat on
    that region.  mu and alpha0 are therefore improper; the flat density on the triangle
    {0 < alpha1, 0 < beta1 < 1 - alpha1} is written exactly as alpha1 ~ Beta(1, 2) (its marginal)
    and beta1 | alpha1 ~ Uniform(0, 1 - alpha1)."""
    mu = pyro.sample("mu", _flat(y, constraints.real))
    alpha0 = pyro.sample("alpha0", _flat(y, constraints.positive))
    alpha1 = pyro.sample("alpha1", dist.Beta(_c(y, 1.0), _c(y, 2.0)))
    beta1 = pyro.sample("beta1", dist.Uniform(torch.zeros_like(alpha1), 1.0 - alpha1))
    _garch_observe(T, y, sigma1, mu, alpha0, alpha1, beta1)


def garch11_unit_beta(T, y, sigma1):
    """``garch11`` reparameterized: beta1 = (1 - alpha1) u with u ~ Uniform(0, 1), the same
    distribution as beta1 | alpha1 ~ Uniform(0, 1 - alpha1) (so the same posterior), but with a
    support that does not depend on another latent (the refusal's advice)."""
    mu = pyro.sample("mu", _flat(y, constraints.real))
    alpha0 = pyro.sample("alpha0", _flat(y, constraints.positive))
    alpha1 = pyro.sample("alpha1", dist.Beta(_c(y, 1.0), _c(y, 2.0)))
    u = pyro.sample("beta1_unit", dist.Uniform(_c(y, 0.0), _c(y, 1.0)))
    beta1 = (1.0 - alpha1) * u
    _garch_observe(T, y, sigma1, mu, alpha0, alpha1, beta1)


def arma11(T, y):
    """``arma11``: err[t] = y[t] - (mu + phi y[t-1] + theta err[t-1]), err[1] = y[1] - mu (1 + phi)
    (err[0] = 0), err ~ N(0, sigma); mu ~ N(0, 10), phi ~ N(0, 2), theta ~ N(0, 2),
    sigma ~ half-Cauchy(0, 2.5)."""
    mu = pyro.sample("mu", dist.Normal(_c(y, 0.0), 10.0))
    phi = pyro.sample("phi", dist.Normal(_c(y, 0.0), 2.0))
    theta = pyro.sample("theta", dist.Normal(_c(y, 0.0), 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_c(y, 2.5)))
    err = y[0] - (mu + phi * mu)
    errs = [err]
    for t in range(1, int(T)):
        err = y[t] - (mu + phi * y[t - 1] + theta * err)
        errs.append(err)
    # err is a deterministic, unit-Jacobian function of y given the parameters, so the density
    # of y is the density of err (as in the Stan program)
    pyro.sample("y", dist.Normal(torch.zeros_like(sigma).unsqueeze(-1), sigma.unsqueeze(-1)).to_event(1),
                obs=torch.stack(errs, -1))


def hmm_example(N, K, y):
    """``hmm_example``: a two-state HMM with unit-variance Gaussian emissions, the states summed
    out by the forward algorithm (as in the Stan program, so this is a continuous-parameter
    model).  theta1, theta2 (the transition rows) flat on the simplex (Dirichlet(1, 1));
    mu ``positive_ordered`` with mu[1] ~ N(3, 1), mu[2] ~ N(10, 1) (Stan's density, not
    renormalized to the ordered set: the prior mass outside it is 0.0013).  The initial state
    distribution is flat (Stan: gamma[1, k] = normal_lpdf(y[1] | mu[k], 1), no log(1/K)), kept."""
    K = int(K)
    theta1 = pyro.sample("theta1", dist.Dirichlet(torch.ones(K, dtype=y.dtype, device=y.device)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(torch.ones(K, dtype=y.dtype, device=y.device)))
    mu = pyro.sample("mu", SortedNormal(torch.tensor([3.0, 10.0], dtype=y.dtype, device=y.device),
                                        _c(y, 1.0), positive=True))
    log_trans = torch.stack([theta1, theta2], -2).log()            # (..., from, to)
    emit = dist.Normal(mu.unsqueeze(-2), 1.0).log_prob(y.unsqueeze(-1))   # (..., N, K)
    alpha = emit[..., 0, :]
    for t in range(1, int(N)):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + log_trans, -2) + emit[..., t, :]
    pyro.factor("y", torch.logsumexp(alpha, -1))


# --- Gaussian processes -----------------------------------------------------------------------

def _sq_exp(x, alpha, rho):
    d2 = (x.unsqueeze(-1) - x.unsqueeze(-2)) ** 2
    return alpha[..., None, None] ** 2 * torch.exp(-0.5 * d2 / rho[..., None, None] ** 2)


def gp_regr(N, x, y):
    """``gp_regr``: y ~ N(0, K), K = alpha^2 exp(-(x - x')^2 / (2 rho^2)) + sigma I (sigma, not
    sigma^2, on the diagonal, as in the Stan program); rho ~ Gamma(25, rate 4),
    alpha ~ half-normal(0, 2), sigma ~ half-normal(0, 1)."""
    rho = pyro.sample("rho", dist.Gamma(_c(y, 25.0), _c(y, 4.0)))
    alpha = pyro.sample("alpha", dist.HalfNormal(_c(y, 2.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(_c(y, 1.0)))
    eye = torch.eye(int(N), dtype=y.dtype, device=y.device)
    cov = _sq_exp(x, alpha, rho) + sigma[..., None, None] * eye
    # where the covariance is not positive definite in floating point (a draw with a tiny sigma),
    # Stan's cholesky_decompose rejects the draw: here that draw gets log density -inf
    L, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    L = torch.where(bad[..., None, None], eye, L)
    pyro.factor("cholesky_failed", torch.where(bad, torch.full_like(sigma, -math.inf), torch.zeros_like(sigma)))
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=L), obs=y)


def gp_pois_regr(N, x, k):
    """``gp_pois_regr``: k ~ Poisson(exp f), f = L f_tilde with L L^T = the squared-exponential
    kernel + 1e-10 I; f_tilde ~ N(0, 1) (N = 11), rho ~ Gamma(25, rate 4), alpha ~ half-normal(0, 2)."""
    x = x.to(k.dtype) if k.is_floating_point() else x
    rho = pyro.sample("rho", dist.Gamma(_c(x, 25.0), _c(x, 4.0)))
    alpha = pyro.sample("alpha", dist.HalfNormal(_c(x, 2.0)))
    f_tilde = pyro.sample("f_tilde", dist.Normal(_c(x, 0.0), 1.0).expand([int(N)]).to_event(1))
    eye = torch.eye(int(N), dtype=x.dtype, device=x.device)
    L, info = torch.linalg.cholesky_ex(_sq_exp(x, alpha, rho) + 1e-10 * eye)
    bad = info != 0   # not positive definite in floating point: Stan rejects the draw
    L = torch.where(bad[..., None, None], eye, L)
    pyro.factor("cholesky_failed", torch.where(bad, torch.full_like(rho, -math.inf), torch.zeros_like(rho)))
    f = (L @ f_tilde.unsqueeze(-1)).squeeze(-1)
    pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)


def gp_pois_f(samples, data):
    x = data["x"]
    alpha, rho = samples["alpha"], samples["rho"]
    cov = _sq_exp(x, alpha, rho) + 1e-10 * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    L, info = torch.linalg.cholesky_ex(cov)
    f = (L @ samples["f_tilde"].unsqueeze(-1)).squeeze(-1)
    return torch.where((info != 0)[..., None], torch.full_like(f, math.nan), f)


# --- mixture ----------------------------------------------------------------------------------

def low_dim_gauss_mix(N, y):
    """``low_dim_gauss_mix``: y[n] ~ theta N(mu[1], sigma[1]) + (1 - theta) N(mu[2], sigma[2]);
    mu ``ordered[2]`` with mu ~ N(0, 2) (iid normals restricted to mu[1] < mu[2], normalized by
    2!), sigma ~ half-normal(0, 2), theta ~ Beta(5, 5)."""
    mu = pyro.sample("mu", SortedNormal(torch.zeros(2, dtype=y.dtype, device=y.device), _c(y, 2.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(_c(y, 2.0)).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(_c(y, 5.0), _c(y, 5.0)))
    probs = torch.stack([theta, 1.0 - theta], -1).unsqueeze(-2)           # (..., 1, 2)
    comp = dist.Normal(mu.unsqueeze(-2), sigma.unsqueeze(-2))            # (..., 1, 2)
    mix = dist.MixtureSameFamily(dist.Categorical(probs=probs), comp)     # batch (..., 1)
    pyro.sample("y", mix.expand(mix.batch_shape[:-1] + (int(N),)).to_event(1), obs=y)


class HMMStateSpace:
    """``hmm_example`` as a state-space object (Pyro's ``SMCFilter`` contract, for
    ``backend="smc_filter"``; the first observation goes to ``init``) at fixed parameters: z_1 uniform over the K states, z_t | z_{t-1} ~
    Categorical(theta[z_{t-1}]), y_t ~ N(mu[z_t], 1).  Its log-evidence is the forward
    algorithm's log-likelihood (:func:`hmm_log_likelihood`)."""

    def __init__(self, theta, mu):
        self.theta = torch.as_tensor(theta)   # (K, K): rows from, columns to
        self.mu = torch.as_tensor(mu)

    def init(self, state, y_first=None):
        K = self.mu.shape[-1]
        probs = torch.full((K,), 1.0 / K, dtype=self.mu.dtype, device=self.mu.device)
        self._emit(state, dist.Categorical(probs=probs), y_first)

    def step(self, state, y=None):
        self._emit(state, dist.Categorical(probs=self.theta[state["z"]]), y)

    def _emit(self, state, transition, y):
        z = pyro.sample("z", transition)
        pyro.sample("y", dist.Normal(self.mu[z], 1.0), obs=y)
        state["z"] = z


def hmm_log_likelihood(theta, mu, y):
    """log p(y | theta, mu) of :class:`HMMStateSpace` by the forward algorithm (uniform initial
    state; posteriordb's program omits the initial log(1/K), a constant)."""
    theta, mu = torch.as_tensor(theta), torch.as_tensor(mu)
    log_trans = theta.log()
    emit = dist.Normal(mu, 1.0).log_prob(y.unsqueeze(-1))      # (N, K)
    alpha = emit[0] - math.log(mu.shape[-1])
    for t in range(1, y.shape[0]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + log_trans, -2) + emit[t]
    return torch.logsumexp(alpha, -1)
