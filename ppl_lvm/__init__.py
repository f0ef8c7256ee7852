"""ppl_lvm: latent-variable models and pluggable inference backends for Pyro.

A model is a Pyro program; an inference backend consumes its traces through Pyro's effect
handlers, so every backend runs every model/guide pair it is valid for::

    import ppl_lvm
    fit = ppl_lvm.fit(model, guide, x, backend="svi", num_steps=2000)
    fit.log_evidence(1000)
    idata = fit.to_inferencedata()
"""

from . import datasets, diagnostics, inference, models, traces  # noqa: F401  (submodules)
from .diagnostics import psis_khat, to_inferencedata
from .errors import DivergenceError, IncompatibleModelError, ModelGuideMismatchError
from .inference import (
    IWAE,
    SVI,
    Backend,
    Checkpoint,
    ChiSquareVIS,
    EarlyStopping,
    EvidenceEstimate,
    Fit,
    GFlowNetEM,
    LogLoss,
    OpenHorizonSMC,
    ParticleFilter,
    SGHMC,
    SGLD,
    SMCFilterBackend,
    SMCSampler,
    get_backend,
    list_backends,
)

__version__ = "0.1.0"

__all__ = [
    "OpenHorizonSMC",
    "ParticleFilter",
    "SMCFilterBackend",
    "SMCSampler",
    "IWAE",
    "SVI",
    "SGHMC",
    "SGLD",
    "Backend",
    "Checkpoint",
    "ChiSquareVIS",
    "DivergenceError",
    "EarlyStopping",
    "EvidenceEstimate",
    "Fit",
    "GFlowNetEM",
    "LogLoss",
    "IncompatibleModelError",
    "ModelGuideMismatchError",
    "fit",
    "get_backend",
    "list_backends",
    "psis_khat",
    "to_inferencedata",
    "__version__",
]

_RUN_OPTIONS = ("num_steps", "progress", "callbacks")


def fit(model, guide, *args, backend="svi", **options) -> Fit:
    """Fit ``model`` with ``guide`` on data ``args`` using a backend looked up by name.

    Options that ``Backend.run`` takes (``num_steps``, ``progress``, ``callbacks``) go to the
    run; the others to the backend's constructor (e.g. ``optim``, ``loss``,
    ``num_particles``). Keyword data for the model go in ``data_kwargs={...}``.

    :param backend: a registered name (see :func:`list_backends`) or a Backend subclass.
    :returns: :class:`Fit`.

    Example::

        >>> fit = ppl_lvm.fit(model, guide, x, backend="svi", num_steps=1000,
        ...                   optim=pyro.optim.Adam({"lr": 0.05}))
    """
    cls = get_backend(backend)
    run_opts = {k: options.pop(k) for k in _RUN_OPTIONS if k in options}
    data_kwargs = options.pop("data_kwargs", None) or {}
    try:
        instance = cls(model, guide, **options)
    except TypeError as exc:
        raise TypeError(f"Invalid option for backend {cls.name!r}: {exc}") from exc
    return instance.run(*args, **run_opts, **data_kwargs)
