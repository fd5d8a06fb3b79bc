"""LoRA over HTTP: GET /v1/loras, per-request `loras` in /v1/generate and the OpenAI
endpoint, unknown names, and the batcher keeping LoRA sets apart (merged into the
weights, a batch runs one set) while two workers share the models."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("peft")

from serve_util import TINY, LiveServer, decode_npy  # noqa: E402
from test_lora import make_lora  # noqa: E402

from diffrt.errors import DiffrtError  # noqa: E402


@pytest.fixture(scope="module")
def loras(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-loras")
    return {"a": make_lora(tiny_checkpoint("sd15"), root / "a", seed=11),
            "b": make_lora(tiny_checkpoint("sd15"), root / "b", seed=12, unet=["to_v", "conv2"], text=["fc2"])}


@pytest.fixture(scope="module")
def pipe(exported, loras):
    from diffrt.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(exported("sd15"), workers=2, loras=loras)
    yield pipeline
    pipeline.close()


def test_requests_with_different_loras_run_in_separate_batches_and_equal_alone(pipe, loras):
    calls = [{"prompt": "a cat", "seed": 1, "loras": {"a": 1.0}},
             {"prompt": "a dog", "seed": 2, "loras": {"a": 1.0, "b": 0.0}},  # the same set as the first
             {"prompt": "a tree", "seed": 3, "loras": {"b": 0.5}},
             {"prompt": "a boat", "seed": 4}]
    results: dict[int, tuple] = {}
    with LiveServer(pipe, workers=2, max_batch=4, batch_wait_ms=20) as server:
        status, _, listed = server.request("GET", "/v1/loras")
        assert status == 200
        assert {(d["id"], d["sha256"]) for d in listed["data"]} == \
            {(name, hashlib.sha256(path.read_bytes()).hexdigest()) for name, path in loras.items()}

        def send(i):
            results[i] = server.post("/v1/generate", {**calls[i], **TINY, "output_format": "npy"})

        server.scheduler.pause()  # all queue before a worker looks
        try:
            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(calls))]
            for t in threads:
                t.start()
            server.wait_for(lambda: server.scheduler.depth == len(calls), "all the requests to queue")
        finally:
            server.scheduler.resume()
        for t in threads:
            t.join(300)

        status, _, answer = server.post("/v1/generate", {"prompt": "x", **TINY, "loras": {"c": 1.0}})
        assert status == 400 and answer["error"]["param"] == "loras"
        assert "'c'" in answer["error"]["message"] and "loaded: a, b" in answer["error"]["message"]
        status, _, answer = server.post("/v1/generate", {"prompt": "x", **TINY, "loras": {"a": -1}})
        assert status == 400 and answer["error"]["param"] == "loras"
        status, _, answer = server.post("/v1/images/generations", {"prompt": "x", "size": "64x64",
                                                                   "loras": {"a": 0.5}})
        assert status == 200 and len(answer["data"]) == 1
        status, _, answer = server.post("/v1/images/generations", {"prompt": "x", "size": "64x64",
                                                                   "loras": {"nope": 0.5}})
        assert status == 400 and "loaded: a, b" in answer["error"]["message"]
    assert all(results[i][0] == 200 for i in range(len(calls))), results
    assert [results[i][2]["batch"]["images"] for i in range(len(calls))] == [2, 2, 1, 1]
    for i, call in enumerate(calls):
        alone = pipe(call["prompt"], num_inference_steps=2, height=64, width=64, seed=call["seed"],
                     loras=call.get("loras"), output_type="np").images
        served = decode_npy(results[i][2]["images"][0]["b64"])
        np.testing.assert_allclose(served, alone[0], atol=1e-5, rtol=0)
    plain = pipe("a cat", num_inference_steps=2, height=64, width=64, seed=1, output_type="np").images
    assert float(np.abs(plain[0] - decode_npy(results[0][2]["images"][0]["b64"])).max()) > 1e-2  # the LoRA mattered


def test_serve_lora_arguments(tmp_path, loras):
    from diffrt.serve.server import lora_files

    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(loras["a"].read_bytes())
    (folder / "notes.txt").write_text("not a LoRA")
    assert lora_files(["b=" + str(loras["b"])], str(folder)) == {"style": folder / "style.safetensors",
                                                                 "b": loras["b"]}
    for given, directory, needle in ((["b"], None, "NAME=FILE"), (["style=x"], str(folder), "given twice"),
                                     (None, str(tmp_path / "none"), "not a folder"),
                                     (None, str(tmp_path), "holds no .safetensors")):
        with pytest.raises(DiffrtError, match=needle):
            lora_files(given, directory)
