"""Small helpers shared by the graph passes: who produces and who consumes a tensor,
dead-node removal, attribute access, and an evaluator for the little shape
expressions the TorchScript exporter leaves in a graph (e.g. `sqrt(1/sqrt(head_dim))`
computed from `Shape`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data


class GraphIndex:
    """Producer and consumers of every tensor of a graph (built once; rebuild after edits)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node producing `name` if it is an `op_type`, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node reading `name` (None if several, none, or a graph output)."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the outer scope (a superset)."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_inputs(inner)
    return names


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes and initializers that no graph output depends on; returns nodes removed.

    Relies on the node list being topologically sorted, as ONNX requires.
    """
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= subgraph_inputs(node)
    removed = len(graph.node) - len(keep)
    kept_initializers = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(reversed(keep))
    if len(kept_initializers) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept_initializers)
    return removed


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    return next(o.version for o in model.opset_import if o.domain in (domain, "ai.onnx" if domain == "" else domain))


class CannotEvaluate(Exception):
    """A shape expression depends on something this evaluator does not compute."""


# Shapes of tensors, as ints (static) or names (symbolic dims); None when unknown.
ShapeOf = Callable[[str], "tuple[int | str | None, ...] | None"]


class ShapeExpression:
    """Evaluates the scalar/shape subgraphs around attention with numpy.

    Leaves are initializers (inline ones only), Constant nodes, and `Shape(x)`, whose
    value comes from `shape_of(x)`; symbolic dims are replaced by probe values. A
    result is a constant of the graph when two probes with different values for every
    symbolic dim give the same answer (`constant`).
    """

    _PROBES = ((7, 11, 13, 17, 19, 23, 29, 31), (37, 41, 43, 47, 53, 59, 61, 67))

    def __init__(self, index: GraphIndex, shape_of: ShapeOf):
        self.index = index
        self.shape_of = shape_of

    def constant(self, name: str) -> np.ndarray:
        first, second = (self.evaluate(name, probe) for probe in (0, 1))
        if first.shape != second.shape or not np.array_equal(first, second):
            raise CannotEvaluate(f"{name} depends on dynamic dims")
        return first

    def evaluate(self, name: str, probe: int, symbols: dict | None = None, memo: dict | None = None) -> np.ndarray:
        symbols = {} if symbols is None else symbols
        memo = {} if memo is None else memo
        if name in memo:
            return memo[name]
        if name in self.index.initializers:
            tensor = self.index.initializers[name]
            if uses_external_data(tensor):
                raise CannotEvaluate(f"{name} is stored outside the graph")
            value = numpy_helper.to_array(tensor)
        elif name in self.index.producer:
            node = self.index.producer[name]
            if node.op_type == "Shape":
                value = self._shape(node, probe, symbols)
            elif node.op_type not in _EVALUATED or node.domain not in ("", "ai.onnx"):
                # checked before recursing, so a data tensor fails fast instead of
                # walking the whole network back to its inputs
                raise CannotEvaluate(f"{name} comes from {node.op_type}, not a shape expression")
            else:
                inputs = [self.evaluate(i, probe, symbols, memo) if i else None for i in node.input]
                value = _apply(node, inputs)[list(node.output).index(name)]
        else:
            raise CannotEvaluate(f"{name} is a graph input")
        memo[name] = value
        return value

    def _shape(self, node: onnx.NodeProto, probe: int, symbols: dict) -> np.ndarray:
        start, end = attribute(node, "start", 0), attribute(node, "end", None)
        return self.dims(node.input[0], probe, symbols)[start:end]

    def dims(self, name: str, probe: int, symbols: dict) -> np.ndarray:
        """The shape of tensor `name` in a probe: static dims as they are, symbolic
        dims as the probe's value for that symbol (shared through `symbols`)."""
        shape = self.shape_of(name)
        if shape is None:
            raise CannotEvaluate(f"shape of {name} is unknown")
        dims = []
        for dim in shape:
            if isinstance(dim, int):
                dims.append(dim)
            else:  # a symbol (or an unknown dim: a fresh symbol per occurrence)
                key = dim if dim is not None else object()
                if key not in symbols:
                    table = self._PROBES[probe]
                    symbols[key] = table[len(symbols) % len(table)] + 100 * (len(symbols) // len(table))
                dims.append(symbols[key])
        return np.array(dims, dtype=np.int64)


def _apply(node: onnx.NodeProto, x: list[np.ndarray | None]) -> list[np.ndarray]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise CannotEvaluate(f"{op} of domain {node.domain}")
    if op == "Constant":
        return [_constant_value(node)]
    if op in _UNARY:
        return [np.asarray(_UNARY[op](x[0])).astype(x[0].dtype, copy=False)]
    if op in _BINARY:
        a, b = x
        return [np.asarray(_BINARY[op](a, b)).astype(np.result_type(a, b), copy=False)]
    if op == "Div":
        a, b = x
        if np.issubdtype(a.dtype, np.integer):
            return [(np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(a.dtype)]
        return [a / b]
    if op == "Cast":
        return [x[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))]
    if op == "Gather":
        return [np.take(x[0], x[1], axis=attribute(node, "axis", 0))]
    if op == "Unsqueeze":
        axes = x[1] if len(x) > 1 and x[1] is not None else attribute(node, "axes")
        return [np.expand_dims(x[0], tuple(int(a) for a in np.atleast_1d(axes)))]
    if op == "Squeeze":
        axes = x[1] if len(x) > 1 and x[1] is not None else attribute(node, "axes")
        return [np.squeeze(x[0], None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)))]
    if op == "Concat":
        return [np.concatenate([np.atleast_1d(v) for v in x], axis=attribute(node, "axis"))]
    if op == "Slice":
        return [_slice(x)]
    raise CannotEvaluate(f"{op} is not a shape expression op")


