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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffrt.artifacts import StageSpec
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime import arrays as device_arrays
from diffrt.runtime.backends.base import check_feeds, raise_if_out_of_memory
from diffrt.runtime.cpu import cpu_info
from diffrt.runtime.engine_cache import EngineCache, cache_key
from diffrt.runtime.gpu import gpu_info

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
# ORT's type strings (OrtValue.data_type()) -> numpy
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}
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


class OrtSession:
    """One stage on one onnxruntime InferenceSession."""

    def __init__(self, path: Path, spec: StageSpec, providers: Sequence[Any], options: ort.SessionOptions,
                 binding: IoBinding | None = None):
        self.spec = spec
        wanted = _provider_name(providers[0]) if providers else "CPUExecutionProvider"
        try:
            # enable_fallback=0: a provider that fails to start is an error, not a silent retry
            # on CUDA or the CPU (InferenceSession's default; older versions ignore the key)
            self._session = ort.InferenceSession(str(path), options, providers=list(providers), enable_fallback=0)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for corrupt graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if wanted in GPU_PROVIDERS:  # the graph loaded elsewhere; the provider's libraries are the suspects
                raise DiffrtError(f"onnxruntime {ort.__version__} could not start {wanted} for stage {spec.name} "
                                  f"({first}); check that onnxruntime-gpu matches this machine's CUDA, cuDNN and "
                                  "TensorRT libraries, or use device='cpu'") from None
            raise ArtifactError(f"{path} cannot be loaded by onnxruntime ({first}); re-export the model") from None
        self._session.disable_fallback()  # nor at run time (onnxruntime < 1.2x: the key above is ignored)
        got = self._session.get_providers()
        if not got or got[0] != wanted:
            raise DiffrtError(f"stage {spec.name}: asked onnxruntime {ort.__version__} for {wanted}, but the session "
                              f"runs on {got[0] if got else 'no provider'} (its warnings say why; it lists "
                              f"{', '.join(ort.get_available_providers())}); the GPU providers need onnxruntime-gpu "
                              "and its CUDA, cuDNN and TensorRT libraries, or use device='cpu'")
        self._output_names = [t.name for t in spec.outputs]
        self._binding = binding

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if self._binding is not None:
            return self._binding.run(self._session, self.spec, feeds)
        check_feeds(self.spec, feeds)
        arrays = {}
        for tensor in self.spec.inputs:
            host = device_arrays.to_host(feeds[tensor.name])  # a CuPy array refuses implicit conversion
            arrays[tensor.name] = np.ascontiguousarray(host, dtype=_NUMPY_DTYPES[tensor.dtype])
        try:
            outputs = self._session.run(self._output_names, arrays)
        except Exception as exc:  # onnxruntime raises its own types; an allocation failure is the user's size
            raise_if_out_of_memory(exc, self.spec, arrays)
            raise
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        if self._binding is not None:
            self._binding.close()
        self._session = None

    def __enter__(self) -> OrtSession:
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


