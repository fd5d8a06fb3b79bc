"""Weight maps: every torch parameter of every exported stage is found in the graph's
initializers, with the values the checkpoint holds under the recorded transform;
parameters said to be absent really do not affect the stage; the map drives a weight
update that matches torch; export loads one stage's module at a time."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import weakref

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from diffrt.artifacts import read_manifest
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.textual_inversion import SPARE_TOKEN_ROWS
from diffrt.weights import WeightMap, cast, weight_map

KINDS = ("sd15", "sd2", "lcm", "sdxl", "sdxl-refiner")


def _component_class(component: str):
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection,
            "unet": UNet2DConditionModel, "vae": AutoencoderKL, "tiny_vae": AutoencoderTiny}[component]


def _checkpoint_parameters(checkpoint, component: str, tiny_vae=None) -> dict[str, np.ndarray]:
    """The component's parameters as diffusers/transformers load them (state-dict names)."""
    folder = tiny_vae if component == "tiny_vae" else checkpoint / component
    module = _component_class(component).from_pretrained(folder)
    params = {n: p.detach().numpy().copy() for n, p in module.named_parameters(remove_duplicate=False)}
    for name in [n for n in params if n.endswith("token_embedding.weight")]:
        # the exporter appends zero rows to a CLIP token table, for textual-inversion tokens (diffrt.textual_inversion)
        table = params[name]
        params[name] = np.concatenate([table, np.zeros((SPARE_TOKEN_ROWS, table.shape[1]), table.dtype)])
    return params


def _initializers(folder, spec) -> dict[str, np.ndarray]:
    graph = onnx.load(str(folder / spec.graph_path))  # external data too, when there is some
    return {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}


