"""Checks run once, before the first step of any backend.

Every check raises ``ValueError`` / ``TypeError`` (or a subclass from :mod:`ppl_lvm.errors`)
whose message names the problem and the fix.  No ``assert`` on user input: these checks must
survive ``python -O``.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .errors import ModelGuideMismatchError
from .traces import ProgramStructure, structure_from_trace, trace_program

__all__ = ["positional_names", "check_finite_data", "check_callable", "check_model_guide", "check_int",
           "check_positive_int", "check_real", "check_positive", "check_fraction", "check_device",
           "check_choice"]


def positional_names(fn) -> list:
    """Names of ``fn``'s positional parameters (empty when they cannot be read)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def coerce_data(args: Sequence, kwargs: dict, names: Optional[Sequence[str]] = None):
    """The data as the model will see them: numpy arrays become tensors (``torch.as_tensor``:
    same dtype, no copy; numpy's float64 stays float64), everything else passes unchanged; a
    string where data go is refused with a ``TypeError`` naming the argument (a model fails
    on it deep inside with an AttributeError).  Returns ``(args, kwargs)``."""
    import numpy as np

    def one(value, label):
        if isinstance(value, np.ndarray):
            if value.dtype == object or value.dtype.kind in "USV":
                raise TypeError(f"{label} is a numpy array of dtype {value.dtype}; pass numbers "
                                "(convert or encode the column first).")
            return torch.as_tensor(value)
        if isinstance(value, (str, bytes)):
            raise TypeError(f"{label} is a {type(value).__name__} ({value[:40]!r}); the model's data must be "
                            "tensors (or numpy arrays), e.g. torch.tensor(...). Keyword options of the "
                            "model go in data_kwargs or as keywords of run().")
        return value

    out = tuple(one(a, f"argument {i}" + (f" ({names[i]!r})" if names and i < len(names) else ""))
                for i, a in enumerate(args))
    return out, {k: one(v, f"keyword argument {k!r}") for k, v in kwargs.items()}


def check_callable(obj, what: str, allow_none: bool = False) -> None:
    if obj is None and allow_none:
        return
    if not callable(obj):
        raise TypeError(
            f"{what} must be a callable Pyro program (a function or a PyroModule method), "
            f"got {type(obj).__name__}."
        )


# --------------------------------------------------------------------------- argument checkers
# One family, one argument order (value, name, ...): a wrong type is a TypeError, a value out of
# range a ValueError, and both name the argument and show what was given.

def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers accepted, bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}; pass e.g. "
                        f"{name}={max(minimum, 1)}.")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_positive_int(value, name: str) -> int:
    """``value`` as an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_real(value, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
               open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a finite float in the interval given by ``low``/``high`` (open or closed ends);
    a one-element tensor is accepted."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    below = low is not None and (value <= low if open_low else value < low)
    above = high is not None and (value >= high if open_high else value > high)
    if not math.isfinite(value) or below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if open_low or low is None else '['}{lo}, {hi}{')' if open_high or high is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}.")
    return value


def check_positive(value, name: str) -> float:
    """``value`` as a finite float > 0."""
    return check_real(value, name, low=0.0, open_low=True)


def check_choice(value, name: str, choices):
    """``value`` if it is one of ``choices`` (a ValueError listing them otherwise)."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        listed = ", ".join(repr(c) for c in (sorted(choices) if isinstance(choices, dict) else choices))
        raise ValueError(f"{name} must be one of {listed}, got {value!r}.")
    return value


def check_device(device, name: str = "device") -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (``None`` passes: the default device).  Asking for CUDA
    (or MPS) where torch cannot use it is a ``ValueError`` that says why, instead of torch's bare
    AssertionError deep inside the first tensor operation."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}={device!r} is not a device; pass e.g. 'cpu', 'cuda' or 'cuda:0'.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if "+cpu" in torch.__version__ else "no usable GPU or driver"
            raise ValueError(f"{name}={device!r} asks for CUDA, but torch.cuda.is_available() is False "
                             f"(torch {torch.__version__}: {build}). Use device='cpu', or install a CUDA "
                             "build of torch on a machine with an NVIDIA GPU.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{name}={device!r} asks for Apple's MPS, which this machine's torch cannot use.")
    return dev


