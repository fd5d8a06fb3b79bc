"""Flux.1 against diffusers' FluxPipeline on tiny random models (schnell-style: no
guidance embedding, static shift; dev-style: guidance embedding, dynamic shifting) with
the same packed latents: the conditioning (CLIP pooled, T5 at max_sequence_length,
prompt_2), the guidance embedding, 2x2 packing and position ids, every preset, non-square
sizes, batches; the scheduler's timesteps and sigmas at several image sizes; the fused
attention (ONNX Runtime) and OpenVINO's own; half precision graphs; the weight map.

The bar is 2e-3 on the [0, 1] image scale; we assert 1e-4 as test_pipeline_parity does
(measured: ~1e-6).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from diffrt.artifacts import read_manifest
from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.schedulers import plan_window

from conftest import requires_bf16_cpu
from test_pipeline_parity import compare_images, TorchNoise

KINDS = ("flux", "flux-dev")
CHANNELS = 16  # the VAE's latent channels


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from diffrt.export.tiny import make_tiny_flux

    return {kind: make_tiny_flux(tmp_path_factory.mktemp(f"ckpt-{kind}") / "checkpoint", kind=kind) for kind in KINDS}


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    from diffrt.export import export

    out = {}
    for kind in KINDS:
        out[kind] = tmp_path_factory.mktemp(f"art-{kind}") / "artifact"
        export(checkpoints[kind], out[kind])
    return out


@pytest.fixture(scope="module")
def flux(checkpoints, artifacts):
    """get(kind) -> (our Pipeline on ORT, diffusers' FluxPipeline)."""
    import diffusers

    cache = {}

    def get(kind):
        if kind not in cache:
            ref = diffusers.FluxPipeline.from_pretrained(checkpoints[kind])
            ref.set_progress_bar_config(disable=True)
            cache[kind] = (Pipeline.load(artifacts[kind]), ref)
        return cache[kind]

    yield get
    for ours, _ in cache.values():
        ours.close()


def _packed_latents(ref, batch, height, width, seed=0):
    """Noise in the VAE's layout, packed as diffusers packs it: what its latents= takes."""
    h, w = height // ref.vae_scale_factor, width // ref.vae_scale_factor
    noise = torch.randn(batch, CHANNELS, h, w, generator=torch.Generator().manual_seed(seed))
    return ref._pack_latents(noise, batch, CHANNELS, h, w)


# The recipes as their sources write them (README's preset table).
RECIPES = {  # preset -> diffusers FluxPipeline arguments
    "flux-schnell-4step": {"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256},
    "flux-dev": {"num_inference_steps": 28, "guidance_scale": 3.5},
}
DEFAULT_T5_LENGTH = {"flux": 256, "flux-dev": 512}  # schnell's model card, diffusers' default


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_every_preset_matches_diffusers(flux, kind, preset):
    """Each preset on each checkpoint kind, non-square 48x64, two prompts: the T5 length
    is the preset's (schnell's 256) or the checkpoint's default."""
    ours, ref = flux(kind)
    latents = _packed_latents(ref, 2, 48, 64, seed=1)
    recipe = {"max_sequence_length": DEFAULT_T5_LENGTH[kind], **RECIPES[preset]}
    prompts = ["a photo of a cat", "a red car on a mountain road"]
    theirs = ref(prompts, latents=latents, height=48, width=64, output_type="np", **recipe).images
    result = ours(prompts, preset=preset, latents=latents.numpy(), height=48, width=64, output_type="np")
    assert result.settings.num_inference_steps == recipe["num_inference_steps"]
    assert result.settings.guidance_scale == recipe["guidance_scale"]
    compare_images(result.images, theirs, f"{kind}/{preset}")


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_2_images_per_prompt_and_sequence_length(flux, kind):
    """prompt_2 reaches T5 only; two prompts x two images; an explicit T5 length; dev's
    guidance 5.0 (schnell ignores guidance, as diffusers does); another size (64x40)."""
    ours, ref = flux(kind)
    latents = _packed_latents(ref, 4, 64, 40, seed=2)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=40, num_images_per_prompt=2,
              max_sequence_length=77)
    prompts = ["a lighthouse", "an oil painting of a forest"]
    theirs = ref(prompts, prompt_2=["at night, stormy sea", "autumn"], latents=latents, output_type="np", **kw).images
    got = ours(prompts, prompt_2=["at night, stormy sea", "autumn"], latents=latents.numpy(), output_type="np",
               **kw).images
    compare_images(got, theirs, f"{kind}/prompt_2")
    plain = ours(prompts, latents=latents.numpy(), output_type="np", **kw).images
    assert np.max(np.abs(plain - got)) > 1e-4  # prompt_2 changed the images


def test_dev_guidance_is_an_embedding_per_image(flux):
    """dev: the guidance scale changes the image (it is a transformer input, one row per
    image, no CFG); requests with different scales batched together get the images each
    gets alone."""
    ours, ref = flux("flux-dev")
    latents = _packed_latents(ref, 1, 32, 32, seed=3)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    images = {}
    for scale in (1.5, 6.0):
        theirs = ref("a boat", latents=latents, guidance_scale=scale, **kw).images
        images[scale] = ours("a boat", latents=latents.numpy(), guidance_scale=scale, **kw).images
        compare_images(images[scale], theirs, f"flux-dev/guidance {scale}")
    assert np.max(np.abs(images[1.5] - images[6.0])) > 1e-3
    requests = [ours.request("a boat", guidance_scale=s, seed=5, **kw) for s in (1.5, 6.0)]
    assert ours.batch_key(requests[0]) == ours.batch_key(requests[1])
    progress = []
    batched = ours.generate(requests, progress=lambda done, total: progress.append(done))
    assert progress == [1, 2]  # one transformer call per step for both requests
    for request, out in zip(requests, batched, strict=True):
        alone = ours.generate([request])[0]
        np.testing.assert_allclose(out.images, alone.images, atol=1e-5)


def test_seeded_noise_is_drawn_unpacked_as_diffusers_draws_it(flux):
    """Without latents=: noise from a torch generator in the VAE's layout, then packed,
    gives diffusers' image for the same generator."""
    ours, ref = flux("flux")
    kw = dict(num_inference_steps=2, guidance_scale=0.0, height=32, width=48, num_images_per_prompt=2,
              output_type="np")
    theirs = ref("a tree", generator=torch.Generator().manual_seed(9), max_sequence_length=256, **kw).images
    got = ours("a tree", generator=TorchNoise(9), **kw).images
    compare_images(got, theirs, "flux/generator")


def test_requests_with_other_t5_lengths_do_not_share_a_batch(flux):
    ours, _ = flux("flux")
    a, b = (ours.request("a cat", max_sequence_length=n) for n in (64, 128))
    assert ours.batch_key(a) != ours.batch_key(b)
    with pytest.raises(DiffrtError, match="group them by batch_key"):
        ours.generate([a, b])


# -- the schedule -------------------------------------------------------------------------

SIZES = [(32, 32), (64, 64), (48, 80), (128, 128), (256, 256)]  # 64 to 4096 image tokens on the tiny VAE


def _diffusers_schedule(ref, steps, height, width, **kw):
    """The timesteps and sigmas FluxPipeline sets for this request, read from its
    scheduler at the first step (the rest of the run is skipped)."""
    seen = {}

    def capture(pipe, i, t, tensors):
        seen.setdefault("timesteps", pipe.scheduler.timesteps.clone())
        seen.setdefault("sigmas", pipe.scheduler.sigmas.clone())
        pipe._interrupt = True
        return {}

    ref("a cat", num_inference_steps=steps, height=height, width=width, output_type="latent",
        callback_on_step_end=capture, max_sequence_length=8, **kw)
    return seen["timesteps"].numpy(), seen["sigmas"].numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", sorted(RECIPES))
@pytest.mark.parametrize("size", SIZES)
def test_schedule_matches_diffusers(flux, kind, preset, size):
    """Every preset at several sizes: FluxPipeline's sigmas, statically shifted (schnell)
    or by mu from the image token count (dev), equal diffusers' (float32)."""
    ours, ref = flux(kind)
    height, width = size
    request = ours.request("a cat", preset=preset, height=height, width=width, max_sequence_length=8)
    steps = request.settings.num_inference_steps
    plan = ours.family.prepare(ours.facts, request, ours._encode)
    run = plan_window(request.scheduler, steps, **plan.schedule)
    timesteps, sigmas = _diffusers_schedule(ref, steps, height, width, guidance_scale=request.settings.guidance_scale)
    np.testing.assert_array_equal(run.timesteps, timesteps)
    np.testing.assert_array_equal(run.sigmas, sigmas)


def test_dynamic_shift_depends_on_the_image_size(flux):
    """dev's schedule moves with the image token count (mu); schnell's does not."""
    for kind, moves in (("flux-dev", True), ("flux", False)):
        ours, _ = flux(kind)
        runs = []
        for size in ((32, 32), (256, 256)):
            request = ours.request("a cat", num_inference_steps=4, height=size[0], width=size[1])
            plan = ours.family.prepare(ours.facts, request, ours._encode)
            runs.append(plan_window(request.scheduler, 4, **plan.schedule).sigmas)
        assert (np.max(np.abs(runs[0] - runs[1])) > 1e-3) == moves, kind


# -- the artifact ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_manifest_facts_defaults_and_stages(artifacts, checkpoints, kind):
    """The facts come from the checkpoint's configs; schnell defaults to its 4-step
    recipe, dev to 28 steps with guidance 3.5; the transformer takes guidance only
    when it embeds it."""
    import json

    manifest = read_manifest(artifacts[kind])
    config = json.loads((checkpoints[kind] / "transformer" / "config.json").read_text())
    vae = json.loads((checkpoints[kind] / "vae" / "config.json").read_text())
    facts = manifest.model
    assert facts["guidance_embeds"] == config["guidance_embeds"] == (kind == "flux-dev")
    assert (facts["vae_scaling_factor"], facts["vae_shift_factor"]) == (vae["scaling_factor"], vae["shift_factor"])
    assert facts["latent_channels"] == vae["latent_channels"] == CHANNELS
    assert facts["max_sequence_length"] == DEFAULT_T5_LENGTH[kind]
    steps, guidance = (28, 3.5) if kind == "flux-dev" else (4, 0.0)
    assert (manifest.defaults["num_inference_steps"], manifest.defaults["guidance_scale"]) == (steps, guidance)
    assert manifest.defaults["scheduler"] == "flow_match_euler"
    inputs = [t.name for t in manifest.stage("transformer").inputs]
    assert ("guidance" in inputs) == config["guidance_embeds"]
    assert set(manifest.components) == {"tokenizer", "tokenizer_2", "scheduler"}


def test_fused_attention_per_backend(flux, artifacts, checkpoints):
    """ONNX Runtime: every joint-attention block of the transformer (double- and
    single-stream, rotary embedding and QK RMSNorm included) is one MultiHeadAttention in
    the fused graph it runs; OpenVINO runs the portable graph and fuses each block itself.
    Both give diffusers' image."""
    import json

    from diffrt.runtime.backends import openvino as ovb

    folder = artifacts["flux-dev"]
    manifest = read_manifest(folder)
    config = json.loads((checkpoints["flux-dev"] / "transformer" / "config.json").read_text())
    blocks = config["num_layers"] + config["num_single_layers"]
    fused = onnx.load(str(folder / manifest.stage("transformer-fused").graph_path)).graph.node
    portable = onnx.load(str(folder / manifest.stage("transformer").graph_path)).graph.node
    assert sum(n.op_type == "MultiHeadAttention" for n in fused) == blocks
    assert sum(n.op_type == "Softmax" for n in fused) == 0
    assert sum(n.op_type == "Softmax" for n in portable) == blocks
    ours, ref = flux("flux-dev")
    assert ours.models["transformer"].spec.name == "transformer-fused"
    latents = _packed_latents(ref, 1, 48, 32, seed=4)
    kw = dict(num_inference_steps=3, guidance_scale=3.5, height=48, width=32, output_type="np")
    theirs = ref("a lamp", latents=latents, **kw).images
    with Pipeline.load(folder, backend="openvino", precision="fp32", prepare={"height": 48, "width": 32}) as ov:
        got = ov("a lamp", latents=latents.numpy(), **kw).images
        transformer = ov.models["transformer"]
        assert transformer.spec.name == "transformer"
        ops = [ovb.attention_ops(c) for c in transformer.compiled_models().values()]
    print(f"tiny flux-dev transformer: {blocks} blocks; ORT fused graph {blocks} MultiHeadAttention; "
          f"OpenVINO {ops[0].fused} fused, {ops[0].unfused} unfused softmax")
    assert ops and all(o.fused == blocks and o.unfused == 0 for o in ops)
    compare_images(got, theirs, "flux-dev/openvino")


def test_transformer_weight_map_holds_every_parameter(artifacts, checkpoints):
    """The QK RMSNorm weights (exported as primitive ops) and every other transformer
    parameter are found in the graph with the checkpoint's values."""
    from diffusers import FluxTransformer2DModel
    from onnx import numpy_helper

    from diffrt.weights import weight_map

    folder = artifacts["flux-dev"]
    spec = read_manifest(folder).stage("transformer")
    params = {n: p.detach().numpy() for n, p in
              FluxTransformer2DModel.from_pretrained(checkpoints["flux-dev"] / "transformer").named_parameters()}
    graph = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / spec.graph_path)).graph.initializer}
    wm = weight_map(folder, spec)
    assert set(wm.entries) == set(params)
    assert any(".norm_q." in n for n in params) and any(".norm_added_k." in n for n in params)
    for name, entry in wm.entries.items():
        assert not entry.absent, (name, entry.absent)
        for place in entry.placements:
            value = params[name]
            for step in place.transform:
                value = value.T if step == "transpose" else value.reshape(place.shape)
            np.testing.assert_array_equal(graph[place.initializer], value, err_msg=name)


