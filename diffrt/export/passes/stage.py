"""Read a stage folder's graph and write a new stage folder, streaming the weights.

A stage folder holds `model.onnx` and, when the weights are large, one external-data
file `model.onnx.data` (see diffrt.export.onnx_graph). A graph pass loads the graph
WITHOUT its weights, rewrites nodes, and writes a new folder here: each initializer
is read from the source folder, optionally converted (e.g. fp32 -> fp16), and
written out one tensor at a time, so a pass never holds more than the graph and one
tensor (an SD1.5 UNet is 3.2 GiB of weights, SDXL's 10 GiB).

The new folder is written under a temporary name beside OUT and renamed into place
when complete, like the exporter's artifact folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from diffrt.errors import DiffrtError
from diffrt.export.onnx_graph import (
    _ALIGNMENT,
    _INLINE_LIMIT,
    _PROTOBUF_LIMIT,
    EXTERNAL_DATA_NAME,
    GRAPH_NAME,
    _copy_stream,
)

logger = logging.getLogger(__name__)

# Converts one initializer's values; gets the tensor's name and its fp32 (or other) array.
Convert = Callable[[str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class InitializerChanges:
    """What a pass did to the initializers of the graph it read, so the new stage's
    weight map can follow each torch parameter (diffrt.export.weight_map.derive).
    Initializers not named here are in the new graph as they were."""

    dtype: str = ""
    """The dtype `cast` and `copies` convert to ('float16', 'bfloat16')."""
    cast: tuple[str, ...] = ()
    """Converted in place to `dtype`, same name."""
    copies: tuple[tuple[str, str], ...] = ()
    """(original, copy): a `dtype` copy for the nodes computing in it, beside the
    original, which the others still read unchanged."""
    removed: tuple[str, ...] = ()
    """No longer in the graph: nothing reads them any more."""


def load_graph(stage_dir: str | os.PathLike) -> onnx.ModelProto:
    """The stage's graph with weight references but not the external weights themselves."""
    path = Path(stage_dir) / GRAPH_NAME
    if not path.is_file():
        raise DiffrtError(f"{path} is missing; pass a stage folder that holds {GRAPH_NAME} (e.g. OUT/unet)")
    return onnx.load(str(path), load_external_data=False)


def uses_external(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in model.graph.initializer)


def check_destination(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve():
        raise DiffrtError(f"{out}: a graph pass writes a new stage folder, never in place; choose another folder")
    if out.exists():
        raise DiffrtError(f"{out} already exists; choose a new folder for the pass's output or remove it")


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def read_initializer(tensor: onnx.TensorProto, source: Path) -> np.ndarray:
    """The values of one initializer, reading external data from `source` if needed."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    with open(source / info["location"], "rb") as f:
        values = np.fromfile(f, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if values.size != count:
        raise DiffrtError(f"{source / info['location']} is truncated at tensor {tensor.name}; re-export the stage")
    return values.reshape(tuple(tensor.dims))


def write_stage(
    model: onnx.ModelProto,
    source: Path,
    out: Path,
    convert: Mapping[str, Convert] | None = None,
) -> list[Path]:
    """Write `model` (graph-only, weights still in `source`) as the stage folder `out`.

    `convert` maps initializer names to a function giving their new values (dtype may
    change; the TensorProto's data_type follows). Weights go to one external-data file
    when the source had one (or when they would pass protobuf's limit), else inline.
    Returns the written files, graph first.
    """
    convert = convert or {}
    check_destination(source, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        external = uses_external(model) or _inline_bytes(model) > _PROTOBUF_LIMIT
        if external:
            with open(staging / EXTERNAL_DATA_NAME, "wb") as sink:
                for tensor in model.graph.initializer:
                    _write_external(tensor, source, sink, convert.get(tensor.name))
        else:
            for tensor in model.graph.initializer:
                if tensor.name in convert:
                    _set_values(tensor, convert[tensor.name](tensor.name, numpy_helper.to_array(tensor)))
        onnx.save_model(model, str(staging / GRAPH_NAME))
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [out / GRAPH_NAME]
    if external:
        files.append(out / EXTERNAL_DATA_NAME)
    return files


def _inline_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer if not uses_external_data(t))


def _set_values(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Replace a tensor's values (inline), keeping its name and dims."""
    values = np.asarray(values, order="C")  # (ascontiguousarray would make scalars 1-d)
    _clear_values(tensor, values)
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = values.tobytes()


def _clear_values(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Drop a tensor's stored values and take the dtype of `values` (same shape)."""
    if tuple(values.shape) != tuple(tensor.dims):
        raise ValueError(f"{tensor.name}: converted shape {values.shape} != {tuple(tensor.dims)}")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data", "raw_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)


def _write_external(tensor: onnx.TensorProto, source: Path, sink, convert: Convert | None) -> None:
    """Move one tensor's bytes into `sink` (aligned), converting if asked; small
    tensors stay inline in the graph."""
    if convert is None and uses_external_data(tensor):
        info = external_info(tensor)
        length = int(info["length"]) if "length" in info else None
        offset = _align(sink)
        with open(source / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = _copy_stream(f, sink, length)
        _point_to(tensor, offset, length)
        return
    values = read_initializer(tensor, source)
    if convert is not None:
        values = np.asarray(convert(tensor.name, values), order="C")
    if values.nbytes < _INLINE_LIMIT:
        _set_values(tensor, values)
        return
    offset = _align(sink)
    sink.write(values.tobytes())
    _clear_values(tensor, values)
    _point_to(tensor, offset, values.nbytes)


def _align(sink) -> int:
    sink.write(b"\0" * (-sink.tell() % _ALIGNMENT))
    return sink.tell()


def _point_to(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
