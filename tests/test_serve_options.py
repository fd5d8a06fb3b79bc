"""A model family's own options over HTTP (`options` in /v1/generate): the served image
equals the pipeline's with the same option, an option the family does not take is a
400 naming it, a core parameter given as an option is refused, and option text gets
the prompt's checks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer, decode_npy  # noqa: E402

FAST = {"num_inference_steps": 2, "scheduler": "euler", "size": "64x64", "seed": 3, "output_format": "npy"}


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"))
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def server(pipe):
    with LiveServer(pipe, max_prompt_chars=100, warmup=False) as live:
        yield live


def test_clip_skip_over_http_is_the_pipelines_and_changes_the_image(server, pipe):
    status, _, body = server.post("/v1/generate", {"prompt": "a red cat", **FAST, "options": {"clip_skip": 1}})
    assert status == 200, body
    served = decode_npy(body["images"][0]["b64"])
    expected = pipe("a red cat", num_inference_steps=2, scheduler="euler", height=64, width=64, seed=3,
                    clip_skip=1, output_type="np").images[0]
    plain = pipe("a red cat", num_inference_steps=2, scheduler="euler", height=64, width=64, seed=3,
                 output_type="np").images[0]
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert np.abs(served - plain).max() > 1e-4  # the option reached the text encoder


@pytest.mark.parametrize(("options", "fragment"), [
    ({"prompt_2": "a dog"}, "prompt_2: not an option of this Stable Diffusion 1.x/2.x artifact"),
    ({"clip_skip": 99}, "clip_skip"),
    ({"seed": 4}, "options.seed: seed is a request field of its own"),
    ({"clip_skip": "\ud800"}, "options.clip_skip is not valid text"),
])
def test_bad_options_are_400s(server, options, fragment):
    status, _, body = server.post("/v1/generate", {"prompt": "a red cat", **FAST, "options": options})
    assert status == 400, body
    assert fragment in body["error"]["message"], body
