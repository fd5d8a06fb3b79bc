"""TensorRT backend: engines built ahead of time by `diffrt build OUT --backend tensorrt`
(diffrt/build/tensorrt.py), run on an NVIDIA GPU with device buffers from CuPy.

    diffrt build OUT --backend tensorrt --batch 1-4 --size 512x512
    diffrt generate OUT "a prompt" --backend tensorrt [-O cuda_graphs=1]
    Pipeline.load(OUT, backend="tensorrt", cuda_graphs=True)

`open()` finds the stage's engines in the engine cache (OUT/engines/tensorrt/, or
`cache_dir`): built for this stage's files, this TensorRT version and this GPU, with a
profile covering the shape Pipeline.load prepares (the narrowest such engine wins: a
static engine for exactly that shape is the fastest). Nothing is built at load: a
stage without an engine is a one-line error saying what to run.

The model (TensorRTModel) holds the deserialized engines, the weights, shared by its
contexts; each context (TensorRTContext) owns an execution context per engine (its
activation memory), its CUDA graphs and its own CUDA stream, so contexts run at the
same time. Each call checks the feed shapes against the engine's profile (a shape
outside is an error naming the shape and the built range; another engine of the stage
that covers it is loaded instead when there is one), sets the input shapes and the
tensor addresses, and enqueues the engine on the context's stream. Inputs may be
numpy arrays (copied to the GPU) or CuPy arrays (cast to the engine's dtype on the GPU
where needed; a view that does not start on a 256-byte boundary, such as one step's
row of the pipeline's timestep array, is copied: TensorRT requires every tensor address
to be 256-byte aligned); outputs are fresh CuPy arrays the caller owns. The context's
stream waits for the caller's current stream before running and the caller's stream
waits for it after, so no host synchronization is needed between stages. Closing a
context waits for its stream before freeing its execution contexts and buffers.

`cuda_graphs=True` captures each engine's run into a CUDA graph per input shape (after
a warm-up run), replays it on later calls, and copies the outputs out of the graph's
fixed buffers into fresh arrays: less launch overhead for small or static engines.

`model.update_weights` refits the engines in place (trt.Refitter: set_named_weights,
then refit_cuda_engine; the ONNX parser names an engine's weights after the graph's
initializers), for engines built with `diffrt build --refittable`. TensorRT's refit
API cannot run while the engine runs: it waits for every context's running call and
stream first, and holds new calls until done; captured CUDA graphs are dropped (they
are captured again on their next call). Weights TensorRT says it needs with the given
ones (get_missing_weights: it combined them with others when it optimized) are
supplied from the values set before, else from the artifact's graph.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cupy as cp
import numpy as np
import tensorrt as trt

from diffrt.artifacts import StageSpec
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime.arrays import aligned
from diffrt.runtime.backends.base import check_feeds
from diffrt.runtime.backends.initializers import check_weights, read_initializers, read_values
from diffrt.runtime.backends.tensorrt_runner import Runner
from diffrt.runtime.engine_cache import EngineCache
from diffrt.runtime.tensorrt_engines import (
    BACKEND,
    GRAPH_PRECISIONS,
    BuiltEngine,
    GpuInfo,
    check_shapes,
    choose_engine,
    find_engines,
    gpu_info,
    trt_logger,
)

logger = logging.getLogger(__name__)


_DTYPES = {
    trt.DataType.FLOAT: np.float32,
    trt.DataType.HALF: np.float16,
    trt.DataType.INT32: np.int32,
    trt.DataType.INT64: np.int64,
    trt.DataType.INT8: np.int8,
    trt.DataType.UINT8: np.uint8,
    trt.DataType.BOOL: np.bool_,
}


class _Engine:
    """One deserialized engine (the weights), shared by the contexts of a model."""

    def __init__(self, built: BuiltEngine, spec: StageSpec, backend: TensorRTBackend):
        self.built, self.profile, self.backend = built, built.profile, backend
        self.label = f"{built.path.name} ({spec.name})"
        backend.log.clear()
        engine = backend.runtime.deserialize_cuda_engine(built.plan.read_bytes())
        if engine is None:
            raise ArtifactError(f"{built.plan} cannot be loaded by TensorRT {trt.__version__} "
                                f"({backend.log.why()}); delete {built.path} and run "
                                "`diffrt build OUT --backend tensorrt` again")
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in, want_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        if sorted(self.inputs) != sorted(want_in) or not set(want_out) <= set(self.outputs):
            raise ArtifactError(f"TensorRT engine {self.label} has inputs {self.inputs} and outputs {self.outputs}; "
                                f"the stage has {want_in} and {want_out}: delete {built.path} and build again")
        self.dtypes = {}
        for name in names:
            dtype = engine.get_tensor_dtype(name)
            if dtype not in _DTYPES:
                raise DiffrtError(f"TensorRT engine {self.label}: tensor {name} is {dtype}, which CuPy cannot hold; "
                                  "export the stage with float32 inputs and outputs")
            self.dtypes[name] = np.dtype(_DTYPES[dtype])

    def execution_context(self) -> Any:
        self.backend.log.clear()
        context = self.engine.create_execution_context()
        if context is None:
            why = self.backend.log.why("out of GPU memory?")
            raise DiffrtError(f"TensorRT engine {self.label}: no execution context ({why}); close other GPU "
                              "programs, run fewer workers or build for smaller shapes")
        return context

    def refit(self, weights: Mapping[str, np.ndarray], supply: Callable[[list[str]], Mapping[str, np.ndarray]]) -> None:
        """Set `weights` in the engine (the caller made sure nothing runs on it), with
        the ones TensorRT says it needs besides from `supply(names)`."""
        log = self.backend.log
        if not self.engine.refittable:
            raise DiffrtError(f"TensorRT engine {self.label} was not built refittable; build it again with "
                              "`diffrt build OUT --backend tensorrt --refittable` to update its weights")
        log.clear()
        refitter = trt.Refitter(self.engine, log)
        keep = []  # the Weights point into these arrays until refit_cuda_engine returns

        def put(values: Mapping[str, np.ndarray]) -> None:
            for name, array in values.items():
                keep.append(array)
                if not refitter.set_named_weights(name, _weights(array)):
                    raise DiffrtError(f"TensorRT engine {self.label}: set_named_weights({name!r}) failed "
                                      f"({log.why('not a refittable weight of this engine')})")

        put(weights)
        missing = [name for name in refitter.get_missing_weights() if name not in weights]
        if missing:
            put(supply(missing))
        if not refitter.refit_cuda_engine():
            raise DiffrtError(f"TensorRT engine {self.label}: refit_cuda_engine failed ({log.why()})")


def _weights(array: np.ndarray) -> Any:
    """A trt.Weights over the array's memory (bfloat16: its bit patterns, typed BF16)."""
    if array.dtype.name in ("bfloat16", "uint16"):
        return trt.Weights(trt.DataType.BF16, array.ctypes.data, array.size)
    return trt.Weights(array)


