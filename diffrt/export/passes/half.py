"""Convert a stage graph to half precision (fp16 or bf16) with float32 islands.

Weights are stored in half precision and the graph computes in it, except:

- normalization statistics: InstanceNormalization (the exporter's decomposed
  GroupNorm), LayerNormalization, GroupNormalization, and the reductions/powers of
  decomposed norms (RMSNorm's `x.pow(2).mean()` overflows fp16 beyond |x| ~ 256);
- Softmax (accumulation over up to H*W keys);
- sinusoidal embeddings: Sin/Cos and the ops computing their argument from the graph
  inputs (`timestep * freqs` with timesteps up to 1000: fp16 spacing at 512..1024 is
  0.5, i.e. phase errors up to 0.25 rad). diffusers also computes these in fp32;
- shape arithmetic (floats computed only from shapes and constants, e.g. the
  exporter's `1/sqrt(head_dim)`): scalars, kept exact;
- any op whose schema at the graph's opset does not admit the half type.

Graph inputs and outputs stay float32 (a Cast at the boundary), so the numpy runtime
and the schedulers are unchanged. Weights are converted from their ORIGINAL fp32
values (fp16: finite values beyond +-65504 are clipped and counted; bf16: round to
nearest even with ml_dtypes, no clipping, as bf16 has fp32's range).

bf16 needs opset 22: before it, Conv, InstanceNormalization and Sin/Cos do not admit
bfloat16, so a bf16 conversion first raises an older graph's opset to 22 with onnx's
version converter (the report says so).

Known facts about real weights (random test weights cannot show them):
- SDXL's VAE overflows in fp16 (diffusers sets `force_upcast` and decodes in fp32);
  SD1.5's VAE is fine in fp16.
- SD2.1's UNet needs its attention upcast in fp16 (its config has
  `upcast_attention: true`): pass `upcast_attention=True`, which keeps the attention
  scores (q.k^T, its scale) and the Softmax in fp32, like diffusers' upcast, and keeps
  a fused MultiHeadAttention node in fp32. bf16 does not need it.

The fused-attention graph (com.microsoft.MultiHeadAttention) converts too: fused +
fp16 is what ONNX Runtime's CUDA EP runs. ONNX Runtime's CPU EP lacks half kernels
for many ops; OpenVINO reads fp16 graphs on the CPU (see `compare.py`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from diffrt.errors import DiffrtError
from diffrt.export.passes.elem_types import infer_elem_types, input_type_var, output_type_var
from diffrt.export.passes.graph import attribute, opset_version, skeleton
from diffrt.export.passes.islands import node_precisions, slot_need
from diffrt.export.passes.stage import InitializerChanges, load_graph, write_stage

logger = logging.getLogger(__name__)

HALF_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_HALF_NUMPY = {"fp16": "float16", "bf16": "bfloat16"}
BF16_OPSET = 22
FP16_MAX = float(np.finfo(np.float16).max)  # 65504

@dataclass(frozen=True)
class HalfReport:
    """What `to_half` did to one graph."""

    dtype: str
    """'fp16' or 'bf16'."""
    opset: int
    """The default-domain opset of the written graph (bf16 raises it to 22)."""
    half_nodes: int
    """Nodes computing in half precision."""
    fp32_nodes: int
    """Nodes computing on activations in float32 (the islands)."""
    fp32_ops: tuple[tuple[str, int], ...]
    """(op type, count) of the fp32 islands, e.g. ('InstanceNormalization', 21)."""
    shape_nodes: int
    """Float nodes on shapes and constants only, kept float32 (scalars)."""
    casts_added: int
    initializers_converted: int
    clipped_values: int
    """fp16 only: weight values beyond +-65504 clipped to it."""
    inputs: tuple[tuple[str, str], ...]
    """(name, dtype) of the graph inputs: float32 (and int64 ids) as before."""
    outputs: tuple[tuple[str, str], ...]
    initializers: InitializerChanges = InitializerChanges()
    """Which initializers were cast in place and which got a half copy (read in both precisions)."""


def to_half(
    stage_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp16",
    upcast_attention: bool = False,
) -> tuple[list[Path], HalfReport]:
    """Read the stage folder `stage_dir`, convert it to `dtype` ('fp16'|'bf16'),
    write `out_dir`. Returns the written files (graph first) and the report."""
    if dtype not in HALF_TYPES:
        raise DiffrtError(f"dtype={dtype!r} is not a half precision; use one of: {', '.join(HALF_TYPES)}")
    source, out = Path(stage_dir), Path(out_dir)
    model = load_graph(source)
    plan = convert_model(model, dtype, upcast_attention)
    files = write_stage(model, source, out, convert={name: plan.weights for name in plan.weight_names})
    report = plan.report(model)
    logger.info(
        "%s -> %s (%s): %d half nodes, %d fp32 nodes (%s), %d casts, %d weights converted",
        source, out, dtype, report.half_nodes, report.fp32_nodes,
        ", ".join(f"{op} x{n}" for op, n in report.fp32_ops) or "none", report.casts_added,
        report.initializers_converted,
    )
    return files, report


class WeightConverter:
    """fp32 array -> half array, counting fp16 clipping (called once per weight at write time)."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.clipped = 0

    def __call__(self, name: str, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        if self.dtype == "bf16":
            return values.astype(ml_dtypes.bfloat16)
        too_big = np.isfinite(values) & (np.abs(values) > FP16_MAX)
        if too_big.any():
            self.clipped += int(too_big.sum())
            logger.warning("%s: %d values beyond fp16's range clipped to +-%g", name, int(too_big.sum()), FP16_MAX)
            values = np.clip(values, -FP16_MAX, FP16_MAX)
        return values.astype(np.float16)


@dataclass
class _Plan:
    """The conversion decided by convert_model; weights are converted when written."""

    dtype: str
    weights: WeightConverter
    weight_names: list[str]
    half_nodes: int
    fp32_ops: Counter
    shape_nodes: int
    casts_added: int
    copies: tuple[tuple[str, str], ...] = ()

    def report(self, model: onnx.ModelProto) -> HalfReport:
        def io(values):
            return tuple((v.name, _dtype_name(v.type.tensor_type.elem_type)) for v in values)

        return HalfReport(
            dtype=self.dtype, opset=opset_version(model), half_nodes=self.half_nodes,
            fp32_nodes=sum(self.fp32_ops.values()), fp32_ops=tuple(sorted(self.fp32_ops.items())),
            shape_nodes=self.shape_nodes, casts_added=self.casts_added,
            initializers_converted=len(self.weight_names), clipped_values=self.weights.clipped,
            inputs=io(model.graph.input), outputs=io(model.graph.output),
            initializers=InitializerChanges(
                dtype=_HALF_NUMPY[self.dtype], copies=self.copies,
                cast=tuple(n for n in self.weight_names if n not in {copy for _, copy in self.copies})),
        )


def convert_model(model: onnx.ModelProto, dtype: str, upcast_attention: bool = False) -> _Plan:
    """Rewrite `model` (graph-only is fine) in place; returns the plan, whose
    `weights` converter must be applied to `weight_names` when the stage is written."""
    half = HALF_TYPES[dtype]
    if dtype == "bf16" and opset_version(model) < BF16_OPSET:
        _raise_opset(model, BF16_OPSET)
    opset = opset_version(model)
    graph = model.graph
    _constants_to_initializers(graph)
    types = infer_elem_types(model, opset)
    precision = node_precisions(graph, types, half, opset, upcast_attention)
    rewriter = _Rewriter(graph, types, precision, half, opset)
    rewriter.run()
    weight_names = rewriter.place_initializers()
    rewriter.cast_outputs()
    del graph.value_info[:]  # stale types; runtimes infer them again
    _check_types(model, weight_names, half)
    counts = Counter()
    shape_nodes = 0
    for node in graph.node:
        kind = precision.get(node.name)
        if kind == "fp32":
            counts[node.op_type] += 1
        elif kind == "shape":
            shape_nodes += 1
    return _Plan(
        dtype=dtype, weights=WeightConverter(dtype), weight_names=weight_names,
        half_nodes=sum(1 for n in graph.node if precision.get(n.name) == "half"), fp32_ops=counts,
        shape_nodes=shape_nodes, casts_added=rewriter.casts_added, copies=tuple(rewriter.copies),
    )


def _raise_opset(model: onnx.ModelProto, opset: int) -> None:
    """Raise the default-domain opset with onnx's version converter, run on the graph
    without its weights (the converter copies the model it gets, twice)."""
    import onnx.version_converter

    before = opset_version(model)
    try:
        converted = onnx.version_converter.convert_version(skeleton(model), opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors with long C++ texts
        raise RuntimeError(f"cannot raise the graph's opset {before} -> {opset} for bf16: {exc}") from None
    known = {t.name for t in model.graph.initializer}
    del model.graph.node[:]
    model.graph.node.extend(converted.graph.node)
    model.graph.initializer.extend(t for t in converted.graph.initializer if t.name not in known)
    del model.opset_import[:]
    model.opset_import.extend(converted.opset_import)
    model.ir_version = max(model.ir_version, converted.ir_version)
    logger.info("raised the opset %d -> %d (bf16 needs it for Conv/InstanceNormalization)", before, opset)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Float Constant nodes become initializers, so weights and constants are placed alike."""
    keep = []
    for node in graph.node:
        value = _float_constant(node)
        if value is None:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _float_constant(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
    return None


class _Rewriter:
    """Walks the nodes in order, casting where a node's precision differs from what
    its inputs carry; records which initializers each precision needs."""

    def __init__(self, graph, types, precision, half, opset):
        self.graph, self.types, self.precision, self.half, self.opset = graph, types, precision, half, opset
        self.floats = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
        self.carries = {i.name: TensorProto.FLOAT for i in graph.input if types.get(i.name) == TensorProto.FLOAT}
        self.wanted = defaultdict(list)  # initializer -> [(node name, slot, elem type)]
        self.casts: dict[tuple[str, int], str] = {}
        self.casts_added = 0
        self.nodes: list[onnx.NodeProto] = []
        self.copies: list[tuple[str, str]] = []  # (initializer, its half copy)

    def run(self) -> None:
        for node in list(self.graph.node):
            kind = self.precision.get(node.name)
            target = self.half if kind == "half" else TensorProto.FLOAT
            if kind is not None:
                self._inputs(node, target)
                if node.op_type == "Cast" and attribute(node, "to") == TensorProto.FLOAT:
                    _set_cast_to(node, target)
                self._outputs(node, target)
            self.nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)

    def _inputs(self, node, target) -> None:
        for slot, name in enumerate(node.input):
            if not name or self.types.get(name) != TensorProto.FLOAT:
                continue
            need = slot_need(node, slot, target, self.opset)
            if need is None:
                continue
            if name in self.floats:
                self.wanted[name].append((node.name, slot, need))
            elif self.carries.get(name, TensorProto.FLOAT) != need:
                node.input[slot] = self._cast(name, need)

    def _outputs(self, node, target) -> None:
        for position, name in enumerate(node.output):
            if not name or self.types.get(name) != TensorProto.FLOAT:
                continue
            if node.op_type == "Cast":
                self.carries[name] = attribute(node, "to")
                continue
            type_var = output_type_var(node, position, self.opset)
            if type_var is None:
                self.carries[name] = target
            elif not type_var.isidentifier():
                self.carries[name] = TensorProto.FLOAT
            else:
                free = all(input_type_var(node, i, self.opset) != type_var for i in range(len(node.input)))
                self.carries[name] = TensorProto.FLOAT if free else target

    def _cast(self, name: str, to: int) -> str:
        key = (name, to)
        if key not in self.casts:
            suffix = "fp32" if to == TensorProto.FLOAT else _DTYPE_NAMES[to]
            out = f"{name}/to_{suffix}"
            self.nodes.append(onnx.helper.make_node("Cast", [name], [out], name=f"{name}/Cast_to_{suffix}", to=to))
            self.casts[key] = out
            self.casts_added += 1
        return self.casts[key]

    def place_initializers(self) -> list[str]:
        """Convert initializers all of whose readers compute in half; duplicate the
        ones read in both precisions. Returns the initializer names to convert."""
        by_name = {t.name: t for t in self.graph.initializer}
        nodes = {n.name: n for n in self.graph.node}  # the graph's copies, not the ones walked
        convert = []
        for name, uses in self.wanted.items():
            needs = {need for _, _, need in uses}
            if needs == {TensorProto.FLOAT}:
                continue
            if needs == {self.half}:
                convert.append(name)
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(by_name[name])
            copy.name = f"{name}/{_DTYPE_NAMES[self.half]}"
            self.graph.initializer.append(copy)
            convert.append(copy.name)
            self.copies.append((name, copy.name))
            for node_name, slot, need in uses:
                if need == self.half:
                    nodes[node_name].input[slot] = copy.name
        return convert

    def cast_outputs(self) -> None:
        """Graph outputs computed in half get a Cast back to float32 under their own name."""
        for output in self.graph.output:
            if self.carries.get(output.name, TensorProto.FLOAT) == TensorProto.FLOAT:
                continue
            inner = f"{output.name}/{_DTYPE_NAMES[self.half]}"
            for node in self.graph.node:
                for i, name in enumerate(node.input):
                    if name == output.name:
                        node.input[i] = inner
                for i, name in enumerate(node.output):
                    if name == output.name:
                        node.output[i] = inner
            self.graph.node.append(
                onnx.helper.make_node("Cast", [inner], [output.name], name=f"{output.name}/Cast_output_to_fp32",
                                      to=TensorProto.FLOAT))
            self.casts_added += 1


_DTYPE_NAMES = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16", TensorProto.FLOAT: "fp32"}


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def _set_cast_to(node: onnx.NodeProto, to: int) -> None:
    for attr in node.attribute:
        if attr.name == "to":
            attr.i = to


def _check_types(model: onnx.ModelProto, converted: list[str], half: int) -> None:
    """Strict type inference over the converted graph: a type clash is a bug here,
    better raised now than by a runtime later. Weights are converted only when the
    stage is written, so the check sees float initializers as typed inputs (no data
    copied). Skipped for graphs with contrib ops, which onnx cannot type."""
    graph = model.graph
    if any(n.domain not in ("", "ai.onnx") for n in graph.node):
        return
    check = skeleton(model, {name: half for name in converted})
    try:
        onnx.shape_inference.infer_shapes(check, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise RuntimeError(f"half-precision conversion produced an inconsistent graph: {exc}") from None
