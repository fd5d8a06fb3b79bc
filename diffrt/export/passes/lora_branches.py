"""Add unmerged low-rank (LoRA) branches to a denoiser graph: every targeted Linear
gets y += (x @ down_b) @ up_b, with the factors as graph inputs that carry the batch.

    files, report = add_lora_branches("out/unet", "out/unet-lora", weights, rank=16)
    report.modules        # {module: (in_features, out_features)}, in graph order

For each targeted module (found through the stage's weight map: its `.weight` is one
initializer, stored transposed, that exactly one MatMul reads as its second input)
the pass rewrites

    y = MatMul(x, W^T)                  x: (batch, tokens, in)
into
    y = MatMul(x, W^T) + MatMul(MatMul(x, lora_down.<module>), lora_up.<module>)

with two new inputs, `lora_down.<module>` (batch, in, rank) and `lora_up.<module>`
(batch, rank, out): row b of the batch gets its own factors, so one denoiser call
serves rows with different LoRAs (zeros: none). They are stored transposed (down^T,
up^T) so the branch needs no Transpose node; the runtime folds strength and
alpha/rank into `up` and concatenates several LoRAs along the rank axis, zero-padded
to `rank` (diffrt.runtime.lora_branches). Initializers are not touched, so the source's
weight map (and merged LoRAs, textual inversion, refit) holds for the new graph as is
and its external-data file is the source's, hard-linked.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from diffrt.errors import DiffrtError
from diffrt.export.onnx_graph import EXTERNAL_DATA_NAME, GRAPH_NAME
from diffrt.export.passes.graph import GraphIndex, tensor_shapes
from diffrt.export.passes.stage import check_destination, load_graph, uses_external
from diffrt.runtime.lora_branches import DOWN_PREFIX, UP_PREFIX

logger = logging.getLogger(__name__)

# Which Linear layers get a branch. "attention": the projections of every attention
# block (what most style/character LoRAs train): the UNet's attn1/attn2 and CLIP's
# self_attn; "transformer": every Linear of the transformer blocks (also the UNet's
# feed-forward and Linear proj_in/proj_out, CLIP's MLP).
_ATTENTION = r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)|\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
TARGETS = {
    "attention": rf"({_ATTENTION})$",
    "transformer": rf"({_ATTENTION}|\.ff\.net\.(0\.proj|2)|\.proj_in|\.proj_out|\.mlp\.(fc1|fc2))$",
}


@dataclass(frozen=True)
class BranchReport:
    rank: int
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    """module -> (in_features, out_features), one branch each."""
    skipped: tuple[str, ...] = ()
    """'module: reason' for targeted modules left without a branch."""
    ignored: tuple[str, ...] = ()
    """Targeted modules the stage's outputs do not depend on (e.g. SDXL's last CLIP layer):
    a LoRA layer there changes nothing, so none is needed."""


def add_lora_branches(stage_dir: str | os.PathLike, out_dir: str | os.PathLike, weights, rank: int,
                      targets: str = "attention") -> tuple[list[Path], BranchReport]:
    """Write `out_dir`: the stage graph of `stage_dir` with a branch on every Linear
    whose module path matches TARGETS[targets]; `weights` is the stage's WeightMap."""
    source, out = Path(stage_dir), Path(out_dir)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1024:
        raise DiffrtError(f"--lora-branches {rank!r}: the rank must be an integer from 1 to 1024 (e.g. 16, 32)")
    if targets not in TARGETS:
        raise DiffrtError(f"--lora-targets {targets!r}: choose one of {', '.join(TARGETS)}")
    check_destination(source, out)
    model = load_graph(source)
    report = branch_model(model, weights, rank, re.compile(TARGETS[targets]))
    if not report.modules:
        raise DiffrtError(f"{source}: no {targets} Linear layer found to branch; is this a UNet or CLIP stage?")
    return _write(model, source, out), report


