"""Testing utilities for ``ppl_lvm``: exact-answer fixtures for inference backends."""

from ppl_lvm.testing.fixtures import (
    FIXTURES,
    BayesianLinearRegression,
    BinaryLatents,
    ExactFixture,
    LinearGaussianSSM,
    NormalNormalGlobal,
    NormalNormalLocal,
)

__all__ = [
    "FIXTURES",
    "ExactFixture",
    "NormalNormalGlobal",
    "NormalNormalLocal",
    "BayesianLinearRegression",
    "LinearGaussianSSM",
    "BinaryLatents",
]