def test_half_precision_graphs(checkpoints, tmp_path):
    """fp16 and bf16 graphs: T5 gets bf16 only (fp16 overflows it), the VAE stays fp32
    (its config says force_upcast); the fp16 pipeline on ONNX Runtime stays close to fp32."""
    from diffrt.export import export

    folder = tmp_path / "half"
    manifest = export(checkpoints["flux-dev"], folder, precision="fp16,bf16")
    names = set(manifest.stages)
    assert {"transformer-fp16", "transformer-fused-fp16", "transformer-bf16", "text_encoder_2-bf16"} <= names
    assert "text_encoder_2-fp16" not in names
    assert not any(n.startswith("vae_decoder-") and n.endswith(("fp16", "bf16")) for n in names)
    kw = dict(num_inference_steps=2, height=32, width=32, seed=3, output_type="np")
    images = {}
    for precision in ("fp32", "fp16"):
        with Pipeline.load(folder, graph_precision=precision) as pipe:
            images[precision] = pipe("a cat", **kw).images
            if precision == "fp16":
                assert pipe.models["text_encoder_2"].spec.precision == "fp32"
                assert pipe.models["vae_decoder"].spec.precision == "fp32"
    assert np.max(np.abs(images["fp16"] - images["fp32"])) < 2e-2
    assert manifest.checks["fp16"]["image_psnr_db"] > 40 and manifest.checks["bf16"]["image_psnr_db"] > 30


