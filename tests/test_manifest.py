"""Manifest v2 (stages by role, variant and precision), v1 compatibility, and the
verification stamps that make a second load skip hashing without trusting a changed file."""

from __future__ import annotations

import json
import os

import pytest
from conftest import copy_artifact

from diffrt.artifacts import (
    MANIFEST_VERSION,
    STAMPS_NAME,
    FileRecord,
    Manifest,
    StageSpec,
    TensorSpec,
    load_artifact,
    read_manifest,
    verify_files,
)
from diffrt.errors import ArtifactError, DiffrtError


def _stage(name, role, variant="default", precision="fp32", files=()):
    return StageSpec(name=name, inputs=(TensorSpec("x", "float32", ("batch",)),),
                     outputs=(TensorSpec("y", "float32", ("batch",)),), files=files, role=role, variant=variant,
                     precision=precision)


def _manifest(*stages):
    return Manifest(family="sd", pipeline_class="StableDiffusionPipeline", precisions=("fp32", "fp16"), opset=17,
                    stages={s.name: s for s in stages}, components={}, model={}, defaults={}, source={}, versions={})


def test_select_by_role_variant_and_precision():
    shared = FileRecord("unet/model.onnx.data", 10, "ab")
    manifest = _manifest(
        _stage("unet", "unet", files=(FileRecord("unet/model.onnx", 1, "a"), shared)),
        _stage("unet-fused", "unet", "fused-attention", files=(FileRecord("unet/model.fused.onnx", 1, "b"), shared)),
        _stage("unet-fp16", "unet", precision="fp16"),
        _stage("vae_decoder", "vae_decoder"),
        _stage("vae_decoder-tiny", "vae_decoder", "tiny"),
    )
    assert manifest.select("unet").name == "unet"  # fp32 is the first precision exported
    assert manifest.select("unet", precision="fp16").name == "unet-fp16"
    assert manifest.select("unet", precision=("bf16", "fp16")).name == "unet-fp16"
    assert manifest.select("unet", "fused-attention").name == "unet-fused"
    assert manifest.select("vae_decoder", "tiny").name == "vae_decoder-tiny"
    with pytest.raises(ArtifactError, match=r"no unet stage of variant 'fused-attention' in fp16 .*"
                                            r"default/fp32, fused-attention/fp32, default/fp16"):
        manifest.select("unet", "fused-attention", precision="fp16")
    # a file two stages share is listed (and verified) once
    assert [f.path for f in manifest.files_for(["unet", "unet-fused"])] == [
        "unet/model.onnx", "unet/model.onnx.data", "unet/model.fused.onnx"]


def test_stage_spec_round_trips_and_validates():
    spec = StageSpec(name="unet-fused", inputs=(), outputs=(TensorSpec("y", "float32", (1,)),), role="unet",
                     variant="fused-attention", precision="fp16", passes=("fuse_attention", "to_half:fp16"),
                     facts={"scaling_factor": 1.0}, reference="unet", max_abs_error=1e-3)
    assert StageSpec.from_json("unet-fused", json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(TypeError):
        spec.facts["x"] = 1  # read-only
    with pytest.raises(ValueError, match="precision='fp8'"):
        _stage("u", "unet", precision="fp8")


def test_version_1_manifests_still_load(exported, tmp_path):
    """An artifact written before manifest v2 (one stage per role, one `precision`)."""
    folder = tmp_path / "v1"
    copy_artifact(exported("sd15"), folder)
    data = json.loads((folder / "manifest.json").read_text())
    assert data["manifest_version"] == MANIFEST_VERSION == 2
    data["manifest_version"] = 1
    data["precision"] = data.pop("precisions")[0]
    for stage in data["stages"].values():
        for key in ("role", "variant", "precision", "passes", "facts", "reference"):
            stage.pop(key)
    (folder / "manifest.json").write_text(json.dumps(data))
    manifest = load_artifact(folder)
    assert manifest.precisions == ("fp32",)
    assert manifest.select("unet").name == "unet" and manifest.select("unet").precision == "fp32"
    from diffrt.runtime.pipeline import Pipeline

    with Pipeline.load(folder) as pipe:
        assert pipe("a cat", num_inference_steps=1, output_type="np").images.shape == (1, 64, 64, 3)


# -- verification stamps ------------------------------------------------------------

@pytest.fixture()
def artifact(exported, tmp_path):
    return copy_artifact(exported("sd15"), tmp_path / "art")


def _count_hashes(monkeypatch):
    import diffrt.verification as verification

    hashed = []
    real = verification.sha256_file
    monkeypatch.setattr(verification, "sha256_file", lambda path, *a: hashed.append(path.name) or real(path, *a))
    return hashed


def test_second_load_skips_hashing_unchanged_files(artifact, monkeypatch):
    stamps = artifact / "engines" / STAMPS_NAME
    manifest = read_manifest(artifact)
    hashed = _count_hashes(monkeypatch)
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert len(hashed) == len(manifest.all_files()) and stamps.is_file()
    hashed.clear()
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert hashed == []
    verify_files(artifact, manifest, "full", stamps_path=stamps)  # full always hashes
    assert len(hashed) == len(manifest.all_files())


@pytest.mark.parametrize("change", ["rewrite", "swap", "touch-back"])
def test_a_changed_file_is_hashed_again_and_refused(artifact, change):
    stamps = artifact / "engines" / STAMPS_NAME
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    path = artifact / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    before = path.stat()
    if change == "swap":  # a new file (new inode) put in place
        tmp = path.with_suffix(".new")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, path)
    else:
        path.write_bytes(bytes(data))
    if change == "touch-back":  # same size, and mtime set back: ctime still changed
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ArtifactError, match="unet/model.onnx does not match its sha256"):
        verify_files(artifact, manifest, "stamp", stamps_path=stamps)


def test_pipeline_load_records_stamps_and_verifies_only_opened_stages(artifact, monkeypatch):
    from diffrt.runtime.pipeline import Pipeline

    hashed = _count_hashes(monkeypatch)
    Pipeline.load(artifact).close()
    assert "model.onnx" in hashed and (artifact / "engines" / STAMPS_NAME).is_file()
    # the VAE encoder is not opened by a text-to-image pipeline, so it is not read
    entries = json.loads((artifact / "engines" / STAMPS_NAME).read_text())
    assert "vae_encoder/model.onnx" not in entries and "unet-fused/model.onnx" in entries
    assert "unet/model.onnx" not in entries  # ort runs the fused UNet; the portable one stays unread
    hashed.clear()
    Pipeline.load(artifact).close()
    assert hashed == []
    Pipeline.load(artifact, verify="full").close()
    assert hashed


def test_unwritable_stamp_folder_still_verifies(artifact, monkeypatch):
    (artifact / "engines").write_text("a file where the cache folder would be")
    manifest = read_manifest(artifact)
    hashed = _count_hashes(monkeypatch)
    for _ in range(2):
        verify_files(artifact, manifest, "stamp", stamps_path=artifact / "engines" / STAMPS_NAME)
    assert len(hashed) == 2 * len(manifest.all_files())


def test_bad_verify_mode(artifact):
    with pytest.raises(DiffrtError, match="verify='fast'; choose one of: stamp, full, size"):
        verify_files(artifact, read_manifest(artifact), "fast")
