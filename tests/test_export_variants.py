"""Derived graphs in an artifact: fused attention (default) and fp16/bf16 (opt-in),
each checked against the fp32 graph it was made from, and chosen per backend."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

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
        assert fused._sessions["unet"].spec.name == "unet-fused"
        assert fused._sessions["vae_decoder"].spec.name == "vae_decoder-fused"
        assert portable._sessions["unet"].spec.name == "unet"
        difference = np.max(np.abs(fused("a cat", **call).images - portable("a cat", **call).images))
    assert difference <= 1e-5
    with Pipeline.load(folder, backend="openvino", precision="fp32", cache_dir=tmp_path) as ov:
        assert ov._sessions["unet"].spec.name == "unet"  # OpenVINO fuses attention itself


def test_export_without_fused_attention(tiny_checkpoint, tmp_path):
    from diffrt.export import export

    manifest = export(tiny_checkpoint("sd15"), tmp_path / "a", fused_attention=False)
    assert not [s for s in manifest.stages.values() if s.variant == FUSED_VARIANT]
    with pytest.raises(ArtifactError, match="no fused-attention unet graph"):
        Pipeline.load(tmp_path / "a", attention="fused")
    with Pipeline.load(tmp_path / "a") as pipe:  # ort falls back to the portable graph
        assert pipe._sessions["unet"].spec.name == "unet"


def test_half_precision_stages_are_recorded_and_checked(half_artifact):
    manifest = read_manifest(half_artifact)
    assert manifest.precisions == ("fp32", "fp16", "bf16")
    bounds = {"fp16": 1e-2, "bf16": 5e-2}  # relative to the output scale, as the exporter checks
    for precision, bound in bounds.items():
        for role in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
            spec = manifest.select(role, precision=precision)
            assert spec.name == f"{role}-{precision}" and spec.reference == role
            assert spec.passes == (f"to_half:{precision}",)
            assert 0 < spec.max_abs_error <= bound * 10, (spec.name, spec.max_abs_error)
            # IO stays float32 / int64: the numpy runtime and the schedulers are unchanged
            graph = onnx.load(half_artifact / spec.graph_path, load_external_data=False)
            assert {i.type.tensor_type.elem_type for i in graph.graph.input} <= {onnx.TensorProto.FLOAT,
                                                                                 onnx.TensorProto.INT64}
        fused = manifest.select("unet", FUSED_VARIANT, precision)
        assert fused.passes == ("fuse_attention", f"to_half:{precision}") and fused.reference == "unet-fused"
        check = manifest.checks[precision]
        assert check["image_psnr_db"] > 30, check  # measured 40-60 dB on the tiny model
        assert check["settings"]["num_inference_steps"] == 2


def test_half_graphs_run_where_the_backend_can(half_artifact):
    call = dict(num_inference_steps=2, scheduler="ddim", seed=1, output_type="np")
    with Pipeline.load(half_artifact, attention="portable") as fp32:
        reference = fp32("a cat", **call).images
    with Pipeline.load(half_artifact, graph_precision="fp16") as fp16:
        assert fp16._sessions["unet"].spec.name == "unet-fused-fp16"
        assert np.max(np.abs(fp16("a cat", **call).images - reference)) < 0.05
    with pytest.raises(DiffrtError, match="backend 'ort' cannot run bf16 graphs; it runs: fp32, fp16"):
        Pipeline.load(half_artifact, graph_precision="bf16")
    with Pipeline.load(half_artifact, backend="openvino", precision="fp32", graph_precision="bf16") as bf16:
        assert bf16._sessions["unet"].spec.name == "unet-bf16"
        assert np.max(np.abs(bf16("a cat", **call).images - reference)) < 0.05


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
