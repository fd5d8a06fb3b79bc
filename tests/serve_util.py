"""Helpers for the server tests: a live uvicorn server on 127.0.0.1 in a thread, a
small stdlib HTTP client (no extra dependency), and bounded waits on conditions (the
tests wait for states, never for time to pass: a bound only turns a hang into a
failure)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from collections.abc import Callable
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
        from diffrt.serve.server import uvicorn_config

        self.config = ServeConfig(**{"model_name": "tiny", **config})
        self.app = create_app(pipeline, self.config)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.config, "127.0.0.1", 0, "error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        until(lambda: self.server.started or not self.thread.is_alive(), 60, "the server to start")
        assert self.thread.is_alive(), "the server did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        until(lambda: self.request("GET", "/readyz")[0] == 200, 60, "the server to get ready")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def state(self):
        return self.app.state.server

    @property
    def scheduler(self):
        return self.app.state.server.scheduler

    def wait_for(self, predicate, what: str, timeout: float = 60) -> None:
        """Wait until the batching queue reaches a state (woken by every queue change)."""
        assert self.scheduler.wait_for(predicate, timeout), f"timed out waiting for {what}"

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


def until(condition: Callable[[], Any], timeout: float = 60, what: str = "a condition",
          poll: float = 0.02) -> Any:
    """Poll `condition` until it is true (returned) or `timeout` seconds pass (fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def in_thread(fn: Callable, *args: Any) -> tuple[threading.Thread, dict]:
    """Run fn(*args) in a thread; its return value lands in out["r"]."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn(*args)), daemon=True)
    thread.start()
    return thread, out


def joined(started: tuple[threading.Thread, dict], timeout: float = 120) -> Any:
    """The return value of an `in_thread` call, once it ends (bounded)."""
    thread, out = started
    thread.join(timeout)
    assert not thread.is_alive(), "the call did not return"
    return out["r"]


def post_with_retries(port: int, path: str, body: Any, log: list, timeout: float = 240) -> tuple[int, dict, Any]:
    """POST, retrying what a proxy could not deliver (connection errors; 5xx without
    this server's own error body, or 503) with a growing pause, until `timeout`; an
    answer from the server itself, success or error, is final."""
    deadline, pause = time.monotonic() + timeout, 0.25
    while True:
        try:
            status, headers, answer = request(port, "POST", path, body, timeout=120)
        except OSError as exc:
            log.append(f"retry after {type(exc).__name__}")
        else:
            ours = isinstance(answer, dict) and "error" in answer and status != 503
            if status < 500 or ours:
                return status, headers, answer
            log.append(f"retry after {status}")
        assert time.monotonic() < deadline, f"no answer from the server: {log[-5:]}"
        time.sleep(pause)
        pause = min(pause * 2, 4.0)


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
