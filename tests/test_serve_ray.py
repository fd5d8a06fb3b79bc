"""`diffrt serve --ray`: two Ray Serve replicas of the tiny model on a local cluster.
Requests spread over both; killing one replica's process while it holds requests
loses no accepted request (each is answered, or retried by the client when the proxy reports the dead
replica), and the deployment recovers to two replicas, the new one serving.

Part of the default test command where the `ray` extra is installed (CI installs it,
see .ci/run; about a minute on 2 cores); skipped without it. Every wait is a bounded
wait on a condition (a replica answering, the deployment healthy), so
a loaded machine makes it slower, not flaky.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest

pytest.importorskip("fastapi")

from serve_util import post_with_retries, request, until  # noqa: E402

BODY = {"prompt": "a cat", "num_inference_steps": 3, "size": "64x64", "seed": 0}
HEAVY = {**BODY, "num_inference_steps": 10}  # the load the victim is killed under


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Wave:
    """Bodies POSTed concurrently (with retries); `results[i]` = (status, replica) as
    each answer arrives."""

    def __init__(self, port: int, bodies: list[dict], log: list):
        self.results: dict[int, tuple[int, str]] = {}

        def send(i: int) -> None:
            status, headers, _ = post_with_retries(port, "/v1/generate", bodies[i], log)
            self.results[i] = (status, headers.get("x-diffrt-replica", ""))

        self.threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(bodies))]
        for t in self.threads:
            t.start()

    def answers(self) -> list[tuple[int, str]]:
        for t in self.threads:
            t.join(600)
        assert len(self.results) == len(self.threads), "a request got no answer"
        return [self.results[i] for i in range(len(self.threads))]


def test_two_replicas_spread_load_and_survive_a_killed_replica(exported):
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[serve,ray]'")
    from ray import serve

    from diffrt.serve import ray_app
    from diffrt.serve.schemas import ServeConfig

    port = _free_port()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    try:
        ray_app.start(str(exported("sd15")), ServeConfig(model_name="tiny", max_batch=2), port=port,
                      num_replicas=2, backend_options={"intra_op_num_threads": 1})

        def ready() -> bool:
            try:
                return request(port, "GET", "/readyz", timeout=5)[0] == 200
            except OSError:
                return False

        until(ready, 300, "the deployment to answer", poll=0.2)
        log: list[str] = []
        replicas: set[str] = set()
        for wave in range(8):  # until both replicas have served (the proxy picks; bounded)
            answers = Wave(port, [{**BODY, "seed": 8 * wave + i} for i in range(8)], log).answers()
            assert all(status == 200 for status, _ in answers), answers
            replicas |= {replica for _, replica in answers}
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas  # both served

        # Under load: the proxy spreads 24 long requests over both replicas (about 12
        # each, run 2 at a time). Once the victim has answered one of them it still holds
        # the rest of its share, queued or running: kill it then.
        victim = sorted(replicas)[0]
        load = Wave(port, [{**HEAVY, "seed": 100 + i} for i in range(24)], log)
        until(lambda: victim in [r for _, r in list(load.results.values())], 600,
              "the victim replica to answer its first request of the load", poll=0.01)
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        answers = load.answers()
        assert [status for status, _ in answers] == [200] * 24, (answers, log)  # none lost

        def recovered() -> bool:
            status = serve.status().applications[ray_app.APP_NAME].deployments["diffrt"]
            return status.replica_states.get("RUNNING", 0) == 2 and str(status.status).endswith("HEALTHY")

        until(recovered, 300, "Ray to replace the killed replica", poll=0.5)
        later: set[str] = set()
        for wave in range(8):  # until the new replica has served (bounded)
            answers = Wave(port, [{**BODY, "seed": 200 + 8 * wave + i} for i in range(8)], log).answers()
            assert all(status == 200 for status, _ in answers), answers
            later |= {replica for _, replica in answers}
            if later - replicas:
                break
        assert later - replicas, (later, replicas)  # the new replica serves
        assert victim not in later
    finally:
        serve.shutdown()
        ray.shutdown()
