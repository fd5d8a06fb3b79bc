"""Inputs and connections the server must survive (issue 15, items 3, 5, 6), over real
HTTP on 127.0.0.1, and the same checks in the runtime and the CLI: long prompts (refused
past the limit, never tokenized past 10,000 characters, the warning short), the event
loop free while a prompt is tokenized, guidance bounds and non-finite outputs (an
error, never a black image), a client leaving mid-body (499, not 500), HEAD on the
health endpoints, API keys that are not ASCII, and connections that never finish."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_util import LiveServer, in_thread, joined, metric, until  # noqa: E402

FAST = {"num_inference_steps": 1, "scheduler": "euler", "size": "64x64"}
SENTENCE = "a red cat sitting on a mat"


@pytest.fixture(scope="module")
def pipe(exported):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"))
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def server(pipe):
    with LiveServer(pipe, max_prompt_chars=100, warmup=False, header_timeout_s=0.5, keep_alive_s=0.5,
                    body_timeout_s=0.5) as live:
        yield live


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *args], capture_output=True, text=True, timeout=300)


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's own
    timeout bounds the wait: a server that never closes fails the test)."""
    sock.settimeout(60)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# -- 3. prompts -------------------------------------------------------------------------------


def test_prompts_over_the_limit_are_refused(server):
    for path, body, param in (("/v1/generate", {"prompt": "x" * 101, **FAST}, "prompt"),
                              ("/v1/generate", {"prompt": "x", "negative_prompt": "y" * 101, **FAST},
                               "negative_prompt"),
                              ("/v1/jobs", {"prompt": "x" * 101, **FAST}, "prompt"),
                              ("/v1/images/generations", {"prompt": "x" * 101, "size": "64x64"}, "prompt")):
        status, _, answer = server.post(path, body)
        assert status == 400 and answer["error"]["param"] == param, (path, answer)
        assert "101 characters" in answer["error"]["message"]
    assert server.post("/v1/generate", {"prompt": "x" * 100, **FAST})[0] == 200


def test_truncation_warning_counts_and_quotes_only_the_start(exported, tiny_checkpoint, caplog):
    from transformers import CLIPTokenizer as Reference

    from diffrt.runtime.tokenizers import MAX_PROMPT_CHARS, CLIPTokenizer

    ours = CLIPTokenizer.from_dir(exported("sd15") / "tokenizer")
    reference = Reference.from_pretrained(tiny_checkpoint("sd15") / "tokenizer")
    prompt = " ".join([SENTENCE] * 8000)  # 215,999 characters
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        ids = ours([prompt])
    # cutting the text before tokenizing changes nothing the encoder sees
    np.testing.assert_array_equal(ids[0], reference(prompt, truncation=True, max_length=77)["input_ids"])
    (message,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(message) < 400, message  # never the whole text
    tokenized = reference(prompt[:MAX_PROMPT_CHARS], add_special_tokens=False)["input_ids"]
    assert f"the prompt has {len(prompt)} characters" in message
    assert f"({len(tokenized) + 2} tokens)" in message  # with bos and eos
    dropped = reference.decode(tokenized[75:])  # what the encoder never sees (75 + bos + eos = 77)
    assert dropped[:50] in message


def test_cli_truncation_warning_is_one_short_line(exported, tmp_path):
    prompt = " ".join([SENTENCE] * 3000)  # 80,999 characters (an argument may hold 128 KiB)
    result = _cli("generate", str(exported("sd15")), prompt, "--steps", "1", "-q", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if "prompt truncated" in line]
    assert len(line) < 400 and f"{len(prompt)} characters" in line, line
    assert len(result.stderr) < 2000, result.stderr[:3000]


class GatedTokenizer:
    """Holds tokenization until released, so a test can look at the server meanwhile."""

    def __init__(self, tokenizer):
        self.tokenizer, self.entered, self.release = tokenizer, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, prompts):
        self.entered.set()
        assert self.release.wait(60)
        return self.tokenizer(prompts)


def test_health_answers_while_a_prompt_is_tokenized(pipe):
    original = pipe.tokenizers["text_encoder"]
    gated = GatedTokenizer(original)
    pipe.tokenizers["text_encoder"] = gated
    try:
        with LiveServer(pipe, warmup=False) as live:
            call = in_thread(live.post, "/v1/generate", {"prompt": "a cat", **FAST})
            assert gated.entered.wait(60)
            # the generation is inside the tokenizer: the event loop still answers
            assert live.request("GET", "/healthz", timeout=30)[0] == 200
            assert live.request("HEAD", "/healthz", timeout=30)[0] == 200
            text = live.request("GET", "/metrics", timeout=30)[2]
            assert metric(text, "diffrt_running_requests") == 1
            gated.release.set()
            assert joined(call)[0] == 200
    finally:
        gated.release.set()
        pipe.tokenizers["text_encoder"] = original


# -- 5. guidance and non-finite outputs ----------------------------------------------------------


