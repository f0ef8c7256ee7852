"""Callbacks for :meth:`Backend.run <ppl_lvm.inference.base.Backend.run>` and the progress bar.

A callback is ``cb(backend, step, loss) -> bool``; returning ``True`` stops the run."""

from __future__ import annotations

import math
import os
import sys
from typing import List, Optional

from ..validation import check_positive_int

__all__ = ["EarlyStopping", "LogLoss", "Checkpoint", "progress_default", "progress_bar_class"]

class EarlyStopping:
    """Stop when the loss has not improved by ``min_delta`` for ``patience`` steps.

    The loss is smoothed by a running mean over ``window`` steps first, since stochastic
    objectives fluctuate from step to step.  Use as ``backend.run(..., callbacks=[EarlyStopping()])``.
    """

    def __init__(self, patience: int = 200, min_delta: float = 0.0, window: int = 20):
        self.patience = check_positive_int(patience, "patience")
        self.window = check_positive_int(window, "window")
        self.min_delta = float(min_delta)
        self.best = math.inf
        self.best_step = 0
        self._recent: List[float] = []
        self.stopped_at: Optional[int] = None

    def __call__(self, backend, step: int, loss: float) -> bool:
        self._recent.append(loss)
        if len(self._recent) > self.window:
            self._recent.pop(0)
        smooth = sum(self._recent) / len(self._recent)
        if smooth < self.best - self.min_delta:
            self.best, self.best_step = smooth, step
        elif step - self.best_step >= self.patience:
            self.stopped_at = step
            return True
        return False


class LogLoss:
    """Log the loss (and its running mean) every ``every`` steps through :mod:`logging`.

    Messages go to the ``"ppl_lvm"`` logger at INFO level unless another ``logger`` is given;
    ``history`` keeps the ``(step, loss)`` pairs it logged.
    """

    def __init__(self, every: int = 100, logger=None):
        import logging

        self.every = check_positive_int(every, "every")
        self.logger = logger or logging.getLogger("ppl_lvm")
        self.history: List[tuple] = []

    def __call__(self, backend, step: int, loss: float) -> bool:
        if (step + 1) % self.every == 0:
            recent = backend.losses[-self.every:]
            self.history.append((step, loss))
            self.logger.info("%s step %d: loss %.6g (mean of last %d: %.6g)", type(backend).__name__,
                             step + 1, loss, len(recent), sum(recent) / len(recent))
        return False


class Checkpoint:
    """Save the backend's state to ``path`` every ``every`` steps (and after the last step)."""

    def __init__(self, path, every: int = 500):
        self.path = path
        self.every = check_positive_int(every, "every")

    def __call__(self, backend, step: int, loss: float) -> bool:
        if (step + 1) % self.every == 0:
            backend.save(self.path)
        return False


def progress_default() -> bool:
    if os.environ.get("PPL_LVM_PROGRESS") in ("0", "false", "False"):
        return False
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar_class():
    """``tqdm.auto.tqdm`` where it can draw widgets (Jupyter with ipywidgets), else the text bar
    (tqdm.auto without ipywidgets warns "IProgress not found" on every first fit)."""
    if "ipykernel" in sys.modules:
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            from tqdm.std import tqdm
            return tqdm
    from tqdm.auto import tqdm
    return tqdm
