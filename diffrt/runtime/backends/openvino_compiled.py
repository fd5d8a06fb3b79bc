"""How the openvino backend (openvino.py) compiles: the settings and the precision
choice, the compiled blobs it keeps in the engine cache, and what a compiled model
fused."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints

from diffrt.artifacts import file_mode
from diffrt.errors import DiffrtError
from diffrt.runtime.cpu import CpuInfo

DEVICE = "CPU"
BLOB_NAME = "model.blob"
ATTENTION_NAME = "attention.json"  # attention_ops() of the compiled model, for describe_graph()
PRECISIONS = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16, "fp16": ov.Type.f16}
# How OPTIMIZATION_CAPABILITIES names the half precisions this CPU plugin can run.
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
PERFORMANCE_HINTS = {"latency": hints.PerformanceMode.LATENCY, "throughput": hints.PerformanceMode.THROUGHPUT}


def choose_precision(requested: str | None, cpu: CpuInfo, capabilities: Sequence[str]) -> str:
    """The inference precision to compile with. None: bf16 where the CPU has bf16 dot
    products and OpenVINO lists BF16 for it, else fp32."""
    if requested is None:
        return "bf16" if cpu.has_bf16 and "BF16" in capabilities else "fp32"
    if not isinstance(requested, str) or requested not in PRECISIONS:
        raise DiffrtError(f"precision={requested!r}; choose one of: {', '.join(PRECISIONS)} (or None: the CPU's best)")
    needed = _CAPABILITY.get(requested)
    if needed and needed not in capabilities:
        raise DiffrtError(
            f"precision={requested!r}: OpenVINO cannot run {requested} on this CPU ({cpu.model}; it offers "
            f"{', '.join(capabilities)}); use precision='fp32' or leave precision unset"
        )
    return requested


def device_capabilities(core: ov.Core) -> list[str]:
    return list(core.get_property(DEVICE, props.device.capabilities))


@dataclass(frozen=True)
class CompileSettings:
    """How a stage is compiled and run. Only `precision` changes the compiled blob: the
    thread/stream settings are applied again when a blob is imported (checked in
    tests/test_openvino_backend.py), so they are not part of the cache key."""

    precision: str
    num_threads: int = 0
    """INFERENCE_NUM_THREADS; 0: OpenVINO's choice (the cores this process may use)."""
    num_streams: int | None = None
    """NUM_STREAMS; None: what the performance hint picks (1 for latency)."""
    performance_hint: str = "latency"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DiffrtError(f"precision={self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise DiffrtError(f"num_threads must be an integer >= 0 (0: OpenVINO's choice), got {self.num_threads!r}")
        streams = self.num_streams
        if streams is not None and (isinstance(streams, bool) or not isinstance(streams, int) or streams < 1):
            raise DiffrtError(f"num_streams must be an integer >= 1 or None (from the hint), got {streams!r}")
        if not isinstance(self.performance_hint, str) or self.performance_hint not in PERFORMANCE_HINTS:
            raise DiffrtError(
                f"performance_hint={self.performance_hint!r}; choose one of: {', '.join(PERFORMANCE_HINTS)}"
            )

    def properties(self) -> dict[str, Any]:
        config = {
            hints.inference_precision: PRECISIONS[self.precision],
            hints.performance_mode: PERFORMANCE_HINTS[self.performance_hint],
            props.inference_num_threads: self.num_threads,
        }
        if self.num_streams is not None:
            config[props.streams.num] = self.num_streams
        return config




@dataclass(frozen=True)
class AttentionOps:
    """Attention in a compiled model: `fused` counts runtime nodes that each run a whole
    MatMul-Softmax-MatMul (the CPU plugin's snippets "Subgraph" MHA kernel, or its
    "ScaledDotProductAttention" node); `unfused` counts Softmax nodes left on their own."""

    fused: int
    unfused: int

    def to_json(self) -> dict[str, int]:
        return {"fused": self.fused, "unfused": self.unfused}


def attention_ops(compiled: ov.CompiledModel, op_types: Mapping[str, str] | None = None) -> AttentionOps:
    """Count from the runtime graph, whose nodes list the original ops they fused.
    `op_types` maps those names to op types (from the model before compiling); without
    it, a name's last part stands for its type ("/unet/.../attn1/Softmax", as torch's
    ONNX exporter names nodes). A model imported from a blob has lost those lists, so
    it answers with the count made when it was compiled (recorded beside the blob)."""
    recorded = getattr(compiled, "_diffrt_attention", None)
    if recorded is not None:
        return recorded
    fused = unfused = 0
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        layer = info["layerType"].astype(str)
        names = info["originalLayersNames"].astype(str).split(",")
        kinds = [op_types.get(n, "") if op_types else n.rsplit("/", 1)[-1] for n in names]
        softmax = sum(k.startswith("Softmax") for k in kinds)
        matmuls = sum(k.startswith("MatMul") for k in kinds)
        if layer == "ScaledDotProductAttention" or (softmax and matmuls >= 2):
            fused += 1
        elif layer == "Softmax":
            unfused += 1
    return AttentionOps(fused, unfused)


def import_blob(core: ov.Core, blob: Path, config: Mapping[str, Any]) -> ov.CompiledModel:
    """Import from a memory map of the blob. The CPU plugin keeps pointing into the
    buffer it imported from (some constants are used in place), so the map must live
    as long as the compiled model: it hangs on the Python object. A map rather than a
    read: the pages the plugin does not keep stay file-backed (reclaimable page cache)
    instead of a second resident copy of every weight (measured: a 537 MB blob costs
    1.07 GB resident when read into an OpenVINO tensor, 0.54 GB + map when mapped)."""
    # copy-on-write: the file is never written; past OpenVINO's cache header, if any
    data = np.memmap(blob, dtype=np.uint8, mode="c", offset=blob_header_size(blob))
    tensor = ov.Tensor(data, shared_memory=True)
    compiled = core.import_model(tensor, DEVICE, dict(config))
    compiled._diffrt_blob = (data, tensor)  # released with the compiled model, never before
    try:
        counts = json.loads((blob.parent / ATTENTION_NAME).read_text(encoding="utf-8"))
        compiled._diffrt_attention = AttentionOps(int(counts["fused"]), int(counts["unfused"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # only describe_graph() reads it
    return compiled


def blob_header_size(blob: Path) -> int:
    """Bytes before the exported model in a blob: 0 for what export_model() wrote, the
    `<?xml ...<compiled_blob .../>` line plus its newline for a blob OpenVINO wrote to
    its CACHE_DIR (header_size_alignment 0: nothing else comes between)."""
    with open(blob, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"<?xml"):
        return 0
    end = head.find(b"/>\n")
    if end < 0 or b"<compiled_blob" not in head[:end]:
        raise ValueError(f"{blob}: an OpenVINO cache header this version cannot read")
    return end + 3


def adopt_blob(blob_folder: Path, compiled: ov.CompiledModel, folder: Path) -> None:
    """Write an engine cache entry's files into `folder`, moving the blob OpenVINO wrote
    into `blob_folder` while compiling (a rename: no copy, no serialization)."""
    blobs = sorted(blob_folder.glob("*.blob"))
    if len(blobs) != 1:
        raise RuntimeError(f"OpenVINO wrote {len(blobs)} blobs to {blob_folder}, expected 1")
    target = folder / BLOB_NAME
    blobs[0].replace(target)
    target.chmod(file_mode())  # OpenVINO writes 0440; cache entries get the umask's mode like other files
    (folder / ATTENTION_NAME).write_text(json.dumps(attention_ops(compiled).to_json()) + "\n", encoding="utf-8")
