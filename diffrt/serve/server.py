"""Running the app: load the artifact, then serve it with uvicorn (or on Ray Serve, see
ray_app.py). `diffrt serve` calls `serve_http` / `serve_ray`.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections, waits for the
requests in flight (queued or running) to be answered, then the app's lifespan drains
the batch worker and the process exits 0.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from diffrt.errors import DiffrtError
from diffrt.serve.schemas import ServeConfig

logger = logging.getLogger(__name__)


def load_pipeline(folder: str | Path, backend: str = "ort", verify: bool | str = True,
                  backend_options: dict[str, Any] | None = None):
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(folder, backend=backend, verify=verify, **(backend_options or {}))
    if pipe.family.takes_image(pipe.manifest.model):
        pipe.close()
        raise DiffrtError(f"{folder} is an SDXL refiner (it continues a base model's latents); serve a base artifact")
    return pipe


def model_name(folder: str | Path) -> str:
    return Path(folder).resolve().name


def serve_http(pipeline: Any, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT, then finish what is in flight."""
    import uvicorn

    from diffrt.serve.app import create_app

    app = create_app(pipeline, config)
    uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                    timeout_graceful_shutdown=config.timeout_s + 30, lifespan="on")
    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured SIGTERM once drained (the process would die of
            # it); a drained shutdown exits 0 instead
            getattr(self, "_captured_signals", []).clear()

    DrainingServer(uvicorn_config).run()
    print("diffrt serve: shut down; every request in flight was answered", file=sys.stderr)


def _require_serve_extra(ray: bool) -> None:
    import importlib.util

    names = ("fastapi", "uvicorn", "prometheus_client") + (("ray",) if ray else ())
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        extra = "'ray[serve]'" if ray and missing == ["ray"] else "-e '.[serve]'"
        raise DiffrtError(f"diffrt serve needs {', '.join(missing)}: pip install {extra}")


def serve_from_args(args: Any, backend_options: dict[str, Any]) -> None:
    """`diffrt serve`: check the options, load the artifact (errors are one line),
    then serve until SIGTERM (uvicorn) or Ctrl-C (Ray)."""
    import os
    import sys

    _require_serve_extra(args.ray)
    for name in ("max_batch", "max_queue", "max_n", "max_steps", "max_size"):
        if getattr(args, name) < 1:
            raise DiffrtError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("batch_wait_ms", "timeout_s"):
        if not getattr(args, name) >= 0:
            raise DiffrtError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    ray_only = [n for n in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
                            "autoscaling_config", "ray_address") if getattr(args, n) is not None]
    if ray_only and not args.ray:
        raise DiffrtError(f"--{ray_only[0].replace('_', '-')} is a Ray option; add --ray")
    folder = Path(args.out)
    config = ServeConfig(model_name=args.model_name or model_name(folder), max_batch=args.max_batch,
                         batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s,
                         api_key=args.api_key or os.environ.get("DIFFRT_API_KEY") or None, max_n=args.max_n,
                         max_steps=args.max_steps, max_side=args.max_size, warmup=args.warmup)
    verify = {"stamp": True, "size": False}.get(args.verify, args.verify)
    if args.ray:
        from diffrt.serve import ray_app

        from diffrt.artifacts import read_manifest

        read_manifest(folder)  # a bad folder fails here, in one line, not in every replica
        autoscaling = ray_app.autoscaling_config(args.min_replicas, args.max_replicas, args.target_ongoing_requests,
                                                 args.autoscaling_config)
        print(f"diffrt serve: Ray Serve at http://{args.host}:{args.port}/ ({args.replicas or 'autoscaled'} "
              f"replica(s) of {config.model_name}); Ctrl-C stops", file=sys.stderr)
        ray_app.start(str(folder), config, host=args.host, port=args.port, address=args.ray_address, blocking=True,
                      backend=args.backend, verify=verify, backend_options=backend_options,
                      num_replicas=args.replicas, autoscaling=autoscaling)
        return
    pipe = load_pipeline(folder, backend=args.backend, verify=verify, backend_options=backend_options)
    print(f"diffrt serve: {config.model_name} on http://{args.host}:{args.port}/ (playground at /, "
          f"OpenAI API at /v1){'; API key required' if config.api_key else ''}", file=sys.stderr)
    serve_http(pipe, config, host=args.host, port=args.port, log_level="debug" if args.verbose else "warning")
