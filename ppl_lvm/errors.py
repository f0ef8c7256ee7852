"""Exceptions raised by ppl_lvm.

Every error a user can trigger is a ``ValueError`` or ``TypeError`` subclass, so
``except ValueError`` keeps working for code written against plain Pyro.
"""

__all__ = ["IncompatibleModelError", "DivergenceError", "ModelGuideMismatchError"]


class IncompatibleModelError(ValueError):
    """A backend was given a model it cannot handle.

    The message names the offending site and suggests a backend that fits.
    """


class ModelGuideMismatchError(ValueError):
    """The guide does not cover the model's latent sites (or has sites the model lacks)."""


class DivergenceError(FloatingPointError):
    """The objective or its gradient became NaN/inf.

    Raised by :meth:`~ppl_lvm.inference.base.Backend.run`; the parameters and the
    optimizer keep the values of the last finite step.  ``step`` is the index of the
    failed step and ``fit`` the :class:`~ppl_lvm.inference.results.Fit` of the steps
    that succeeded (``None`` when the very first step failed).
    """

    def __init__(self, message, step=None, fit=None):
        super().__init__(message)
        self.step = step
        self.fit = fit
