"""Element types of every tensor of a graph, and which node inputs share the node's
data type, read from the ONNX operator schemas.

onnx's shape inference stops at an op it has no schema for (ORT's
com.microsoft.MultiHeadAttention), and everything after it loses its type; this
propagation treats such ops as "outputs take the type of the first input", which
holds for the contrib ops the passes emit.
"""

from __future__ import annotations

from functools import cache

import onnx
from onnx import TensorProto, defs

from diffrt.export.passes.graph import attribute

_FIXED = {
    "tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
    "tensor(bfloat16)": TensorProto.BFLOAT16, "tensor(double)": TensorProto.DOUBLE,
    "tensor(int64)": TensorProto.INT64, "tensor(int32)": TensorProto.INT32, "tensor(bool)": TensorProto.BOOL,
    "tensor(uint8)": TensorProto.UINT8, "tensor(int8)": TensorProto.INT8,
}
_TYPE_NAMES = {v: k for k, v in _FIXED.items()}


@cache
def schema(op_type: str, domain: str, opset: int) -> defs.OpSchema | None:
    try:
        return defs.get_schema(op_type, opset, domain if domain != "ai.onnx" else "")
    except defs.SchemaError:
        return None


def _formal(params, position: int):
    """The formal parameter at `position` (the last one repeats when variadic)."""
    if not params:
        return None
    if position < len(params):
        return params[position]
    last = params[-1]
    return last if last.option == defs.OpSchema.FormalParameterOption.Variadic else None


def input_type_var(node: onnx.NodeProto, position: int, opset: int) -> str | None:
    """The schema's type string of input `position`: a type variable ('T'), a fixed
    type ('tensor(float)'), or None when the op has no schema here."""
    op = schema(node.op_type, node.domain, opset)
    formal = _formal(op.inputs, position) if op is not None else None
    return formal.type_str if formal is not None else None


def output_type_var(node: onnx.NodeProto, position: int, opset: int) -> str | None:
    op = schema(node.op_type, node.domain, opset)
    formal = _formal(op.outputs, position) if op is not None else None
    return formal.type_str if formal is not None else None


def allows(node: onnx.NodeProto, type_var: str, elem_type: int, opset: int) -> bool:
    """Whether `type_var` of this node's schema admits `elem_type` (True without a schema)."""
    op = schema(node.op_type, node.domain, opset)
    if op is None:
        return True
    for constraint in op.type_constraints:
        if constraint.type_param_str == type_var:
            return _TYPE_NAMES.get(elem_type, "") in constraint.allowed_type_strs
    return type_var == _TYPE_NAMES.get(elem_type)


def infer_elem_types(model: onnx.ModelProto, opset: int) -> dict[str, int]:
    """name -> TensorProto element type for every tensor the graph computes or reads."""
    graph = model.graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        inputs = [types.get(name) if name else None for name in node.input]
        for position, name in enumerate(node.output):
            if name:
                types[name] = _output_type(node, position, inputs, opset)
    return types


def _output_type(node: onnx.NodeProto, position: int, inputs: list[int | None], opset: int) -> int | None:
    op = node.op_type
    if node.domain in ("", "ai.onnx"):
        if op == "Cast":
            return attribute(node, "to")
        if op == "CastLike":
            return inputs[1]
        if op in ("Constant", "ConstantOfShape"):
            return _constant_type(node)
    type_str = output_type_var(node, position, opset)
    if type_str is None:  # no schema (a contrib op): the first input's type
        return next((t for t in inputs if t is not None), None)
    if type_str in _FIXED:
        return _FIXED[type_str]
    for index, name_type in enumerate(inputs):
        if name_type is not None and input_type_var(node, index, opset) == type_str:
            return name_type
    return None


def _constant_type(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t.data_type
        if attr.name in ("value_float", "value_floats"):
            return TensorProto.FLOAT
        if attr.name in ("value_int", "value_ints"):
            return TensorProto.INT64
    return TensorProto.FLOAT  # ConstantOfShape's default value is float 0
