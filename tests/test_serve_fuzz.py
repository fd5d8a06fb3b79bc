"""Property-based fuzz of the API schema (hypothesis): any JSON body, valid or not,
gets a 2xx or 4xx, never a 5xx. Bounded: a fixed number of examples, tiny limits."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serve_util import LiveServer  # noqa: E402

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), max_size=2))
FIELDS = {
    "prompt": st.one_of(st.text(max_size=40), junk),
    "negative_prompt": st.one_of(st.text(max_size=20), junk),
    "num_inference_steps": st.one_of(st.integers(-2, 3), junk),
    "guidance_scale": st.one_of(st.floats(-2, 20), junk),
    "seed": st.one_of(st.integers(-5, 2**64), junk),
    "scheduler": st.one_of(st.sampled_from(["euler", "ddim", "lcm", "pndm", "nope"]), junk),
    "preset": st.one_of(st.sampled_from(["lcm-4step", "full-30step", "x"]), junk),
    "size": st.one_of(st.sampled_from(["8x8", "16x8", "32x32", "64x64", "7x8", "0x8", "x", "99999999x8"]), junk),
    "height": st.one_of(st.integers(-8, 40), junk),
    "width": st.one_of(st.integers(-8, 40), junk),
    "n": st.one_of(st.integers(-1, 3), junk),
    "output_format": st.one_of(st.sampled_from(["png", "jpeg", "webp", "npy", "gif"]), junk),
    "vae": st.one_of(st.sampled_from(["default", "tiny"]), junk),
    "response_format": st.one_of(st.sampled_from(["b64_json", "url"]), junk),
    "model": st.one_of(st.sampled_from(["tiny", "other"]), junk),
    "zzz": junk,
}
mostly_valid = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=20), "size": st.sampled_from(["8x8", "16x8", "32x32"]),
     "num_inference_steps": st.integers(1, 2)},
    optional={"seed": st.integers(0, 2**63 - 2), "guidance_scale": st.floats(0, 20), "n": st.integers(1, 2),
              "scheduler": st.sampled_from(["euler", "ddim", "lcm", "pndm", "euler_ancestral", "dpmpp_2m_karras"]),
              "output_format": st.sampled_from(["png", "jpeg", "webp", "npy"]), "negative_prompt": st.text(max_size=9)})
bodies = st.one_of(
    mostly_valid,
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)},
                          optional={k: v for k, v in FIELDS.items() if k != "prompt"}),
    st.dictionaries(st.sampled_from(sorted(FIELDS)), junk, max_size=4),
    junk,
)


@pytest.fixture(scope="module")
def server(exported):
    from diffrt.runtime.pipeline import Pipeline

    with Pipeline.load(exported("sd15")) as pipe, \
            LiveServer(pipe, max_steps=3, max_side=32, max_n=2, warmup=False, timeout_s=60) as live:
        yield live


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/generate", "/v1/images/generations", "/v1/jobs"]), body=bodies)
def test_no_body_makes_a_5xx(server, path, body):
    try:
        data = json.dumps(body, allow_nan=True).encode()
    except (TypeError, ValueError):
        data = b"{"
    status, _, answer = server.post(path, data)
    hypothesis.event(f"status {status}")
    assert status < 500, (path, body, answer)
    if status >= 400:
        assert answer["error"]["message"], answer
