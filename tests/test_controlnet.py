"""ControlNets against diffusers' StableDiffusionControlNetPipeline and
StableDiffusionXLControlNetPipeline on tiny random models, with the same `latents`:
one ControlNet, two with different scales and windows (MultiControlNetModel), guess mode
with CFG, non-square sizes, several schedulers; the control image preprocessing against
the pipelines' control_image_processor; bad inputs as one-line errors.

ControlNetModel.from_unet zero-initializes its output convolutions (the residuals would
be zeros and the tests could not fail): the tiny ControlNets get random ones.
The bar is 2e-3 on the [0, 1] image scale; we assert 1e-4 as test_pipeline_parity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffrt.errors import DiffrtError
from diffrt.runtime.controlnet import preprocess
from diffrt.runtime.pipeline import Pipeline

from test_pipeline_parity import compare_images, _diffusers_pipeline, _diffusers_scheduler


def make_controlnet(checkpoint, folder, seed):
    """A tiny ControlNet for `checkpoint`'s UNet (its conditioning embedding downsamples
    2x, as the tiny VAE), with random (not zero) output convolutions; saved to `folder`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16))
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.1)
    net.save_pretrained(folder)
    return net.eval()


def _control(height, width, seed=0):
    """An edge-map-like control picture: random bright lines on black."""
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            array[rng.integers(height), :] = 255
        else:
            array[:, rng.integers(width)] = 255
    return Image.fromarray(array, "RGB")


