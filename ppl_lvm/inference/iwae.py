r"""Importance-weighted variational inference (IWAE) with pathwise, STL and DReG gradients.

With :math:`K` particles :math:`z_k \sim q_\phi(z \mid x)` and weights
:math:`w_k = p_\theta(x, z_k) / q_\phi(z_k \mid x)` the importance-weighted bound is

.. math::

    \mathcal L_K = \mathbb E\Big[\log \frac1K \sum_{k=1}^K w_k\Big] \le \log p_\theta(x),

with :math:`\mathcal L_1` the ELBO and :math:`\mathcal L_K` increasing in :math:`K` (Burda et
al. 2016).

**Local and global latents.**  When every latent site lies in the data plate (one latent per
data point, as in a VAE) the weight factorizes, :math:`\log w_k = g + \sum_i \ell_{ik}`, and
each data point gets its own :math:`K` particles:

.. math:: \mathcal L_K = g + \frac{N}{B} \sum_{i \in \text{batch}} \log \frac1K \sum_k e^{\ell_{ik}},

with the minibatch factor :math:`N/B` outside the log-sum-exp, so minibatches give unbiased
estimates of the full-data bound.  When there are global latents (alone or together with
local ones) the particles cover the whole joint, :math:`\log \frac1K \sum_k w_k` with
:math:`\log w_k` summed over all sites: still a valid bound.  Subsampling the data plate is
then refused, since :math:`\log` of a minibatch-scaled weight has no unbiased estimate of that
bound.

**Gradients** for the reparameterized guide sites (``gradient=``):

* ``"pathwise"``: :math:`\nabla_\phi \mathcal L_K = \sum_k \tilde w_k \nabla_\phi \log w_k`,
  the plain reparameterization gradient;
* ``"stl"`` (Roeder, Wu, Duvenaud 2017): the guide's parameters are stopped inside
  :math:`\log q`; lower variance near the optimum, biased for :math:`K > 1`;
* ``"dreg"`` (Tucker, Lawson, Gu, Maddison 2019), the default:
  :math:`\nabla_\phi = \sum_k \tilde w_k^2 \, \frac{\partial \log w_k}{\partial z_k}
  \frac{\partial z_k}{\partial \phi}` with :math:`q`'s parameters stopped inside
  :math:`\log w_k`; unbiased, and its signal-to-noise ratio does not vanish as :math:`K` grows.

Model parameters always get the exact gradient :math:`\sum_k \tilde w_k \nabla_\theta \log
p_\theta(x, z_k)`.  Non-reparameterizable guide sites (discrete ones) get the score-function
gradient with the VIMCO leave-one-out baseline (Mnih & Rezende 2016): particle :math:`k`'s
learning signal is :math:`\hat{\mathcal L} - \hat{\mathcal L}_{-k}`, where
:math:`\hat{\mathcal L}_{-k}` replaces :math:`\log w_k` by the mean of the other log-weights.

References:

* Burda, Grosse, Salakhutdinov. *Importance Weighted Autoencoders*. ICLR 2016.
* Roeder, Wu, Duvenaud. *Sticking the Landing*. NeurIPS 2017.
* Tucker, Lawson, Gu, Maddison. *Doubly Reparameterized Gradient Estimators for Monte Carlo
  Objectives*. ICLR 2019.
* Mnih, Rezende. *Variational Inference for Monte Carlo Objectives*. ICML 2016.
* Rainforth et al. *Tighter Variational Bounds are Not Necessarily Better*. ICML 2018.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..traces import LogWeights, detach_distribution, log_mean_exp, trace_program
from ..distributions import straight_through_as_bernoulli
from ..validation import check_choice, check_positive_int
from .guided import GuidedBackend
from .registry import register_backend
from .requirements import Requirements

__all__ = ["IWAE", "iwae_bound", "vimco_signals"]

GRADIENTS = ("auto", "dreg", "pathwise", "stl")


def iwae_bound(lw: LogWeights) -> torch.Tensor:
    """The importance-weighted bound of one set of particles (a scalar tensor)."""
    return lw.is_log_likelihood()


def vimco_signals(x: torch.Tensor) -> torch.Tensor:
    r"""VIMCO learning signals :math:`\hat L - \hat L_{-k}` for log-weights ``x`` of shape ``(K, ...)``.

    :math:`\hat L_{-k}` is :math:`\log \frac1K \sum_j e^{x_j}` with :math:`x_k` replaced by the
    arithmetic mean of the other :math:`x_j` (a geometric mean of the weights).
    """
    k = x.shape[0]
    if k < 2:
        raise ValueError("VIMCO needs at least 2 particles.")
    total = log_mean_exp(x, 0)
    others_mean = (x.sum(0, keepdim=True) - x) / (k - 1)  # (K, ...)
    # X[k, j] = x_j for j != k and the leave-one-out mean for j == k
    eye = torch.eye(k, dtype=torch.bool, device=x.device).reshape((k, k) + (1,) * (x.dim() - 1))
    full = torch.where(eye, others_mean.unsqueeze(1), x.unsqueeze(0))
    loo = torch.logsumexp(full, dim=1) - math.log(k)
    return total.unsqueeze(0) - loo


@register_backend("iwae")
class IWAE(GuidedBackend):
    """Importance-weighted variational inference (see the module docstring for the math).

    :param model: a Pyro model.
    :param guide: a Pyro guide; it must broadcast over a particle plate on the left.
    :param optim: a ``pyro.optim`` optimizer (default ``Adam({"lr": 1e-2})``).
    :param int num_particles: K, particles per data point (local latents) or per joint draw.
    :param str gradient: ``"dreg"``, ``"pathwise"`` or ``"stl"`` for the reparameterized guide
        sites; ``"auto"`` (default) takes ``"dreg"`` when every guide site is
        reparameterizable and ``"pathwise"`` (plus VIMCO for the rest) otherwise.
    :param max_plate_nesting: plate dims of model/guide (inferred when ``None``).
    :param data_plate: the plate over data points (found automatically).

    Example::

        >>> fit = IWAE(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), num_particles=50).run(
        ...     x_train, num_steps=5000)
        >>> fit.log_evidence(5000, x_test)

    Parameters that appear in both model and guide are treated as model parameters (they get
    the pathwise gradient of the bound).
    """

    #: results are importance-resampled guide draws (the importance-weighted posterior this
    #: backend targets); ``draws="proposal"`` in posterior_samples/to_inferencedata gives q's own
    default_draws = "resampled"
    valid_for = ("any model/guide whose guide broadcasts over particles; per-datapoint bound for "
                 "local latents; DReG/STL for reparameterized guides, VIMCO for discrete guide sites")

    def __init__(self, model, guide, optim=None, num_particles: int = 8, gradient: str = "auto", *,
                 max_plate_nesting: Optional[int] = None, data_plate: Optional[str] = None,
                 validate: bool = True):
        super().__init__(model, guide, optim, max_plate_nesting=max_plate_nesting,
                         data_plate=data_plate, validate=validate)
        # straight-through sites: plain Bernoulli draws, score-function gradients (ppl_lvm.distributions)
        self.guide = straight_through_as_bernoulli(self.guide, "IWAE")
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.gradient = check_choice(gradient, "gradient", GRADIENTS)
        self._resolved_gradient: Optional[str] = None
        self._score_sites: tuple = ()

    # ------------------------------------------------------------------ checks
    requires = Requirements(global_latents_with_subsampling=False)

    def _after_setup(self, structure, *args, **kwargs):
        self._score_sites = self._non_reparameterized_sites(structure)
        gradient = self.gradient
        if gradient == "auto":
            gradient = "pathwise" if self._score_sites else "dreg"
        if self._score_sites:
            if gradient in ("dreg", "stl"):
                raise ValueError(
                    f"gradient={gradient!r} needs a reparameterizable guide, but guide site(s) "
                    f"{list(self._score_sites)} are not (discrete or without rsample). Use "
                    "gradient='pathwise' (they then get VIMCO score-function gradients) or 'auto'."
                )
            if self.num_particles < 2:
                raise ValueError(
                    f"Guide site(s) {list(self._score_sites)} need score-function gradients with the "
                    "VIMCO baseline, which needs num_particles >= 2."
                )
        if gradient in ("dreg", "stl"):
            guide_trace = trace_program(self.guide, args, kwargs, role="guide")
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and not site["is_observed"] and name in self.guide_structure.sites:
                    detach_distribution(site["fn"], name)  # raises a clear error if impossible
        self._resolved_gradient = gradient
        self.evaluator.resolve_mode(args, kwargs)


    # ------------------------------------------------------------------ objective
    def _surrogates(self, num_particles, args, kwargs):
        """(bound, guide surrogate, model params, guide params) for one set of particles."""
        ev = self.evaluator
        pp = self._particle_pass(num_particles, args, kwargs)
        lw = pp.log_weights
        bound = iwae_bound(lw)
        gradient = self._resolved_gradient
        if gradient == "pathwise":
            surrogate = bound
        else:
            lw_stop = ev.log_weights(num_particles, args, kwargs, guide_trace=pp.guide_trace,
                                     model_lp=pp.model_lp, detach_guide_params=True)
            if gradient == "stl":
                surrogate = iwae_bound(lw_stop)
            else:  # dreg: squared normalized weights, held fixed
                x = lw_stop.particle_weights
                surrogate = lw_stop.reduce(torch.softmax(x.detach(), dim=0).pow(2) * x)
        if self._score_sites:
            lq = ev.guide_log_probs(pp.guide_trace, num_particles, self._score_sites)
            signals = vimco_signals(lw.particle_weights.detach())
            lq_per_weight = lq.local if lw.factorizes else lq.joint
            surrogate = surrogate + lw.reduce(signals * lq_per_weight)
        return bound, surrogate, pp.model_params, pp.guide_params

    def _loss_and_grads(self, args, kwargs):
        bound, surrogate, model_params, guide_params = self._surrogates(self.num_particles, args, kwargs)
        self._apply_gradients(bound, surrogate, model_params, guide_params)
        return -float(bound.detach()), model_params + guide_params


    def loss(self, *args, num_particles: Optional[int] = None, **kwargs) -> float:
        """Estimate :math:`-\\mathcal L_K` (without a step); ``num_particles`` overrides K."""
        return -float(self._fresh_log_weights(args, kwargs, num_particles).is_log_likelihood())

