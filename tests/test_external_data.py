"""Gathering a large export's weights into one external-data file
(diffrt.export.onnx_graph._write_with_external_data), on a small graph laid out the way
torch writes a graph over 2 GB: every large tensor in its own file beside the graph,
initializers and Constant node values alike (SD3's and Flux's LayerNorms without affine
weights become large Constant ones/zeros). The result must load in ONNX Runtime from
the stage folder alone and compute what the graph computed, a graph pass (half
precision) must work on it, and torch's per-tensor files must be gone once copied (the
disk holds the weights once)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from diffrt.export import onnx_graph


def _external(array: np.ndarray, name: str, base, location: str) -> TensorProto:
    tensor = numpy_helper.from_array(array, name)
    (base / location).write_bytes(tensor.raw_data)
    set_external_data(tensor, location=location, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def test_initializers_and_constants_move_into_one_file(tmp_path):
    import onnxruntime as ort

    from diffrt.export.passes import to_half

    torch_dir, stage = tmp_path / "torch", tmp_path / "stage"
    torch_dir.mkdir()
    stage.mkdir()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((600, 600)).astype(np.float32)
    scale = rng.standard_normal(600).astype(np.float32)
    shift = rng.standard_normal(600).astype(np.float32)
    constant = helper.make_node("Constant", [], ["scale"], value=_external(scale, "scale", torch_dir, "scale_file"))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), constant,
             helper.make_node("Mul", ["y", "scale"], ["z"]), helper.make_node("Add", ["z", "shift"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 600])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 600])],
                              initializer=[_external(weight, "w", torch_dir, "w_file"), numpy_helper.from_array(shift,
                                                                                                             "shift")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_graph._write_with_external_data(model, torch_dir, stage / "model.onnx", stage / "model.onnx.data")
    assert sorted(p.name for p in torch_dir.iterdir()) == []  # copied, then deleted
    assert sorted(p.name for p in stage.iterdir()) == ["model.onnx", "model.onnx.data"]
    written = onnx.load(str(stage / "model.onnx"), load_external_data=False)
    assert written.graph.node[1].attribute[0].t.raw_data  # the Constant's value is back in the graph file
    x = rng.standard_normal((2, 600)).astype(np.float32)
    expected = x @ weight * scale + shift
    session = ort.InferenceSession(str(stage / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-4)
    to_half(stage, tmp_path / "fp16", dtype="fp16")  # a pass rewrites the weights file: the constant must survive
    half = ort.InferenceSession(str(tmp_path / "fp16" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(half.run(None, {"x": x})[0], expected, rtol=2e-2, atol=0.5)