def _expected(param: np.ndarray, transform, shape, dtype: str) -> np.ndarray:
    """The parameter under the recorded transform, computed with numpy and ml_dtypes."""
    out = param
    for step in transform:
        out = {"transpose": lambda a: a.T, "reshape": lambda a: a.reshape(shape),
               "cast": lambda a: a.astype({"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype])}[step](out)
    return out


def _check_stage(folder, spec, params: dict[str, np.ndarray]) -> WeightMap:
    """Every parameter is in the map; every placement holds its values bit for bit."""
    wm = weight_map(folder, spec)
    assert set(wm) == set(params), (spec.name, set(params) ^ set(wm))
    initializers = _initializers(folder, spec)
    for name, entry in wm.entries.items():
        assert entry.shape == params[name].shape, (spec.name, name)
        assert entry.absent in ("", "unused"), (spec.name, name, entry.absent)
        for placement in entry.placements:
            stored = initializers[placement.initializer]
            assert stored.dtype.name == placement.dtype and stored.shape == placement.shape, (spec.name, name)
            want = _expected(params[name], placement.transform, placement.shape, placement.dtype)
            np.testing.assert_array_equal(stored.view(np.uint8), np.ascontiguousarray(want).view(np.uint8),
                                          err_msg=f"{spec.name}: {name} -> {placement.initializer}")
            # the reader's own transform gives the same bytes
            assert placement.apply(params[name]).tobytes() == stored.tobytes(), (spec.name, name)
    return wm


def _check_unused_is_unused(checkpoint, manifest, stage_name: str, wm: WeightMap) -> None:
    """Perturbing every parameter the map calls unused leaves the stage's torch
    outputs bit-identical."""
    from importlib import import_module

    from diffrt.families import get_family

    unused = [n for n, e in wm.entries.items() if e.absent == "unused"]
    if not unused:
        return
    torch_side = import_module(get_family(manifest.family).EXPORT_MODULE)
    stage = torch_side.stage_modules(torch_side.load_modules(checkpoint), manifest.model)[stage_name]
    feeds = [stage.check_inputs[t.name] for t in manifest.stage(stage_name).inputs]
    params = dict(stage.weights.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        before = stage.module(*feeds)
        for name in unused:
            params[name].add_(torch.randn_like(params[name]) + 1.0)
        after = stage.module(*feeds)
    for ours, theirs in zip(before if isinstance(before, tuple) else (before,),
                            after if isinstance(after, tuple) else (after,), strict=True):
        assert torch.equal(ours, theirs), (stage_name, unused[:3])


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_is_mapped_to_its_values(kind, tiny_checkpoint, exported):
    """fp32 and fused-attention stages of every family kind."""
    folder, checkpoint = exported(kind), tiny_checkpoint(kind)
    manifest = read_manifest(folder)
    params: dict[str, dict[str, np.ndarray]] = {}
    for name, spec in manifest.stages.items():
        component = weight_map(folder, spec).component
        params.setdefault(component, _checkpoint_parameters(checkpoint, component))
        wm = _check_stage(folder, spec, params[component])
        if spec.reference == "torch":
            _check_unused_is_unused(checkpoint, manifest, name, wm)
    assert {"unet", "vae"} <= set(params) and {"text_encoder", "text_encoder_2"} & set(params)


@pytest.fixture(scope="module")
def half_artifact(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("openvino")  # the bf16 graphs are checked with it
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_taesd

    taesd = make_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")
    out = tmp_path_factory.mktemp("half-map") / "artifact"
    export(tiny_checkpoint("sd2"), out, precision="fp16,bf16", tiny_vae=taesd)
    return out, taesd


def test_half_precision_and_tiny_vae_stages_are_mapped(half_artifact, tiny_checkpoint):
    """fp16/bf16 graphs (SD2: attention upcast to fp32), fused ones, the tiny VAE."""
    folder, taesd = half_artifact
    manifest = read_manifest(folder)
    seen, shared_with_fp32 = set(), 0
    for spec in manifest.stages.values():
        component = weight_map(folder, spec).component
        wm = _check_stage(folder, spec, _checkpoint_parameters(tiny_checkpoint("sd2"), component, taesd))
        seen.add((spec.precision, spec.variant))
        shared_with_fp32 += sum(len({p.dtype for p in e.placements}) > 1 for e in wm.entries.values())
    assert {("fp16", "fused-attention"), ("bf16", "default"), ("fp32", "tiny"), ("bf16", "tiny")} <= seen
    # a weight read by both an fp32 island and a half node has both copies in the map
    assert shared_with_fp32 > 0


def test_map_drives_a_weight_update_that_matches_torch(exported, tiny_checkpoint):
    """New values for a MatMul weight (stored transposed), a conv weight and a norm
    scale shared with other parameters, put into onnxruntime through the map, give
    the output torch gives with the same new weights."""
    from diffrt.export import sd as torch_side

    folder, manifest = exported("sd15"), read_manifest(exported("sd15"))
    stage = torch_side.stage_modules(torch_side.load_modules(tiny_checkpoint("sd15")), manifest.model)["unet"]
    params = dict(stage.weights.named_parameters())
    gen = torch.Generator().manual_seed(7)
    for spec in (manifest.stage("unet"), manifest.stage("unet-fused")):
        wm = weight_map(folder, spec)
        norm = "down_blocks.1.resnets.0.norm1.weight"
        holders = [h for p in wm[norm].placements for h in wm.holders(p.initializer)]
        assert len(set(holders)) > 1  # stored once with other equal parameters
        with pytest.raises(DiffrtError, match="also holds"):
            wm.updates({norm: params[norm].numpy() * 2})
        names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "conv_in.weight", *holders]
        scale = 1.0 + torch.rand(params[norm].shape, generator=gen)
        new = {n: (params[n] * scale if n in holders else params[n] + torch.randn(params[n].shape, generator=gen))
               for n in dict.fromkeys(names)}
        options = ort.SessionOptions()
        # ORT_ENABLE_ALL prepacks Conv weights from the model file and ignores an added
        # initializer for them (onnxruntime 1.32); basic optimizations honour it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in wm.updates(
            {n: v.numpy() for n, v in new.items()}).items()}
        for initializer, value in values.items():
            options.add_initializer(initializer, value)
        session = ort.InferenceSession(str(folder / spec.graph_path), options, providers=["CPUExecutionProvider"])
        feeds = {t.name: stage.check_inputs[t.name] for t in spec.inputs}
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        old = {n: params[n].clone() for n in new}
        with torch.no_grad():
            unchanged = stage.module(*feeds.values()).numpy()
            for n, v in new.items():
                params[n].copy_(v)
            want = stage.module(*feeds.values()).numpy()
            for n, v in old.items():
                params[n].copy_(v)
        assert np.max(np.abs(want - unchanged)) > 1e-2  # the new weights matter
        assert np.max(np.abs(got - want)) <= 1e-4, spec.name


def test_reader_refuses_an_altered_or_missing_map(exported, tmp_path):
    from conftest import copy_artifact

    folder = copy_artifact(exported("sd15"), tmp_path / "a")
    path = folder / "unet" / "weight_map.json"
    text = path.read_text()  # one initializer name altered, same size
    path.write_text(text.replace('"unet.conv_in.weight"', '"unet.conv_in.weighT"', 1))
    with pytest.raises(ArtifactError, match="weight_map.json does not match its sha256"):
        weight_map(folder, "unet")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["stages"]["unet"]["weight_map"]  # as exported before maps existed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="stage unet .* has no weight map .*re-export"):
        weight_map(folder, "unet")
    manifest["stages"]["unet"]["weight_map"] = {"path": "../unet/weight_map.json", "size": 1, "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"stages\.unet\.weight_map\.path"):
        read_manifest(folder)


def test_bfloat16_cast_rounds_like_ml_dtypes():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 100,
                             np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.0e38, -3.4e38, 1e-40, 1.00390625,
                                       1.01171875], dtype=np.float32)])
    ours, theirs = cast(values, "bfloat16"), values.astype(ml_dtypes.bfloat16)
    both_nan = np.isnan(ours.astype(np.float32)) & np.isnan(theirs.astype(np.float32))
    np.testing.assert_array_equal(ours.view(np.uint16)[~both_nan], theirs.view(np.uint16)[~both_nan])
    assert both_nan.sum() == 1


