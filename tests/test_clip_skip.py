"""clip_skip against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline
(`clip_skip=1/2`) on tiny random models with the same latents: one exported text
encoder graph serves every value (its skip_hidden_states output), negative prompts
keep the last layer as diffusers does, and bad values or artifacts exported before
clip_skip are refused in one line."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from diffrt import cli
from diffrt.errors import DiffrtError
from diffrt.families import sd, sdxl
from diffrt.runtime.pipeline import Pipeline

from test_pipeline_parity import TOLERANCE, _diffusers_pipeline, _latents

LAYERS = 3  # the tiny CLIP encoders' num_hidden_layers (diffrt/export/tiny.py)


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, exported):
    cache = {}

    def get(kind):
        if kind not in cache:
            ref = _diffusers_pipeline(tiny_checkpoint(kind))
            encoder = ref.text_encoder
            if not hasattr(encoder, "text_model"):
                # diffusers 0.42's SD clip_skip reads text_encoder.text_model.final_layer_norm, a level
                # transformers 5 removed (AttributeError): give its own code the path it expects
                object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
            cache[kind] = (Pipeline.load(exported(kind)), ref)
        return cache[kind]

    return get


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(pipes, kind, clip_skip):
    """Two prompts with negative prompts (so the encoders run on both and CFG mixes
    them), two images each."""
    ours, ref = pipes(kind)
    latents = _latents(ours.family.latent_shape(ours.facts, 4, 64, 48), seed=clip_skip)
    kw = dict(negative_prompt=["blurry", "ugly, low quality"], num_inference_steps=4, guidance_scale=6.0,
              num_images_per_prompt=2, height=64, width=48)
    prompts = ["a photo of a cat", "an oil painting of a harbour"]
    theirs = ref(prompts, latents=latents, output_type="np", clip_skip=clip_skip, **kw).images
    plain = ref(prompts, latents=latents, output_type="np", **kw).images
    assert _diff(theirs, plain) > 1e-3  # the option changes diffusers' image, so matching it means something
    got = ours(prompts, latents=latents.numpy(), output_type="np", clip_skip=clip_skip, **kw).images
    print(f"{kind} clip_skip={clip_skip}: max abs difference {_diff(got, theirs):.2e}")
    assert _diff(got, theirs) <= TOLERANCE


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_clip_skip_zero_is_the_default(pipes, kind):
    ours, _ = pipes(kind)
    kw = dict(num_inference_steps=2, seed=3, output_type="np", height=64, width=64)
    np.testing.assert_array_equal(ours("a cat", clip_skip=0, **kw).images, ours("a cat", **kw).images)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_default_outputs_keep_their_names(pipes, kind):
    """Old callers read the same outputs by name; the per-layer stack comes last."""
    ours, _ = pipes(kind)
    for role in ours.family.runtime_roles(ours.facts):
        if role not in ours.family.TOKENIZER_OF:
            continue
        names = [t.name for t in ours.models[role].spec.outputs]
        assert names[-1] == "skip_hidden_states" and names[:-1] == (
            ["last_hidden_state", "pooler_output"] if kind == "sd15"
            else ["hidden_states", "text_embeds"] if role == "text_encoder_2" else ["hidden_states"])
        assert ours.models[role].spec.outputs[-1].shape[1] == LAYERS


@pytest.mark.parametrize("value", [LAYERS, -1, 1.0, "1", True])
def test_bad_clip_skip_is_one_line(pipes, value):
    ours, _ = pipes("sd15")
    with pytest.raises(DiffrtError, match="clip_skip") as info:
        ours.request("a cat", clip_skip=value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", [sd, sdxl])
def test_artifact_before_clip_skip_is_refused(pipes, family):
    """A manifest without the layer counts (exported before clip_skip) has no stack to
    select from: one line saying to re-export; without clip_skip it runs as before."""
    ours, _ = pipes("sd15" if family is sd else "sdxl")
    old = dataclasses.replace(ours.facts, text_num_layers=None)
    with pytest.raises(DiffrtError, match=r"re-export it with diffrt >= "):
        family.check_options(old, {"clip_skip": 1})
    assert family.check_options(old, {}).clip_skip is None
    assert "skip_hidden_states" not in [t.name for t in family.stage_io(old)["text_encoder"][1]]


def test_cli_clip_skip(pipes, exported, tmp_path):
    """`diffrt generate --clip-skip N` reaches the request: the PNG is the pipeline's image."""
    ours, _ = pipes("sd15")
    out = tmp_path / "skip.png"
    assert cli.main(["generate", str(exported("sd15")), "a cat", "--clip-skip", "2", "--steps", "2", "--seed", "5",
              "--size", "64x64", "-o", str(out), "-q"]) == 0
    from PIL import Image

    got = np.asarray(Image.open(out), dtype=np.int16)
    want = np.asarray(ours("a cat", clip_skip=2, num_inference_steps=2, seed=5, height=64, width=64).images[0],
                      dtype=np.int16)
    other = np.asarray(ours("a cat", num_inference_steps=2, seed=5, height=64, width=64).images[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 1 and np.abs(got - other).max() > 1
