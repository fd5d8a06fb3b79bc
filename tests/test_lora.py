"""LoRA against diffusers: files made with peft (diffusers' own save_lora_weights) or in
kohya naming, loaded by diffusers (`load_lora_weights` + `set_adapters`, or
`fuse_lora`) as the oracle, and by diffrt merged into the exported graphs' weights
(at run time, or fused at export). Images within 2e-3 on [0, 1], same latents."""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from diffrt.artifacts import read_manifest  # noqa: E402
from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402

TOLERANCE = 2e-3
CALL = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1"]


def _diffusers(folder):
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora(checkpoint, path, seed, rank=4, alpha=8, unet=UNET_TARGETS, text=TEXT_TARGETS, text_2=()):
    """A LoRA .safetensors as diffusers trains and saves one: peft adapters on the
    pipeline's modules (random nonzero B), saved with the pipeline's save_lora_weights."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = _diffusers(checkpoint)
    layers, metadata = {}, {}
    for component, targets in (("unet", unet), ("text_encoder", text), ("text_encoder_2", text_2)):
        if not targets:
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
        module = getattr(pipe, component)
        inject_adapter_in_model(config, module, adapter_name="x")
        generator = torch.Generator().manual_seed(seed + len(layers))
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(module, adapter_name="x")
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(path, **layers, **metadata)
    return path / "pytorch_lora_weights.safetensors"


def write_safetensors(path, tensors, metadata=None):
    """A .safetensors file from numpy arrays (the format's spec: u64 header length, JSON
    header, little-endian data), independent of diffrt's reader."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata)
    return path


def make_kohya_lora(checkpoint, path, seed, rank=4, alpha=2.0):
    """kohya-ss naming (lora_unet_<module path with '_'>, lora_te_text_model_<...>), as
    sd-scripts writes it for an SD 1.x UNet: attention, proj_in, feed-forward, resnet
    conv (LoCon) and time embedding layers, and the text encoder's MLP."""
    pipe = _diffusers(checkpoint)
    rng = np.random.default_rng(seed)
    tensors = {}
    picks = [("lora_unet_", pipe.unet, n) for n, m in pipe.unet.named_modules()
             if n.endswith(("attn1.to_q", "attn2.to_k", "attn1.to_out.0", "proj_in", "ff.net.0.proj",
                            "resnets.0.conv1", "resnets.0.time_emb_proj"))]
    # diffusers 0.42 loses kohya text-encoder attention layers (to_q_lora names its CLIP
    # no longer has): only the MLP, which it converts, is compared
    picks += [("lora_te_text_model_", pipe.text_encoder, n) for n, _ in pipe.text_encoder.named_modules()
              if n.endswith(("mlp.fc1", "mlp.fc2"))]
    for prefix, model, name in picks:
        weight = model.get_submodule(name).weight
        key = prefix + name.replace(".", "_")
        out, inp = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        tensors[f"{key}.lora_down.weight"] = rng.standard_normal((rank, inp, *kernel)) * 0.15
        tensors[f"{key}.lora_up.weight"] = rng.standard_normal((out, rank, *((1, 1) if kernel else ()))) * 0.15
        tensors[f"{key}.alpha"] = np.array(alpha)
    return write_safetensors(path, tensors)


@pytest.fixture(scope="module")
def sd(tiny_checkpoint, exported, tmp_path_factory):
    """The tiny SD 1.5 checkpoint, its artifact, a diffusers pipeline, three LoRA files."""
    checkpoint, folder = tiny_checkpoint("sd15"), exported("sd15")
    root = tmp_path_factory.mktemp("loras")
    files = {"a": make_lora(checkpoint, root / "a", seed=1),
             "b": make_lora(checkpoint, root / "b", seed=2, rank=2, alpha=2, unet=["to_k", "conv2", "proj_out"],
                            text=["k_proj", "fc2"]),
             "k": make_kohya_lora(checkpoint, root / "k.safetensors", seed=3),
             "te": make_lora(checkpoint, root / "te", seed=4, unet=(), text=TEXT_TARGETS)}
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    return checkpoint, folder, files, latents


_THEIRS: dict[tuple, np.ndarray] = {}


def theirs(sd, loras):
    """diffusers' image with these {name: strength} adapters set (computed once per set)."""
    key = tuple(loras.items())
    if key not in _THEIRS:
        _THEIRS[key] = _theirs(sd, loras)
    return _THEIRS[key]


def _theirs(sd, loras):
    checkpoint, _, files, latents = sd
    pipe = _diffusers(checkpoint)
    for name in loras:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if loras:
        pipe.set_adapters(list(loras), list(loras.values()))
    return pipe("a red cat", latents=latents, **CALL).images


def ours(pipe, sd, loras=None):
    return pipe("a red cat", latents=sd[3].numpy(), scheduler="euler", loras=loras, **CALL).images


