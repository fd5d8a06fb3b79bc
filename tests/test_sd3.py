"""SD3 / SD3.5 against diffusers' StableDiffusion3Pipeline on tiny random models with the
same latents: an SD3.5-medium-like checkpoint (MMDiT-X, QK RMS norm, T5) and an
SD3.5-large-like one saved without text_encoder_3 (zeros in T5's place, as diffusers
does); negative prompts, prompt_2/prompt_3 and their negatives, max_sequence_length,
non-square sizes, batches, every preset (whole generations and the schedule at several
sizes, a dynamically shifted config too), a spiece.model-only T5 tokenizer with every
stage's weights in external data, half precision, OpenVINO, the server.

The bar is 2e-3 on the [0, 1] image scale; we assert 1e-4 like test_pipeline_parity
(measured: ~2e-6).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("sentencepiece", reason="the tiny T5 tokenizer is trained with sentencepiece (export extra)")
torch = pytest.importorskip("torch")

from conftest import requires_bf16_cpu  # noqa: E402
from test_pipeline_parity import compare_images, _latents  # noqa: E402

from diffrt.artifacts import read_manifest  # noqa: E402
from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402
from diffrt.runtime.schedulers import make_scheduler, plan_window  # noqa: E402

KINDS = ("sd3", "sd3-no-t5")


def _reference(folder):
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) == [None, None]}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32, **missing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from diffrt.export.tiny import make_tiny_sd3

    return {kind: make_tiny_sd3(tmp_path_factory.mktemp(f"ckpt-{kind}") / "checkpoint", kind=kind) for kind in KINDS}


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    from diffrt.export import export

    out = {}
    for kind, folder in checkpoints.items():
        out[kind] = tmp_path_factory.mktemp(f"art-{kind}") / "artifact"
        export(folder, out[kind])
    return out


@pytest.fixture(scope="module")
def sd3(checkpoints, artifacts):
    """get(kind) -> (our Pipeline on ORT, diffusers' pipeline)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = (Pipeline.load(artifacts[kind]), _reference(checkpoints[kind]))
        return cache[kind]

    yield get
    for ours, _ in cache.values():
        ours.close()


@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers_batch_with_negatives(sd3, kind):
    """Two prompts x two images, negative prompts (one empty), CFG 5, non-square 48x64."""
    ours, ref = sd3(kind)
    prompts, negatives = ["a photo of a cat", "(((masterpiece))), a dog, 4k"], ["blurry", ""]
    latents = _latents((4, 16, 24, 32))
    kw = dict(negative_prompt=negatives, num_inference_steps=4, guidance_scale=5.0, num_images_per_prompt=2,
              height=48, width=64)
    theirs = ref(prompts, latents=latents, output_type="np", **kw).images
    result = ours(prompts, latents=latents.numpy(), output_type="np", **kw)
    assert result.settings.scheduler == "flow_match_euler"
    assert ours.models["transformer"].spec.name == "transformer-fused"  # ORT runs the fused MMDiT
    compare_images(result.images, theirs, f"{kind}/batch")


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_2_prompt_3_and_sequence_length(sd3, kind):
    """prompt_2 reaches CLIP-G only, prompt_3 T5 only, their negatives likewise; T5 at
    max_sequence_length 40 (without T5: zeros of that length)."""
    ours, ref = sd3(kind)
    latents = _latents((1, 16, 32, 24), seed=2)
    kw = dict(prompt_2="an oil painting", prompt_3="a watercolor, soft light", negative_prompt="low quality",
              negative_prompt_2="jpeg artifacts", negative_prompt_3="noise", num_inference_steps=3,
              guidance_scale=4.0, height=64, width=48, max_sequence_length=40)
    theirs = ref("a red car", latents=latents, output_type="np", **kw).images
    got = ours("a red car", latents=latents.numpy(), output_type="np", **kw).images
    compare_images(got, theirs, f"{kind}/prompts")
    plain = ours("a red car", latents=latents.numpy(), output_type="np", num_inference_steps=3, guidance_scale=4.0,
                 height=64, width=48, negative_prompt="low quality").images
    assert np.max(np.abs(plain - got)) > 1e-4  # the options changed the image


@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_no_cfg(sd3, guidance):
    ours, ref = sd3("sd3")
    latents = _latents((1, 16, 16, 40), seed=3)
    kw = dict(num_inference_steps=3, guidance_scale=guidance, height=32, width=80)
    theirs = ref("a red car", latents=latents, output_type="np", **kw).images
    got = ours("a red car", latents=latents.numpy(), output_type="np", **kw).images
    compare_images(got, theirs, f"sd3/cfg{guidance}")


# -- presets and schedules --------------------------------------------------------------

RECIPES = {"sd35": (28, {"sd3": 4.5, "sd3-no-t5": 3.5}), "sd35-large-turbo-4step": (4, {"sd3": 0.0, "sd3-no-t5": 0.0})}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", RECIPES)
def test_every_preset_matches_diffusers(sd3, kind, preset):
    """The preset's steps and guidance (the model cards': 4.5 for the MMDiT-X medium,
    3.5 for large; the turbo 4 steps without CFG) give diffusers' image."""
    ours, ref = sd3(kind)
    steps, guidance = RECIPES[preset][0], RECIPES[preset][1][kind]
    latents = _latents((1, 16, 16, 24), seed=4)
    theirs = ref("a lighthouse", num_inference_steps=steps, guidance_scale=guidance, height=32, width=48,
                 latents=latents, output_type="np").images
    result = ours("a lighthouse", preset=preset, height=32, width=48, latents=latents.numpy(), output_type="np")
    assert (result.settings.num_inference_steps, result.settings.guidance_scale) == (steps, guidance)
    compare_images(result.images, theirs, f"{kind}/{preset}")


def _diffusers_schedule(ref, steps, height, width):
    """The timesteps and sigmas diffusers' pipeline sets for this call (one step run)."""
    seen = {}

    def capture(pipe, i, t, tensors):
        seen.update(timesteps=pipe.scheduler.timesteps.numpy().copy(), sigmas=pipe.scheduler.sigmas.numpy().copy())
        pipe._interrupt = True
        return {}

    ref("x", num_inference_steps=steps, guidance_scale=0.0, height=height, width=width, output_type="latent",
        callback_on_step_end=capture)
    return seen


def _our_schedule(ours, request):
    plan = ours.family.prepare(ours.facts, request, ours._encode)
    run = plan_window(request.scheduler, request.settings.num_inference_steps, None, None, **plan.schedule)
    return run.timesteps, run.sigmas


@pytest.mark.parametrize("preset", RECIPES)
@pytest.mark.parametrize("size", [(32, 32), (48, 80), (128, 128), (256, 256)])
def test_schedule_matches_diffusers(sd3, preset, size):
    ours, ref = sd3("sd3")
    height, width = size
    request = ours.request("x", preset=preset, height=height, width=width)
    timesteps, sigmas = _our_schedule(ours, request)
    theirs = _diffusers_schedule(ref, request.settings.num_inference_steps, height, width)
    np.testing.assert_array_equal(timesteps, theirs["timesteps"])
    np.testing.assert_array_equal(sigmas, theirs["sigmas"])


@pytest.mark.parametrize("size", [(32, 32), (128, 128), (256, 256)])
def test_dynamic_shift_schedule_matches_diffusers(sd3, size):
    """A scheduler config with use_dynamic_shifting: mu from the image's patch count,
    diffusers' calculate_shift (SD3's pipeline supports it; the SD3.5 configs are static)."""
    import diffusers

    ours, ref = sd3("sd3")
    config = dict(ref.scheduler.config)
    ref.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=True)
    try:
        height, width = size
        request = ours.request("x", num_inference_steps=5, height=height, width=width)
        dynamic = make_scheduler("flow_match_euler", ours.scheduler_config, {"use_dynamic_shifting": True})
        timesteps, sigmas = _our_schedule(ours, dataclasses.replace(request, scheduler=dynamic))
        theirs = _diffusers_schedule(ref, 5, height, width)
    finally:
        ref.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    np.testing.assert_allclose(timesteps, theirs["timesteps"], rtol=1e-6)
    np.testing.assert_allclose(sigmas, theirs["sigmas"], rtol=1e-6)


