"""`diffrt serve` as a real process: graceful shutdown on SIGTERM with requests in
flight, API keys from a file and the environment (not on the command line), one-line
CLI errors, and no torch/diffusers/transformers in the server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from serve_util import request, until  # noqa: E402

HEAVY = ("torch", "diffusers", "transformers", "optimum")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`diffrt serve` in its own process on a free port, once /readyz answers 200."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffrt.cli", "-q", "serve", str(folder), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})

    def ready() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return request(port, "GET", "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    until(ready, 60, "the server to get ready", poll=0.1)
    return proc, port


def test_sigterm_finishes_the_requests_in_flight(exported):
    proc, port = _start(exported("sd15"), "--max-batch", "1")
    try:
        answers: dict[int, tuple] = {}

        def send(i):
            answers[i] = request(port, "POST", "/v1/generate", {"prompt": f"cat {i}", "num_inference_steps": 3,
                                                               "size": "64x64", "seed": i})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        # all three accepted: one running, two queued (max-batch 1)
        until(lambda: "diffrt_queue_depth 2.0" in request(port, "GET", "/metrics")[2], 60, "two queued requests")
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


def test_keys_from_a_file_and_the_environment_stay_out_of_the_command_line(exported, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# the team's keys\nfile-key-1\n\n  file-key-2  \n", encoding="utf-8")
    proc, port = _start(exported("sd15"), "--api-key-file", str(key_file), "--no-warmup",
                        env={"DIFFRT_API_KEY": "env-key"})
    try:
        for key in ("file-key-1", "file-key-2", "env-key"):
            assert request(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 200, key
        for key in ("# the team's keys", "file-key-3", ""):
            assert request(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 401, key
        command_line = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"file-key" not in command_line and b"env-key" not in command_line  # what `ps` shows
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_serve_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty-keys").write_text("# nothing\n", encoding="utf-8")
    for args, needle in (([str(tmp_path / "missing")], "no such folder"),
                         ([str(tmp_path), "--max-batch", "0"], "--max-batch must be >= 1"),
                         ([str(tmp_path), "--workers", "0"], "--workers must be >= 1"),
                         ([str(tmp_path), "--replicas", "2"], "add --ray"),
                         ([str(tmp_path), "--timeout-s", "0"], "--timeout-s must be a number > 0"),
                         ([str(tmp_path), "--max-cost", "nan"], "--max-cost must be a number > 0"),
                         ([str(tmp_path), "--max-prompt-chars", "0"], "--max-prompt-chars must be >= 1"),
                         ([str(tmp_path), "--api-key", "clé"], "printable ASCII"),
                         ([str(tmp_path), "--api-key", "a b"], "printable ASCII"),
                         ([str(tmp_path), "--api-key-file", str(tmp_path / "nope")], "cannot read"),
                         ([str(tmp_path), "--api-key-file", str(tmp_path / "empty-keys")], "holds no key")):
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
