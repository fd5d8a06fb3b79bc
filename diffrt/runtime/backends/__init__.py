"""Backends: one file each, behind the small protocol in base.py.

A backend opens one `CompiledModel` per stage (the weights, shared) and each worker
takes a `Context` of it (its run state). Only the chosen backend's library is
imported, when it is chosen: a backend whose library is not installed says which
extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util

from diffrt.errors import DiffrtError
from diffrt.runtime.backends.base import Backend, CompiledModel, Context

# name -> module; the module defines `make_backend(**options)`, returning a base.Backend.
# Every backend takes the options `cache_dir` (the engine cache root) and `workers`
# (how many contexts of a model will run at once; OpenVINO compiles one stream each).
_MODULES = {
    "ort": "diffrt.runtime.backends.ort",
    "openvino": "diffrt.runtime.backends.openvino",
    "tensorrt": "diffrt.runtime.backends.tensorrt",
    "torch": "diffrt.torch_backend",
}
# name -> (the libraries it imports, what to install for them)
_NEEDS = {
    "ort": (("onnxruntime",), "pip install 'diffrt[ort]' (or onnxruntime-gpu for CUDA)"),
    "openvino": (("openvino",), "pip install 'diffrt[openvino]'"),
    "tensorrt": (("tensorrt", "cupy"), "TensorRT 10+ with its libraries and CuPy on an NVIDIA GPU machine: "
                 "pip install 'diffrt[tensorrt]'"),
    "torch": (("torch", "diffusers", "transformers"), "pip install 'diffrt[torch]' (and a torch build for your device)"),
}


def get_backend(name: str, **options) -> Backend:
    if name not in _MODULES:
        raise DiffrtError(f"unknown backend {name!r}; choose one of: {', '.join(_MODULES)}")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        libraries, install = _NEEDS[name]
        if (exc.name or "").split(".")[0] not in libraries:
            raise
        missing = [lib for lib in libraries if importlib.util.find_spec(lib) is None] or [exc.name.split(".")[0]]
        verb = "is" if len(missing) == 1 else "are"
        raise DiffrtError(f"backend {name!r} needs {' and '.join(missing)}, which {verb} not installed here; "
                          f"{install}") from None
    try:
        return module.make_backend(**options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        bad = str(exc).split("argument")[-1].strip()
        raise DiffrtError(f"backend {name!r} has no option {bad}; see `diffrt generate --help` (-O KEY=VALUE)") from None


def backend_names() -> tuple[str, ...]:
    """Every backend this version has (each needs its own library installed)."""
    return tuple(_MODULES)


__all__ = ["Backend", "CompiledModel", "Context", "backend_names", "get_backend"]
