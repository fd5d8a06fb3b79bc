"""Build each stage's weight map (diffrt.weights): which initializer of the exported
graph holds which torch parameter, and under which transform.

With constant folding on, torch's exporter renames the initializers it computes
(`onnx::MatMul_2591` is a Linear weight it transposed), stores tensors with equal
values once (Identity nodes fan the survivor out), and names the rest after the
wrapper's attribute path (`unet.conv_in.weight`). So initializers are found by
content: each parameter's bytes are hashed as they are and, for 2-D weights,
transposed; each initializer's bytes (read one tensor at a time, the UNet's 10 GB
never held at once) are looked up in that table. Where several parameters hold the
same bytes (zero biases, norm scales still at ones), the graph decides: a parameter
belongs to an initializer when a node of the parameter's module (the exporter names
nodes by module scope, `/unet/down_blocks.1/.../to_q/MatMul`) reads it. A parameter
no initializer holds is checked with autograd: the stage's outputs do not depend on
it ("unused"), or they do and the exporter folded it into a computed constant
("folded"; logged, since LoRA and refit cannot reach it).

Derived graphs (fused attention, fp16/bf16) carry their source's map through what the
pass reports it did to each initializer (`derive`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from diffrt.artifacts import FileRecord, atomic_write_text, file_record
from diffrt.export.passes.graph import attribute
from diffrt.export.passes.stage import InitializerChanges, load_graph, read_initializer
from diffrt.weights import WEIGHT_MAP_NAME, Placement, WeightEntry, WeightMap

if TYPE_CHECKING:  # torch only where the torch stage is mapped
    import torch

    from diffrt.export.sd import StageModule

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
# Nodes that pass a tensor on unchanged: the exporter's Identity fan-out of a deduplicated initializer.
_PASS_THROUGH = ("Identity",)


def _digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(memoryview(array).cast("B")).digest() + str(array.dtype).encode()


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict names of every parameter (tied ones under each of their names)."""
    return {name: p.detach() for name, p in module.named_parameters(remove_duplicate=False)}


def _prefix(wrapper: torch.nn.Module, module: torch.nn.Module) -> str:
    """The attribute path of `module` inside the export wrapper ('unet.'), which the
    exporter puts in front of the initializers it keeps by name."""
    for name, child in wrapper.named_modules():
        if child is module:
            return f"{name}." if name else ""
    raise ValueError("the stage's weights module is not inside its export wrapper")


class _Candidates:
    """digest -> [(parameter, transform)] for every parameter as it is and transposed."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.table: dict[bytes, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
        self.shapes = {name: tuple(p.shape) for name, p in params.items()}
        for name, tensor in params.items():
            array = tensor.float().numpy()
            self.table[_digest(array)].append((name, ()))
            if array.ndim == 2:
                self.table[_digest(array.T)].append((name, ("transpose",)))

    def lookup(self, values: np.ndarray) -> dict[str, list[tuple[str, ...]]]:
        """Parameters whose values (under some transform) are these: name -> transforms."""
        found: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for name, transform in self.table.get(_digest(values), ()):
            source = self.shapes[name][::-1] if transform else self.shapes[name]
            found[name].append(transform if tuple(values.shape) == source else (*transform, "reshape"))
        return found


class _Readers:
    """Which module scopes read each initializer, and with which op and input slot."""

    def __init__(self, graph: onnx.GraphProto):
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name:
                    consumers[name].append((node, slot))
        self.consumers = consumers

    def of(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """The nodes reading `name`, through the exporter's Identity fan-out."""
        out, pending, seen = [], [name], set()
        while pending:
            current = pending.pop()
            for node, slot in self.consumers.get(current, ()):
                if node.op_type in _PASS_THROUGH and node.output[0] not in seen:
                    seen.add(node.output[0])
                    pending.append(node.output[0])
                else:
                    out.append((node, slot))
        return out


def _scope(node: onnx.NodeProto) -> str:
    """'/unet/down_blocks.1/attentions.0/proj_in/MatMul' -> 'unet.down_blocks.1.attentions.0.proj_in'."""
    return ".".join(part for part in node.name.split("/")[:-1] if part)


def _in_scope(parameter: str, scopes: Iterable[str]) -> bool:
    """A node of the parameter's own module reads it. Scopes follow the modules called
    (the VAE decoder's are '/decoder/...', not '/vae/decoder/...'), so the module path
    is matched as a suffix."""
    module = parameter.rpartition(".")[0]
    return any(scope == module or scope.endswith(f".{module}") for scope in scopes)


def _transform_for(transforms: list[tuple[str, ...]], readers: list[tuple[onnx.NodeProto, int]]) -> tuple[str, ...]:
    """Which transform, when a weight equals itself transposed (symmetric, or constant):
    the op that reads it decides (MatMul's second input is x @ W.T's W.T)."""
    if len(transforms) == 1:
        return transforms[0]
    transposed = any((node.op_type == "MatMul" and slot == 1)
                     or (node.op_type == "Gemm" and slot == 1 and not attribute(node, "transB", 0))
                     for node, slot in readers)
    return next((t for t in transforms if ("transpose" in t) == transposed), transforms[0])


