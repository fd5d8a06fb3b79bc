"""The optional safety-checker stage (`diffrt export --safety-checker`): on a tiny random
StableDiffusionSafetyChecker, its flags and scores equal diffusers' checker on the same
images (one image flagged by construction: a concept embedding pointing from the other
image's embedding to its own, its threshold between the two images' cosines), the CLIP preprocessing equals transformers' CLIPImageProcessor, and each
policy, the CLI, the server and a bad --safety-checker folder behave."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffrt.errors import DiffrtError

PROMPT, STEPS, SEED, COUNT = "a cat", 2, 0, 2  # two 64x64 images of the tiny sd15 checkpoint
SIZE = 32  # the tiny vision tower's input


def _tiny_checker(seed: int):
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(text_config=tower, vision_config={**tower, "image_size": SIZE, "patch_size": 4},
                        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # random concepts, thresholds no random image reaches
        checker.concept_embeds.copy_(torch.randn(17, 16))
        checker.special_care_embeds.copy_(torch.randn(3, 16))
        checker.concept_embeds_weights.fill_(0.9)
        checker.special_care_embeds_weights.fill_(0.9)
    return checker


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def _numpy_to_pil(images):
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(images)


def _diffusers_check(checker, images: np.ndarray):
    """diffusers' run_safety_checker on numpy images: (images it returns, flags, the
    per-image result dicts its forward builds, read from its frame as it returns)."""
    clip_input = _processor()(_numpy_to_pil(images), return_tensors="pt").pixel_values
    captured = {}

    def profile(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "forward" and "bad_concepts" in str(frame.f_locals.get("result")):
            captured["result"] = frame.f_locals["result"]

    sys.setprofile(profile)
    try:
        out, flags = checker(images=images.copy(), clip_input=clip_input)
    finally:
        sys.setprofile(None)
    return np.asarray(out, dtype=np.float32), list(flags), captured["result"]


@pytest.fixture(scope="module")
def scene(exported, tiny_checkpoint, tmp_path_factory):
    """A checker that flags image 0 of the batch and not image 1, the artifact exported
    with it, the images generated without it, and diffusers' verdict on them."""
    from diffrt.export import export
    from diffrt.runtime.pipeline import Pipeline

    with Pipeline.load(exported("sd15")) as pipe:
        images = pipe(PROMPT, num_inference_steps=STEPS, seed=SEED, num_images_per_prompt=COUNT,
                      output_type="np").images
    checker = _tiny_checker(0)
    clip_input = _processor()(_numpy_to_pil(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        # random CLIP embeddings share a large common part: the concept is what sets image 0 apart
        concept = embeds[0] - embeds[1]
        cosines = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(concept, dim=0)
        assert cosines[0] - cosines[1] > 0.02, f"the two test images are too alike to separate ({cosines})"
        threshold = float(cosines.mean())  # image 0's cosine above it, image 1's below
        checker.concept_embeds[5] = concept
        checker.concept_embeds_weights[5] = threshold
        checker.special_care_embeds[1] = concept  # and a special-care concept: diffusers' adjustment path
        checker.special_care_embeds_weights[1] = threshold
    folder = tmp_path_factory.mktemp("checker") / "safety_checker"
    checker.save_pretrained(folder)
    _processor().save_pretrained(folder)
    artifact = tmp_path_factory.mktemp("art-safety") / "artifact"
    export(tiny_checkpoint("sd15"), artifact, safety_checker=folder)
    reference = _diffusers_check(checker, images)
    return {"artifact": artifact, "images": images, "reference": reference, "checker_folder": folder}


def _generate(artifact, **kwargs):
    from diffrt.runtime.pipeline import Pipeline

    load = {k: kwargs.pop(k) for k in ("load_safety",) if k in kwargs}
    with Pipeline.load(artifact, safety=load.get("load_safety")) as pipe:
        return pipe(PROMPT, num_inference_steps=STEPS, seed=SEED, num_images_per_prompt=COUNT, output_type="np",
                    **kwargs)


def test_flags_and_scores_equal_diffusers_checker(scene):
    _, flags, result = scene["reference"]
    assert flags == [True, False]  # the construction worked in diffusers
    out = _generate(scene["artifact"])  # the default policy where the stage exists: flag
    assert out.nsfw_content_detected == flags
    np.testing.assert_allclose(out.images, scene["images"], atol=1e-6)  # flag leaves images as they are
    for verdict, theirs in zip(out.safety, result, strict=True):
        concepts = [float(theirs["concept_scores"][i]) for i in range(len(theirs["concept_scores"]))]
        special = [float(theirs["special_scores"][i]) for i in range(len(theirs["special_scores"]))]
        np.testing.assert_allclose(verdict.concept_scores, concepts, atol=1.01e-3)  # rounded to 3 decimals
        np.testing.assert_allclose(verdict.special_scores, special, atol=1.01e-3)
        assert [i for i, s in enumerate(verdict.concept_scores) if s > 0] == theirs["bad_concepts"]


def test_block_returns_diffusers_black_images(scene):
    blocked, flags, _ = scene["reference"]
    out = _generate(scene["artifact"], safety="block")
    assert out.nsfw_content_detected == flags
    np.testing.assert_allclose(out.images, blocked, atol=1e-6)
    assert not out.images[0].any()  # black, and image 1 untouched (it equals diffusers' too)


def test_blur_blurs_only_flagged_images(scene):
    out = _generate(scene["artifact"], load_safety="blur")
    original = scene["images"]
    np.testing.assert_array_equal(out.images[1], original[1])

    def roughness(image):  # mean difference between horizontal neighbours
        return float(np.abs(np.diff(image, axis=1)).mean())

    assert roughness(out.images[0]) < 0.5 * roughness(original[0])
    # still the same picture, not a replacement: the mean colour barely moves
    np.testing.assert_allclose(out.images[0].mean(axis=(0, 1)), original[0].mean(axis=(0, 1)), atol=0.03)


def test_off_skips_the_checker(scene):
    out = _generate(scene["artifact"], load_safety="off")
    assert out.nsfw_content_detected is None and out.safety is None
    np.testing.assert_allclose(out.images, scene["images"], atol=1e-6)
    with pytest.raises(DiffrtError, match="loaded with safety='off'"):
        _generate(scene["artifact"], load_safety="off", safety="flag")


def test_policy_errors_are_one_line(scene, exported):
    from diffrt.runtime.pipeline import Pipeline

    with pytest.raises(DiffrtError) as info:
        Pipeline.load(scene["artifact"], safety="maybe")
    assert "\n" not in str(info.value) and "flag" in str(info.value)
    with pytest.raises(DiffrtError, match="no safety checker") as info:
        Pipeline.load(exported("sd15"), safety="block")
    with Pipeline.load(exported("sd15")) as pipe:  # no stage: the default is off, nothing reported
        assert pipe(PROMPT, num_inference_steps=1, seed=0).nsfw_content_detected is None


def test_manifest_records_the_stage_and_hashes_its_preprocessing(scene):
    from diffrt.artifacts import read_manifest, verify_files

    manifest = read_manifest(scene["artifact"])
    stage = manifest.stages["safety_checker"]
    assert stage.reference == "torch" and stage.max_abs_error < 1e-4
    config = scene["artifact"] / "feature_extractor" / "preprocessor_config.json"
    assert [r.path for r in manifest.components["feature_extractor"]] == ["feature_extractor/preprocessor_config.json"]
    assert config.read_bytes() == (scene["checker_folder"] / "preprocessor_config.json").read_bytes()
    verify_files(scene["artifact"], manifest, "full")
    copy = scene["artifact"].parent / "tampered"
    import shutil

    shutil.copytree(scene["artifact"], copy)
    (copy / "feature_extractor" / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 64}}')
    with pytest.raises(DiffrtError, match="preprocessor_config"):
        verify_files(copy, read_manifest(copy), "full")


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (100, 45), (37, 101)])
@pytest.mark.parametrize("default", [True, False])
def test_preprocessing_equals_clip_image_processor(size, default, tmp_path):
    from transformers import CLIPImageProcessor

    from diffrt.runtime.safety import preprocess, read_preprocessing

    processor = CLIPImageProcessor() if default else _processor()  # default: 224, SD checkpoints' config
    processor.save_pretrained(tmp_path)
    images = np.random.default_rng(size[0]).random((2, *size, 3), dtype=np.float32)
    expected = processor(_numpy_to_pil(images), return_tensors="np").pixel_values
    got = preprocess(images, read_preprocessing(tmp_path / "preprocessor_config.json"))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_server_returns_the_flag_and_counts_it(scene):
    from serve_util import LiveServer

    from diffrt.runtime.pipeline import Pipeline

    with Pipeline.load(scene["artifact"]) as pipe, LiveServer(pipe) as server:
        status, _, body = server.post("/v1/generate", {"prompt": PROMPT, "num_inference_steps": STEPS, "seed": SEED,
                                                       "n": COUNT, "size": "64x64"})
        assert status == 200, body
        assert [image["nsfw_content_detected"] for image in body["images"]] == scene["reference"][1]
        assert body["images"][0]["safety_scores"]["concepts"][5] > 0
        status, _, text = server.request("GET", "/metrics")
    flagged = [line for line in text.splitlines() if line.startswith("diffrt_images_flagged_total")]
    # the warm-up's one image (another prompt) may be flagged or not; this request's one is
    assert flagged and float(flagged[0].split()[-1]) >= 1.0


