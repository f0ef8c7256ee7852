r"""What a fit returns: :class:`Fit` (the fitted backend plus the data, with posterior draws,
log-evidence, predictive draws and ArviZ conversion), :class:`EvidenceEstimate`, and the chain
layout of i.i.d. draws for ArviZ (:func:`iid_chains`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Optional, Sequence

import numpy as np
import torch
import pyro
from pyro import poutine

from ..validation import check_positive_int

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["Fit", "EvidenceEstimate", "iid_chains"]

class EvidenceEstimate(NamedTuple):
    r"""An estimate of :math:`\log p(x)` with its Monte Carlo standard error.

    ``khat`` is the PSIS :math:`\hat k` of the importance weights (``nan`` where it does not
    apply; the largest over data points where the weights factorize per data point): above
    0.7 the estimate is unreliable whatever ``stderr`` says.
    """

    log_evidence: float
    stderr: float
    khat: float
    num_particles: int
    #: per data point, where the weights factorize: log p-hat(x_i) (numpy) ...
    pointwise: Optional[np.ndarray] = None
    #: ... and each data point's PSIS k-hat
    pointwise_khat: Optional[np.ndarray] = None
    #: why ``khat`` is nan, where it is
    note: Optional[str] = None

    def __float__(self):
        return float(self.log_evidence)

    def __repr__(self):
        note = f", note={self.note!r}" if self.note else ""
        return (f"EvidenceEstimate(log_evidence={self.log_evidence:.4f} ± {self.stderr:.4f}, "
                f"khat={self.khat:.2f}, num_particles={self.num_particles}{note})")


class Fit:
    r"""The result of :meth:`Backend.run`: the backend in its fitted state plus the data.

    A ``Fit`` is a view, not a copy: like :class:`pyro.infer.SVI`, the parameters live in
    Pyro's global param store (and in the ``PyroModule``\ s), so further ``run`` calls,
    ``pyro.clear_param_store()`` or another fit that reuses the same parameter names change
    what it reports.  Save it (:meth:`save`) to keep a state.

    :ivar backend: the backend.
    :ivar args: the data the fit was run on (methods accept replacements).
    """

    def __init__(self, backend: Backend, args, kwargs):
        self.backend = backend
        self.args = tuple(args)
        self.kwargs = dict(kwargs)

    @property
    def losses(self) -> np.ndarray:
        """The objective at every step the backend has taken (live, like the parameters)."""
        return np.asarray(self.backend.losses, dtype=float)

    @property
    def num_steps(self) -> int:
        return self.backend.num_steps

    def _data(self, args, kwargs):
        """Positional data replace the fit's positional data when given; keywords are merged."""
        return self.backend._coerce((tuple(args) if args else self.args), {**self.kwargs, **kwargs})

    def _prepared(self, num_samples, args, kwargs):
        """``(num_samples, data args, data kwargs)`` with the backend set up for these data."""
        num_samples = self._num_samples(num_samples)
        a, k = self._data(args, kwargs)
        self.backend.setup(*a, **k)
        return num_samples, a, k

    def _num_samples(self, num_samples):
        if num_samples is None:
            return self.backend._default_num_samples()
        return check_positive_int(num_samples, "num_samples")

    def _draws_option(self, draws):
        if draws is None:
            return {}
        choices = self.backend.draws_choices
        if not choices:
            raise TypeError(f"draws= applies to the guide-based backends (svi, iwae, chi2_vis), not to "
                            f"{type(self.backend).__name__}.")
        if draws not in choices:
            raise ValueError(f"draws must be one of {choices}, got {draws!r}.")
        return {"draws": draws}

    def posterior_samples(self, num_samples: Optional[int] = None, *args,
                          sites: Optional[Sequence[str]] = None, draws: Optional[str] = None,
                          **kwargs) -> Dict[str, torch.Tensor]:
        """Draws from the fitted posterior (approximation): ``{site: (num_samples, *shape)}``.

        ``num_samples`` defaults to 1000 draws from a guide, or to every kept draw of a sampler
        (chains concatenated). Extra positional/keyword arguments replace the data the fit was
        run on.  ``draws`` (guide-based backends): ``"resampled"`` (importance-resampled guide
        draws, the default of IWAE and chi^2-VIS) or ``"proposal"`` (raw guide draws, SVI's
        default); see :class:`GuidedBackend`.
        """
        num_samples, a, k = self._prepared(num_samples, args, kwargs)
        with torch.no_grad():
            samples = self.backend._posterior_samples(num_samples, a, k, **self._draws_option(draws))
        if sites is not None:
            unknown = set(sites) - set(samples)
            if unknown:
                raise ValueError(f"Unknown site(s) {sorted(unknown)}; latent sites are {sorted(samples)}.")
            samples = {s: samples[s] for s in sites}
        return samples

    def log_evidence(self, num_particles: Optional[int] = None, *args, **kwargs) -> EvidenceEstimate:
        r"""Estimate :math:`\log p(x)` where the backend can (with standard error and k-hat).

        ``num_particles``: importance samples of the guide-based backends (default 1000); for the
        tempered SMC sampler the estimate of the run you have (``num_particles`` must then be
        left out or equal its particles).  The SMC backends take ``num_runs=``: that many fresh,
        independent runs with ``num_particles`` each, whose :math:`\hat Z` are averaged (the
        standard error comes from their spread)."""
        num_runs = kwargs.pop("num_runs", None)
        if num_particles is not None:
            num_particles = check_positive_int(num_particles, "num_particles")
        a, k = self._data(args, kwargs)
        self.backend.setup(*a, **k)
        if num_runs is not None:
            if not self.backend._evidence_from_runs:
                raise TypeError(f"{type(self.backend).__name__}.log_evidence takes no num_runs; only the "
                                "SMC backends repeat independent runs.")
            k = {**k, "num_runs": check_positive_int(num_runs, "num_runs")}
        with torch.no_grad():
            return self.backend._log_evidence(num_particles, a, k)

    def predictive(self, num_samples: Optional[int] = None, *args,
                   return_sites: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, torch.Tensor]:
        """Posterior predictive draws: the model run on posterior samples.

        Observed sites are *sampled* (replicated data, as for a posterior predictive check),
        even where the data pass ``obs=``: each draw is one replicate of the observed data set,
        the model run on one posterior draw.  Pass new inputs as arguments (e.g.
        ``fit.predictive(500, x_new, None)`` for a model ``model(x, y=None)``).  Returns
        ``{site: tensor}`` with the draws in the first dimension and each site's own shape after
        it, as :meth:`posterior_samples` does (no plate singleton dims).
        """
        samples = self.posterior_samples(self._num_samples(num_samples))
        a, k = self._data(args, kwargs)
        model = poutine.uncondition(self.backend.model)
        with torch.no_grad():
            try:  # vectorized over draws where the model broadcasts
                out = pyro.infer.Predictive(model, posterior_samples=samples,
                                            return_sites=return_sites, parallel=True)(*a, **k)
            except (ValueError, RuntimeError, IndexError):
                out = pyro.infer.Predictive(model, posterior_samples=samples,
                                            return_sites=return_sites, parallel=False)(*a, **k)
        sites = self.backend.structure.sites if self.backend.structure is not None else {}
        for name, value in out.items():  # (S, 1, ..., *shape) -> (S, *shape)
            shape = tuple(sites[name].value_shape) if name in sites else None
            if shape is not None and value.dim() > len(shape) + 1 and value[0].numel() == math.prod(shape):
                out[name] = value.reshape((value.shape[0],) + shape)
        return out

    def to_inferencedata(self, num_samples: Optional[int] = None, *args, draws: Optional[str] = None,
                         **kwargs):
        """``arviz.InferenceData`` with posterior, sample_stats, log_likelihood, observed_data.

        ``num_samples``: guide draws (default 1000), or for a sampler at most this many draws
        in all, thinned evenly within each chain (default: every kept draw).  ``draws`` as in
        :meth:`posterior_samples`.
        """
        from ..diagnostics import groups_to_inferencedata

        num_samples, a, k = self._prepared(num_samples, args, kwargs)
        with torch.no_grad():
            groups = self.backend._inference_data_groups(num_samples, a, k, **self._draws_option(draws))
        return groups_to_inferencedata(groups, attrs={"inference_library": "ppl_lvm",
                                                      "backend": type(self.backend).__name__,
                                                      "num_steps": self.num_steps})

    def save(self, path) -> None:
        """Checkpoint the backend (parameters, optimizer, RNG, history) to ``path``."""
        self.backend.save(path)

    @classmethod
    def load(cls, path, backend: Backend, *args, **kwargs) -> "Fit":
        """Restore a checkpoint into ``backend`` (built with the same model/guide/optim)."""
        backend.load(path)
        return cls(backend, args, kwargs)

    def plot_losses(self, ax=None, smooth: int = 0):
        """Plot the objective against the step (matplotlib); returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        y = self.losses
        ax.plot(np.arange(len(y)), y, lw=0.8, alpha=0.6 if smooth else 1.0, label="loss")
        if smooth and len(y) > smooth:
            kernel = np.ones(smooth) / smooth
            ax.plot(np.arange(smooth - 1, len(y)), np.convolve(y, kernel, mode="valid"),
                    lw=1.5, label=f"running mean ({smooth})")
            ax.legend()
        if len(y) >= 40:  # keep an early transient from flattening the rest of the curve
            tail = y[len(y) // 20:]
            lo, hi = float(np.min(tail)), float(np.quantile(tail, 0.99))
            if float(np.max(y)) > hi and hi > lo:
                pad = 0.1 * (hi - lo)
                ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(type(self.backend).__name__)
        warmup = getattr(self.backend, "warmup", 0)
        if warmup and 0 < warmup < len(y):  # samplers: where the kept draws begin
            ax.axvline(warmup, color="0.5", ls="--", lw=0.8)
            ax.annotate("end of warmup", (warmup, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.4")
        ax.figure.tight_layout()  # keeps the x label inside a saved PNG
        return ax

    def __repr__(self):
        last = f"{self.losses[-1]:.4g}" if len(self.losses) else "n/a"
        extra = self.backend._fit_summary()
        return f"Fit(backend={type(self.backend).__name__}, steps={self.num_steps}, last_loss={last}{extra})"


def iid_chains(num_draws: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reshape ``(num_draws, ...)`` i.i.d. draws to ``(chain, draw, ...)`` for ArviZ.

    Independent or exchangeable draws (a guide's; SMC particles) split into 4 groups serve as
    "chains" (R-hat then reads about 1 and ArviZ's shape check is satisfied); 1 chain when
    ``num_draws`` is small or not a multiple of 4.
    """
    chains = 4 if num_draws % 4 == 0 and num_draws >= 16 else 1
    return lambda v: v.reshape((chains, num_draws // chains) + tuple(v.shape[1:]))
