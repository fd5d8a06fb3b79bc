"""Which nodes of a graph compute in half precision and which stay float32 (the
islands), for `to_half`. See half.py for why each island exists."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from diffrt.export.passes.elem_types import allows, input_type_var, output_type_var
from diffrt.export.passes.graph import GraphIndex

# Statistics and accumulations that stay float32.
FP32_OPS = frozenset({
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow",
})
# Ops whose input must be exact: a phase. Their cone back to the graph inputs stays fp32.
PHASE_OPS = frozenset({"Sin", "Cos"})
# A phase cone through one of these is not an embedding any more: only Sin/Cos stay fp32.
_HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "MultiHeadAttention", "Attention"})
_CONE_LIMIT = 200
_ATTENTION_OPS = frozenset({"MultiHeadAttention", "Attention"})


def node_precisions(graph, types, half: int, opset: int, upcast_attention: bool) -> dict[str, str]:
    """node name -> 'half' | 'fp32' (an island on activations) | 'shape' (float
    arithmetic on shapes/constants) for every node that reads or writes float32."""
    index = GraphIndex(graph)
    _name_nodes(graph)
    activations = _activations(graph)
    forced = _phase_cones(index, activations)
    if upcast_attention:
        forced |= _attention_scores(index)
    precision = {}
    for node in graph.node:
        if not computes_float(node, types, opset):
            continue
        if not any(n in activations for n in node.input if n):
            precision[node.name] = "shape"
        elif node.op_type in FP32_OPS or node.name in forced or not _admits(node, half, opset):
            precision[node.name] = "fp32"
        else:
            precision[node.name] = "half"
    return precision


def computes_float(node: onnx.NodeProto, types: dict, opset: int) -> bool:
    """Whether the node computes on float32 data (not just reads its shape or type)."""
    if node.op_type == "Cast":
        return types.get(node.output[0]) == TensorProto.FLOAT
    for slot, name in enumerate(node.input):
        if name and types.get(name) == TensorProto.FLOAT and slot_need(node, slot, TensorProto.FLOAT, opset):
            return True
    input_vars = {input_type_var(node, i, opset) for i in range(len(node.input))}
    for position, name in enumerate(node.output):
        if name and types.get(name) == TensorProto.FLOAT:
            type_var = output_type_var(node, position, opset)
            if type_var is None or type_var in input_vars:
                return True
    return False


def slot_need(node: onnx.NodeProto, slot: int, target: int, opset: int) -> int | None:
    """The elem type input `slot` must have when the node computes in `target`: the
    target where the schema ties the input to the node's data type (or there is no
    schema), float32 where the schema fixes tensor(float), None where it is free."""
    type_var = input_type_var(node, slot, opset)
    if type_var is None:
        return target
    if not type_var.isidentifier():  # a fixed type such as tensor(float)
        return TensorProto.FLOAT if type_var == "tensor(float)" else None
    shared = sum(1 for i, name in enumerate(node.input) if name and input_type_var(node, i, opset) == type_var)
    tied = type_var in {output_type_var(node, i, opset) for i in range(len(node.output))}
    return target if tied or shared > 1 else None


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Every node gets a unique name (decisions are keyed by it)."""
    seen = set()
    for position, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{position}_{node.output[0] if node.output else ''}"
        seen.add(node.name)


def _activations(graph: onnx.GraphProto) -> set[str]:
    """Tensors that depend on a graph input other than through its shape."""
    active = {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(i in active for i in node.input if i):
            active.update(o for o in node.output if o)
    return active


def _phase_cones(index: GraphIndex, activations: set[str]) -> set[str]:
    """Sin/Cos and the light ops computing their argument (a timestep embedding)."""
    forced = set()
    for node in index.graph.node:
        if node.op_type not in PHASE_OPS:
            continue
        forced.add(node.name)
        cone, pending = set(), [i for i in node.input if i]
        while pending and cone is not None:
            producer = index.producer.get(pending.pop())
            if producer is None or producer.name in cone or producer.op_type in ("Shape", "Size"):
                continue
            if producer.op_type in _HEAVY_OPS or len(cone) >= _CONE_LIMIT:
                cone = None  # deep inside the network: not an embedding of the inputs
                break
            if any(o in activations for o in producer.output):
                cone.add(producer.name)
                pending.extend(i for i in producer.input if i)
        forced |= cone or set()
    return forced


def _attention_scores(index: GraphIndex) -> set[str]:
    """The nodes of q.k^T -> Softmax (and fused attention), for upcast_attention."""
    forced = set()
    for node in index.graph.node:
        if node.op_type in _ATTENTION_OPS:
            forced.add(node.name)
        if node.op_type != "Softmax":
            continue
        forced.add(node.name)
        producer = index.producer.get(node.input[0])
        while producer is not None and producer.op_type in ("Mul", "Div", "Add"):
            forced.add(producer.name)
            producer = next((index.producer[i] for i in producer.input if i in index.producer
                             and index.producer[i].op_type in ("MatMul", "Mul", "Div", "Add")), None)
        if producer is not None and producer.op_type == "MatMul":
            forced.add(producer.name)
            for name in producer.input:  # the q and k scales
                scale = index.producer.get(name)
                if scale is not None and scale.op_type in ("Mul", "Div"):
                    forced.add(scale.name)
    return forced


def _admits(node: onnx.NodeProto, half: int, opset: int) -> bool:
    """Whether the node's data type variable admits the half type at this opset."""
    type_var = output_type_var(node, 0, opset)
    if type_var is None or not type_var.isidentifier():
        return True  # no schema (contrib op) or a fixed output type: nothing to check
    return allows(node, type_var, half, opset)
