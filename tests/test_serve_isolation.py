"""One request must never fail or hold up another (issue 15, items 1-2), over real
HTTP on 127.0.0.1: text the tokenizer cannot take is refused at submission; a request
that still fails inside a batch fails alone (its batch mates are re-run one by one and
get the images they get alone); abandoned work (timed out, client gone) stops between
denoiser steps; a per-request cost limit answers 400 before queueing. Every wait is on
a state (a gate, the queue), never on time passing."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer, decode_npy, in_thread, joined, metric  # noqa: E402

FAST = {"num_inference_steps": 1, "scheduler": "euler", "size": "64x64"}
POISON = "\ud800x"  # a lone UTF-16 surrogate: valid JSON ("\ud800x"), not encodable text


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"))
    yield pipeline
    pipeline.close()


class Smuggler:
    """The real pipeline, except that a call whose prompt is "POISON" reaches it with
    the surrogate prompt: a bad request that got past the server's checks."""

    def __init__(self, pipe):
        self.pipe, self.manifest = pipe, pipe.manifest
        self.batches: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, requests, progress=None):
        self.batches.append([r.prompts[0] for r in requests])
        requests = [dataclasses.replace(r, prompts=(POISON,)) if r.prompts == ("POISON",) else r for r in requests]
        return self.pipe.generate(requests, progress)


class Stepper:
    """The real pipeline, holding its first denoiser step until `proceed` is set, and
    recording the steps it made."""

    def __init__(self, pipe):
        self.pipe, self.manifest = pipe, pipe.manifest
        self.reached, self.proceed = threading.Event(), threading.Event()
        self.steps: list[int] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, requests, progress=None):
        def step(done, total):
            self.steps.append(done)
            if len(self.steps) == 1:
                self.reached.set()
                assert self.proceed.wait(60)
            progress(done, total)

        return self.pipe.generate(requests, step)


def _raw_json(path: str, text: str, port: int, extra: str = "") -> tuple[int, dict]:
    """POST a body whose prompt is `text` written as JSON escapes (json.dumps keeps a
    lone surrogate as the escape \\ud800, as a client's JSON would)."""
    from serve_util import request

    body = ('{"prompt": %s%s}' % (json.dumps(text), extra)).encode()
    status, _, answer = request(port, "POST", path, body)
    return status, answer


def test_text_the_tokenizer_cannot_take_is_refused_at_submission(pipe):
    with LiveServer(pipe, warmup=False) as live:
        for path in ("/v1/generate", "/v1/images/generations", "/v1/jobs"):
            status, answer = _raw_json(path, POISON, live.port, ', "size": "64x64"')
            assert status == 400 and answer["error"]["param"] == "prompt", (path, answer)
            assert "surrogate" in answer["error"]["message"]
        status, answer = _raw_json("/v1/generate", "a cat", live.port, f', "negative_prompt": {json.dumps(POISON)}')
        assert status == 400 and answer["error"]["param"] == "negative_prompt", answer
        assert metric(live.request("GET", "/metrics")[2], "diffrt_batch_requests_count") == 0  # nothing ran
    # and the runtime refuses it in one line too (the CLI, the Python API), not with a TypeError
    from diffrt.errors import DiffrtError

    with pytest.raises(DiffrtError, match="surrogate"):
        pipe(POISON, num_inference_steps=1, output_type="np")


def test_a_request_failing_inside_a_batch_fails_alone(pipe):
    smuggler = Smuggler(pipe)
    prompts = ["a red cat", "POISON", "a blue dog"]
    with LiveServer(smuggler, max_batch=4, batch_wait_ms=0, warmup=False) as live:
        live.scheduler.pause()  # the three queue up, then run as one batch
        calls = []
        for i, prompt in enumerate(prompts):
            calls.append(in_thread(live.post, "/v1/generate", {"prompt": prompt, "seed": i, **FAST,
                                                                 "output_format": "npy"}))
            live.wait_for(lambda: live.scheduler.depth == i + 1, f"request {i} to queue")
        live.scheduler.resume()
        good1, bad, good2 = (joined(c) for c in calls)
        assert bad[0] == 400 and "surrogate" in bad[2]["error"]["message"], bad
        assert good1[0] == 200 and good2[0] == 200, (good1, good2)
        assert smuggler.batches == [prompts, ["a red cat"], ["POISON"], ["a blue dog"]]
        for i, answer in ((0, good1), (2, good2)):  # the images they get alone
            alone = pipe(prompts[i], seed=i, num_inference_steps=1, scheduler="euler", height=64, width=64,
                         output_type="np").images
            np.testing.assert_array_equal(decode_npy(answer[2]["images"][0]["b64"]), alone[0])

        # the same through the OpenAI endpoint (the artifact's default settings: one key)
        live.scheduler.pause()
        smuggler.batches.clear()
        calls = []
        for i, prompt in enumerate(prompts):
            calls.append(in_thread(live.post, "/v1/images/generations", {"prompt": prompt, "size": "64x64"}))
            live.wait_for(lambda: live.scheduler.depth == i + 1, f"request {i} to queue")
        live.scheduler.resume()
        statuses = [joined(c)[0] for c in calls]
        assert statuses == [200, 400, 200], statuses
        assert smuggler.batches[0] == prompts and len(smuggler.batches) == 4


