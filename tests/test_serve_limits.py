"""Server limits and failures over real HTTP: a full queue (429), the per-request
timeout (504), a client that leaves before its batch, a fault inside one batch; and
the batching scheduler's queue order (fair across keys)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer, metric  # noqa: E402

FAST = {"num_inference_steps": 1, "scheduler": "euler", "size": "64x64"}


class Gated:
    """A pipeline whose batches wait for `gate`, are recorded, and raise on a prompt
    containing `fail_on` (an injected fault)."""

    def __init__(self, pipe, fail_on: str | None = None):
        self.pipe, self.manifest, self.fail_on = pipe, pipe.manifest, fail_on
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[str]] = []

    def batch_key(self, **call):
        return self.pipe.batch_key(**call)

    def generate_batch(self, calls, callback=None):
        assert self.gate.wait(60)
        self.batches.append([c["prompt"] for c in calls])
        if self.fail_on and any(self.fail_on in c["prompt"] for c in calls):
            raise RuntimeError("injected fault")
        return self.pipe.generate_batch(calls, callback)


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"))
    yield pipeline
    pipeline.close()


def _until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _in_thread(fn, *args):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn(*args)))
    thread.start()
    return thread, out


def test_full_queue_answers_429_with_retry_after(pipe):
    gated = Gated(pipe)
    with LiveServer(gated, max_queue=1, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        gated.gate.clear()
        first = _in_thread(live.post, "/v1/generate", {"prompt": "first", **FAST})
        _until(lambda: live.state.scheduler.running)
        second = _in_thread(live.post, "/v1/generate", {"prompt": "second", **FAST})
        _until(lambda: live.state.scheduler.depth == 1)
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
        running = _in_thread(live.post, "/v1/generate", {"prompt": "running", **FAST})
        _until(lambda: live.state.scheduler.running)
        t0 = time.monotonic()
        status, _, body = live.post("/v1/generate", {"prompt": "queued", **FAST})
        assert status == 504 and body["error"]["code"] == "timeout" and time.monotonic() - t0 < 5
        assert live.state.scheduler.depth == 0  # the queued one left the queue
        running[0].join(30)
        assert running[1]["r"][0] == 504  # the running one too: its answer came past the timeout
        gated.gate.set()
        _until(lambda: not live.state.scheduler.running)
        assert gated.batches == [["running"]]  # "queued" never ran


def test_client_leaving_before_its_batch_frees_its_slot(pipe):
    gated = Gated(pipe)
    with LiveServer(gated, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        gated.gate.clear()
        running = _in_thread(live.post, "/v1/generate", {"prompt": "running", **FAST})
        _until(lambda: live.state.scheduler.running)
        body = b'{"prompt": "abandoned", "num_inference_steps": 1, "size": "64x64"}'
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            _until(lambda: live.state.scheduler.depth == 1)
        _until(lambda: live.state.scheduler.depth == 0, timeout=10)  # dropped once the client was gone
        gated.gate.set()
        running[0].join(60)
        assert running[1]["r"][0] == 200
        time.sleep(0.3)
        assert gated.batches == [["running"]]


def test_a_fault_in_one_batch_fails_only_that_batch(pipe):
    gated = Gated(pipe, fail_on="boom")
    with LiveServer(gated, max_batch=4, batch_wait_ms=300, warmup=False) as live:
        # the same key batches together; another key (another size) is another batch
        boom = _in_thread(live.post, "/v1/generate", {"prompt": "boom", **FAST})
        mate = _in_thread(live.post, "/v1/generate", {"prompt": "batch mate", **FAST})
        other = _in_thread(live.post, "/v1/generate", {"prompt": "other", **{**FAST, "size": "32x32"}})
        for thread, _ in (boom, mate, other):
            thread.join(60)
        status, _, body = boom[1]["r"]
        assert status == 500 and body["error"]["code"] == "generation_failed" and "injected fault" in \
            body["error"]["message"]
        assert mate[1]["r"][0] == 500  # it shared the failed batch
        assert other[1]["r"][0] == 200
        assert live.post("/v1/generate", {"prompt": "after", **FAST})[0] == 200  # still serving
        assert live.request("GET", "/readyz")[0] == 200
        assert metric(live.request("GET", "/metrics")[2], "diffrt_batch_failures_total") == 1
        assert sorted(map(sorted, gated.batches))[:2] == [["after"], ["batch mate", "boom"]]


def test_queue_order_is_round_robin_across_keys():
    from diffrt.serve.batching import BatchScheduler

    ran: list[list[str]] = []
    release = threading.Event()

    def runner(calls, callback):
        release.wait(10)
        ran.append([c["prompt"] for c in calls])
        return [c["prompt"] for c in calls]

    async def main():
        scheduler = BatchScheduler(runner, max_batch=2, batch_wait_ms=0, max_queue=16)
        scheduler.start()
        blocker = scheduler.submit({"prompt": "z0"}, "Z", 1)  # holds the worker while the rest queue up
        while not scheduler.running:
            await asyncio.sleep(0.01)
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
