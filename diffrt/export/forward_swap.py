"""Run a torch model with some of its modules' forwards replaced, for one export.

The step-cache graphs (deepcache.py, fbcache.py) are diffusers' own forward with the
modules that do not run swapped for identities or cached values: the exporter traces
what is left and drops the dead ops."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def swapped_forwards(pairs: Iterable[tuple[torch.nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Inside: each module's forward is its pair's function (the instance attribute
    shadows the class's method). On leaving, even by an exception, every module is as
    it was: an instance forward set before is put back, else the attribute is removed."""
    pairs = list(pairs)
    saved = [(module, module.__dict__.get("forward")) for module, _ in pairs]
    try:
        for module, forward in pairs:
            module.forward = forward
        yield
    finally:
        for module, forward in reversed(saved):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward


__all__ = ["swapped_forwards"]
