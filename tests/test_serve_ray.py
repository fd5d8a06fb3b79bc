"""`diffrt serve --ray`: two Ray Serve replicas of the tiny model on a local cluster.
Requests spread over both; killing one replica's process under load loses no accepted
request (each is answered, or retried by the client when the proxy reports the dead
replica), and the deployment recovers to two replicas.

Slow (a Ray cluster on 2 cores: about 1-2 minutes):
    pip install -e ".[serve,ray,dev]" && python -m pytest -q -m slow tests/test_serve_ray.py
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")

from serve_util import request  # noqa: E402

pytestmark = pytest.mark.slow

BODY = {"prompt": "a cat", "num_inference_steps": 3, "size": "64x64", "seed": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_with_retries(port: int, body: dict, log: list) -> tuple[int, str]:
    """Retry what the proxy could not deliver (connection errors, 5xx without our error
    body); an answer from a replica, success or error, is final."""
    for attempt in range(8):
        try:
            status, headers, answer = request(port, "POST", "/v1/generate", body, timeout=120)
        except OSError as exc:
            log.append(f"retry after {type(exc).__name__}")
            time.sleep(0.5 * (attempt + 1))
            continue
        if status >= 500 and not (isinstance(answer, dict) and "error" in answer and status != 503):
            log.append(f"retry after {status}")
            time.sleep(0.5 * (attempt + 1))
            continue
        return status, headers.get("x-diffrt-replica", "")
    return 0, ""


def test_two_replicas_spread_load_and_survive_a_killed_replica(exported):
    ray = pytest.importorskip("ray")
    from ray import serve

    from diffrt.serve import ray_app
    from diffrt.serve.schemas import ServeConfig

    port = _free_port()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    try:
        ray_app.start(str(exported("sd15")), ServeConfig(model_name="tiny", max_batch=2), port=port,
                      num_replicas=2, backend_options={"intra_op_num_threads": 1})
        deadline = time.monotonic() + 120
        while request(port, "GET", "/readyz", timeout=5)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        replicas, log = set(), []
        results: dict[int, tuple[int, str]] = {}

        def send(i):
            results[i] = _post_with_retries(port, {**BODY, "seed": i}, log)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        replicas = {results[i][1] for i in range(8)}
        assert all(results[i][0] == 200 for i in range(8)), results
        assert len(replicas) == 2, replicas  # both served

        victim = int(sorted(replicas)[0].rsplit(":", 1)[1])
        threads = [threading.Thread(target=send, args=(i,)) for i in range(100, 116)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # requests in flight on both replicas
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(300)
        assert all(results[i][0] == 200 for i in range(100, 116)), (results, log)  # none lost

        deadline = time.monotonic() + 120  # Ray replaces the dead replica
        while True:
            status = serve.status().applications[ray_app.APP_NAME].deployments["diffrt"]
            running = status.replica_states.get("RUNNING", 0)
            if running == 2 and str(status.status).endswith("HEALTHY"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        later = set()
        for i in range(200, 208):
            code, replica = _post_with_retries(port, {**BODY, "seed": i}, log)
            assert code == 200
            later.add(replica)
        assert later - replicas, (later, replicas)  # the new replica serves
        assert f"{victim}" not in " ".join(later)
    finally:
        serve.shutdown()
        ray.shutdown()
