"""Server limits and failures over real HTTP: a full queue (429), the per-request
timeout (504), a client that leaves before its batch, a fault inside one batch; and
the batching scheduler's queue order (fair across keys). Every wait is on a state
(a gate, the queue's depth), never on time passing."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer, in_thread, joined, metric, until  # noqa: E402

FAST = {"num_inference_steps": 1, "scheduler": "euler", "size": "64x64"}


class Gated:
    """A pipeline whose batches wait for `gate`, are recorded, and raise on a prompt
    containing `fail_on` (an injected fault)."""

    def __init__(self, pipe, fail_on: str | None = None):
        self.pipe, self.manifest, self.fail_on = pipe, pipe.manifest, fail_on
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[str]] = []

    def __getattr__(self, name):  # resolve, presets, ...: the real pipeline's
        return getattr(self.pipe, name)

    def generate(self, requests, progress=None):
        assert self.gate.wait(60)
        self.batches.append([r.prompts[0] for r in requests])
        if self.fail_on and any(self.fail_on in r.prompts[0] for r in requests):
            raise RuntimeError("injected fault")
        return self.pipe.generate(requests, progress)


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"))
    yield pipeline
    pipeline.close()


def test_full_queue_answers_429_with_retry_after(pipe):
    gated = Gated(pipe)
    with LiveServer(gated, max_queue=1, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        gated.gate.clear()
        first = in_thread(live.post, "/v1/generate", {"prompt": "first", **FAST})
        until(lambda: live.state.scheduler.running)
        second = in_thread(live.post, "/v1/generate", {"prompt": "second", **FAST})
        until(lambda: live.state.scheduler.depth == 1)
        status, headers, body = live.post("/v1/generate", {"prompt": "third", **FAST})
        assert status == 429 and body["error"]["code"] == "queue_full"
        assert int(headers["retry-after"]) >= 1
        gated.gate.set()
        for thread, out in (first, second):
            thread.join(60)
            assert out["r"][0] == 200
        assert live.post("/v1/generate", {"prompt": "fourth", **FAST})[0] == 200  # room again


def test_timeout_answers_504_and_frees_the_slot(pipe):
    gated = Gated(pipe)
    with LiveServer(gated, timeout_s=1.0, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        gated.gate.clear()
        running = in_thread(live.post, "/v1/generate", {"prompt": "running", **FAST})
        until(lambda: live.state.scheduler.running)
        status, _, body = live.post("/v1/generate", {"prompt": "queued", **FAST})
        assert status == 504 and body["error"]["code"] == "timeout"
        assert live.state.scheduler.depth == 0  # the queued one left the queue
        assert joined(running)[0] == 504  # the running one too: its answer came past the timeout
        gated.gate.set()
        live.wait_for(lambda: not live.scheduler.running, "the worker to finish")
        assert gated.batches == [["running"]]  # "queued" never ran


def test_client_leaving_before_its_batch_frees_its_slot(pipe):
    gated = Gated(pipe)
    with LiveServer(gated, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        gated.gate.clear()
        running = in_thread(live.post, "/v1/generate", {"prompt": "running", **FAST})
        until(lambda: live.state.scheduler.running)
        body = b'{"prompt": "abandoned", "num_inference_steps": 1, "size": "64x64"}'
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            live.wait_for(lambda: live.scheduler.depth == 1, "the request to queue")
        live.wait_for(lambda: live.scheduler.depth == 0, "the abandoned request to leave the queue")
        gated.gate.set()
        assert joined(running)[0] == 200
        # the abandoned request left the queue before the worker was free: it can never run
        assert gated.batches == [["running"]]


def test_a_fault_in_one_request_fails_only_that_request(pipe):
    gated = Gated(pipe, fail_on="boom")
    with LiveServer(gated, max_batch=4, batch_wait_ms=0, warmup=False) as live:
        # the same key batches together; another key (another size) is another batch
        live.scheduler.pause()
        boom = in_thread(live.post, "/v1/generate", {"prompt": "boom", **FAST})
        live.wait_for(lambda: live.scheduler.depth == 1, "boom to queue")
        mate = in_thread(live.post, "/v1/generate", {"prompt": "batch mate", **FAST})
        live.wait_for(lambda: live.scheduler.depth == 2, "its mate to queue")
        other = in_thread(live.post, "/v1/generate", {"prompt": "other", **{**FAST, "size": "32x32"}})
        live.wait_for(lambda: live.scheduler.depth == 3, "all three to queue")
        live.scheduler.resume()
        status, _, body = joined(boom)
        assert status == 500 and body["error"]["code"] == "generation_failed" and "injected fault" in \
            body["error"]["message"]
        assert joined(mate)[0] == 200  # it shared the failed batch, then ran alone
        assert joined(other)[0] == 200
        assert live.post("/v1/generate", {"prompt": "after", **FAST})[0] == 200  # still serving
        assert live.request("GET", "/readyz")[0] == 200
        # the shared batch failed, then each of its requests ran alone: boom failed again
        assert metric(live.request("GET", "/metrics")[2], "diffrt_batch_failures_total") == 2
        assert gated.batches == [["boom", "batch mate"], ["boom"], ["batch mate"], ["other"], ["after"]]


def test_queue_order_is_round_robin_across_keys():
    from diffrt.serve.batching import BatchScheduler

    ran: list[list[str]] = []
    release = threading.Event()

    def runner(calls, callback):
        assert release.wait(60)
        ran.append([c["prompt"] for c in calls])
        return [c["prompt"] for c in calls]

    async def main():
        scheduler = BatchScheduler(runner, max_batch=2, batch_wait_ms=0, max_queue=16)
        scheduler.start()
        blocker = scheduler.submit({"prompt": "z0"}, "Z", 1)  # holds the worker while the rest queue up
        assert await asyncio.to_thread(scheduler.wait_for, lambda: scheduler.running, 30)
        jobs = [scheduler.submit({"prompt": p}, p[0], n) for p, n in
                (("a1", 1), ("a2", 1), ("a3", 1), ("a4", 1), ("a5", 1), ("b1", 1), ("c1", 2), ("c2", 1))]
        release.set()
        results = await asyncio.gather(blocker.future, *(j.future for j in jobs))
        await asyncio.to_thread(scheduler.stop, 10)
        return results

    results = asyncio.run(main())
    assert results[1:] == ["a1", "a2", "a3", "a4", "a5", "b1", "c1", "c2"]
    # groups in order of their oldest request, then round-robin; a batch holds <= 2 images
    assert ran == [["z0"], ["a1", "a2"], ["b1"], ["c1"], ["a3", "a4"], ["c2"], ["a5"]]
