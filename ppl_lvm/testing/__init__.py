"""Testing utilities for ``ppl_lvm``: exact-answer fixtures for inference backends, and reference
posteriors computed elsewhere (posteriordb) with :func:`check_against_reference`."""

from ppl_lvm.testing.fixtures import (
    FIXTURES,
    ConjugateLinearRegression,
    BinaryLatents,
    ExactFixture,
    LinearGaussianSSM,
    NormalNormalGlobal,
    NormalNormalLocal,
)
from ppl_lvm.testing.reference import (
    REFERENCE_POSTERIORS,
    ReferenceCheck,
    ReferencePosterior,
    check_against_reference,
    load_reference,
    reference_posteriors,
)

__all__ = [
    "REFERENCE_POSTERIORS",
    "ReferenceCheck",
    "ReferencePosterior",
    "check_against_reference",
    "load_reference",
    "reference_posteriors",
    "FIXTURES",
    "ExactFixture",
    "NormalNormalGlobal",
    "NormalNormalLocal",
    "ConjugateLinearRegression",
    "LinearGaussianSSM",
    "BinaryLatents",
]