def _close(got, want, what):
    diff = float(np.abs(got - want).max())
    assert diff <= TOLERANCE, f"{what}: {diff} > {TOLERANCE}"


BACKENDS = [("ort", {}), ("openvino", {"precision": "fp32"})]


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_adapters_switch_at_run_time_and_match_diffusers(sd, backend, options):
    """One adapter, two at different strengths, the other alone, a text-encoder-only
    one, kohya's layout: each equals diffusers' set_adapters image; no LoRA after
    them is the base image again."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    _, folder, files, _ = sd
    base = theirs(sd, {})
    with Pipeline.load(folder, backend=backend, loras={"a": files["a"], "b": files["b"]}, **options) as pipe:
        before = ours(pipe, sd)
        _close(before, base, "no LoRA")
        pipe.load_lora("k", files["k"])
        pipe.load_lora("te", files["te"])
        for loras in ({"a": 0.7}, {"a": 0.8, "b": 0.4}, {"b": 1.0}, {"te": 0.9}, {"k": 0.6}, {"k": 1.0, "a": 0.3}):
            want = theirs(sd, loras)
            assert float(np.abs(want - base).max()) > 2e-2, loras  # the LoRA matters at this tolerance
            _close(ours(pipe, sd, loras), want, f"{backend} {loras}")
        after = ours(pipe, sd)
        zero = ours(pipe, sd, {"a": 0.0})
    np.testing.assert_array_equal(zero, after)  # strength 0 is no LoRA, bit for bit
    if backend == "openvino":
        np.testing.assert_array_equal(after, before)  # the exported weights, bit for bit
    else:
        # the same weights (see the next test); ORT's session with replaced initializers
        # runs without its blocked-layout Conv pass (backends/ort.py), a 1e-6 difference
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def test_switching_back_restores_the_exported_weights_exactly(sd):
    """What the backend is handed to go back is the graph's own initializers (read here
    with onnx), and a LoRA's merged weight is base + scale * B @ A computed with torch."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from diffrt.weights import weight_map

    _, folder, files, _ = sd
    pipe = Pipeline.load(folder, loras={"a": files["a"]})
    model = pipe.models["unet"]
    handed = []
    original = model.update_weights
    model.update_weights = lambda weights: handed.append(dict(weights)) or original(weights)
    ours(pipe, sd, {"a": 0.5})
    ours(pipe, sd)
    pipe.close()
    graph = onnx.load(str(folder / model.spec.graph_path))
    stored = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert len(handed) == 2 and set(handed[0]) == set(handed[1])
    for name, value in handed[1].items():
        assert value.dtype == stored[name].dtype
        np.testing.assert_array_equal(value, stored[name])
    # one merged weight, against torch and the safetensors file (scale alpha/r = 8/4)
    from safetensors.torch import load_file

    tensors = load_file(str(files["a"]))
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = tensors[f"unet.{module}.lora_A.weight"], tensors[f"unet.{module}.lora_B.weight"]
    placement = weight_map(folder, model.spec)[f"{module}.weight"].placements[0]
    base = torch.from_numpy(stored[placement.initializer].copy()).T
    want = (base + 0.5 * 2.0 * (b @ a)).T.numpy()
    np.testing.assert_allclose(handed[0][placement.initializer], want, rtol=1e-6, atol=1e-6)


def test_fused_at_export_matches_diffusers_fuse_lora(sd, tmp_path):
    from diffusers import DiffusionPipeline

    from diffrt.export import export

    checkpoint, _, files, latents = sd
    out = export(checkpoint, tmp_path / "fused", loras=[(files["a"], 0.7), (files["k"], 0.5)], fused_attention=False)
    ref = _diffusers(checkpoint)
    ref.load_lora_weights(str(files["a"]), adapter_name="a")
    ref.load_lora_weights(str(files["k"]), adapter_name="k")
    ref.set_adapters(["a", "k"], [0.7, 0.5])
    ref.fuse_lora(adapter_names=["a", "k"])
    ref.unload_lora_weights()  # the fused weights stay
    assert isinstance(ref, DiffusionPipeline)
    want = ref("a red cat", latents=latents, **CALL).images
    with Pipeline.load(tmp_path / "fused") as pipe:
        _close(ours(pipe, sd), want, "fused at export")
    sha = {name: __import__("hashlib").sha256(files[name].read_bytes()).hexdigest() for name in ("a", "k")}
    for stage in ("unet", "text_encoder"):
        recorded = out.stage(stage).facts["loras"]
        assert [(r["sha256"], r["strength"]) for r in recorded] == [(sha["a"], 0.7), (sha["k"], 0.5)]
    assert "loras" not in read_manifest(tmp_path / "fused").stage("vae_decoder").facts


