"""Inference backends: one file per backend, the contract in :mod:`ppl_lvm.inference.base` (see
``docs/architecture.md`` for the layout)."""

from .base import Backend, StepProposal
from .callbacks import Checkpoint, EarlyStopping, LogLoss
from .guided import GuidedBackend
from .registry import BACKENDS, get_backend, list_backends, register_backend
from .requirements import Requirements
from .results import EvidenceEstimate, Fit
from .iwae import IWAE
from .vis import ChiSquareVIS
from .svi import SVI
from .particle_filter import ParticleFilter, SMCFilterBackend
from .smc_sampler import OpenHorizonSMC, SMCSampler
from .sghmc import SGHMC, SGLD, ConstantStepSize, CyclicalStepSize, PolynomialDecay
from .gflownet_em import AnnealedThreshold, GFlowNetEM, MLPPolicy

__all__ = [
    "AnnealedThreshold",
    "BACKENDS",
    "Backend",
    "ChiSquareVIS",
    "ConstantStepSize",
    "CyclicalStepSize",
    "Checkpoint",
    "EarlyStopping",
    "EvidenceEstimate",
    "Fit",
    "GFlowNetEM",
    "GuidedBackend",
    "IWAE",
    "LogLoss",
    "MLPPolicy",
    "OpenHorizonSMC",
    "SMCSampler",
    "ParticleFilter",
    "SMCFilterBackend",
    "PolynomialDecay",
    "SGHMC",
    "SGLD",
    "SVI",
    "get_backend",
    "list_backends",
    "register_backend",
    "Requirements",
    "StepProposal",
]
