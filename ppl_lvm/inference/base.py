r"""The contract between models and inference backends, and the shared fit loop.

A backend is a class derived from :class:`Backend`.  It is built from a model, a guide (or
``None`` where it builds its own) and an optimizer, and offers

* ``step(*args, **kwargs) -> float`` — one update, like :meth:`pyro.infer.SVI.step`;
* ``run(*args, num_steps=..., progress=None, callbacks=(), **kwargs) -> Fit`` — the loop, with
  a tqdm progress bar, a NaN/inf guard that keeps the last good state, and callbacks;
* ``state_dict()`` / ``load_state_dict()`` / ``save(path)`` / ``load(path)`` — parameters,
  optimizer state, RNG state and history, so that a resumed run continues exactly as an
  uninterrupted one would.

Before the first step a backend validates the data (no NaN/inf), the model/guide pair (same
latent sites, shapes and supports) and its own requirements (:meth:`Backend.check_model`,
raising :class:`~ppl_lvm.errors.IncompatibleModelError`).  Backends register under a name
(:func:`register_backend`) so that ``ppl_lvm.fit(model, guide, *data, backend="svi")`` and
the ``ppl-lvm backends`` command find them.

Example::

    backend = SVI(model, guide, optim=pyro.optim.Adam({"lr": 1e-2}))
    fit = backend.run(x, num_steps=2000)
    fit.log_evidence(num_particles=1000)
    idata = fit.to_inferencedata()
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable, ClassVar, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import pyro
import pyro.optim
from pyro import poutine
from pyro.util import get_rng_state, set_rng_state

from ..errors import DivergenceError
from ..traces import (LogWeights, ParticleEvaluator, ProgramStructure, log_mean_exp, structure_from_trace,
                      trace_program)
from .requirements import Requirements, check_program, check_requirements, describe, program_kind
from ..validation import (check_callable, check_finite_data, check_model_guide, check_positive_int,
                          coerce_data, positional_names)

__all__ = [
    "Backend",
    "Fit",
    "EvidenceEstimate",
    "EarlyStopping",
    "Checkpoint",
    "LogLoss",
    "GuidedBackend",
    "ParticlePass",
    "StepProposal",
    "register_backend",
    "get_backend",
    "list_backends",
    "BACKENDS",
]

BACKENDS: Dict[str, type] = {}


def register_backend(name: str):
    """Class decorator: make a backend available as ``ppl_lvm.fit(..., backend=name)``."""
    def deco(cls):
        key = name.lower()
        if key in BACKENDS and BACKENDS[key] is not cls:
            raise ValueError(f"A backend named {name!r} is already registered ({BACKENDS[key].__name__}).")
        cls.name = key
        BACKENDS[key] = cls
        return cls
    return deco


def get_backend(name) -> type:
    """The backend class registered under ``name`` (case-insensitive); a class passes through."""
    if isinstance(name, type) and issubclass(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend subclass, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}. Available backends: {', '.join(sorted(BACKENDS))}.")
    return BACKENDS[key]


def list_backends() -> Dict[str, str]:
    """Registered backend names mapped to what each is valid for and needs of a model (its
    ``valid_for`` sentence, then its declared :class:`~ppl_lvm.inference.requirements.Requirements`)."""
    return {k: describe(v) for k, v in sorted(BACKENDS.items())}


class EvidenceEstimate(NamedTuple):
    r"""An estimate of :math:`\log p(x)` with its Monte Carlo standard error.

    ``khat`` is the PSIS :math:`\hat k` of the importance weights (``nan`` where it does not
    apply; the largest over data points where the weights factorize per data point): above
    0.7 the estimate is unreliable whatever ``stderr`` says.
    """

    log_evidence: float
    stderr: float
    khat: float
    num_particles: int
    #: per data point, where the weights factorize: log p-hat(x_i) (numpy) ...
    pointwise: Optional[np.ndarray] = None
    #: ... and each data point's PSIS k-hat
    pointwise_khat: Optional[np.ndarray] = None
    #: why ``khat`` is nan, where it is
    note: Optional[str] = None

    def __float__(self):
        return float(self.log_evidence)

    def __repr__(self):
        note = f", note={self.note!r}" if self.note else ""
        return (f"EvidenceEstimate(log_evidence={self.log_evidence:.4f} ± {self.stderr:.4f}, "
                f"khat={self.khat:.2f}, num_particles={self.num_particles}{note})")


# --------------------------------------------------------------------------- callbacks
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


def _progress_default() -> bool:
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


def _is_finite(x) -> bool:
    return math.isfinite(float(x))


class StepProposal(NamedTuple):
    """What a backend's ``_loss_and_grads`` proposes for one step (see
    :meth:`Backend._gradient_step`): the loss, the parameters whose ``.grad`` it set, and
    ``commit``, a callable making the step's other state changes, run only once the step is
    known to be finite."""

    loss: float
    params: list
    commit: Optional[Callable[[], None]] = None


# --------------------------------------------------------------------------- backend
class Backend:
    """Base class of every inference backend (see the module docstring for the contract).

    Subclasses set ``valid_for`` (a sentence for the registry), implement
    :meth:`_loss_and_grads` (gradient methods) or :meth:`_step` (samplers), and
    override :meth:`check_model` to refuse models they cannot handle, plus the result hooks
    :meth:`_posterior_samples`, :meth:`_log_evidence` and :meth:`_inference_data_groups`.

    :param model: a Pyro model (callable).
    :param guide: a Pyro guide over the model's latent sites, or ``None`` where the backend
        builds its own.
    :param optim: a :class:`pyro.optim.PyroOptim`; default ``Adam({"lr": 1e-2})``.
    :param max_plate_nesting: plate dims used by model and guide; found from a prototype trace
        when ``None``.
    :param data_plate: name of the plate over data points (for per-datapoint weights and
        log-likelihoods); found automatically when ``None``.
    :param validate: run the pre-flight checks before the first step (default ``True``).
    """

    name: ClassVar[str] = "base"
    #: whether ``_gradient_step`` must trace param sites to find the parameters (backends whose
    #: ``_loss_and_grads`` returns ``(loss, params)`` set it to False)
    _capture_params: ClassVar[bool] = True
    valid_for: ClassVar[str] = ""
    #: what the backend needs from a model, checked by shared code in setup (requirements.py)
    requires: ClassVar[Requirements] = Requirements()
    #: whether ``Fit.log_evidence`` accepts ``num_runs`` (independent repeats of an SMC run)
    _evidence_from_runs: ClassVar[bool] = False
    #: what ``draws=`` of ``Fit.posterior_samples``/``to_inferencedata`` may be (empty: no option)
    draws_choices: ClassVar[tuple] = ()

    def __init__(self, model, guide=None, optim=None, *, max_plate_nesting: Optional[int] = None,
                 data_plate: Optional[str] = None, validate: bool = True):
        # a program of the other kind (a state-space object for a backend of Pyro programs, or
        # the reverse) is refused in setup() by check_program, which names the backends that fit
        if program_kind(model) == "callable" == self.requires.program:
            check_callable(model, "model")
            check_callable(guide, "guide", allow_none=self.requires.guide == "optional")
        if optim is None:
            optim = pyro.optim.Adam({"lr": 1e-2})
        if not isinstance(optim, pyro.optim.PyroOptim):
            raise TypeError(
                f"optim must be a pyro.optim optimizer such as pyro.optim.Adam({{'lr': 1e-2}}), "
                f"got {type(optim).__name__}. (A torch.optim class can be wrapped with "
                "pyro.optim.PyroOptim(torch.optim.X, {...}).)"
            )
        if max_plate_nesting is not None and (not isinstance(max_plate_nesting, int) or max_plate_nesting < 0):
            raise ValueError(f"max_plate_nesting must be a non-negative int, got {max_plate_nesting!r}")
        self.model = model
        self.guide = guide
        self.optim = optim
        self.max_plate_nesting = max_plate_nesting
        self.data_plate = data_plate
        self.validate = validate
        self.structure: Optional[ProgramStructure] = None
        self.guide_structure: Optional[ProgramStructure] = None
        self._setup_key = None
        self._evaluator: Optional[ParticleEvaluator] = None
        #: a loss below this is a runaway fit (:meth:`ProgramStructure.loss_floor`)
        self._loss_floor: Optional[float] = None
        self.num_steps = 0
        self.losses: List[float] = []

    # ------------------------------------------------------------------ validation
    def check_model(self, structure: ProgramStructure) -> None:
        """Checks that depend on the backend's options (the declared :attr:`requires` are
        checked before, by shared code); raise :class:`~ppl_lvm.errors.IncompatibleModelError`."""

    def _allow_enumerated_model_sites(self) -> bool:
        return False

    @staticmethod
    def _signature(args, kwargs):
        def sig(v):
            if torch.is_tensor(v):
                return ("T", tuple(v.shape), str(v.dtype), str(v.device))
            if isinstance(v, (list, tuple)):
                return tuple(sig(x) for x in v)
            return (type(v).__name__, v if isinstance(v, (int, float, str, bool, type(None))) else id(v))
        return (tuple(sig(a) for a in args), tuple(sorted((k, sig(v)) for k, v in kwargs.items())))

    def setup(self, *args, **kwargs) -> ProgramStructure:
        """Validate the data and the model/guide pair once per argument signature.

        Runs the guide once and the model once (replayed against the guide) without moving
        the random number generators, classifies the sites, and checks this backend's
        requirements.  Called automatically by :meth:`step`.
        """
        check_program(self)
        if self.requires.program == "state_space":
            self._check_state_space_data(*args, **kwargs)
            return None
        key = self._signature(args, kwargs)
        if key == self._setup_key and self.structure is not None:
            return self.structure
        if self.validate:
            check_finite_data(args, kwargs, names=positional_names(self.model))
        if self.guide is not None:
            m_struct, g_struct, m_trace, _ = check_model_guide(
                self.model, self.guide, args, kwargs,
                allow_enumerated_model_sites=self._allow_enumerated_model_sites(),
                data_plate=self.data_plate,
            )
        else:
            m_trace = trace_program(self.model, args, kwargs)
            m_struct, g_struct = structure_from_trace(m_trace, data_plate=self.data_plate), None
        if self.validate:
            check_finite_data((), {}, trace=m_trace)
        check_requirements(self, m_struct, args, kwargs)
        self.check_model(m_struct)
        mpn = max(m_struct.max_plate_nesting, g_struct.max_plate_nesting if g_struct else 0)
        if self.max_plate_nesting is not None:
            if self.max_plate_nesting < mpn:
                raise ValueError(
                    f"max_plate_nesting={self.max_plate_nesting} but the model/guide use {mpn} plate "
                    f"dims. Pass max_plate_nesting={mpn} or more (or leave it as None)."
                )
            mpn = self.max_plate_nesting
        m_struct.max_plate_nesting = mpn
        self.structure, self.guide_structure = m_struct, g_struct
        dtypes = [s["value"].dtype for s in m_trace.nodes.values()
                  if s["type"] == "sample" and torch.is_tensor(s["value"]) and s["value"].is_floating_point()]
        self._loss_floor = m_struct.loss_floor(min(dtypes, key=lambda d: torch.finfo(d).bits)) if dtypes else None
        self._evaluator = None
        self._setup_key = key
        self._after_setup(m_struct, *args, **kwargs)
        return m_struct

    def _after_setup(self, structure: ProgramStructure, *args, **kwargs) -> None:
        """Hook for backends that build things (ELBOs, particle plates) once the model is known."""

    def _check_state_space_data(self, *args, **kwargs) -> None:
        """Backends for state-space objects (``requires.program == "state_space"``) check their
        data here; setup() does not trace such a model."""
        raise NotImplementedError

    @property
    def evaluator(self) -> ParticleEvaluator:
        """The :class:`~ppl_lvm.traces.ParticleEvaluator` for this model and guide."""
        if self.structure is None:
            raise RuntimeError("Call setup(*data) (or step/run) before using the evaluator.")
        if self._evaluator is None:
            self._evaluator = ParticleEvaluator(self.model, self.guide, self.structure,
                                                self.structure.max_plate_nesting)
        return self._evaluator

    # ------------------------------------------------------------------ updates
    def _loss_and_grads(self, args, kwargs) -> float:
        """Compute the loss and set ``.grad`` on the parameters (no update). Backends implement it."""
        raise NotImplementedError

    def _step(self, *args, **kwargs) -> float:
        return self._gradient_step(lambda: self._loss_and_grads(args, kwargs))

    def gradients(self, *args, **kwargs):
        """One gradient estimate without an update: ``(loss, {param name: gradient})``.

        Gradients are those the optimizer would receive, with respect to the *unconstrained*
        parameters (the loss's gradient: ascent directions have the opposite sign).  Useful to
        study an estimator's variance: call it repeatedly at fixed parameters.
        """
        self.setup(*args, **kwargs)
        with poutine.trace(param_only=True) as capture:
            loss = self._loss_and_grads(args, kwargs)
        if isinstance(loss, tuple):
            loss = loss[0]
        out = {}
        for name, site in capture.trace.nodes.items():
            if site["type"] != "param":
                continue
            p = site["value"].unconstrained()
            out[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            p.grad = None
        return float(loss), out

    def _gradient_step(self, loss_and_grads: Callable[[], object]) -> float:
        """Evaluate ``loss_and_grads()`` (which sets ``.grad``), check, then update.

        ``loss_and_grads`` returns the loss, ``(loss, params)`` when it knows the unconstrained
        parameters it differentiated (which saves a param-capturing trace), or a
        :class:`StepProposal` whose ``commit`` holds the step's bookkeeping (running averages,
        counters, histories).  Nothing is changed until the loss and every gradient are known
        to be finite: then ``commit()`` runs and the optimizer updates, so a divergent step
        leaves parameters, optimizer state, counters and histories exactly as they were.
        """
        with poutine.trace(param_only=True) if self._capture_params else contextlib.nullcontext() as capture:
            out = loss_and_grads()
        commit = None
        if isinstance(out, StepProposal):
            loss, params, commit = out.loss, set(out.params), out.commit
        elif isinstance(out, tuple):
            loss, params = out
            params = set(params)
        else:
            loss = out
            params = {site["value"].unconstrained() for site in capture.trace.nodes.values()
                      if site["type"] == "param"}
        loss = float(loss)
        floor = self._loss_floor
        bad = None
        if not _is_finite(loss):
            bad = f"the objective is {loss}"
        elif floor is not None and loss < floor:
            bad = (f"the objective {loss:.4g} is below {floor:.4g}, the lowest value a negative "
                   "log-density of this model can take with parameters in floating-point range "
                   "(the fit ran away, e.g. a covariance that became singular); this is "
                   "divergence, not a result")
        self._update_parameters([(p, p.grad) for p in params], loss_problem=bad, commit=commit)
        return loss

    def _update_parameters(self, pairs, *, loss_problem: Optional[str] = None,
                           commit: Optional[Callable[[], None]] = None, scale: float = 1.0) -> None:
        """The one guarded path by which every backend changes its parameters.

        ``pairs`` are ``(unconstrained parameter, gradient of the loss)``; ``loss_problem`` a
        reason the step is already known to be divergent.  When every gradient is finite (and
        no problem was given) ``commit()`` runs (the backend's own state changes for this step),
        the gradients, times ``scale``, are written to ``.grad``, the optimizer takes its step
        and the gradients are cleared; otherwise nothing changes (``.grad`` is cleared) and a
        :class:`~ppl_lvm.errors.DivergenceError` is raised.
        """
        pairs = [(p, g) for p, g in pairs if g is not None]
        bad = loss_problem
        if bad is None and pairs:
            # one reduction and one host sync for all gradients; name the culprit only on failure
            if not bool(torch.isfinite(torch.stack([g.sum() for _, g in pairs]).sum())):
                store = pyro.get_param_store()
                for p, g in pairs:
                    if not bool(torch.isfinite(g).all()):
                        try:
                            name = store.param_name(p)
                        except KeyError:
                            name = "?"
                        bad = f"the gradient of parameter {name!r} is not finite"
                        break
                else:  # finite entries whose sum overflowed: still a divergent step
                    bad = "the gradients overflow"
        params = [p for p, _ in pairs]
        if bad is not None:
            pyro.infer.util.zero_grads(params)
            self._divergence(bad)
        if commit is not None:
            commit()
        if not params:
            return
        for p, g in pairs:
            p.grad = g if scale == 1.0 else g * scale
        self.optim(params)
        pyro.infer.util.zero_grads(params)

    #: what a DivergenceError from this backend advises
    divergence_advice: ClassVar[str] = ("Try a smaller learning rate, better-scaled data, float64 data, or a "
                                        "guide initialised closer to the prior.")

    def _divergence(self, what: str):
        """Raise the :class:`~ppl_lvm.errors.DivergenceError` of a step that was not taken."""
        raise DivergenceError(
            f"{type(self).__name__} step {self.num_steps}: {what}. The update was skipped; parameters, "
            "optimizer state and the backend's own state keep their values before this step (through "
            f"run() or ppl_lvm.fit the fit so far is in the error's .fit). {self.divergence_advice}",
            step=self.num_steps,
        )

    def _coerce(self, args, kwargs):
        names = positional_names(self.model) if callable(self.model) else None
        return coerce_data(args, kwargs, names)

    def step(self, *args, **kwargs) -> float:
        """Take one update and return the objective (a loss: lower is better).  numpy arrays
        among the data are converted to tensors (``torch.as_tensor``)."""
        args, kwargs = self._coerce(args, kwargs)
        self.setup(*args, **kwargs)
        loss = float(self._step(*args, **kwargs))
        self.num_steps += 1
        self.losses.append(loss)
        return loss

    def run(self, *args, num_steps: Optional[int] = None, progress: Optional[bool] = None,
            callbacks: Sequence[Callable] = (), **kwargs) -> "Fit":
        """Run ``num_steps`` updates and return a :class:`Fit`.

        :param num_steps: number of calls to :meth:`step` (added to any steps already taken);
            default 1000 for the optimisation backends, warmup plus kept draws for samplers.
        :param progress: show a tqdm bar with the current loss; default: only when interactive
            (a terminal or Jupyter). ``PPL_LVM_PROGRESS=0`` turns it off everywhere.
        :param callbacks: callables ``cb(backend, step, loss) -> bool``; returning ``True``
            stops the run (see :class:`EarlyStopping`, :class:`Checkpoint`).
        :raises DivergenceError: when the objective or a gradient becomes NaN/inf, or the
            objective falls below any value the model can reach (a runaway fit,
            :meth:`~ppl_lvm.traces.ProgramStructure.loss_floor`); that step's update is not
            applied and ``err.fit`` holds the fit so far.
        """
        if num_steps is None:
            num_steps = self._default_num_steps()
        num_steps = check_positive_int(num_steps, "num_steps")
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"each callback must be a callable cb(backend, step, loss) -> bool, "
                                f"got {type(cb).__name__}.")
        args, kwargs = self._coerce(args, kwargs)
        self.setup(*args, **kwargs)
        tqdm = progress_bar_class()

        show = _progress_default() if progress is None else bool(progress)
        every = max(1, num_steps // 200)
        bar = tqdm(total=num_steps, disable=not show, desc=type(self).__name__, leave=True)
        stop = False
        try:
            for i in range(num_steps):
                try:
                    loss = self.step(*args, **kwargs)
                except DivergenceError as err:
                    err.fit = self.make_fit(args, kwargs) if self.num_steps else None
                    raise
                if i % every == 0 or i == num_steps - 1:
                    bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                bar.update(1)
                stop = False
                for cb in callbacks:
                    stop = bool(cb(self, self.num_steps - 1, loss)) or stop
                if stop:
                    break
        finally:
            bar.close()
        if not stop:
            self._warn_if_still_falling(num_steps)
        return self.make_fit(args, kwargs)

    def _warn_if_still_falling(self, num_steps: int) -> None:
        """Hook run after a run that was not stopped by a callback (no-op by default)."""

    def make_fit(self, args, kwargs) -> "Fit":
        return Fit(self, args, kwargs)

    def _default_num_steps(self) -> int:
        return 1000

    def _default_num_samples(self) -> int:
        """Draws that ``Fit.posterior_samples``/``to_inferencedata`` return when not told."""
        return 1000

    # ------------------------------------------------------------------ results (hooks)
    def _posterior_samples(self, num_samples: int, args, kwargs) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not draw posterior samples.")

    def _log_evidence(self, num_particles: int, args, kwargs) -> EvidenceEstimate:
        raise NotImplementedError(
            f"{type(self).__name__} cannot estimate the log-evidence; use a backend with an "
            "importance-sampling or SMC estimate (svi, iwae, chi2_vis, smc)."
        )

    def _inference_data_groups(self, num_samples: int, args, kwargs) -> Dict[str, Dict]:
        raise NotImplementedError(f"{type(self).__name__} has no ArviZ conversion.")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume: parameters, optimizer, RNG, step count and losses."""
        return {
            "backend": type(self).__name__,
            "optim_class": self._optim_class(),
            "params": pyro.get_param_store().get_state(),
            "optim": self.optim.get_state(),
            "rng": get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "num_steps": self.num_steps,
            "losses": list(self.losses),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend") != type(self).__name__:
            raise ValueError(
                f"This checkpoint was written by {state.get('backend')!r}, not {type(self).__name__}; "
                "load it into the same backend class."
            )
        saved_optim = state.get("optim_class")
        if saved_optim is not None and saved_optim != self._optim_class():
            raise ValueError(
                f"This checkpoint was written with optimizer {saved_optim}, this backend uses "
                f"{self._optim_class()}; build the backend with the same optimizer to resume.")
        store = pyro.get_param_store()
        store.set_state(state["params"])
        self.optim.set_state(state["optim"])
        # Parameter tensors were replaced, so per-parameter optimizer objects must be rebuilt
        # from the loaded state on the next update.
        self.optim.optim_objs.clear()
        self.optim.grad_clip.clear()
        self.num_steps = int(state["num_steps"])
        self.losses = list(state["losses"])
        self._load_extra_state(state.get("extra") or {})
        set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _fit_summary(self) -> str:
        """Extra ``key=value`` text for the fit's repr (samplers: convergence diagnostics)."""
        return ""

    def _optim_class(self) -> str:
        ctor = getattr(self.optim, "pt_optim_constructor", None)
        return getattr(ctor, "__name__", type(self.optim).__name__)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def save(self, path) -> None:
        """Write :meth:`state_dict` to ``path`` (``torch.save``; atomic rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path) -> "Backend":
        """Restore a checkpoint written by :meth:`save`; returns ``self`` for chaining."""
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "params" not in state:
            raise ValueError(f"{path} is not a ppl_lvm checkpoint (written by Backend.save or Fit.save).")
        self.load_state_dict(state)
        return self

    def __repr__(self):
        return f"{type(self).__name__}(steps={self.num_steps})"


# --------------------------------------------------------------------------- results
class Fit:
    r"""The result of :meth:`Backend.run`: the backend in its fitted state plus the data.

    A ``Fit`` is a view, not a copy: like :class:`pyro.infer.SVI`, the parameters live in
    Pyro's global param store (and in the ``PyroModule``\ s), so further ``run`` calls,
    ``pyro.clear_param_store()`` or another fit that reuses the same parameter names change
    what it reports.  Save it (:meth:`save`) to keep a state.

    :ivar backend: the backend.
    :ivar args: the data the fit was run on (methods accept replacements).
    """

    def __init__(self, backend: Backend, args, kwargs):
        self.backend = backend
        self.args = tuple(args)
        self.kwargs = dict(kwargs)

    @property
    def losses(self) -> np.ndarray:
        """The objective at every step the backend has taken (live, like the parameters)."""
        return np.asarray(self.backend.losses, dtype=float)

    @property
    def num_steps(self) -> int:
        return self.backend.num_steps

    def _data(self, args, kwargs):
        """Positional data replace the fit's positional data when given; keywords are merged."""
        return self.backend._coerce((tuple(args) if args else self.args), {**self.kwargs, **kwargs})

    def _num_samples(self, num_samples):
        if num_samples is None:
            return self.backend._default_num_samples()
        return check_positive_int(num_samples, "num_samples")

    def _draws_option(self, draws):
        if draws is None:
            return {}
        choices = self.backend.draws_choices
        if not choices:
            raise TypeError(f"draws= applies to the guide-based backends (svi, iwae, chi2_vis), not to "
                            f"{type(self.backend).__name__}.")
        if draws not in choices:
            raise ValueError(f"draws must be one of {choices}, got {draws!r}.")
        return {"draws": draws}

    def posterior_samples(self, num_samples: Optional[int] = None, *args,
                          sites: Optional[Sequence[str]] = None, draws: Optional[str] = None,
                          **kwargs) -> Dict[str, torch.Tensor]:
        """Draws from the fitted posterior (approximation): ``{site: (num_samples, *shape)}``.

        ``num_samples`` defaults to 1000 draws from a guide, or to every kept draw of a sampler
        (chains concatenated). Extra positional/keyword arguments replace the data the fit was
        run on.  ``draws`` (guide-based backends): ``"resampled"`` (importance-resampled guide
        draws, the default of IWAE and chi^2-VIS) or ``"proposal"`` (raw guide draws, SVI's
        default); see :class:`GuidedBackend`.
        """
        num_samples = self._num_samples(num_samples)
        a, k = self._data(args, kwargs)
        self.backend.setup(*a, **k)
        with torch.no_grad():
            samples = self.backend._posterior_samples(num_samples, a, k, **self._draws_option(draws))
        if sites is not None:
            unknown = set(sites) - set(samples)
            if unknown:
                raise ValueError(f"Unknown site(s) {sorted(unknown)}; latent sites are {sorted(samples)}.")
            samples = {s: samples[s] for s in sites}
        return samples

    def log_evidence(self, num_particles: int = 1000, *args, **kwargs) -> EvidenceEstimate:
        r"""Estimate :math:`\log p(x)` where the backend can (with standard error and k-hat).

        The SMC backends take ``num_runs=`` (independent runs whose :math:`\hat Z` are averaged;
        the standard error comes from their spread)."""
        num_runs = kwargs.pop("num_runs", None)
        num_particles = check_positive_int(num_particles, "num_particles")
        a, k = self._data(args, kwargs)
        self.backend.setup(*a, **k)
        if num_runs is not None:
            if not self.backend._evidence_from_runs:
                raise TypeError(f"{type(self.backend).__name__}.log_evidence takes no num_runs; only the "
                                "SMC backends repeat independent runs.")
            k = {**k, "num_runs": check_positive_int(num_runs, "num_runs")}
        with torch.no_grad():
            return self.backend._log_evidence(num_particles, a, k)

    def predictive(self, num_samples: Optional[int] = None, *args,
                   return_sites: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, torch.Tensor]:
        """Posterior predictive draws: the model run on posterior samples.

        Observed sites are *sampled* (replicated data, as for a posterior predictive check),
        even where the data pass ``obs=``: each draw is one replicate of the observed data set,
        the model run on one posterior draw.  Pass new inputs as arguments (e.g.
        ``fit.predictive(500, x_new, None)`` for a model ``model(x, y=None)``).  Returns
        ``{site: tensor}`` with the draws in the first dimension and each site's own shape after
        it, as :meth:`posterior_samples` does (no plate singleton dims).
        """
        samples = self.posterior_samples(self._num_samples(num_samples))
        a, k = self._data(args, kwargs)
        model = poutine.uncondition(self.backend.model)
        with torch.no_grad():
            try:  # vectorized over draws where the model broadcasts
                out = pyro.infer.Predictive(model, posterior_samples=samples,
                                            return_sites=return_sites, parallel=True)(*a, **k)
            except (ValueError, RuntimeError, IndexError):
                out = pyro.infer.Predictive(model, posterior_samples=samples,
                                            return_sites=return_sites, parallel=False)(*a, **k)
        sites = self.backend.structure.sites if self.backend.structure is not None else {}
        for name, value in out.items():  # (S, 1, ..., *shape) -> (S, *shape)
            shape = tuple(sites[name].value_shape) if name in sites else None
            if shape is not None and value.dim() > len(shape) + 1 and value[0].numel() == math.prod(shape):
                out[name] = value.reshape((value.shape[0],) + shape)
        return out

    def to_inferencedata(self, num_samples: Optional[int] = None, *args, draws: Optional[str] = None,
                         **kwargs):
        """``arviz.InferenceData`` with posterior, sample_stats, log_likelihood, observed_data.

        ``num_samples``: guide draws (default 1000), or for a sampler at most this many draws
        in all, thinned evenly within each chain (default: every kept draw).  ``draws`` as in
        :meth:`posterior_samples`.
        """
        from ..diagnostics import groups_to_inferencedata

        num_samples = self._num_samples(num_samples)
        a, k = self._data(args, kwargs)
        self.backend.setup(*a, **k)
        with torch.no_grad():
            groups = self.backend._inference_data_groups(num_samples, a, k, **self._draws_option(draws))
        return groups_to_inferencedata(groups, attrs={"inference_library": "ppl_lvm",
                                                      "backend": type(self.backend).__name__,
                                                      "num_steps": self.num_steps})

    def save(self, path) -> None:
        """Checkpoint the backend (parameters, optimizer, RNG, history) to ``path``."""
        self.backend.save(path)

    @classmethod
    def load(cls, path, backend: Backend, *args, **kwargs) -> "Fit":
        """Restore a checkpoint into ``backend`` (built with the same model/guide/optim)."""
        backend.load(path)
        return cls(backend, args, kwargs)

    def plot_losses(self, ax=None, smooth: int = 0):
        """Plot the objective against the step (matplotlib); returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        y = self.losses
        ax.plot(np.arange(len(y)), y, lw=0.8, alpha=0.6 if smooth else 1.0, label="loss")
        if smooth and len(y) > smooth:
            kernel = np.ones(smooth) / smooth
            ax.plot(np.arange(smooth - 1, len(y)), np.convolve(y, kernel, mode="valid"),
                    lw=1.5, label=f"running mean ({smooth})")
            ax.legend()
        if len(y) >= 40:  # keep an early transient from flattening the rest of the curve
            tail = y[len(y) // 20:]
            lo, hi = float(np.min(tail)), float(np.quantile(tail, 0.99))
            if float(np.max(y)) > hi and hi > lo:
                pad = 0.1 * (hi - lo)
                ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(type(self.backend).__name__)
        warmup = getattr(self.backend, "warmup", 0)
        if warmup and 0 < warmup < len(y):  # samplers: where the kept draws begin
            ax.axvline(warmup, color="0.5", ls="--", lw=0.8)
            ax.annotate("end of warmup", (warmup, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.4")
        ax.figure.tight_layout()  # keeps the x label inside a saved PNG
        return ax

    def __repr__(self):
        last = f"{self.losses[-1]:.4g}" if len(self.losses) else "n/a"
        extra = self.backend._fit_summary()
        return f"Fit(backend={type(self.backend).__name__}, steps={self.num_steps}, last_loss={last}{extra})"


def iid_chains(num_draws: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reshape ``(num_draws, ...)`` i.i.d. draws to ``(chain, draw, ...)`` for ArviZ.

    Independent or exchangeable draws (a guide's; SMC particles) split into 4 groups serve as
    "chains" (R-hat then reads about 1 and ArviZ's shape check is satisfied); 1 chain when
    ``num_draws`` is small or not a multiple of 4.
    """
    chains = 4 if num_draws % 4 == 0 and num_draws >= 16 else 1
    return lambda v: v.reshape((chains, num_draws // chains) + tuple(v.shape[1:]))


# --------------------------------------------------------------------------- guide-based results
class ParticlePass(NamedTuple):
    """One vectorized draw of K guide particles scored under the model (see
    :meth:`GuidedBackend._particle_pass`)."""

    guide_trace: object
    model_lp: dict
    log_weights: LogWeights
    model_params: list
    guide_params: list


def _accumulate(params, grads):
    for p, g in zip(params, grads):
        if g is None:
            continue
        p.grad = g if p.grad is None else p.grad + g


class GuidedBackend(Backend):
    r"""A backend whose posterior is a guide :math:`q(z \mid x)` (SVI, IWAE, chi^2-VIS).

    Provides the results every such backend shares:

    * posterior samples: the guide run once inside a vectorized particle plate;
    * log-evidence by importance sampling with the guide as proposal,
      :math:`\log \hat p(x) = \log \frac1K \sum_k p(x, z_k) / q(z_k \mid x)` (per data point
      where the latents are all local), with a delta-method standard error and the PSIS
      :math:`\hat k` of the weights (a ``RuntimeWarning`` above 0.7);
    * ArviZ groups: guide draws as the posterior, per-observation log-likelihoods, and the
      draws' importance log-weights in ``sample_stats`` (``log_importance_weight``).

    **Which draws.**  ``draws="proposal"`` returns the guide's own draws :math:`z \sim q`.
    ``draws="resampled"`` returns sampling-importance-resampling draws (Rubin 1988): a pool
    of ``num_samples`` guide draws is resampled with replacement in proportion to
    :math:`w = p(x, z) / q(z \mid x)` (per data point where the weights factorize, i.e. only
    local latents; jointly otherwise), which is the importance-weighted posterior that IWAE and
    chi^2-VIS target; ``sample_stats`` then holds ``proposal_index`` (the pool draw behind
    each draw; per data point where resampled per data point it is the first point's) and the
    attributes ``importance_ess`` (Kish's ESS of the pool's weights, the smallest over data
    points) and ``importance_khat`` (PSIS :math:`\hat k`, the largest).  Duplicated draws make
    ArviZ's ESS honest about the pool's ESS.  ``default_draws``: ``"proposal"`` for SVI (its
    answer is q), ``"resampled"`` for IWAE and chi^2-VIS.
    """

    #: which draws posterior_samples/to_inferencedata return when not told ("proposal" or "resampled")
    default_draws: ClassVar[str] = "proposal"
    draws_choices: ClassVar[tuple] = ("resampled", "proposal")

    #: particles scored per vectorized pass when estimating the evidence
    evidence_chunk_size: int = 1000
    #: what the importance-sampling proposal is, for warnings
    proposal_description: ClassVar[str] = "the guide"
    _capture_params = False  # _loss_and_grads of guided backends returns (loss, params)
    _resolved_gradient: Optional[str] = None

    @property
    def gradient_estimator(self) -> Optional[str]:
        """The gradient estimator in use for the guide, once the model has been seen (backends
        that choose one: IWAE's "dreg"/"pathwise"/"stl", VIS's "score"/"pathwise")."""
        return self._resolved_gradient

    # ------------------------------------------------------------------ shared update machinery
    def _non_reparameterized_sites(self, structure) -> tuple:
        """Guide sites of the model's latents that need score-function gradients
        (discrete, or without ``rsample``)."""
        return tuple(n for n, s in self.guide_structure.latent_sites.items()
                     if n in structure.latent_sites and (s.is_discrete or not s.has_rsample))

    def _warn_if_still_falling(self, num_steps: int) -> None:
        """Warn when the objective still falls at the end of the run: the mean over the last
        10% of the steps is more than 3 standard errors below the mean over the 10% before
        (standard errors from 10 batch means per window, which allows for the autocorrelation
        of stochastic-gradient losses).  Runs shorter than 200 steps are not judged."""
        import warnings

        if num_steps < 200 or len(self.losses) < num_steps:
            return
        w = num_steps // 10
        recent = np.asarray(self.losses[-2 * w:], dtype=float)
        if not np.all(np.isfinite(recent)):
            return
        before, last = recent[:w], recent[w:]
        b = w // 10
        means = [x[: b * 10].reshape(10, b).mean(1) for x in (before, last)]
        se = math.sqrt(sum(float(m.var(ddof=1)) / 10 for m in means))
        drop = float(before.mean() - last.mean())
        if se > 0 and drop > 3 * se:
            warnings.warn(
                f"{type(self).__name__}: the loss was still falling when the run ended (the last {w} steps "
                f"average {drop:.4g} below the {w} before, {drop / se:.1f} standard errors): the fit has not "
                "converged, and its posterior and evidence are not yet the optimum's. Run longer "
                "(num_steps; EarlyStopping(patience=...) stops once it flattens), raise the learning rate, "
                "or standardize the data (predictors on very different scales slow every optimizer).",
                RuntimeWarning, stacklevel=4)

    def _warn_poor_guide(self, khat: float, what: str) -> None:
        """The PSIS diagnostic of a variational fit (Yao, Vehtari, Simpson, Gelman 2018, "Yes,
        but did it work?"): above 0.7 the guide misses mass the posterior has.  Measured on the
        reference battery's centered eight schools (a funnel): k-hat 1.0, means up to 84 MCSE
        off, sds 0.04x."""
        import warnings

        if khat > 0.7:
            warnings.warn(
                f"{type(self).__name__}: PSIS k-hat of the guide's importance weights is {khat:.2f} > 0.7 "
                f"(Yao et al. 2018): {self.proposal_description} misses part of the posterior, so {what} "
                "misstate it (typically too narrow). Fit longer, use a richer guide (e.g. "
                "AutoMultivariateNormal, a flow), reparameterize (non-centered hierarchies), or use a "
                "sampler (backend='smc' or 'sghmc').", RuntimeWarning, stacklevel=4)

    def _particle_pass(self, num_particles, args, kwargs) -> ParticlePass:
        """Draw K particles from the guide, score them under the model, and record which
        parameters the guide (phi) and the model (theta) used.  Parameters used by both count
        as model parameters."""
        ev = self.evaluator
        with poutine.trace(param_only=True) as gcap:
            gt = ev.guide_trace(num_particles, args, kwargs)
        with poutine.trace(param_only=True) as mcap:
            model_lp = ev.model_log_probs(gt, num_particles, args, kwargs)
        lw = ev.log_weights(num_particles, args, kwargs, guide_trace=gt, model_lp=model_lp)
        guide_params = {s["value"].unconstrained() for s in gcap.trace.nodes.values() if s["type"] == "param"}
        model_params = {s["value"].unconstrained() for s in mcap.trace.nodes.values() if s["type"] == "param"}
        return ParticlePass(gt, model_lp, lw, list(model_params), list(guide_params - model_params))

    def _fresh_log_weights(self, args, kwargs, num_particles: Optional[int] = None):
        """:class:`~ppl_lvm.traces.LogWeights` of fresh particles, without gradients (K defaults
        to the backend's ``num_particles``)."""
        self.setup(*args, **kwargs)
        k = self.num_particles if num_particles is None else check_positive_int(num_particles, "num_particles")
        with torch.no_grad():
            return self.evaluator.log_weights(k, args, kwargs)

    def log_weights(self, *args, num_particles: Optional[int] = None, **kwargs):
        """Importance log-weights of fresh guide particles (no gradients), as
        :class:`~ppl_lvm.traces.LogWeights`: ``.joint`` ``(K,)``, per data point ``.local``
        ``(K, B)``, ``.is_log_likelihood()``."""
        return self._fresh_log_weights(args, kwargs, num_particles)

    def log_chi2_objective(self, *args, num_particles: Optional[int] = None, **kwargs) -> float:
        r""":math:`\log \hat V = \log \frac1K \sum_k w_k^2` with fresh particles (per data point
        where the weights factorize): the forward-:math:`\chi^2` quality of the guide as a
        proposal, :math:`\approx 2 \log p(x) + \log(1 + \chi^2(p \| q))`; lower is better."""
        lw = self._fresh_log_weights(args, kwargs, num_particles)
        return float(lw.reduce(log_mean_exp(2.0 * lw.particle_weights, 0)))

    @staticmethod
    def _apply_gradients(model_objective, guide_objective, model_params, guide_params) -> None:
        """Set ``.grad`` to minus the gradient of ``model_objective`` for the model's parameters
        and of ``guide_objective`` for the guide's (both objectives are maximized).  When the
        two are the same tensor a single backward pass serves both."""
        if guide_objective is model_objective:
            params = model_params + guide_params
            if params:
                _accumulate(params, torch.autograd.grad(-model_objective, params, allow_unused=True))
            return
        if model_params:
            _accumulate(model_params, torch.autograd.grad(-model_objective, model_params,
                                                          retain_graph=bool(guide_params), allow_unused=True))
        if guide_params:
            _accumulate(guide_params, torch.autograd.grad(-guide_objective, guide_params, allow_unused=True))

    def _posterior_samples(self, num_samples, args, kwargs, draws=None):
        ev = self.evaluator
        gt = ev.guide_trace(num_samples, args, kwargs)
        latents = ev.latent_values(gt, num_samples)
        if (draws or self.default_draws) == "proposal":
            return latents
        lw = ev.log_weights(num_samples, args, kwargs, guide_trace=gt)
        pick, _ = self._resampler(lw, num_samples)
        return {n: pick(v, n) for n, v in latents.items()}

    def _resampler(self, lw: LogWeights, num_samples: int):
        """``(pick, indices)``: ``pick(tensor (K, *shape), site) -> (num_samples, *shape)``
        resamples by the normalized weights (sampling importance resampling), per data point
        where they factorize; ``indices`` are the pool draws chosen, ``(num_samples,)`` or
        ``(num_samples, B)``."""
        s = self.structure
        if not lw.factorizes:
            idx = torch.multinomial(torch.softmax(lw.joint, 0), num_samples, replacement=True)
            return (lambda v, name=None: v.index_select(0, idx)), idx
        # (num_samples, B): data point b's draws come from its own weights
        idx = torch.multinomial(torch.softmax(lw.local, 0).t(), num_samples, replacement=True).t()
        data_plate = s.plates[s.data_plate]

        def pick(v, name):
            info = s.sites.get(name)
            if info is None and name == s.data_plate:  # enumerated block per data point (K, B)
                return torch.gather(v, 0, idx)
            if info is None or s.data_plate not in info.plates:
                return v[:num_samples] if v.shape[0] >= num_samples else v.expand((num_samples,) + v.shape[1:])
            axis = 1 + len(info.batch_shape) + data_plate.dim  # the data plate's axis in v
            shape = [num_samples] + [1] * (v.dim() - 1)
            shape[axis] = idx.shape[1]
            index = idx.reshape(shape).expand((num_samples,) + tuple(v.shape[1:]))
            return torch.gather(v, 0, index)
        return pick, idx

    def _check_evidence_inputs(self):
        s = self.structure
        sub = s.subsampled_plates
        if sub:
            raise ValueError(
                f"The model subsamples plate(s) {sorted(sub)}; the log-evidence needs every data "
                "point. Pass arguments that switch subsampling off, e.g. "
                "fit.log_evidence(1000, x, subsample_size=None)."
            )
        if self.guide_structure is not None:
            missing = [n for n, i in s.latent_sites.items()
                       if n not in self.guide_structure.latent_sites and i.enumerate is None]
            if missing:  # enumerated sites are summed out exactly by the evaluator
                raise ValueError(
                    f"Latent site(s) {missing} are neither sampled by the guide nor marked for "
                    "enumeration; importance sampling with the guide as proposal needs every "
                    "latent site in the guide or enumerated (infer={'enumerate': 'parallel'})."
                )

    def _importance_log_weights(self, num_particles, args, kwargs):
        """:class:`~ppl_lvm.traces.LogWeights` of ``num_particles`` guide draws, in chunks."""
        ev = self.evaluator
        parts = []
        left = num_particles
        while left > 0:
            k = min(left, self.evidence_chunk_size)
            parts.append(ev.log_weights(k, args, kwargs))
            left -= k
        return LogWeights.cat(parts)

    def _log_evidence(self, num_particles, args, kwargs):
        import warnings
        from ..diagnostics import psis_khat, psis_khats

        self._check_evidence_inputs()
        lw = self._importance_log_weights(num_particles, args, kwargs)
        est, se = lw.log_evidence()
        diag = lw.weights_for_diagnostics()
        pointwise = pointwise_khat = None
        if diag.dim() == 2:  # per data point where the weights factorize; report the largest
            pointwise_khat = psis_khats(diag)
            khat = float(np.nanmax(pointwise_khat)) if np.isfinite(pointwise_khat).any() else float("nan")
            pointwise = log_mean_exp(diag, 0).detach().cpu().numpy()
        else:
            khat = psis_khat(diag)
        note = None
        if khat > 0.7:
            where = (f" for at least one of the {diag.shape[1]} data points" if diag.dim() == 2 else "")
            warnings.warn(
                f"PSIS k-hat of the importance weights is {khat:.2f} > 0.7{where}: "
                f"{self.proposal_description} is a poor proposal there and the log-evidence estimate "
                "is unreliable. Fit longer, use a richer proposal, or more particles.",
                RuntimeWarning, stacklevel=3)
        elif not math.isfinite(khat):
            distinct = int(torch.unique(diag.reshape(diag.shape[0], -1)[:, 0]).numel())
            note = (f"k-hat not computed: PSIS fits a generalized Pareto tail to the largest weights, "
                    f"and these weights take few distinct values ({distinct} at the first data point: "
                    f"{self.proposal_description} puts its draws on few states). Bounded weights have a "
                    "finite variance, so the standard error applies.")
        return EvidenceEstimate(float(est), float(se), float(khat), int(num_particles), pointwise, pointwise_khat,
                                note)

    def _inference_data_groups(self, num_samples, args, kwargs, draws=None):
        from ..diagnostics import psis_khat

        ev = self.evaluator
        gt = ev.guide_trace(num_samples, args, kwargs)
        latents = ev.latent_values(gt, num_samples)
        model_lp = ev.model_log_probs(gt, num_samples, args, kwargs)  # one model run serves both
        loglik = ev.per_observation_log_likelihood(gt, num_samples, args, kwargs, model_lp=model_lp)
        lw = ev.log_weights(num_samples, args, kwargs, guide_trace=gt, model_lp=model_lp)
        guide_proto = trace_program(self.guide, args, kwargs, role="guide")
        proto = trace_program(self.model, args, kwargs, replay=guide_proto)
        observed = {n: proto.nodes[n]["value"] for n in self.structure.observed_sites}
        cd = iid_chains(num_samples)
        groups = {"observed_data": observed}
        if (draws or self.default_draws) == "proposal":
            groups.update(posterior={n: cd(v) for n, v in latents.items()},
                          sample_stats={"log_importance_weight": cd(lw.joint)},
                          log_likelihood={n: cd(v) for n, v in loglik.items()})
            self._warn_poor_guide(psis_khat(lw.particle_weights), "its draws")
            return groups
        pick, idx = self._resampler(lw, num_samples)
        x = lw.particle_weights
        ess = float((1.0 / torch.softmax(x, 0).pow(2).sum(0)).min())
        self._warn_poor_guide(psis_khat(x), "the importance-resampled draws")
        groups.update(posterior={n: cd(pick(v, n)) for n, v in latents.items()},
                      sample_stats={"proposal_index": cd(idx if idx.dim() == 1 else idx[:, 0])},
                      log_likelihood={n: cd(pick(v, n)) for n, v in loglik.items()})
        groups["_sample_stats_attrs"] = {"draws": "resampled", "importance_ess": ess,
                                         "importance_khat": psis_khat(x)}
        return groups
