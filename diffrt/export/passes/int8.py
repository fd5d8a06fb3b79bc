"""Quantize a stage graph to int8, four ways, writing a new stage folder (ONNX).

Methods (`METHODS`):

- "dynamic" (ONNX Runtime `quantize_dynamic`): the weights of MatMul/Gemm stored as
  int8, the activations quantized per call at run time (DynamicQuantizeLinear +
  MatMulInteger). No calibration. Convolutions stay fp32.
- "static" (ONNX Runtime `quantize_static`, QDQ format): weights (per channel) and
  activations of Conv/MatMul/Gemm as QuantizeLinear/DequantizeLinear pairs with
  ranges calibrated (MinMax) on the pipeline's own inputs.
- "weights" (NNCF `compress_weights`, INT8_ASYM): weight-only int8 of MatMul/Gemm/Conv
  (int8 initializers + DequantizeLinear); activations stay float.
- "hybrid" (NNCF, as optimum-intel's `_hybrid_quantization` does for SD's UNet):
  weight-only int8 for the MatMuls with weights, then full quantization (weights and
  activations, calibrated) of everything else NNCF quantizes: Convolutions, and the
  activation-by-activation MatMuls of attention.

Every method writes ONNX (QDQ / DequantizeLinear on int8 initializers), not OpenVINO
IR: ONNX Runtime and OpenVINO both read it (OpenVINO turns QDQ pairs into its
FakeQuantize and runs int8 kernels), so one file serves both backends and the
artifact's hashing, verification and weight loading stay as they are.

`exclude` names node-name groups (`SENSITIVE_GROUPS`) kept in float: the caller
measures which ones hurt (diffrt.export.quantize).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from diffrt.artifacts import QUANTIZERS_AT_CONSUMERS
from diffrt.errors import DiffrtError
from diffrt.export.onnx_graph import EXTERNAL_DATA_NAME, GRAPH_NAME
from diffrt.export.passes.stage import check_destination

logger = logging.getLogger(__name__)

METHODS = ("dynamic", "static", "weights", "hybrid")
NNCF_METHODS = ("weights", "hybrid")
CALIBRATED = ("static", "hybrid")
NNCF_EXTRA = "pip install -e '.[int8]' (or pip install nncf)"
# The graph passes each method's int8 graph gets after its quantizer, as named in the stage's `passes`.
METHOD_PASSES = {"hybrid": (QUANTIZERS_AT_CONSUMERS,)}
# Above this many bytes of weights the graph is written with external data (protobuf's 2 GiB limit).
_EXTERNAL_ABOVE = 1 << 30

# Candidate groups of nodes kept in float when quantizing them costs accuracy, by
# node-name substring (the exporter names nodes after the torch modules), plus the
# attention-score MatMuls (the one feeding each Softmax and the one reading it).
SENSITIVE_GROUPS = {
    "time_embedding": ("/time_embedding/", "/time_proj/", "/add_embedding/"),
    "time_emb_proj": ("/time_emb_proj/",),
    "conv_in": ("/conv_in/",),
    "conv_out": ("/conv_out/",),
    "attention_scores": (),
    "text_projection": ("/text_projection/", "/final_layer_norm/"),
}


def group_nodes(model: onnx.ModelProto, group: str) -> list[str]:
    """Names of the quantizable nodes (Conv, MatMul, Gemm) of a sensitive group."""
    if group not in SENSITIVE_GROUPS:
        raise DiffrtError(f"exclude group {group!r}; choose from: {', '.join(SENSITIVE_GROUPS)}")
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    if group == "attention_scores":
        softmax_in = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
        softmax_out = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
        return [n.name for n in nodes if n.output[0] in softmax_in or softmax_out & set(n.input)]
    return [n.name for n in nodes if any(p in n.name for p in SENSITIVE_GROUPS[group])]


def quantize_stage(source_dir: str | os.PathLike, out_dir: str | os.PathLike, method: str,
                   calibration: Sequence[Mapping[str, np.ndarray]] = (), exclude: Iterable[str] = ()) -> list[Path]:
    """Write `out_dir`, the int8 graph of the stage folder `source_dir` by `method`,
    with the nodes of the `exclude` groups left in float. Returns the written files,
    graph first. `calibration`: feeds for the calibrated methods."""
    if method not in METHODS:
        raise DiffrtError(f"int8 method {method!r}; choose one of: {', '.join(METHODS)}")
    if method in CALIBRATED and not calibration:
        raise DiffrtError(f"int8 method {method!r} needs calibration inputs")
    source, out = Path(source_dir), Path(out_dir)
    check_destination(source, out)
    graph = onnx.load(str(source / GRAPH_NAME), load_external_data=False)
    excluded = sorted({name for group in exclude for name in group_nodes(graph, group)})
    out.mkdir(parents=True)
    try:
        with readable_copy(source, out.parent) as readable:
            if method in NNCF_METHODS:
                _nncf(readable, out, method, calibration, excluded)
            else:
                _ort(readable, out, method, calibration, excluded)
    except BaseException:
        for path in out.iterdir():
            path.unlink()
        out.rmdir()
        raise
    files = [out / GRAPH_NAME] + ([out / EXTERNAL_DATA_NAME] if (out / EXTERNAL_DATA_NAME).exists() else [])
    logger.info("%s -> %s: int8 (%s), %d nodes kept in float", source, out, method, len(excluded))
    return files


@contextmanager
def readable_copy(stage_dir: Path, scratch: Path | None = None) -> Iterator[Path]:
    """The stage folder itself, or a private copy when a file of it has several hard
    links: onnx (1.17+) refuses to read external data through a hard-linked file (a
    fused-attention graph shares its weights file with the portable one by a hard link,
    diffrt.export.variants), and ONNX Runtime's and NNCF's quantizers read with onnx.
    The copy goes under `scratch` (default: beside the stage folder)."""
    if all(p.stat().st_nlink == 1 for p in stage_dir.iterdir() if p.is_file()):
        yield stage_dir
        return
    with tempfile.TemporaryDirectory(prefix=f".{stage_dir.name}-copy-", dir=scratch or stage_dir.parent) as tmp:
        copy = Path(tmp) / stage_dir.name
        copy.mkdir()
        for path in stage_dir.iterdir():
            if path.is_file():
                shutil.copyfile(path, copy / path.name)
        yield copy


def require_nncf() -> None:
    """One line naming the extra when NNCF is missing."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise DiffrtError(f"int8 methods 'weights' and 'hybrid' need NNCF: {NNCF_EXTRA}") from None