def map_torch_stage(stage: StageModule, stage_name: str, stage_dir: Path, input_names: list[str]) -> WeightMap:
    """The weight map of a stage just exported from `stage.module` into `stage_dir`."""
    params = _parameters(stage.weights)
    prefix = _prefix(stage.module, stage.weights)
    candidates = _Candidates(params)
    model = load_graph(stage_dir)
    readers = _Readers(model.graph)
    placements: dict[str, list[Placement]] = defaultdict(list)
    ambiguous: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        found = candidates.lookup(read_initializer(tensor, stage_dir))
        if not found:
            continue
        reads = readers.of(tensor.name)
        scopes = {_scope(node) for node, _ in reads}
        # Equal bytes are not enough (a constant the exporter computed may equal a
        # parameter): a node of the parameter's module must read it, or the exporter
        # kept the parameter's own name for it.
        owners = [name for name in found if _in_scope(name, scopes)]
        named = tensor.name.removeprefix(prefix) if tensor.name.startswith(prefix) else None
        if named in found and named not in owners:
            owners.append(named)
        if not owners:
            ambiguous.update(found)
            continue
        for name in owners:
            transform = _transform_for(found[name], reads)
            placements[name].append(Placement(tensor.name, tuple(tensor.dims), _FLOAT_TYPES[tensor.data_type],
                                              transform))
    missing = [name for name in params if name not in placements]
    unused = _unused(stage, missing, input_names) if missing else set()
    entries = {}
    for name, tensor in params.items():
        absent = "" if name in placements else "unused" if name in unused else \
            "ambiguous" if name in ambiguous else "folded"
        entries[name] = WeightEntry(name, tuple(tensor.shape), "float32", tuple(placements.get(name, ())), absent)
    result = WeightMap(stage=stage_name, component=stage.component, module=type(stage.weights).__name__,
                       entries=entries)
    _log_summary(result)
    return result


def _unused(stage: StageModule, names: list[str], input_names: list[str]) -> set[str]:
    """Which of these parameters the stage's outputs do not depend on (autograd on the
    check inputs, tracking only these parameters)."""
    import torch

    params = dict(stage.weights.named_parameters(remove_duplicate=False))
    tracked = [params[n] for n in names]
    try:
        for p in tracked:
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs = stage.module(*[stage.check_inputs[n] for n in input_names])
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            live = [o.float().sum() for o in outputs if o.requires_grad]
            grads = torch.autograd.grad(live, tracked, allow_unused=True) if live else [None] * len(tracked)
    finally:
        for p in tracked:
            p.requires_grad_(False)
    return {name for name, grad in zip(names, grads, strict=True) if grad is None}


def _log_summary(result: WeightMap) -> None:
    counts: dict[str, int] = defaultdict(int)
    for entry in result.entries.values():
        counts[entry.absent or "placed"] += 1
    logger.info("%s: weight map of %d parameters (%s)", result.stage, len(result),
                ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for reason in ("folded", "ambiguous"):
        names = [n for n, e in result.entries.items() if e.absent == reason]
        if names:
            logger.warning("%s: %d parameters %s, not reachable by weight updates: %s", result.stage, len(names),
                           reason, ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))


def derive(source: WeightMap, stage_name: str, changes: InitializerChanges) -> WeightMap:
    """The map of a graph a pass made from `source`'s graph, from what the pass did."""
    copies: dict[str, list[str]] = defaultdict(list)
    for original, copy in changes.copies:
        copies[original].append(copy)
    cast, removed = set(changes.cast), set(changes.removed)
    entries = {}
    for name, entry in source.entries.items():
        placed: list[Placement] = []
        for placement in entry.placements:
            if placement.initializer not in removed:
                placed.append(_cast(placement, placement.initializer, changes.dtype)
                              if placement.initializer in cast else placement)
            placed += [_cast(placement, copy, changes.dtype) for copy in copies.get(placement.initializer, ())]
        absent = entry.absent or ("" if placed else "removed")
        entries[name] = WeightEntry(name, entry.shape, entry.dtype, tuple(placed), absent)
    result = WeightMap(stage=stage_name, component=source.component, module=source.module, entries=entries)
    _log_summary(result)
    return result


def _cast(placement: Placement, initializer: str, dtype: str) -> Placement:
    transform = placement.transform if "cast" in placement.transform else (*placement.transform, "cast")
    return Placement(initializer, placement.shape, dtype, transform)


def write(stage_dir: Path, staging: Path, result: WeightMap) -> FileRecord:
    """stage_dir/weight_map.json, atomically; its record for the stage's manifest entry."""
    import json

    path = stage_dir / WEIGHT_MAP_NAME
    atomic_write_text(path, json.dumps(result.to_json(), separators=(",", ":")) + "\n")
    return file_record(staging, path)


__all__ = ["derive", "map_torch_stage", "write"]
