"""SDXL inpainting against diffusers' StableDiffusionXLInpaintPipeline on tiny random
models, with the same random draws:

- a regular (4-channel) SDXL UNet, and a refiner's (aesthetic-score time ids): the
  known region blended back after every step. diffusers draws the picture's encoder
  sample, then the start noise (then the masked picture's sample, unused with 4
  channels); the test hands the first two to ours as image_noise= and noise=.
- a dedicated 9-channel SDXL inpainting UNet (a tiny StableDiffusionXLInpaintPipeline
  checkpoint, exported): both draw from a torch generator seeded alike (ours through
  TorchNoise), in diffusers' order (below strength 1 the picture's sample, the start
  noise, the masked picture's sample; at strength 1 no picture sample).

The bar is 2e-3 on the [0, 1] image scale; we assert test_pipeline_parity's TOLERANCE.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline

from test_pipeline_parity import compare_images, _diffusers_pipeline, _diffusers_scheduler, TorchNoise


def picture(height, width, seed=0):
    """A smooth RGB test picture (gradients plus a little noise), as PIL."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def mask(height, width, mode="L"):
    """White (repaint) in an off-centre box, black elsewhere; grey edges (binarized by
    diffusers' mask processor at 0.5), as a PIL image of `mode` (RGB: made grayscale)."""
    array = np.zeros((height, width), np.uint8)
    array[height // 4: 3 * height // 4, width // 3: width - 4] = 255
    array[height // 4 - 1, width // 3: width - 4] = 100  # below 0.5: kept
    array[3 * height // 4, width // 3: width - 4] = 150  # above 0.5: repainted
    return Image.fromarray(array, "L").convert(mode)


@pytest.fixture(scope="module")
def regular(tiny_checkpoint, exported):
    """get(kind) -> (our Pipeline, diffusers' StableDiffusionXLInpaintPipeline on that
    checkpoint's components, its scheduler config), kind "sdxl" or "sdxl-refiner"."""
    from diffusers import StableDiffusionXLInpaintPipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            ref = StableDiffusionXLInpaintPipeline.from_pipe(_diffusers_pipeline(tiny_checkpoint(kind)))
            ref.set_progress_bar_config(disable=True)
            cache[kind] = (Pipeline.load(exported(kind)), ref, dict(ref.scheduler.config))
        return cache[kind]

    yield get
    for ours, _, _ in cache.values():
        ours.close()


BLEND_CASES = [  # kind, scheduler, strength (None: diffusers' default 0.9999), (height, width), images, options
    ("sdxl", "euler", 0.3, (48, 64), 2, {}),
    ("sdxl", "ddim", 1.0, (64, 48), 1, {}),
    ("sdxl", "dpmpp_2m", 0.6, (48, 64), 1, {"original_size": (96, 128), "crops_coords_top_left": (4, 8)}),
    ("sdxl", "pndm", None, (64, 48), 1, {}),
    ("sdxl-refiner", "euler", 0.6, (48, 64), 1, {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}),
    ("sdxl-refiner", "dpmpp_2m_karras", None, (64, 48), 1, {}),
]


@pytest.mark.parametrize(("kind", "scheduler", "strength", "size", "images", "options"), BLEND_CASES)
def test_inpainting_with_a_regular_sdxl_unet_matches_diffusers(regular, kind, scheduler, strength, size, images,
                                                               options):
    ours, ref, config = regular(kind)
    ref.scheduler = _diffusers_scheduler(scheduler, config)
    height, width = size
    image, repaint = picture(72, 56, seed=15), mask(72, 56, "RGB")  # resized to the output size, as diffusers does
    latent = (4, height // 2, width // 2)  # the tiny VAE downsamples by 2
    generator = torch.Generator().manual_seed(16)
    eps = torch.randn((1, *latent), generator=generator).numpy()
    noise = torch.randn((images, *latent), generator=generator).numpy()
    kw = dict(num_inference_steps=6, guidance_scale=6.0, height=height, width=width, num_images_per_prompt=images,
              negative_prompt="blurry", **options)
    if strength is not None:
        kw["strength"] = strength
    theirs = ref("a window", image=image, mask_image=repaint, generator=torch.Generator().manual_seed(16),
                 output_type="np", **kw).images
    got = ours("a window", image=image, mask_image=repaint, image_noise=eps, noise=noise, scheduler=scheduler,
               output_type="np", **kw).images
    compare_images(got, theirs, f"{kind}-inpaint/{scheduler}/{strength}")


@pytest.fixture(scope="module")
def nine_channel_artifact(tmp_path_factory):
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sdxl_inpaint

    checkpoint = make_tiny_sdxl_inpaint(tmp_path_factory.mktemp("ckpt-sdxl-inpaint") / "checkpoint")
    out = tmp_path_factory.mktemp("art-sdxl-inpaint") / "artifact"
    export(checkpoint, out)
    return checkpoint, out


@pytest.fixture(scope="module")
def nine(nine_channel_artifact):
    from diffusers import StableDiffusionXLInpaintPipeline

    checkpoint, artifact = nine_channel_artifact
    ref = StableDiffusionXLInpaintPipeline.from_pretrained(checkpoint)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.load(artifact)
    yield ours, ref, dict(ref.scheduler.config)
    ours.close()


def test_the_export_records_a_nine_channel_sdxl_unet(nine):
    ours, ref, _ = nine
    assert ours.manifest.pipeline_class == "StableDiffusionXLInpaintPipeline"
    sample = next(t for t in ours.models["unet"].spec.inputs if t.name == "sample")
    assert sample.shape[1] == ref.unet.config.in_channels == 9
    assert ours.facts.noise_channels == ref.vae.config.latent_channels


@pytest.mark.parametrize(("scheduler", "strength", "size", "guidance"), [
    ("ddim", 0.6, (48, 64), 6.0),
    ("euler", 1.0, (64, 48), 6.0),
    ("pndm", 0.3, (48, 64), 1.0),  # no CFG: the extra channels once per row
    ("euler_ancestral", None, (64, 48), 5.0),  # diffusers' default strength; step noise continues the generator
])
def test_nine_channel_sdxl_inpainting_matches_diffusers(nine, scheduler, strength, size, guidance):
    ours, ref, config = nine
    ref.scheduler = _diffusers_scheduler(scheduler, config)
    height, width = size
    image, repaint = picture(72, 56, seed=21), mask(72, 56)
    kw = dict(num_inference_steps=6, guidance_scale=guidance, height=height, width=width, negative_prompt="blurry")
    if strength is not None:
        kw["strength"] = strength
    theirs = ref("a window", image=image, mask_image=repaint, generator=torch.Generator().manual_seed(7),
                 output_type="np", **kw).images
    got = ours("a window", image=image, mask_image=repaint, scheduler=scheduler, generator=TorchNoise(7),
               output_type="np", **kw).images
    compare_images(got, theirs, f"sdxl-inpaint-9ch/{scheduler}/{strength}")


def test_nine_channel_sdxl_checkpoint_errors(nine):
    ours, _, _ = nine
    for kwargs, message in (
        ({}, "inpainting checkpoint.*mask_image"),
        ({"image": picture(64, 64)}, "inpainting checkpoint.*mask_image"),
        ({"image": picture(64, 64), "mask_image": mask(48, 64)}, "mask_image is 64x48 but image is 64x64"),
        ({"image": picture(64, 64), "mask_image": mask(64, 64), "num_inference_steps": 1}, "strength"),
    ):
        with pytest.raises(DiffrtError, match=message) as info:
            ours("a cat", **{"num_inference_steps": 4, **kwargs})
        assert "\n" not in str(info.value)


def test_cli_inpaints_with_the_nine_channel_sdxl_unet(nine, nine_channel_artifact, tmp_path):
    """`diffrt generate --image --mask` on the SDXL inpainting artifact writes the API's image."""
    from test_cli import cli

    ours, _, _ = nine
    picture(48, 64, seed=3).save(tmp_path / "in.png")
    mask(48, 64).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = cli("generate", str(nine_channel_artifact[1]), "a door", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--strength", "0.6", "--size", "64x48", "--steps", "4", "--seed", "3",
                 "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = ours("a door", image=tmp_path / "in.png", mask_image=tmp_path / "mask.png", strength=0.6, height=48,
                    width=64, num_inference_steps=4, seed=3, output_type="np").images[0]
    written = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert written.shape == (48, 64, 3) and float(np.max(np.abs(written - expected))) <= 1 / 255 + 1e-6


def test_server_edits_with_the_nine_channel_sdxl_unet(nine):
    """/v1/generate with a base64 picture and mask on the SDXL inpainting artifact (its
    warm-up inpaints) serves the pipeline's image."""
    import base64
    import io

    pytest.importorskip("fastapi")
    from serve_util import LiveServer, decode_npy

    ours, _, _ = nine

    def b64(image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    image, repaint = picture(48, 64, seed=10), mask(48, 64)
    call = {"prompt": "a barn", "num_inference_steps": 4, "seed": 21, "output_format": "npy", "size": "64x48",
            "image": b64(image), "mask": b64(repaint), "strength": 0.6}
    with LiveServer(ours, max_side=256) as server:
        status, _, answer = server.post("/v1/generate", call)
        assert status == 200, answer
    expected = ours("a barn", image=image, mask_image=repaint, strength=0.6, num_inference_steps=4, seed=21,
                    height=48, width=64, output_type="np").images[0]
    np.testing.assert_array_equal(decode_npy(answer["images"][0]["b64"]), expected)


def test_blend_inpainting_draws_as_diffusers(regular):
    """With one torch generator for everything: the picture's encoder sample, the start
    noise, the masked picture's sample (drawn by diffusers though a regular UNet never
    uses it), then Euler ancestral's step noise: the same image."""
    ours, ref, config = regular("sdxl")
    ref.scheduler = _diffusers_scheduler("euler_ancestral", config)
    image, repaint = picture(48, 64, seed=5), mask(48, 64)
    kw = dict(num_inference_steps=6, guidance_scale=5.0, height=48, width=64, strength=0.7)
    theirs = ref("a window", image=image, mask_image=repaint, generator=torch.Generator().manual_seed(3),
                 output_type="np", **kw).images
    got = ours("a window", image=image, mask_image=repaint, scheduler="euler_ancestral", generator=TorchNoise(3),
               output_type="np", **kw).images
    compare_images(got, theirs, "sdxl-inpaint/euler_ancestral/one generator")
