r"""Bayesian neural networks with latent input variables (BNN+LV), and the homoscedastic BNN.

Model (Depeweg, Hernández-Lobato, Doshi-Velez & Udluft 2018):

.. math::

    W \sim \mathcal N(0, s_w^2 I), \qquad
    z_n \sim \mathcal N(0, \gamma^2 I_L), \qquad
    y_n \mid x_n, z_n, W \sim \mathcal N\big(f_W([x_n, z_n]),\; \sigma^2 I\big),

with :math:`f_W` a tanh MLP.  The latent input :math:`z_n` lets the network turn one input into
a whole (heteroscedastic, skewed, bimodal) distribution of outputs.  The noise scale
:math:`\sigma` is a parameter (``noise="learned"``), a latent site with a half-normal prior
(``noise="inferred"``) or a fixed number.  ``latent_dim=0`` gives the ordinary homoscedastic
BNN (:class:`BNN`).

**Predictive uncertainty** (:meth:`BNNLV.predict`) splits by the law of total variance into

.. math::

    \operatorname{Var}(y \mid x) =
    \underbrace{\operatorname{Var}_W\big(\mathbb E[y \mid x, W]\big)}_{\text{epistemic}}
    + \underbrace{\mathbb E_W\big[\operatorname{Var}(y \mid x, W)\big]}_{\text{aleatoric: } z \text{ and } \varepsilon},

estimated by Monte Carlo over posterior draws of :math:`W` and prior draws of :math:`z`.

**Non-identifiability and its mitigation** (Yacoby, Pan & Doshi-Velez 2022): explanatory
power can move between :math:`W` and :math:`z`, e.g. a network that reads the signal off
:math:`z` (which then encodes :math:`x`) fits the training data as well as the true one and
generalizes badly; the posterior mode is biased even with infinite data.  Their remedy
constrains inference so that the latent inputs cannot carry information about the inputs
(under the generative model :math:`z \\perp x`).  ``independence_penalty=lambda`` implements
that constraint as a factor :math:`-\\lambda N\\,\\mathrm{HSIC}(x_{1:B}, z_{1:B})` in the log joint,
with HSIC (Gretton et al. 2005, Gaussian kernels) as the dependence measure where the paper
estimates a mutual information: same target (independence of :math:`x` and the inferred
:math:`z`), a different estimator.  Because it is part of the model, every backend (SVI, IWAE,
chi^2-VIS, SG-HMC, SMC) runs the mitigated model.

**Guides** (:meth:`BNNLV.guide`): mean-field Gaussian over :math:`W` (and log-normal over
:math:`\sigma` when inferred); over :math:`z` either one Gaussian per data point
(``amortized=False``) or an encoder network of :math:`(x, y)` (``amortized=True``, which also
scales to minibatches of new data).

The model broadcasts over particle/chain plates (global weights carry extra batch dims on the
left), so IWAE, chi^2-VIS, SG-HMC and the SMC samplers run it in their vectorized plate mode.

References:

* Depeweg, Hernández-Lobato, Doshi-Velez, Udluft. *Decomposition of uncertainty in Bayesian
  deep learning for efficient and risk-sensitive learning*. ICML 2018.
* Yacoby, Pan, Doshi-Velez. *Mitigating the effects of non-identifiability on inference for
  Bayesian neural networks with latent variables*. JMLR 2022.
* Gretton, Bousquet, Smola, Schölkopf. *Measuring statistical dependence with Hilbert-Schmidt
  norms*. ALT 2005.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn
from torch.distributions import constraints

from . import register_model, warn_if_name_in_use
from ..numerics import tiny

__all__ = ["BNNLV", "BNN", "hsic"]


def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Biased HSIC estimate (Gretton et al. 2005) between paired samples ``a`` ``(..., n, d_a)``
    and ``b`` ``(..., n, d_b)``, Gaussian kernels with median-heuristic bandwidths:
    :math:`\mathrm{tr}(K H L H) / (n-1)^2`, zero in the limit iff ``a`` and ``b`` are independent.
    Batched over the leading dims."""
    n = a.shape[-2]

    def gram(v):
        d2 = (v.unsqueeze(-2) - v.unsqueeze(-3)).pow(2).sum(-1)
        med = d2.detach().flatten(-2).median(-1).values.clamp_min(tiny(d2.dtype))
        return torch.exp(-d2 / med[..., None, None])

    K, L = gram(a), gram(b)
    Kc = K - K.mean(-1, keepdim=True) - K.mean(-2, keepdim=True) + K.mean((-1, -2), keepdim=True)
    return (Kc * L).sum((-1, -2)) / (n - 1) ** 2