@requires_bf16_cpu
def test_bf16_graphs_compute_on_openvino(checkpoints, tmp_path):
    from diffrt.export import export

    folder = tmp_path / "bf16"
    export(checkpoints["flux"], folder, precision="bf16")
    kw = dict(num_inference_steps=2, height=32, width=32, seed=3, output_type="np")
    with Pipeline.load(folder, backend="openvino", precision="fp32") as pipe:
        reference = pipe("a cat", **kw).images
    with Pipeline.load(folder, backend="openvino", graph_precision="bf16", precision="bf16") as pipe:
        got = pipe("a cat", **kw).images
    assert np.isfinite(got).all() and np.max(np.abs(got - reference)) < 0.1


# -- mistakes ---------------------------------------------------------------------------------

def test_flux_errors(flux):
    ours, _ = flux("flux-dev")
    with pytest.raises(DiffrtError, match="max_sequence_length must be an integer from 1 to 512"):
        ours.request("a cat", max_sequence_length=513)
    with pytest.raises(DiffrtError, match="prompt_3: not an option of Flux artifacts; they take prompt_2"):
        ours.request("a cat", prompt_3="x")
    with pytest.raises(DiffrtError, match=r"latents must have shape \(1, 64, 64\)"):
        ours.request("a cat", height=32, width=32, latents=np.zeros((1, CHANNELS, 16, 16), np.float32))
    with pytest.raises(DiffrtError, match="height must be a positive multiple of 4"):
        ours.request("a cat", height=30)
    with pytest.raises(DiffrtError, match="does not fit this flow-matching model"):
        ours.request("a cat", scheduler="euler")
    with pytest.raises(DiffrtError, match="negative_prompt: Flux runs without classifier-free guidance"):
        ours("a cat", negative_prompt="blurry", num_inference_steps=1, height=32, width=32)