def test_serve_safety_option_sets_the_policy_of_every_request(scene, monkeypatch):
    """`diffrt serve --safety block` reaches the loaded pipeline: the server's flagged
    image comes back black (diffusers' blocked image), the other untouched."""
    from serve_util import LiveServer, decode_npy

    from diffrt.cli import main
    from diffrt.serve import server as server_module

    class Loaded(BaseException):  # the CLI's path up to the load; the server itself is not started
        pass

    loaded, load = {}, server_module.load_pipeline

    def load_and_stop(folder, **kwargs):
        loaded["pipe"] = load(folder, **kwargs)
        raise Loaded

    monkeypatch.setattr(server_module, "load_pipeline", load_and_stop)
    monkeypatch.setattr(server_module, "check_port_free", lambda host, port: None)
    with pytest.raises(Loaded):
        main(["serve", str(scene["artifact"]), "--safety", "block", "--no-warmup"])
    blocked, flags, _ = scene["reference"]
    with loaded["pipe"] as pipe, LiveServer(pipe) as server:
        status, _, body = server.post("/v1/generate", {"prompt": PROMPT, "num_inference_steps": STEPS, "seed": SEED,
                                                       "n": COUNT, "size": "64x64", "output_format": "npy"})
    assert status == 200, body
    assert [image["nsfw_content_detected"] for image in body["images"]] == flags
    images = np.stack([decode_npy(image["b64"]) for image in body["images"]])
    np.testing.assert_allclose(images, blocked, atol=1e-6)


