"""torch module -> ONNX file(s) for one stage, and the check of that file against torch.

Uses the TorchScript-based exporter (`dynamo=False`): it handles diffusers' UNet and
VAE with dynamic batch/height/width reliably on torch 2.4-2.13. (The torch.export-based
exporter is the future default; switching is a change confined to `export_graph`.)
Graphs over 2 GB are re-saved with all weights in one external-data file beside the
graph (`model.onnx.data`), which every ONNX consumer (ORT, OpenVINO, TensorRT) reads.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from diffrt.artifacts import StageSpec

logger = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx.data"
# protobuf cannot serialize a message over 2 GiB; stay clear of the limit.
_PROTOBUF_LIMIT = 2**31 - 2**26


def _dynamic_axes(spec: StageSpec) -> dict[str, dict[int, str]]:
    axes = {}
    for tensor in spec.inputs + spec.outputs:
        named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
        if named:
            axes[tensor.name] = named
    return axes


def export_graph(module: torch.nn.Module, sample: Sequence[torch.Tensor], spec: StageSpec, stage_dir: Path, opset: int) -> list[Path]:
    """Export `module(*sample)` to stage_dir/model.onnx (+ external data when large).

    Returns the written files, graph first.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=stage_dir, prefix=".export-") as tmp:
        raw = Path(tmp) / GRAPH_NAME
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python-level shape branch; those are checked
            # by running the graph at a second shape in `check_graph`.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(sample),
                str(raw),
                dynamo=False,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=_dynamic_axes(spec),
                opset_version=opset,
                do_constant_folding=True,
            )
        # Re-save: one self-contained file, or graph + one external-data file.
        model = onnx.load(str(raw), load_external_data=True)
        weights = sum(t.ByteSize() for t in model.graph.initializer)
        graph = stage_dir / GRAPH_NAME
        if weights > _PROTOBUF_LIMIT:
            onnx.save_model(
                model,
                str(graph),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_NAME,
                size_threshold=1024,
            )
            files = [graph, stage_dir / EXTERNAL_DATA_NAME]
        else:
            onnx.save_model(model, str(graph))
            files = [graph]
        del model
    leftovers = [p for p in stage_dir.iterdir() if p not in files]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return files


def check_graph(
    graph: Path,
    module: torch.nn.Module,
    sample: Mapping[str, torch.Tensor],
    spec: StageSpec,
) -> tuple[float, float]:
    """Run the exported graph with onnxruntime and torch on the same input.

    Returns (max abs difference, max abs torch output) over all outputs. `sample`
    should differ in shape from the traced one, so the dynamic axes are exercised."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    feeds = {name: t.detach().cpu().numpy() for name, t in sample.items()}
    got = session.run([t.name for t in spec.outputs], feeds)
    with torch.no_grad():
        want = module(*[sample[t.name] for t in spec.inputs])
    if isinstance(want, torch.Tensor):
        want = (want,)
    error = scale = 0.0
    for name, ours, ref in zip([t.name for t in spec.outputs], got, want, strict=True):
        ref = ref.detach().float().cpu().numpy()
        if ours.shape != ref.shape:
            raise RuntimeError(f"{graph}: output {name} has shape {ours.shape}, torch gives {ref.shape}")
        if ref.size:
            error = max(error, float(np.max(np.abs(ours.astype(np.float64) - ref))))
            scale = max(scale, float(np.max(np.abs(ref))))
    del session
    return error, scale
