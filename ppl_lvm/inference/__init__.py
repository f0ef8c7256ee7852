"""Inference backends: one file per backend, the contract in :mod:`ppl_lvm.inference.base`."""

from .base import (
    BACKENDS,
    Backend,
    Checkpoint,
    EarlyStopping,
    EvidenceEstimate,
    Fit,
    GuidedBackend,
    LogLoss,
    get_backend,
    list_backends,
    register_backend,
)
from .svi import SVI

__all__ = [
    "BACKENDS",
    "Backend",
    "Checkpoint",
    "EarlyStopping",
    "EvidenceEstimate",
    "Fit",
    "GuidedBackend",
    "LogLoss",
    "SVI",
    "get_backend",
    "list_backends",
    "register_backend",
]
