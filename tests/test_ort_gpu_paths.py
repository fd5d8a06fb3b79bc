"""The ORT backend's GPU paths, as far as a CPU machine can run them.

IOBinding (what keeps arrays on the device with the CUDA and TensorRT providers) runs
here on the CPU provider with `io_binding=True`: it must give exactly what the plain
`run` gives, for one stage and for a whole pipeline. Provider selection and the
provider options diffrt sets are pure functions, checked here; the CUDA side itself
(CuPy views over ORT's device buffers, CUDA graphs) needs onnxruntime-gpu and a GPU
and is run by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from diffrt.artifacts import read_manifest
from diffrt.errors import DiffrtError
from diffrt.runtime.backends import get_backend
from diffrt.runtime.backends import ort as ort_backend
from diffrt.runtime.backends import ort_binding
from diffrt.runtime.pipeline import Pipeline


def _unet_feeds(rng):
    return {"sample": rng.standard_normal((2, 4, 12, 20), dtype=np.float32),
            "timestep": np.array([10.0, 700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}


@pytest.mark.parametrize("stage", ["unet-fused", "unet", "text_encoder", "vae_decoder"])
def test_io_binding_equals_plain_run(exported, stage):
    artifact = exported("sd15")
    spec = read_manifest(artifact).stage(stage)
    rng = np.random.default_rng(0)
    if spec.role == "unet":
        feeds = _unet_feeds(rng)
    elif spec.role == "text_encoder":
        feeds = {"input_ids": rng.integers(0, 99, (2, 77)).astype(np.int64)}
    else:
        feeds = {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)}
    plain = get_backend("ort", disk_cache=False).open(artifact, spec).context().run(feeds)
    bound_backend = get_backend("ort", disk_cache=False, io_binding=True)
    bound = bound_backend.open(artifact, spec).context().run(feeds)
    assert bound.keys() == plain.keys()
    for name in plain:
        assert isinstance(bound[name], np.ndarray)
        np.testing.assert_array_equal(bound[name], plain[name])


def test_io_binding_casts_and_reports_missing_inputs(exported):
    artifact = exported("sd15")
    spec = read_manifest(artifact).stage("unet-fused")
    session = get_backend("ort", disk_cache=False, io_binding=True).open(artifact, spec).context()
    feeds = _unet_feeds(np.random.default_rng(1))
    as_float64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    np.testing.assert_array_equal(session.run(as_float64)["out_sample"], session.run(feeds)["out_sample"])
    with pytest.raises(DiffrtError, match="input 'timestep' was not fed"):
        session.run({k: v for k, v in feeds.items() if k != "timestep"})


def test_pipeline_through_io_binding_is_identical(exported):
    artifact = exported("sd15")
    args = dict(num_inference_steps=3, height=64, width=64, seed=3, output_type="np")
    with Pipeline.load(artifact, disk_cache=False) as pipe:
        plain = pipe("a cat", **args).images
    with Pipeline.load(artifact, disk_cache=False, io_binding=True) as pipe:
        bound = pipe("a cat", **args).images
    np.testing.assert_array_equal(bound, plain)


def test_provider_selection():
    assert ort_backend.provider_list(None, None) == ["CPUExecutionProvider"]
    assert ort_backend.provider_list("cuda", None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_backend.provider_list("tensorrt", None)[0] == "TensorrtExecutionProvider"
    assert ort_backend.provider_list(None, "CUDAExecutionProvider, CPUExecutionProvider") == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(DiffrtError, match="choose one of: cpu, cuda, tensorrt"):
        ort_backend.provider_list("rocm", None)
    with pytest.raises(DiffrtError, match="not both"):
        ort_backend.provider_list("cuda", ["CPUExecutionProvider"])


# Provider option names as ONNX Runtime documents and parses them (the CPU build here has
# no GPU provider to ask, and onnxruntime exposes no list of option names at run time):
# - TensorRT: the provider_option_names ProviderOptionsParser accepts in
#   microsoft/onnxruntime onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_info.cc
#   (commit 3a282a295475775510fbfa5234bda55a2db6f015); types from the options table of
#   docs/execution-providers/TensorRT-ExecutionProvider.md ("for bool type options, assign
#   them with True/False in python"; profiles "input_tensor_1:dim_1xdim_2x...,input_tensor_2:...").
# - CUDA: the options of docs/execution-providers/CUDA-ExecutionProvider.md
#   (commit d0ea319e9b71f66abc5abdc8c65ce5456ab06780); cudnn_conv_algo_search's values from there.
# The parsers reject an unknown key ("Unknown provider option"), but only on a GPU machine:
# a misspelled key has to fail here.
TRT_OPTIONS = {
    "device_id": int, "has_user_compute_stream": bool, "trt_max_partition_iterations": int,
    "trt_min_subgraph_size": int, "trt_max_workspace_size": int, "trt_fp16_enable": bool, "trt_int8_enable": bool,
    "trt_int8_calibration_table_name": str, "trt_int8_use_native_calibration_table": bool, "trt_dla_enable": bool,
    "trt_dla_core": int, "trt_dump_subgraphs": bool, "trt_engine_cache_enable": bool, "trt_engine_cache_path": str,
    "trt_engine_cache_prefix": str, "trt_engine_decryption_enable": bool, "trt_engine_decryption_lib_path": str,
    "trt_force_sequential_engine_build": bool, "trt_context_memory_sharing_enable": bool,
    "trt_layer_norm_fp32_fallback": bool, "trt_timing_cache_enable": bool, "trt_timing_cache_path": str,
    "trt_force_timing_cache": bool, "trt_detailed_build_log": bool, "trt_build_heuristics_enable": bool,
    "trt_sparsity_enable": bool, "trt_builder_optimization_level": int, "trt_auxiliary_streams": int,
    "trt_tactic_sources": str, "trt_extra_plugin_lib_paths": str, "trt_profile_min_shapes": str,
    "trt_profile_max_shapes": str, "trt_profile_opt_shapes": str, "trt_cuda_graph_enable": bool,
}
CUDA_OPTIONS = {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
                "do_copy_in_default_stream", "cudnn_conv_use_max_workspace", "cudnn_conv1d_pad_to_nc1d",
                "enable_cuda_graph", "enable_skip_layer_norm_strict_mode"}
CUDNN_CONV_ALGO_SEARCH = {"EXHAUSTIVE", "HEURISTIC", "DEFAULT"}
PROFILE = re.compile(r"[^:,]+:\d+(x\d+)*(,[^:,]+:\d+(x\d+)*)*")


def test_provider_options_are_the_documented_ones(exported, tmp_path):
    spec = read_manifest(exported("sd15")).stage("unet")
    shapes = ort_backend.trt_profile_shapes(spec, {"batch": 2, "latent_height": 32, "latent_width": 32,
                                                   "text_length": 77})
    assert "encoder_hidden_states:4x231x32" in shapes["trt_profile_max_shapes"]  # weighted prompts: 3 chunks
    assert set(shapes) == {"trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"}
    for cache in (None, tmp_path):
        for fp16 in (True, False):
            trt = ort_backend.gpu_provider_options("TensorrtExecutionProvider", cache, fp16, False, 0, shapes)
            assert set(trt) <= set(TRT_OPTIONS), set(trt) - set(TRT_OPTIONS)
            for key, value in trt.items():
                assert type(value) is TRT_OPTIONS[key], (key, value)
            for key in shapes:
                assert PROFILE.fullmatch(trt[key]), trt[key]
    for cuda_graph in (True, False):
        cuda = ort_backend.gpu_provider_options("CUDAExecutionProvider", None, True, cuda_graph, 0)
        assert set(cuda) <= CUDA_OPTIONS, set(cuda) - CUDA_OPTIONS
        assert cuda["cudnn_conv_algo_search"] in CUDNN_CONV_ALGO_SEARCH
        assert cuda.get("enable_cuda_graph") == ("1" if cuda_graph else None)


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this machine has the CUDA provider")
def test_gpu_device_without_a_gpu_is_one_line():
    with pytest.raises(DiffrtError, match="onnxruntime has no CUDAExecutionProvider here") as info:
        get_backend("ort", device="cuda")
    assert "\n" not in str(info.value)
    with pytest.raises(DiffrtError, match="cuda_graphs=True needs the CUDA provider"):
        get_backend("ort", cuda_graphs=True)


def test_cuda_graph_output_shapes_come_from_input_dims(exported):
    spec = read_manifest(exported("sd15")).stage("unet-fused")
    fixed = {"sample": np.zeros((2, 4, 12, 20), np.float32)}
    assert ort_binding._output_shape(spec, spec.outputs[0], fixed) == [2, 4, 12, 20]
    decoder = read_manifest(exported("sd15")).stage("vae_decoder")
    with pytest.raises(DiffrtError, match="CUDA graphs need static output shapes"):
        ort_binding._output_shape(decoder, decoder.outputs[0], {"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})


# -- the GPU providers, without a GPU: what diffrt asks of onnxruntime -----------------------------

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class PretendGpuSession:
    """An InferenceSession that reports the providers it was asked for (as onnxruntime-gpu
    on a GPU machine does) and computes on the CPU provider; records what it was given."""

    created: list[PretendGpuSession] = []
    real_class = ort_backend.ort.InferenceSession

    def __init__(self, path, options=None, providers=None, **kwargs):
        self.path, self.providers = path, list(providers)
        self._real = self.real_class(path, options, providers=["CPUExecutionProvider"])
        PretendGpuSession.created.append(self)

    def get_providers(self):
        return [p[0] if isinstance(p, tuple) else p for p in self.providers]

    def disable_fallback(self):
        pass

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def gpu_build(monkeypatch):
    """onnxruntime-gpu's provider list, sessions computing on the CPU."""
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(GPU_BUILD))
    monkeypatch.setattr(ort_backend.ort, "InferenceSession", PretendGpuSession)
    PretendGpuSession.created = []
    return PretendGpuSession.created