# -- the artifact -----------------------------------------------------------------------

def test_manifest_facts_defaults_and_stages(artifacts, checkpoints):
    for kind in KINDS:
        manifest = read_manifest(artifacts[kind])
        config = json.loads((checkpoints[kind] / "transformer" / "config.json").read_text())
        vae = json.loads((checkpoints[kind] / "vae" / "config.json").read_text())
        model = manifest.model
        assert (model["vae_scaling_factor"], model["vae_shift_factor"]) == (vae["scaling_factor"], vae["shift_factor"])
        assert model["dual_attention_layers"] == list(config["dual_attention_layers"])
        assert manifest.defaults["height"] == config["sample_size"] * 2  # the tiny VAE downsamples by 2
        assert (manifest.defaults["preset"], manifest.defaults["num_inference_steps"]) == ("sd35", 28)
        has_t5 = kind == "sd3"
        assert ("text_encoder_3" in manifest.stages) == has_t5
        assert ("tokenizer_3" in manifest.components) == has_t5
        if has_t5:
            assert manifest.stage("text_encoder_3").facts["half_precisions"] == ["bf16"]


def test_spiece_only_tokenizer_and_external_data(checkpoints, sd3, tmp_path, monkeypatch):
    """A checkpoint whose T5 tokenizer is only spiece.model, exported with every stage's
    weights forced into external data: the artifact gets a tokenizer.json, every stage
    a model.onnx.data, and the images are diffusers' (loaded from the original folder)."""
    from diffrt.export import export, onnx_graph

    source = tmp_path / "checkpoint"
    shutil.copytree(checkpoints["sd3"], source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / "tokenizer_3" / name).unlink()
    monkeypatch.setattr(onnx_graph, "_PROTOBUF_LIMIT", 0)
    manifest = export(source, tmp_path / "artifact", fused_attention=False)
    assert (tmp_path / "artifact" / "tokenizer_3" / "tokenizer.json").is_file()
    for spec in manifest.stages.values():
        assert [f.path.rsplit("/", 1)[-1] for f in spec.files] == ["model.onnx", "model.onnx.data"], spec.name
    _, ref = sd3("sd3")
    latents = _latents((2, 16, 16, 16), seed=5)
    kw = dict(negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=32, width=32)
    theirs = ref(["a tree", "Ｔｈｅ ｃａｆé, ﬁne"], latents=latents, output_type="np", **kw).images
    with Pipeline.load(tmp_path / "artifact", verify="full") as ours:
        got = ours(["a tree", "Ｔｈｅ ｃａｆé, ﬁne"], latents=latents.numpy(), output_type="np", **kw).images
    compare_images(got, theirs, "sd3/spiece+external")