class IoBinding:
    """Runs a session through ORT's IOBinding on one device ("cpu" or "cuda").

    Inputs are bound in place (numpy by host pointer; CuPy by device pointer, numpy
    inputs copied to the device first), cast to the graph's input dtype where needed;
    outputs are allocated by ORT on the device and returned without a copy: numpy on
    the CPU, CuPy arrays owning ORT's buffers on CUDA. `cuda_graph`: the session was
    created with the CUDA provider's enable_cuda_graph; inputs are copied into fixed
    buffers and outputs out of fixed ones (ORT replays the captured graph on the
    addresses it captured)."""

    def __init__(self, device: str, device_id: int = 0, cuda_graph: bool = False):
        if device not in ("cpu", "cuda"):
            raise DiffrtError(f"IoBinding device={device!r}; allowed: cpu, cuda")
        self.device, self.device_id, self.cuda_graph = device, device_id, cuda_graph
        self._fixed: dict[str, Any] = {}  # cuda_graph: name -> (input array | output OrtValue), one shape

    def run(self, session: ort.InferenceSession, spec: StageSpec, feeds: Mapping[str, Any]) -> dict[str, Any]:
        binding = session.io_binding()
        keep = []  # inputs must outlive the run
        check_feeds(spec, feeds)
        for tensor in spec.inputs:
            array = self._input(tensor.name, feeds[tensor.name], _NUMPY_DTYPES[tensor.dtype])
            keep.append(array)
            binding.bind_input(tensor.name, self.device, self.device_id, array.dtype, list(array.shape),
                               _pointer(array))
        outputs = self._bind_outputs(session, binding, spec)
        if self.device == "cuda":
            _cuda_sync()  # the inputs were written on CuPy's stream; ORT computes on its own
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own types; an allocation failure is the user's size
            raise_if_out_of_memory(exc, spec, feeds)
            raise
        values = outputs if outputs is not None else binding.get_outputs()
        result = {}
        for tensor, value in zip(spec.outputs, values, strict=True):
            array = value.numpy() if self.device == "cpu" else _cupy_view(value)
            result[tensor.name] = array.copy() if self.cuda_graph else array
        return result

    def _input(self, name: str, array: Any, dtype: Any) -> Any:
        if self.device == "cpu":
            return np.ascontiguousarray(np.asarray(array), dtype=dtype)
        import cupy

        # aligned: the TensorRT provider hands bound addresses to TensorRT (256-byte rule)
        array = device_arrays.aligned(cupy.ascontiguousarray(cupy.asarray(array, dtype=dtype)))
        if not self.cuda_graph:
            return array
        fixed = self._fixed.get(name)
        if fixed is None or fixed.shape != array.shape:
            if fixed is not None:
                raise DiffrtError(f"input {name!r}: shape {tuple(array.shape)} differs from the captured CUDA graph's "
                                  f"{tuple(fixed.shape)}; load with cuda_graphs=False to run several shapes")
            fixed = self._fixed[name] = array.copy()
        else:
            fixed[...] = array
        return fixed

    def close(self) -> None:
        """Free the fixed buffers once CuPy's stream is done with them (the last
        output copy may still be queued there)."""
        if self.device == "cuda" and self._fixed:
            _cuda_sync()
        self._fixed.clear()

    def _bind_outputs(self, session: ort.InferenceSession, binding: Any, spec: StageSpec) -> list | None:
        if not self.cuda_graph:
            for tensor in spec.outputs:
                binding.bind_output(tensor.name, self.device, self.device_id)
            return None
        values = []
        for tensor in spec.outputs:
            key = f"out:{tensor.name}"
            if key not in self._fixed:  # allocated once, at the captured shape
                shape = [d if isinstance(d, int) else -1 for d in tensor.shape]
                if -1 in shape:
                    shape = _output_shape(spec, tensor, self._fixed)
                self._fixed[key] = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, _NUMPY_DTYPES[tensor.dtype], "cuda", self.device_id)
            binding.bind_ortvalue_output(tensor.name, self._fixed[key])
            values.append(self._fixed[key])
        return values


def _output_shape(spec: StageSpec, tensor: Any, fixed: Mapping[str, Any]) -> list[int]:
    """An output's shape from the named dims its inputs bound (CUDA graphs need it up front)."""
    dims: dict[str, int] = {}
    for spec_input in spec.inputs:
        if spec_input.name in fixed:
            dims.update({d: int(v) for d, v in zip(spec_input.shape, fixed[spec_input.name].shape) if isinstance(d, str)})
    unbound = [d for d in tensor.shape if isinstance(d, str) and d not in dims]
    if unbound:
        raise DiffrtError(f"stage {spec.name}: output {tensor.name!r} has dims {', '.join(unbound)} no input fixes; "
                          "CUDA graphs need static output shapes (use cuda_graphs only for the denoiser)")
    return [dims[d] if isinstance(d, str) else d for d in tensor.shape]


def _pointer(array: Any) -> int:
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    return array.data.ptr  # CuPy


def _cuda_sync() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def _cupy_view(value: ort.OrtValue) -> Any:
    """A CuPy array over an OrtValue's device buffer, keeping the OrtValue alive."""
    import cupy

    dtype = np.dtype(_ORT_TYPES[value.data_type()])
    shape = tuple(value.shape())
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = cupy.cuda.UnownedMemory(value.data_ptr(), size, value)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


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


