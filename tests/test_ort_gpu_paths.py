"""The ORT backend's GPU paths, as far as a CPU machine can run them.

IOBinding (what keeps arrays on the device with the CUDA and TensorRT providers) runs
here on the CPU provider with `io_binding=True`: it must give exactly what the plain
`run` gives, for one stage and for a whole pipeline. Provider selection and the
provider options diffrt sets are pure functions, checked here; the CUDA side itself
(CuPy views over ORT's device buffers, CUDA graphs) needs onnxruntime-gpu and a GPU
and is run by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.artifacts import read_manifest
from diffrt.errors import DiffrtError
from diffrt.runtime.backends import get_backend
from diffrt.runtime.backends import ort as ort_backend
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
    plain = get_backend("ort", disk_cache=False).open(artifact, spec).run(feeds)
    bound_backend = get_backend("ort", disk_cache=False, io_binding=True)
    bound = bound_backend.open(artifact, spec).run(feeds)
    assert bound.keys() == plain.keys()
    for name in plain:
        assert isinstance(bound[name], np.ndarray)
        np.testing.assert_array_equal(bound[name], plain[name])


def test_io_binding_casts_and_reports_missing_inputs(exported):
    artifact = exported("sd15")
    spec = read_manifest(artifact).stage("unet-fused")
    session = get_backend("ort", disk_cache=False, io_binding=True).open(artifact, spec)
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


def test_gpu_provider_options(tmp_path):
    trt = ort_backend.gpu_provider_options("TensorrtExecutionProvider", tmp_path, fp16=True, cuda_graph=False)
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path) == trt["trt_timing_cache_path"]
    cuda = ort_backend.gpu_provider_options("CUDAExecutionProvider", None, fp16=True, cuda_graph=True)
    assert cuda["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in ort_backend.gpu_provider_options("CUDAExecutionProvider", None, True, False)


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
    assert ort_backend._output_shape(spec, spec.outputs[0], fixed) == [2, 4, 12, 20]
    decoder = read_manifest(exported("sd15")).stage("vae_decoder")
    with pytest.raises(DiffrtError, match="CUDA graphs need static output shapes"):
        ort_backend._output_shape(decoder, decoder.outputs[0], {"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})