def _drop_plate_dim(value: torch.Tensor, event_dims: int) -> torch.Tensor:
    """A global site drawn inside a particle/chain plate has shape ``(..., K, 1, *event)``: the
    ``1`` is the data plate's dim. Drop it so that the weights' batch dims are ``(..., K)``."""
    if value.dim() >= event_dims + 2 and value.shape[-(event_dims + 1)] == 1:
        return value.squeeze(-(event_dims + 1))
    return value


class BNNLV(PyroModule):
    """BNN with latent inputs (module docstring).

    :param int in_dim: input dimension D.
    :param int out_dim: output dimension.
    :param hidden: hidden layer sizes (default ``(50, 50)``).
    :param int latent_dim: L, the latent input dimension (0: homoscedastic BNN).
    :param float prior_scale: :math:`s_w`, prior sd of every weight and bias.
    :param float latent_scale: :math:`\\gamma`, prior sd of the latent inputs.
    :param noise: ``"learned"`` (a parameter), ``"inferred"`` (HalfNormal(``noise_prior``) prior)
        or a positive number (fixed).
    :param float noise_prior: scale of the half-normal prior when ``noise="inferred"``.
    :param float noise_init: initial noise scale (learned) or initial guide median (inferred).
        Small by default (0.1, for standardized targets): started large, the fit settles on a
        homoscedastic explanation and leaves z unused (measured on Depeweg's toy: held-out
        log-likelihood -2.24 per point with the noise started at 0.5, as poor as the BNN).
    :param bool amortized: guide over z by an encoder of (x, y) instead of per-point parameters.
    :param float independence_penalty: :math:`\\lambda \\ge 0`, the non-identifiability
        mitigation (see the module docstring): adds :math:`-\\lambda N\\,\\mathrm{HSIC}(x, z)` to
        the log joint. 0 (default) is the plain model.
    :param str stochastic_layers: ``"all"`` (default, a full BNN) or ``"last"``: a partial BNN
        (Zhao, Mair, Schön & Sjölund 2024) whose hidden layers are parameters (point estimates,
        learned by the backend's optimizer) and only the output layer has a prior.  This is
        the setting of open-horizon SMC (``backend="smc_online"``), whose particles live in the
        last layer's weight space.
    :param int z_samples: ``0`` (default): each :math:`z_n` is a latent sample site.  ``M > 0``:
        :math:`z_n` is integrated out by Monte Carlo inside the likelihood,
        :math:`\\hat p(y_n \\mid x_n, W) = \\frac1M \\sum_m \\mathcal N(y_n \\mid f_W([x_n, z_{nm}]),
        \\sigma^2)`, an unbiased estimate (a ``pyro.factor``, fresh draws per call).  SMC weights
        built from it are pseudo-marginal (still valid), which lets samplers that refuse latents
        inside a subsampled plate (open-horizon SMC, SG-HMC with minibatches) run BNN+LV.
        The likelihood is then random: checks that compare two evaluations of the model see it
        as not broadcasting (SVI's ``vectorize_particles=True`` check refuses it: use
        ``vectorize_particles=False``; the other backends fall back to ``vmap`` evaluation).
    :param str name: prefix of site and parameter names.
    """

    def __init__(self, in_dim: int, out_dim: int = 1, hidden: Sequence[int] = (50, 50), latent_dim: int = 1,
                 prior_scale: float = 1.0, latent_scale: float = 1.0, noise="learned", noise_prior: float = 1.0,
                 amortized: bool = False, encoder_hidden: Sequence[int] = (32,), independence_penalty: float = 0.0,
                 noise_init: float = 0.1, stochastic_layers: str = "all", z_samples: int = 0, name: str = "bnnlv"):
        super().__init__(name)
        warn_if_name_in_use(self, name)
        if stochastic_layers not in ("all", "last"):
            raise ValueError(f"stochastic_layers must be 'all' or 'last', got {stochastic_layers!r}")
        if isinstance(z_samples, bool) or not isinstance(z_samples, int) or z_samples < 0:
            raise ValueError(f"z_samples must be a non-negative int, got {z_samples!r}")
        if z_samples and (amortized or independence_penalty):
            raise ValueError("z_samples > 0 integrates z out inside the likelihood: there is no z site for an "
                             "amortized guide or the independence penalty; use z_samples=0 for those.")
        self.stochastic_layers, self.z_samples = stochastic_layers, int(z_samples)
        for label, value, low in (("in_dim", in_dim, 1), ("out_dim", out_dim, 1), ("latent_dim", latent_dim, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
        hidden = tuple(hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        for label, value in (("prior_scale", prior_scale), ("latent_scale", latent_scale),
                             ("noise_prior", noise_prior)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{label} must be a positive number, got {value!r}")
        if not (noise in ("learned", "inferred") or (isinstance(noise, (int, float)) and noise > 0)):
            raise ValueError(f"noise must be 'learned', 'inferred' or a positive number, got {noise!r}")
        if amortized and latent_dim == 0:
            raise ValueError("amortized=True needs latent_dim >= 1 (there is no z to encode).")
        self.in_dim, self.out_dim, self.hidden, self.latent_dim = in_dim, out_dim, hidden, latent_dim
        self.prior_scale, self.latent_scale = float(prior_scale), float(latent_scale)
        self.noise, self.noise_prior = noise, float(noise_prior)
        if not isinstance(noise_init, (int, float)) or not noise_init > 0:
            raise ValueError(f"noise_init must be a positive number, got {noise_init!r}")
        self.noise_init = float(noise_init)
        self.amortized, self.name = bool(amortized), name
        if not isinstance(independence_penalty, (int, float)) or independence_penalty < 0:
            raise ValueError(f"independence_penalty must be a non-negative number, got {independence_penalty!r}")
        if independence_penalty and not latent_dim:
            raise ValueError("independence_penalty needs latent_dim >= 1.")
        self.independence_penalty = float(independence_penalty)
        self.sizes = (in_dim + latent_dim,) + hidden + (out_dim,)
        if self.amortized:
            layers, sizes = [], (in_dim + out_dim,) + tuple(encoder_hidden) + (2 * latent_dim,)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
                layers.append(nn.Linear(a, b))
                if i < len(sizes) - 2:
                    layers.append(nn.Tanh())
            self.encoder = nn.Sequential(*layers)
        self._num_data = None

    # ------------------------------------------------------------------ parameters
    def _param(self, fullname: str, init, constraint=constraints.real) -> torch.Tensor:
        r"""The module parameter ``fullname`` (``"{name}.w0.loc"``, ``"{name}.sigma"``, ...).

        Parameters are ``PyroParam`` attributes of this module and of child ``PyroModule``\ s
        named after the dotted path, so that they are in ``parameters()`` and ``state_dict()``
        and move with ``.to()``; their Pyro names are the dotted paths.  Each is created on first
        use, from ``init()``, in the dtype and on the device of the data it first meets.
        """
        path = fullname.split(".")[1:]  # drop the module's own name
        holder = self
        for part in path[:-1]:
            if part not in holder._modules:
                setattr(holder, part, PyroModule())
            holder = getattr(holder, part)
        attr = path[-1]
        if attr not in holder._pyro_params:
            setattr(holder, attr, PyroParam(init(), constraint=constraint))
        return getattr(holder, attr)

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.double()``, ``.cuda()``: the module's tensors, and the param store's values
        of its parameters (which Pyro reads in preference to the module's), move together."""
        store = pyro.get_param_store()
        prefix = f"{self._pyro_name}." if self._pyro_name else ""
        mine = [prefix + n for n, _ in self.named_pyro_params()]
        current = {n: store[n].detach() for n in mine if n in store}
        out = super()._apply(fn, *args, **kwargs)
        for n, value in current.items():
            store[n] = fn(value)
        return out

    # ------------------------------------------------------------------ helpers
    def _all_weight_sites(self):
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            yield f"w{i}", (a, b)
            yield f"b{i}", (b,)

    def _weight_sites(self):
        """The weights with a prior (sample sites): all, or the output layer's for a partial BNN."""
        last = len(self.sizes) - 2
        for site, shape in self._all_weight_sites():
            if self.stochastic_layers == "all" or site in (f"w{last}", f"b{last}"):
                yield site, shape

    def _point_weights(self, like):
        """The hidden layers' weights of a partial BNN (parameters; empty for a full BNN)."""
        if self.stochastic_layers == "all":
            return {}
        stochastic = {s for s, _ in self._weight_sites()}
        out = {}
        g = torch.Generator(device="cpu").manual_seed(1)
        for site, shape in self._all_weight_sites():
            if site in stochastic:
                continue
            fan_in = shape[0] if len(shape) == 2 else 1
            out[site] = self._param(f"{self.name}.{site}.value", lambda: (torch.randn(shape, generator=g, dtype=like.dtype)
                                                              / math.sqrt(fan_in)).to(like.device))
        return out

    def _check(self, x, y):
        """Check the data and return ``y`` as ``(N, out_dim)``: with one output, ``y`` of shape
        ``(N,)`` (what the loaders return, e.g. ``load_mcycle().y``) is accepted as a column."""
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[-1] != self.in_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (N, {self.in_dim}), got {shape}.")
        if y is not None:
            if torch.is_tensor(y) and self.out_dim == 1 and y.shape == (x.shape[0],):
                y = y.unsqueeze(-1)
            if not torch.is_tensor(y) or y.shape != (x.shape[0], self.out_dim):
                shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
                raise ValueError(f"y must be a tensor of shape ({x.shape[0]}, {self.out_dim}) (use "
                                 f"y.reshape(-1, {self.out_dim})), got {shape}.")
        return y

    def _weights_batch_shape(self, weights) -> torch.Size:
        """The particle/chain batch dims of the weights (the longest; point weights have none)."""
        batch = torch.Size()
        for site, shape in self._all_weight_sites():
            v = _drop_plate_dim(weights[site], len(shape))
            if v.dim() - len(shape) > len(batch):
                batch = v.shape[: v.dim() - len(shape)]
        return batch

    def forward_net(self, x: torch.Tensor, weights: Dict[str, torch.Tensor], z: Optional[torch.Tensor] = None):
        """:math:`f_W([x, z])` for weights with any batch dims on the left: ``(..., N, out_dim)``."""
        batch = self._weights_batch_shape(weights)
        h = x.expand(batch + x.shape) if batch else x
        if self.latent_dim:
            h = torch.cat([h.expand(z.shape[:-1] + (x.shape[-1],)), z], -1) if z is not None else h
        for i in range(len(self.sizes) - 1):
            w = _drop_plate_dim(weights[f"w{i}"], 2)
            b = _drop_plate_dim(weights[f"b{i}"], 1)
            h = h @ w + b.unsqueeze(-2)
            if i < len(self.sizes) - 2:
                h = torch.tanh(h)
        return h

    # ------------------------------------------------------------------ model and guide
    @pyro_method
    def model(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, subsample_size: Optional[int] = None):
        y = self._check(x, y)
        zero = x.new_zeros(())
        weights = self._point_weights(x)
        for site, shape in self._weight_sites():
            weights[site] = pyro.sample(site, dist.Normal(zero, self.prior_scale).expand(shape).to_event(len(shape)))
        if self.noise == "inferred":
            sigma = _drop_plate_dim(pyro.sample("sigma", dist.HalfNormal(zero + self.noise_prior)), 0)
        elif self.noise == "learned":
            sigma = self._param(f"{self.name}.sigma", lambda: x.new_tensor(self.noise_init),
                                constraints.positive)
        else:
            sigma = zero + float(self.noise)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1,
                        device=x.device) as ind:
            z = None
            x_b = x.index_select(0, ind)
            if self.latent_dim and self.z_samples:
                return self._marginal_likelihood(x_b, None if y is None else y.index_select(0, ind),
                                                 weights, sigma)
            if self.latent_dim:
                z = pyro.sample("z", dist.Normal(zero, self.latent_scale)
                                .expand([self.latent_dim]).to_event(1))
            mean = self.forward_net(x_b, weights, z)
            pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1).unsqueeze(-1)).to_event(1),
                        obs=None if y is None else y.index_select(0, ind))
        if self.independence_penalty and z is not None and y is not None and x_b.shape[0] > 2:
            # the prior makes z independent of x; penalize dependence in the posterior (mitigation)
            dep = hsic(x_b.expand(z.shape[:-1] + (x_b.shape[-1],)), z)
            if dep.dim() > 0:  # batch dims of particles/chains sit left of the data plate's dim
                dep = dep.unsqueeze(-1)
            pyro.factor("independence", -self.independence_penalty * x.shape[0] * dep)
        return mean

    def _marginal_likelihood(self, x_b, y_b, weights, sigma):
        """Monte Carlo estimate of p(y_n | x_n, W) with ``z_samples`` draws of z per point, as a
        factor in the data plate (called inside it)."""
        if y_b is None:
            raise ValueError("z_samples > 0 scores observed y; pass y (or use z_samples=0 to simulate).")
        M = self.z_samples
        batch = self._weights_batch_shape(weights)
        z = self.latent_scale * torch.randn((M,) + batch + (x_b.shape[0], self.latent_dim),
                                            dtype=x_b.dtype, device=x_b.device)
        mean = self.forward_net(x_b, weights, z)  # (M, *batch, B, out): M broadcasts on the left
        lp = dist.Normal(mean, sigma.unsqueeze(-1).unsqueeze(-1)).log_prob(y_b).sum(-1)
        ll = torch.logsumexp(lp, 0) - math.log(M)
        pyro.factor("y_marginal", ll)
        return mean.mean(0)

    @pyro_method
    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, subsample_size: Optional[int] = None):
        y = self._check(x, y)
        g = torch.Generator(device="cpu").manual_seed(0)
        for site, shape in self._weight_sites():
            fan_in = shape[0] if len(shape) == 2 else 1
            # small random means break the symmetry between hidden units
            loc = self._param(f"{self.name}.{site}.loc", lambda: (torch.randn(shape, generator=g, dtype=x.dtype)
                                                      / math.sqrt(fan_in)).to(x.device))
            scale = self._param(f"{self.name}.{site}.scale", lambda: x.new_full(shape, 1e-2), constraints.positive)
            pyro.sample(site, dist.Normal(loc, scale).to_event(len(shape)))
        if self.noise == "inferred":
            loc = self._param(f"{self.name}.sigma.loc", lambda: x.new_tensor(math.log(self.noise_init)))
            scale = self._param(f"{self.name}.sigma.scale", lambda: x.new_tensor(0.1), constraints.positive)
            pyro.sample("sigma", dist.LogNormal(loc, scale))
        if not self.latent_dim or self.z_samples:
            return
        if self.amortized:
            if y is None:
                raise ValueError("The amortized guide encodes (x, y): pass y.")
            ref = next(self.encoder.parameters())
            if ref.dtype != x.dtype or ref.device != x.device:  # the encoder follows the data
                self.encoder.to(dtype=x.dtype, device=x.device)
            pyro.module(f"{self.name}.encoder", self.encoder)
        else:
            n = x.shape[0]
            z_loc = self._param(f"{self.name}.z.loc", lambda: x.new_zeros(n, self.latent_dim))
            z_scale = self._param(f"{self.name}.z.scale", lambda: x.new_full((n, self.latent_dim), self.latent_scale),
                                  constraints.positive)
            if z_loc.shape[0] != n:
                raise ValueError(f"The per-point guide over z was built for {z_loc.shape[0]} data points, "
                                 f"got {n}; use amortized=True to infer z for new data.")
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size, dim=-1,
                        device=x.device) as ind:
            if self.amortized:
                h = self.encoder(torch.cat([x.index_select(0, ind), y.index_select(0, ind)], -1))
                loc = h[..., : self.latent_dim]
                scale = nn.functional.softplus(h[..., self.latent_dim:]) + 1e-3
            else:
                loc, scale = z_loc.index_select(0, ind), z_scale.index_select(0, ind)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------ prediction
    def _guide_weight_draws(self, num_samples, like):
        out = {}
        store = pyro.get_param_store()
        for site, shape in self._weight_sites():
            if f"{self.name}.{site}.loc" not in store:
                raise RuntimeError(f"No fitted guide parameters for {site!r}: fit the guide first or pass "
                                   "posterior samples (e.g. from SG-HMC) to predict().")
            loc, scale = pyro.param(f"{self.name}.{site}.loc").detach(), pyro.param(f"{self.name}.{site}.scale").detach()
            out[site] = loc + scale * torch.randn((num_samples,) + tuple(shape), dtype=loc.dtype, device=loc.device)
        if self.noise == "inferred":
            loc = pyro.param(f"{self.name}.sigma.loc").detach()
            scale = pyro.param(f"{self.name}.sigma.scale").detach()
            out["sigma"] = (loc + scale * torch.randn(num_samples, dtype=loc.dtype, device=loc.device)).exp()
        return out

    def _function_draws(self, x, num_samples, num_latent, samples, budget=2 ** 24):
        """Yield ``(f, sigma)`` chunks: ``f`` ``(s, M, N, out_dim)`` network outputs for ``s`` weight
        draws and ``M`` latent draws each, ``sigma`` ``(s,)``; chunked so that no intermediate
        holds much more than ``budget`` numbers (posterior samples from MCMC can be thousands)."""
        if samples is None:
            samples = self._guide_weight_draws(num_samples, x)
        weights = {site: samples[site] for site, _ in self._weight_sites()}
        point = {k: v.detach() for k, v in self._point_weights(x).items()}  # no draw dim: not chunked
        S = next(iter(weights.values())).shape[0]
        sigma = self._sigma(samples, S, x)
        M = num_latent if self.latent_dim else 1
        N = x.shape[0]
        chunk = max(1, budget // (M * N * max(self.sizes)))
        for start in range(0, S, chunk):
            w = {k: v[start:start + chunk] for k, v in weights.items()}
            s = next(iter(w.values())).shape[0]  # draws in this chunk (before the point weights join)
            w.update(point)
            if self.latent_dim:  # M latent draws per weight draw, stacked along the data axis
                z = self.latent_scale * torch.randn((s, M * N, self.latent_dim), dtype=x.dtype, device=x.device)
                f = self.forward_net(x.repeat(M, 1), w, z).reshape(s, M, N, self.out_dim)
            else:
                f = self.forward_net(x, w).unsqueeze(1)
            yield f, sigma[start:start + chunk]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_samples: int = 200, num_latent: int = 50,
                samples: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Predictive distribution at inputs ``x`` and its epistemic/aleatoric split.

        :param samples: posterior draws ``{site: (S, *shape)}`` of the weights (and sigma when
            inferred), e.g. ``fit.posterior_samples()`` of any backend; by default ``num_samples``
            draws from the fitted mean-field guide.
        :param num_latent: prior draws of z per weight draw (for the moments).
        :returns: dict with ``mean``, ``epistemic_var``, ``aleatoric_var``, ``total_var`` (each
            ``(N, out_dim)``) and ``samples`` (``(S, N, out_dim)``: one draw of y per weight draw,
            with a fresh z and noise).
        """
        self._check(x, None)
        means, cond_vars, ys = [], [], []
        for f, sigma in self._function_draws(x, num_samples, num_latent, samples):
            means.append(f.mean(1))                                                  # E[y | x, W]
            cond_vars.append(f.var(1, unbiased=False) + sigma.reshape(-1, 1, 1) ** 2)  # Var(y | x, W)
            ys.append(f[:, 0] + sigma.reshape(-1, 1, 1) * torch.randn_like(f[:, 0]))
        cond_mean, cond_var = torch.cat(means), torch.cat(cond_vars)
        epistemic = cond_mean.var(0, unbiased=False)
        return {
            "mean": cond_mean.mean(0),
            "epistemic_var": epistemic,
            "aleatoric_var": cond_var.mean(0),
            "total_var": epistemic + cond_var.mean(0),
            "samples": torch.cat(ys),
        }

    def _sigma(self, samples, S, like):
        if self.noise == "inferred":
            return samples["sigma"].reshape(S)
        if self.noise == "learned":
            return pyro.param(f"{self.name}.sigma").detach().expand(S)
        return like.new_full((S,), float(self.noise))

    @torch.no_grad()
    def log_predictive(self, x: torch.Tensor, y: torch.Tensor, num_samples: int = 200, num_latent: int = 50,
                       samples: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Held-out log predictive density per point,
        :math:`\\log \\frac{1}{SM}\\sum_{s,m} \\mathcal N(y \\mid f_{W_s}([x, z_m]), \\sigma_s^2)`."""
        y = self._check(x, y)
        total, count = None, 0
        for f, sigma in self._function_draws(x, num_samples, num_latent, samples):
            lp = dist.Normal(f, sigma.reshape(-1, 1, 1, 1)).log_prob(y).sum(-1)  # (s, M, N)
            lp = torch.logsumexp(lp.reshape(-1, lp.shape[-1]), 0)
            total = lp if total is None else torch.logaddexp(total, lp)
            count += f.shape[0] * f.shape[1]
        return total - math.log(count)

    def plot_predictive(self, x: torch.Tensor, pred: Optional[dict] = None, x_train=None, y_train=None,
                        ax=None, level: float = 0.9, xlabel: str = "x", ylabel: str = "y", **predict_kwargs):
        """Predictive mean, the ``level`` interval of y, and the epistemic band (1-d inputs);
        ``xlabel``/``ylabel`` label the axes (e.g. ``"time (standardized)"``)."""
        import matplotlib.pyplot as plt
        import numpy as np

        if self.in_dim != 1 or self.out_dim != 1:
            raise ValueError("plot_predictive draws 1-d inputs and outputs; use predict() otherwise.")
        if pred is None:
            pred = self.predict(x, **predict_kwargs)
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        xs = x[:, 0].cpu().numpy()
        order = np.argsort(xs)
        ys = pred["samples"][..., 0].cpu().numpy()
        lo, hi = np.quantile(ys, [(1 - level) / 2, (1 + level) / 2], axis=0)
        mean = pred["mean"][:, 0].cpu().numpy()
        epi = pred["epistemic_var"][:, 0].sqrt().cpu().numpy()
        ax.fill_between(xs[order], lo[order], hi[order], alpha=0.25, label=f"{int(level * 100)}% predictive")
        ax.fill_between(xs[order], (mean - 2 * epi)[order], (mean + 2 * epi)[order], alpha=0.4,
                        label="epistemic ±2 sd")
        ax.plot(xs[order], mean[order], lw=1.5, label="mean")
        if x_train is not None and y_train is not None:
            ax.scatter(x_train[:, 0].cpu().numpy(), y_train.reshape(-1).cpu().numpy(), s=8, c="k", alpha=0.6,
                       label="data")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        return ax

    # ------------------------------------------------------------------ data
    @staticmethod
    def simulate(num_data: int = 500, kind: str = "heteroscedastic", seed: int = 0, dtype=torch.float64):
        """Depeweg et al.'s toy problems, ``(x, y)`` of shapes ``(N, 1)``.

        * ``"heteroscedastic"``: :math:`x \\sim U(-4, 4)`,
          :math:`y = 7 \\sin x + 3 |\\cos(x/2)|\\,\\varepsilon`;
        * ``"bimodal"``: :math:`x \\sim U(-2, 2)`, with probability 1/2 each
          :math:`y = 10 \\sin x + \\varepsilon` or :math:`y = 10 \\cos x + \\varepsilon`;

        :math:`\\varepsilon \\sim \\mathcal N(0, 1)`.
        """
        if kind not in ("heteroscedastic", "bimodal"):
            raise ValueError(f"kind must be 'heteroscedastic' or 'bimodal', got {kind!r}")
        g = torch.Generator().manual_seed(seed)
        if kind == "heteroscedastic":
            x = 8 * torch.rand(num_data, 1, generator=g, dtype=dtype) - 4
            eps = torch.randn(num_data, 1, generator=g, dtype=dtype)
            return x, 7 * torch.sin(x) + 3 * torch.abs(torch.cos(x / 2)) * eps
        x = 4 * torch.rand(num_data, 1, generator=g, dtype=dtype) - 2
        eps = torch.randn(num_data, 1, generator=g, dtype=dtype)
        branch = torch.rand(num_data, 1, generator=g, dtype=dtype) < 0.5
        return x, torch.where(branch, 10 * torch.sin(x), 10 * torch.cos(x)) + eps


class BNN(BNNLV):
    """The homoscedastic BNN baseline: :class:`BNNLV` with ``latent_dim=0``."""

    def __init__(self, in_dim: int, out_dim: int = 1, hidden: Sequence[int] = (50, 50), name: str = "bnn", **kw):
        kw.pop("latent_dim", None)
        super().__init__(in_dim, out_dim, hidden, latent_dim=0, name=name, **kw)


@register_model("bnn_lv")
def _matrix_case():
    x, y = BNNLV.simulate(num_data=40, seed=0)
    return BNNLV(1, 1, hidden=(8,), latent_dim=1, noise=1.0, name="matrix_bnnlv"), (x, y)


@register_model("bnn_lv_partial")
def _matrix_case_partial():
    x, y = BNNLV.simulate(num_data=40, seed=0)
    return BNNLV(1, 1, hidden=(8,), latent_dim=1, noise=1.0, stochastic_layers="last", name="matrix_pbnnlv"), (x, y)