def trt_profile_shapes(spec: StageSpec, dims: Mapping[str, int] | None) -> dict[str, str]:
    """The TensorRT provider's explicit optimization profile for one stage: opt at the
    shape Pipeline.load prepares (`dims`, its named dims), the batch from 1 (one image,
    no CFG) to twice the prepared one (CFG turned on for it), every other dim fixed. In
    the documented format, "name:d1xd2x...,name2:..." per corner, covering every input
    with a dynamic dim (the provider needs all of them). Empty when `dims` leaves one
    unbound: the provider then sizes its profile from the first inputs it sees."""
    if not dims:
        return {}
    batch = int(dims.get("batch", 1))
    corners = {"min": {**dims, "batch": 1}, "opt": dict(dims), "max": {**dims, "batch": 2 * batch}}
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

    def __init__(self, providers: Sequence[str] | str | None = None, intra_op_num_threads: int = 0,
                 cache_dir: str | Path | None = None, disk_cache: bool = True, device: str | None = None,
                 io_binding: bool | None = None, cuda_graphs: bool = False, device_id: int = 0):
        """`cache_dir`: the engine cache root (default: the artifact's engines/);
        `disk_cache=False` optimizes the graphs at every start instead. `device`: "cpu"
        (default), "cuda" or "tensorrt" (onnxruntime-gpu), or name `providers` instead.
        `io_binding` (default: on with a GPU provider) runs through IOBinding, keeping
        outputs on the device; `cuda_graphs` captures the denoiser (CUDA provider)."""
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
        self.graph_precisions = ("fp16", "fp32") if on_gpu else ("fp32", "fp16")

    def to_device(self, array: Any) -> Any:
        if self.device == "cpu":
            return array
        import cupy

        return cupy.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        return device_arrays.to_host(array)  # numpy as it is; CuPy by .get()

    def _binding(self, spec: StageSpec) -> IoBinding | None:
        if not self.io_binding:
            return None
        return IoBinding(self.device, self.device_id, cuda_graph=self.cuda_graphs and spec.role in ("unet", "transformer"))

    def _providers(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None) -> list[Any]:
        """Provider names, with options for the GPU providers (TensorRT's caches under
        <cache root>/ort-trt/<key>/, made before the session builds its engine)."""
        listed: list[Any] = []
        for provider in self.providers:
            if provider not in GPU_PROVIDERS:
                listed.append(provider)
                continue
            trt_cache = None
            if provider == "TensorrtExecutionProvider" and self.disk_cache:
                root = Path(self.cache_dir) if self.cache_dir is not None else folder / "engines"
                fields = {**self.cache_fields(spec), "profile": dict(profile or {}), "gpu": _gpu_name(self.device_id)}
                trt_cache = root / "ort-trt" / cache_key(fields)
                trt_cache.mkdir(parents=True, exist_ok=True)
            cuda_graph = self.cuda_graphs and spec.role in ("unet", "transformer")
            shapes = trt_profile_shapes(spec, profile) if provider == "TensorrtExecutionProvider" else None
            listed.append((provider, gpu_provider_options(provider, trt_cache, spec.precision == "fp16", cuda_graph,
                                                          self.device_id, shapes)))
        return listed

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> OrtSession:
        # ORT runs every shape of the dynamic graph; only its TensorRT provider uses the profile.
        folder = Path(folder)
        graph = folder / spec.graph_path
        if self.on_gpu:
            # GPU providers optimize for the device at session creation (TensorRT's engines
            # are cached by the provider itself); the CPU's saved-graph cache does not apply.
            return OrtSession(graph, spec, self._providers(folder, spec, profile), self._options(),
                              self._binding(spec))
        cache = self._cache(folder)
        if cache is None:
            return OrtSession(graph, spec, self.providers, self._options(), self._binding(spec))
        fields = self.cache_fields(spec)
        key = cache_key(fields)
        entry = cache.lookup(key, fields)
        if entry is not None:
            try:
                return OrtSession(entry / OPTIMIZED_NAME, spec, self.providers, self._options(optimize=False),
                                  self._binding(spec))
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
            sessions.append(OrtSession(graph, spec, self.providers, options, self._binding(spec)))

        cache.publish(key, fields, optimize_into)
        return sessions[0] if sessions else OrtSession(graph, spec, self.providers, self._options(), self._binding(spec))

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
