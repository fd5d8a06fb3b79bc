"""SDXL against diffusers' StableDiffusionXLPipeline / ...Img2ImgPipeline on tiny random
models with the same latents: conditioning (two encoders, pooled embeds, time ids,
zeroed negatives, prompt_2), every deterministic scheduler, non-square sizes, the
presets (timesteps/sigmas and whole generations), stochastic samplers with the same
injected noise, and the base + refiner hand-off in latent space.

The bar is 2e-3 on the [0, 1] image scale; we assert 1e-4 like test_pipeline_parity
(measured: ~2e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.schedulers import make_scheduler

from test_pipeline_parity import compare_images, _diffusers_pipeline, _diffusers_scheduler, _latents, TorchNoise

DETERMINISTIC = ("ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras")


@pytest.fixture(scope="module")
def sdxl(tiny_checkpoint, exported):
    """get(kind) -> (our Pipeline, diffusers pipeline, the checkpoint's scheduler config)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            ref = _diffusers_pipeline(tiny_checkpoint(kind))
            cache[kind] = (Pipeline.load(exported(kind)), ref, dict(ref.scheduler.config))
        ours, ref, config = cache[kind]
        ref.scheduler = _diffusers_scheduler("euler", config)  # the checkpoint's own class
        return ours, ref, config

    return get


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_sdxl_matches_diffusers(sdxl, scheduler):
    """Two prompts x two images, negative prompts (so both encoders run on them),
    non-square 48x64: every deterministic scheduler."""
    ours, ref, config = sdxl("sdxl")
    ref.scheduler = _diffusers_scheduler(scheduler, config)
    steps = 6 if scheduler != "pndm" else 8
    prompts, negatives = ["a photo of a cat", "(((masterpiece))), a dog, 4k"], ["blurry", ""]
    latents = _latents((4, 4, 24, 32))  # 48 high, 64 wide
    kw = dict(negative_prompt=negatives, num_inference_steps=steps, guidance_scale=5.0, num_images_per_prompt=2,
              height=48, width=64)
    theirs = ref(prompts, latents=latents, output_type="np", **kw).images
    got = ours(prompts, latents=latents.numpy(), scheduler=scheduler, output_type="np", **kw).images
    compare_images(got, theirs, f"sdxl/{scheduler}")


def test_zeroed_negative_embeddings_and_default_preset(sdxl):
    """No negative prompt: force_zeros_for_empty_prompt zeroes the negative embeddings;
    no scheduler/steps/guidance: the checkpoint's Euler, 30 steps, guidance 5."""
    ours, ref, _ = sdxl("sdxl")
    assert ours.manifest.model["force_zeros_for_empty_prompt"] is True
    latents = _latents((1, 4, 32, 32), seed=1)
    theirs = ref("a castle", num_inference_steps=30, guidance_scale=5.0, latents=latents, output_type="np").images
    result = ours("a castle", latents=latents.numpy(), output_type="np")
    assert (result.settings.scheduler, result.settings.num_inference_steps, result.settings.guidance_scale) == \
        ("euler", 30, 5.0)
    compare_images(result.images, theirs, "sdxl/default")


def test_prompt_2_and_size_conditioning(sdxl):
    """prompt_2 / negative_prompt_2 reach the second encoder only; original_size, crops
    and target_size (and their negatives, batch of two: diffusers' row order) the time ids."""
    ours, ref, _ = sdxl("sdxl")
    latents = _latents((2, 4, 32, 24), seed=2)
    kw = dict(prompt_2="an oil painting", negative_prompt="low quality", negative_prompt_2="jpeg artifacts",
              num_inference_steps=4, guidance_scale=6.0, height=64, width=48, num_images_per_prompt=2,
              original_size=(1024, 768), crops_coords_top_left=(16, 32), target_size=(512, 384),
              negative_original_size=(256, 256), negative_crops_coords_top_left=(8, 8), negative_target_size=(640, 640))
    theirs = ref("a red car", latents=latents, output_type="np", **kw).images
    got = ours("a red car", latents=latents.numpy(), output_type="np", **kw).images
    compare_images(got, theirs, "sdxl/prompt_2+sizes")
    plain = ours("a red car", latents=latents.numpy(), output_type="np",
                 **{k: v for k, v in kw.items() if k in ("num_inference_steps", "guidance_scale", "height", "width",
                                                         "num_images_per_prompt", "negative_prompt")}).images
    assert np.max(np.abs(plain - got)) > 1e-4  # the options changed the image


@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_no_cfg(sdxl, guidance):
    ours, ref, _ = sdxl("sdxl")
    latents = _latents((1, 4, 24, 40), seed=3)
    kw = dict(num_inference_steps=5, guidance_scale=guidance, height=48, width=80)
    theirs = ref("a red car", latents=latents, output_type="np", **kw).images
    got = ours("a red car", latents=latents.numpy(), scheduler="euler", output_type="np", **kw).images
    compare_images(got, theirs, f"sdxl/cfg{guidance}")


# -- presets --------------------------------------------------------------------------

RECIPES = {  # preset -> (diffusers scheduler class, from_config overrides, steps, guidance)
    "sdxl-turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, 1, 0.0),
    "sdxl-lightning-4step": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 4, 0.0),
    "lcm-sdxl-4step": ("LCMScheduler", {}, 4, None),
    "full-30step": ("EulerDiscreteScheduler", {}, 30, 5.0),
}