def test_requests_with_other_t5_lengths_do_not_share_a_batch(sd3):
    ours, _ = sd3("sd3")
    a = ours.request("a cat", num_inference_steps=2, seed=1, max_sequence_length=32, output_type="np")
    b = ours.request("a dog", num_inference_steps=2, seed=2, max_sequence_length=64, output_type="np")
    c = ours.request("a dog", num_inference_steps=2, seed=2, max_sequence_length=32, output_type="np")
    assert ours.batch_key(a) != ours.batch_key(b) and ours.batch_key(a) == ours.batch_key(c)
    together = ours.generate([a, c])
    alone = ours.generate([c])[0]
    np.testing.assert_allclose(together[1].images, alone.images, atol=1e-5)


def test_sd3_errors(sd3):
    ours, _ = sd3("sd3")
    with pytest.raises(DiffrtError, match="original_size: not an option of SD3 artifacts; they take prompt_2"):
        ours.request("a cat", original_size=(64, 64))
    with pytest.raises(DiffrtError, match="max_sequence_length must be an integer from 1 to 512"):
        ours.request("a cat", max_sequence_length=513)
    with pytest.raises(DiffrtError, match="prompt_3 must be a string or a list of 2 strings"):
        ours.request(["a cat", "a dog"], prompt_3=["x"])
    with pytest.raises(DiffrtError, match="larger than this SD3 transformer's positional embedding"):
        ours.request("a cat", height=512, width=64)
    with pytest.raises(DiffrtError, match="multiple of 4"):
        ours.request("a cat", height=34)
    with pytest.raises(DiffrtError, match="does not fit this flow-matching model"):
        ours.request("a cat", scheduler="euler")


# -- precision, backends, server ---------------------------------------------------------

def test_half_precision_graphs(checkpoints, tmp_path):
    """fp16 and bf16 graphs of every stage, T5 bf16 only (families/t5.py); an fp16 load
    on ONNX Runtime runs the fp32 T5 with the fp16 rest, and its image is close to fp32's."""
    pytest.importorskip("openvino")
    from diffrt.export import export

    manifest = export(checkpoints["sd3"], tmp_path / "half", precision="fp16,bf16", fused_attention=False)
    by_role = {}
    for spec in manifest.stages.values():
        by_role.setdefault(spec.role, set()).add(spec.precision)
    assert by_role.pop("text_encoder_3") == {"fp32", "bf16"}
    assert all(p == {"fp32", "fp16", "bf16"} for p in by_role.values()), by_role
    assert manifest.checks["fp16"]["image_psnr_db"] > 25
    kw = dict(num_inference_steps=2, seed=0, height=32, width=32, output_type="np")
    with Pipeline.load(tmp_path / "half", graph_precision="fp16") as pipe:
        assert pipe.models["text_encoder_3"].spec.precision == "fp32"
        assert pipe.models["transformer"].spec.precision == "fp16"
        half = pipe("a cat", **kw).images
    with Pipeline.load(tmp_path / "half", graph_precision="fp32") as pipe:
        full = pipe("a cat", **kw).images
    assert np.abs(half - full).max() < 0.05