def test_a_session_on_another_provider_than_asked_is_an_error(exported, monkeypatch):
    """onnxruntime drops a provider its build lacks with a warning and runs on the next:
    "ort-cuda" numbers would be CPU numbers. Real onnxruntime (a CPU build) here."""
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(GPU_BUILD))
    with pytest.raises(DiffrtError) as info:
        Pipeline.load(exported("sd15"), device="cuda", disk_cache=False)
    message = str(info.value)
    assert "CUDAExecutionProvider" in message and "runs on CPUExecutionProvider" in message
    assert "\n" not in message and "re-export" not in message


def test_a_provider_that_fails_to_start_is_not_retried_elsewhere(exported, monkeypatch):
    """InferenceSession retries on its fallback providers when creation raises (printing
    "EP Error ... Falling back"); here the CUDA provider fails to start (as with mismatched
    CUDA libraries): one error naming it, no CPU session, no "re-export"."""
    from onnxruntime.capi import onnxruntime_inference_collection as collection

    create = collection.InferenceSession._create_inference_session
    tried = []

    def failing_cuda(self, providers, provider_options, *args, **kwargs):
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        tried.append(names)
        if "CUDAExecutionProvider" in names:
            raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version")
        return create(self, providers, provider_options, *args, **kwargs)

    monkeypatch.setattr(collection.InferenceSession, "_create_inference_session", failing_cuda)
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(GPU_BUILD))
    with pytest.raises(DiffrtError) as info:
        Pipeline.load(exported("sd15"), device="cuda", disk_cache=False)
    message = str(info.value)
    assert "could not start CUDAExecutionProvider" in message and "CUDA driver version is insufficient" in message
    assert "re-export" not in message and "\n" not in message
    assert tried == [["CUDAExecutionProvider", "CPUExecutionProvider"]]  # no retry on the CPU