@pytest.mark.parametrize("preset", RECIPES)
@pytest.mark.parametrize("steps", [None, 1, 2, 4])
def test_preset_timesteps_and_sigmas_match_diffusers(sdxl, preset, steps):
    import diffusers

    ours, _, config = sdxl("sdxl")
    settings = ours.resolve(preset=preset, num_inference_steps=steps)
    cls, overrides, default_steps, guidance = RECIPES[preset]
    n = steps or default_steps
    assert settings.num_inference_steps == n
    if guidance is not None:
        assert settings.guidance_scale == guidance
    theirs = getattr(diffusers, cls).from_config(config, **overrides)
    theirs.set_timesteps(n)
    run = make_scheduler(settings.scheduler, ours.scheduler_config, dict(settings.scheduler_config)).plan(n)
    assert theirs.__class__.__name__ == make_scheduler(settings.scheduler, config).class_name
    np.testing.assert_array_equal(run.timesteps, theirs.timesteps.numpy().astype(np.float32))
    if hasattr(theirs, "sigmas"):
        # np.interp and diffusers' numpy interp of the float32 table can differ by one ulp
        np.testing.assert_allclose(run.sigmas, theirs.sigmas.numpy(), rtol=3e-7, atol=0)
        assert run.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)


def test_turbo_preset_size_and_generation(sdxl):
    """sdxl-turbo: 512x512 by default; a generation with the same injected noise."""
    import diffusers

    ours, ref, config = sdxl("sdxl")
    assert (ours.resolve(preset="sdxl-turbo").height, ours.resolve(preset="sdxl-turbo").width) == (512, 512)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    latents = _latents((1, 4, 32, 32), seed=4)
    for steps in (1, 4):
        theirs = ref("a tree", num_inference_steps=steps, guidance_scale=0.0, height=64, width=64, latents=latents,
                     generator=torch.Generator().manual_seed(5), output_type="np").images
        got = ours("a tree", preset="sdxl-turbo", num_inference_steps=steps, height=64, width=64,
                   latents=latents.numpy(), generator=TorchNoise(5), output_type="np").images
        compare_images(got, theirs, f"sdxl-turbo/{steps}")


def test_lightning_preset_generation(sdxl):
    import diffusers

    ours, ref, config = sdxl("sdxl")
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    latents = _latents((1, 4, 32, 32), seed=6)
    theirs = ref("a boat", num_inference_steps=4, guidance_scale=0.0, latents=latents, output_type="np").images
    got = ours("a boat", preset="sdxl-lightning-4step", latents=latents.numpy(), output_type="np").images
    compare_images(got, theirs, "sdxl-lightning-4step")


