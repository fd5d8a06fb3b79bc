"""OpenVINO backend: the exporter's ONNX graphs on OpenVINO's CPU plugin (no re-export).

Each stage is reshaped to fully static input shapes before compiling: at open() when
`profile` binds every named dim of the stage, else on the first run with each new
shape. Compiled models are kept in memory per shape (a pipeline that alternates sizes
does not recompile) and on disk under <cache root>/openvino/<key>/ (engine_cache.py),
so the next process imports the compiled blob instead of compiling.

A stage's compiled models (its weights, in OpenVINO's layout) are shared by its
contexts; each context owns its InferRequests (their activations), so workers run the
same compiled model side by side: with `workers=N` the models compile with N streams,
one per worker, each on its share of the cores.

Precision: bf16 where the CPU has bf16 dot products (AMX or AVX512-BF16) and
OpenVINO agrees, fp32 elsewhere, or as asked. OpenVINO silently runs fp32 when asked
for a precision the CPU lacks, so such a request is refused here instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import QUANTIZERS_AT_CONSUMERS, StageSpec
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime.backends.base import check_feeds, profile_shapes, raise_if_out_of_memory
from diffrt.runtime.backends.initializers import check_weights, read_initializers
from diffrt.runtime.cpu import CpuInfo, cpu_info
from diffrt.runtime.engine_cache import EngineCache, cache_key

try:
    import openvino as ov
except ImportError:
    raise DiffrtError('backend \'openvino\' needs OpenVINO: pip install "diffrt[openvino]"') from None

from diffrt.runtime.backends.openvino_compiled import (  # noqa: E402 - after the one-line error above
    BLOB_NAME,
    DEVICE,
    PERFORMANCE_HINTS,
    PRECISIONS,
    AttentionOps,
    CompileSettings,
    adopt_blob,
    attention_ops,
    blob_header_size,
    choose_precision,
    device_capabilities,
    import_blob,
)

logger = logging.getLogger(__name__)

VERSION = ov.get_version().split("-")[0]  # "2026.4.1"; the key uses the full build string
# Bump when what this file does to a model before compiling changes: old blobs then differ.
RECIPE = 1

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}

Shapes = Mapping[str, Sequence[int]]


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


def compile_graph(core: ov.Core, path: Path, shapes: Shapes, config: Mapping[str, Any],
                  blob_folder: Path | None = None, weights: Mapping[str, np.ndarray] | None = None) -> ov.CompiledModel:
    """Read the ONNX graph (weights in model.onnx.data are memory-mapped), put in the
    `weights` (initializer name -> new value, checked by the caller), fix every input
    shape, compile. The model is not kept: a later shape reads it again, which costs
    far less than the compile it precedes.

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
    if weights:
        replace_constants(model, weights, path)
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


def replace_constants(model: ov.Model, weights: Mapping[str, np.ndarray], path: Path) -> None:
    """Swap the Constants OpenVINO's ONNX reader made of the named initializers (it names
    each Constant's output after its initializer) for Constants of the new values."""
    constants = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            for name in op.output(0).get_names():
                constants[name] = op
    for name, array in weights.items():
        old = constants.get(name)
        if old is None:
            raise ArtifactError(f"{path}: OpenVINO's reading of the graph has no constant {name!r}; re-export the "
                                "model")
        if array.dtype.name in ("bfloat16", "uint16") and old.get_element_type() == ov.Type.bf16:
            tensor = ov.Tensor(ov.Type.bf16, list(array.shape))
            np.asarray(tensor.data).view(np.uint16)[...] = array.view(np.uint16)  # the bit patterns as they are
            new = ov.op.Constant(tensor)
        else:
            new = ov.op.Constant(array)  # a copy: OpenVINO owns it
        new.set_friendly_name(old.get_friendly_name())
        new.output(0).set_names(old.output(0).get_names())
        old.output(0).replace(new.output(0))


