"""Derived graphs in an artifact: fused attention (default) and fp16/bf16 (opt-in),
each checked against the fp32 graph it was made from, and chosen per backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from conftest import requires_bf16_cpu

from diffrt.artifacts import FUSED_VARIANT, read_manifest
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime.pipeline import Pipeline

openvino = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def half_artifact(tiny_checkpoint, tmp_path_factory):
    from diffrt.export import export

    out = tmp_path_factory.mktemp("half") / "artifact"
    export(tiny_checkpoint("sd15"), out, precision="fp16,bf16")
    return out


def test_default_export_has_fused_attention_graphs(exported):
    manifest = read_manifest(exported("sd15"))
    for role in ("unet", "vae_decoder"):
        fused = manifest.select(role, FUSED_VARIANT)
        assert fused.name == f"{role}-fused" and fused.passes == ("fuse_attention",)
        assert fused.reference == role and fused.max_abs_error <= 1e-4
        graph = onnx.load(exported("sd15") / fused.graph_path)
        ops = [n.op_type for n in graph.graph.node]
        assert "MultiHeadAttention" in ops and "Softmax" not in ops
    assert [s.variant for s in manifest.variants("text_encoder")] == ["default"]


def test_backends_pick_their_attention_graphs(exported, tmp_path):
    folder = exported("sd15")
    call = dict(num_inference_steps=3, scheduler="euler", seed=4, guidance_scale=5.0, output_type="np")
    with Pipeline.load(folder) as fused, Pipeline.load(folder, attention="portable") as portable:
        assert fused.models["unet"].spec.name == "unet-fused"
        assert fused.models["vae_decoder"].spec.name == "vae_decoder-fused"
        assert portable.models["unet"].spec.name == "unet"
        difference = np.max(np.abs(fused("a cat", **call).images - portable("a cat", **call).images))
    assert difference <= 1e-5
    with Pipeline.load(folder, backend="openvino", precision="fp32", cache_dir=tmp_path) as ov:
        assert ov.models["unet"].spec.name == "unet"  # OpenVINO fuses attention itself


def test_export_without_fused_attention(tiny_checkpoint, tmp_path):
    from diffrt.export import export

    manifest = export(tiny_checkpoint("sd15"), tmp_path / "a", fused_attention=False)
    assert not [s for s in manifest.stages.values() if s.variant == FUSED_VARIANT]
    with pytest.raises(ArtifactError, match="no fused-attention unet graph"):
        Pipeline.load(tmp_path / "a", attention="fused")
    with Pipeline.load(tmp_path / "a") as pipe:  # ort falls back to the portable graph
        assert pipe.models["unet"].spec.name == "unet"


def _stage_feeds(manifest, role: str, rng) -> dict[str, np.ndarray]:
    """Fresh random inputs for a stage at a small shape (not the exporter's check inputs)."""
    dims = {"batch": 2, "sequence": int(manifest.model["text_max_length"]), "latent_height": 6, "latent_width": 10,
            "height": 6 * int(manifest.model["vae_scale_factor"]), "width": 10 * int(manifest.model["vae_scale_factor"])}
    feeds = {}
    for tensor in manifest.select(role).inputs:
        shape = tuple(d if isinstance(d, int) else dims.get(d, 2) for d in tensor.shape)
        if tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, 1000, shape, dtype=np.int64)
        elif tensor.name == "timestep":
            feeds[tensor.name] = np.full(shape, 321.0, np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def _run(folder, spec, feeds, runtime: str) -> list[np.ndarray]:
    """A stage's outputs, run directly on onnxruntime or OpenVINO (f32 inference precision)."""
    path = str(folder / spec.graph_path)
    names = [t.name for t in spec.outputs]
    if runtime == "ort":
        import onnxruntime as ort

        return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(names, feeds)
    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(feeds)
    return [np.asarray(results[name]) for name in names]


# Relative to the output scale; measured on the tiny model: fp16 ~1e-3, bf16 ~1e-2.
HALF_BOUND = {"fp16": 5e-3, "bf16": 3e-2}


def test_half_precision_stages_are_recorded_and_checked(half_artifact):
    """Every half stage is re-measured here against its fp32 graph on fresh inputs (the
    exporter's recorded error must be of the same order as this measurement), its IO stays
    float32/int64, and the recorded image PSNR is what a generation here gives."""
    manifest = read_manifest(half_artifact)
    assert manifest.precisions == ("fp32", "fp16", "bf16")
    rng = np.random.default_rng(11)
    for precision, runtime in (("fp16", "ort"), ("bf16", "openvino")):
        for role in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
            spec = manifest.select(role, precision=precision)
            assert spec.name == f"{role}-{precision}" and spec.reference == role
            assert spec.passes == (f"to_half:{precision}",)
            feeds = _stage_feeds(manifest, role, rng)
            ours = _run(half_artifact, spec, feeds, runtime)
            reference = _run(half_artifact, manifest.select(role), feeds, runtime)
            scale = max(float(np.abs(r).max()) for r in reference)
            error = max(float(np.abs(o.astype(np.float64) - r).max()) for o, r in zip(ours, reference, strict=True))
            assert 0 < error <= HALF_BOUND[precision] * max(1.0, scale), (spec.name, error, scale)
            assert error / 20 <= spec.max_abs_error <= error * 20, (spec.name, spec.max_abs_error, error)
            # IO stays float32 / int64: the numpy runtime and the schedulers are unchanged
            graph = onnx.load(half_artifact / spec.graph_path, load_external_data=False)
            assert {i.type.tensor_type.elem_type for i in graph.graph.input} <= {onnx.TensorProto.FLOAT,
                                                                                 onnx.TensorProto.INT64}
        fused = manifest.select("unet", FUSED_VARIANT, precision)
        assert fused.passes == ("fuse_attention", f"to_half:{precision}") and fused.reference == "unet-fused"

        check = manifest.checks[precision]
        settings = check["settings"]
        options = {"precision": "fp32"} if runtime == "openvino" else {}
        images = {}
        for graphs in ("fp32", precision):
            with Pipeline.load(half_artifact, backend=runtime, attention="portable", graph_precision=graphs,
                               **options) as pipe:
                images[graphs] = pipe("a photo of an astronaut riding a horse on mars", output_type="np",
                                      **settings).images
        mse = float(np.mean((images["fp32"].astype(np.float64) - images[precision]) ** 2))
        psnr = 10 * np.log10(1.0 / mse)
        assert psnr > 30, psnr  # measured 40-60 dB on the tiny model
        assert check["image_psnr_db"] == pytest.approx(psnr, abs=0.01)


def test_half_graphs_run_where_the_backend_can(half_artifact):
    call = dict(num_inference_steps=2, scheduler="ddim", seed=1, output_type="np")
    with Pipeline.load(half_artifact, attention="portable") as fp32:
        reference = fp32("a cat", **call).images
    with Pipeline.load(half_artifact, graph_precision="fp16") as fp16:
        assert fp16.models["unet"].spec.name == "unet-fused-fp16"
        assert np.max(np.abs(fp16("a cat", **call).images - reference)) < 0.05
    with pytest.raises(DiffrtError, match="backend 'ort' cannot run bf16 graphs; it runs: fp32, fp16"):
        Pipeline.load(half_artifact, graph_precision="bf16")
    with Pipeline.load(half_artifact, backend="openvino", precision="fp32", graph_precision="bf16") as bf16:
        assert bf16.models["unet"].spec.name == "unet-bf16"
        assert np.max(np.abs(bf16("a cat", **call).images - reference)) < 0.05


@requires_bf16_cpu
def test_bf16_graphs_compute_in_bf16_where_the_cpu_can(half_artifact):
    """On a CPU with bf16 instructions, OpenVINO computes the bf16 graphs in bf16 (its
    default there): the image stays close to fp32's, and differs from the f32-compute run
    (so bf16 arithmetic really ran)."""
    call = dict(num_inference_steps=2, scheduler="ddim", seed=1, output_type="np")
    with Pipeline.load(half_artifact, attention="portable") as fp32:
        reference = fp32("a cat", **call).images
    with Pipeline.load(half_artifact, backend="openvino", precision="fp32", graph_precision="bf16") as f32_compute:
        weights_only = f32_compute("a cat", **call).images
    with Pipeline.load(half_artifact, backend="openvino", precision="bf16", graph_precision="bf16") as bf16:
        assert bf16.backend.precision == "bf16"
        computed = bf16("a cat", **call).images
    assert np.max(np.abs(computed - reference)) < 0.1
    assert np.max(np.abs(computed - weights_only)) > 0


def test_image_check_restores_the_runtime_log_level(exported, monkeypatch):
    """The exporter quiets diffrt.runtime during its image check, and restores the level
    even when the check fails."""
    import logging

    from diffrt.export import variants
    from diffrt.families import get_family

    manifest = read_manifest(exported("sd15"))
    manifest = dataclasses.replace(manifest, precisions=("fp32", "fp16"))
    runtime_log = logging.getLogger("diffrt.runtime")
    runtime_log.setLevel(logging.DEBUG)

    def fail(*args, **kwargs):
        raise RuntimeError("the check failed")

    monkeypatch.setattr(Pipeline, "load", fail)
    with pytest.raises(RuntimeError, match="the check failed"):
        variants.image_checks(exported("sd15"), manifest, get_family(manifest.family))
    assert runtime_log.level == logging.DEBUG
    runtime_log.setLevel(logging.NOTSET)


def test_bad_precision_is_refused_before_exporting(tiny_checkpoint, tmp_path):
    from diffrt.export import export

    with pytest.raises(DiffrtError, match="--precision fp8: use fp32, fp16, bf16 or a comma list"):
        export(tiny_checkpoint("sd15"), tmp_path / "x", precision="fp8")
    assert not (tmp_path / "x").exists()


def test_identical_external_data_is_stored_once(exported, tmp_path):
    """A fused graph keeps every weight: its model.onnx.data becomes a hard link to the
    portable graph's, so a large UNet is stored once."""
    from diffrt.artifacts import StageSpec, file_record
    from diffrt.export.onnx_graph import _write_with_external_data
    from diffrt.export.passes import fuse_attention
    from diffrt.export.variants import _share_identical_data

    staging = tmp_path / "staging"
    model = onnx.load(exported("sd15") / "unet" / "model.onnx")
    (staging / "unet").mkdir(parents=True)
    # the exporter's own writer, as for a UNet over 2 GB
    _write_with_external_data(model, staging / "unet", staging / "unet" / "model.onnx",
                              staging / "unet" / "model.onnx.data")
    source = StageSpec(name="unet", inputs=(), outputs=(), files=tuple(
        file_record(staging, staging / "unet" / n) for n in ("model.onnx", "model.onnx.data")))
    files, report = fuse_attention(staging / "unet", staging / "unet-fused")
    assert report.complete and len(files) == 2
    _share_identical_data(staging, source, files)
    original, fused = (staging / s / "model.onnx.data" for s in ("unet", "unet-fused"))
    assert fused.stat().st_ino == original.stat().st_ino and original.stat().st_nlink == 2
