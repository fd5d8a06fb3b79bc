"""Dedicated (9-channel) inpainting UNets against diffusers' StableDiffusionInpaintPipeline
on a tiny random-weight StableDiffusionInpaintPipeline checkpoint, with the same random
draws: both draw from a torch generator seeded alike (ours through TorchNoise), in
diffusers' order: below strength 1 the picture's encoder sample, then the start noise,
then the masked picture's encoder sample; at strength 1 the start noise, then the masked
picture's sample (the picture itself is not encoded).

The bar is 2e-3 on the [0, 1] image scale; we assert test_pipeline_parity's TOLERANCE.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline

from test_pipeline_parity import compare_images, _diffusers_scheduler, TorchNoise


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory):
    from diffrt.export.tiny import make_tiny_sd_inpaint

    return make_tiny_sd_inpaint(tmp_path_factory.mktemp("ckpt-inpaint") / "checkpoint")


@pytest.fixture(scope="module")
def inpaint_artifact(inpaint_checkpoint, tmp_path_factory):
    from diffrt.export import export

    out = tmp_path_factory.mktemp("art-inpaint") / "artifact"
    export(inpaint_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def pipes(inpaint_checkpoint, inpaint_artifact):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pretrained(inpaint_checkpoint, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.load(inpaint_artifact)
    yield ours, ref, dict(ref.scheduler.config)
    ours.close()


def picture(height, width, seed=0):
    """A smooth RGB test picture (gradients plus a little noise), as PIL."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def mask(height, width):
    """White (repaint) in an off-centre box, black elsewhere, as a grayscale PIL image."""
    array = np.zeros((height, width), np.uint8)
    array[height // 4: 3 * height // 4, width // 3: width - 4] = 255
    return Image.fromarray(array, "L")


def test_the_export_records_a_nine_channel_unet(pipes):
    ours, ref, _ = pipes
    assert ours.manifest.pipeline_class == "StableDiffusionInpaintPipeline"
    sample = next(t for t in ours.models["unet"].spec.inputs if t.name == "sample")
    assert sample.shape[1] == ref.unet.config.in_channels == 9
    assert ours.facts.noise_channels == ref.vae.config.latent_channels


@pytest.mark.parametrize(("scheduler", "strength", "size", "guidance"), [
    ("ddim", 0.6, (48, 64), 6.0),
    ("euler", 1.0, (64, 48), 6.0),
    ("pndm", 1.0, (48, 64), 1.0),  # no CFG: the extra channels once per row
    ("euler_ancestral", 0.6, (64, 48), 5.0),  # its step noise continues the generator
])
def test_nine_channel_inpainting_matches_diffusers(pipes, scheduler, strength, size, guidance):
    ours, ref, config = pipes
    ref.scheduler = _diffusers_scheduler(scheduler, config)
    height, width = size
    image, repaint = picture(72, 56, seed=21), mask(72, 56)  # resized to the output size, as diffusers does
    kw = dict(num_inference_steps=6, guidance_scale=guidance, strength=strength, height=height, width=width,
              negative_prompt="blurry")
    import torch

    theirs = ref("a window", image=image, mask_image=repaint, generator=torch.Generator().manual_seed(7),
                 output_type="np", **kw).images
    got = ours("a window", image=image, mask_image=repaint, scheduler=scheduler, generator=TorchNoise(7),
               output_type="np", **kw).images
    compare_images(got, theirs, f"inpaint-9ch/{scheduler}/{strength}")


def test_nine_channel_inpainting_from_paths_and_seeds(pipes, tmp_path):
    """Files in, per-image seeds: the same image alone and in a batch of two, at the
    checkpoint's size (diffusers' default for inpainting, not the picture's)."""
    ours, ref, _ = pipes
    picture(48, 64, seed=2).save(tmp_path / "in.png")
    mask(48, 64).save(tmp_path / "mask.png")
    kw = dict(image=tmp_path / "in.png", mask_image=tmp_path / "mask.png", num_inference_steps=4, output_type="np",
              strength=0.6)
    pair = ours("a door", seed=3, num_images_per_prompt=2, **kw).images
    alone = ours("a door", seed=4, **kw).images
    compare_images(pair[1:], alone, "inpaint-9ch/batch row 1 vs alone")
    side = ref.unet.config.sample_size * ref.vae_scale_factor
    assert pair.shape == (2, side, side, 3)


def test_nine_channel_checkpoint_needs_a_mask(pipes):
    ours, _, _ = pipes
    for kwargs in ({}, {"image": picture(64, 64)}):
        with pytest.raises(DiffrtError, match="inpainting checkpoint.*mask_image"):
            ours("a cat", num_inference_steps=4, **kwargs)
    with pytest.raises(DiffrtError, match="mask_image is 64x48 but image is 64x64"):
        ours("a cat", image=picture(64, 64), mask_image=mask(48, 64), num_inference_steps=4)


@pytest.mark.parametrize(("backend", "options"), [("openvino", {"precision": "fp32"}), ("torch", {})])
def test_other_backends_run_the_nine_channel_unet_like_ort(pipes, inpaint_artifact, backend, options):
    """OpenVINO (static shapes compiled with the UNet's 9 channels) and the torch backend
    (the checkpoint's VAE checked against the VAE's channels, not the UNet's): ORT's
    images, which equal diffusers'."""
    pytest.importorskip("openvino" if backend == "openvino" else "torch")
    ours, _, _ = pipes
    kw = dict(image=picture(48, 64, seed=9), mask_image=mask(48, 64), strength=0.6, seed=2, num_inference_steps=4,
              scheduler="ddim", height=48, width=64, output_type="np")
    expected = ours("a door", **kw).images
    with Pipeline.load(inpaint_artifact, backend=backend, **options) as other:
        compare_images(other("a door", **kw).images, expected, f"inpaint-9ch/{backend}")


@pytest.fixture(scope="module")
def server(pipes):
    from serve_util import LiveServer

    with LiveServer(pipes[0], max_side=256) as live:  # its warm-up inpaints (text-to-image cannot run)
        yield live


def _png(image, path):
    image.save(path, format="PNG")
    return path


def test_openai_client_edit_equals_the_pipeline(pipes, server, tmp_path):
    """client.images.edit, unchanged: OpenAI's transparent-means-edit mask, the seed as
    an extra form field; the PNG it returns is the pipeline's inpainting of the same
    picture with the same region white in a grayscale mask."""
    openai = pytest.importorskip("openai")
    import base64
    import io

    ours, _, _ = pipes
    image, repaint = picture(48, 64, seed=8), mask(48, 64)
    alpha = Image.fromarray(np.where(np.asarray(repaint) > 0, 0, 255).astype(np.uint8), "L")
    transparent = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    transparent.putalpha(alpha)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with open(_png(image, tmp_path / "in.png"), "rb") as picture_file, \
            open(_png(transparent, tmp_path / "mask.png"), "rb") as mask_file:
        result = client.images.edit(image=picture_file, mask=mask_file, prompt="a window", n=1, size="64x48",
                                    response_format="b64_json",
                                    extra_body={"seed": 5, "num_inference_steps": 4, "strength": 0.6})
    assert len(result.data) == 1
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    expected = ours("a window", image=image, mask_image=repaint, seed=5, num_inference_steps=4, strength=0.6,
                    height=48, width=64).images[0]
    assert got.shape == (48, 64, 3)
    assert np.array_equal(got, np.asarray(expected))
    # no mask: the picture's own transparent pixels are the region to edit (OpenAI's rule), at its size
    rgba = image.convert("RGBA")
    rgba.putalpha(alpha)
    with open(_png(rgba, tmp_path / "rgba.png"), "rb") as picture_file:
        result = client.images.edit(image=picture_file, prompt="a window", response_format="b64_json",
                                    extra_body={"seed": 6, "num_inference_steps": 2})
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    expected = ours("a window", image=image, mask_image=repaint, seed=6, num_inference_steps=2, height=48,
                    width=64).images[0]
    assert np.array_equal(got, np.asarray(expected))


def _post_edit(server, files, data):
    """A multipart/form-data POST, encoded by hand (RFC 7578)."""
    boundary = "diffrt-test-boundary-7f3a"
    chunks = []
    for name, value in data.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content, media_type) in files.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: {media_type}\r\n\r\n".encode() + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    status, _, body = server.post("/v1/images/edits", b"".join(chunks),
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, body