class OpenVinoModel:
    """One stage: a compiled model per concrete input shape, shared by the contexts,
    each of which creates its own InferRequest on it (OpenVINO runs the requests of one
    compiled model at the same time, one per stream: the backend compiles with one
    stream per worker).

    Memory: each compiled shape holds its own copy of the weights in OpenVINO's layout,
    so at most `max_shapes` are kept, the least recently used dropped *before* a new
    one compiles (a compile needs about one more copy while it runs). A dropped shape's
    requests are dropped from every context at once; a call running on one keeps it
    alive until it returns."""

    def __init__(self, backend: OpenVinoBackend, folder: Path, spec: StageSpec):
        self.spec = spec
        self._backend, self._folder = backend, folder
        self._compiled: OrderedDict[tuple, ov.CompiledModel] = OrderedDict()
        self._contexts: list[OpenVinoContext] = []
        self._weights: dict[str, np.ndarray] = {}  # update_weights so far: in every later compile
        self._lock = threading.Lock()  # the dicts above and the contexts' requests
        self._compiling = threading.Lock()  # one compile (or update) at a time; runs go on meanwhile
        self._closed = False

    def context(self) -> OpenVinoContext:
        with self._lock:
            self._check_open()
            context = OpenVinoContext(self)
            self._contexts.append(context)
        return context

    def prepare(self, shapes: Shapes) -> None:
        """Compile (or load from the engine cache) for these input shapes now."""
        self._compiled_for(_shape_key(self.spec, shapes), shapes)

    def request(self, context: OpenVinoContext, shapes: Shapes) -> tuple[ov.CompiledModel, ov.InferRequest]:
        """The context's request for these shapes, compiling them first if needed."""
        key = _shape_key(self.spec, shapes)
        with self._lock:
            self._check_open()
            held = context.requests.get(key)
            if held is not None and self._compiled.get(key) is held[0]:
                self._compiled.move_to_end(key)
                return held
        compiled = self._compiled_for(key, shapes)
        with self._lock:
            self._check_open()
            # (compiled, request): a tuple drops its items last to first, so the request
            # goes before the compiled model (and the blob map that model holds).
            held = context.requests[key] = (compiled, compiled.create_infer_request())
            return held

    def _compiled_for(self, key: tuple, shapes: Shapes) -> ov.CompiledModel:
        with self._compiling:
            with self._lock:
                self._check_open()
                if key in self._compiled:
                    self._compiled.move_to_end(key)
                    return self._compiled[key]
                while len(self._compiled) >= self._backend.max_shapes:
                    self._drop(next(iter(self._compiled)))
                weights = dict(self._weights)
            compiled = self._backend.load_compiled(self._folder, self.spec, shapes, weights)
            with self._lock:
                self._check_open()
                self._compiled[key] = compiled
            return compiled

    def _drop(self, key: tuple) -> None:
        """Forget a shape here and in every context (the caller holds the lock), so that
        nothing but a call running on it keeps its weight copy alive."""
        self._compiled.pop(key)
        for context in self._contexts:
            context.requests.pop(key, None)
        logger.info("openvino: %s keeps %d shapes in memory; dropped %s", self.spec.name, self._backend.max_shapes,
                    key)

    def update_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Recompile every shape held with the new values in place of the graph's
        initializers (OpenVINO has no documented way to change a compiled model's
        weights). The compiled shapes are dropped first, so the new ones compile with
        one weight copy fewer held; a call running meanwhile keeps its old copy until
        it returns. Compiled without the engine cache: its keys cover the files' weights."""
        checked = check_weights(self.spec.name, read_initializers(self._folder / self.spec.graph_path), weights)
        with self._compiling:
            with self._lock:
                self._check_open()
                shapes = [dict(zip((t.name for t in self.spec.inputs), key, strict=True)) for key in self._compiled]
                for key in list(self._compiled):
                    self._drop(key)
                self._weights.update(checked)
        started = time.perf_counter()
        for shape in shapes:
            self.prepare(shape)
        logger.info("openvino: %s runs %d new initializer value(s) (%d in all); %d shape(s) recompiled in %.2fs",
                    self.spec.name, len(checked), len(self._weights), len(shapes), time.perf_counter() - started)

    def forget(self, context: OpenVinoContext) -> None:
        with self._lock:
            if context in self._contexts:
                self._contexts.remove(context)
            context.requests.clear()

    def compiled_models(self) -> dict[tuple, ov.CompiledModel]:
        """The compiled models held now, by input shapes (in spec.inputs order)."""
        with self._lock:
            return dict(self._compiled)

    def describe_graph(self) -> str:
        """One line per compiled shape: how much of the attention OpenVINO fused."""
        lines = []
        for key, compiled in self.compiled_models().items():
            ops = attention_ops(compiled)
            lines.append(f"{self.spec.name} {key}: {ops.fused} fused attention, {ops.unfused} unfused softmax")
        return "\n".join(lines)

    def _check_open(self) -> None:
        if self._closed:
            raise DiffrtError(f"stage {self.spec.name}: the model is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for context in self._contexts:
                context.requests.clear()
            self._contexts.clear()
            self._compiled.clear()

    def __enter__(self) -> OpenVinoModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenVinoContext:
    """One worker on an OpenVinoModel: its own InferRequest per compiled shape (the
    activations' memory), one call at a time."""

    def __init__(self, model: OpenVinoModel):
        self.spec = model.spec
        self._model = model
        self.requests: dict[tuple, tuple[ov.CompiledModel, ov.InferRequest]] = {}  # guarded by the model's lock
        self._output_names = [t.name for t in model.spec.outputs]
        self._lock = threading.Lock()  # an InferRequest serves one call at a time

    def prepare(self, shapes: Shapes) -> None:
        """Compile (or load) these input shapes and create this context's request now."""
        shapes = {t.name: tuple(int(d) for d in shapes[t.name]) for t in self.spec.inputs}
        _bind_dims(self.spec, shapes)
        with self._lock:
            self._model.request(self, shapes)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        arrays = {}
        for tensor in self.spec.inputs:
            arrays[tensor.name] = np.ascontiguousarray(feeds[tensor.name], dtype=_NUMPY_DTYPES[tensor.dtype])
        shapes = {name: array.shape for name, array in arrays.items()}
        _bind_dims(self.spec, shapes)
        with self._lock:
            _, request = self._model.request(self, shapes)  # held here until the call returns
            try:
                results = request.infer(arrays, share_inputs=True, share_outputs=False)
            except Exception as exc:  # OpenVINO raises RuntimeError; an allocation failure is the user's size
                raise_if_out_of_memory(exc, self.spec, arrays)
                raise
            return {name: results[name] for name in self._output_names}

    def close(self) -> None:
        with self._lock:
            self._model.forget(self)

    def __enter__(self) -> OpenVinoContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenVinoBackend:
    """`graph_precisions`: OpenVINO reads every graph precision and computes in its own
    inference precision (bf16/fp32 above), so the fp32 graph, the exact source, comes
    first. It takes the portable attention graph: its CPU plugin fuses
    MatMul-Softmax-MatMul itself (attention_ops() counts the fused nodes). int8 graphs
    (`diffrt quantize`, ONNX with QDQ pairs) run on request: the plugin turns the pairs
    into int8 kernels and computes the rest in its inference precision."""

    name = "openvino"
    graph_precisions = ("fp32", "fp16", "bf16", "int8")
    fused_attention = False
    fuses_attention_itself = True  # its CPU plugin's SDPA fusion (attention_ops() counts it)
    reads_graphs = True
    updates_weights = True
    runs_lora_branches = True
    device = "cpu"  # its contexts take and return numpy arrays

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
        workers: int = 1,
    ):
        """`cache_dir`: the engine cache root (default: the artifact's engines/);
        `max_shapes`: compiled shapes kept in memory per stage (each holds its own copy
        of the weights in OpenVINO's layout), least recently used dropped (and freed)
        before a new one compiles. The default, 1, keeps one weight copy per stage
        (SD1.5 size, fp32: 4.8 GB of anonymous memory in all, each more UNet shape
        ~3.4 GB). Another shape then costs an import from the engine cache (a few
        seconds) or a compile (UNet: 10-15 s, the blob written as it compiles); raise it
        where memory allows and requests switch sizes often.
        `workers`: how many contexts of a model run at once; unless `num_streams` is
        given, models compile with one stream each, so that their requests run side by
        side, each on its share of the cores (with one stream they would take turns)."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise DiffrtError(f"workers must be an integer >= 1, got {workers!r}")
        self.core = ov.Core()
        chosen = choose_precision(precision, cpu_info(), device_capabilities(self.core))
        if num_streams is None and workers > 1:
            num_streams = workers
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

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> OpenVinoModel:
        if spec.precision == "int8" and "int8:hybrid" in spec.passes and QUANTIZERS_AT_CONSUMERS not in spec.passes:
            # quantized before diffrt moved NNCF's quantizers past layout ops: OpenVINO computes such graphs
            # wrong at static shapes (relative RMS error 0.45 vs fp32 at SD1.5 size; docs/int8.md)
            raise DiffrtError(f"{spec.name}: this hybrid int8 graph was quantized by an older diffrt and computes "
                              "wrong outputs on OpenVINO; re-run `diffrt quantize OUT --method hybrid`, or run it "
                              "with backend='ort'")
        model = OpenVinoModel(self, Path(folder), spec)
        shapes = profile_shapes(spec, profile)
        if shapes is not None:
            model.prepare(shapes)
        else:
            logger.debug("openvino: profile %s leaves dims of %s unbound; compiling on the first run", profile,
                         spec.name)
        return model

    def load_compiled(self, folder: Path, spec: StageSpec, shapes: Shapes,
                      weights: Mapping[str, np.ndarray] | None = None) -> ov.CompiledModel:
        """The compiled model for `shapes`: imported from the engine cache, else compiled
        (and published to the cache). With `weights` (initializer values that replace
        the graph's), compiled and not cached."""
        config = self.settings.properties()
        cache = self._cache(folder)
        if cache is None or weights:
            return self._compile(folder, spec, shapes, config, weights=weights)
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
                 blob_folder: Path | None = None, weights: Mapping[str, np.ndarray] | None = None) -> ov.CompiledModel:
        started = time.perf_counter()
        compiled = compile_graph(self.core, folder / spec.graph_path, shapes, config, blob_folder, weights)
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


def _shape_key(spec: StageSpec, shapes: Shapes) -> tuple:
    return tuple(tuple(int(d) for d in shapes[t.name]) for t in spec.inputs)


def _shape_text(spec: StageSpec, shapes: Shapes) -> str:
    return " ".join(f"{t.name}={'x'.join(str(d) for d in shapes[t.name])}" for t in spec.inputs)


def _message(exc: BaseException) -> str:
    """The informative line of an OpenVINO error (they start with source locations)."""
    noise = ("Exception from ", "Check '", "FrontEnd API failed")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith(noise)]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def make_backend(**options: Any) -> OpenVinoBackend:
    return OpenVinoBackend(**options)


__all__ = ["AttentionOps", "CompileSettings", "OpenVinoBackend", "OpenVinoContext", "OpenVinoModel", "PERFORMANCE_HINTS",
           "PRECISIONS", "VERSION", "attention_ops", "blob_header_size", "cache_fields", "choose_precision",
           "compile_graph", "device_capabilities", "import_blob", "make_backend", "replace_constants"]