def check_fraction(value, name: str, *, open_low: bool = True) -> float:
    """``value`` as a float in (0, 1] (or [0, 1] with ``open_low=False``)."""
    return check_real(value, name, low=0.0, high=1.0, open_low=open_low)


def _walk(obj, path: str):
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        yield path, obj
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}[{k!r}]")


def _check_array(path: str, value) -> None:
    if torch.is_tensor(value):
        if not (value.is_floating_point() or value.is_complex()):
            return
        bad = ~torch.isfinite(value.detach())
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            kind = "NaN" if bool(torch.isnan(value.detach()).any()) else "inf"
    else:
        if not np.issubdtype(value.dtype, np.floating):
            return
        bad = ~np.isfinite(value)
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            kind = "NaN" if bool(np.isnan(value).any()) else "inf"
    if count:
        raise ValueError(
            f"{path} (shape {tuple(value.shape)}) contains {count} {kind} value(s), the first at "
            f"index {first}. Remove or impute them before fitting; to leave observations out of "
            "the likelihood, replace them by any finite value and wrap the observation in "
            "poutine.mask(mask=...) (or pass obs_mask= to pyro.sample)."
        )


def check_finite_data(args: Iterable, kwargs: dict, structure: Optional[ProgramStructure] = None,
                      trace=None, names: Optional[Sequence[str]] = None) -> None:
    """Raise ``ValueError`` if any floating-point data argument, or observed value, is NaN/inf.

    ``names`` are the model's positional parameter names, used in the message.
    """
    for i, a in enumerate(args):
        label = f"argument {i}" + (f" ({names[i]!r})" if names and i < len(names) else "")
        for path, value in _walk(a, label):
            _check_array(path, value)
    for k, a in kwargs.items():
        for path, value in _walk(a, f"keyword argument {k!r}"):
            _check_array(path, value)
    if trace is not None:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"] and torch.is_tensor(site["value"]):
                mask = site.get("mask")
                value = site["value"]
                if mask is not None and torch.is_tensor(mask):
                    # masked-out entries are allowed to hold anything
                    try:
                        value = torch.where(mask.expand_as(value) if mask.dim() <= value.dim() else mask,
                                            value, torch.zeros_like(value))
                    except RuntimeError:
                        pass
                _check_array(f"the observed value of site {name!r}", value)


def _is_real(constraint) -> bool:
    """True for ``real`` / ``real_vector``, possibly wrapped (``independent``, mixtures' supports)."""
    from torch.distributions import constraints

    while hasattr(constraint, "base_constraint"):
        constraint = constraint.base_constraint
    return constraint is constraints.real or constraint is constraints.real_vector


