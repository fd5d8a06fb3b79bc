"""Batching requests across callers (the server's dynamic batching): a request's images
are the ones it gets alone, whatever else shares its denoiser calls.

Each call keeps its own prompt, negative prompt, guidance scale, image count and seed;
rows from different requests meet only inside the batched UNet and VAE calls, whose
kernels may sum in a different order at another batch size, hence the 1e-6 bound on
the [0, 1] image scale."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline

TOL = 1e-6


def _check_batch(pipe, calls):
    batched = pipe.generate([pipe.request(**call) for call in calls])
    assert len(batched) == len(calls)
    for call, out in zip(calls, batched, strict=True):
        alone = pipe(**call)
        assert out.seed == alone.seed and out.settings == alone.settings
        assert out.images.shape == alone.images.shape
        diff = float(np.abs(out.images - alone.images).max())
        assert diff <= TOL, f"{call}: batched differs from alone by {diff:.3g}"
    return batched


@pytest.fixture(scope="module")
def sd_pipe(exported):
    with Pipeline.load(exported("sd15")) as pipe:
        yield pipe


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])
def test_cfg_requests_with_their_own_prompts_guidance_and_seeds(sd_pipe, scheduler):
    common = dict(num_inference_steps=3, height=64, width=64, scheduler=scheduler, output_type="np")
    calls = [
        dict(prompt="a cat", negative_prompt="blurry", guidance_scale=7.5, seed=1, **common),
        dict(prompt=["a dog", "a bird"], guidance_scale=3.0, seed=20, num_images_per_prompt=2, **common),
        dict(prompt="a fox", guidance_scale=5.0, seed=1, **common),
    ]
    keys = {sd_pipe.batch_key(sd_pipe.request(**call)) for call in calls}
    assert len(keys) == 1
    batched = _check_batch(sd_pipe, calls)
    assert batched[1].images.shape[0] == 4 and batched[0].timings["batch_images"] == 6
    # same seed, different prompt: a different image (the rows really are the requests')
    assert float(np.abs(batched[0].images - batched[2].images).max()) > 1e-3


def test_lcm_guidance_embedding_rows(exported):
    with Pipeline.load(exported("lcm")) as pipe:
        common = dict(num_inference_steps=2, height=64, width=64, output_type="np")
        _check_batch(pipe, [dict(prompt="a cat", guidance_scale=8.0, seed=4, **common),
                            dict(prompt="a dog", guidance_scale=2.0, seed=5, **common)])


def test_sdxl_rows(exported):
    with Pipeline.load(exported("sdxl")) as pipe:
        common = dict(num_inference_steps=2, height=64, width=64, output_type="np")
        _check_batch(pipe, [dict(prompt="a cat", guidance_scale=6.0, seed=4, **common),
                            dict(prompt="a dog", negative_prompt="ugly", guidance_scale=4.0, seed=9, **common)])


def test_keys_split_what_cannot_share_a_call(sd_pipe):
    base = dict(prompt="a cat", num_inference_steps=3, height=64, width=64)
    key = sd_pipe.batch_key(sd_pipe.request(**base))
    assert sd_pipe.batch_key(sd_pipe.request(**{**base, "guidance_scale": 3.0, "seed": 5, "prompt": "x"})) == key
    for change in ({"num_inference_steps": 4}, {"height": 128}, {"scheduler": "euler"}, {"guidance_scale": 1.0}):
        assert sd_pipe.batch_key(sd_pipe.request(**{**base, **change})) != key, change
    with pytest.raises(DiffrtError, match="group them by batch_key"):
        sd_pipe.generate([sd_pipe.request(**base), sd_pipe.request(**{**base, "num_inference_steps": 4})])
    with_latents = sd_pipe.request(**base, latents=np.zeros((1, 4, 32, 32)))
    with pytest.raises(DiffrtError, match="run alone"):
        sd_pipe.generate([with_latents, sd_pipe.request(**base)])
    with pytest.raises(DiffrtError, match="num_inference_steps"):
        sd_pipe.request(**{**base, "num_inference_steps": 0})
    with pytest.raises(DiffrtError, match="cannot fit|memory"):
        sd_pipe.request(prompt="a cat", height=65536, width=65536)
    assert sd_pipe.generate([]) == []


def test_mixed_output_types_in_one_batch(sd_pipe):
    common = dict(num_inference_steps=2, height=64, width=64, guidance_scale=5.0)
    calls = [dict(prompt="a cat", seed=1, output_type="latent", **common),
             dict(prompt="a dog", seed=2, output_type="pil", **common),
             dict(prompt="a fox", seed=3, output_type="np", **common)]
    latent, pil, arr = sd_pipe.generate([sd_pipe.request(**call) for call in calls])
    alone = sd_pipe(**calls[0]).images
    assert latent.images.shape == alone.shape and latent.images.shape[:2] == (1, 4)
    assert float(np.abs(latent.images - alone).max()) <= TOL
    assert len(pil.images) == 1 and pil.images[0].size == (64, 64)
    pil_alone = np.asarray(sd_pipe(**calls[1]).images[0], dtype=np.int16)
    assert np.abs(np.asarray(pil.images[0], dtype=np.int16) - pil_alone).max() <= 1  # 8-bit rounding
    assert arr.images.shape == (1, 64, 64, 3) and "vae_decoder" in arr.timings
