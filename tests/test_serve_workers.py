"""`diffrt serve --workers N`: N worker threads, each on its own contexts of one copy of
the weights, take batches from the one queue, over real HTTP on 127.0.0.1. Two batches
run at the same time (each waits inside the pipeline until the other is there too: a
barrier, not a time window), their images are a single worker's, and the queue's rules
(cancellation between steps, a failing batch re-run one request at a time) hold for
every worker."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer, decode_npy, in_thread, joined  # noqa: E402

FAST = {"num_inference_steps": 2, "scheduler": "euler", "size": "64x64", "output_format": "npy"}
POISON = "\ud800x"


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"), workers=2)
    yield pipeline
    pipeline.close()


class Gated:
    """A pipeline view whose batches wait at `meet` (a barrier of two) before they run:
    two batches get past it only if they are inside `generate` at the same time. Its
    `worker()` views share the barrier and record where each batch ran."""

    def __init__(self, pipe, meet: threading.Barrier, ran: list):
        self.pipe, self.manifest, self.meet, self.ran = pipe, pipe.manifest, meet, ran

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def worker(self):
        return Gated(self.pipe.worker(), self.meet, self.ran)

    def generate(self, requests, progress=None):
        self.meet.wait()  # a broken barrier (timeout) fails the batch, and the test
        self.ran.append((id(self.pipe), threading.get_ident(), [r.prompts[0] for r in requests]))
        return self.pipe.generate(requests, progress)


def _post_all(live, bodies):
    calls = [in_thread(live.post, "/v1/generate", body) for body in bodies]
    return [joined(call) for call in calls]


def test_two_workers_run_two_batches_at_once_with_a_single_workers_images(pipe):
    bodies = [{"prompt": "a red cat", "seed": 1, **FAST}, {"prompt": "a blue dog", "seed": 2, **FAST}]
    ran: list = []
    gated = Gated(pipe, threading.Barrier(2, timeout=60), ran)
    with LiveServer(gated, workers=2, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        assert len(live.state.views) == 1  # the pipeline itself, and one view on its models
        answers = _post_all(live, bodies)
    assert [a[0] for a in answers] == [200, 200], answers
    assert len({view for view, _, _ in ran}) == 2 and len({thread for _, thread, _ in ran}) == 2, ran
    with LiveServer(pipe, workers=1, max_batch=1, batch_wait_ms=0, warmup=False) as live:
        single = [live.post("/v1/generate", body) for body in bodies]
    for two, one in zip(answers, single, strict=True):
        assert one[0] == 200
        np.testing.assert_array_equal(decode_npy(two[2]["images"][0]["b64"]), decode_npy(one[2]["images"][0]["b64"]))


def test_a_failing_batch_is_rerun_one_by_one_by_its_worker_while_the_other_works(pipe):
    """Worker A runs a batch with a bad request in it (the smuggled surrogate); worker B
    runs another batch meanwhile. A re-runs its requests alone: only the bad one fails."""
    started, release = threading.Event(), threading.Event()
    batches: list = []

    class Smuggler:
        def __init__(self, view):
            self.view, self.manifest = view, view.manifest

        def __getattr__(self, name):
            return getattr(self.view, name)

        def worker(self):
            return Smuggler(self.view.worker())

        def generate(self, requests, progress=None):
            prompts = [r.prompts[0] for r in requests]
            batches.append(prompts)
            if prompts == ["held"]:
                started.set()
                assert release.wait(60)
            requests = [dataclasses.replace(r, prompts=(POISON,)) if r.prompts == ("POISON",) else r
                        for r in requests]
            return self.view.generate(requests, progress)

    with LiveServer(Smuggler(pipe), workers=2, max_batch=4, batch_wait_ms=0, warmup=False) as live:
        held = in_thread(live.post, "/v1/generate", {"prompt": "held", "seed": 0, **{**FAST, "size": "64x48"}})
        assert started.wait(60)  # one worker busy with another key's batch
        live.scheduler.pause()
        calls = []
        for i, prompt in enumerate(["a red cat", "POISON", "a blue dog"]):
            calls.append(in_thread(live.post, "/v1/generate", {"prompt": prompt, "seed": i, **FAST}))
            live.wait_for(lambda: live.scheduler.depth == i + 1, f"request {i} to queue")
        live.scheduler.resume()
        good1, bad, good2 = (joined(call) for call in calls)
        release.set()
        assert joined(held)[0] == 200
    assert bad[0] == 400 and "surrogate" in bad[2]["error"]["message"], bad
    assert good1[0] == good2[0] == 200
    assert batches[1:] == [["a red cat", "POISON", "a blue dog"], ["a red cat"], ["POISON"], ["a blue dog"]]
    alone = pipe("a red cat", seed=0, num_inference_steps=2, scheduler="euler", height=64, width=64,
                 output_type="np").images
    np.testing.assert_array_equal(decode_npy(good1[2]["images"][0]["b64"]), alone[0])


def test_workers_share_the_queue_and_its_cancellation():
    """Two runners on one queue: each takes a batch while the other still runs one
    (both are inside their runner at once), and an abandoned batch stops between steps
    on whichever worker runs it."""
    from diffrt.serve.batching import BatchScheduler, Cancelled

    meet = threading.Barrier(2, timeout=60)
    at_step_1, go_on = threading.Event(), threading.Event()
    seen: list = []

    def runner(name):
        def run(calls, progress):
            meet.wait()
            for step in (1, 2, 3):
                seen.append((name, calls[0]["prompt"], step))
                if calls[0]["prompt"] == "slow" and step == 1:
                    at_step_1.set()
                    assert go_on.wait(60)
                progress(step, 3)
            return [c["prompt"] for c in calls]
        return run

    async def main():
        scheduler = BatchScheduler([runner("a"), runner("b")], max_batch=1, batch_wait_ms=0)
        assert scheduler.workers == 2
        scheduler.start()
        slow = scheduler.submit({"prompt": "slow"}, "k1", 1)
        fast = scheduler.submit({"prompt": "fast"}, "k2", 1)
        assert await asyncio.to_thread(at_step_1.wait, 60)
        assert await asyncio.wait_for(fast.future, 60) == "fast"  # done while "slow" is held
        scheduler.cancel(slow)
        go_on.set()
        with pytest.raises((Cancelled, asyncio.CancelledError)):
            await asyncio.wait_for(slow.future, 60)
        await asyncio.to_thread(scheduler.stop, 60)
        return slow

    slow = asyncio.run(main())
    assert slow.abandoned and slow.state == "cancelled"
    slow_steps = [step for _, prompt, step in seen if prompt == "slow"]
    assert slow_steps == [1]  # stopped after the step in flight
    assert {name for name, _, _ in seen} == {"a", "b"}
