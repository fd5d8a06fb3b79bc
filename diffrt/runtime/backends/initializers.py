"""The initializers of a stage's ONNX graph, read without the `onnx` package, and the
check of an `update_weights` call against them.

ONNX Runtime takes replacement initializers by name without checking them (an
unknown name is ignored, a wrong shape fails later inside a kernel, a wrong dtype
when the session starts), so every backend checks the new values here first, against
the graph file the stage was exported as: name, shape and dtype.

The graph is read as protobuf wire format (ModelProto.graph = field 7,
GraphProto.initializer = field 5; TensorProto dims = 1, data_type = 2, name = 8; see
onnx/onnx.proto3). Weights stored inside the graph are skipped, not copied: the file
is memory-mapped and only the fields named above are decoded.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.errors import ArtifactError, DiffrtError

# TensorProto.DataType (onnx.proto3) -> the name diffrt uses
ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
              10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
# how their values are stored as bytes (bfloat16: its bit patterns)
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64,
          "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
          "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_}
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 1, 2, 8, 9, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Initializer:
    name: str
    shape: tuple[int, ...]
    dtype: str
    raw: tuple[int, int] | None = field(default=None, compare=False, repr=False)  # raw_data's bytes in the file
    external: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)  # location, offset, length


def read_initializers(path: Path) -> dict[str, Initializer]:
    """Every initializer of the graph's main graph, by name."""
    return _read(path, lambda view, init: init)


def read_values(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The values of the named initializers, as stored: in the graph (raw_data) or in
    the external data file beside it (location, offset, length). bfloat16 values come
    as their uint16 bit patterns."""
    wanted = set(names)

    def value(view: memoryview, init: Initializer) -> np.ndarray | None:
        if init.name not in wanted:
            return None
        dtype = np.dtype(_NUMPY[init.dtype])
        count = int(np.prod(init.shape, dtype=np.int64))
        if init.raw is not None:
            return np.frombuffer(bytes(view[init.raw[0]:init.raw[1]]), dtype, count).reshape(init.shape)
        entries = dict(init.external)
        if "location" not in entries:
            raise ValueError(f"initializer {init.name!r} keeps its values in neither raw_data nor external data")
        data = (path.parent / entries["location"]).resolve()
        if path.parent.resolve() not in data.parents:
            raise ValueError(f"initializer {init.name!r} names data outside the graph's folder")
        with open(data, "rb") as f:
            f.seek(int(entries.get("offset", 0)))
            return np.frombuffer(f.read(count * dtype.itemsize), dtype, count).reshape(init.shape)

    found = _read(path, value)
    missing = wanted - {name for name, array in found.items() if array is not None}
    if missing:
        raise ArtifactError(f"{path}: no initializer {sorted(missing)[0]!r}; re-export the model")
    return {name: found[name] for name in names}


def _read(path: Path, visit: Callable[[memoryview, Initializer], Any]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            view = memoryview(data)
            try:
                graph = next((value for number, value in _fields(view, 0, len(view)) if number == _MODEL_GRAPH), None)
                if graph is None:
                    raise ValueError("no graph")
                found = {}
                for number, span in _fields(view, *graph):
                    if number == _GRAPH_INITIALIZER:
                        init = _tensor(view, *span)
                        found[init.name] = visit(view, init)
            finally:
                view.release()
    except (OSError, ValueError, IndexError, KeyError) as exc:
        raise ArtifactError(f"{path}: cannot read its initializers ({exc}); re-export the model") from None
    return found


def check_weights(stage: str, table: Mapping[str, Initializer], weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`weights` as C-contiguous arrays once each name is an initializer of the graph
    and each array has its shape and dtype (bfloat16: an ml_dtypes.bfloat16 array or
    its uint16 bit patterns); else a one-line error naming the first that is not."""
    if not weights:
        raise DiffrtError(f"stage {stage}: update_weights was given no weights")
    checked = {}
    for name, value in weights.items():
        init = table.get(name)
        if init is None:
            raise DiffrtError(f"stage {stage}: its graph has no initializer {name!r}; name initializers as in the "
                              "graph (a parameter's are listed in the stage's weight_map.json, see diffrt.weights)")
        array = np.asarray(value)
        if tuple(array.shape) != init.shape:
            raise DiffrtError(f"stage {stage}: initializer {name!r} is {list(init.shape)}, the new value "
                              f"{list(array.shape)}")
        if not _same_dtype(array.dtype, init.dtype):
            raise DiffrtError(f"stage {stage}: initializer {name!r} is {init.dtype}, the new value {array.dtype}; "
                              f"cast it to {init.dtype} first")
        checked[name] = np.ascontiguousarray(array)
    return checked


def _same_dtype(dtype: np.dtype, onnx_dtype: str) -> bool:
    if onnx_dtype == "bfloat16":
        return dtype.name in ("bfloat16", "uint16")
    return dtype.name == onnx_dtype


def _tensor(view: memoryview, start: int, end: int) -> Initializer:
    dims: list[int] = []
    dtype, name, raw, external = 0, "", None, []
    for number, value in _fields(view, start, end, packed={_TENSOR_DIMS}):
        if number == _TENSOR_DIMS:
            dims.extend(value)
        elif number == _TENSOR_TYPE:
            dtype = value
        elif number == _TENSOR_NAME:
            name = _text(view, value)
        elif number == _TENSOR_RAW:
            raw = value
        elif number == _TENSOR_EXTERNAL:
            entry = dict(_fields(view, *value))
            external.append((_text(view, entry.get(_ENTRY_KEY, (0, 0))), _text(view, entry.get(_ENTRY_VALUE, (0, 0)))))
    return Initializer(name, tuple(dims), ONNX_TYPES.get(dtype, f"onnx type {dtype}"), raw, tuple(external))


def _text(view: memoryview, span: tuple[int, int]) -> str:
    return bytes(view[span[0]:span[1]]).decode("utf-8")


def _fields(view: memoryview, start: int, end: int, packed: frozenset[int] | set[int] = frozenset()):
    """(field number, value) of a message's fields in view[start:end]: an int for a
    varint, (start, end) of the bytes for a length-delimited field, a list of ints for
    the `packed` repeated varint fields (and for those fields written unpacked)."""
    pos = start
    while pos < end:
        tag, pos = _varint(view, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(view, pos)
            yield number, ([_signed(value)] if number in packed else value)
        elif wire == _LEN:
            size, pos = _varint(view, pos)
            if number in packed:
                values, inner = [], pos
                while inner < pos + size:
                    value, inner = _varint(view, inner)
                    values.append(_signed(value))
                yield number, values
            else:
                yield number, (pos, pos + size)
            pos += size
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError("a field runs past the end of its message")


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"a varint longer than 10 bytes at byte {pos}")


def _signed(value: int) -> int:
    """int64 fields are two's complement in a varint."""
    return value - (1 << 64) if value >= 1 << 63 else value
