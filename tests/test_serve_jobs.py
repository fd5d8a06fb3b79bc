"""The jobs store (issue 15, item 4), over real HTTP on 127.0.0.1: a job is private
to the API key that created it; each key's results are bounded by count, bytes and
age, and one key's jobs never evict another's."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer, until  # noqa: E402

JOB = {"num_inference_steps": 1, "scheduler": "euler", "size": "64x64", "output_format": "npy"}
A, B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"))
    yield pipeline
    pipeline.close()


def _finished(live, key: dict, prompt: str) -> dict:
    """Start a job and poll it (bounded) until it has ended."""
    status, _, job = live.post("/v1/jobs", {"prompt": prompt, **JOB}, headers=key)
    assert status == 202, job
    return until(lambda: _ended(live, key, job["id"]), 120, f"job {prompt!r} to end")


def _ended(live, key: dict, job_id: str) -> dict | None:
    status, _, job = live.request("GET", f"/v1/jobs/{job_id}", headers=key)
    assert status == 200, job
    return job if job["status"] in ("done", "failed", "cancelled") else None


def _kept(live, key: dict, job_id: str) -> bool:
    status, _, answer = live.request("GET", f"/v1/jobs/{job_id}", headers=key)
    assert status in (200, 404), answer
    return status == 200


def test_a_job_is_visible_only_to_the_key_that_made_it(pipe):
    with LiveServer(pipe, api_keys=("key-a", "key-b"), warmup=False) as live:
        job = _finished(live, A, "a cat")
        assert len(job["result"]["images"]) == 1
        status, _, answer = live.request("GET", f"/v1/jobs/{job['id']}", headers=B)
        assert status == 404 and answer["error"]["code"] == "job_not_found"  # as if it did not exist
        assert live.request("GET", f"/v1/jobs/{job['id']}")[0] == 401  # no key at all


def test_each_key_has_its_own_count_and_byte_budget(pipe):
    with LiveServer(pipe, api_keys=("key-a", "key-b"), max_jobs=2, warmup=False) as live:
        b_job = _finished(live, B, "b's only job")
        assert b_job["status"] == "done", b_job
        a_jobs = [_finished(live, A, f"a's job {i}") for i in range(3)]
        assert [_kept(live, A, j["id"]) for j in a_jobs] == [False, True, True]  # A's oldest made room
        assert _kept(live, B, b_job["id"])  # A's jobs never evict B's

    one = len(b_job["result"]["images"][0]["b64"])  # the size of one kept result
    with LiveServer(pipe, api_keys=("key-a", "key-b"), max_job_bytes=int(1.5 * one), warmup=False) as live:
        b_job = _finished(live, B, "b's only job")
        first, second = _finished(live, A, "a's first"), _finished(live, A, "a's second")
        assert not _kept(live, A, first["id"]) and _kept(live, A, second["id"])  # two would not fit
        assert _kept(live, B, b_job["id"])

    with LiveServer(pipe, max_job_bytes=one // 2, warmup=False) as live:  # a result larger than the budget
        job = _finished(live, {}, "too big")
        assert job["status"] == "failed" and job["error"]["code"] == "result_too_large", job


def test_finished_jobs_are_forgotten_after_their_age(pipe):
    now = [1000.0]
    with LiveServer(pipe, job_ttl_s=60, warmup=False) as live:
        live.state.jobs.clock = lambda: now[0]  # the store's clock, not the wall's
        job = _finished(live, {}, "a cat")
        now[0] += 59
        assert _kept(live, {}, job["id"])
        now[0] += 2
        assert not _kept(live, {}, job["id"])


def test_a_key_with_all_its_jobs_in_flight_gets_429(pipe):
    with LiveServer(pipe, max_jobs=1, warmup=False) as live:
        live.scheduler.pause()  # the first job stays queued
        try:
            assert live.post("/v1/jobs", {"prompt": "first", **JOB})[0] == 202
            status, headers, answer = live.post("/v1/jobs", {"prompt": "second", **JOB})
            assert status == 429 and answer["error"]["code"] == "too_many_jobs" and "retry-after" in headers
        finally:
            live.scheduler.resume()
