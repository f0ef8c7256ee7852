r"""Distributions that ppl_lvm adds to Pyro's.

:class:`StraightThroughBernoulli` is a Bernoulli guide distribution with a pathwise
(straight-through) gradient.  Its draws are exact Bernoulli draws and its ``log_prob`` is the
Bernoulli pmf, so a guide built from it is a *discrete* guide: it matches a discrete model site,
its ELBO values and importance weights are those of the discrete model (``Fit.log_evidence``,
IWAE's bound, chi^2-VIS's weights are unbiased for it), and only the *gradient* is a surrogate.

With logistic noise :math:`L = \log U - \log(1 - U)`, :math:`U \sim \mathrm{Uniform}(0, 1)`:

.. math::

    b = \mathbb 1[\ell + L > 0] \sim \mathrm{Bernoulli}(\sigma(\ell)), \qquad
    s = \sigma\big((\ell + L) / \tau\big), \qquad
    z = b + s - \mathrm{stop\_gradient}(s),

so :math:`z = b` forward and :math:`\partial z / \partial \ell = \partial s / \partial \ell =
s (1 - s) / \tau` backward: the binary-concrete relaxation's gradient (Maddison, Mnih & Teh 2017;
Jang, Gu & Poole 2017) passed straight through the hard threshold (Bengio, Léonard & Courville
2013).  The gradient is biased (it is the gradient of the relaxed objective, not of the discrete
one), with a variance far below the score-function estimator's.  Unlike Pyro's
``RelaxedBernoulliStraightThrough``, whose ``log_prob`` is the relaxed *density* at the soft
value (so its "ELBO" mixes a pmf in the model with a density in the guide and is not a bound on
anything), here the objective's value is exact.

**Where the surrogate gradient is used.**  The SVI backend (Pyro's ELBOs read
``has_rsample = True``) takes the straight-through pathwise gradient.  IWAE and chi^2-VIS do not:
inside an importance-weighted objective the straight-through path through the model *and* the
normalized weights estimates nothing useful.  Measured on a 6-point two-component Normal mixture
whose exact posterior lies in the mean-field family (1500 Adam steps, lr 0.05, temperature 0.5),
the largest error of the fitted marginals q(z_n = 1) was 0.74 (IWAE, pathwise), 0.38 (DReG),
0.22 (STL), against 0.084 with a plain Bernoulli guide (VIMCO); SVI with the straight-through
gradient: 0.145 (temperature 0.5), 0.067 (0.1), 0.177 (1.0), plain Bernoulli (score function)
0.079 (``python benchmarks/straight_through_bias.py``, 32 s).  So IWAE and chi^2-VIS draw a straight-through site as the plain ``Bernoulli`` it equals
in law (:func:`straight_through_as_bernoulli`, with a warning) and give it their score-function
gradients (VIMCO / score); ``tests/test_distributions.py`` checks both routes.
"""

from __future__ import annotations

import warnings

import torch
from pyro.distributions import Bernoulli, Independent
from pyro.poutine.messenger import Messenger
from .numerics import tiny
from .validation import check_positive

__all__ = ["StraightThroughBernoulli", "straight_through_as_bernoulli"]


class StraightThroughBernoulli(Bernoulli):
    r"""Bernoulli draws with the straight-through binary-concrete gradient (module docstring).

    :param temperature: :math:`\tau > 0` of the relaxation that supplies the gradient (smaller:
        closer to the threshold's zero gradient almost everywhere, noisier; default 0.5).
    :param probs: success probabilities (or give ``logits``).
    :param logits: log-odds (or give ``probs``).
    """

    has_rsample = True

    def __init__(self, temperature=0.5, probs=None, logits=None, validate_args=None):
        if torch.is_tensor(temperature):
            if not bool(torch.all(temperature > 0)):
                raise ValueError("temperature must be > 0 (the relaxation's temperature; e.g. 0.5).")
        else:
            temperature = check_positive(temperature, "temperature")
        super().__init__(probs=probs, logits=logits, validate_args=validate_args)
        like = self.logits
        self.temperature = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StraightThroughBernoulli, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.temperature = self.temperature
        return new

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        logits = self.logits.expand(shape)
        fl = tiny(logits.dtype)
        u = torch.rand(shape, dtype=logits.dtype, device=logits.device).clamp(fl, 1.0 - fl)
        noisy = logits + (torch.log(u) - torch.log1p(-u))
        hard = (noisy > 0).to(logits.dtype)
        soft = torch.sigmoid(noisy / self.temperature)
        return hard + (soft - soft.detach())

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)


def _as_bernoulli(fn):
    """The plain Bernoulli (same logits, same event dims) behind a straight-through ``fn``, or
    ``None`` when ``fn`` is not one."""
    if isinstance(fn, StraightThroughBernoulli):
        return Bernoulli(logits=fn.logits)
    if isinstance(fn, Independent):
        base = _as_bernoulli(fn.base_dist)
        if base is not None:
            return base.to_event(fn.reinterpreted_batch_ndims)
    return None


class _StraightThroughAsBernoulli(Messenger):
    def __init__(self, backend_name: str):
        super().__init__()
        self.backend_name = backend_name
        self.warned = False

    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        plain = _as_bernoulli(msg["fn"])
        if plain is None:
            return
        msg["fn"] = plain
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"Guide site {msg['name']!r} is a StraightThroughBernoulli; {self.backend_name} draws it as "
                "the plain Bernoulli it equals in law and uses score-function gradients there (the "
                "straight-through gradient inside an importance-weighted objective is wrong: see "
                "ppl_lvm.distributions). Use backend='svi' for the straight-through gradient.",
                UserWarning, stacklevel=2)


def straight_through_as_bernoulli(guide, backend_name: str = "this backend"):
    """``guide`` with every :class:`StraightThroughBernoulli` sample site (possibly
    ``.to_event(n)``) drawn as the plain ``Bernoulli`` with the same logits: the same law, no
    surrogate gradient.  Used by IWAE and chi^2-VIS (module docstring); warns once."""
    if guide is None or not callable(guide):  # not a Pyro program (e.g. a state-space guide object):
        return guide                          # the backend's own checks refuse it
    return _StraightThroughAsBernoulli(backend_name)(guide)