def branch_model(model: onnx.ModelProto, weights, rank: int, pattern: re.Pattern) -> BranchReport:
    """Rewrite `model` (graph only) in place; see the module docstring."""
    graph = model.graph
    index = GraphIndex(graph)
    shapes = tensor_shapes(model)
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    modules: dict[str, tuple[int, int]] = {}
    skipped: list[str] = []
    ignored: list[str] = []
    for parameter, entry in weights.entries.items():
        module = parameter.removesuffix(".weight")
        if not parameter.endswith(".weight") or not pattern.search(module) or len(entry.shape) != 2:
            continue
        if entry.absent in ("unused", "removed"):
            ignored.append(module)
            continue
        reason, matmul = _site(entry, index, weights, shapes)
        if reason:
            skipped.append(f"{module}: {reason}")
            continue
        out_features, in_features = entry.shape
        _branch(graph, matmul, module, batch, in_features, out_features, rank)
        modules[module] = (in_features, out_features)
    for item in skipped:
        logger.warning("no LoRA branch on %s", item)
    return BranchReport(rank=rank, modules=modules, skipped=tuple(skipped), ignored=tuple(ignored))


def _site(entry, index: GraphIndex, weights, shapes) -> tuple[str, onnx.NodeProto | None]:
    """The MatMul computing this Linear, or why there is none to branch."""
    if len(entry.placements) != 1 or entry.placements[0].transform != ("transpose",):
        return f"stored as {entry.absent or [p.transform for p in entry.placements]}, not one transposed weight", None
    initializer = entry.placements[0].initializer
    if len(weights.holders(initializer)) > 1:
        return "its values are stored once with other parameters", None
    readers = index.consumers.get(initializer, [])
    if len(readers) != 1 or readers[0].op_type != "MatMul" or list(readers[0].input).index(initializer) != 1:
        return "not read by exactly one MatMul as its weight", None
    rank = len(shapes.get(readers[0].input[0]) or (None, None, None))
    if rank != 3:  # (batch, tokens, features): a (batch, features) input would broadcast wrongly
        return f"its input has {rank} dims, not (batch, tokens, features)", None
    return "", readers[0]


def _branch(graph: onnx.GraphProto, matmul: onnx.NodeProto, module: str, batch: str, in_features: int,
            out_features: int, rank: int) -> None:
    down, up = DOWN_PREFIX + module, UP_PREFIX + module
    graph.input.append(onnx.helper.make_tensor_value_info(down, onnx.TensorProto.FLOAT, [batch, in_features, rank]))
    graph.input.append(onnx.helper.make_tensor_value_info(up, onnx.TensorProto.FLOAT, [batch, rank, out_features]))
    x, y = matmul.input[0], matmul.output[0]
    base, low, delta = f"{y}/lora_base", f"{y}/lora_low", f"{y}/lora_delta"
    matmul.output[0] = base
    at = list(graph.node).index(matmul) + 1
    nodes = [onnx.helper.make_node("MatMul", [x, down], [low], name=f"{module}/lora_down"),
             onnx.helper.make_node("MatMul", [low, up], [delta], name=f"{module}/lora_up"),
             onnx.helper.make_node("Add", [base, delta], [y], name=f"{module}/lora_add")]
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)


def _write(model: onnx.ModelProto, source: Path, out: Path) -> list[Path]:
    """The new graph beside the source's weights: its external-data file hard-linked
    (initializers unchanged, same offsets), or the small inline graph as it is."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        external = uses_external(model)
        if external:
            try:
                os.link(source / EXTERNAL_DATA_NAME, staging / EXTERNAL_DATA_NAME)
            except OSError:  # another file system (or no hard links): a copy
                shutil.copyfile(source / EXTERNAL_DATA_NAME, staging / EXTERNAL_DATA_NAME)
        onnx.save_model(model, str(staging / GRAPH_NAME))
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / GRAPH_NAME, *([out / EXTERNAL_DATA_NAME] if external else [])]


__all__ = ["DOWN_PREFIX", "TARGETS", "UP_PREFIX", "BranchReport", "add_lora_branches", "branch_model"]
