"""The HTTP server over real HTTP on 127.0.0.1, against the tiny SD model: the OpenAI
client, /v1/generate, every bad input, batching, metrics, the API key.
Queue limits, faults and disconnects are in test_serve_limits.py."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_util import TINY, LiveServer, decode_npy, metric, until  # noqa: E402

FAST = {"num_inference_steps": 1, "scheduler": "euler"}


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"))
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def server(pipe):
    with LiveServer(pipe, max_batch=4, batch_wait_ms=20, max_n=3, max_steps=50, max_side=256) as live:
        yield live


def test_openai_client_generates_images(server):
    openai = pytest.importorskip("openai")
    from PIL import Image

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="tiny", prompt="a photo of a cat", n=2, size="64x64",
                                    response_format="b64_json")
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.BadRequestError, match="multiple of 8"):
        client.images.generate(model="tiny", prompt="a cat", size="60x64", response_format="b64_json")
    with pytest.raises(openai.BadRequestError, match="url"):
        client.images.generate(model="tiny", prompt="a cat", size="64x64", response_format="url")
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.images.generate(model="dall-e-3", prompt="a cat", size="64x64")


def test_generate_returns_images_seeds_settings_and_timings(server):
    from PIL import Image

    status, headers, body = server.post("/v1/generate", {"prompt": "a red car", "negative_prompt": "blur",
                                                         "guidance_scale": 5.0, "seed": 42, "n": 2, **TINY,
                                                         "output_format": "webp"})
    assert status == 200, body
    assert [im["seed"] for im in body["images"]] == [42, 43]
    assert {im["format"] for im in body["images"]} == {"webp"}
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]["b64"]))).format == "WEBP"
    assert body["settings"] == {"scheduler": "pndm", "num_inference_steps": 2, "guidance_scale": 5.0,
                                "height": 64, "width": 64, "scheduler_config": {}}
    assert body["timings"]["total"] > 0 and body["timings"]["denoiser_calls"] == 3  # PNDM: one call more
    assert body["model"] == "tiny" and headers["x-diffrt-replica"]
    # a preset resolves its own scheduler and steps
    status, _, body = server.post("/v1/generate", {"prompt": "a cat", "preset": "lcm-4step", "size": "64x64"})
    assert status == 200 and body["settings"]["scheduler"] == "lcm" and body["settings"]["num_inference_steps"] == 4


BAD_INPUTS = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": 3}, 400, "prompt"),
    ({"prompt": "x", "size": "60x64"}, 400, "size"),
    ({"prompt": "x", "size": "64"}, 400, "size"),
    ({"prompt": "x", "size": "512x1024"}, 400, "size"),  # over max_side 256
    ({"prompt": "x", "height": 0}, 400, "height"),
    ({"prompt": "x", "width": 4}, 400, "width"),
    ({"prompt": "x", "size": "64x64", "height": 64}, 400, "size"),
    ({"prompt": "x", "n": 4}, 400, "n"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 51}, 400, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2.5}, 400, "num_inference_steps"),
    ({"prompt": "x", "scheduler": "warp-drive"}, 400, "scheduler"),
    ({"prompt": "x", "preset": "sdxl-turbo"}, 400, "preset"),
    ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": 2**63}, 400, "seed"),
    ({"prompt": "x", "vae": "tiny"}, 400, "vae"),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format"),
    ({"prompt": "x", "stepz": 3}, 400, "stepz"),
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b"", 400, "body"),
    (json.dumps({"prompt": "x" * (2 << 20)}).encode(), 413, "body"),
]


@pytest.mark.parametrize("body,status,param", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param):
    got, _, answer = server.post("/v1/generate", body)
    assert got == status, answer
    assert answer["error"]["param"] == param, answer
    assert answer["error"]["message"] and "\n" not in answer["error"]["message"]


def test_openai_endpoint_bad_inputs(server):
    for body, param in (({"prompt": "x", "n": 9}, "n"), ({"prompt": "x", "size": "1x1"}, "size"),
                        ({"prompt": "x", "response_format": "url"}, "response_format"), ({"n": 1}, "prompt")):
        status, _, answer = server.post("/v1/images/generations", body)
        assert status == 400 and answer["error"]["param"] == param, answer
    status, _, answer = server.request("GET", "/v1/nothing-here")
    assert status == 404 and answer["error"]["code"] == "not_found"


def test_concurrent_requests_batch_and_equal_unbatched_results(pipe, server):
    calls = [{"prompt": "a cat", "seed": 1, "guidance_scale": 7.5, "n": 1},
             {"prompt": "a dog on a beach", "negative_prompt": "rain", "seed": 7, "guidance_scale": 3.0, "n": 2},
             {"prompt": "a tree", "seed": 2**40, "guidance_scale": 9.0, "n": 1}]
    results: dict[int, tuple] = {}

    def send(i):
        results[i] = server.post("/v1/generate", {**calls[i], **TINY, "output_format": "npy"})

    server.scheduler.pause()  # all three queue up before the worker looks: one batch of 4 images
    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        server.wait_for(lambda: server.scheduler.depth == len(calls), "all the requests to queue")
    finally:
        server.scheduler.resume()
    for t in threads:
        t.join(120)
    assert all(results[i][0] == 200 for i in range(len(calls))), results
    assert {results[i][2]["batch"]["images"] for i in range(len(calls))} == {4}  # one batch of 4 images
    for i, call in enumerate(calls):
        alone = pipe(call["prompt"], negative_prompt=call.get("negative_prompt"), num_inference_steps=2,
                     guidance_scale=call["guidance_scale"], height=64, width=64, seed=call["seed"],
                     num_images_per_prompt=call["n"], output_type="np")
        served = np.stack([decode_npy(im["b64"]) for im in results[i][2]["images"]])
        assert served.dtype == np.float32 and served.shape == alone.images.shape
        np.testing.assert_allclose(served, alone.images, atol=1e-6, rtol=0)


def test_metrics_count_requests_batches_stages_and_images(server):
    before = server.request("GET", "/metrics")[2]
    assert server.post("/v1/generate", {"prompt": "a cat", **TINY})[0] == 200
    assert server.post("/v1/generate", {"prompt": ""})[0] == 400
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    ok = metric(text, "diffrt_requests_total", endpoint="/v1/generate", status="200")
    assert ok - metric(before, "diffrt_requests_total", endpoint="/v1/generate", status="200") == 1
    assert metric(text, "diffrt_requests_total", endpoint="/v1/generate", status="400") >= 1
    assert metric(text, "diffrt_images_generated_total") - metric(before, "diffrt_images_generated_total") == 1
    assert metric(text, "diffrt_queue_depth") == 0 and metric(text, "diffrt_ready") == 1
    for name in ("diffrt_batch_images_count", "diffrt_request_seconds_count"):
        assert any(line.startswith(name) for line in text.splitlines()), name
    for stage in ("text_encoder", "denoiser", "vae_decoder", "total"):
        assert metric(text, "diffrt_stage_seconds_count", stage=stage) >= 1, stage


def test_jobs_report_progress_and_the_playground_page(server):
    status, _, page = server.request("GET", "/")
    assert status == 200 and "<title>diffrt playground</title>" in page
    status, _, job = server.post("/v1/jobs", {"prompt": "a cat", "num_inference_steps": 3, "size": "64x64"})
    assert status == 202 and job["status"] in ("queued", "running", "done")
    job_id = job["id"]
    job = until(lambda: (lambda j: j if j["status"] in ("done", "failed") else None)(
        server.request("GET", f"/v1/jobs/{job_id}")[2]), 120, "the job to end")
    assert job["status"] == "done" and (job["step"], job["total"]) == (3, 3)
    assert len(job["result"]["images"]) == 1
    assert server.request("GET", "/v1/jobs/job-0-none")[0] == 404


def test_health_and_readiness(server):
    assert server.request("GET", "/healthz")[:3:2] == (200, {"status": "alive"})
    status, _, body = server.request("GET", "/readyz")
    assert status == 200 and body["status"] == "ready"


def test_api_key_guards_all_but_health(pipe):
    openai = pytest.importorskip("openai")
    with LiveServer(pipe, api_key="s3cret", warmup=False) as live:
        for path in ("/v1/models", "/metrics"):
            status, headers, body = live.request("GET", path)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", path
            assert live.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert live.request("GET", path, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert live.post("/v1/generate", {"prompt": "x", **FAST})[0] == 401
        assert live.request("GET", "/healthz")[0] == 200 and live.request("GET", "/readyz")[0] == 200
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        assert len(client.images.generate(prompt="a cat", size="64x64", response_format="b64_json").data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="nope", max_retries=0).models.list()