@pytest.mark.parametrize(("files", "param", "message"), [
    ({"mask": ("m.png", "MASK_48x64")}, "image", "image is required"),
    ({"image": ("in.png", b"\x89PNG\r\n\x1a\n not a png"), "mask": ("m.png", "MASK_48x64")}, "image",
     "PNG or JPEG"),
    ({"image": ("in.png", "PICTURE_48x64"), "mask": ("m.png", "MASK_32x64")}, "mask", "mask_image is 64x32"),
    ({"image": ("in.png", "TRUNCATED")}, "image", "not a complete PNG"),
])
def test_edit_bad_inputs_are_4xx_naming_the_field(server, tmp_path, files, param, message):
    made = {"PICTURE_48x64": lambda: picture(48, 64), "MASK_48x64": lambda: mask(48, 64),
            "MASK_32x64": lambda: mask(32, 64)}
    parts = {}
    for name, (filename, content) in files.items():
        if content == "TRUNCATED":
            content = _png(picture(48, 64), tmp_path / "t.png").read_bytes()[:200]
        elif isinstance(content, str):
            content = _png(made[content](), tmp_path / f"{name}.png").read_bytes()
        parts[name] = (filename, content, "image/png")
    status, body = _post_edit(server, parts, {"prompt": "a window", "num_inference_steps": "2"})
    assert 400 <= status < 500, body
    assert body["error"]["param"] == param and message in body["error"]["message"], body


def test_edit_needs_a_multipart_form(server):
    status, _, body = server.post("/v1/images/edits", {"prompt": "a window"})
    assert status == 400 and body["error"]["param"] == "body" and "multipart/form-data" in body["error"]["message"]
