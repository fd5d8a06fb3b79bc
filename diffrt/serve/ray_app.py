"""Scale-out on Ray Serve (`diffrt serve OUT --ray --replicas N`, the ray[serve] package).

Each replica is a Ray actor that loads the artifact, runs the warm-up generation in
its constructor (so Ray routes nothing to it before it is warm), and serves the same
FastAPI app as `diffrt serve` (its own batching worker, queue, metrics). Ray's HTTP
proxy listens on --host/--port and spreads requests over the replicas; Ray restarts a
replica whose process dies. One replica per device: on a GPU machine each replica asks
Ray for one GPU (`num_gpus=1`) when the backend runs on one (-O providers=CUDA... or
`--ray-gpus-per-replica 1` via ray_actor_options); on a CPU machine, for tests and
small models, replicas share the CPUs.

Autoscaling: --min-replicas / --max-replicas / --target-ongoing-requests and
--autoscaling-config JSON go to Ray Serve's `autoscaling_config` as they are.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from diffrt.errors import DiffrtError
from diffrt.serve.schemas import ServeConfig

logger = logging.getLogger(__name__)

APP_NAME = "diffrt"


def autoscaling_config(min_replicas: int | None = None, max_replicas: int | None = None,
                       target_ongoing_requests: float | None = None, extra_json: str | None = None) -> dict | None:
    config: dict[str, Any] = {}
    if extra_json:
        try:
            config.update(json.loads(extra_json))
        except json.JSONDecodeError as exc:
            raise DiffrtError(f"--autoscaling-config is not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise DiffrtError("--autoscaling-config must be a JSON object")
    for key, value in (("min_replicas", min_replicas), ("max_replicas", max_replicas),
                       ("target_ongoing_requests", target_ongoing_requests)):
        if value is not None:
            config[key] = value
    return config or None


def build_app(folder: str, config: ServeConfig, backend: str = "ort", verify: bool | str = True,
              backend_options: dict[str, Any] | None = None, num_replicas: int | None = None,
              autoscaling: dict | None = None, ray_actor_options: dict | None = None, safety: str | None = None):
    """A bound Ray Serve application serving `folder` (pass it to `serve.run`); `safety`:
    the safety-checker policy (None: the artifact's default)."""
    from ray import serve

    @serve.ingress()
    class DiffrtReplica:
        def __init__(self, folder: str, config: ServeConfig, backend: str, verify: Any, backend_options: dict,
                     safety: str | None):
            from diffrt.serve.app import create_app, warmup_call
            from diffrt.serve.server import load_pipeline

            pipe = load_pipeline(folder, backend=backend, verify=verify, backend_options=backend_options,
                                 workers=config.workers, safety=safety)
            if config.warmup:
                t0 = time.perf_counter()
                pipe.generate([pipe.request(**warmup_call(pipe.manifest))])  # an inpainting UNet needs image and mask
                logger.info("replica warm-up in %.2fs", time.perf_counter() - t0)
            self._app = create_app(pipe, ServeConfig(**{**config.__dict__, "warmup": False}))

        def __serve_build_asgi_app__(self):
            return self._app

        def check_health(self) -> None:
            server = self._app.state.server
            if server.scheduler.warmup_error is not None:
                raise RuntimeError(f"warm-up failed: {server.scheduler.warmup_error}")

    options: dict[str, Any] = {"name": "diffrt", "max_ongoing_requests": max(8, config.max_queue + config.max_batch),
                               "ray_actor_options": ray_actor_options or {"num_cpus": 0},
                               "graceful_shutdown_timeout_s": config.timeout_s + 10,
                               "health_check_period_s": 2, "health_check_timeout_s": 30}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas or 1
    deployment = serve.deployment(**options)(DiffrtReplica)
    return deployment.bind(str(folder), config, backend, verify, backend_options or {}, safety)


def start(folder: str, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, blocking: bool = False, **kwargs: Any):
    """Start (or join) a Ray cluster, run the deployment at http://host:port/, and
    return once it is up (blocking=True: serve until interrupted, then shut down)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(_node_ip_address="127.0.0.1" if host in ("127.0.0.1", "localhost") else None,
                     include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(folder, config, **kwargs), name=APP_NAME, route_prefix="/")
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return None