@requires_bf16_cpu
def test_bf16_graphs_compute_on_openvino(artifacts, tmp_path, checkpoints):
    """OpenVINO computing in bf16 (the CPU has bf16 dot products) on the bf16 graphs."""
    pytest.importorskip("openvino")
    from diffrt.export import export

    export(checkpoints["sd3-no-t5"], tmp_path / "bf16", precision="bf16", fused_attention=False)
    kw = dict(num_inference_steps=2, seed=0, height=32, width=32, output_type="np")
    with Pipeline.load(tmp_path / "bf16", backend="openvino", graph_precision="bf16", precision="bf16") as pipe:
        half = pipe("a cat", **kw).images
    with Pipeline.load(artifacts["sd3-no-t5"], backend="openvino", precision="fp32",
                       cache_dir=tmp_path / "ov32") as pipe:
        full = pipe("a cat", **kw).images
    assert np.isfinite(half).all() and np.abs(half - full).max() < 0.1


def test_attention_per_backend_and_openvino_matches_diffusers(sd3, artifacts, checkpoints, tmp_path):
    """ONNX Runtime's fused graph has every MMDiT attention (joint, and MMDiT-X's second)
    as one MultiHeadAttention; OpenVINO runs the portable graph and fuses them itself.
    Both give diffusers' image."""
    pytest.importorskip("openvino")
    import onnx

    from diffrt.runtime.backends import openvino as ovb

    folder = artifacts["sd3"]
    manifest = read_manifest(folder)
    config = json.loads((checkpoints["sd3"] / "transformer" / "config.json").read_text())
    blocks = config["num_layers"] + len(config["dual_attention_layers"])
    fused = onnx.load(str(folder / manifest.stage("transformer-fused").graph_path)).graph.node
    portable = onnx.load(str(folder / manifest.stage("transformer").graph_path)).graph.node
    assert sum(n.op_type == "MultiHeadAttention" for n in fused) == blocks
    assert sum(n.op_type == "Softmax" for n in fused) == 0 and sum(n.op_type == "Softmax" for n in portable) == blocks
    _, ref = sd3("sd3")
    latents = _latents((1, 16, 24, 16), seed=6)
    kw = dict(num_inference_steps=3, guidance_scale=4.5, height=48, width=32, output_type="np")
    theirs = ref("a lamp", latents=latents, **kw).images
    with Pipeline.load(folder, backend="openvino", precision="fp32", cache_dir=tmp_path / "ov",
                       prepare={"height": 48, "width": 32}) as ov:
        got = ov("a lamp", latents=latents.numpy(), **kw).images
        transformer = ov.models["transformer"]
        assert transformer.spec.name == "transformer"
        ops = [ovb.attention_ops(c) for c in transformer.compiled_models().values()]
    print(f"tiny sd3 transformer: {blocks} attention blocks; ORT fused graph {blocks} MultiHeadAttention; "
          f"OpenVINO {[o.to_json() for o in ops]}")
    assert ops and all(o.fused == blocks and o.unfused == 0 for o in ops)
    compare_images(got, theirs, "sd3/openvino")


def test_server_generate_and_openai_endpoints(sd3):
    """/v1/generate and the OpenAI images endpoint on an SD3 artifact: the images the
    pipeline makes for the same seed and settings."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    import base64
    import io

    from PIL import Image
    from serve_util import LiveServer, decode_npy

    ours, _ = sd3("sd3")
    with LiveServer(ours, max_batch=2, batch_wait_ms=10, max_n=2, max_steps=30, max_side=128) as server:
        status, _, body = server.post("/v1/generate", {"prompt": "a red car", "negative_prompt": "blur",
                                                       "num_inference_steps": 2, "seed": 7, "size": "48x32",
                                                       "output_format": "npy"})
        assert status == 200, body
        got = decode_npy(body["images"][0]["b64"])
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        result = client.images.generate(model="tiny", prompt="a cat", n=2, size="32x32", response_format="b64_json")
    direct = ours("a red car", negative_prompt="blur", num_inference_steps=2, seed=7, height=32, width=48,
                  output_type="np").images[0]
    assert np.abs(got.astype(np.float32) / (255.0 if got.dtype == np.uint8 else 1.0) - direct).max() < 1e-5
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in result.data] == [(32, 32), (32, 32)]


def test_demo_kind_sd3(tmp_path):
    """`diffrt demo --kind sd3` runs the whole path offline, with SD3's own presets."""
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "demo.png"
    result = subprocess.run([sys.executable, "-m", "diffrt.cli", "demo", "--kind", "sd3", "--dir", str(tmp_path / "w"),
                             "--preset", "sd35-large-turbo-4step", "-o", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).size == (128, 128)
    assert "text_encoder_3: exporting to ONNX" in result.stderr and "denoising: 4/4 steps" in result.stderr
    assert read_manifest(tmp_path / "w" / "artifact").family == "sd3"
