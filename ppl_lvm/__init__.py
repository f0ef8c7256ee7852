"""ppl_lvm: latent-variable models and pluggable inference backends for Pyro.

A model is a Pyro program; an inference backend consumes its traces through Pyro's effect
handlers, so every backend runs every model/guide pair it is valid for::

    import ppl_lvm
    fit = ppl_lvm.fit(model, guide, x, backend="svi", num_steps=2000)
    fit.log_evidence(1000)
    idata = fit.to_inferencedata()
"""

from . import datasets, diagnostics, distributions, inference, models, traces  # noqa: F401  (submodules)
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

_RUN_OPTIONS = ("num_steps", "progress", "callbacks", "average_last")


def fit(model, guide, *args, backend="svi", **options) -> Fit:
    """Fit ``model`` with ``guide`` on data ``args`` using a backend looked up by name.

    Options that ``Backend.run`` takes (``num_steps``, ``progress``, ``callbacks``, ``average_last``) go to the
    run; options of the backend's constructor (e.g. ``optim``, ``loss``, ``num_particles``) to
    the backend; any other keyword that the model's signature accepts (e.g. ``subsample_size``)
    to the model, as do the entries of ``data_kwargs={...}``.  A keyword that is none of these
    is refused with the lists of both.

    :param backend: a registered name (see :func:`list_backends`) or a Backend subclass.
    :returns: :class:`Fit`.

    Example::

        >>> fit = ppl_lvm.fit(model, guide, x, backend="svi", num_steps=1000,
        ...                   optim=pyro.optim.Adam({"lr": 0.05}))
    """
    cls = get_backend(backend)
    run_opts = {k: options.pop(k) for k in _RUN_OPTIONS if k in options}
    data_kwargs = dict(options.pop("data_kwargs", None) or {})
    backend_opts, accepts_any = _keyword_names(cls)
    model_keywords, model_takes_any = _model_keywords(model)
    if not accepts_any:
        for key in [k for k in options if k not in backend_opts]:
            if key in model_keywords or model_takes_any:
                data_kwargs[key] = options.pop(key)
            else:
                raise TypeError(
                    f"Invalid option for backend {cls.name!r}: {key!r} is neither one of its options "
                    f"({', '.join(sorted(backend_opts)) or 'none'}) nor a keyword of the model "
                    f"({', '.join(sorted(model_keywords)) or 'none'}). Model data that the "
                    "model takes as **kwargs go in data_kwargs={...}.")
    try:
        instance = cls(model, guide, **options)
    except TypeError as exc:
        raise TypeError(f"Invalid option for backend {cls.name!r}: {exc}") from exc
    return instance.run(*args, **run_opts, **data_kwargs)


def _keyword_names(cls):
    """Keyword options of a backend's constructor (following ``**options`` up the classes)."""
    import inspect

    names, any_kw = set(), True
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            any_kw = False
            break
    return names - {"self", "model", "guide"}, any_kw


def _model_keywords(model):
    """Keyword parameters of the model, and whether it takes ``**kwargs``."""
    import inspect

    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return set(), True  # an object we cannot inspect: let it decide
    return ({p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)},
            any(p.kind == p.VAR_KEYWORD for p in params))