def test_sdxl_two_text_encoders_and_unet(tiny_checkpoint, exported, tmp_path):
    checkpoint, folder = tiny_checkpoint("sdxl"), exported("sdxl")
    file = make_lora(checkpoint, tmp_path / "xl", seed=5, unet=["to_q", "to_v", "to_out.0", "proj_in"],
                     text=["q_proj", "fc1"], text_2=["v_proj", "fc2"])
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(1))
    ref = _diffusers(checkpoint)
    base = ref("a red cat", latents=latents, **CALL).images
    ref.load_lora_weights(str(file), adapter_name="xl")
    ref.set_adapters(["xl"], [0.8])
    want = ref("a red cat", latents=latents, **CALL).images
    assert float(np.abs(want - base).max()) > 2e-2
    with Pipeline.load(folder, loras={"xl": file}) as pipe:
        got = pipe("a red cat", latents=latents.numpy(), scheduler="euler", loras={"xl": 0.8}, **CALL).images
        assert {c for c, _ in pipe.loras["xl"].layers} == {"unet", "text_encoder", "text_encoder_2"}
    _close(got, want, "sdxl")


def test_bad_files_and_arguments_are_one_line_errors_and_the_pipeline_keeps_serving(sd, tiny_checkpoint,
                                                                                    tmp_path):
    _, folder, files, _ = sd
    good = files["a"].read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file at all")
    header = json.loads(good[8:8 + struct.unpack("<Q", good[:8])[0]])
    key = next(k for k in header if k.endswith("attn1.to_q.lora_A.weight"))
    write_safetensors(tmp_path / "unknown.safetensors",
                      {"unet.no_such_block.to_q.lora_A.weight": np.ones((2, 32)),
                       "unet.no_such_block.to_q.lora_B.weight": np.ones((32, 2))})
    shape = header[key]["shape"]
    write_safetensors(tmp_path / "shape.safetensors",
                      {key: np.ones((shape[0], shape[1] * 2)),
                       key.replace("lora_A", "lora_B"): np.ones((shape[1], shape[0]))})
    xl = make_lora(tiny_checkpoint("sdxl"), tmp_path / "xl", seed=6, unet=["to_q"], text=(), text_2=["fc1"])
    with Pipeline.load(folder, loras={"a": files["a"]}) as pipe:
        before = ours(pipe, sd, {"a": 0.5})
        cases = [(lambda: pipe.load_lora("x", tmp_path / "missing.safetensors"), "missing.safetensors"),
                 (lambda: pipe.load_lora("x", tmp_path / "truncated.safetensors"), "truncated"),
                 (lambda: pipe.load_lora("x", tmp_path / "text.safetensors"), "not a .safetensors"),
                 (lambda: pipe.load_lora("x", tmp_path / "unknown.safetensors"), "unet.no_such_block.to_q"),
                 (lambda: pipe.load_lora("x", tmp_path / "shape.safetensors"), "shapes do not fit"),
                 (lambda: pipe.load_lora("x", xl), "text_encoder_2"),
                 (lambda: pipe.load_lora("a", files["b"]), "already loaded"),
                 (lambda: ours(pipe, sd, {"a": float("nan")}), "finite"),
                 (lambda: ours(pipe, sd, {"a": -0.5}), ">= 0"),
                 (lambda: ours(pipe, sd, {"nope": 1.0}), "loaded: a")]
        for call, needle in cases:
            with pytest.raises(DiffrtError) as info:
                call()
            assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert list(pipe.loras) == ["a"]
        np.testing.assert_array_equal(ours(pipe, sd, {"a": 0.5}), before)


def test_batch_key_separates_lora_sets_and_generate_refuses_a_mix(sd):
    _, folder, files, _ = sd
    with Pipeline.load(folder, loras={"a": files["a"], "b": files["b"]}) as pipe:
        plain, a, same = (pipe.request("x", loras=loras, **CALL) for loras in (None, {"a": 1}, {"a": 1.0, "b": 0}))
        assert pipe.batch_key(plain) != pipe.batch_key(a)
        assert pipe.batch_key(a) == pipe.batch_key(same)
        with pytest.raises(DiffrtError, match="LoRAs"):
            pipe.generate([plain, a])


def test_cli_generate_with_lora_equals_the_api(sd, tmp_path):
    from test_cli import cli

    _, folder, files, _ = sd
    result = cli("generate", str(folder), "a red cat", "--steps", "3", "--seed", "4", "--scheduler", "euler",
                 "--lora", f"{files['a']}:0.6", "--lora", str(files["b"]), "-o", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr
    with Pipeline.load(folder, loras={"a": files["a"], "b": files["b"]}) as pipe:
        want = pipe("a red cat", num_inference_steps=3, seed=4, scheduler="euler", loras={"a": 0.6, "b": 1.0}).images
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(want[0]))
    bad = cli("generate", str(folder), "a cat", "--lora", str(tmp_path / "none.safetensors"), "-o",
              str(tmp_path / "y.png"))
    assert bad.returncode != 0 and "none.safetensors" in bad.stderr and "Traceback" not in bad.stderr


