"""`diffrt serve` as a real process: graceful shutdown on SIGTERM with requests in
flight, one-line CLI errors, and no torch/diffusers/transformers in the server."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("fastapi")

from serve_util import request  # noqa: E402

HEAVY = ("torch", "diffusers", "transformers", "optimum")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_requests_in_flight(exported):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffrt.cli", "-q", "serve", str(exported("sd15")),
                             "--port", str(port), "--max-batch", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if request(port, "GET", "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.1)
        answers: dict[int, tuple] = {}

        def send(i):
            answers[i] = request(port, "POST", "/v1/generate", {"prompt": f"cat {i}", "num_inference_steps": 3,
                                                               "size": "64x64", "seed": i})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        # all three accepted: one running, two queued (max-batch 1)
        while "diffrt_queue_depth 2.0" not in request(port, "GET", "/metrics")[2]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert [answers[i][0] for i in range(3)] == [200, 200, 200]
        assert [answers[i][2]["images"][0]["seed"] for i in range(3)] == [0, 1, 2]
        assert proc.wait(60) == 0
        with pytest.raises(OSError):
            request(port, "GET", "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_serve_cli_errors_are_one_line(tmp_path):
    for args, needle in (([str(tmp_path / "missing")], "no such folder"),
                         ([str(tmp_path), "--max-batch", "0"], "--max-batch must be >= 1"),
                         ([str(tmp_path), "--replicas", "2"], "add --ray")):
        result = subprocess.run([sys.executable, "-m", "diffrt.cli", "serve", *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_server_is_torch_free(exported):
    code = f"""
        import sys
        from diffrt.serve.server import load_pipeline
        from diffrt.serve.app import create_app
        from diffrt.serve import batching, metrics, schemas, ray_app
        from fastapi.testclient import TestClient
        with TestClient(create_app(load_pipeline({str(exported("sd15"))!r}), schemas.ServeConfig())) as client:
            while client.get("/readyz").status_code != 200:
                pass
            r = client.post("/v1/generate", json={{"prompt": "a cat", "num_inference_steps": 1, "size": "64x64"}})
            assert r.status_code == 200, r.text
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
