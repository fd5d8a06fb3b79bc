"""Backends: one file each, behind the small protocol in base.py.

A backend opens one `Session` per stage. Only the chosen backend's library is
imported, when it is chosen.
"""

from __future__ import annotations

import importlib

from diffrt.errors import DiffrtError
from diffrt.runtime.backends.base import Backend, Session

# name -> module; the module defines `make_backend(**options)`, returning a base.Backend.
_MODULES = {"ort": "diffrt.runtime.backends.ort", "openvino": "diffrt.runtime.backends.openvino"}
# Designed for, not built yet: named so the error can say so.
_PLANNED = ("tensorrt", "torch")


def get_backend(name: str, **options) -> Backend:
    if name not in _MODULES:
        if name in _PLANNED:
            raise DiffrtError(f"backend {name!r} is not available in this version yet; use one of: {', '.join(_MODULES)}")
        raise DiffrtError(f"unknown backend {name!r}; choose one of: {', '.join(_MODULES)}")
    module = importlib.import_module(_MODULES[name])
    try:
        return module.make_backend(**options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        bad = str(exc).split("argument")[-1].strip()
        raise DiffrtError(f"backend {name!r} has no option {bad}; see `diffrt generate --help` (-O KEY=VALUE)") from None


def backend_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(backends this version has, backends designed for but not built yet)."""
    return tuple(_MODULES), tuple(_PLANNED)


__all__ = ["Backend", "Session", "backend_names", "get_backend"]
