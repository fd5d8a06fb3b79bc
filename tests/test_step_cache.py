"""DeepCache step caching (`diffrt export --step-cache deepcache`, `cache="deepcache:N"`).

The reference is the `DeepCache` package's own DeepCacheSDHelper (0.1.1) wrapped around
diffusers' pipeline: on a cached step it returns every module output below the cache
branch from the last full step. Same tiny weights, prompts and latents; we assert 1e-4
on the [0, 1] image scale (the project's bar is 2e-3; measured ~2e-6), and that the
helper's cached image differs from its uncached one by far more than that, so the
comparison can tell a cached schedule from an uncached one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline

TOLERANCE = 1e-4
DeepCache = pytest.importorskip("DeepCache", reason="the DeepCache package (the reference) is not installed")


@pytest.fixture(scope="module")
def cached_artifact(tiny_checkpoint, tmp_path_factory):
    """cached_artifact(kind, branch) -> an artifact exported with --step-cache deepcache:branch."""
    from diffrt.export import export

    made = {}

    def get(kind: str, branch: int = 0):
        if (kind, branch) not in made:
            out = tmp_path_factory.mktemp(f"deepcache-{kind}-{branch}") / "artifact"
            export(tiny_checkpoint(kind), out, step_cache=f"deepcache:{branch}")
            made[kind, branch] = out
        return made[kind, branch]

    return get


def _reference(folder, scheduler: str):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def _helper_images(pipe, interval: int, branch: int, **call):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return pipe(**call).images
    finally:
        helper.disable()


def _latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize("branch", [0, 3])
def test_sd_cached_schedule_matches_the_deepcache_helper(tiny_checkpoint, cached_artifact, branch):
    """Branch 0: the last up block's last layer only (no attention on the tiny UNet);
    branch 3: the deeper up block's last layer, with its cross-attention, and the whole
    first down block."""
    ref = _reference(tiny_checkpoint("sd15"), "DDIMScheduler")
    latents = _latents((2, 4, 32, 32))
    call = dict(prompt=["a photo of a cat", "a dog"], negative_prompt=["blurry", ""], num_inference_steps=8,
                guidance_scale=7.5, output_type="np")
    theirs = _helper_images(ref, 3, branch, latents=latents, **call)
    uncached = ref(latents=latents, **call).images
    with Pipeline.load(cached_artifact("sd15", branch)) as pipe:
        ours = pipe(latents=latents.numpy(), scheduler="ddim", cache=f"deepcache:3:{branch}", **call).images
    diff = float(np.abs(ours - theirs).max())
    print(f"branch {branch}: max abs difference vs DeepCacheSDHelper {diff:.2e}; "
          f"cached vs uncached {np.abs(theirs - uncached).max():.2e}")
    assert np.abs(theirs - uncached).max() > 100 * TOLERANCE  # the cache changes the image: the check can fail
    assert diff <= TOLERANCE


def test_sdxl_cached_schedule_matches_the_deepcache_helper(tiny_checkpoint, cached_artifact):
    ref = _reference(tiny_checkpoint("sdxl"), "EulerDiscreteScheduler")
    latents = _latents((1, 4, 32, 32), seed=2)
    call = dict(prompt="a red car", num_inference_steps=7, guidance_scale=5.0, output_type="np")
    theirs = _helper_images(ref, 2, 0, latents=latents, **call)
    with Pipeline.load(cached_artifact("sdxl")) as pipe:
        ours = pipe(latents=latents.numpy(), scheduler="euler", cache="deepcache:2", **call).images
    diff = float(np.abs(ours - theirs).max())
    print(f"sdxl: max abs difference vs DeepCacheSDHelper {diff:.2e}")
    assert diff <= TOLERANCE


def test_interval_one_is_the_uncached_pipeline_and_off_is_bit_identical(tiny_checkpoint, cached_artifact, exported):
    """Interval 1 runs the full graph every step: diffusers' uncached image. With the
    cache off the plain UNet runs: the same graph bytes as a plain export, the same image."""
    ref = _reference(tiny_checkpoint("sd15"), "EulerDiscreteScheduler")
    latents = _latents((1, 4, 32, 32), seed=1)
    call = dict(prompt="a castle", num_inference_steps=6, guidance_scale=7.5, output_type="np")
    theirs = ref(latents=latents, **call).images
    with Pipeline.load(cached_artifact("sd15")) as pipe, Pipeline.load(exported("sd15")) as plain:
        assert pipe.manifest.stages["unet"].files == plain.manifest.stages["unet"].files
        one = pipe(latents=latents.numpy(), scheduler="euler", cache="deepcache:1", **call).images
        off = pipe(latents=latents.numpy(), scheduler="euler", cache="off", **call).images
        before = plain(latents=latents.numpy(), scheduler="euler", **call).images
    assert float(np.abs(one - theirs).max()) <= TOLERANCE
    assert np.array_equal(off, before)


def _executed_on_a_cached_step(folder, branch: int) -> list[torch.nn.Module]:
    """The convolutions, linear layers and attention modules diffusers' UNet runs on a
    cached step under DeepCacheSDHelper (which replaces the forwards of resnets,
    transformers and blocks, never of these: their hooks fire only when they run)."""
    from diffusers.models.attention_processor import Attention

    pipe = _reference(folder, "DDIMScheduler")
    ran: list[torch.nn.Module] = []
    leaves = [m for m in pipe.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, Attention))]
    handles = []
    step = {"i": 0}

    def count(module, args, output):
        if step["i"] == 1:
            ran.append(module)

    def next_step(pipe, i, t, kwargs):
        step["i"] = i + 1
        return kwargs

    for module in leaves:
        handles.append(module.register_forward_hook(count))
    try:
        _helper_images(pipe, 2, branch, prompt="x", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                       height=32, width=32, callback_on_step_end=next_step)
    finally:
        for handle in handles:
            handle.remove()
    return ran


@pytest.mark.parametrize("branch", [0, 3])
def test_the_shallow_graph_holds_only_what_a_cached_step_runs(tiny_checkpoint, cached_artifact, branch):
    """Its convolutions and matrix products are those of the modules the helper runs on
    a cached step (counted with forward hooks on diffusers' UNet); the plain UNet's are
    every one."""
    ran = _executed_on_a_cached_step(tiny_checkpoint("sd15"), branch)
    folder = cached_artifact("sd15", branch)

    def ops(stage: str) -> dict[str, int]:
        graph = onnx.load(str(folder / stage / "model.onnx"), load_external_data=False).graph
        return {op: sum(n.op_type == op for n in graph.node) for op in ("Conv", "Gemm", "MatMul")}

    shallow, plain = ops("unet-deepcache-shallow"), ops("unet")
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in ran)
    linears = sum(isinstance(m, torch.nn.Linear) for m in ran)
    print(f"branch {branch}: shallow {shallow}, plain {plain}; a cached step runs {convs} convs, {linears} linears")
    assert shallow["Conv"] == convs
    assert shallow["Gemm"] + shallow["MatMul"] - _attention_matmuls(ran) == linears
    assert plain["Conv"] > convs
    assert ops("unet-deepcache-full") == plain


def _attention_matmuls(ran) -> int:
    """Each attention module run adds two MatMuls that are not Linear layers (QK^T, AV)."""
    from diffusers.models.attention_processor import Attention

    return 2 * sum(isinstance(m, Attention) for m in ran)


def test_a_cache_the_artifact_lacks_is_a_one_line_error(exported, cached_artifact):
    with Pipeline.load(exported("sd15")) as pipe:
        with pytest.raises(DiffrtError, match="--step-cache deepcache") as info:
            pipe.request("a cat", cache="deepcache:3")
        assert "\n" not in str(info.value)
    with Pipeline.load(cached_artifact("sd15")) as pipe:
        with pytest.raises(DiffrtError, match="deepcache:1"):
            pipe.request("a cat", cache="deepcache:3:1")  # exported for branch 0
        for bad in ("deepcache", "deepcache:0", "fastcache:2", "deepcache:x", 3):
            with pytest.raises(DiffrtError, match="cache="):
                pipe.request("a cat", cache=bad)


def test_the_memory_check_counts_the_cache_graphs_a_request_opens_first(cached_artifact, monkeypatch):
    """A cached request's memory bound includes the step-cache graphs it will open (a
    further copy of UNet weights) until they are open: the bytes predicted equal the
    files of the stages the first cached generation actually opened."""
    from diffrt.runtime import pipeline as pipeline_module
    from diffrt.runtime import request as request_module

    folder = cached_artifact("sd15")
    seen = []
    real = pipeline_module.check_memory
    monkeypatch.setattr(pipeline_module, "check_memory",
                        lambda *a, **k: (seen.append(k.get("unopened_weights", 0)), real(*a, **k))[1])
    with Pipeline.load(folder) as pipe:
        call = dict(num_inference_steps=3, height=32, width=32, seed=0, output_type="np")
        pipe.request("a cat", **call)
        assert seen[-1] == 0
        before = set(pipe._models)
        pipe.request("a cat", cache="deepcache:3", **call)
        predicted = seen[-1]
        with monkeypatch.context() as m:  # nothing left: the request is refused, naming what it would open
            m.setattr(request_module, "available_memory_bytes", lambda: 1)
            with pytest.raises(DiffrtError, match="stages it opens first") as info:
                pipe.request("a cat", cache="deepcache:3", **call)
            assert "\n" not in str(info.value)
        pipe("a cat", cache="deepcache:3", **call)
        opened = [pipe._models[k].spec for k in set(pipe._models) - before]
        assert len(opened) == 2
        assert predicted == sum((folder / f.path).stat().st_size for spec in opened for f in spec.files) > 0
        pipe.request("a cat", cache="deepcache:3", **call)
        assert seen[-1] == 0  # open now: counted with the loaded weights


def test_the_server_takes_cache_and_refuses_one_the_artifact_lacks(cached_artifact):
    """/v1/generate's `cache` field: the served image is the pipeline's with the same
    cache (and not the uncached one); an unknown cache is a 400 naming the field."""
    pytest.importorskip("fastapi")
    from serve_util import LiveServer, decode_npy

    fast = {"num_inference_steps": 5, "scheduler": "euler", "size": "64x64", "seed": 3, "output_format": "npy"}
    call = dict(num_inference_steps=5, scheduler="euler", height=64, width=64, seed=3, output_type="np")
    with Pipeline.load(cached_artifact("sd15")) as pipe:
        expected = pipe("a red cat", cache="deepcache:2", **call).images[0]
        plain = pipe("a red cat", **call).images[0]
        with LiveServer(pipe, warmup=False) as server:
            status, _, body = server.post("/v1/generate", {"prompt": "a red cat", **fast, "cache": "deepcache:2"})
            assert status == 200, body
            served = decode_npy(body["images"][0]["b64"])
            status, _, bad = server.post("/v1/generate", {"prompt": "a red cat", **fast, "cache": "fastcache:2"})
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert np.abs(served - plain).max() > 1e-4
    assert status == 400 and bad["error"].get("param") == "cache", bad


@pytest.fixture(scope="module")
def flux_cached(tmp_path_factory):
    """(checkpoint, artifact exported with --step-cache fbcache) of the tiny Flux-dev model."""
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_flux

    checkpoint = make_tiny_flux(tmp_path_factory.mktemp("ckpt-flux-dev") / "checkpoint", kind="flux-dev")
    artifact = tmp_path_factory.mktemp("fbcache-flux-dev") / "artifact"
    export(checkpoint, artifact, step_cache="fbcache")
    return checkpoint, artifact


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_flux_first_block_cache_matches_diffusers(flux_cached, threshold):
    """diffusers' FirstBlockCacheConfig on FluxPipeline is the reference: the same image
    within 1e-4 and the same number of steps on which the other blocks did not run
    (counted on diffusers' side by the last block's output projection, which runs only
    when that block computes). Both thresholds skip steps on this model."""
    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig

    checkpoint, artifact = flux_cached
    ref = diffusers.FluxPipeline.from_pretrained(checkpoint)
    ref.set_progress_bar_config(disable=True)
    h, w = 48 // ref.vae_scale_factor, 64 // ref.vae_scale_factor
    latents = ref._pack_latents(torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(1)), 1, 16, h, w)
    call = dict(prompt="a photo of a cat", height=48, width=64, output_type="np", num_inference_steps=12,
                guidance_scale=3.5, max_sequence_length=32)
    uncached = ref(latents=latents, **call).images
    computed = []
    handle = ref.transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(
        lambda *args: computed.append(1))
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        theirs = ref(latents=latents, **call).images
    finally:
        ref.transformer.disable_cache()
        handle.remove()
    with Pipeline.load(artifact) as pipe:
        result = pipe(latents=latents.numpy(), cache=f"fbcache:{threshold}", **call)
    diff = float(np.abs(result.images - theirs).max())
    skipped = call["num_inference_steps"] - len(computed)
    print(f"fbcache:{threshold}: diffusers skipped {skipped} of 12 steps, diffrt {result.timings['cached_steps']}; "
          f"max abs difference {diff:.2e}")
    assert skipped > 0 and np.abs(theirs - uncached).max() > 10 * TOLERANCE  # the skips move the image
    assert result.timings["cached_steps"] == skipped
    assert diff <= TOLERANCE
