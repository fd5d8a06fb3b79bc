"""TensorRT engines at run time: how a built engine is found, keyed and checked.

The engines themselves are built ahead of time by `diffrt build OUT --backend tensorrt`
(diffrt/build/tensorrt.py); the tensorrt backend (runtime/backends/tensorrt.py) finds
them here. An engine lives in the engine cache, OUT/engines/tensorrt/<key>/
(engine.plan, profile.json, meta.json); the key covers the stage's file hashes, the
profile, the precision, the TensorRT version, the GPU's name and compute capability,
the optimization level, refittability, the workspace limit and RECIPE, so an engine is
never used on another GPU or TensorRT version. Everything here is pure (no TensorRT, no
GPU) except `trt_logger` and is tested on the CPU (tests/test_tensorrt.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffrt.artifacts import StageSpec
from diffrt.errors import DiffrtError
from diffrt.runtime.engine_cache import META_NAME, EngineCache, cache_key
from diffrt.runtime.gpu import GpuInfo, gpu_info

logger = logging.getLogger(__name__)

BACKEND = "tensorrt"
ENGINE_NAME = "engine.plan"
PROFILE_NAME = "profile.json"
GRAPH_PRECISIONS = ("fp16", "bf16", "fp32")  # the backend's preference, too
DEFAULT_OPT_LEVEL = 3
OPT_LEVELS = range(0, 6)
# Bump when what build_engine asks TensorRT to do changes: old engines then differ.
RECIPE = 1
@dataclass(frozen=True)
class InputRange:
    """One input's min/opt/max shape; `dims` is the stage spec's (ints and names)."""

    name: str
    dims: tuple[int | str, ...]
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def describe(self) -> str:
        return "[" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in zip(self.min, self.max, strict=True)) + "]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dims": list(self.dims), "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputRange:
        return cls(data["name"], tuple(data["dims"]), tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


@dataclass(frozen=True)
class StageProfile:
    """The optimization profile of one stage's engine."""

    stage: str
    role: str
    inputs: tuple[InputRange, ...]

    @property
    def static(self) -> bool:
        return all(i.min == i.max for i in self.inputs)

    def describe(self) -> str:
        return "; ".join(f"{i.name} {i.describe()}" for i in self.inputs)

    def problem(self, shapes: Mapping[str, Sequence[int]]) -> str:
        """Why these input shapes are outside the profile ('' when they are inside)."""
        for rng in self.inputs:
            shape = shapes.get(rng.name)
            if shape is None:
                continue
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(rng.min) or any(not a <= d <= b for d, a, b in zip(shape, rng.min, rng.max,
                                                                                  strict=False)):
                return f"{rng.name} shape {list(shape)} is outside the built range {rng.describe()}"
        return ""

    def covers(self, dims: Mapping[str, int]) -> bool:
        """Whether the named dims (a backend `profile`, e.g. {"batch": 2}) are inside."""
        for rng in self.inputs:
            for name, lo, hi in zip(rng.dims, rng.min, rng.max, strict=True):
                if isinstance(name, str) and name in dims and not lo <= int(dims[name]) <= hi:
                    return False
        return True

    def span(self) -> int:
        return sum(b - a for i in self.inputs for a, b in zip(i.min, i.max, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "role": self.role, "inputs": [i.to_json() for i in self.inputs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageProfile:
        return cls(data["stage"], data["role"], tuple(InputRange.from_json(i) for i in data["inputs"]))


def check_shapes(engine: str, profile: StageProfile, shapes: Mapping[str, Sequence[int]]) -> None:
    """A one-line error when `shapes` are outside the engine's profile (checked before
    set_input_shape, which would only return False)."""
    problem = profile.problem(shapes)
    if problem:
        raise DiffrtError(f"TensorRT engine {engine} (stage {profile.stage}): {problem}; build an engine that "
                          "covers it: diffrt build OUT --backend tensorrt --batch LO-HI --size WxH "
                          "(or --min-size/--max-size; --text-chunks N for weighted prompts of N x 75 tokens)")


@dataclass(frozen=True)
class BuildOptions:
    opt_level: int = DEFAULT_OPT_LEVEL
    """builder_optimization_level, 0-5: higher searches longer for faster kernels."""
    refit: bool = False
    """BuilderFlag.REFIT: weights can be replaced later (LoRA) without a rebuild."""
    workspace_gib: float | None = None
    """The workspace memory pool limit; None: TensorRT's default (the GPU's memory)."""

    def __post_init__(self) -> None:
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int) or self.opt_level not in OPT_LEVELS:
            raise DiffrtError(f"--opt-level {self.opt_level!r}: use an integer from 0 to 5 (default 3)")
        if self.workspace_gib is not None and not (isinstance(self.workspace_gib, (int, float))
                                                   and 0 < self.workspace_gib < 1 << 20):
            raise DiffrtError(f"--workspace-gib {self.workspace_gib!r}: use a positive number of GiB")

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gib is None else int(self.workspace_gib * 2**30)


def runtime_fields(spec: StageSpec, trt_version: str, gpu: GpuInfo) -> dict[str, Any]:
    """What an engine must match to be used for `spec` here."""
    return {"stage": spec.name, "files": [f.sha256 for f in spec.files], "precision": spec.precision,
            "tensorrt": trt_version, "gpu": gpu.name, "compute_capability": gpu.compute_capability}


def engine_fields(spec: StageSpec, profile: StageProfile, trt_version: str, gpu: GpuInfo,
                  options: BuildOptions) -> dict[str, Any]:
    """Everything that changes the built engine (cache_key hashes it)."""
    return {**runtime_fields(spec, trt_version, gpu), "recipe": RECIPE, "profile": profile.to_json()["inputs"],
            "builder_optimization_level": options.opt_level, "refit": options.refit,
            "workspace_bytes": options.workspace_bytes}


def engine_key(spec: StageSpec, profile: StageProfile, trt_version: str, gpu: GpuInfo, options: BuildOptions) -> str:
    return cache_key(engine_fields(spec, profile, trt_version, gpu, options))


@dataclass(frozen=True)
class BuiltEngine:
    path: Path  # the entry folder
    profile: StageProfile

    @property
    def plan(self) -> Path:
        """The serialized engine."""
        return self.path / ENGINE_NAME


def find_engines(cache: EngineCache, spec: StageSpec, trt_version: str, gpu: GpuInfo) -> list[BuiltEngine]:
    """Every complete engine in the cache built for this stage, TensorRT and GPU."""
    wanted = runtime_fields(spec, trt_version, gpu)
    found = []
    try:
        entries = sorted(p for p in cache.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for entry in entries:
        try:
            fields = json.loads((entry / META_NAME).read_text(encoding="utf-8"))["fields"]
            if any(fields.get(k) != v for k, v in wanted.items()):
                continue
            profile = StageProfile.from_json(json.loads((entry / PROFILE_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another backend version's or a damaged entry: not ours to judge here
        if cache.lookup(entry.name, fields) is not None:  # checks sizes; removes a damaged entry
            found.append(BuiltEngine(entry, profile))
    return found


def choose_engine(engines: Sequence[BuiltEngine], dims: Mapping[str, int] | None) -> BuiltEngine | None:
    """The engine whose profile covers `dims` with the narrowest range (a static engine
    for exactly this shape wins), or None."""
    covering = [e for e in engines if dims is None or e.profile.covers(dims)]
    return min(covering, key=lambda e: e.profile.span()) if covering else None


# -- building (TensorRT and a GPU) ---------------------------------------------------------

def require_tensorrt():
    """The tensorrt module, or the one-line error saying what to install."""
    from diffrt.runtime.backends import _NEEDS

    install = _NEEDS[BACKEND][1]
    try:
        import cupy  # noqa: F401
        import tensorrt
    except ImportError as exc:
        what = exc.name or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DiffrtError(f"building TensorRT engines needs {what}, which cannot be imported here; {install}") from None
    return tensorrt


def trt_logger(trt):
    """A TensorRT logger that sends its messages to Python logging; it keeps the
    last error, for the error a failed build raises."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last_error = ""

        def clear(self) -> None:
            """Forget the last error, before a call whose failure reports `why()`: an
            error TensorRT logged and recovered from earlier (a foreign timing cache) is
            not the cause of a later failure."""
            self.last_error = ""

        def why(self, default: str = "see the log") -> str:
            """The error TensorRT logged since `clear()`, or `default`."""
            return self.last_error or default

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.last_error = " ".join(str(msg).split())
                logger.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                logger.warning("TensorRT: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return _Logger()



__all__ = ["BACKEND", "BuildOptions", "BuiltEngine", "check_shapes", "choose_engine", "DEFAULT_OPT_LEVEL", "engine_fields", "engine_key", "ENGINE_NAME", "find_engines", "gpu_info", "GpuInfo", "GRAPH_PRECISIONS", "InputRange", "OPT_LEVELS", "PROFILE_NAME", "RECIPE", "require_tensorrt", "runtime_fields", "StageProfile", "trt_logger"]