def test_a_timed_out_request_stops_between_denoiser_steps(pipe):
    stepper = Stepper(pipe)
    with LiveServer(stepper, timeout_s=1.0, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        slow = in_thread(live.post, "/v1/generate", {"prompt": "a cat", "num_inference_steps": 30,
                                                     "scheduler": "euler", "size": "64x64"})
        assert stepper.reached.wait(60)
        status, _, body = joined(slow)  # answered at the timeout while its first step is held
        assert status == 504 and body["error"]["code"] == "timeout"
        stepper.proceed.set()
        live.wait_for(lambda: not live.scheduler.running, "the abandoned batch to stop")
        assert stepper.steps == [1]  # 30 steps asked for: it stopped after the one in flight
        text = live.request("GET", "/metrics")[2]
        assert metric(text, "diffrt_batches_cancelled_total") == 1
        assert metric(text, "diffrt_batch_failures_total") == 0
        assert live.post("/v1/generate", {"prompt": "next", **FAST})[0] == 200  # the worker is free


def test_a_client_leaving_mid_generation_stops_its_work(pipe):
    stepper = Stepper(pipe)
    with LiveServer(stepper, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        body = json.dumps({"prompt": "a cat", "num_inference_steps": 30, "scheduler": "euler",
                           "size": "64x64"}).encode()
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert stepper.reached.wait(60)
        live.wait_for(lambda: live.scheduler.running and live.scheduler.running[0].abandoned,
                      "the server to see the client leave")
        stepper.proceed.set()
        live.wait_for(lambda: not live.scheduler.running, "the abandoned batch to stop")
        assert stepper.steps == [1]
        text = live.request("GET", "/metrics")[2]
        assert metric(text, "diffrt_batches_cancelled_total") == 1
        assert metric(text, "diffrt_requests_total", endpoint="/v1/generate", status="499") == 1


def test_a_batch_runs_on_while_any_of_its_requests_is_wanted():
    import asyncio

    from diffrt.serve.batching import BatchScheduler

    steps: list[int] = []
    at_step_2, go_on = threading.Event(), threading.Event()

    def runner(calls, callback):
        for step in range(1, 5):
            steps.append(step)
            if step == 2:
                at_step_2.set()
                assert go_on.wait(60)
            callback(step, 4)
        return [c["prompt"] for c in calls]

    async def main():
        scheduler = BatchScheduler(runner, max_batch=2, batch_wait_ms=0)
        scheduler.pause()
        scheduler.start()
        first, second = (scheduler.submit({"prompt": p}, "k", 1) for p in ("first", "second"))
        scheduler.resume()
        assert await asyncio.to_thread(at_step_2.wait, 60)
        scheduler.cancel(first)  # one of two abandoned: the batch goes on for the other
        go_on.set()
        result = await asyncio.wait_for(second.future, 60)
        await asyncio.to_thread(scheduler.stop, 60)
        return result, first

    result, first = asyncio.run(main())
    assert result == "second" and steps == [1, 2, 3, 4] and first.abandoned


def test_the_cost_limit_answers_400_before_queueing(pipe):
    stepper = Stepper(pipe)
    stepper.proceed.set()
    limit = 2 * 64 * 64 / 1e6  # two steps of one 64x64 image, in megapixel-steps
    with LiveServer(stepper, max_cost=limit, warmup=False) as live:
        defaults = live.request("GET", "/v1/models")[2]["data"][0]["defaults"]
        assert defaults["num_inference_steps"] * defaults["height"] * defaults["width"] / 1e6 > limit
        for path, body in (("/v1/generate", {"prompt": "x", "num_inference_steps": 3, "size": "64x64"}),
                           ("/v1/generate", {"prompt": "x", "num_inference_steps": 2, "size": "64x64", "n": 2}),
                           ("/v1/generate", {"prompt": "x", "num_inference_steps": 1, "size": "128x128"}),
                           ("/v1/generate", {"prompt": "x", "size": "64x64"}),  # the default steps
                           ("/v1/jobs", {"prompt": "x", "size": "64x64"}),
                           ("/v1/images/generations", {"prompt": "x"})):  # the OpenAI endpoint: all defaults
            status, _, answer = live.post(path, body)
            assert status == 400 and answer["error"]["code"] == "request_too_large", (path, body, answer)
            assert "megapixel-steps" in answer["error"]["message"]
        assert stepper.steps == []  # none of them ran
        status, _, answer = live.post("/v1/generate", {"prompt": "x", "num_inference_steps": 2, "size": "64x64"})
        assert status == 200, answer  # exactly at the limit
