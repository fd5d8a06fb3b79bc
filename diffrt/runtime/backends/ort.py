"""ONNX Runtime backend: the CPU execution provider here; CUDA / TensorRT EPs where
onnxruntime-gpu and a GPU exist (device-resident IOBinding is future work).

Start-up: ORT's graph optimizations (constant folding, fusions, the CPU's blocked
layouts) take most of a session's creation time: 20-37 s for the SD1.5-size UNet
on 2 cores, against 2.9 s to load the graph ORT saved after optimizing it (measured,
benchmarks/README.md "Start-up"). So the first session of a stage saves its optimized
graph to the engine cache, <cache root>/ort/<key>/ (key: the stage's file hashes,
the onnxruntime version, the providers, the CPU model and flags, since the saved
layouts are specific to the CPU), and later sessions load that with optimizations
off. A damaged entry is rebuilt; an unwritable cache root only costs the speed-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffrt.artifacts import StageSpec
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime.cpu import cpu_info
from diffrt.runtime.engine_cache import EngineCache, cache_key

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
OPTIMIZED_NAME = "model.onnx"
OPTIMIZED_DATA_NAME = "model.onnx.data"
# Bump when what open() asks ORT to do when optimizing changes: old entries then differ.
RECIPE = 1


class OrtSession:
    """One stage on one onnxruntime InferenceSession."""

    def __init__(self, path: Path, spec: StageSpec, providers: Sequence[str], options: ort.SessionOptions):
        self.spec = spec
        try:
            self._session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for corrupt graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{path} cannot be loaded by onnxruntime ({first}); re-export the model") from None
        self._output_names = [t.name for t in spec.outputs]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        arrays = {}
        for tensor in self.spec.inputs:
            if tensor.name not in feeds:
                raise DiffrtError(f"stage {self.spec.name}: input {tensor.name!r} was not fed")
            arrays[tensor.name] = np.ascontiguousarray(feeds[tensor.name], dtype=_NUMPY_DTYPES[tensor.dtype])
        outputs = self._session.run(self._output_names, arrays)
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> OrtSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared_arena_registered = False


def _use_shared_cpu_arena(options: ort.SessionOptions) -> None:
    """All sessions of the process draw CPU memory from ONE registered arena.

    With one arena per session (the default) each session keeps its own high-water
    mark, so the UNet's and the VAE decoder's peaks add up. benchmarks/real_size_sd15.py
    at 768x768 on SD1.5 measured a process peak of 18.3 GiB with per-session arenas
    and 14.9 GiB with the shared one, at about the same speed (benchmarks/README.md).
    """
    global _shared_arena_registered
    if not _shared_arena_registered:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _shared_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


class OrtBackend:
    """`graph_precisions`: fp32 first on the CPU (its EP has fp16 kernels only for data
    movement: fp16 graphs run, but through inserted Casts around fp32 kernels), fp16
    first with a GPU provider; never bf16 (no kernels). It prefers the fused-attention
    graph: one MultiHeadAttention kernel instead of materialized score tensors
    (benchmarks/attention_fusion.py measures the memory and speed)."""

    name = "ort"
    fused_attention = True
    fuses_attention_itself = False

    def __init__(self, providers: Sequence[str] | None = None, intra_op_num_threads: int = 0,
                 cache_dir: str | Path | None = None, disk_cache: bool = True):
        """`cache_dir`: the engine cache root (default: the artifact's engines/);
        `disk_cache=False` optimizes the graphs at every start instead."""
        available = ort.get_available_providers()
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise DiffrtError(f"onnxruntime has no {', '.join(missing)} here; available: {', '.join(available)}")
        self.intra_op_num_threads = intra_op_num_threads
        self.cache_dir = cache_dir
        self.disk_cache = bool(disk_cache)
        self._caches: dict[Path, EngineCache] = {}  # one per root, so "not writable" is said once
        on_gpu = any(p in self.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
        self.graph_precisions = ("fp16", "fp32") if on_gpu else ("fp32", "fp16")

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> OrtSession:
        # ORT runs every shape of the dynamic graph; it needs no profile.
        folder = Path(folder)
        graph = folder / spec.graph_path
        cache = self._cache(folder)
        if cache is None:
            return OrtSession(graph, spec, self.providers, self._options())
        fields = self.cache_fields(spec)
        key = cache_key(fields)
        entry = cache.lookup(key, fields)
        if entry is not None:
            try:
                return OrtSession(entry / OPTIMIZED_NAME, spec, self.providers, self._options(optimize=False))
            except ArtifactError as exc:
                cache.discard(key, str(exc))
        sessions = []

        def optimize_into(tmp: Path) -> None:
            options = self._options()
            options.optimized_model_filepath = str(tmp / OPTIMIZED_NAME)
            if len(spec.files) > 1:  # weights over protobuf's 2 GB limit: one data file again
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 OPTIMIZED_DATA_NAME)
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")
            sessions.append(OrtSession(graph, spec, self.providers, options))

        cache.publish(key, fields, optimize_into)
        return sessions[0] if sessions else OrtSession(graph, spec, self.providers, self._options())

    def cache_fields(self, spec: StageSpec) -> dict[str, Any]:
        """Everything the saved optimized graph depends on."""
        cpu = cpu_info()
        return {"stage": spec.name, "files": [f.sha256 for f in spec.files], "onnxruntime": ort.__version__,
                "providers": list(self.providers), "cpu": cpu.model, "cpu_flags": sorted(cpu.flags),
                "machine": cpu.machine, "recipe": RECIPE}

    def _options(self, optimize: bool = True) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                             else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.intra_op_num_threads = self.intra_op_num_threads  # 0: one per physical core
        options.log_severity_level = 3
        _use_shared_cpu_arena(options)
        return options

    def _cache(self, folder: Path) -> EngineCache | None:
        if not self.disk_cache:
            return None
        root = Path(self.cache_dir) if self.cache_dir is not None else folder / "engines"
        if root not in self._caches:
            self._caches[root] = EngineCache(root, self.name)
        return self._caches[root]

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({', '.join(self.providers)})"


def make_backend(**options: Any) -> OrtBackend:
    return OrtBackend(**options)