class _Gate:
    """Runs go through side by side; a refit waits for the running ones to leave and
    holds new ones until it is done (TensorRT's refit must not overlap inference)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._runs = 0
        self._refitting = False

    @contextlib.contextmanager
    def run(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._refitting)
            self._runs += 1
        try:
            yield
        finally:
            with self._cond:
                self._runs -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def refit(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._refitting)
            self._refitting = True
            self._cond.wait_for(lambda: self._runs == 0)
        try:
            yield
        finally:
            with self._cond:
                self._refitting = False
                self._cond.notify_all()


class TensorRTModel:
    """One stage: its engines (deserialized as shapes need them), shared by its contexts."""

    def __init__(self, folder: Path, spec: StageSpec, engines: Sequence[BuiltEngine], first: BuiltEngine,
                 backend: TensorRTBackend):
        self.spec = spec
        self._folder, self._backend = folder, backend
        self._built = list(engines)
        self._first = first
        self._engines: dict[Path, _Engine] = {}
        self._contexts: list[TensorRTContext] = []
        self._weights: dict[str, np.ndarray] = {}  # update_weights so far: set in every engine loaded later
        self._lock = threading.Lock()
        self._gate = _Gate()
        self._closed = False
        self.engine(first)

    def engine(self, built: BuiltEngine) -> _Engine:
        with self._lock:
            if self._closed:
                raise DiffrtError(f"stage {self.spec.name}: the model is closed")
            if built.path not in self._engines:
                logger.info("TensorRT: loading %s for stage %s (%s)", built.plan, self.spec.name,
                            built.profile.describe())
                loaded = _Engine(built, self.spec, self._backend)
                if self._weights:
                    loaded.refit(self._weights, self._graph_values)
                self._engines[built.path] = loaded
            return self._engines[built.path]

    def engine_for(self, shapes: Mapping[str, Sequence[int]], current: _Engine | None) -> _Engine:
        """`current` if its profile covers `shapes`, else the narrowest built engine that does."""
        if current is not None and not current.profile.problem(shapes):
            return current
        covering = [b for b in self._built if not b.profile.problem(shapes)]
        if not covering:
            nearest = current or self.engine(self._first)
            check_shapes(nearest.label, nearest.profile, shapes)  # raises, naming the range
        return self.engine(min(covering, key=lambda b: b.profile.span()))

    def context(self) -> TensorRTContext:
        context = TensorRTContext(self, self._backend)
        with self._lock:
            self._contexts.append(context)
        return context

    def running(self):
        return self._gate.run()

    def update_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        checked = check_weights(self.spec.name, read_initializers(self._folder / self.spec.graph_path), weights)
        with self._gate.refit():
            with self._lock:
                engines, contexts = list(self._engines.values()), list(self._contexts)
            for worker in contexts:  # nothing may still run on the old weights
                worker.synchronize()
            for loaded in engines:
                loaded.refit(checked, self._graph_values)
            self._weights.update(checked)
            for worker in contexts:
                worker.drop_graphs()  # captured before the refit
        logger.info("TensorRT: %s refit with %d new weight(s) (%d in all)", self.spec.name, len(checked),
                    len(self._weights))

    def _graph_values(self, names: list[str]) -> dict[str, np.ndarray]:
        """The values of weights TensorRT needs besides the new ones: set before, or the graph's."""
        values = {name: self._weights[name] for name in names if name in self._weights}
        rest = [name for name in names if name not in values]
        if rest:
            values.update(read_values(self._folder / self.spec.graph_path, rest))
        return values

    def forget(self, context: TensorRTContext) -> None:
        with self._lock:
            if context in self._contexts:
                self._contexts.remove(context)

    def close(self) -> None:
        with self._lock:
            contexts, self._contexts = list(self._contexts), []
            self._closed = True
        for worker in contexts:
            worker.close()
        with self._lock:
            self._engines.clear()

    def __enter__(self) -> TensorRTModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorRTContext:
    """One worker on a TensorRTModel: an execution context per engine it has used, its
    CUDA graphs and its own stream; one call at a time."""

    def __init__(self, model: TensorRTModel, backend: TensorRTBackend):
        self.spec = model.spec
        self._model, self._backend = model, backend
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._runners: dict[Path, Runner] = {}
        self._current: Runner | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _runner_for(self, shapes: Mapping[str, Sequence[int]]) -> Runner:
        loaded = self._model.engine_for(shapes, self._current.loaded if self._current is not None else None)
        runner = self._runners.get(loaded.built.path)
        if runner is None:
            runner = self._runners[loaded.built.path] = Runner(loaded)
        self._current = runner
        return runner

    def prepare(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Choose the engine for these shapes and create the execution context on it now."""
        with self._lock, self._model.running():  # an engine it loads is refit like the others
            self._check_open()
            self._runner_for({t.name: tuple(shapes[t.name]) for t in self.spec.inputs}).set_shapes(shapes)

    def _device_input(self, name: str, value: Any, dtype: np.dtype) -> cp.ndarray:
        if isinstance(value, cp.ndarray):
            array = value
        elif isinstance(value, (np.ndarray, np.generic, int, float)):
            array = cp.asarray(np.ascontiguousarray(value, dtype=dtype))
        elif hasattr(value, "__dlpack__"):
            array = cp.from_dlpack(value)
        else:
            raise DiffrtError(f"stage {self.spec.name}: input {name!r} is a {type(value).__name__}; "
                              "give a numpy or CuPy array")
        if array.dtype != dtype:
            array = array.astype(dtype)
        return aligned(cp.ascontiguousarray(array))

    def run(self, feeds: Mapping[str, Any]) -> dict[str, cp.ndarray]:
        check_feeds(self.spec, feeds)
        shapes = {t.name: tuple(np.shape(feeds[t.name])) for t in self.spec.inputs}
        with self._lock, self._model.running():
            self._check_open()
            runner = self._runner_for(shapes)
            arrays = {name: self._device_input(name, feeds[name], runner.dtypes[name]) for name in runner.inputs}
            outputs = runner.run(arrays, self.stream, self._backend.cuda_graphs)
            cp.cuda.get_current_stream().wait_event(self.stream.record())
        return {t.name: outputs[t.name] for t in self.spec.outputs}

    def synchronize(self) -> None:
        self.stream.synchronize()

    def drop_graphs(self) -> None:
        for runner in self._runners.values():
            runner.graphs.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise DiffrtError(f"stage {self.spec.name}: the context is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._runners:
                # CuPy returns freed memory to its pool at once and TensorRT frees a context's
                # memory at once: wait for what is still queued on the stream to finish first.
                self.stream.synchronize()
            for runner in self._runners.values():
                runner.close()
            self._runners.clear()
            self._current = None
        self._model.forget(self)

    def __enter__(self) -> TensorRTContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorRTBackend:
    name = BACKEND
    graph_precisions = GRAPH_PRECISIONS
    fused_attention = False
    fuses_attention_itself = True
    reads_graphs = True
    updates_weights = True  # engines built with --refittable (refit says so of others)
    runs_lora_branches = False  # `diffrt build` builds engines of the plain graphs
    device = "cuda"

    def __init__(self, cache_dir: str | Path | None = None, cuda_graphs: bool | int = False, workers: int = 1):
        """`cache_dir`: the engine cache root (default: the artifact's engines/), as
        given to `diffrt build --cache-dir`; `cuda_graphs`: capture and replay.
        `workers` changes nothing here: each context has its own stream."""
        if cuda_graphs not in (True, False, 0, 1):
            raise DiffrtError(f"cuda_graphs={cuda_graphs!r}; use 1 or 0 (True or False)")
        self.cache_dir = cache_dir
        self.cuda_graphs = bool(cuda_graphs)
        self.log = trt_logger(trt)
        self.runtime = trt.Runtime(self.log)
        self.gpu: GpuInfo = gpu_info()

    def to_device(self, array: Any) -> cp.ndarray:
        return cp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        return array.get() if isinstance(array, cp.ndarray) else np.asarray(array)

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> TensorRTModel:
        folder = Path(folder)
        cache = EngineCache(Path(self.cache_dir) if self.cache_dir is not None else folder / "engines", BACKEND)
        engines = find_engines(cache, spec, trt.__version__, self.gpu)
        if not engines and spec.role == "vae_encoder":  # opened by the first image-to-image call only
            raise DiffrtError("image-to-image on TensorRT needs a VAE encoder engine, which `diffrt build` does not "
                              "build yet; run requests that start from a picture on the ort or openvino backend")
        if not engines:
            raise DiffrtError(f"no TensorRT engine for stage {spec.describe()} built with TensorRT {trt.__version__} "
                              f"on {self.gpu.name} in {cache.folder}; run `diffrt build {folder} --backend tensorrt` "
                              "first (with --batch/--size for the shapes you need)")
        chosen = choose_engine(engines, profile)
        if chosen is None:
            built = " | ".join(e.profile.describe() for e in engines)
            raise DiffrtError(f"the TensorRT engines of stage {spec.name} do not cover {dict(profile or {})} (built: "
                              f"{built}); run `diffrt build {folder} --backend tensorrt` with a --batch/--size range "
                              "that includes it")
        return TensorRTModel(folder, spec, engines, chosen, self)

    def describe(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graphs else ""
        return (f"TensorRT {trt.__version__} on {self.gpu.name} (compute {self.gpu.compute_capability}), "
                f"CuPy {cp.__version__}{graphs}")


def make_backend(**options: Any) -> TensorRTBackend:
    return TensorRTBackend(**options)
