"""ONNX Runtime backend: the CPU execution provider here; CUDA / TensorRT EPs where
onnxruntime-gpu and a GPU exist (device-resident IOBinding is future work)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffrt.artifacts import StageSpec
from diffrt.errors import ArtifactError, DiffrtError

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


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

    def __init__(self, providers: Sequence[str] | None = None, intra_op_num_threads: int = 0,
                 cache_dir: str | Path | None = None):
        available = ort.get_available_providers()
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise DiffrtError(f"onnxruntime has no {', '.join(missing)} here; available: {', '.join(available)}")
        self.intra_op_num_threads = intra_op_num_threads
        self.cache_dir = cache_dir
        on_gpu = any(p in self.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
        self.graph_precisions = ("fp16", "fp32") if on_gpu else ("fp32", "fp16")

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> OrtSession:
        # ORT runs every shape of the dynamic graph; it needs no profile.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.intra_op_num_threads  # 0: one per physical core
        options.log_severity_level = 3
        _use_shared_cpu_arena(options)
        return OrtSession(Path(folder) / spec.graph_path, spec, self.providers, options)

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({', '.join(self.providers)})"


def make_backend(**options: Any) -> OrtBackend:
    return OrtBackend(**options)