def check_model_guide(model, guide, args, kwargs, *, allow_enumerated_model_sites: bool = False,
                      data_plate: Optional[str] = None):
    """Trace model and guide once and check that they agree.

    * every latent site of the model has a sample site of the same name in the guide
      (except model sites marked for enumeration when ``allow_enumerated_model_sites``);
    * the guide samples no site that the model lacks or observes;
    * each guide value has the model site's shape and lies in the model's support;
    * discrete model sites get discrete guide sites.

    :returns: ``(model_structure, guide_structure, model_trace, guide_trace)``.
    """
    guide_trace = trace_program(guide, args, kwargs, role="guide")
    # The model's own (prior) run gives its sites, shapes and supports; the guide is checked
    # against it before the model is ever run on guide values.
    model_trace = trace_program(model, args, kwargs, role="model")
    model_structure = structure_from_trace(model_trace, data_plate=data_plate)
    guide_structure = structure_from_trace(guide_trace)

    missing = [
        s for n, s in model_structure.latent_sites.items()
        if n not in guide_structure.latent_sites
        and not (allow_enumerated_model_sites and s.enumerate is not None)
    ]
    enumerated = [s.name for s in missing if s.enumerate is not None]
    if enumerated:
        raise ModelGuideMismatchError(
            f"Site(s) {enumerated} are marked for enumeration (infer={{'enumerate': ...}}) and the "
            "guide does not sample them, but this backend does not sum enumerated sites out. Use "
            "backend='svi' with loss='enum' (TraceEnum_ELBO), or sample the site(s) in the guide, "
            "or use backend='gflownet_em' for discrete latents."
        )
    if missing:
        lines = "\n".join(f"  {s.name}: {s.distribution}, shape {s.value_shape}" for s in missing)
        raise ModelGuideMismatchError(
            f"The guide has no sample site for {len(missing)} latent site(s) of the model:\n{lines}\n"
            "Add a pyro.sample statement with the same name to the guide, pass the value as "
            "observed data (obs=...) in the model, or — for a discrete site that should be "
            "summed out — mark it with infer={'enumerate': 'parallel'} and use TraceEnum_ELBO."
        )
    extra = [n for n in guide_structure.latent_sites
             if n not in model_structure.sites and not guide_trace.nodes[n]["infer"].get("is_auxiliary")]
    if extra:
        raise ModelGuideMismatchError(
            f"The guide samples site(s) {extra} that the model does not have. Check the names for "
            "typos, or mark auxiliary guide variables with infer={'is_auxiliary': True}."
        )
    observed_in_guide = [n for n in guide_structure.latent_sites if n in model_structure.observed_sites]
    if observed_in_guide:
        raise ModelGuideMismatchError(
            f"The guide samples site(s) {observed_in_guide}, which the model observes. Remove them "
            "from the guide (observed sites need no variational distribution)."
        )
    for name, g in guide_structure.latent_sites.items():
        if name not in model_structure.latent_sites:
            continue
        m_site = model_trace.nodes[name]
        m_info = model_structure.sites[name]
        fn_shape = tuple(m_site["fn"].batch_shape) + tuple(m_site["fn"].event_shape)
        if tuple(g.value_shape) != fn_shape:
            raise ModelGuideMismatchError(
                f"Site {name!r}: the guide draws values of shape {g.value_shape} but the model's "
                f"distribution there has shape {fn_shape} (batch {m_info.batch_shape} + event "
                f"{m_info.event_shape}). Make the guide's distribution match (e.g. .to_event(n), "
                "the same plate sizes), and check that the data and the guide's parameters have "
                "consistent sizes."
            )
        if m_info.is_discrete and not g.is_discrete:
            raise ModelGuideMismatchError(
                f"Site {name!r} is discrete in the model ({m_info.distribution}) but continuous in "
                f"the guide ({g.distribution}). Use a discrete guide distribution (e.g. Bernoulli, "
                "Categorical) or enumerate the site out."
            )
        support = m_site["fn"].support
        g_fn = guide_trace.nodes[name]["fn"]
        value = guide_trace.nodes[name]["value"]
        # Deterministic check first: an unconstrained guide for a constrained model site.
        # (Delta sites, e.g. autoguides' transformed values, carry no meaningful support.)
        is_delta = type(getattr(g_fn, "base_dist", g_fn)).__name__ == "Delta"
        ok = is_delta or not (_is_real(getattr(g_fn, "support", None)) and not _is_real(support)
                              and not m_info.is_discrete)
        if ok:  # then the guide's actual draw
            try:
                ok = bool(torch.all(support.check(value)))
            except (NotImplementedError, RuntimeError, TypeError):
                ok = True
        if not ok:
            raise ModelGuideMismatchError(
                f"Site {name!r}: the guide's {g.distribution} drew values outside the support of "
                f"the model's {m_info.distribution} ({support}). Choose a guide distribution with "
                "the same support, e.g. LogNormal or a TransformedDistribution with "
                "biject_to(support) for constrained sites."
            )
    # Finally the model must run on the guide's values (shapes that only clash there).
    model_trace = trace_program(model, args, kwargs, role="model (replayed against the guide)",
                                replay=guide_trace)
    return model_structure, guide_structure, model_trace, guide_trace