def test_served_over_http_unchanged(flux):
    """/v1/generate and the OpenAI Images endpoint take a Flux artifact as they are:
    the preset, guidance as dev's embedding, images as requested."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import base64
    import io

    from PIL import Image
    from serve_util import LiveServer

    ours, _ = flux("flux-dev")
    with LiveServer(ours, max_batch=2, batch_wait_ms=20, max_n=2, max_steps=30, max_side=128) as server:
        status, _, body = server.post("/v1/generate", {"prompt": "a red car", "guidance_scale": 2.0, "seed": 7,
                                                       "n": 2, "num_inference_steps": 2, "size": "48x32"})
        assert status == 200, body
        assert body["settings"]["scheduler"] == "flow_match_euler" and body["settings"]["guidance_scale"] == 2.0
        assert [Image.open(io.BytesIO(base64.b64decode(im["b64"]))).size for im in body["images"]] == [(48, 32)] * 2
        alone = ours("a red car", guidance_scale=2.0, seed=8, num_inference_steps=2, height=32, width=48)
        second = Image.open(io.BytesIO(base64.b64decode(body["images"][1]["b64"])))
        assert np.array_equal(np.asarray(second), np.asarray(alone.images[0]))  # image 2 = seed 8, alone
        status, _, body = server.post("/v1/images/generations", {"prompt": "a cat", "size": "32x32", "n": 1})
        assert status == 200, body
        assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (32, 32)
        status, _, body = server.post("/v1/generate", {"prompt": "a cat", "negative_prompt": "blur", "size": "32x32",
                                                       "num_inference_steps": 1})
        assert status == 400 and "negative_prompt" in json.dumps(body), body


def test_an_impossible_size_is_refused_before_any_work(flux):
    """The up-front memory bound (families/flux.py activation_terms) refuses a size no
    machine holds, in one line, before a generation starts."""
    ours, _ = flux("flux")
    with pytest.raises(DiffrtError, match=r"100000x100000 with 1 image\(s\) needs at least .* of memory"):
        ours.request("a cat", height=100000, width=100000)
