"""The chi^2-VIS paper's 1-d mixture model (Li et al. 2024, sec. 5.1), shared by the VIS scripts.

p(z) = sum_c w_c N(z; m_c, 1), m = (-8, -2, 2, 8), w = ((1-pi)/2, (1-pi)/2, pi/2, pi/2);
x_i | z_i ~ Bernoulli(sigmoid(z_i)).  The parameter pi is learned; the proposal is
q(z_i | x_i) = N(loc[x_i], scale[x_i]), one Gaussian per observed value.  Because x is binary,
the exact marginal p(x = 1; pi) is a 1-d integral, computed here on a fine grid.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

MEANS = (-8.0, -2.0, 2.0, 8.0)


def weights(pi):
    half = torch.stack([(1 - pi) / 2, (1 - pi) / 2, pi / 2, pi / 2], dim=-1)
    return half


def model(x):
    pi = pyro.param("pi", lambda: torch.tensor(0.5, dtype=x.dtype), constraint=constraints.unit_interval)
    means = torch.tensor(MEANS, dtype=x.dtype)
    prior = dist.MixtureSameFamily(dist.Categorical(probs=weights(pi)), dist.Normal(means, 1.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", prior)
        pyro.sample("x", dist.Bernoulli(logits=z), obs=x)


def guide(x):
    loc = pyro.param("q_loc", lambda: torch.zeros(2, dtype=x.dtype))
    scale = pyro.param("q_scale", lambda: torch.full((2,), 3.0, dtype=x.dtype), constraint=constraints.positive)
    idx = x.long()
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(loc[idx], scale[idx]))


def simulate(n, pi=0.7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(weights(torch.tensor(pi, dtype=dtype)), n, replacement=True, generator=g)
    z = torch.tensor(MEANS, dtype=dtype)[comp] + torch.randn(n, generator=g, dtype=dtype)
    return torch.bernoulli(torch.sigmoid(z), generator=g)


def component_success(dtype=torch.float64):
    """s_c = E[sigmoid(z)] under N(m_c, 1), by the trapezoid rule on a fine grid."""
    grid = torch.linspace(-20.0, 20.0, 200001, dtype=dtype)
    dens = torch.exp(-0.5 * (grid[None, :] - torch.tensor(MEANS, dtype=dtype)[:, None]) ** 2) / math.sqrt(2 * math.pi)
    return torch.trapezoid(dens * torch.sigmoid(grid), grid, dim=-1)


def exact_loglik(x, pi):
    """Exact log p(x; pi) = sum_i log p(x_i; pi)."""
    p1 = (weights(torch.as_tensor(pi, dtype=x.dtype)) * component_success(x.dtype)).sum()
    return float((x * torch.log(p1) + (1 - x) * torch.log1p(-p1)).sum())


def mle_pi(x):
    """The maximum-likelihood pi (p(x=1) is linear in pi) and its asymptotic standard error."""
    s = component_success(x.dtype)
    a = 0.5 * (s[0] + s[1])
    b = 0.5 * (s[2] + s[3]) - a
    p1 = x.mean()
    pi_hat = ((p1 - a) / b).clamp(0.0, 1.0)
    se = torch.sqrt(p1 * (1 - p1) / x.shape[0]) / b
    return float(pi_hat), float(se)
