"""ONNX Runtime backend: the CPU execution provider, and with onnxruntime-gpu on an
NVIDIA GPU the CUDA and TensorRT execution providers (`device="cuda"` or
`device="tensorrt"`, or `providers=` by name).

On a GPU, sessions run through IOBinding: inputs are bound where they are (CuPy
arrays, by device pointer; numpy inputs are copied to the device once), outputs are
allocated by ORT on the device and handed back as CuPy arrays that own them, so the
pipeline keeps latents, embeddings and timesteps on the device across all steps. The
same IOBinding path runs on the CPU provider with `io_binding=True` (tested here; the
CUDA side needs onnxruntime-gpu and a GPU, which our CI machines lack: it is checked
by benchmarks/gpu_check.sh on a GPU machine). `cuda_graphs=True` (CUDA provider)
captures the denoiser's call into a CUDA graph on its first run and replays it: ORT
requires the same input/output addresses at every run, so that session copies its
inputs into fixed device buffers and its outputs out of fixed ones.
The TensorRT provider builds its engines itself; they and its timing cache live under
<cache root>/ort-trt/<key>/ (key: stage files, onnxruntime version, provider options,
profile shapes, GPU name). It is given the portable graphs (TensorRT cannot parse the
fused graphs' com.microsoft MultiHeadAttention; it fuses attention itself) and an
explicit optimization profile (trt_profile_min/opt/max_shapes: the prepared shape,
batch from 1 to twice it), so turning CFG on or off does not rebuild an engine.

A session runs on the provider asked for or fails: onnxruntime's own fallback (retry
on the next provider when one fails to start) is off, and a session whose first
provider is not the requested one (a provider missing from this onnxruntime build) is
a one-line error naming both. `io_binding=False` with a GPU provider keeps the
pipeline's arrays on the host: ORT copies them at every call.

Start-up: ORT's graph optimizations (constant folding, fusions, the CPU's blocked
layouts) take most of a session's creation time: 20-37 s for the SD1.5-size UNet
on 2 cores, against 2.9 s to load the graph ORT saved after optimizing it (measured,
benchmarks/README.md "Start-up"). So the first session of a stage saves its optimized
graph to the engine cache, <cache root>/ort/<key>/ (key: the stage's file hashes,
the onnxruntime version, the providers, the CPU model and flags, since the saved
layouts are specific to the CPU), and later sessions load that with optimizations
off. A damaged entry is rebuilt; an unwritable cache root only costs the speed-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffrt.artifacts import StageSpec
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime import arrays as device_arrays
from diffrt.runtime.backends.base import check_feeds, raise_if_out_of_memory
from diffrt.runtime.backends.initializers import check_weights, read_initializers
from diffrt.runtime.backends.ort_binding import NUMPY_DTYPES, IoBinding
from diffrt.runtime.cpu import cpu_info
from diffrt.runtime.engine_cache import EngineCache, cache_key
from diffrt.runtime.gpu import gpu_info

logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
DEVICES = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
OPTIMIZED_NAME = "model.onnx"
OPTIMIZED_DATA_NAME = "model.onnx.data"
# Bump when what open() asks ORT to do when optimizing changes: old entries then differ.
RECIPE = 1
# Graph optimizers that read a graph's initializers from the file, ignoring add_initializer's.
UNSAFE_WITH_NEW_WEIGHTS = ("NchwcTransformer",)


def create_session(path: Path, spec: StageSpec, providers: Sequence[Any], options: ort.SessionOptions,
                   disabled_optimizers: Sequence[str] = ()) -> ort.InferenceSession:
    """An InferenceSession on exactly the provider asked for (see the module docstring)."""
    wanted = _provider_name(providers[0]) if providers else "CPUExecutionProvider"
    try:
        # enable_fallback=0: a provider that fails to start is an error, not a silent retry
        # on CUDA or the CPU (InferenceSession's default; older versions ignore the key)
        session = ort.InferenceSession(str(path), options, providers=list(providers), enable_fallback=0,
                                       disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for corrupt graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if wanted in GPU_PROVIDERS:  # the graph loaded elsewhere; the provider's libraries are the suspects
            raise DiffrtError(f"onnxruntime {ort.__version__} could not start {wanted} for stage {spec.name} "
                              f"({first}); check that onnxruntime-gpu matches this machine's CUDA, cuDNN and "
                              "TensorRT libraries, or use device='cpu'") from None
        raise ArtifactError(f"{path} cannot be loaded by onnxruntime ({first}); re-export the model") from None
    session.disable_fallback()  # nor at run time (onnxruntime < 1.2x: the key above is ignored)
    got = session.get_providers()
    if not got or got[0] != wanted:
        raise DiffrtError(f"stage {spec.name}: asked onnxruntime {ort.__version__} for {wanted}, but the session "
                          f"runs on {got[0] if got else 'no provider'} (its warnings say why; it lists "
                          f"{', '.join(ort.get_available_providers())}); the GPU providers need onnxruntime-gpu "
                          "and its CUDA, cuDNN and TensorRT libraries, or use device='cpu'")
    return session


@dataclass(frozen=True)
class _Loaded:
    """A session and, when it replays a CUDA graph, the one IoBinding (fixed buffers at
    the captured addresses) and lock that every context of the model shares: ORT
    captures one graph per session, so those contexts take turns."""

    session: ort.InferenceSession
    graph_binding: IoBinding | None = None
    graph_lock: threading.Lock = field(default_factory=threading.Lock)


class OrtModel:
    """One stage on one InferenceSession, shared by its contexts: ONNX Runtime's
    `run` may be called from several threads at once (each call allocates its own
    activations from the shared arena), so contexts need no lock between them."""

    def __init__(self, backend: OrtBackend, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None,
                 session: ort.InferenceSession):
        self.spec = spec
        self._backend, self._folder, self._profile = backend, folder, dict(profile or {})
        self._loaded: _Loaded | None = _Loaded(session, backend.graph_binding(spec))
        # name -> (array, the OrtValue over it): ORT reads the array's memory for as long
        # as the session lives (SessionOptions.add_initializer's contract)
        self._overrides: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}
        self._updating = threading.Lock()

    def loaded(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            raise DiffrtError(f"stage {self.spec.name}: the model is closed")
        return loaded

    def context(self) -> OrtContext:
        self.loaded()
        return OrtContext(self, self._backend.binding(self.spec))

    def update_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """A new session from the exported graph with the new values as initializers
        (SessionOptions.add_initializer: ORT uses them instead of the graph's, before it
        optimizes), replacing the current one once it is built: its optimization takes
        what a first start takes (the saved optimized graph holds the old weights, and
        nothing is saved for the new ones). Both sessions are held while it builds."""
        graph = self._folder / self.spec.graph_path
        checked = check_weights(self.spec.name, read_initializers(graph), weights)
        with self._updating:
            self.loaded()
            overrides = {**self._overrides,
                         **{name: (array, ort.OrtValue.ortvalue_from_numpy(array)) for name, array in checked.items()}}
            started = time.perf_counter()
            session = self._backend.session_with(self._folder, self.spec, self._profile,
                                                 {name: value for name, (_, value) in overrides.items()})
            self._loaded, self._overrides = _Loaded(session, self._backend.graph_binding(self.spec)), overrides
        logger.info("ort: %s runs %d new initializer value(s) (%d in all); session rebuilt in %.2fs", self.spec.name,
                    len(checked), len(overrides), time.perf_counter() - started)

    def close(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.graph_binding is not None:
            loaded.graph_binding.close()

    def __enter__(self) -> OrtModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OrtContext:
    """One worker on an OrtModel: its own IOBinding (when the backend binds), one call
    at a time."""

    def __init__(self, model: OrtModel, binding: IoBinding | None):
        self.spec = model.spec
        self._model, self._binding = model, binding
        self._output_names = [t.name for t in model.spec.outputs]
        self._lock = threading.Lock()
        self._closed = False

    def prepare(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Nothing to do: ONNX Runtime runs every shape of the dynamic graph as it comes."""
        self._check_open()

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self._check_open()
        loaded = self._model.loaded()  # the session of the weights current now, for all of this call
        with self._lock:
            if loaded.graph_binding is not None:
                with loaded.graph_lock:
                    return loaded.graph_binding.run(loaded.session, self.spec, feeds)
            if self._binding is not None:
                return self._binding.run(loaded.session, self.spec, feeds)
            return self._run(loaded.session, feeds)

    def _run(self, session: ort.InferenceSession, feeds: Mapping[str, Any]) -> dict[str, Any]:
        check_feeds(self.spec, feeds)
        arrays = {}
        for tensor in self.spec.inputs:
            host = device_arrays.to_host(feeds[tensor.name])  # a CuPy array refuses implicit conversion
            arrays[tensor.name] = np.ascontiguousarray(host, dtype=NUMPY_DTYPES[tensor.dtype])
        try:
            outputs = session.run(self._output_names, arrays)
        except Exception as exc:  # onnxruntime raises its own types; an allocation failure is the user's size
            raise_if_out_of_memory(exc, self.spec, arrays)
            raise
        return dict(zip(self._output_names, outputs, strict=True))

    def _check_open(self) -> None:
        if self._closed:
            raise DiffrtError(f"stage {self.spec.name}: the context is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._binding is not None:
                self._binding.close()

    def __enter__(self) -> OrtContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared_arena_registered = False


def _use_shared_cpu_arena(options: ort.SessionOptions) -> None:
    """All sessions of the process draw CPU memory from ONE registered arena.

    With one arena per session (the default) each session keeps its own high-water
    mark, so the UNet's and the VAE decoder's peaks add up. benchmarks/real_size_sd15.py
    at 768x768 on SD1.5 measured a process peak of 18.3 GiB with per-session arenas
    and 14.9 GiB with the shared one, at about the same speed (benchmarks/README.md).
    """
    global _shared_arena_registered
    if not _shared_arena_registered:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _shared_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def _provider_name(provider: Any) -> str:
    """A providers= entry is a name or a (name, options) pair."""
    return provider[0] if isinstance(provider, tuple) else str(provider)


def provider_list(device: str | None, providers: Sequence[str] | str | None) -> list[str]:
    """The execution providers, by device name or by provider names (comma-separated
    from the CLI: -O providers=CUDAExecutionProvider,CPUExecutionProvider)."""
    if device is not None and providers is not None:
        raise DiffrtError("give the ort backend device= or providers=, not both")
    if device is not None:
        if device not in DEVICES:
            raise DiffrtError(f"ort device={device!r}; choose one of: {', '.join(DEVICES)}")
        return list(DEVICES[device])
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    return list(providers) if providers else ["CPUExecutionProvider"]


def gpu_provider_options(provider: str, cache: Path | None, fp16: bool, cuda_graph: bool,
                         device_id: int = 0, profile_shapes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The documented provider options diffrt sets (onnxruntime-gpu, TensorRT and CUDA
    execution provider docs): TensorRT's engine and timing caches in `cache`, its
    explicit profile (`trt_profile_shapes`)."""
    if provider == "CUDAExecutionProvider":
        options: dict[str, Any] = {"device_id": device_id, "cudnn_conv_algo_search": "EXHAUSTIVE",
                                   "cudnn_conv_use_max_workspace": "1"}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options
    if provider == "TensorrtExecutionProvider":
        options = {"device_id": device_id, "trt_fp16_enable": fp16, "trt_builder_optimization_level": 3,
                   **(profile_shapes or {})}
        if cache is not None:
            options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)})
        return options
    return {}


UNET_TEXT_CHUNKS = 3  # as `diffrt build --text-chunks` defaults to


def trt_profile_shapes(spec: StageSpec, dims: Mapping[str, int] | None) -> dict[str, str]:
    """The TensorRT provider's explicit optimization profile for one stage: opt at the
    shape Pipeline.load prepares (`dims`, its named dims), the batch from 1 (one image,
    no CFG) to twice the prepared one (CFG turned on for it), an SD/SDXL UNet's text length
    from one to UNET_TEXT_CHUNKS weighted-prompt chunks, every other dim fixed. In
    the documented format, "name:d1xd2x...,name2:..." per corner, covering every input
    with a dynamic dim (the provider needs all of them). Empty when `dims` leaves one
    unbound: the provider then sizes its profile from the first inputs it sees."""
    if not dims:
        return {}
    batch = int(dims.get("batch", 1))
    corners = {"min": {**dims, "batch": 1}, "opt": dict(dims), "max": {**dims, "batch": 2 * batch}}
    if spec.role == "unet" and "text_length" in dims:  # SD/SDXL: weighted prompts of up to 3 chunks of text
        corners["max"]["text_length"] = UNET_TEXT_CHUNKS * int(dims["text_length"])
    options = {}
    for corner, values in corners.items():
        parts = []
        for tensor in spec.inputs:
            if all(isinstance(d, int) for d in tensor.shape):
                continue
            if any(isinstance(d, str) and d not in values for d in tensor.shape):
                logger.info("stage %s: no explicit TensorRT profile (input %s has dims %s, prepared %s)",
                            spec.name, tensor.name, list(tensor.shape), dict(dims))
                return {}
            shape = [d if isinstance(d, int) else int(values[d]) for d in tensor.shape]
            parts.append(f"{tensor.name}:{'x'.join(str(d) for d in shape)}")
        options[f"trt_profile_{corner}_shapes"] = ",".join(parts)
    return options


class OrtBackend:
    """`graph_precisions`: fp32 first on the CPU (its EP has fp16 kernels only for data
    movement: fp16 graphs run, but through inserted Casts around fp32 kernels), fp16
    first with a GPU provider; never bf16 (no kernels). It prefers the fused-attention
    graph: one MultiHeadAttention kernel instead of materialized score tensors
    (benchmarks/attention_fusion.py measures the memory and speed), except with the
    TensorRT provider first: TensorRT parses only the portable graph and fuses its
    attention itself."""

    name = "ort"
    fused_attention = True  # per instance: False with the TensorRT provider
    fuses_attention_itself = False
    reads_graphs = True
    updates_weights = True
    runs_lora_branches = True

    def __init__(self, providers: Sequence[str] | str | None = None, intra_op_num_threads: int = 0,
                 cache_dir: str | Path | None = None, disk_cache: bool = True, device: str | None = None,
                 io_binding: bool | None = None, cuda_graphs: bool = False, device_id: int = 0,
                 workers: int = 1):
        """`cache_dir`: the engine cache root (default: the artifact's engines/);
        `disk_cache=False` optimizes the graphs at every start instead. `device`: "cpu"
        (default), "cuda" or "tensorrt" (onnxruntime-gpu), or name `providers` instead.
        `io_binding` (default: on with a GPU provider) runs through IOBinding, keeping
        outputs on the device; `cuda_graphs` captures the denoiser (CUDA provider).
        `workers` (contexts running at once) changes nothing here: their calls share
        the session's thread pool (`intra_op_num_threads`) and its arena."""
        available = ort.get_available_providers()
        self.providers = provider_list(device, providers)
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise DiffrtError(f"onnxruntime has no {', '.join(missing)} here; available: {', '.join(available)} "
                              "(the CUDA and TensorRT providers need onnxruntime-gpu and an NVIDIA GPU)")
        self.intra_op_num_threads = intra_op_num_threads
        self.cache_dir = cache_dir
        self.disk_cache = bool(disk_cache)
        self.device_id = int(device_id)
        self._caches: dict[Path, EngineCache] = {}  # one per root, so "not writable" is said once
        on_gpu = any(p in self.providers for p in GPU_PROVIDERS)
        self.on_gpu = on_gpu
        self.io_binding = on_gpu if io_binding is None else bool(io_binding)
        # where the sessions' outputs live: on the device only through IOBinding; without it
        # ORT copies host arrays in and out at every call, so the pipeline keeps numpy arrays
        self.device = "cuda" if on_gpu and self.io_binding else "cpu"
        with_trt = self.providers[:1] == ["TensorrtExecutionProvider"]
        self.fused_attention = not with_trt
        self.fuses_attention_itself = with_trt
        if cuda_graphs and "CUDAExecutionProvider" not in self.providers[:1]:
            raise DiffrtError("cuda_graphs=True needs the CUDA provider first (device='cuda')")
        self.cuda_graphs = bool(cuda_graphs)
        # int8 (`diffrt quantize`: QDQ / integer-op graphs) only when asked for, never the default
        self.graph_precisions = ("fp16", "fp32", "int8") if on_gpu else ("fp32", "fp16", "int8")

    def to_device(self, array: Any) -> Any:
        if self.device == "cpu":
            return array
        import cupy

        return cupy.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        return device_arrays.to_host(array)  # numpy as it is; CuPy by .get()

    def _captures(self, spec: StageSpec) -> bool:
        return self.cuda_graphs and spec.role in ("unet", "transformer")

    def binding(self, spec: StageSpec) -> IoBinding | None:
        """A context's own IOBinding (None when the backend does not bind, or when the
        stage replays a CUDA graph: then the model's one binding serves every context)."""
        if not self.io_binding or self._captures(spec):
            return None
        return IoBinding(self.device, self.device_id)

    def graph_binding(self, spec: StageSpec) -> IoBinding | None:
        """The binding a CUDA-graph session's contexts share (its fixed buffers are the
        addresses ORT captured), else None."""
        return IoBinding(self.device, self.device_id, cuda_graph=True) if self._captures(spec) else None

    def _providers(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None,
                   engine_cache: bool = True) -> list[Any]:
        """Provider names, with options for the GPU providers (TensorRT's caches under
        <cache root>/ort-trt/<key>/, made before the session builds its engine; none
        with `engine_cache=False`: weights other than the files' would not be in its key)."""
        listed: list[Any] = []
        for provider in self.providers:
            if provider not in GPU_PROVIDERS:
                listed.append(provider)
                continue
            trt_cache = None
            if provider == "TensorrtExecutionProvider" and self.disk_cache and engine_cache:
                root = Path(self.cache_dir) if self.cache_dir is not None else folder / "engines"
                fields = {**self.cache_fields(spec), "profile": dict(profile or {}), "gpu": _gpu_name(self.device_id)}
                trt_cache = root / "ort-trt" / cache_key(fields)
                trt_cache.mkdir(parents=True, exist_ok=True)
            shapes = trt_profile_shapes(spec, profile) if provider == "TensorrtExecutionProvider" else None
            listed.append((provider, gpu_provider_options(provider, trt_cache, spec.precision == "fp16",
                                                          self._captures(spec), self.device_id, shapes)))
        return listed

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> OrtModel:
        # ORT runs every shape of the dynamic graph; only its TensorRT provider uses the profile.
        folder = Path(folder)
        return OrtModel(self, folder, spec, profile, self._session(folder, spec, profile))

    def _session(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None) -> ort.InferenceSession:
        graph = folder / spec.graph_path
        if self.on_gpu:
            # GPU providers optimize for the device at session creation (TensorRT's engines
            # are cached by the provider itself); the CPU's saved-graph cache does not apply.
            return create_session(graph, spec, self._providers(folder, spec, profile), self._options())
        cache = self._cache(folder)
        if cache is None:
            return create_session(graph, spec, self.providers, self._options())
        fields = self.cache_fields(spec)
        key = cache_key(fields)
        entry = cache.lookup(key, fields)
        if entry is not None:
            try:
                return create_session(entry / OPTIMIZED_NAME, spec, self.providers, self._options(optimize=False))
            except ArtifactError as exc:
                cache.discard(key, str(exc))
        sessions = []

        def optimize_into(tmp: Path) -> None:
            options = self._options()
            options.optimized_model_filepath = str(tmp / OPTIMIZED_NAME)
            if len(spec.files) > 1:  # weights over protobuf's 2 GB limit: one data file again
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 OPTIMIZED_DATA_NAME)
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")
            sessions.append(create_session(graph, spec, self.providers, options))

        cache.publish(key, fields, optimize_into)
        return sessions[0] if sessions else create_session(graph, spec, self.providers, self._options())

    def session_with(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None,
                     initializers: Mapping[str, ort.OrtValue]) -> ort.InferenceSession:
        """A session of the exported graph with these initializers in place of its own,
        optimized from scratch and saved nowhere (no cache key covers these weights).

        Without ORT's NchwcTransformer (the CPU's blocked Conv layout): it builds its
        reordered Conv weights from the graph file's values, not from add_initializer's
        (onnxruntime 1.32: every Conv weight of the tiny test UNet kept its old value;
        with it off, each of the tiny UNet's, VAE's and text encoder's initializers runs
        as if written into the graph, tests/test_contexts.py)."""
        options = self._options()
        for name, value in initializers.items():
            options.add_initializer(name, value)
        providers = self._providers(folder, spec, profile, engine_cache=False) if self.on_gpu else self.providers
        return create_session(folder / spec.graph_path, spec, providers, options, UNSAFE_WITH_NEW_WEIGHTS)

    def cache_fields(self, spec: StageSpec) -> dict[str, Any]:
        """Everything the saved optimized graph depends on."""
        cpu = cpu_info()
        return {"stage": spec.name, "files": [f.sha256 for f in spec.files], "onnxruntime": ort.__version__,
                "providers": list(self.providers), "cpu": cpu.model, "cpu_flags": sorted(cpu.flags),
                "machine": cpu.machine, "recipe": RECIPE}

    def _options(self, optimize: bool = True) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                             else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.intra_op_num_threads = self.intra_op_num_threads  # 0: one per physical core
        # fatal only: a failed run is raised to the caller (and reported as one line
        # there); ORT's own error log would print the same failure a second time, raw
        options.log_severity_level = 4
        _use_shared_cpu_arena(options)
        return options

    def _cache(self, folder: Path) -> EngineCache | None:
        if not self.disk_cache:
            return None
        root = Path(self.cache_dir) if self.cache_dir is not None else folder / "engines"
        if root not in self._caches:
            self._caches[root] = EngineCache(root, self.name)
        return self._caches[root]

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({', '.join(self.providers)})"


def _gpu_name(device_id: int) -> str:
    try:
        return gpu_info(device_id).name
    except Exception:  # noqa: BLE001 - no CuPy: the key still separates by provider options
        return "unknown-gpu"


def make_backend(**options: Any) -> OrtBackend:
    return OrtBackend(**options)