def _ort(source: Path, out: Path, method: str, calibration, excluded: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    large = _weight_bytes(source) > _EXTERNAL_ABOVE
    if method == "dynamic":
        # activation x activation MatMuls (attention scores) are not worth quantizing per call
        quantize_dynamic(str(source / GRAPH_NAME), str(out / GRAPH_NAME), op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True})
        return
    # u8 activations (asymmetric), s8 weights (symmetric, per channel): OpenVINO's int8 kernels take u8
    # activations; with s8 activations it computed a tiny UNet 12x further from fp32 than ORT did (measured)
    quantize_static(str(source / GRAPH_NAME), str(out / GRAPH_NAME), _Reader(calibration),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                    use_external_data_format=large, calibration_providers=["CPUExecutionProvider"],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


class _Reader:
    """ONNX Runtime's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._feeds = iter([dict(f) for f in feeds])

    def get_next(self):
        return next(self._feeds, None)

    def __len__(self) -> int:  # some ORT versions ask
        return 0


def _nncf(source: Path, out: Path, method: str, calibration, excluded: list[str]) -> None:
    """NNCF's ONNX backend, weights left on disk where they are external: it reads them
    from `external_data_dir` (a graph over protobuf's 2 GiB cannot be held inline)."""
    require_nncf()
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, AdvancedSmoothQuantParameters

    model = onnx.load(str(source / GRAPH_NAME), load_external_data=False)
    with_weights = _matmuls_with_weights(model)
    model = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_ASYM,
        # hybrid: weight-only int8 for the MatMuls that have weights, not the convolutions (quantized fully below)
        ignored_scope=nncf.IgnoredScope(names=excluded, types=["Conv"] if method == "hybrid" else [], validate=False),
        advanced_parameters=AdvancedCompressionParameters(backend_params=_data_dir(source)))
    if method == "hybrid":
        # 2. weights and activations of the rest (convolutions, attention's activation MatMuls), calibrated
        with tempfile.TemporaryDirectory(prefix=".hybrid-", dir=out.parent) as middle:
            save_graph(_one_dimensional_scales(model), Path(middle))
            del model
            model = onnx.load(str(Path(middle) / GRAPH_NAME), load_external_data=False)
            dataset = nncf.Dataset([dict(f) for f in calibration])
            model = nncf.quantize(
                model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                ignored_scope=nncf.IgnoredScope(names=sorted({*excluded, *with_weights}), validate=False),
                advanced_parameters=nncf.AdvancedQuantizationParameters(  # no SmoothQuant, as optimum-intel
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
                    backend_params=_data_dir(Path(middle))))
        model = quantizers_at_consumers(model)
    save_graph(_one_dimensional_scales(model), out)


def _data_dir(stage_dir: Path) -> dict[str, str]:
    from nncf.onnx.quantization.backend_parameters import BackendParameters

    external = (stage_dir / EXTERNAL_DATA_NAME).exists()
    return {BackendParameters.EXTERNAL_DATA_DIR: str(stage_dir.resolve())} if external else {}


def _one_dimensional_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """NNCF (3.4) writes a convolution's per-channel scale and zero point as (C, 1, 1);
    ONNX's DequantizeLinear with `axis` takes them 1-D (ONNX Runtime refuses the
    others): reshape them in place."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not any(a.name == "axis" for a in node.attribute):
            continue
        for name in node.input[1:3]:
            tensor = tensors.get(name)
            if tensor is not None and len(tensor.dims) > 1:
                values = numpy_helper.to_array(tensor)
                tensor.CopyFrom(numpy_helper.from_array(values.reshape(-1), name))
    return model


# Ops that only move or copy elements: a per-tensor QuantizeLinear/DequantizeLinear pair
# gives the same values before them as after them.
_LAYOUT_OPS = ("Reshape", "Transpose", "Resize")


def quantizers_at_consumers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move each per-tensor activation Q/DQ pair that feeds a chain of layout ops
    (Reshape, Transpose, nearest Resize) to the chain's end, next to the op it quantizes
    for; in place. The values are the same (those ops commute with a per-tensor
    quantization), and ONNX Runtime's outputs bit-identical.

    Why: NNCF places a convolution's input quantizer above the layout ops before it (a
    transformer block's output, quantized before Reshape -> Transpose -> proj_out Conv;
    an upsampler's input, before its Resize). OpenVINO (2026.4) computes such a graph
    wrong once its inputs are reshaped to static shapes, as diffrt's openvino backend
    does: relative RMS error 0.45 against the fp32 UNet at SD1.5 size where ONNX
    Runtime, and OpenVINO with dynamic shapes, give 0.036; with the pairs moved, 0.036
    on OpenVINO too. Measured on that UNet with each group of pairs removed in turn:
    the 16 before Reshape alone give the 0.45, the 3 before Resize 0.18."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scalars = {t.name for t in graph.initializer if not t.dims}
    outputs = {o.name for o in graph.output}

    def layout(node: onnx.NodeProto, tensor: str) -> bool:
        if node.op_type not in _LAYOUT_OPS or node.input[0] != tensor:
            return False
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        return node.op_type != "Resize" or mode == b"nearest"

    order = list(graph.node)
    moved: set[str] = set()
    for quant in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        source = quant.input[0]
        readers = consumers.get(quant.output[0], [])
        if source in constants or quant.input[1] not in scalars or len(readers) != 1:
            continue
        dequant = readers[0]
        if dequant.op_type != "DequantizeLinear":
            continue
        users = consumers.get(dequant.output[0], [])
        chain = [u for u in users if layout(u, dequant.output[0])]
        if len(chain) != 1 or any(u.op_type != "Shape" for u in users if u is not chain[0]):
            continue
        while True:  # follow the layout ops while each is the only reader of the last
            following = consumers.get(chain[-1].output[0], [])
            if len(following) != 1 or not layout(following[0], chain[-1].output[0]):
                break
            chain.append(following[0])
        end = chain[-1].output[0]
        if end in outputs:
            continue
        for user in users:  # the layout chain and any Shape read the float tensor itself
            user.input[:] = [source if name == dequant.output[0] else name for name in user.input]
        for reader in consumers.get(end, []):
            reader.input[:] = [dequant.output[0] if name == end else name for name in reader.input]
        quant.input[0] = end
        consumers[source] = [n for n in consumers[source] if n is not quant] + users
        consumers[dequant.output[0]], consumers[end] = consumers.get(end, []), [quant]
        order.remove(quant)
        order.remove(dequant)
        at = order.index(chain[-1]) + 1
        order[at:at] = [quant, dequant]
        moved.update((*quant.output, *dequant.output))
    if moved:
        del graph.node[:]
        graph.node.extend(order)
        kept = [v for v in graph.value_info if v.name not in moved]  # their recorded shapes are stale
        del graph.value_info[:]
        graph.value_info.extend(kept)
        logger.info("int8: %d quantizer pairs moved past layout ops to their consumers", len(moved) // 2)
    return model


def _matmuls_with_weights(model: onnx.ModelProto) -> list[str]:
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]


def _weight_bytes(source: Path) -> int:
    return sum(p.stat().st_size for p in source.iterdir() if p.is_file())


def save_graph(model: onnx.ModelProto, out: Path) -> None:
    """model.onnx, with its weights in model.onnx.data when they are large."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > _EXTERNAL_ABOVE:
        onnx.save_model(model, str(out / GRAPH_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024)
    else:
        onnx.save_model(model, str(out / GRAPH_NAME))


def int8_evidence(graph_path: str | os.PathLike) -> dict[str, int]:
    """What makes a graph int8: its int8/uint8 initializers and quantization nodes."""
    model = onnx.load(str(graph_path), load_external_data=False)
    int8 = sum(1 for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    ops = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger")
    return {"int8_initializers": int8, **{op: sum(1 for n in model.graph.node if n.op_type == op) for op in ops}}


__all__ = ["CALIBRATED", "METHODS", "METHOD_PASSES", "NNCF_METHODS", "SENSITIVE_GROUPS",
           "group_nodes", "int8_evidence", "quantize_stage", "quantizers_at_consumers", "require_nncf", "save_graph"]