def test_guidance_out_of_range_is_a_400(server):
    for scale in (1e308, 100.5, -1):
        status, _, answer = server.post("/v1/generate", {"prompt": "a cat", "guidance_scale": scale, **FAST})
        assert status == 400 and answer["error"]["param"] == "guidance_scale", (scale, answer)
    status, _, answer = server.post("/v1/generate", {"prompt": "a cat", "guidance_scale": 100, **FAST})
    assert status == 200, answer


def test_cli_refuses_absurd_guidance_and_writes_nothing(exported, tmp_path):
    out = tmp_path / "x.png"
    result = _cli("generate", str(exported("sd15")), "a cat", "--cfg", "1e308", "--steps", "1", "-o", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "guidance_scale" in lines[0], result.stderr
    assert not out.exists()


def test_non_finite_latents_are_an_error_not_a_black_image(pipe):
    from diffrt.errors import DiffrtError

    shape = (1, 4, 32, 32)  # the tiny SD's latents at 64x64 (VAE factor 2)
    for bad in (np.nan, np.inf):
        with pytest.raises(DiffrtError, match="non-finite"):
            pipe("a cat", num_inference_steps=1, scheduler="euler", height=64, width=64,
                 latents=np.full(shape, bad, dtype=np.float32), output_type="np")
    with pytest.raises(DiffrtError, match="non-finite"):
        pipe("a cat", num_inference_steps=1, scheduler="euler", height=64, width=64,
             latents=np.full(shape, np.nan, dtype=np.float32), output_type="latent")


class Overflowing:
    """The real pipeline, whose VAE decoder overflows (inf) whenever a call's prompt
    says "overflow": a numeric fault deep inside a batch."""

    def __init__(self, pipe):
        self.pipe, self.manifest = pipe, pipe.manifest

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, requests, progress=None):
        decoder = self.pipe._contexts[self.pipe.family.VAE_DECODER]
        if not any("overflow" in r.prompts[0] for r in requests):
            return self.pipe.generate(requests, progress)
        real = decoder.run
        decoder.run = lambda feeds: {"sample": real(feeds)["sample"] * np.float32(np.inf)}
        try:
            return self.pipe.generate(requests, progress)
        finally:
            decoder.run = real


def test_a_non_finite_image_fails_its_request_only(pipe):
    with LiveServer(Overflowing(pipe), max_batch=4, batch_wait_ms=0, warmup=False) as live:
        live.scheduler.pause()
        calls = []
        for i, prompt in enumerate(("a cat", "overflow", "a dog")):
            calls.append(in_thread(live.post, "/v1/generate", {"prompt": prompt, **FAST}))
            live.wait_for(lambda: live.scheduler.depth == i + 1, f"request {i} to queue")
        live.scheduler.resume()
        cat, bad, dog = (joined(c) for c in calls)
        assert bad[0] == 400 and "non-finite" in bad[2]["error"]["message"] and "images" not in bad[2], bad
        assert cat[0] == 200 and dog[0] == 200


# -- 6. connections, HEAD, keys ----------------------------------------------------------------


def test_a_client_leaving_mid_body_is_499_not_500(server):
    before = server.request("GET", "/metrics")[2]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")

    def counted(status):
        now = metric(server.request("GET", "/metrics")[2], "diffrt_requests_total", endpoint="/v1/generate",
                     status=status)
        return now - metric(before, "diffrt_requests_total", endpoint="/v1/generate", status=status)

    until(lambda: counted("499") == 1, 30, "the 499 to be counted")
    assert counted("500") == 0


def test_head_on_health_endpoints(server):
    for path in ("/healthz", "/readyz"):
        status, _, body = server.request("HEAD", path)
        assert status == 200 and body == "", (path, body)


def test_api_keys_must_be_ascii_and_are_compared_as_bytes(pipe):
    from diffrt.errors import DiffrtError
    from diffrt.serve.app import create_app
    from diffrt.serve.schemas import ServeConfig

    for key in ("clé", "two words", ""):
        with pytest.raises(DiffrtError, match="printable ASCII") as error:
            create_app(pipe, ServeConfig(api_keys=(key,), warmup=False))
        assert "\n" not in str(error.value)
    with LiveServer(pipe, api_key="s3cret", warmup=False) as live:
        with socket.create_connection(("127.0.0.1", live.port)) as sock:  # UTF-8 bytes in the header
            sock.sendall("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer clé\r\n"
                         "Connection: close\r\n\r\n".encode())
            assert _closed_by_server(sock).startswith(b"HTTP/1.1 401 ")
        assert live.request("GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_connections_that_never_finish_are_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # sends nothing
        assert _closed_by_server(sock) == b""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # half a request head
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert _closed_by_server(sock) == b""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # idle after a response
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _closed_by_server(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"alive"}')
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # a body that stalls
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        answer = _closed_by_server(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in answer, answer
    assert server.request("GET", "/healthz")[0] == 200  # still serving
