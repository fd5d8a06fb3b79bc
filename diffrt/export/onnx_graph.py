"""torch module -> ONNX file(s) for one stage, and the check of that file against torch.

Uses the TorchScript-based exporter (`dynamo=False`): it handles diffusers' UNet and
VAE with dynamic batch/height/width reliably on torch 2.4-2.13. (The torch.export-based
exporter is the future default; switching is a change confined to `export_graph`.)
Graphs over 2 GB are re-saved with all weights in one external-data file beside the
graph (`model.onnx.data`), which every ONNX consumer (ORT, OpenVINO, TensorRT) reads.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from diffrt.artifacts import StageSpec

if TYPE_CHECKING:  # torch is imported where it is used: the graph passes share this module
    import torch

logger = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx.data"
# protobuf cannot serialize a message over 2 GiB; stay clear of the limit.
_PROTOBUF_LIMIT = 2**31 - 2**26
_INLINE_LIMIT = 1024  # tensors smaller than this stay in the graph file
_ALIGNMENT = 4096


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
    import torch

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
        graph = stage_dir / GRAPH_NAME
        model = onnx.load(str(raw), load_external_data=False)  # the graph only, not the weights
        weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
        if weights > _PROTOBUF_LIMIT or any(uses_external_data(t) for t in model.graph.initializer):
            _write_with_external_data(model, raw.parent, graph, stage_dir / EXTERNAL_DATA_NAME)
            files = [graph, stage_dir / EXTERNAL_DATA_NAME]
        else:
            os.replace(raw, graph)
            files = [graph]
        del model
    return files


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if uses_external_data(tensor):
        return int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    return len(tensor.raw_data)


def _write_with_external_data(model: onnx.ModelProto, base: Path, graph: Path, data: Path) -> None:
    """Save `model` as graph + ONE external-data file, streaming the weights.

    torch writes a graph over 2 GB as one file per tensor; gathering them with
    onnx.load(load_external_data=True) would hold a second copy of every weight in
    memory (3.2 GiB for an SD1.5 UNet, ~10 GiB for SDXL's). Here each tensor is
    copied file-to-file in chunks and its external_data entry rewritten. Offsets are
    aligned to 4 KiB so runtimes can mmap the weights. Each of torch's files is deleted
    once the last tensor it holds is copied, so the disk holds the weights about once,
    not twice (an SD3.5-medium transformer: 9.9 GB, not 19.8, at the end of its export).
    """
    readers: dict[str, int] = {}  # torch's file -> tensors still to read from it
    constants = _attribute_tensors(model.graph)
    for tensor in [*model.graph.initializer, *constants]:
        if uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}["location"]
            readers[location] = readers.get(location, 0) + 1

    def done_with(location: str) -> None:
        readers[location] -= 1
        if not readers[location]:
            (base / location).unlink()

    for tensor in constants:  # a node's value goes back into the graph: the passes read attributes inline
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            with open(base / info["location"], "rb") as source:
                source.seek(int(info.get("offset", 0)))
                tensor.raw_data = source.read(int(info["length"])) if "length" in info else source.read()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            done_with(info["location"])
    with open(data, "wb") as sink:
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                info = {e.key: e.value for e in tensor.external_data}
                length = int(info["length"]) if "length" in info else None
                payload = None
            elif len(tensor.raw_data) >= _INLINE_LIMIT:
                payload, length = tensor.raw_data, len(tensor.raw_data)
            else:
                continue  # small tensors stay inside the graph
            sink.write(b"\0" * (-sink.tell() % _ALIGNMENT))
            offset = sink.tell()
            if payload is not None:
                sink.write(payload)
                tensor.ClearField("raw_data")
            else:
                with open(base / info["location"], "rb") as source:
                    source.seek(int(info.get("offset", 0)))
                    copied = _copy_stream(source, sink, length)
                length = copied
                done_with(info["location"])
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(graph))


def _attribute_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Tensors held in node attributes (a Constant's value): torch writes a large one to
    its own external file too (e.g. a LayerNorm without affine weights gets Constant
    ones and zeros of the hidden width); they go back into the graph file (kilobytes),
    where the graph passes, which move initializers only, leave them be."""
    found = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                found.append(attribute.t)
            elif attribute.type == onnx.AttributeProto.TENSORS:
                found.extend(attribute.tensors)
    return found


def _copy_stream(source, sink, length: int | None, chunk: int = 1 << 24) -> int:
    copied = 0
    while length is None or copied < length:
        block = source.read(chunk if length is None else min(chunk, length - copied))
        if not block:
            break
        sink.write(block)
        copied += len(block)
    if length is not None and copied != length:
        raise RuntimeError(f"external data of {source.name} is truncated: {copied} of {length} bytes")
    return copied


def reference_outputs(module: torch.nn.Module, sample: Mapping[str, torch.Tensor], spec: StageSpec) -> list[np.ndarray]:
    """torch's outputs for `sample`, as float32 numpy arrays in spec.outputs order."""
    import torch

    with torch.no_grad():
        outputs = module(*[sample[t.name] for t in spec.inputs])
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [t.detach().float().cpu().numpy() for t in outputs]


def check_graph(
    graph: Path, feeds: Mapping[str, np.ndarray], reference: Sequence[np.ndarray], spec: StageSpec
) -> tuple[float, float]:
    """Run the exported graph with onnxruntime on `feeds` and compare with torch's
    `reference` outputs (computed beforehand, so the torch module can be freed first).

    Returns (max abs difference, max abs reference value) over all outputs. `feeds`
    should differ in shape from the traced sample, so the dynamic axes are exercised.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    got = session.run([t.name for t in spec.outputs], dict(feeds))
    del session
    error = scale = 0.0
    for tensor, ours, ref in zip(spec.outputs, got, reference, strict=True):
        if ours.shape != ref.shape:
            raise RuntimeError(f"{graph}: output {tensor.name} has shape {ours.shape}, torch gives {ref.shape}")
        if ref.size:
            error = max(error, float(np.max(np.abs(ours.astype(np.float64) - ref))))
            scale = max(scale, float(np.max(np.abs(ref))))
    return error, scale
