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
latent sites, shapes and supports) and its declared requirements
(:class:`~ppl_lvm.inference.requirements.Requirements`, checked by shared code; option-dependent
checks in :meth:`Backend.check_model`), raising :class:`~ppl_lvm.errors.IncompatibleModelError`.
Every change a step makes goes through :meth:`Backend._update_parameters` once the whole step
is known to be finite, so a :class:`~ppl_lvm.errors.DivergenceError` leaves parameters,
optimizer state, counters and histories as they were.  Backends register under a name
(:func:`~ppl_lvm.inference.registry.register_backend`) so that
``ppl_lvm.fit(model, guide, *data, backend="svi")`` and the ``ppl-lvm backends`` command find
them.  Results live in :mod:`~ppl_lvm.inference.results`, callbacks in
:mod:`~ppl_lvm.inference.callbacks`, the guide-based machinery in :mod:`~ppl_lvm.inference.guided`.

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
from typing import Callable, ClassVar, Dict, List, NamedTuple, Optional, Sequence

import torch
import pyro
import pyro.optim
from pyro import poutine
from pyro.util import get_rng_state, set_rng_state

from ..errors import DivergenceError
from ..traces import ParticleEvaluator, ProgramStructure, structure_from_trace, trace_program
from ..validation import (check_callable, check_finite_data, check_model_guide, check_positive_int,
                          check_real, coerce_data, positional_names)
from .callbacks import Checkpoint, EarlyStopping, LogLoss, progress_bar_class, progress_default
from .registry import BACKENDS, get_backend, list_backends, register_backend
from .requirements import Requirements, check_program, check_requirements, program_kind
from .results import EvidenceEstimate, Fit, iid_chains

__all__ = [
    "Backend",
    "StepProposal",
    # re-exported from the modules that hold them
    "Fit",
    "EvidenceEstimate",
    "iid_chains",
    "EarlyStopping",
    "Checkpoint",
    "LogLoss",
    "register_backend",
    "get_backend",
    "list_backends",
    "BACKENDS",
]


def _is_finite(x) -> bool:
    return math.isfinite(float(x))