def _latents(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _setup(kind, tiny_checkpoint, tmp_path_factory, count):
    from diffrt.export import export

    checkpoint = tiny_checkpoint(kind)
    root = tmp_path_factory.mktemp(f"controlnet-{kind}")
    nets = [make_controlnet(checkpoint, root / f"cn{i}", seed=10 + i) for i in range(count)]
    export(checkpoint, root / "out", controlnets=[root / f"cn{i}" for i in range(count)])
    return Pipeline.load(root / "out"), _diffusers_pipeline(checkpoint), nets, root


@pytest.fixture(scope="module")
def sd(tiny_checkpoint, tmp_path_factory):
    """(our pipeline on an artifact with two ControlNets, diffusers' SD pipeline, the two ControlNets, root)."""
    ours, ref, nets, root = _setup("sd15", tiny_checkpoint, tmp_path_factory, 2)
    yield ours, ref, nets, root
    ours.close()


def _reference(ref, nets, scheduler):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cls = StableDiffusionXLControlNetPipeline if "XL" in type(ref).__name__ else StableDiffusionControlNetPipeline
    pipe = cls.from_pipe(ref, controlnet=nets[0] if len(nets) == 1 else list(nets))
    pipe.scheduler = _diffusers_scheduler(scheduler, ref.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_CASES = [  # which ControlNets, scheduler, steps, (height, width), images, scales, starts, ends, guess mode, cfg
    ((0,), "ddim", 6, (48, 64), 1, 0.8, 0.0, 1.0, False, 6.0),
    ((0, 1), "pndm", 6, (64, 48), 2, [0.6, 1.3], [0.0, 0.3], [0.7, 1.0], False, 5.0),
    ((1,), "euler", 5, (64, 64), 1, 0.9, 0.0, 1.0, True, 7.0),
    ((0, 1), "dpmpp_2m", 5, (48, 64), 1, [1.0, 0.5], 0.2, 0.8, True, 4.0),
    ((0,), "euler", 4, (48, 64), 1, 1.0, 0.0, 0.5, False, 1.0),  # no CFG; the last steps without control
]


@pytest.mark.parametrize(("which", "scheduler", "steps", "size", "images", "scale", "start", "end", "guess", "cfg"),
                         SD_CASES)
def test_sd_controlnets_match_diffusers(sd, which, scheduler, steps, size, images, scale, start, end, guess, cfg):
    ours, ref, nets, _ = sd
    height, width = size
    controls = [_control(height + 8, width - 8, seed=k) for k in which]  # resized to the request's size
    latents = _latents((images, 4, height // 2, width // 2), seed=len(which) + steps)
    kw = dict(num_inference_steps=steps, guidance_scale=cfg, height=height, width=width, negative_prompt="blurry",
              num_images_per_prompt=images, output_type="np", controlnet_conditioning_scale=scale,
              control_guidance_start=start, control_guidance_end=end, guess_mode=guess)
    pipe = _reference(ref, [nets[k] for k in which], scheduler)
    theirs = pipe("a house by a lake", image=controls if len(which) > 1 else controls[0], latents=latents,
                  **kw).images
    given = [controls[which.index(k)] if k in which else None for k in range(len(nets))]
    if len(which) == 1:  # one number for the one ControlNet in use
        kw.update(controlnet_conditioning_scale=scale)
    got = ours("a house by a lake", control_image=given, latents=latents.numpy(), scheduler=scheduler, **kw)
    compare_images(got.images, theirs, f"sd/{which}/{scheduler}/guess={guess}")


def test_plain_generation_is_unchanged(sd):
    """An artifact with ControlNets generates without them exactly as before: the plain
    UNet, as diffusers' StableDiffusionPipeline."""
    ours, ref, _, _ = sd
    ref.scheduler = _diffusers_scheduler("euler", ref.scheduler.config)
    latents = _latents((1, 4, 24, 32), seed=3)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=48, width=64, output_type="np")
    theirs = ref("a cat", latents=latents, **kw).images
    compare_images(ours("a cat", latents=latents.numpy(), scheduler="euler", **kw).images, theirs, "sd/plain")


def test_size_defaults_to_the_control_image(sd):
    """Without height/width diffusers generates at the control image's size rounded down
    to the VAE's scale factor (2 here): 65x49 -> 64x48, and so do we, with its image."""
    ours, ref, nets, _ = sd
    control = _control(65, 49, seed=2)
    latents = _latents((1, 4, 32, 24), seed=4)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    theirs = _reference(ref, nets[:1], "euler")("a cat", image=control, latents=latents, **kw).images
    got = ours("a cat", control_image=[control, None], latents=latents.numpy(), scheduler="euler", **kw).images
    compare_images(got, theirs, "sd/default size")


def test_control_image_preprocessing_matches_diffusers(sd):
    """PIL (RGB, RGBA, grayscale; resized with Lanczos) and float arrays (nearest) as the
    ControlNet pipelines' control_image_processor gives them."""
    _, ref, nets, _ = sd
    processor = _reference(ref, nets[:1], "ddim").control_image_processor
    rgb = _control(37, 45, seed=3)
    images = [rgb, rgb.convert("RGBA"), rgb.convert("L"), np.asarray(rgb, dtype=np.float32) / 255]
    for image in images:
        theirs = processor.preprocess(image, height=48, width=64).numpy()
        got = preprocess(image, 48, 64)
        np.testing.assert_allclose(got, theirs, atol=1e-6)


def test_bad_inputs_are_one_line_errors(sd, tmp_path, exported):
    ours, _, _, _ = sd
    control = _control(48, 64)
    truncated = tmp_path / "cut.png"
    control.save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:120])
    cases = [
        (dict(control_image=control), "2 ControlNet"),
        (dict(control_image=[control, control, control]), "got 3"),
        (dict(control_image=[None, None]), "at least one"),
        (dict(control_image=[control, str(truncated)]), "cannot read"),
        (dict(control_image=[control, control], controlnet_conditioning_scale=[1.0]), "one per ControlNet"),
        (dict(control_image=[control, control], control_guidance_start=0.6, control_guidance_end=0.4), "start < end"),
        (dict(guess_mode=True), "control_image= too"),
        (dict(control_image=[control, np.zeros((4, 4))]), "(H, W, 3)"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(DiffrtError) as info:
            ours.request("a cat", height=48, width=64, **kwargs)
        message = str(info.value)
        assert expected in message and "\n" not in message, message
    with Pipeline.load(exported("sd15")) as plain, pytest.raises(DiffrtError, match="no ControlNets"):
        plain.request("a cat", control_image=control)


def test_loras_and_image_are_refused_with_controlnets(sd, tiny_checkpoint, tmp_path):
    """Merged LoRAs change the plain UNet's weights, not the residual UNet's: a request
    with both would silently lose the LoRA, so it is refused (as ControlNet img2img)."""
    from test_lora import make_lora

    ours, _, _, _ = sd
    control = _control(48, 64)
    ours.load_lora("style", make_lora(tiny_checkpoint("sd15"), tmp_path / "lora", seed=3))
    for kwargs, expected in ((dict(loras={"style": 0.8}), "LoRAs"), (dict(image=control), "image=")):
        with pytest.raises(DiffrtError) as info:
            ours.request("a cat", control_image=[control, None], height=48, width=64, **kwargs)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    ours.request("a cat", loras={"style": 0.8}, height=48, width=64)  # without ControlNets, as before


def test_controlnet_for_another_base_is_refused(sd, tiny_checkpoint, tmp_path):
    """A ControlNet of another base (SDXL's: other cross_attention_dim and added
    conditioning) is a one-line export error naming the folder and what differs."""
    from diffrt.export import export

    make_controlnet(tiny_checkpoint("sdxl"), tmp_path / "xl-net", seed=1)
    with pytest.raises(DiffrtError) as info:
        export(tiny_checkpoint("sd15"), tmp_path / "out", controlnets=[tmp_path / "xl-net"])
    message = str(info.value)
    assert "xl-net" in message and "made for another base" in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


def test_sdxl_controlnet_matches_diffusers(tiny_checkpoint, tmp_path_factory):
    ours, ref, nets, _ = _setup("sdxl", tiny_checkpoint, tmp_path_factory, 1)
    with ours:
        for scheduler, guess in (("euler", False), ("ddim", True)):
            control = _control(48, 64, seed=5)
            latents = _latents((1, 4, 24, 32), seed=8)
            kw = dict(num_inference_steps=5, guidance_scale=5.0, height=48, width=64, output_type="np",
                      controlnet_conditioning_scale=0.7, control_guidance_end=0.8, guess_mode=guess)
            theirs = _reference(ref, nets, scheduler)("a red car", image=control, latents=latents, **kw).images
            got = ours("a red car", control_image=control, latents=latents.numpy(), scheduler=scheduler, **kw).images
            compare_images(got, theirs, f"sdxl/{scheduler}/guess={guess}")


def test_backends_without_controlnet_graphs_refuse_in_one_line(sd, fake_gpu, tmp_path):
    """TensorRT runs the engines `diffrt build` made (none for ControlNets yet) and the
    torch backend the checkpoint's modules: a ControlNet request says where it runs,
    and a plain one still runs."""
    from test_tensorrt import _build

    _, _, _, root = sd
    _build(root / "out", tmp_path)
    control = _control(64, 64)
    for backend, options in (("tensorrt", {"cache_dir": tmp_path}), ("torch", {})):
        with Pipeline.load(root / "out", backend=backend, **options) as pipe:
            with pytest.raises(DiffrtError) as info:
                pipe.request("a cat", control_image=[control, None])
            assert "ort or openvino" in str(info.value) and "\n" not in str(info.value), str(info.value)
            pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np")


@pytest.fixture
def fake_gpu(monkeypatch):
    import fake_gpu as fakes

    return fakes.install(monkeypatch)


def test_cli_generate_with_control_images(sd, tmp_path):
    """diffrt generate --control-image ... gives the API's image; a flag without
    --control-image is a one-line error naming the flags."""
    from test_cli import cli

    ours, _, _, root = sd
    controls = [_control(48, 64, seed=k) for k in range(2)]
    for k, control in enumerate(controls):
        control.save(tmp_path / f"c{k}.png")
    out = tmp_path / "out.png"
    result = cli("generate", str(root / "out"), "a cat", "--steps", "3", "--seed", "1", "--scheduler", "ddim",
                 "--control-image", str(tmp_path / "c0.png"), "--control-image", str(tmp_path / "c1.png"),
                 "--control-scale", "0.5", "1.2", "--control-start", "0", "0.2", "--control-end", "0.8",
                 "--guess-mode", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    api = ours("a cat", control_image=controls, num_inference_steps=3, seed=1, scheduler="ddim",
               controlnet_conditioning_scale=[0.5, 1.2], control_guidance_start=[0.0, 0.2], control_guidance_end=0.8,
               guess_mode=True).images[0]
    assert Image.open(out).size == (64, 48)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))
    plain = ours("a cat", num_inference_steps=3, seed=1, scheduler="ddim", height=48, width=64).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(api))

    result = cli("generate", str(root / "out"), "a cat", "--control-scale", "0.5", "-o", str(tmp_path / "x.png"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "--control-scale" in lines[0], result.stderr
    assert "--control-image" in lines[0]


def test_server_generates_with_controlnets(sd):
    """/v1/generate with `controlnets` (base64 images, scales, windows) and guess_mode
    serves the pipeline's image; a count that does not match the artifact's ControlNets,
    a corrupt or truncated image, an unknown key are 400s naming the field."""
    import base64
    import io

    pytest.importorskip("fastapi")
    from serve_util import LiveServer, decode_npy

    ours, _, _, _ = sd

    def b64(image, cut=None):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()[:cut]).decode()

    controls = [_control(48, 64, seed=k) for k in range(2)]
    nets = [{"image": b64(controls[0]), "scale": 0.7, "end": 0.6}, {"image": b64(controls[1]), "start": 0.3}]
    call = {"prompt": "a barn", "num_inference_steps": 4, "seed": 21, "output_format": "npy", "size": "64x48",
            "scheduler": "euler", "controlnets": nets, "guess_mode": True}
    bad = [
        ({**call, "controlnets": nets[:1]}, "controlnets"),
        ({**call, "controlnets": [nets[0], {"image": b64(controls[1], cut=100)}]}, "controlnets[1].image"),
        ({**call, "controlnets": [nets[0], {"image": "bm90IGFuIGltYWdl"}]}, "controlnets[1].image"),
        ({**call, "controlnets": [nets[0], {**nets[1], "weight": 2}]}, None),
        ({**call, "controlnets": [nets[0], {**nets[1], "start": 0.9, "end": 0.5}]}, "controlnets"),
        ({k: v for k, v in call.items() if k != "controlnets"}, "controlnets"),
    ]
    with LiveServer(ours, warmup=False) as server:
        status, _, answer = server.post("/v1/generate", call)
        assert status == 200, answer
        for body, param in bad:
            status, _, error = server.post("/v1/generate", body)
            assert 400 <= status < 500, (param, error)
            if param is not None:
                assert error["error"]["param"] == param, error
    expected = ours("a barn", control_image=controls, controlnet_conditioning_scale=[0.7, 1.0],
                    control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0], guess_mode=True,
                    num_inference_steps=4, seed=21, height=48, width=64, scheduler="euler", output_type="np").images[0]
    np.testing.assert_array_equal(decode_npy(answer["images"][0]["b64"]), expected)


def test_openvino_runs_the_controlnet_graphs(sd, tmp_path):
    """The same ONNX stages on OpenVINO (fp32 inference) give diffusers' image."""
    pytest.importorskip("openvino")
    _, ref, nets, root = sd
    controls = [_control(48, 64, seed=k) for k in range(2)]
    latents = _latents((1, 4, 24, 32), seed=9)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=48, width=64, output_type="np",
              controlnet_conditioning_scale=[0.8, 1.1], control_guidance_start=[0.0, 0.25], guess_mode=True)
    theirs = _reference(ref, nets, "euler")("a barn", image=controls, latents=latents, **kw).images
    with Pipeline.load(root / "out", backend="openvino", precision="fp32", cache_dir=tmp_path) as ov:
        got = ov("a barn", control_image=controls, latents=latents.numpy(), scheduler="euler", **kw).images
    compare_images(got, theirs, "openvino/two ControlNets/guess")


def test_an_upcasting_controlnets_half_graph_upcasts_attention(tiny_checkpoint, tmp_path):
    """A ControlNet whose config asks for fp32 attention scores (SD 2.x ControlNets do)
    gets half graphs with attention upcast, as the UNet's are when its config asks."""
    import json

    from diffrt.export import export

    checkpoint = tiny_checkpoint("sd15")
    make_controlnet(checkpoint, tmp_path / "cn", seed=3)
    config = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert config["upcast_attention"] is False  # the tiny base does not upcast
    config["upcast_attention"] = True
    (tmp_path / "cn" / "config.json").write_text(json.dumps(config))
    export(checkpoint, tmp_path / "out", controlnets=[tmp_path / "cn"], precision="fp16")
    stages = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert "to_half:fp16:upcast" in stages["controlnet_0-fp16"]["passes"]
    assert "to_half:fp16" in stages["unet-fp16"]["passes"]  # the base UNet does not ask
