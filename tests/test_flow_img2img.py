"""img2img for the flow-matching families against diffusers' StableDiffusion3Img2ImgPipeline
and FluxImg2ImgPipeline on the tiny models of test_sd3.py / test_flux.py, with the same
random draws: diffusers draws, from its torch generator and in this order, the VAE
encoder's sample noise (one image's shape) and the noise the scheduler mixes in at the
start step (scale_noise; the batch's, in the VAE's layout, before Flux packs it); the
test draws the same two arrays from a generator seeded alike and hands them to ours as
image_noise= and noise=. Static shift (SD3's 3.0, schnell's 1.0) and dynamic shifting
(dev: mu from the image size); strengths 0.3/0.6 (the default)/1.0; non-square sizes.

The bar is 2e-3 on the [0, 1] image scale; we assert 1e-4 as test_pipeline_parity.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sentencepiece", reason="the tiny T5 tokenizers are trained with sentencepiece (export extra)")
torch = pytest.importorskip("torch")

from test_pipeline_parity import compare_images  # noqa: E402

from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402

KINDS = ("sd3", "sd3-no-t5", "flux", "flux-dev")


def picture(height, width, seed=0):
    """A smooth RGB test picture (gradients plus a little noise), as PIL."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def _make(kind, folder):
    from diffrt.export.tiny import make_tiny_flux, make_tiny_sd3

    return (make_tiny_flux if kind.startswith("flux") else make_tiny_sd3)(folder, kind=kind)


def _reference(kind, folder):
    """diffusers' img2img pipeline on the checkpoint (SD3 saved without T5: None in its place)."""
    import diffusers

    if kind.startswith("flux"):
        ref = diffusers.FluxImg2ImgPipeline.from_pretrained(folder)
    else:
        index = json.loads((folder / "model_index.json").read_text())
        missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) == [None, None]}
        ref = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(folder, **missing)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """get(kind) -> (our Pipeline on ORT, diffusers' img2img pipeline, our artifact folder)."""
    from diffrt.export import export

    cache = {}

    def get(kind):
        if kind not in cache:
            checkpoint = _make(kind, tmp_path_factory.mktemp(f"ckpt-{kind}") / "checkpoint")
            artifact = tmp_path_factory.mktemp(f"art-{kind}") / "artifact"
            export(checkpoint, artifact)
            cache[kind] = (Pipeline.load(artifact), _reference(kind, checkpoint), artifact)
        return cache[kind]

    yield get
    for ours, _, _ in cache.values():
        ours.close()


