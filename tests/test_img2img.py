"""img2img against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionXLImg2ImgPipeline on tiny random models, with the same random draws:
diffusers draws, from its torch generator and in this order, the VAE encoder's sample
noise (one image's shape) and the noise added at the start step (the batch's); the
test draws the same two arrays from a generator seeded alike and hands them to ours
as image_noise= and noise= (an ancestral sampler then continues that generator).

The bar is 2e-3 on the [0, 1] image scale; we assert 1e-4 as test_pipeline_parity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffrt.errors import DiffrtError
from diffrt.runtime.img2img import preprocess
from diffrt.runtime.pipeline import Pipeline

from test_pipeline_parity import compare_images, _diffusers_pipeline, _diffusers_scheduler, TorchNoise


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, exported):
    """get(kind) -> (our Pipeline, diffusers' img2img pipeline, the scheduler config)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            ref = _diffusers_pipeline(tiny_checkpoint(kind))
            if kind in ("sd15", "sd2"):
                ref = StableDiffusionImg2ImgPipeline.from_pipe(ref)
            elif kind == "sdxl":
                ref = StableDiffusionXLImg2ImgPipeline.from_pipe(ref)
            ref.set_progress_bar_config(disable=True)
            cache[kind] = (Pipeline.load(exported(kind)), ref, dict(ref.scheduler.config))
        return cache[kind]

    yield get
    for ours, _, _ in cache.values():
        ours.close()


def _picture(height, width, seed=0):
    """A smooth RGB test picture (gradients plus a little noise), as PIL."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def _draws(seed, image_shape, shape):
    """diffusers' first two draws from a generator seeded with `seed`, and a fresh such
    generator for diffusers itself."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(image_shape, generator=generator, dtype=torch.float32)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return eps.numpy(), noise.numpy(), torch.Generator().manual_seed(seed)


CASES = [  # kind, scheduler, strength, steps, (picture height, width), images; few steps run (the suite's time)
    ("sd15", "pndm", 0.6, 6, (48, 64), 1),
    ("sd15", "ddim", 0.3, 10, (64, 48), 2),
    ("sd15", "euler", 1.0, 4, (48, 64), 1),
    ("sd2", "dpmpp_2m_karras", 0.3, 10, (48, 64), 1),
    ("sdxl", "euler", 0.3, 10, (48, 64), 2),
    ("sdxl", "ddim", 0.6, 6, (64, 48), 1),
    ("sdxl", "pndm", 1.0, 4, (48, 64), 1),
    ("sdxl", "dpmpp_2m", 0.6, 6, (64, 64), 1),
    ("sdxl-refiner", "dpmpp_2m_karras", 0.6, 6, (48, 64), 1),
]


@pytest.mark.parametrize(("kind", "scheduler", "strength", "steps", "size", "images"), CASES)
def test_img2img_matches_diffusers(pipes, kind, scheduler, strength, steps, size, images):
    ours, ref, config = pipes(kind)
    ref.scheduler = _diffusers_scheduler(scheduler, config)
    picture = _picture(*size)
    latent = (4, size[0] // 2, size[1] // 2)  # the tiny VAE downsamples by 2
    eps, noise, generator = _draws(5, (1, *latent), (images, *latent))
    kw = dict(num_inference_steps=steps, guidance_scale=6.0, negative_prompt="blurry", strength=strength,
              num_images_per_prompt=images)
    theirs = ref("a red barn in the snow", image=picture, generator=generator, output_type="np", **kw).images
    progress = []
    got = ours("a red barn in the snow", image=picture, image_noise=eps, noise=noise, scheduler=scheduler,
               output_type="np", callback=lambda done, total: progress.append((done, total)), **kw)
    compare_images(got.images, theirs, f"{kind}/{scheduler}/{strength}")
    calls = len(got.timings["denoiser_calls"])
    assert progress[-1] == (calls, calls) and "vae_encoder" in got.timings


def test_ancestral_sampler_continues_the_generator(pipes):
    """Euler ancestral: its step noise comes after the two start draws, as in diffusers."""
    ours, ref, config = pipes("sd15")
    ref.scheduler = _diffusers_scheduler("euler_ancestral", config)
    picture = _picture(64, 48, seed=3)
    eps, noise, generator = _draws(11, (1, 4, 32, 24), (1, 4, 32, 24))
    kw = dict(num_inference_steps=8, guidance_scale=7.0, strength=0.6)
    theirs = ref("a boat", image=picture, generator=generator, output_type="np", **kw).images
    rest = TorchNoise(0)
    rest.generator = torch.Generator().manual_seed(11)
    for shape in ((1, 4, 32, 24), (1, 4, 32, 24)):  # skip the two start draws
        rest.standard_normal(shape)
    got = ours("a boat", image=picture, image_noise=eps, noise=noise, scheduler="euler_ancestral",
               generator=rest, output_type="np", **kw).images
    compare_images(got, theirs, "sd15/euler_ancestral")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_argmax_and_latents_as_image(pipes, kind):
    """sample_mode="argmax" takes the encoder's mode: diffusers given those latents
    (the distribution's mode times scaling_factor, computed by its own VAE) as `image`
    continues them the same way; ours also takes latents as image= directly."""
    ours, ref, config = pipes(kind)
    ref.scheduler = _diffusers_scheduler("euler", config)
    picture = _picture(48, 64, seed=4)
    pixels = ref.image_processor.preprocess(picture)
    with torch.no_grad():
        mode = ref.vae.encode(pixels).latent_dist.mode() * ref.vae.config.scaling_factor
    # given latents, diffusers draws no encoder sample: the start noise is its first draw
    noise = torch.randn((1, 4, 24, 32), generator=torch.Generator().manual_seed(2)).numpy()
    generator = torch.Generator().manual_seed(2)
    kw = dict(num_inference_steps=6, guidance_scale=5.0, strength=0.6, output_type="np")
    theirs = ref("a kite", image=mode, generator=generator, **kw).images
    got = ours("a kite", image=picture, sample_mode="argmax", noise=noise, scheduler="euler", **kw).images
    compare_images(got, theirs, f"{kind}/argmax")
    from_latents = ours("a kite", image=mode.numpy(), noise=noise, scheduler="euler", **kw).images
    compare_images(from_latents, theirs, f"{kind}/latents")


def test_preprocessing_matches_vae_image_processor(pipes):
    """Our preprocessing against VaeImageProcessor: a PIL picture whose size is no
    multiple of the scale factor (Lanczos, rounded down), one resized to a given size,
    and a float array in [0, 1] (nearest-neighbour resize, torch's interpolate)."""
    _, ref, _ = pipes("sd15")
    processor = ref.image_processor
    picture = _picture(53, 71, seed=6)
    float_array = np.asarray(_picture(37, 45, seed=7), dtype=np.float32) / 255
    for image, height, width in ((picture, None, None), (picture, 40, 24), (float_array, None, None),
                                 (float_array, 24, 64)):
        theirs = processor.preprocess(image, height=height, width=width).numpy()
        got = preprocess(image, height, width, 2)
        assert got.shape == theirs.shape
        np.testing.assert_allclose(got, theirs, atol=1e-6)


def test_draws_come_from_the_seed_and_images_do_not_depend_on_the_batch(pipes):
    """Without arrays, image i draws from default_rng(seed + i) alone: a batch of two
    gives the images of seeds s and s + 1 run one by one."""
    ours, _, _ = pipes("sd15")
    picture = _picture(48, 48, seed=8)
    kw = dict(num_inference_steps=6, strength=0.6, scheduler="ddim", output_type="np")
    both = ours("a cup", image=picture, num_images_per_prompt=2, seed=40, **kw).images
    for i in range(2):
        compare_images(ours("a cup", image=picture, seed=40 + i, **kw).images[0], both[i], f"row {i}")
    assert float(np.max(np.abs(both[0] - both[1]))) > 1e-3  # the rows drew different noise


def test_refiner_handoff_takes_the_latent_path(pipes):
    """A refiner given latents and denoising_start continues them without noise, as
    before; given strength instead, it noises them at the strength's step (diffusers'
    SDXL img2img with 4-channel image)."""
    ours, ref, config = pipes("sdxl-refiner")
    ref.scheduler = _diffusers_scheduler("euler", config)
    latents = torch.randn((1, 4, 24, 32), generator=torch.Generator().manual_seed(12))
    kw = dict(num_inference_steps=6, guidance_scale=5.0, output_type="np")
    theirs = ref("a tree", image=latents, denoising_start=0.6, **kw).images
    compare_images(ours("a tree", image=latents.numpy(), denoising_start=0.6, scheduler="euler", **kw).images, theirs,
             "refiner/denoising_start")
    noise = torch.randn((1, 4, 24, 32), generator=torch.Generator().manual_seed(13)).numpy()
    generator = torch.Generator().manual_seed(13)
    theirs = ref("a tree", image=latents, strength=0.5, generator=generator, **kw).images
    compare_images(ours("a tree", image=latents.numpy(), strength=0.5, noise=noise, scheduler="euler", **kw).images,
             theirs, "refiner/strength")


def test_bad_inputs_are_one_line_errors(pipes, tmp_path):
    ours, _, _ = pipes("sd15")
    picture = _picture(48, 48)
    rgba = picture.convert("RGBA")
    truncated = tmp_path / "cut.png"
    picture.save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    cases = [
        (dict(image=rgba), "is a RGBA image; img2img takes RGB"),
        (dict(image=picture.convert("L")), "is a L image"),
        (dict(image=str(truncated)), "cannot read"),
        (dict(image=str(tmp_path / "missing.png")), "cannot read"),
        (dict(image=picture, strength=0.0), r"strength must be a number in \(0, 1\]"),
        (dict(image=picture, strength=1.5), r"strength must be a number in \(0, 1\]"),
        (dict(image=picture, strength=0.05, num_inference_steps=10), "leaves no step"),
        (dict(strength=0.5), "strength is for a generation that starts from an image"),
        (dict(image=picture, latents=np.zeros((1, 4, 24, 24), np.float32)), "with image= give noise="),
        (dict(image=picture, noise=np.zeros((2, 4, 24, 24), np.float32)), r"noise must be a finite float array"),
        (dict(image=picture, sample_mode="argmax", image_noise=np.zeros((1, 4, 24, 24))), "image_noise is"),
        (dict(image=picture, sample_mode="median"), "sample_mode='median'"),
        (dict(image=np.zeros((48, 48, 3), np.float32) + 2), r"values in \[0, 1\]"),
        (dict(image=np.zeros((48, 48, 4), np.uint8)), "got an array of shape"),
        (dict(image=_picture(50, 66)), "is not a multiple of 8; pass height= and width="),
        (dict(image=3), "image must be a PIL image"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DiffrtError, match=message) as info:
            ours("a cat", **{"num_inference_steps": 4, **kwargs})
        assert "\n" not in str(info.value)
    # still serving
    assert ours("a cat", image=picture, num_inference_steps=4, output_type="np").images.shape == (1, 48, 48, 3)


def test_cli_image_and_strength(pipes, exported, tmp_path):
    """`diffrt generate --image --strength` writes the API's image; a truncated PNG is
    one error line before anything loads."""
    from test_cli import cli

    ours, _, _ = pipes("sd15")
    path = tmp_path / "start.png"
    _picture(48, 64, seed=9).save(path)
    out = tmp_path / "out.png"
    result = cli("generate", str(exported("sd15")), "a barn", "--image", str(path), "--strength", "0.5",
                 "--scheduler", "ddim", "--steps", "6", "--seed", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = ours("a barn", image=str(path), strength=0.5, scheduler="ddim", num_inference_steps=6, seed=3,
                    output_type="np").images[0]
    written = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert written.shape == (48, 64, 3) and float(np.max(np.abs(written - expected))) <= 1 / 255 + 1e-6
    path.write_bytes(path.read_bytes()[:100])
    result = cli("generate", str(exported("sd15")), "a barn", "--image", str(path), "-o", str(tmp_path / "x.png"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "cannot read" in errors[0], result.stderr[-2000:]
    assert "generating" not in result.stderr and not (tmp_path / "x.png").exists()


def test_http_generate_with_image(pipes):
    """/v1/generate with a base64 PNG and strength serves the pipeline's image; a
    corrupt or truncated image, an RGBA one and a bad strength are 400s naming the field."""
    import base64
    import io

    pytest.importorskip("fastapi")
    from serve_util import LiveServer, decode_npy

    ours, _, _ = pipes("sd15")
    picture = _picture(48, 64, seed=10)

    def b64(image, fmt="PNG"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return base64.b64encode(buffer.getvalue()).decode()

    call = {"prompt": "a barn", "num_inference_steps": 6, "scheduler": "ddim", "seed": 21, "output_format": "npy"}
    with LiveServer(ours, warmup=False) as server:
        status, _, answer = server.post("/v1/generate", {**call, "image": b64(picture), "strength": 0.5})
        assert status == 200, answer
        expected = ours("a barn", image=picture, strength=0.5, num_inference_steps=6, scheduler="ddim", seed=21,
                        output_type="np").images[0]
        np.testing.assert_array_equal(decode_npy(answer["images"][0]["b64"]), expected)
        whole = base64.b64decode(b64(picture))
        for body, fragment in (
            ({"image": "not base64 at all!"}, "base64-encoded PNG or JPEG"),
            ({"image": base64.b64encode(whole[:120]).decode()}, "not a complete PNG"),
            ({"image": b64(picture.convert("RGBA"))}, "RGBA image"),
            ({"image": b64(picture), "strength": 1.5}, "strength must be"),
            ({"strength": 0.5}, "strength is for"),
            ({"image": b64(picture), "mask": b64(_mask(64, 64))}, "mask_image is 64x64 but image is 64x48"),
        ):
            status, _, answer = server.post("/v1/generate", {**call, **body})
            param = "strength" if "strength" in fragment else "mask" if "mask" in fragment else "image"
            assert status == 400 and answer["error"]["param"] == param, answer
            assert fragment in answer["error"]["message"], answer
        status, _, answer = server.post("/v1/generate", {**call, "image": b64(picture), "mask": b64(_mask(48, 64)),
                                                         "size": "64x48"})
        assert status == 200, answer
        expected = ours("a barn", image=picture, mask_image=_mask(48, 64), height=48, width=64, num_inference_steps=6,
                        scheduler="ddim", seed=21, output_type="np").images[0]
        np.testing.assert_array_equal(decode_npy(answer["images"][0]["b64"]), expected)


@pytest.mark.parametrize(("backend", "options"), [("openvino", {"precision": "fp32"}), ("torch", {})])
def test_other_backends_open_the_encoder_like_ort(pipes, exported, backend, options):
    """OpenVINO (fp32 inference) and the torch backend open the VAE encoder lazily too,
    and a worker() view shares it: the images equal ONNX Runtime's (which equal diffusers')."""
    pytest.importorskip("openvino" if backend == "openvino" else "torch")
    ours, _, _ = pipes("sd15")
    picture = _picture(48, 64, seed=14)
    kw = dict(image=picture, strength=0.6, seed=5, num_inference_steps=6, scheduler="ddim", output_type="np")
    expected = ours("a barn", **kw).images
    with Pipeline.load(exported("sd15"), backend=backend, **options) as other:
        compare_images(other("a barn", **kw).images, expected, f"{backend}/img2img")
        worker = other.worker()
        compare_images(worker("a barn", **kw).images, expected, f"{backend}/worker")
        worker.close()


def test_the_memory_check_counts_the_encoder_until_it_is_open(exported, monkeypatch):
    """Before the VAE encoder is open, a request starting from a picture counts its
    weight files (sizes read from disk here) beside the activations; afterwards nothing more."""
    import json

    from diffrt.runtime import pipeline as pipeline_module

    seen = []
    real = pipeline_module.check_memory
    monkeypatch.setattr(pipeline_module, "check_memory",
                        lambda *a, **k: (seen.append(k.get("unopened_weights", 0)), real(*a, **k))[1])
    folder = exported("sd15")
    kw = dict(image=_picture(32, 32, seed=3), strength=0.5, seed=1, num_inference_steps=4, output_type="np")
    with Pipeline.load(folder) as pipe:
        pipe.request("a barn", num_inference_steps=4)
        assert seen[-1] == 0
        pipe.request("a barn", **kw)
        listed = json.loads((folder / "manifest.json").read_text())["stages"]["vae_encoder"]["files"]
        encoder = sum((folder / f["path"]).stat().st_size for f in listed)
        assert seen[-1] == encoder > 0
        pipe("a barn", **kw)
        pipe.request("a barn", **kw)
        assert seen[-1] == 0


def _mask(height, width):
    """White (repaint) in an off-centre box, black elsewhere, as a grayscale PIL image."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 3: width - 4] = 255
    return Image.fromarray(mask, "L")


@pytest.fixture(scope="module")
def inpaint_ref(tiny_checkpoint):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pipe(_diffusers_pipeline(tiny_checkpoint("sd15")))
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize(("scheduler", "strength", "size"), [("ddim", 0.6, (48, 64)), ("euler", 1.0, (64, 48)),
                                                              ("dpmpp_2m", 0.3, (48, 64))])
def test_inpainting_with_a_regular_unet_matches_diffusers(pipes, inpaint_ref, scheduler, strength, size):
    """StableDiffusionInpaintPipeline on a 4-channel UNet: the known region put back
    after every step. Its draws: the image's encoder sample, the start noise (then the
    masked image's encoder sample, unused with a 4-channel UNet)."""
    ours, _, config = pipes("sd15")
    ref = inpaint_ref
    ref.scheduler = _diffusers_scheduler(scheduler, config)
    height, width = size
    picture, mask = _picture(72, 56, seed=15), _mask(72, 56)  # resized to the output size, as diffusers does
    latent = (4, height // 2, width // 2)
    eps, noise, generator = _draws(16, (1, *latent), (2, *latent))
    kw = dict(num_inference_steps=6, guidance_scale=6.0, strength=strength, height=height, width=width,
              num_images_per_prompt=2)
    theirs = ref("a window", image=picture, mask_image=mask, generator=generator, output_type="np", **kw).images
    got = ours("a window", image=picture, mask_image=mask, image_noise=eps, noise=noise, scheduler=scheduler,
               output_type="np", **kw).images
    compare_images(got, theirs, f"inpaint/{scheduler}/{strength}")


def test_inpainting_errors(pipes, exported):
    ours, _, _ = pipes("sd15")
    picture = _picture(64, 64)
    for kwargs, message in (
        (dict(mask_image=_mask(64, 64)), "pass image=<the picture> too"),
        (dict(image=picture, mask_image=_mask(48, 64)), "mask_image is 64x48 but image is 64x64"),
        (dict(image=picture, mask_image="no-such-mask.png"), "mask_image: cannot read"),
        (dict(image=picture, mask_image=3), "mask_image must be a PIL image"),
    ):
        with pytest.raises(DiffrtError, match=message):
            ours("a cat", num_inference_steps=4, **kwargs)
