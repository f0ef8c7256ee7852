"""Numerical constants and guards that follow the dtype (``torch.finfo``), as GPyTorch does.

No magic numbers: a floor, a clamp or a Cholesky jitter is stated relative to the dtype's
resolution (``eps``) or its smallest normal number (``tiny``), so the same code is right in
float32 and float64.
"""

from __future__ import annotations

import torch

__all__ = ["tiny", "eps", "safe_cholesky"]


def tiny(dtype: torch.dtype) -> float:
    """The smallest positive normal number of ``dtype`` (a floor before a log or a division)."""
    return float(torch.finfo(dtype).tiny)


def eps(dtype: torch.dtype) -> float:
    """The resolution of ``dtype``: the gap between 1 and the next representable number."""
    return float(torch.finfo(dtype).eps)


def safe_cholesky(a: torch.Tensor, max_tries: int = 6) -> torch.Tensor:
    r"""Cholesky factor of a (batch of) symmetric positive semi-definite matrices.

    Tries the plain factorization first; where it fails (a matrix positive definite in exact
    arithmetic but not after rounding) adds :math:`\delta I` with
    :math:`\delta = \epsilon \cdot \bar d \cdot 10^k`, :math:`\bar d` the mean diagonal and
    :math:`\epsilon` the dtype's resolution, for :math:`k = 1, 2, \dots` up to ``max_tries``
    (GPyTorch's ``psd_safe_cholesky`` strategy, with the jitter tied to the dtype: 1.2e-6
    relative in float32 and 2.2e-15 in float64 at the first try).  Raises ``ValueError`` when
    even the largest jitter fails (the matrix is not positive semi-definite).
    """
    factor, info = torch.linalg.cholesky_ex(a)
    if not bool((info > 0).any()):
        return factor
    scale = a.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(tiny(a.dtype))[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for k in range(1, max_tries + 1):
        factor, info = torch.linalg.cholesky_ex(a + eps(a.dtype) * 10.0 ** k * scale * eye)
        if not bool((info > 0).any()):
            return factor
    raise ValueError(
        f"The matrix is not positive semi-definite: its Cholesky factorization failed even with a "
        f"diagonal jitter of {eps(a.dtype) * 10.0 ** max_tries:.1e} times its mean diagonal "
        f"({a.dtype}). Use float64, or check how the matrix is built.")