def test_export_holds_one_stage_module_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    """Each module is freed before the next one loads (the VAE loads for each of its stages)."""
    from diffrt.export import export
    from diffrt.export import sd as torch_side

    real_load, alive, loaded = torch_side.load_module, [], []

    def spy(folder, name, cls, needs):
        gc.collect()
        assert not [ref for ref in alive if ref() is not None], f"a module is still alive when {name} loads"
        module = real_load(folder, name, cls, needs)
        alive.append(weakref.ref(module))
        loaded.append(name)
        return module

    monkeypatch.setattr(torch_side, "load_module", spy)
    export(tiny_checkpoint("sd15"), tmp_path / "out")
    assert loaded == ["text_encoder", "unet", "vae", "vae"]


def test_component_without_weights_fails_before_exporting(tiny_checkpoint, tmp_path, caplog):
    from diffrt.export import export

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("sd15"), src)
    for weights in (src / "vae").glob("*.safetensors"):
        weights.unlink()
    with caplog.at_level(logging.INFO, logger="diffrt"), pytest.raises(DiffrtError, match=r"vae holds no weights"):
        export(src, tmp_path / "out")
    assert "exporting to ONNX" not in caplog.text and not (tmp_path / "out").exists()


def test_reader_needs_no_torch_or_onnx(exported):
    """The runtime may read weight maps: numpy and json only (torch, onnx blocked)."""
    import subprocess
    import sys
    import textwrap

    folder = exported("sdxl")
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "diffusers", "transformers", "onnx"):
            sys.modules[name] = None  # importing them now raises
        from diffrt.weights import weight_map
        wm = weight_map({str(folder)!r}, "unet-fused")
        placement = wm["conv_in.weight"].placements[0]
        print(placement.initializer, len(wm))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["unet.conv_in.weight", str(len(weight_map(folder, "unet")))]
