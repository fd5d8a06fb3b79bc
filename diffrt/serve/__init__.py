"""diffrt's HTTP server (the `serve` extra: FastAPI, uvicorn, prometheus_client).

    diffrt serve OUT --port 8000
    # or
    from diffrt.serve import create_app, ServeConfig
    app = create_app(Pipeline.load(OUT), ServeConfig(model_name="sd15"))

app.py: endpoints; schemas.py: request bodies, limits, validation; batching.py: the
dynamic batching scheduler and its worker thread; metrics.py: Prometheus metrics;
server.py: uvicorn; ray_app.py: the Ray Serve deployment; static/playground.html: the
page at /. Torch-free, like the runtime.
"""

from __future__ import annotations


def __getattr__(name):
    if name == "create_app":
        from diffrt.serve.app import create_app

        return create_app
    if name == "ServeConfig":
        from diffrt.serve.schemas import ServeConfig

        return ServeConfig
    raise AttributeError(f"module 'diffrt.serve' has no attribute {name!r}")


__all__ = ["ServeConfig", "create_app"]
