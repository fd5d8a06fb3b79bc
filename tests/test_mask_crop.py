"""Inpainting's padding_mask_crop against diffusers: the crop box against
VaeImageProcessor.get_crop_region, the crop-and-fill and crop-and-paste resizes against
its _resize_and_fill / _resize_and_crop, and whole generations against
StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline(padding_mask_crop=N)
on tiny models with the same random draws (image_noise= and noise= as in
test_img2img.py). diffusers pastes the result back into the picture in 8-bit PIL
(apply_overlay), so the images are compared as 8 bits: at most one level apart (a float
within 1e-4 of diffusers' can round the other way), and the pixels outside the mask's
crop box are the original picture's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffrt.errors import DiffrtError
from diffrt.runtime import mask_crop
from diffrt.runtime.pipeline import Pipeline

from test_pipeline_parity import _diffusers_pipeline, _diffusers_scheduler


def picture(height, width, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def mask(height, width, box):
    """White (repaint) in box = (top, bottom, left, right), a grey ring around it."""
    top, bottom, left, right = box
    array = np.zeros((height, width), np.uint8)
    array[max(top - 1, 0): bottom + 1, max(left - 1, 0): right + 1] = 90
    array[top:bottom, left:right] = 255
    return Image.fromarray(array, "L")


MASKS = [  # picture (height, width), white box (top, bottom, left, right), request (width, height), pad
    ((72, 56), (20, 40, 10, 30), (64, 48), 4),  # the box grows in height
    ((72, 56), (10, 60, 20, 26), (48, 64), 0),  # ... in width
    ((80, 96), (0, 30, 70, 96), (64, 48), 8),  # at the picture's corner: shifted back inside
    ((64, 64), (5, 59, 2, 62), (48, 48), 32),  # the padding reaches past every edge
]


@pytest.mark.parametrize(("size", "box", "request_size", "pad"), MASKS)
def test_crop_region_and_resizes_match_vae_image_processor(size, box, request_size, pad):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8)
    repaint, image = mask(*size, box), picture(*size, seed=1)
    width, height = request_size
    region = processor.get_crop_region(repaint, width, height, pad=pad)
    assert mask_crop.crop_region(repaint, width, height, pad) == tuple(region)
    cropped = image.crop(region)
    pairs = ((mask_crop.resize_and_fill(cropped, width, height), processor._resize_and_fill(cropped, width, height)),
             (mask_crop.resize_and_crop(cropped, width, height), processor._resize_and_crop(cropped, width, height)),
             (mask_crop.resize_and_fill(repaint.crop(region), width, height),
              processor._resize_and_fill(repaint.crop(region), width, height)))
    for ours, theirs in pairs:
        assert ours.mode == theirs.mode and np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, exported):
    """get(kind) -> (our Pipeline, diffusers' inpainting pipeline on its components)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            cls = StableDiffusionXLInpaintPipeline if kind.startswith("sdxl") else StableDiffusionInpaintPipeline
            ref = cls.from_pipe(_diffusers_pipeline(tiny_checkpoint(kind)))
            ref.set_progress_bar_config(disable=True)
            cache[kind] = (Pipeline.load(exported(kind)), ref)
        return cache[kind]

    yield get
    for ours, _ in cache.values():
        ours.close()


CASES = [  # kind, scheduler, strength, picture (h, w), white box, request (height, width), pad
    ("sd15", "ddim", 0.6, (72, 56), (20, 40, 10, 30), (48, 64), 4),
    ("sd15", "euler", 1.0, (80, 96), (0, 30, 70, 96), (64, 48), 8),
    ("sdxl", "dpmpp_2m", 0.6, (72, 56), (10, 60, 20, 26), (64, 48), 2),
]


@pytest.mark.parametrize(("kind", "scheduler", "strength", "size", "box", "request_size", "pad"), CASES)
def test_padding_mask_crop_matches_diffusers(pipes, kind, scheduler, strength, size, box, request_size, pad):
    ours, ref = pipes(kind)
    ref.scheduler = _diffusers_scheduler(scheduler, dict(ref.scheduler.config))
    image, repaint = picture(*size, seed=4), mask(*size, box)
    height, width = request_size
    latent = (4, height // 2, width // 2)  # the tiny VAE downsamples by 2
    generator = torch.Generator().manual_seed(6)
    eps = torch.randn((1, *latent), generator=generator).numpy()
    noise = torch.randn((1, *latent), generator=generator).numpy()
    kw = dict(num_inference_steps=5, guidance_scale=6.0, strength=strength, height=height, width=width)
    theirs = ref("a window", image=image, mask_image=repaint, padding_mask_crop=pad,
                 generator=torch.Generator().manual_seed(6), **kw).images[0]
    got = ours("a window", image=image, mask_image=repaint, padding_mask_crop=pad, image_noise=eps, noise=noise,
               scheduler=scheduler, **kw).images[0]
    assert got.size == theirs.size == image.size  # pasted back into the whole picture
    got, theirs = np.asarray(got, dtype=np.int16), np.asarray(theirs, dtype=np.int16)
    diff = np.abs(got - theirs)
    print(f"{kind}/{scheduler}/{strength}: max {diff.max()} levels, {np.mean(diff > 0):.2%} of values differ")
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
    x1, y1, x2, y2 = mask_crop.crop_region(repaint, width, height, pad)
    outside = np.ones(got.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(got[outside], np.asarray(image, dtype=np.int16)[outside])


def test_padding_mask_crop_as_arrays_and_errors(pipes):
    """output_type="np" pastes back as PIL does (8-bit), as float32; bad values are one line."""
    ours, _ = pipes("sd15")
    image, repaint = picture(72, 56, seed=2), mask(72, 56, (20, 40, 10, 30))
    kw = dict(image=image, mask_image=repaint, num_inference_steps=4, seed=3, height=48, width=64)
    as_pil = np.asarray(ours("a cat", padding_mask_crop=4, **kw).images[0], dtype=np.float32) / 255
    as_np = ours("a cat", padding_mask_crop=4, output_type="np", **kw).images[0]
    assert as_np.dtype == np.float32 and np.array_equal(as_np, as_pil)
    for kwargs, message in (
        (dict(padding_mask_crop=-1), "padding_mask_crop must be an integer >= 0"),
        (dict(padding_mask_crop=4, output_type="latent"), "padding_mask_crop"),
        (dict(padding_mask_crop=4, mask_image=Image.new("L", (56, 72))), "the mask is all black"),
        (dict(padding_mask_crop=4, mask_image=mask(64, 56, (2, 9, 2, 9))), "mask_image is 56x64 but image is 56x72"),
        (dict(padding_mask_crop=4, mask_image=None), "padding_mask_crop is for inpainting"),
    ):
        with pytest.raises(DiffrtError, match=message) as info:
            ours("a cat", **{**kw, **kwargs})
        assert "\n" not in str(info.value)


def test_cli_padding_mask_crop(pipes, exported, tmp_path):
    """`diffrt generate --image --mask --padding-mask-crop N` writes the API's image."""
    from test_cli import cli

    ours, _ = pipes("sd15")
    image, repaint = picture(72, 56, seed=5), mask(72, 56, (20, 40, 10, 30))
    image.save(tmp_path / "in.png")
    repaint.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = cli("generate", str(exported("sd15")), "a door", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--padding-mask-crop", "4", "--size", "64x48", "--steps", "4",
                 "--seed", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = ours("a door", image=image, mask_image=repaint, padding_mask_crop=4, height=48, width=64,
                    num_inference_steps=4, seed=3).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_server_padding_mask_crop(pipes):
    """/v1/generate with image, mask and padding_mask_crop serves the API's image (the
    picture's size); a negative padding is a 400 naming the field."""
    import base64
    import io

    pytest.importorskip("fastapi")
    from serve_util import LiveServer, decode_npy

    ours, _ = pipes("sd15")
    image, repaint = picture(72, 56, seed=7), mask(72, 56, (20, 40, 10, 30))

    def b64(pil):
        buffer = io.BytesIO()
        pil.save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    call = {"prompt": "a barn", "num_inference_steps": 4, "seed": 21, "output_format": "npy", "size": "64x48",
            "image": b64(image), "mask": b64(repaint), "padding_mask_crop": 4}
    with LiveServer(ours, warmup=False) as server:
        status, _, answer = server.post("/v1/generate", call)
        assert status == 200, answer
        bad_status, _, bad = server.post("/v1/generate", {**call, "padding_mask_crop": -1})
    expected = ours("a barn", image=image, mask_image=repaint, padding_mask_crop=4, num_inference_steps=4, seed=21,
                    height=48, width=64, output_type="np").images[0]
    got = decode_npy(answer["images"][0]["b64"])
    assert got.shape == (72, 56, 3)
    np.testing.assert_array_equal(got, expected)
    assert bad_status == 400 and bad["error"]["param"] == "padding_mask_crop", bad