@pytest.mark.parametrize("kind", ["sdxl-lcm", "sdxl"])
def test_lcm_sdxl_preset(sdxl, kind):
    """An LCM-distilled UNet takes guidance 8.0 as an embedding (no CFG); a plain one
    (LCM-LoRA fused) runs without CFG at guidance 1. Multi-step LCM injects noise."""
    import diffusers

    ours, ref, config = sdxl(kind)
    ref.scheduler = diffusers.LCMScheduler.from_config(config)
    guidance = 8.0 if kind == "sdxl-lcm" else 1.0
    assert ours.resolve(preset="lcm-sdxl-4step").guidance_scale == guidance
    latents = _latents((2, 4, 32, 32), seed=7)
    theirs = ref("a lamp", num_inference_steps=4, guidance_scale=guidance, num_images_per_prompt=2, latents=latents,
                 generator=torch.Generator().manual_seed(2), output_type="np").images
    got = ours("a lamp", preset="lcm-sdxl-4step", num_images_per_prompt=2, latents=latents.numpy(),
               generator=TorchNoise(2), output_type="np").images
    compare_images(got, theirs, f"{kind}/lcm-sdxl-4step")


# -- base + refiner -------------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "frac", "steps"), [("euler", 0.8, 10), ("euler", 0.5, 7), ("ddim", 0.7, 8),
                                                          ("dpmpp_2m", 0.8, 10), ("euler_ancestral", 0.6, 6)])
def test_base_refiner_handoff_matches_diffusers(sdxl, scheduler, frac, steps):
    """diffusers' ensemble of expert denoisers: base(denoising_end=frac, output_type=
    "latent") then refiner(image=latents, denoising_start=frac); ours in one call."""
    base, ref_base, config = sdxl("sdxl")
    refiner, ref_refiner, refiner_config = sdxl("sdxl-refiner")
    ref_base.scheduler = _diffusers_scheduler(scheduler, config)
    ref_refiner.scheduler = _diffusers_scheduler(scheduler, refiner_config)
    latents = _latents((2, 4, 32, 24), seed=9)
    generator = torch.Generator().manual_seed(3)
    kw = dict(negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5.0)
    handed = ref_base("a lighthouse", latents=latents, height=64, width=48, num_images_per_prompt=2,
                      denoising_end=frac, output_type="latent", generator=generator, **kw).images
    theirs = ref_refiner("a lighthouse", image=handed, denoising_start=frac, num_images_per_prompt=2,
                         generator=generator, output_type="np", **kw).images
    progress = []
    result = base("a lighthouse", latents=latents.numpy(), height=64, width=48, num_images_per_prompt=2,
                  scheduler=scheduler, refiner=refiner, high_noise_frac=frac, generator=TorchNoise(3),
                  output_type="np", callback=lambda done, total: progress.append((done, total)), **kw)
    compare_images(result.images, theirs, f"handoff/{scheduler}/{frac}")
    calls = len(result.timings["denoiser_calls"]) + len(result.timings["refiner"]["denoiser_calls"])
    assert calls == steps and 0 < len(result.timings["denoiser_calls"]) < steps
    assert progress == [(i, steps) for i in range(1, steps + 1)]  # one bar across both


