"""Helpers for the server tests: a live uvicorn server on 127.0.0.1 in a thread, and a
small stdlib HTTP client (no extra dependency)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from typing import Any

import numpy as np

TINY = {"num_inference_steps": 2, "size": "64x64"}  # a fast generation on the tiny test models


class LiveServer:
    """`with LiveServer(pipe, max_batch=4) as server: server.post(...)`; stops (and
    drains) on exit."""

    def __init__(self, pipeline: Any, **config: Any):
        import uvicorn

        from diffrt.serve.app import create_app
        from diffrt.serve.schemas import ServeConfig

        self.config = ServeConfig(**{"model_name": "tiny", **config})
        self.app = create_app(pipeline, self.config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        while self.request("GET", "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def state(self):
        return self.app.state.server

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, Any]:
        return request(self.port, method, path, body, headers, timeout)

    def post(self, path: str, body: Any, **kwargs: Any) -> tuple[int, dict, Any]:
        return self.request("POST", path, body, **kwargs)


def request(port: int, method: str, path: str, body: Any = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, dict, Any]:
    """(status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload
    finally:
        conn.close()


def decode_npy(b64: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == name and not want or head == f"{name}{{{want}}}":
            return float(value)
    return 0.0
