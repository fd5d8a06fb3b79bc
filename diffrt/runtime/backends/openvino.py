"""OpenVINO backend: the exporter's ONNX graphs on OpenVINO's CPU plugin (no re-export).

Each stage is reshaped to fully static input shapes before compiling: at open() when
`profile` binds every named dim of the stage, else on the first run with each new
shape. Compiled models are kept in memory per shape (a pipeline that alternates sizes
does not recompile) and on disk under <cache root>/openvino/<key>/ (engine_cache.py),
so the next process imports the compiled blob instead of compiling.

Precision: bf16 where the CPU has bf16 dot products (AMX or AVX512-BF16) and
OpenVINO agrees, fp32 elsewhere, or as asked. OpenVINO silently runs fp32 when asked
for a precision the CPU lacks, so such a request is refused here instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import StageSpec, file_mode
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime.backends.base import check_feeds, raise_if_out_of_memory
from diffrt.runtime.cpu import CpuInfo, cpu_info
from diffrt.runtime.engine_cache import EngineCache, cache_key

try:
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints
except ImportError:
    raise DiffrtError('backend \'openvino\' needs OpenVINO: pip install "diffrt[openvino]"') from None

logger = logging.getLogger(__name__)

DEVICE = "CPU"
VERSION = ov.get_version().split("-")[0]  # "2026.4.1"; the key uses the full build string
PRECISIONS = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16, "fp16": ov.Type.f16}
# How OPTIMIZATION_CAPABILITIES names the half precisions this CPU plugin can run.
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
PERFORMANCE_HINTS = {"latency": hints.PerformanceMode.LATENCY, "throughput": hints.PerformanceMode.THROUGHPUT}
BLOB_NAME = "model.blob"
ATTENTION_NAME = "attention.json"  # attention_ops() of the compiled model, for describe_graph()
# Bump when what this file does to a model before compiling changes: old blobs then differ.
RECIPE = 1

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}

Shapes = Mapping[str, Sequence[int]]


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


def cache_fields(spec: StageSpec, shapes: Shapes, precision: str, cpu: CpuInfo | None = None,
                 version: str | None = None) -> dict[str, Any]:
    """Everything that changes a compiled blob. The file hashes are the manifest's,
    which Pipeline.load checks against the files (sizes only with verify=False)."""
    cpu = cpu or cpu_info()
    return {
        "recipe": RECIPE,
        "openvino": version or ov.get_version(),
        "device": DEVICE,
        "cpu": {"model": cpu.model, "machine": cpu.machine, "flags": sorted(cpu.flags)},
        "precision": precision,
        "stage": spec.name,
        "files": [f.sha256 for f in spec.files],
        "inputs": {t.name: [int(d) for d in shapes[t.name]] for t in spec.inputs},
    }


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


def compile_graph(core: ov.Core, path: Path, shapes: Shapes, config: Mapping[str, Any],
                  blob_folder: Path | None = None) -> ov.CompiledModel:
    """Read the ONNX graph (weights in model.onnx.data are memory-mapped), fix every
    input shape, compile. The model is not kept: a later shape reads it again, which
    costs far less than the compile it precedes.

    `blob_folder`: an empty folder where OpenVINO writes the compiled blob itself while
    compiling (its CACHE_DIR: one `<hash>.blob`, a one-line XML header and then what
    `export_model()` returns). Measured on the SD1.5 UNet (256x256, fp32, 2 cores):
    compile + blob 13.6 s and no extra memory, against 27.5 s and +3.4 GB peak RSS for
    compile, then `export_model()` (which hands Python the whole blob in memory) and a
    write."""
    try:
        model = core.read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises untyped RuntimeErrors
        raise ArtifactError(f"{path} cannot be loaded by OpenVINO ({_message(exc)}); re-export the model") from None
    try:
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(
            f"{path} does not take the input shapes {dict(shapes)} ({_message(exc)}); re-export the model"
        ) from None
    options = dict(config) if blob_folder is None else {**config, "CACHE_DIR": str(blob_folder)}
    compiled = core.compile_model(model, DEVICE, options)
    op_types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    compiled._diffrt_attention = attention_ops(compiled, op_types)
    return compiled


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


class OpenVinoSession:
    """One stage: a compiled model and infer request per concrete input shape."""

    def __init__(self, backend: OpenVinoBackend, folder: Path, spec: StageSpec):
        self.spec = spec
        self._backend = backend
        self._folder = folder
        self._models: OrderedDict[tuple, tuple[ov.CompiledModel, ov.InferRequest]] = OrderedDict()
        self._output_names = [t.name for t in spec.outputs]
        self._lock = threading.Lock()  # an InferRequest serves one call at a time

    def prepare(self, shapes: Shapes) -> None:
        """Compile (or load from the engine cache) for these input shapes now."""
        shapes = {t.name: tuple(int(d) for d in shapes[t.name]) for t in self.spec.inputs}
        _bind_dims(self.spec, shapes)
        with self._lock:
            self._request(shapes)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        arrays = {}
        for tensor in self.spec.inputs:
            arrays[tensor.name] = np.ascontiguousarray(feeds[tensor.name], dtype=_NUMPY_DTYPES[tensor.dtype])
        shapes = {name: array.shape for name, array in arrays.items()}
        _bind_dims(self.spec, shapes)
        with self._lock:
            try:
                results = self._request(shapes).infer(arrays, share_inputs=True, share_outputs=False)
            except Exception as exc:  # OpenVINO raises RuntimeError; an allocation failure is the user's size
                raise_if_out_of_memory(exc, self.spec, arrays)
                raise
            return {name: results[name] for name in self._output_names}

    def _request(self, shapes: Shapes) -> ov.InferRequest:
        key = tuple(tuple(shapes[t.name]) for t in self.spec.inputs)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key][1]
        # Drop the least recently used shape *before* compiling the new one: each compiled
        # shape holds its own copy of the weights, and a compile needs about one more
        # while it runs, so dropping afterwards would hold max_shapes + 2 copies at once.
        while len(self._models) >= self._backend.max_shapes:
            evicted = self._models.popitem(last=False)[0]  # no name may keep the dropped model alive
            logger.info("openvino: %s keeps %d shapes in memory; dropped %s", self.spec.name,
                        self._backend.max_shapes, evicted)
        compiled = self._backend.load_compiled(self._folder, self.spec, shapes)
        # (compiled, request): a tuple drops its items last to first, so the request
        # goes before the compiled model (and the blob map that model holds).
        self._models[key] = (compiled, compiled.create_infer_request())
        return self._models[key][1]

    def compiled_models(self) -> dict[tuple, ov.CompiledModel]:
        """The compiled models held now, by input shapes (in spec.inputs order)."""
        return {key: compiled for key, (compiled, _) in self._models.items()}

    def describe_graph(self) -> str:
        """One line per compiled shape: how much of the attention OpenVINO fused."""
        lines = []
        for key, compiled in self.compiled_models().items():
            ops = attention_ops(compiled)
            lines.append(f"{self.spec.name} {key}: {ops.fused} fused attention, {ops.unfused} unfused softmax")
        return "\n".join(lines)

    def close(self) -> None:
        with self._lock:
            self._models.clear()

    def __enter__(self) -> OpenVinoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenVinoBackend:
    """`graph_precisions`: OpenVINO reads every graph precision and computes in its own
    inference precision (bf16/fp32 above), so the fp32 graph, the exact source, comes
    first. It takes the portable attention graph: its CPU plugin fuses
    MatMul-Softmax-MatMul itself (attention_ops() counts the fused nodes)."""

    name = "openvino"
    graph_precisions = ("fp32", "fp16", "bf16")
    fused_attention = False
    fuses_attention_itself = True  # its CPU plugin's SDPA fusion (attention_ops() counts it)
    device = "cpu"  # its sessions take and return numpy arrays

    @staticmethod
    def to_device(array: Any) -> Any:
        return array

    @staticmethod
    def to_host(array: Any) -> np.ndarray:
        return np.asarray(array)

    def __init__(
        self,
        precision: str | None = None,
        num_threads: int = 0,
        num_streams: int | None = None,
        performance_hint: str = "latency",
        cache_dir: str | Path | None = None,
        disk_cache: bool = True,
        max_shapes: int = 1,
    ):
        """`cache_dir`: the engine cache root (default: the artifact's engines/);
        `max_shapes`: compiled shapes kept in memory per stage (each holds its own copy
        of the weights in OpenVINO's layout), least recently used dropped (and freed)
        before a new one compiles. The default, 1, keeps one weight copy per stage
        (SD1.5 size, fp32: 4.8 GB of anonymous memory in all, each more UNet shape
        ~3.4 GB). Another shape then costs an import from the engine cache (a few
        seconds) or a compile (UNet: 10-15 s, the blob written as it compiles); raise it
        where memory allows and requests switch sizes often."""
        self.core = ov.Core()
        chosen = choose_precision(precision, cpu_info(), device_capabilities(self.core))
        self.settings = CompileSettings(chosen, num_threads, num_streams, performance_hint)
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise DiffrtError(f"max_shapes must be an integer >= 1, got {max_shapes!r}")
        self.max_shapes = max_shapes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.disk_cache = bool(disk_cache)
        self._caches: dict[Path, EngineCache] = {}  # one per root, so "not writable" is said once

    @property
    def precision(self) -> str:
        return self.settings.precision

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> OpenVinoSession:
        folder = Path(folder)
        session = OpenVinoSession(self, folder, spec)
        shapes = _profile_shapes(spec, profile)
        if shapes is not None:
            session.prepare(shapes)
        return session

    def load_compiled(self, folder: Path, spec: StageSpec, shapes: Shapes) -> ov.CompiledModel:
        """The compiled model for `shapes`: imported from the engine cache, else compiled
        (and published to the cache)."""
        config = self.settings.properties()
        cache = self._cache(folder)
        if cache is None:
            return self._compile(folder, spec, shapes, config)
        fields = cache_fields(spec, shapes, self.precision)
        key = cache_key(fields)
        entry = cache.lookup(key, fields)
        if entry is not None:
            started = time.perf_counter()
            try:
                compiled = import_blob(self.core, entry / BLOB_NAME, config)
            except Exception as exc:  # noqa: BLE001 - a damaged blob: rebuild it
                cache.discard(key, f"OpenVINO cannot import it: {_message(exc)}")
            else:
                logger.info("openvino: loaded %s %s from %s in %.2fs", spec.name, _shape_text(spec, shapes),
                            entry, time.perf_counter() - started)
                return compiled
        # Compile inside the entry being built, OpenVINO writing the blob as it goes.
        built: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            blob_folder = tmp / "openvino-cache-dir"
            blob_folder.mkdir()
            try:
                built["compiled"] = self._compile(folder, spec, shapes, config, blob_folder)
            except Exception as exc:
                built["error"] = exc
                raise
            adopt_blob(blob_folder, built["compiled"], tmp)
            blob_folder.rmdir()

        cache.publish(key, fields, write)
        if "error" in built:
            raise built["error"]
        if "compiled" in built:
            return built["compiled"]
        return self._compile(folder, spec, shapes, config)  # the cache root is not writable

    def _compile(self, folder: Path, spec: StageSpec, shapes: Shapes, config: Mapping[str, Any],
                 blob_folder: Path | None = None) -> ov.CompiledModel:
        started = time.perf_counter()
        compiled = compile_graph(self.core, folder / spec.graph_path, shapes, config, blob_folder)
        logger.info("openvino: compiled %s %s (%s) in %.2fs", spec.name, _shape_text(spec, shapes),
                    self.precision, time.perf_counter() - started)
        return compiled

    def _cache(self, folder: Path) -> EngineCache | None:
        if not self.disk_cache:
            return None
        root = self.cache_dir if self.cache_dir is not None else folder / "engines"
        if root not in self._caches:
            self._caches[root] = EngineCache(root, self.name)
        return self._caches[root]

    def describe(self) -> str:
        return f"openvino {VERSION} ({DEVICE}, {self.precision} inference precision)"


def _bind_dims(spec: StageSpec, shapes: Shapes) -> dict[str, int]:
    """The named dims' values in `shapes`; refuses shapes the stage cannot take."""
    bound: dict[str, int] = {}
    for tensor in spec.inputs:
        shape = tuple(shapes[tensor.name])
        expected = "(" + ", ".join(str(d) for d in tensor.shape) + ")"
        if len(shape) != len(tensor.shape):
            raise DiffrtError(f"stage {spec.name}: input {tensor.name!r} has shape {shape}, expected {expected}")
        for dim, value in zip(tensor.shape, shape, strict=True):
            if (isinstance(dim, int) and value != dim) or value < 1:
                raise DiffrtError(f"stage {spec.name}: input {tensor.name!r} has shape {shape}, expected {expected}")
            if isinstance(dim, str) and bound.setdefault(dim, value) != value:
                raise DiffrtError(
                    f"stage {spec.name}: input {tensor.name!r} has {dim}={value}, another input has {dim}={bound[dim]}"
                )
    return bound


def _profile_shapes(spec: StageSpec, profile: Mapping[str, int] | None) -> dict[str, tuple[int, ...]] | None:
    """Full input shapes when `profile` binds every named dim of the stage, else None.
    Names the stage does not use are ignored: one profile serves every stage."""
    if not profile:
        return None
    named = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    for name, value in profile.items():
        if name in named and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DiffrtError(f"profile[{name!r}] must be a positive integer, got {value!r}")
    unbound = sorted(named - set(profile))
    if unbound:
        logger.debug("openvino: profile leaves %s of %s unbound; compiling on the first run", unbound, spec.name)
        return None
    return {t.name: tuple(int(profile[d]) if isinstance(d, str) else d for d in t.shape) for t in spec.inputs}


def _shape_text(spec: StageSpec, shapes: Shapes) -> str:
    return " ".join(f"{t.name}={'x'.join(str(d) for d in shapes[t.name])}" for t in spec.inputs)


def _message(exc: BaseException) -> str:
    """The informative line of an OpenVINO error (they start with source locations)."""
    noise = ("Exception from ", "Check '", "FrontEnd API failed")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith(noise)]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def make_backend(**options: Any) -> OpenVinoBackend:
    return OpenVinoBackend(**options)
