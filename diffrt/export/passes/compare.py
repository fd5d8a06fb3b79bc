"""Check a transformed stage graph against the graph it came from: run both on the same
inputs with the same runtime and report the largest difference.

Runtimes:
- "ort": ONNX Runtime's CPU EP: fp32, fused-attention and fp16 graphs (see below).
- "openvino": OpenVINO's CPU plugin reads fp16 and bf16 ONNX graphs. `precision`
  sets its INFERENCE_PRECISION_HINT. At "f32" (the default) OpenVINO converts the
  whole graph to f32: half weights are decompressed and the activation Casts to half
  are removed (measured: x -> Cast(fp16) -> x*x -> Cast(fp32) returns 1.000246e6,
  which fp16 cannot hold). So this measures the error of the half WEIGHTS only.
  At "bf16"/"f16" it computes in its own reduced precision (where the CPU has it).
- "reference": onnx.reference.ReferenceEvaluator, numpy, one op at a time; fp16 and
  bf16 (ml_dtypes) tensors are rounded after every op, so this measures the half
  graph as written (weights and activations). Slow: for tiny test models only.

ONNX Runtime's CPU EP runs fp16 graphs by falling back to fp32 (it inserts Casts)
for the ops it has no fp16 kernel for; bf16 graphs fail to load (no bf16 kernels
for Gemm, Conv, Add, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffrt.errors import DiffrtError
from diffrt.export.onnx_graph import GRAPH_NAME

logger = logging.getLogger(__name__)

RUNTIMES = ("ort", "openvino", "reference")


@dataclass(frozen=True)
class Comparison:
    """Candidate vs reference outputs on the same feeds."""

    max_abs_error: float
    """Largest |candidate - reference| over all outputs."""
    max_abs_reference: float
    """Largest |reference| over all outputs (the scale the error is relative to)."""
    errors: tuple[tuple[str, float], ...]
    """(output name, max abs error) per output."""


def compare_graphs(
    reference_folder: str | os.PathLike,
    candidate_folder: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    runtime: str = "ort",
    precision: str = "f32",
) -> Comparison:
    """Run both stage folders' graphs on `feeds` with `runtime` and compare outputs."""
    if runtime not in RUNTIMES:
        raise DiffrtError(f"runtime={runtime!r} is not supported here; use one of: {', '.join(RUNTIMES)}")
    reference = run_graph(reference_folder, feeds, runtime, precision)
    candidate = run_graph(candidate_folder, feeds, runtime, precision)
    errors, scale = [], 0.0
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            raise RuntimeError(f"{candidate_folder}: output {name} is {None if got is None else got.shape}, "
                               f"the reference's is {ref.shape}")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        errors.append((name, float(diff.max()) if diff.size else 0.0))
        scale = max(scale, float(np.abs(ref).max()) if ref.size else 0.0)
    return Comparison(max_abs_error=max((e for _, e in errors), default=0.0), max_abs_reference=scale,
                      errors=tuple(errors))


def run_graph(folder: str | os.PathLike, feeds: Mapping[str, np.ndarray], runtime: str = "ort",
              precision: str = "f32") -> dict[str, np.ndarray]:
    """Outputs of the stage folder's graph on `feeds`, by output name."""
    graph = Path(folder) / GRAPH_NAME
    if not graph.is_file():
        raise DiffrtError(f"{graph} is missing; pass a stage folder that holds {GRAPH_NAME}")
    if runtime == "ort":
        return _run_ort(graph, feeds)
    if runtime == "openvino":
        return _run_openvino(graph, feeds, precision)
    if runtime == "reference":
        return _run_reference(graph, feeds)
    raise DiffrtError(f"runtime={runtime!r} is not supported here; use one of: {', '.join(RUNTIMES)}")


def _run_ort(graph: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(f"onnxruntime cannot load {graph}: {first}") from None
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def _run_openvino(graph: Path, feeds: Mapping[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    import openvino

    core = openvino.Core()
    model = core.read_model(str(graph))
    # The graph's own output names, read before compiling: a compiled output port may
    # carry several names (on CPUs with bf16, the plugin merges the tensor feeding
    # `pooler_output` with it), and get_any_name() would then pick either.
    names = [_graph_output_name(port) for port in model.outputs]
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    results = compiled(dict(feeds))
    return {name: np.asarray(results[compiled.output(i)]) for i, name in enumerate(names)}


def _graph_output_name(port) -> str:
    names = port.get_names()
    if len(names) != 1:
        raise RuntimeError(f"an OpenVINO model output read from ONNX has names {sorted(names)}, expected one")
    return next(iter(names))


def _run_reference(graph: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(graph))
    return dict(zip(evaluator.output_names, evaluator.run(None, dict(feeds)), strict=True))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images on the [0, 1] scale (inf if equal)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr of arrays with shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * float(np.log10(1.0 / mse))