def _fed_shapes(pipe) -> dict[str, set]:
    shapes: dict[str, set] = {}
    for key, session in pipe._contexts.items():
        def record(feeds, run=session.run, name=session.spec.name):
            shapes.setdefault(name, set()).add(tuple((k, tuple(np.shape(v))) for k, v in sorted(feeds.items())))
            return run(feeds)
        session.run = record
    return shapes


def _profile(option: str) -> dict[str, tuple[int, ...]]:
    assert PROFILE.fullmatch(option), option
    return {name: tuple(int(d) for d in dims.split("x")) for name, dims in (p.split(":") for p in option.split(","))}


def test_the_tensorrt_provider_gets_portable_graphs_and_profiles_covering_each_call(exported, gpu_build, tmp_path):
    """TensorRT cannot parse com.microsoft ops (the fused graphs' MultiHeadAttention): ORT
    would split the UNet into TensorRT pieces around CUDA attention nodes. And without
    explicit profiles it rebuilds engines when CFG changes the batch."""
    import onnx

    folder = exported("sd15")
    pipe = Pipeline.load(folder, device="tensorrt", io_binding=False, cache_dir=tmp_path)  # no CuPy here
    sessions = {Path(s.path).parent.name: s for s in gpu_build}
    profiles = {}
    for session in gpu_build:
        model = onnx.load(session.path, load_external_data=False)
        assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, session.path
        options = dict(session.providers[0][1])
        assert session.providers[0][0] == "TensorrtExecutionProvider"
        corners = [_profile(options[f"trt_profile_{c}_shapes"]) for c in ("min", "opt", "max")]
        dynamic = {i.name for i in model.graph.input if any(d.dim_param for d in i.type.tensor_type.shape.dim)}
        assert all(set(corner) == dynamic for corner in corners)
        profiles[Path(session.path).parent.name] = corners
    assert set(sessions) >= {"unet", "text_encoder", "vae_decoder"}
    # every call of a generation with and without CFG lies inside its stage's profile
    fed = _fed_shapes(pipe)
    for guidance in (7.5, 1.0):
        pipe("a cat", num_inference_steps=2, guidance_scale=guidance, height=64, width=64, seed=0, output_type="np")
    pipe.close()
    for stage, calls in fed.items():
        low, _, high = profiles[Path(pipe.folder / read_manifest(folder).stage(stage).graph_path).parent.name]
        for call in calls:
            for name, shape in call:
                if name in low:
                    assert all(a <= d <= b for a, d, b in zip(low[name], shape, high[name])), (stage, name, shape)


