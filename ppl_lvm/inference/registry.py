"""The registry of inference backends: ``register_backend``, ``get_backend``, ``list_backends``.

``ppl_lvm.fit(..., backend=name)`` and ``ppl-lvm backends`` read it; a backend registers with
``@register_backend(name)`` on its class (see ``docs/architecture.md``)."""

from __future__ import annotations

from typing import Dict

from .requirements import describe

__all__ = ["BACKENDS", "register_backend", "get_backend", "list_backends"]

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
    from .base import Backend

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