_UNARY: Mapping[str, Callable] = {
    "Identity": lambda a: a, "Sqrt": np.sqrt, "Neg": np.negative, "Reciprocal": np.reciprocal,
    "Floor": np.floor, "Ceil": np.ceil,
}
_BINARY: Mapping[str, Callable] = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power}


_EVALUATED = frozenset({*_UNARY, *_BINARY, "Constant", "Div", "Cast", "Gather", "Unsqueeze", "Squeeze", "Concat",
                        "Slice"})


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(attr))
        if attr.name in ("value_floats", "value_ints"):
            return np.array(list(onnx.helper.get_attribute_value(attr)))
    raise CannotEvaluate(f"Constant {node.name} has no value this evaluator reads")


def _slice(x: list[np.ndarray | None]) -> np.ndarray:
    data, starts, ends = x[0], x[1], x[2]
    axes = x[3] if len(x) > 3 and x[3] is not None else np.arange(len(starts))
    steps = x[4] if len(x) > 4 and x[4] is not None else np.ones(len(starts), dtype=np.int64)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return data[tuple(index)]


def skeleton(model: onnx.ModelProto, elem_types: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """The model with its float weights replaced by typed graph inputs of the same
    shape, for shape/type inference without copying weights (onnx's inference
    serializes the whole model). `elem_types` overrides initializers' types."""
    graph = model.graph
    elem_types = elem_types or {}
    light = onnx.helper.make_model(
        onnx.helper.make_graph(list(graph.node), graph.name, list(graph.input), list(graph.output)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version,
    )
    for tensor in graph.initializer:
        if tensor.data_type in _WEIGHT_TYPES:
            elem = elem_types.get(tensor.name, tensor.data_type)
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, elem, list(tensor.dims)))
        else:  # ints: shapes, axes, indices, which inference reads
            light.graph.initializer.append(tensor)
    return light


_WEIGHT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                           onnx.TensorProto.DOUBLE})


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Shapes of the graph's tensors from onnx shape inference (graph-only model is fine):
    ints where static, dim names where symbolic, None where unknown."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    shapes = {}
    values: Iterable[onnx.ValueInfoProto] = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    for info in values:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes
