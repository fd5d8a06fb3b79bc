"""LoRA as unmerged branches (`diffrt lora-branches`): images against diffusers'
load_lora_weights + set_adapters and against the merged mechanism, on ORT (the
fused-attention branch graph) and OpenVINO (the portable one); requests with
different LoRAs in one batch equal each alone, through `generate` and over HTTP."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import copy_artifact  # noqa: E402
from test_lora import make_kohya_lora, make_lora  # noqa: E402

from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402

TOLERANCE = 2e-3
RANK = 8
CALL = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
BACKENDS = [("ort", {}), ("openvino", {"precision": "fp32"})]


@pytest.fixture(scope="module")
def branched(tiny_checkpoint, exported, tmp_path_factory):
    """A copy of the tiny SD artifact given rank-8 branches through the CLI, LoRA files
    (attention-only: what the default branches cover), the diffusers checkpoint, latents."""
    from diffrt.cli import main

    checkpoint = tiny_checkpoint("sd15")
    folder = copy_artifact(exported("sd15"), tmp_path_factory.mktemp("branched") / "artifact")
    assert main(["lora-branches", str(folder), "--rank", str(RANK)]) == 0
    root = tmp_path_factory.mktemp("branch-loras")
    files = {"a": make_lora(checkpoint, root / "a", seed=21, unet=ATTENTION),  # rank 4, text encoder too
             "b": make_lora(checkpoint, root / "b", seed=22, rank=2, alpha=2, unet=["to_k", "to_out.0"], text=()),
             "c": make_lora(checkpoint, root / "c", seed=23, rank=6, alpha=3, unet=["to_q", "to_v"], text=())}
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    return checkpoint, folder, files, latents


def _theirs(branched, loras):
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    checkpoint, _, files, latents = branched
    pipe = DiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name in loras:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if loras:
        pipe.set_adapters(list(loras), list(loras.values()))
    return pipe("a red cat", latents=latents, **CALL).images


def _ours(pipe, branched, loras=None):
    return pipe("a red cat", latents=branched[3].numpy(), scheduler="euler", loras=loras, **CALL).images


def _close(got, want, what, tolerance=TOLERANCE):
    diff = float(np.abs(got - want).max())
    assert diff <= tolerance, f"{what}: {diff} > {tolerance}"


SETS = ({"a": 0.7}, {"a": 0.8, "b": 0.4}, {"b": 1.0}, {"c": 0.9, "b": 0.5})


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_branches_match_diffusers_and_the_merged_weights(branched, backend, options):
    if backend == "openvino":
        pytest.importorskip("openvino")
    _, folder, files, _ = branched
    loaded = {name: files[name] for name in ("a", "b", "c")}
    with Pipeline.load(folder, backend=backend, loras=loaded, **options) as pipe, \
            Pipeline.load(folder, backend=backend, loras=loaded, lora_branches=False, **options) as merged:
        spec = pipe.models["unet"].spec
        assert spec.variant == ("fused-attention+lora-branches" if backend == "ort" else "lora-branches")
        assert pipe.models["text_encoder"].spec.variant == "lora-branches"  # text-encoder layers: branches too
        assert merged.models["unet"].spec.variant in ("default", "fused-attention")
        base = _theirs(branched, {})
        none = _ours(pipe, branched)
        _close(none, base, "no LoRA")
        _close(none, _ours(merged, branched), "no LoRA, branch graph vs plain graph", 1e-5)
        for loras in SETS:
            want = _theirs(branched, loras)
            assert float(np.abs(want - base).max()) > 2e-2, loras  # the LoRA matters at this tolerance
            got = _ours(pipe, branched, loras)
            _close(got, want, f"{backend} branches {loras} vs diffusers")
            _close(got, _ours(merged, branched, loras), f"{backend} branches {loras} vs merged", 1e-4)
        np.testing.assert_array_equal(_ours(pipe, branched, {"a": 0.0}), none)  # strength 0 is no LoRA


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_a_mixed_lora_batch_equals_each_request_alone(branched, backend, options):
    """Three requests, LoRA a (UNet and text encoder), LoRA b, none: one batch (one
    denoiser call per step), each request's images as it gets them alone."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    _, folder, files, _ = branched
    with Pipeline.load(folder, backend=backend, loras={"a": files["a"], "b": files["b"]}, **options) as pipe:
        common = dict(num_inference_steps=3, scheduler="euler", height=64, width=64, output_type="np")
        requests = [pipe.request("a red cat", seed=1, loras={"a": 0.8}, **common),
                    pipe.request("a blue dog", seed=2, loras={"b": 0.5}, num_images_per_prompt=2, **common),
                    pipe.request("a green tree", seed=3, **common)]
        assert len({pipe.batch_key(r) for r in requests}) == 1
        together = pipe.generate(requests)
        assert together[0].timings["batch_images"] == 4
        assert len(together[0].timings["denoiser_calls"]) == 3  # one call per step for all four images
        for request, result in zip(requests, together, strict=True):
            alone = pipe.generate([request])[0].images
            np.testing.assert_allclose(result.images, alone, atol=1e-5, rtol=0, err_msg=str(request.loras))
        plain = pipe.generate([pipe.with_loras(requests[0], None)])[0].images
        assert float(np.abs(plain - together[0].images).max()) > 1e-2  # the LoRA mattered in the batch


def test_server_batches_requests_with_different_loras_together(branched):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_util import TINY, LiveServer, decode_npy

    _, folder, files, _ = branched
    calls = [{"prompt": "a cat", "seed": 1, "loras": {"a": 1.0}},
             {"prompt": "a dog", "seed": 2, "loras": {"b": 0.5}},
             {"prompt": "a tree", "seed": 3, "loras": {"a": 0.3, "b": 1.0}},
             {"prompt": "a boat", "seed": 4}]
    results: dict[int, tuple] = {}
    with Pipeline.load(folder, loras={"a": files["a"], "b": files["b"]}) as pipe:
        with LiveServer(pipe, workers=1, max_batch=4, batch_wait_ms=20) as server:
            def send(i):
                results[i] = server.post("/v1/generate", {**calls[i], **TINY, "output_format": "npy"})

            server.scheduler.pause()  # all queue before the worker looks
            try:
                threads = [threading.Thread(target=send, args=(i,)) for i in range(len(calls))]
                for t in threads:
                    t.start()
                server.wait_for(lambda: server.scheduler.depth == len(calls), "all the requests to queue")
            finally:
                server.scheduler.resume()
            for t in threads:
                t.join(300)
        assert all(results[i][0] == 200 for i in range(len(calls))), results
        assert [results[i][2]["batch"]["images"] for i in range(len(calls))] == [4, 4, 4, 4]  # one batch
        for i, call in enumerate(calls):
            alone = pipe(call["prompt"], num_inference_steps=2, height=64, width=64, seed=call["seed"],
                         loras=call.get("loras"), output_type="np").images
            np.testing.assert_allclose(decode_npy(results[i][2]["images"][0]["b64"]), alone[0], atol=1e-5, rtol=0)


def test_what_branches_cannot_take_is_a_one_line_error(branched, tiny_checkpoint, exported, tmp_path):
    from diffrt.export.lora_branches import add_branch_stages

    checkpoint, folder, files, _ = branched
    conv = make_kohya_lora(checkpoint, tmp_path / "k.safetensors", seed=5)  # conv, proj_in, time_emb_proj ...
    with Pipeline.load(folder, loras={"a": files["a"], "c": files["c"]}) as pipe:
        with pytest.raises(DiffrtError, match="no LoRA branch in this artifact: .*lora_branches=False") as info:
            pipe.load_lora("k", conv)
        assert "\n" not in str(info.value)
        assert set(pipe.loras) == {"a", "c"}
        with pytest.raises(DiffrtError, match=f"together have rank 10 .* LoRA-branch rank {RANK}"):
            pipe.request("x", loras={"a": 1.0, "c": 1.0})  # ranks 4 + 6 in to_q and to_v
        pipe("x", num_inference_steps=1, height=64, width=64, loras={"c": 1.0})  # still serving
    with Pipeline.load(folder, loras={"k": conv}, lora_branches=False) as merged:
        assert "k" in merged.loras  # the merged mechanism takes it
    with pytest.raises(DiffrtError, match="no LoRA-branch unet graph"):
        Pipeline.load(exported("sd15"), lora_branches=True)
    with pytest.raises(DiffrtError, match="already has LoRA-branch stages"):
        add_branch_stages(folder, 16)
    with pytest.raises(DiffrtError, match="rank 0: use an integer"):
        add_branch_stages(folder, 0)


