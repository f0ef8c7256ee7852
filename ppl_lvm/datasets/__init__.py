"""Data for examples and tests: loaders of data bundled inside installed packages, and simulators.

Nothing is downloaded at run time.  Simulators of each library model live with the model
(``Model.simulate``); the exact-answer fixtures live in :mod:`ppl_lvm.testing`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

__all__ = ["RegressionData", "load_diabetes"]


class RegressionData(NamedTuple):
    """Standardized regression data: ``X (N, D)``, ``y (N,)``, and the feature names."""

    X: torch.Tensor
    y: torch.Tensor
    feature_names: tuple
    y_mean: float
    y_scale: float


def load_diabetes(dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> RegressionData:
    """scikit-learn's bundled diabetes data (Efron et al. 2004): 442 patients, 10 features.

    Features and the target (disease progression after one year) are standardized to mean 0
    and standard deviation 1; ``y_mean``/``y_scale`` undo the target's standardization.
    """
    try:
        from sklearn.datasets import load_diabetes as _load
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("load_diabetes needs scikit-learn: pip install scikit-learn") from exc
    raw = _load()
    X = np.asarray(raw.data, dtype=float)
    y = np.asarray(raw.target, dtype=float)
    X = (X - X.mean(0)) / X.std(0)
    y_mean, y_scale = float(y.mean()), float(y.std())
    y = (y - y_mean) / y_scale
    return RegressionData(
        torch.as_tensor(X, dtype=dtype, device=device),
        torch.as_tensor(y, dtype=dtype, device=device),
        tuple(raw.feature_names),
        y_mean,
        y_scale,
    )