def test_device_cuda_without_io_binding_keeps_host_arrays(exported, gpu_build):
    """io_binding=False: ORT copies in and out at every call, so the pipeline must hand it
    host arrays (numpy refuses nothing, but a CuPy array cannot become one implicitly)."""
    folder = exported("sd15")
    args = dict(num_inference_steps=2, height=64, width=64, seed=2, output_type="np")
    with Pipeline.load(folder, device="cuda", io_binding=False, disk_cache=False) as pipe:
        image = pipe("a cat", **args).images
    assert gpu_build and all(s.get_providers()[0] == "CUDAExecutionProvider" for s in gpu_build)
    with Pipeline.load(folder, disk_cache=False) as pipe:
        np.testing.assert_array_equal(image, pipe("a cat", **args).images)


class CupyLike:
    """Behaves like a CuPy array at the boundary: no implicit conversion to numpy
    (cupy/_core/core.pyx __array__ raises TypeError), `.get()` copies to the host."""

    __module__ = "cupy._core.core"

    def __init__(self, array):
        self._array = np.asarray(array)
        self.shape, self.dtype = self._array.shape, self._array.dtype

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()`")

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()

    def get(self):
        return self._array.copy()


def test_a_session_without_io_binding_takes_device_arrays(exported):
    spec = read_manifest(exported("sd15")).stage("unet")
    session = get_backend("ort", disk_cache=False).open(exported("sd15"), spec).context()
    feeds = _unet_feeds(np.random.default_rng(4))
    on_device = session.run({k: CupyLike(v) for k, v in feeds.items()})["out_sample"]
    np.testing.assert_array_equal(on_device, session.run(feeds)["out_sample"])