def test_export_checks_the_branch_rank_before_exporting(tiny_checkpoint, tmp_path, capsys):
    from diffrt.cli import main

    out = tmp_path / "out"
    assert main(["export", str(tiny_checkpoint("sd15")), str(out), "--lora-branches", "0"]) == 2
    assert "rank 0: use an integer from 1 to 1024" in capsys.readouterr().err
    assert not out.exists()


def test_sdxl_transformer_branches_match_diffusers_and_mix(tiny_checkpoint, exported, tmp_path):
    """SDXL, branches on every Linear of the transformer blocks (proj_in and the
    feed-forward too), a LoRA on them and both text encoders: diffusers' image; a batch
    with and without it equals each alone."""
    from diffrt.export.lora_branches import add_branch_stages

    checkpoint = tiny_checkpoint("sdxl")
    folder = copy_artifact(exported("sdxl"), tmp_path / "artifact")
    add_branch_stages(folder, 4, "transformer")
    file = make_lora(checkpoint, tmp_path / "xl", seed=5, unet=["to_q", "to_v", "to_out.0", "proj_in", "ff.net.2"],
                     text=["q_proj", "fc1"], text_2=["v_proj", "fc2"])
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(1))
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    ref = DiffusionPipeline.from_pretrained(checkpoint)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    base = ref("a red cat", latents=latents, **CALL).images
    ref.load_lora_weights(str(file), adapter_name="xl")
    ref.set_adapters(["xl"], [0.8])
    want = ref("a red cat", latents=latents, **CALL).images
    assert float(np.abs(want - base).max()) > 2e-2
    with Pipeline.load(folder, loras={"xl": file}) as pipe:
        assert pipe.models["unet"].spec.facts["lora_branches"]["targets"] == "transformer"
        assert pipe.models["text_encoder_2"].spec.variant == "lora-branches"
        got = pipe("a red cat", latents=latents.numpy(), scheduler="euler", loras={"xl": 0.8}, **CALL).images
        _close(got, want, "sdxl branches")
        common = {"num_inference_steps": 2, "scheduler": "euler", "height": 64, "width": 64, "output_type": "np"}
        requests = [pipe.request("a cat", seed=1, loras={"xl": 0.8}, **common), pipe.request("a dog", seed=2, **common)]
        together = pipe.generate(requests)
        for request, result in zip(requests, together, strict=True):
            np.testing.assert_allclose(result.images, pipe.generate([request])[0].images, atol=1e-5, rtol=0)


def test_a_text_encoder_without_branches_is_merged_per_request(branched, tmp_path):
    """An artifact with UNet branches only: the text-encoder layers of each request's
    LoRAs are merged while it encodes; a mixed batch still equals each request alone."""
    import dataclasses

    from diffrt.artifacts import read_manifest, write_manifest

    _, folder, files, _ = branched
    copy = copy_artifact(folder, tmp_path / "artifact")
    manifest = read_manifest(copy)
    write_manifest(copy, dataclasses.replace(manifest, stages={k: v for k, v in manifest.stages.items()
                                                               if k != "text_encoder-lora"}))
    with Pipeline.load(copy, loras={"a": files["a"], "b": files["b"]}) as pipe:
        assert pipe.models["text_encoder"].spec.variant == "default"
        assert pipe.models["unet"].spec.facts["lora_branches"]
        _close(_ours(pipe, branched, {"a": 0.7}), _theirs(branched, {"a": 0.7}), "text encoder merged")
        common = {"num_inference_steps": 2, "scheduler": "euler", "height": 64, "width": 64, "output_type": "np"}
        requests = [pipe.request("a cat", seed=1, loras={"a": 0.8}, **common),
                    pipe.request("a dog", seed=2, loras={"b": 1.0}, **common), pipe.request("a tree", seed=3, **common)]
        together = pipe.generate(requests)
        for request, result in zip(requests, together, strict=True):
            np.testing.assert_allclose(result.images, pipe.generate([request])[0].images, atol=1e-5, rtol=0)
