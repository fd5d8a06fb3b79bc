"""Export: every stage checked against torch, the manifest contract, external data,
atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from diffrt.artifacts import MANIFEST_VERSION, load_artifact, read_manifest
from diffrt.errors import DiffrtError
from diffrt.export import export, onnx_graph
from diffrt.export import sd as torch_side

# fp32 graphs vs fp32 torch on tiny models: kernels differ only in summation order.
STAGE_TOLERANCE = 1e-4


@pytest.mark.parametrize("kind", ["sd15", "sd2", "lcm"])
def test_every_stage_matches_torch(kind, tiny_checkpoint, exported):
    """Run each exported graph on fresh inputs of a shape other than the traced one
    and compare with the torch module, independently of the exporter's own check."""
    folder, manifest = exported(kind), read_manifest(exported(kind))
    modules = torch_side.load_modules(tiny_checkpoint(kind))
    stages = torch_side.stage_modules(modules, manifest.model)
    gen = torch.Generator().manual_seed(123)
    for name, spec in manifest.stages.items():
        if spec.reference != "torch":
            continue  # derived graphs (fused attention) are checked against their source in test_export_variants
        assert spec.max_abs_error is not None and spec.max_abs_error <= STAGE_TOLERANCE, (name, spec.max_abs_error)
        check = stages[name].check_inputs
        # new values, batch 3 and other spatial sizes where the dims are dynamic
        feeds = {}
        for tensor_spec in spec.inputs:
            ref = check[tensor_spec.name]
            shape = list(ref.shape)
            shape[0] = 3
            if tensor_spec.name == "input_ids":
                feeds[tensor_spec.name] = torch.randint(0, modules["text_encoder"].config.vocab_size, shape, generator=gen)
            elif tensor_spec.name == "timestep":
                feeds[tensor_spec.name] = torch.tensor([1.0, 400.0, 999.0])
            else:
                if len(shape) == 4:
                    shape[2:] = [s * 2 for s in shape[2:]]
                feeds[tensor_spec.name] = torch.randn(shape, generator=gen)
        session = ort.InferenceSession(str(folder / spec.graph_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            want = stages[name].module(*[feeds[t.name] for t in spec.inputs])
        want = want if isinstance(want, tuple) else (want,)
        for ours, theirs in zip(got, want, strict=True):
            assert ours.shape == tuple(theirs.shape)
            error = np.max(np.abs(ours - theirs.numpy()))
            assert error <= STAGE_TOLERANCE, (kind, name, error)


def test_manifest_contract(exported, tiny_checkpoint):
    folder = exported("lcm")
    manifest = load_artifact(folder)  # verifies every hash
    data = json.loads((folder / "manifest.json").read_text())
    assert data["format"] == "diffrt" and data["manifest_version"] == MANIFEST_VERSION
    assert manifest.pipeline_class == "LatentConsistencyModelPipeline"
    assert set(manifest.stages) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "unet-fused",
                                    "vae_decoder-fused"}
    unet = manifest.stage("unet")
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet.input("sample").shape == ("batch", 4, "latent_height", "latent_width")
    assert manifest.defaults["preset"] == "lcm-4step" and manifest.defaults["scheduler"] == "lcm"
    assert manifest.defaults["num_inference_steps"] == 4 and manifest.defaults["guidance_scale"] == 8.5
    assert manifest.model["time_cond_proj_dim"] == 32
    assert len(manifest.source["sha256"]) == 64 and manifest.versions["torch"].startswith("2.")
    for component in ("tokenizer", "scheduler"):
        assert (folder / component).is_dir() and manifest.components[component]
    sd15 = read_manifest(exported("sd15"))
    assert sd15.defaults["scheduler"] == "pndm" and sd15.defaults["num_inference_steps"] == 30
    assert sd15.defaults["guidance_scale"] == 7.5 and sd15.defaults["height"] == 64
    assert "timestep_cond" not in [t.name for t in sd15.stage("unet").inputs]
    assert read_manifest(exported("sd2")).defaults["scheduler"] == "ddim"


def test_large_graph_uses_one_external_data_file(tiny_checkpoint, tmp_path, monkeypatch):
    """Graphs over the protobuf limit get model.onnx + model.onnx.data; the limit is
    lowered here so a tiny model takes that path (the real-size run takes it for real)."""
    monkeypatch.setattr(onnx_graph, "_PROTOBUF_LIMIT", 0)
    out = tmp_path / "ext"
    manifest = export(tiny_checkpoint("sd15"), out)
    for name, stage in manifest.stages.items():
        assert [f.path for f in stage.files] == [f"{name}/model.onnx", f"{name}/model.onnx.data"]
        assert sorted(p.name for p in (out / name).iterdir()) == ["model.onnx", "model.onnx.data", "weight_map.json"]
        assert stage.weight_map.path == f"{name}/weight_map.json"
        assert stage.files[1].size > stage.files[0].size
    # the fused UNet keeps every weight as it was: its data file is the portable one's, stored once
    assert (out / "unet-fused" / "model.onnx.data").stat().st_ino == (out / "unet" / "model.onnx.data").stat().st_ino
    from diffrt.runtime.pipeline import Pipeline

    image = Pipeline.load(out)("x", num_inference_steps=2, seed=0, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the middle of the export")

    monkeypatch.setattr(onnx_graph, "check_graph", broken)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="simulated"):
        export(tiny_checkpoint("sd15"), out)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_overwrite(exported, tiny_checkpoint):
    before = (exported("sd15") / "manifest.json").read_bytes()
    with pytest.raises(DiffrtError, match="already exists.*--overwrite"):
        export(tiny_checkpoint("sd15"), exported("sd15"))
    assert (exported("sd15") / "manifest.json").read_bytes() == before