def _draws(seed, latent, images):
    """diffusers' first two draws from a generator seeded with `seed` (the encoder's
    sample of one image, the start noise of the batch), and a fresh such generator."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((1, *latent), generator=generator, dtype=torch.float32)
    noise = torch.randn((images, *latent), generator=generator, dtype=torch.float32)
    return eps.numpy(), noise.numpy(), torch.Generator().manual_seed(seed)


CASES = [  # kind, strength (None: diffusers' default 0.6), (height, width) (None: the checkpoint's), images, call
    ("sd3", 0.3, (48, 64), 2, dict(guidance_scale=5.0, negative_prompt="blurry", num_inference_steps=6)),
    ("sd3", None, None, 1, dict(guidance_scale=4.0, num_inference_steps=5)),
    ("sd3-no-t5", 1.0, (64, 48), 1, dict(guidance_scale=1.0, num_inference_steps=4)),
    ("flux", None, (48, 64), 1, dict(guidance_scale=0.0, num_inference_steps=4, max_sequence_length=32)),
    ("flux-dev", 0.3, (64, 48), 2, dict(guidance_scale=3.5, num_inference_steps=6, max_sequence_length=32)),
    ("flux-dev", 1.0, (48, 64), 1, dict(guidance_scale=5.0, num_inference_steps=3, max_sequence_length=32)),
]


@pytest.mark.parametrize(("kind", "strength", "size", "images", "call"), CASES)
def test_flow_img2img_matches_diffusers(pipes, kind, strength, size, images, call):
    ours, ref, _ = pipes(kind)
    image = picture(72, 56, seed=3)  # resized to the output size, as diffusers does
    factor = ref.vae_scale_factor
    height, width = size if size is not None else (ours.manifest.defaults["height"], ours.manifest.defaults["width"])
    latent = (ref.vae.config.latent_channels, height // factor, width // factor)
    eps, noise, generator = _draws(5, latent, images)
    kw = dict(num_images_per_prompt=images, **call)
    if strength is not None:
        kw["strength"] = strength
    if size is not None:
        kw.update(height=height, width=width)
    theirs = ref("a red barn in the snow", image=image, generator=generator, output_type="np", **kw).images
    progress = []
    got = ours("a red barn in the snow", image=image, image_noise=eps, noise=noise, output_type="np",
               callback=lambda done, total: progress.append((done, total)), **kw)
    compare_images(got.images, theirs, f"{kind}/img2img/{strength}/{height}x{width}")
    calls = len(got.timings["denoiser_calls"])
    assert progress[-1] == (calls, calls) and "vae_encoder" in got.timings


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_latents_as_image(pipes, kind):
    """Latents in the VAE's layout (scaled and shifted, as diffusers takes them: it
    encodes nothing then) continue as image=; Flux packs them itself."""
    ours, ref, _ = pipes(kind)
    latents = torch.randn((1, ref.vae.config.latent_channels, 24, 32), generator=torch.Generator().manual_seed(8))
    noise = torch.randn((1, ref.vae.config.latent_channels, 24, 32), generator=torch.Generator().manual_seed(9))
    kw = dict(num_inference_steps=4, guidance_scale=3.0, strength=0.6, output_type="np", height=48, width=64)
    if kind.startswith("flux"):
        kw["max_sequence_length"] = 32
    theirs = ref("a kite", image=latents, generator=torch.Generator().manual_seed(9), **kw).images
    got = ours("a kite", image=latents.numpy(), noise=noise.numpy(), **kw).images
    compare_images(got, theirs, f"{kind}/latents as image")


def test_flow_img2img_errors(pipes):
    ours, _, _ = pipes("flux")
    image = picture(48, 64)
    packed = np.zeros((1, 192, 64), np.float32)
    for kwargs, message in (
        (dict(image=packed), r"got an array of shape \(1, 192, 64\)"),  # packed latents are not image latents
        (dict(image=image, height=48, width=64, noise=packed), r"noise must be a finite float array of shape"),
        (dict(image=image, height=48, width=64, strength=0.0), r"strength must be a number in \(0, 1\]"),
        (dict(image=image, height=48, width=64, mask_image=Image.new("L", (64, 32))),
         "mask_image is 64x32 but image is 64x48"),
    ):
        with pytest.raises(DiffrtError, match=message) as info:
            ours("a cat", num_inference_steps=4, **kwargs)
        assert "\n" not in str(info.value)


def test_cli_and_server_img2img_on_flow_models(pipes, tmp_path):
    """`diffrt generate --image --strength` on an SD3 artifact writes the API's image;
    /v1/generate with a base64 picture on a Flux artifact serves the API's image."""
    import base64
    import io

    from test_cli import cli

    sd3, _, sd3_artifact = pipes("sd3")
    picture(48, 64, seed=9).save(tmp_path / "start.png")
    out = tmp_path / "out.png"
    result = cli("generate", str(sd3_artifact), "a barn", "--image", str(tmp_path / "start.png"), "--strength", "0.5",
                 "--size", "64x48", "--steps", "4", "--seed", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = sd3("a barn", image=tmp_path / "start.png", strength=0.5, height=48, width=64, num_inference_steps=4,
                   seed=3, output_type="np").images[0]
    written = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert written.shape == (48, 64, 3) and float(np.max(np.abs(written - expected))) <= 1 / 255 + 1e-6

    pytest.importorskip("fastapi")
    from serve_util import LiveServer, decode_npy

    flux, _, _ = pipes("flux")
    buffer = io.BytesIO()
    picture(48, 64, seed=10).save(buffer, "PNG")
    call = {"prompt": "a barn", "num_inference_steps": 4, "seed": 21, "output_format": "npy", "size": "64x48",
            "image": base64.b64encode(buffer.getvalue()).decode(), "strength": 0.5}
    with LiveServer(flux, warmup=False) as server:
        status, _, answer = server.post("/v1/generate", call)
    assert status == 200, answer
    expected = flux("a barn", image=picture(48, 64, seed=10), strength=0.5, num_inference_steps=4, seed=21,
                    height=48, width=64, output_type="np").images[0]
    np.testing.assert_array_equal(decode_npy(answer["images"][0]["b64"]), expected)


def mask(height, width):
    """White (repaint) in an off-centre box, black elsewhere, grey edges on either side
    of diffusers' 0.5 binarization; as an RGB image (made grayscale by the mask processor)."""
    array = np.zeros((height, width), np.uint8)
    array[height // 4: 3 * height // 4, width // 3: width - 4] = 255
    array[height // 4 - 1, width // 3: width - 4] = 100
    array[3 * height // 4, width // 3: width - 4] = 150
    return Image.fromarray(array, "L").convert("RGB")


INPAINT_CASES = [  # kind, strength (None: diffusers' default 0.6), (height, width), images, call
    ("sd3", 0.3, (48, 64), 2, dict(guidance_scale=5.0, negative_prompt="blurry", num_inference_steps=6)),
    ("sd3-no-t5", 1.0, (64, 48), 1, dict(guidance_scale=1.0, num_inference_steps=4)),
    ("flux", None, (48, 64), 1, dict(guidance_scale=0.0, num_inference_steps=4, max_sequence_length=32)),
    ("flux-dev", 1.0, (64, 48), 2, dict(guidance_scale=3.5, num_inference_steps=5, max_sequence_length=32)),
]


@pytest.mark.parametrize(("kind", "strength", "size", "images", "call"), INPAINT_CASES)
def test_flow_inpainting_matches_diffusers(pipes, kind, strength, size, images, call):
    """StableDiffusion3InpaintPipeline / FluxInpaintPipeline: the known region put back
    after every step (noised to the next step's level by scale_noise; Flux in its
    packed layout). Draws: the picture's encoder sample, then the start noise (then the
    masked picture's sample, unused here). SD3's reference images are its latents decoded
    with the VAE's shift, which diffusers' SD3 inpainting pipeline leaves out."""
    import diffusers

    ours, img2img_ref, _ = pipes(kind)
    cls = diffusers.FluxInpaintPipeline if kind.startswith("flux") else diffusers.StableDiffusion3InpaintPipeline
    ref = cls.from_pipe(img2img_ref)
    ref.set_progress_bar_config(disable=True)
    height, width = size
    image, repaint = picture(72, 56, seed=15), mask(72, 56)  # resized to the output size, as diffusers does
    latent = (ref.vae.config.latent_channels, height // ref.vae_scale_factor, width // ref.vae_scale_factor)
    eps, noise, generator = _draws(16, latent, images)
    kw = dict(num_images_per_prompt=images, height=height, width=width, **call)
    if strength is not None:
        kw["strength"] = strength
    if kind.startswith("flux"):
        theirs = ref("a window", image=image, mask_image=repaint, generator=generator, output_type="np", **kw).images
    else:  # diffusers 0.42's SD3 inpainting decodes without the VAE's shift_factor (diffusers issue 13611,
        # "SD3 inpaint decode drops the VAE shift"): its latents, decoded as its other SD3 pipelines decode
        latents = ref("a window", image=image, mask_image=repaint, generator=generator, output_type="latent",
                      **kw).images
        with torch.no_grad():
            decoded = ref.vae.decode(latents / ref.vae.config.scaling_factor + ref.vae.config.shift_factor).sample
        theirs = ref.image_processor.postprocess(decoded, output_type="np")
    got = ours("a window", image=image, mask_image=repaint, image_noise=eps, noise=noise, output_type="np",
               **kw).images
    compare_images(got, theirs, f"{kind}/inpaint/{strength}/{height}x{width}")
