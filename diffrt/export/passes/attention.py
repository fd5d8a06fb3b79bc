"""Fuse each attention block of an exported graph into one ONNX Runtime
`com.microsoft.MultiHeadAttention` node.

torch's TorchScript exporter writes `F.scaled_dot_product_attention` (what diffusers'
`Attention` calls) as, per block:

    q_t = Transpose(0,2,1,3)(Reshape(q, [B, -1, H, D]))       q = to_q(x): (B, S, H*D)
    k_t = Transpose(0,2,3,1)(Reshape(k, [B, -1, H, D]))       k = to_k(ctx): (B, L, H*D)
    v_t = Transpose(0,2,1,3)(Reshape(v, [B, -1, H, D]))
    p   = Softmax(MatMul(q_t * sqrt(s), k_t * sqrt(s)))       s = 1/sqrt(D), from Shape
    out = Reshape(Transpose(0,2,1,3)(MatMul(p, v_t)), [B, -1, H*D])

MultiHeadAttention(q, k, v, num_heads=H, scale=s) computes `out` directly from the
(B, S, H*D) projections, so the head split/merge transposes and the (B, H, S, L)
score tensor never exist as graph tensors (ORT's CPU kernel tiles them; its CUDA
kernels run flash attention). The match is keyed on Softmax and checks every piece:
the permutations, that the reshapes split the last dim into the same (H, D) for q, k
and v and merge it back, and that the scale factors are constants of the graph (the
exporter computes them from shapes; they are evaluated here with two different
values for every dynamic dim). Anything else is left alone and reported.

The UNet's self- and cross-attention and the VAE mid-block's single-head attention
over H*W tokens match. The fused graph is for ONNX Runtime only; TensorRT and
OpenVINO consume the unfused ("portable") graph.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from diffrt.export.passes.graph import (
    CannotEvaluate,
    GraphIndex,
    ShapeExpression,
    attribute,
    ensure_opset,
    remove_dead_nodes,
    tensor_shapes,
)
from diffrt.export.passes.stage import InitializerChanges, load_graph, write_stage

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
FUSED_OP = "MultiHeadAttention"
_HEADS_PERM = (0, 2, 1, 3)  # (B, S, H, D) <-> (B, H, S, D)
_KEY_PERM = (0, 2, 3, 1)  # (B, L, H, D) -> (B, H, D, L)


@dataclass(frozen=True)
class AttentionReport:
    """What `fuse_attention` did to one graph."""

    found: int
    """Attention blocks seen: a Softmax between a scores MatMul and a values MatMul."""
    fused: int
    """Blocks replaced by one MultiHeadAttention node."""
    not_fused: tuple[str, ...] = ()
    """'softmax node name: reason' for every block found but left as it was."""
    initializers: InitializerChanges = InitializerChanges()
    """Weights are kept as they are; only initializers nothing reads any more go."""

    @property
    def complete(self) -> bool:
        """At least one block, and all of them fused (the exporter's bar for a UNet)."""
        return self.found > 0 and self.fused == self.found


@dataclass(frozen=True)
class _Block:
    """One matched attention block, ready to replace."""

    query: str
    key: str
    value: str
    output: str
    num_heads: int
    scale: float
    last_node: onnx.NodeProto  # the merging Reshape: the fused node takes its place
    softmax: onnx.NodeProto


class _NoMatch(Exception):
    """This Softmax is attention, but not in a form the fusion handles (the reason)."""


def fuse_attention(stage_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[list[Path], AttentionReport]:
    """Read the stage folder `stage_dir`, fuse its attention blocks, write `out_dir`.

    Returns the written files (graph first) and the report. A graph without any
    matching block is written unchanged (report.fused == 0); callers that expect
    attention (a UNet) should check `report.complete`.
    """
    source, out = Path(stage_dir), Path(out_dir)
    model = load_graph(source)
    before = [t.name for t in model.graph.initializer]
    report = fuse_model(model)
    after = {t.name for t in model.graph.initializer}
    report = replace(report, initializers=InitializerChanges(removed=tuple(n for n in before if n not in after)))
    files = write_stage(model, source, out)
    logger.info("%s: fused %d of %d attention blocks -> %s", source, report.fused, report.found, out)
    return files, report


def fuse_model(model: onnx.ModelProto) -> AttentionReport:
    """Fuse the attention blocks of `model` in place (a graph-only model is fine)."""
    graph = model.graph
    shapes = tensor_shapes(model)
    index = GraphIndex(graph)
    blocks, not_fused = [], []
    for node in list(graph.node):
        if node.op_type != "Softmax" or not _is_attention(node, index):
            continue
        try:
            blocks.append(_match(node, index, shapes))
        except (_NoMatch, CannotEvaluate) as reason:
            not_fused.append(f"{node.name}: {reason}")
    found = len(blocks) + len(not_fused)
    for block in blocks:
        _replace(graph, block)
    if blocks:
        remove_dead_nodes(graph)
        ensure_opset(model, MS_DOMAIN, 1)
    left = {n.name for n in graph.node if n.op_type == "Softmax"}
    fused = 0
    for block in blocks:
        if block.softmax.name in left:  # something else still reads the unfused path
            not_fused.append(f"{block.softmax.name}: an intermediate tensor is used outside the block")
        else:
            fused += 1
    for line in not_fused:
        logger.warning("attention not fused: %s", line)
    return AttentionReport(found=found, fused=fused, not_fused=tuple(not_fused))


def _is_attention(softmax: onnx.NodeProto, index: GraphIndex) -> bool:
    """Softmax(... MatMul ...) whose result multiplies values: attention, fusable or not."""
    users = index.consumers.get(softmax.output[0], [])
    if not any(u.op_type == "MatMul" and u.input[0] == softmax.output[0] for u in users):
        return False
    node = index.producer.get(softmax.input[0])
    for _ in range(3):  # through a scale (Mul/Div) and/or a mask (Add)
        if node is None or node.op_type == "MatMul":
            break
        node = next((index.producer[i] for i in node.input if i in index.producer
                     and index.producer[i].op_type in ("MatMul", "Mul", "Div", "Add")), None)
    return node is not None and node.op_type == "MatMul"


def _match(softmax: onnx.NodeProto, index: GraphIndex, shapes: dict) -> _Block:
    axis = attribute(softmax, "axis", -1)
    if axis not in (-1, 3):
        raise _NoMatch(f"Softmax over axis {axis}, not the keys axis")
    scores, post_scale = _unscale(softmax.input[0], "MatMul", index)
    scores_node = index.op(scores, "MatMul")
    if scores_node is None:
        op = index.producer[scores].op_type if scores in index.producer else "a graph input"
        raise _NoMatch(f"scores come from {op} (an attention mask or bias is not fused)")
    q_heads, q_scale = _unscale(scores_node.input[0], "Transpose", index)
    k_heads, k_scale = _unscale(scores_node.input[1], "Transpose", index)
    query, q_split = _split_heads(q_heads, _HEADS_PERM, index)
    key, k_split = _split_keys(k_heads, index)
    values_node = index.only_consumer(softmax.output[0])
    if values_node is None or values_node.op_type != "MatMul" or values_node.input[0] != softmax.output[0]:
        raise _NoMatch("attention probabilities are read by more than the values MatMul")
    value, v_split = _split_heads(values_node.input[1], _HEADS_PERM, index)
    merge_t = index.only_consumer(values_node.output[0])
    if merge_t is None or merge_t.op_type != "Transpose" or tuple(attribute(merge_t, "perm", ())) != _HEADS_PERM:
        raise _NoMatch("attention output is not transposed back to (B, S, H, D)")
    merge = index.only_consumer(merge_t.output[0])
    if merge is None or merge.op_type != "Reshape":
        raise _NoMatch("attention output is not reshaped to (B, S, H*D)")
    for name in (scores, softmax.output[0], values_node.output[0], merge_t.output[0]):
        if name in index.outputs:
            raise _NoMatch(f"{name} is a graph output")
    expressions = ShapeExpression(index, shapes.get)
    heads, head_dim = _check_reshapes(expressions, (query, key, value), (q_split, k_split, v_split), merge)
    # The exporter computes the scale from the heads' shape; now that (H, D) is known,
    # those shapes are static and the scale a constant.
    known = _head_shapes(shapes, (q_split, k_split, v_split), index, heads, head_dim)
    expressions = ShapeExpression(index, lambda name: known.get(name, shapes.get(name)))
    scale = 1.0
    for factor in (q_scale, k_scale, post_scale):
        if factor is not None:
            scale *= _scalar(expressions, *factor)
    logger.debug("%s: %d heads of %d, scale %.6g", softmax.name, heads, head_dim, scale)
    return _Block(query=query, key=key, value=value, output=merge.output[0], num_heads=heads,
                  scale=scale, last_node=merge, softmax=softmax)


def _unscale(name: str, data_op: str, index: GraphIndex) -> tuple[str, tuple[str, bool] | None]:
    """`x * c`, `c * x` or `x / c` where x comes from `data_op` -> (x, (c, divides));
    anything else -> (name, None)."""
    node = index.producer.get(name)
    if node is None or node.op_type not in ("Mul", "Div"):
        return name, None
    for data, factor in ((0, 1), (1, 0)) if node.op_type == "Mul" else ((0, 1),):
        if index.op(node.input[data], data_op) is not None:
            return node.input[data], (node.input[factor], node.op_type == "Div")
    return name, None


def _scalar(expressions: ShapeExpression, name: str, divides: bool) -> float:
    value = expressions.constant(name)
    if value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        raise _NoMatch(f"scale {name} is not a float scalar")
    factor = float(value.reshape(()))
    return 1.0 / factor if divides else factor


def _head_shapes(shapes: dict, splits, index: GraphIndex, heads: int, head_dim: int) -> dict:
    """Shapes of the (B, S, H, D) splits and the transposes after them, with H and D filled in."""
    known = {}
    for split in splits:
        base = shapes.get(split.output[0]) or (None, None, None, None)
        known[split.output[0]] = (base[0], base[1], heads, head_dim)
        pending = [split.output[0]]
        while pending:  # the Transposes that follow (one, or two for keys)
            name = pending.pop()
            for user in index.consumers.get(name, []):
                if user.op_type == "Transpose":
                    perm = attribute(user, "perm", ())
                    known[user.output[0]] = tuple(known[name][p] for p in perm)
                    pending.append(user.output[0])
    return known


def _split_heads(name: str, perm: tuple[int, ...], index: GraphIndex) -> tuple[str, onnx.NodeProto]:
    """Transpose(perm)(Reshape(x, target)) -> (x, the Reshape)."""
    transpose = index.op(name, "Transpose")
    if transpose is None or tuple(attribute(transpose, "perm", ())) != perm:
        raise _NoMatch(f"{name} is not a head split transposed by {perm}")
    reshape = index.op(transpose.input[0], "Reshape")
    if reshape is None:
        raise _NoMatch(f"{transpose.input[0]} is not a Reshape into heads")
    return reshape.input[0], reshape


def _split_keys(name: str, index: GraphIndex) -> tuple[str, onnx.NodeProto]:
    """Keys arrive as (B, H, D, L): one Transpose(0,2,3,1), or (0,2,1,3) then a last-two swap."""
    swap = index.op(name, "Transpose")
    if swap is not None and tuple(attribute(swap, "perm", ())) == (0, 1, 3, 2):
        return _split_heads(swap.input[0], _HEADS_PERM, index)
    return _split_heads(name, _KEY_PERM, index)


def _check_reshapes(expressions: ShapeExpression, sources, splits, merge: onnx.NodeProto) -> tuple[int, int]:
    """q, k and v are split into the same (H, D) heads without touching batch or
    sequence, and the output is merged back to H*D; returns (H, D)."""
    heads = None
    for probe in (0, 1):
        symbols: dict = {}
        found = []
        for source, reshape in zip(sources, splits, strict=True):
            target = expressions.evaluate(reshape.input[1], probe, symbols)
            dims = expressions.dims(source, probe, symbols)
            if target.shape != (4,) or dims.shape != (3,):
                raise _NoMatch(f"{reshape.name} is not a (B, S, H*D) -> (B, S, H, D) split")
            batch_ok = target[0] == dims[0] or _is_batch_size(reshape, expressions.index)
            if not batch_ok or target[1] not in (-1, dims[1]) or target[2] * target[3] != dims[2]:
                raise _NoMatch(f"{reshape.name} reshapes {tuple(dims)} to {tuple(target)}, not a head split")
            found.append((int(target[2]), int(target[3])))
        if len(set(found)) != 1:
            raise _NoMatch(f"q, k and v are split into different heads: {found}")
        merged = expressions.evaluate(merge.input[1], probe, symbols)
        q_dims = expressions.dims(sources[0], probe, symbols)
        batch_ok = merged.shape == (3,) and (merged[0] == q_dims[0] or _is_batch_size(merge, expressions.index))
        if not batch_ok or merged[1] not in (-1, q_dims[1]) or merged[2] != found[0][0] * found[0][1]:
            raise _NoMatch(f"{merge.name} does not merge the heads back to (B, S, H*D)")
        if heads not in (None, found[0]):
            raise _NoMatch("the head split depends on the input shape")
        heads = found[0]
    return heads


def _is_batch_size(reshape: onnx.NodeProto, index: GraphIndex) -> bool:
    """The target's first element is `x.shape[0]` of some tensor x (diffusers'
    `batch_size`). onnx's shape inference gives every tensor's batch its own symbol,
    so equal batches cannot always be proven; every activation here is batch-major."""
    concat = index.op(reshape.input[1], "Concat")
    if concat is None or not concat.input:
        return False
    node = index.producer.get(concat.input[0])
    if node is not None and node.op_type == "Unsqueeze":
        node = index.producer.get(node.input[0])
    if node is None or node.op_type != "Gather" or attribute(node, "axis", 0) != 0:
        return False
    shape = index.op(node.input[0], "Shape")
    try:
        position = ShapeExpression(index, lambda _: None).constant(node.input[1])
    except CannotEvaluate:
        return False
    return shape is not None and attribute(shape, "start", 0) == 0 and position.size == 1 and int(position) == 0


def _replace(graph: onnx.GraphProto, block: _Block) -> None:
    """Put the fused node where the merging Reshape was: after q, k, v exist, before
    anything reads the output. The unfused nodes die in remove_dead_nodes."""
    scope = block.softmax.name.rsplit("/", 1)[0] if "/" in block.softmax.name else block.softmax.name
    fused = onnx.helper.make_node(
        FUSED_OP,
        [block.query, block.key, block.value],
        [block.output],
        name=f"{scope}/{FUSED_OP}",
        domain=MS_DOMAIN,
        num_heads=block.num_heads,
        scale=block.scale,
    )
    for position, node in enumerate(graph.node):
        if node is block.last_node or (node.name == block.last_node.name and list(node.output) == [block.output]):
            graph.node[position].CopyFrom(fused)
            return
    raise RuntimeError(f"{block.last_node.name} vanished from the graph")
