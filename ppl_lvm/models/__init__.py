"""Library models: one file per model family, each a PyroModule with model() and guide().

Families land here as they are built (GPFA, mixtures of multi-task GPs, sparse IBP, latent
SDE, BNN+LV); :data:`MODELS` maps each registered family to a factory of a small instance with
data, used by the backend x model matrix test.
"""

import warnings
import weakref
from typing import Callable, Dict

MODELS: Dict[str, Callable] = {}


def register_model(name: str):
    """Register ``factory() -> (model_object, args)`` for the matrix test under ``name``."""
    def deco(factory):
        if name in MODELS:
            raise ValueError(f"A model named {name!r} is already registered.")
        MODELS[name] = factory
        return factory
    return deco


_LIVE_MODULES = weakref.WeakValueDictionary()  # Pyro name -> a live library module


def warn_if_name_in_use(module, name: str):
    """Warn when another live library module already uses the Pyro name ``name``: PyroModules
    with one name read and write the same param-store entries (``name.*``), so fitting one
    silently changes the other.  Called by each library model's constructor."""
    other = _LIVE_MODULES.get(name)
    if other is not None and other is not module:
        warnings.warn(f"Another library module named {name!r} ({type(other).__name__}) exists: the two share their "
                      f"Pyro parameters (the param store's '{name}.*' entries), so fitting one changes the other. "
                      "Pass a distinct name=... to each module.", UserWarning, stacklevel=3)
    _LIVE_MODULES[name] = module


__all__ = ["MODELS", "register_model", "warn_if_name_in_use"]

from .regression import BayesianLinearRegression  # noqa: E402  (registers itself)

__all__ += ["BayesianLinearRegression"]

from .vae import VAE  # noqa: E402

__all__ += ["VAE"]

from .bnn_lv import BNN, BNNLV  # noqa: E402

__all__ += ["BNN", "BNNLV"]

from .discrete_vae import DiscreteVAE  # noqa: E402

__all__ += ["DiscreteVAE"]

from .gpfa import GPFA, SharedGPFA  # noqa: E402

__all__ += ["GPFA", "SharedGPFA"]

from .gp_mixture import MultiTaskGPMixture, select_num_clusters  # noqa: E402

__all__ += ["MultiTaskGPMixture", "select_num_clusters"]

from .ibp import IBPGibbsFit, IndianBuffet, RestrictedBernoulliRows, SparseIBPFactorization  # noqa: E402

__all__ += ["IBPGibbsFit", "IndianBuffet", "RestrictedBernoulliRows", "SparseIBPFactorization"]

from .latent_sde import KLAnnealing, LatentSDE  # noqa: E402

__all__ += ["LatentSDE", "KLAnnealing"]