def test_cli_generate_prints_a_line_per_flagged_image(scene, tmp_path):
    from PIL import Image

    run = subprocess.run([sys.executable, "-m", "diffrt.cli", "generate", str(scene["artifact"]), PROMPT,
                          "--steps", str(STEPS), "--seed", str(SEED), "-n", str(COUNT), "--safety", "block",
                          "-o", str(tmp_path / "x.png"), "--quiet"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if "flagged" in line]
    assert lines == [f"{tmp_path / 'x-0.png'}: flagged by the safety checker (concepts [5], replaced by black)"]
    assert not np.asarray(Image.open(tmp_path / "x-0.png")).any()


@pytest.mark.parametrize("which", ["unet", "empty"])
def test_a_folder_that_is_not_a_safety_checker_is_one_line(which, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("sd15")
    folder = checkpoint / "unet" if which == "unet" else tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    run = subprocess.run([sys.executable, "-m", "diffrt.cli", "export", str(checkpoint), str(tmp_path / "out"),
                          "--safety-checker", str(folder)], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip() and "torchvision" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: --safety-checker"), run.stderr
    assert not (tmp_path / "out").exists()


def test_the_checkpoints_own_checker_and_feature_extractor(tiny_checkpoint, tmp_path):
    """`--safety-checker checkpoint`: SRC's safety_checker/, and (the folder having no
    preprocessing config) SRC's feature_extractor/ config, as diffusers' SD checkpoints hold them."""
    import json
    import shutil

    from diffrt.export import export
    from diffrt.runtime.pipeline import Pipeline

    checkpoint = shutil.copytree(tiny_checkpoint("sd15"), tmp_path / "checkpoint")
    checker = _tiny_checker(1)
    checker.save_pretrained(checkpoint / "safety_checker")
    _processor().save_pretrained(checkpoint / "feature_extractor")
    export(checkpoint, tmp_path / "out", safety_checker="checkpoint")
    copied = tmp_path / "out" / "feature_extractor" / "preprocessor_config.json"
    assert json.loads(copied.read_text()) == json.loads((checkpoint / "feature_extractor" /
                                                         "preprocessor_config.json").read_text())
    with Pipeline.load(tmp_path / "out") as pipe:
        out = pipe(PROMPT, num_inference_steps=1, seed=0, output_type="np")
    assert out.nsfw_content_detected == _diffusers_check(checker, out.images)[1]