class _IterateAverage:
    """Running means of parameter iterates (unconstrained), for :meth:`Backend.run`."""

    def __init__(self):
        self.count = 0
        self.means: Dict[int, list] = {}  # id -> [parameter, running mean]

    def add(self, params) -> None:
        self.count += 1
        with torch.no_grad():
            for p in params:
                entry = self.means.get(id(p))
                if entry is None or entry[0] is not p:
                    self.means[id(p)] = [p, p.detach().clone(), 1]
                    continue
                entry[2] += 1
                entry[1] += (p.detach() - entry[1]) / entry[2]

    def apply(self) -> list:
        """Write the means into the parameters; return ``(parameter, last iterate)`` pairs."""
        saved = []
        with torch.no_grad():
            for p, mean, _ in self.means.values():
                saved.append((p, p.detach().clone()))
                p.copy_(mean)
        return saved


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
        self._updated_params: list = []
        #: ``(p, last iterate)`` pairs while the parameters hold an average of iterates
        self._last_iterate: list = []
        #: the steps ``[first, last)`` whose iterates the parameters average (None: the last iterate)
        self.averaged_steps: Optional[tuple] = None

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
        self._updated_params = params
        if commit is not None:
            commit()
        if not params:
            return
        for p, g in pairs:
            p.grad = g if scale == 1.0 else g * scale
        self.optim(params)
        pyro.infer.util.zero_grads(params)

    #: fraction of the last steps of a run whose iterates are averaged into the returned
    #: parameters (Polyak & Juditsky 1992); 0: the last iterate.  Guide-based backends: 0.2.
    average_last: ClassVar[float] = 0.0
    #: fewest steps worth averaging (a shorter window keeps the last iterate)
    average_min_steps: ClassVar[int] = 10

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
        among the data are converted to tensors (``torch.as_tensor``).  After a run that averaged
        its last iterates, the next step continues from the last iterate, not from the average."""
        args, kwargs = self._coerce(args, kwargs)
        self.setup(*args, **kwargs)
        averaged = self._restore_last_iterate()
        try:
            loss = float(self._step(*args, **kwargs))
        except DivergenceError:  # the step was not taken: the parameters go back to the average
            self._last_iterate = self._swap_in(averaged)
            raise
        self.num_steps += 1
        self.losses.append(loss)
        return loss

    def run(self, *args, num_steps: Optional[int] = None, progress: Optional[bool] = None,
            callbacks: Sequence[Callable] = (), average_last: Optional[float] = None, **kwargs) -> "Fit":
        r"""Run ``num_steps`` updates and return a :class:`Fit`.

        :param num_steps: number of calls to :meth:`step` (added to any steps already taken);
            default 1000 for the optimisation backends, warmup plus kept draws for samplers.
        :param progress: show a tqdm bar with the current loss; default: only when interactive
            (a terminal or Jupyter). ``PPL_LVM_PROGRESS=0`` turns it off everywhere.
        :param callbacks: callables ``cb(backend, step, loss) -> bool``; returning ``True``
            stops the run (see :class:`EarlyStopping`, :class:`Checkpoint`).
        :param average_last: fraction of this run's last steps whose parameter iterates are
            averaged (Polyak-Ruppert: :math:`\bar\theta = \frac1m \sum_{t > T-m} \theta_t`, Polyak &
            Juditsky 1992) and written into the parameters at the end, so that the fit is the
            optimum within Monte Carlo error rather than one noisy iterate near it; default
            :attr:`average_last` (0.2 for SVI, IWAE and chi^2-VIS, 0 elsewhere); 0 keeps the last
            iterate.  Losses and the optimizer's path are those of the iterates; a later
            ``step``/``run`` continues from the last iterate.  Windows under
            :attr:`average_min_steps` steps, and runs stopped by a callback before the window,
            keep the last iterate.
        :raises DivergenceError: when the objective or a gradient becomes NaN/inf, or the
            objective falls below any value the model can reach (a runaway fit,
            :meth:`~ppl_lvm.traces.ProgramStructure.loss_floor`); that step's update is not
            applied and ``err.fit`` holds the fit so far.
        """
        if num_steps is None:
            num_steps = self._default_num_steps()
        num_steps = check_positive_int(num_steps, "num_steps")
        fraction = self.average_last if average_last is None else check_real(
            average_last, "average_last", low=0.0, high=1.0, open_high=True)
        window = int(num_steps * fraction)
        if window < self.average_min_steps:
            window = 0
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"each callback must be a callable cb(backend, step, loss) -> bool, "
                                f"got {type(cb).__name__}.")
        args, kwargs = self._coerce(args, kwargs)
        self.setup(*args, **kwargs)
        tqdm = progress_bar_class()

        show = progress_default() if progress is None else bool(progress)
        every = max(1, num_steps // 200)
        bar = tqdm(total=num_steps, disable=not show, desc=type(self).__name__, leave=True)
        stop = False
        average = _IterateAverage() if window else None
        try:
            for i in range(num_steps):
                try:
                    loss = self.step(*args, **kwargs)
                except DivergenceError as err:
                    err.fit = self.make_fit(args, kwargs) if self.num_steps else None
                    raise
                if average is not None and i >= num_steps - window:
                    average.add(self._updated_params)
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
        if average is not None and average.count:
            self._last_iterate = average.apply()
            self.averaged_steps = (self.num_steps - average.count, self.num_steps)
        return self.make_fit(args, kwargs)

    def _restore_last_iterate(self) -> list:
        """Put the last iterate back in place of the average before the next update; returns the
        ``(parameter, average)`` pairs it replaced."""
        averaged = self._swap_in(self._last_iterate)
        self._last_iterate = []
        return averaged

    @staticmethod
    def _swap_in(pairs) -> list:
        """Write ``(parameter, value)`` pairs into the parameters; return what they held."""
        out = []
        with torch.no_grad():
            for p, value in pairs:
                out.append((p, p.detach().clone()))
                p.copy_(value)
        return out

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
            "last_iterate": self._last_iterate_by_name(),
            "averaged_steps": self.averaged_steps,
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
        self.averaged_steps = state.get("averaged_steps")
        last = state.get("last_iterate") or {}
        self._last_iterate = [(store[n].unconstrained(), v) for n, v in last.items() if n in store]
        self._load_extra_state(state.get("extra") or {})
        set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def _last_iterate_by_name(self) -> dict:
        store = pyro.get_param_store()
        out = {}
        for p, value in self._last_iterate:
            try:
                out[store.param_name(p)] = value.clone()
            except KeyError:
                continue
        return out

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


def __getattr__(name):  # GuidedBackend lives in guided.py, which imports this module
    if name in ("GuidedBackend", "ParticlePass"):
        from . import guided
        return getattr(guided, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