def test_handoff_step_by_step_api(sdxl):
    """The two calls spelled out: the base's latents (output_type="latent") and the
    refiner continuing them from denoising_start."""
    base, ref_base, _ = sdxl("sdxl")
    refiner, ref_refiner, _ = sdxl("sdxl-refiner")
    latents = _latents((1, 4, 32, 32), seed=10)
    kw = dict(num_inference_steps=8, guidance_scale=5.0, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    handed = ref_base("a mountain", latents=latents, denoising_end=0.75, output_type="latent",
                      num_inference_steps=8).images
    theirs = ref_refiner("a mountain", image=handed, denoising_start=0.75, output_type="np", **kw).images
    ours_latents = base("a mountain", latents=latents.numpy(), denoising_end=0.75, output_type="latent",
                        num_inference_steps=8).images
    compare_images(ours_latents, handed.numpy(), "handoff/latents")
    got = refiner("a mountain", image=ours_latents, denoising_start=0.75, output_type="np", **kw).images
    compare_images(got, theirs, "handoff/refiner")


def test_sdxl_errors(sdxl, exported):
    base, _, _ = sdxl("sdxl")
    refiner, _, _ = sdxl("sdxl-refiner")
    with pytest.raises(DiffrtError, match="continues a base model's latents"):
        refiner("a cat")
    with pytest.raises(DiffrtError, match="pass them as image="):
        refiner("a cat", latents=np.zeros((1, 4, 8, 8), np.float32), denoising_start=0.8)
    with pytest.raises(DiffrtError, match="image must be latents"):
        refiner("a cat", image=np.zeros((1, 3, 8, 8), np.float32), denoising_start=0.8)
    with pytest.raises(DiffrtError, match="cannot start part-way"):
        refiner("a cat", image=np.zeros((1, 4, 8, 8), np.float32), denoising_start=0.8, scheduler="pndm")
    with pytest.raises(DiffrtError, match="aesthetic_score is for a refiner"):
        base("a cat", aesthetic_score=6.0)
    with pytest.raises(DiffrtError, match="original_size must be two"):
        base("a cat", original_size=(1024,))
    with pytest.raises(DiffrtError, match="refiner= must be a loaded refiner"):
        base("a cat", refiner=base)
    with pytest.raises(DiffrtError, match="between 0 and 1"):
        base("a cat", refiner=refiner, high_noise_frac=1.5)
    with pytest.raises(DiffrtError, match="no step of the 2-step schedule"):
        base("a cat", num_inference_steps=2, denoising_end=0.01, output_type="latent")
    with pytest.raises(DiffrtError, match="strength must be a number"):  # img2img (tests/test_img2img.py)
        base("a cat", image=np.zeros((1, 4, 8, 8), np.float32), strength=0)
    sd = Pipeline.load(exported("sd15"))
    with pytest.raises(DiffrtError, match="only SDXL"):
        sd("a cat", original_size=(64, 64))
    with pytest.raises(DiffrtError, match="prompt_2"):
        sd("a cat", prompt_2="a dog")
    sd.close()


def test_half_precision_keeps_the_sdxl_vae_fp32(tiny_checkpoint, tmp_path):
    """--precision fp16: half graphs for the encoders and the UNet; the VAE (force_upcast)
    stays fp32 only, and an fp16 load runs fp16 graphs with the fp32 VAE."""
    from diffrt.artifacts import read_manifest
    from diffrt.export import export

    out = export(tiny_checkpoint("sdxl"), tmp_path / "fp16", precision="fp16", fused_attention=False)
    by_role = {}
    for spec in out.stages.values():
        by_role.setdefault(spec.role, set()).add(spec.precision)
    assert by_role == {"text_encoder": {"fp32", "fp16"}, "text_encoder_2": {"fp32", "fp16"}, "unet": {"fp32", "fp16"},
                       "vae_decoder": {"fp32"}, "vae_encoder": {"fp32"}}
    assert out.checks["fp16"]["image_psnr_db"] > 20
    with Pipeline.load(tmp_path / "fp16", graph_precision="fp16") as pipe:
        assert pipe.models["unet"].spec.precision == "fp16"
        assert pipe.models["vae_decoder"].spec.precision == "fp32"
        image = pipe("a cat", num_inference_steps=2, seed=0, output_type="np").images
        assert np.isfinite(image).all()
    assert read_manifest(tmp_path / "fp16").model["vae_force_upcast"] is True


def test_openvino_runs_sdxl_and_the_refiner_like_ort(exported, tmp_path):
    """The OpenVINO backend (static shapes per request) on the SDXL stages: the same
    images as ONNX Runtime, base alone and base + refiner."""
    pytest.importorskip("openvino")
    loads = []
    for backend, options in (("ort", {}), ("openvino", {"precision": "fp32"})):
        loads.append([Pipeline.load(exported(kind), backend=backend, cache_dir=tmp_path / backend / kind, **options)
                      for kind in ("sdxl", "sdxl-refiner")])
    (ort_base, ort_refiner), (ov_base, ov_refiner) = loads
    for kw in (dict(num_inference_steps=3, negative_prompt="x"), dict(preset="sdxl-lightning-4step", height=64,
                                                                       width=48)):
        compare_images(ov_base("a cat", seed=1, output_type="np", **kw).images,
                 ort_base("a cat", seed=1, output_type="np", **kw).images, f"openvino/{kw}")
    compare_images(ov_base("a cat", seed=2, output_type="np", num_inference_steps=5, refiner=ov_refiner).images,
             ort_base("a cat", seed=2, output_type="np", num_inference_steps=5, refiner=ort_refiner).images,
             "openvino/refiner")
    for pipe in (*loads[0], *loads[1]):
        pipe.close()