def test_tensorrt_merges_through_refit_as_ort_does(sd, tmp_path, monkeypatch):
    """On the fake TensorRT (tests/fake_gpu.py: TensorRT's API over ONNX Runtime), a LoRA
    goes through the refitter; its image is ORT's with the same LoRA, and no LoRA after
    it is the base image again."""
    import fake_gpu
    from conftest import copy_artifact

    from diffrt.build.tensorrt import BuildOptions, build_plan, plan_build

    fake = fake_gpu.install(monkeypatch)
    _, exported_folder, files, _ = sd
    folder = copy_artifact(exported_folder, tmp_path / "artifact")
    build_plan(plan_build(folder, batch="1", size=(64, 64), options=BuildOptions(refit=True)), cache_dir=tmp_path)
    latents = sd[3].numpy()
    call = dict(latents=latents, scheduler="euler", guidance_scale=1.0, num_inference_steps=2, output_type="np")
    with Pipeline.load(folder, backend="tensorrt", cache_dir=tmp_path, loras={"a": files["a"]}) as pipe:
        base = pipe("a red cat", **call).images
        got = pipe("a red cat", loras={"a": 0.7}, **call).images
        back = pipe("a red cat", **call).images
    assert fake.refits, "the LoRA reached TensorRT's refitter"
    with Pipeline.load(folder, backend="ort", attention="portable", disk_cache=False,
                       loras={"a": files["a"]}) as pipe:
        want = pipe("a red cat", loras={"a": 0.7}, **call).images
        want_base = pipe("a red cat", **call).images
    assert float(np.abs(want - want_base).max()) > 2e-2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(back, base, rtol=0, atol=1e-5)


def test_a_backend_that_cannot_change_weights_refuses_loras(sd):
    _, folder, files, _ = sd
    with pytest.raises(DiffrtError, match="fuse the LoRA at export") as info:
        Pipeline.load(folder, backend="torch", loras={"a": files["a"]})
    assert "\n" not in str(info.value)


def test_half_and_bfloat16_files_read_as_torch_reads_them(sd, tmp_path):
    """LoRAs ship in fp16 and bf16: the numpy reader's float32 values are torch's."""
    from safetensors.torch import load_file, save_file

    from diffrt.lora import read_lora

    _, _, files, _ = sd
    tensors = load_file(str(files["a"]))
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path))
        lora = read_lora(path)
        module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
        layer = lora.layers[("unet", module)]
        np.testing.assert_array_equal(layer.down, tensors[f"unet.{module}.lora_A.weight"].to(dtype).float().numpy())
        np.testing.assert_array_equal(layer.up, tensors[f"unet.{module}.lora_B.weight"].to(dtype).float().numpy())


def test_workers_never_run_on_another_sets_weights(sd):
    """Workers share the models, so the merged set is theirs: a run that wants another
    set waits until the runs on the current one end, and runs that want the current set
    queue behind it (no starving a switch). States are waited for, not time."""
    from serve_util import until

    from diffrt.runtime.backends import get_backend
    from diffrt.runtime.loras import MergedLoras

    _, folder, files, _ = sd
    backend = get_backend("ort", disk_cache=False)
    model = backend.open(folder, read_manifest(folder).stage("unet"))
    encoder = backend.open(folder, read_manifest(folder).stage("text_encoder"))
    merged = MergedLoras(folder, {"unet": model, "text_encoder": encoder}, backend)
    merged.add("a", files["a"])
    merged.add("b", files["b"])
    updates, order = [], []
    update = model.update_weights
    model.update_weights = lambda weights: updates.append(merged.active) or update(weights)
    holding, release = threading.Event(), threading.Event()

    def run(wanted, label, hold=False):
        with merged.using(wanted):
            order.append((label, merged.active))
            if hold:
                holding.set()
                release.wait(60)

    first = threading.Thread(target=run, args=((("a", 1.0),), "first", True))
    first.start()
    assert holding.wait(60)
    second = threading.Thread(target=run, args=((("b", 0.5),), "second"))
    second.start()
    until(lambda: merged._waiting == 1, 60, "the switch to wait")
    third = threading.Thread(target=run, args=((("a", 1.0),), "third"))
    third.start()
    until(lambda: merged._waiting == 2, 60, "a run on the current set to queue behind the switch")
    assert order == [("first", (("a", 1.0),))] and len(updates) == 1
    release.set()
    for thread in (first, second, third):
        thread.join(60)
    assert order == [("first", (("a", 1.0),)), ("second", (("b", 0.5),)), ("third", (("a", 1.0),))]
    assert len(updates) == 3  # a, then b, then a again
    model.close()
    encoder.close()
