"""Textual inversion against diffusers' `load_textual_inversion` on tiny random models
with the same latents: embeddings loaded at run time (`pipe.load_textual_inversion`,
through the weight map and update_weights, on ONNX Runtime and OpenVINO) and baked in
at export (`export(textual_inversion=...)`), in diffusers' file forms: one vector under
its token, several vectors (token, token_1, ...), A1111's string_to_param .pt, and
SDXL's clip_l/clip_g pair. Bad files are refused in one line and change nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline
from diffrt.textual_inversion import SPARE_TOKEN_ROWS

from test_pipeline_parity import TOLERANCE, _diffusers_pipeline, _latents

PROMPTS = ["a <cat-toy> on a beach", "a painting in <my-style> of a <cat-toy>"]
NEGATIVE = ["<my-style>", "blurry"]


def _vectors(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory, exported):
    """The embedding files, sized for the tiny encoders (widths read from the artifacts)."""
    from diffrt.artifacts import read_manifest

    folder = tmp_path_factory.mktemp("ti")
    sd_width = read_manifest(exported("sd15")).model["text_hidden_size"]
    xl = read_manifest(exported("sdxl")).model
    paths = {"single": folder / "cat-toy.safetensors", "multi": folder / "style.safetensors",
             "a1111": folder / "a1111.pt", "sdxl": folder / "xl.safetensors", "wide": folder / "wide.safetensors",
             "huge": folder / "huge.safetensors"}
    save_file({"<cat-toy>": _vectors((sd_width,), 1)}, paths["single"])
    save_file({"emb_params": _vectors((3, sd_width), 2)}, paths["multi"])  # A1111-converted: the key is no token
    torch.save({"name": "<old-style>", "string_to_param": {"*": _vectors((2, sd_width), 3)}, "step": 100},
               paths["a1111"])
    save_file({"clip_l": _vectors((2, xl["text_hidden_size"]), 4), "clip_g": _vectors((2, xl["text_hidden_size_2"]), 5)},
              paths["sdxl"])
    save_file({"<wide>": _vectors((sd_width + 1,), 6)}, paths["wide"])
    save_file({"<huge>": _vectors((SPARE_TOKEN_ROWS + 1, sd_width), 7)}, paths["huge"])
    return paths


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _generate(pipe, latents, **kw):
    return pipe(PROMPTS, negative_prompt=NEGATIVE, latents=latents, num_inference_steps=3, guidance_scale=6.0,
                height=64, width=48, output_type="np", **kw).images


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_run_time_embeddings_match_diffusers(tiny_checkpoint, exported, files, backend):
    """A single-vector and a multi-vector (3 tokens, renamed) embedding loaded into a
    loaded pipeline: the same images as diffusers with the same two loads."""
    ref = _diffusers_pipeline(tiny_checkpoint("sd15"))
    # OpenVINO in fp32: its default on a bf16-capable CPU computes in bf16 (not a parity setting)
    ours = Pipeline.load(exported("sd15"), backend=backend, **({"precision": "fp32"} if backend == "openvino" else {}))
    latents = _latents(ours.family.latent_shape(ours.facts, 2, 64, 48), seed=1)
    before = _generate(ours, latents.numpy())
    assert ours.load_textual_inversion(files["single"]) == ["<cat-toy>"]
    assert ours.load_textual_inversion(files["multi"], token="<my-style>") == \
        ["<my-style>", "<my-style>_1", "<my-style>_2"]
    ref.load_textual_inversion(str(files["single"]))
    ref.load_textual_inversion(str(files["multi"]), token="<my-style>")
    theirs = _generate(ref, latents)
    got = _generate(ours, latents.numpy())
    print(f"{backend}: max abs difference {_diff(got, theirs):.2e}")
    assert _diff(got, theirs) <= TOLERANCE
    assert _diff(got, before) > 1e-3  # the embeddings changed the images
    # a worker shares the models and tokenizers: it sees the embeddings too
    worker = ours.worker()
    np.testing.assert_array_equal(_generate(worker, latents.numpy()), got)
    worker.close()
    ours.close()


def test_sdxl_two_encoder_embedding_matches_diffusers(tiny_checkpoint, exported, files):
    """clip_l to the first encoder, clip_g to the second, one token for both (diffusers:
    two calls naming each encoder and tokenizer)."""
    ref = _diffusers_pipeline(tiny_checkpoint("sdxl"))
    ours = Pipeline.load(exported("sdxl"))
    from safetensors.torch import load_file

    state = load_file(files["sdxl"])
    ref.load_textual_inversion(state["clip_l"], token="<cat-toy>", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="<cat-toy>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    assert ours.load_textual_inversion(files["sdxl"], token="<cat-toy>") == ["<cat-toy>", "<cat-toy>_1"]
    latents = _latents(ours.family.latent_shape(ours.facts, 1, 64, 64), seed=2)
    kw = dict(negative_prompt="a <cat-toy>", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
              output_type="np")
    theirs = ref("a <cat-toy> in the snow", latents=latents, **kw).images
    got = ours("a <cat-toy> in the snow", latents=latents.numpy(), **kw).images
    print(f"sdxl: max abs difference {_diff(got, theirs):.2e}")
    assert _diff(got, theirs) <= TOLERANCE
    ours.close()


def test_export_bakes_embeddings_in(tiny_checkpoint, files, tmp_path):
    """export(textual_inversion=[.safetensors, A1111 .pt]) equals diffusers with both
    loaded, with no load at run time; the artifact's tokenizer knows the tokens."""
    from diffrt.export import export

    out = tmp_path / "baked"
    export(tiny_checkpoint("sd15"), out, textual_inversion=[str(files["single"]), (files["a1111"], None)])
    ref = _diffusers_pipeline(tiny_checkpoint("sd15"))
    ref.load_textual_inversion(str(files["single"]))
    ref.load_textual_inversion(str(files["a1111"]))
    ours = Pipeline.load(out)
    prompt = "a <cat-toy> in <old-style>"
    latents = _latents(ours.family.latent_shape(ours.facts, 1, 64, 48), seed=3)
    kw = dict(negative_prompt="<old-style>", num_inference_steps=3, guidance_scale=6.0, height=64, width=48,
              output_type="np")
    theirs = ref(prompt, latents=latents, **kw).images
    got = ours(prompt, latents=latents.numpy(), **kw).images
    print(f"baked: max abs difference {_diff(got, theirs):.2e}")
    assert _diff(got, theirs) <= TOLERANCE
    with pytest.raises(DiffrtError, match="already in the text_encoder tokenizer"):
        ours.load_textual_inversion(files["single"])  # baked in already
    import hashlib
    import json

    record = json.loads((out / "tokenizer" / "textual_inversion.json").read_text())
    assert [(r["file"], r["sha256"], r["tokens"]) for r in record["sources"]] == [
        (p.name, hashlib.sha256(p.read_bytes()).hexdigest(), t)
        for p, t in ((files["single"], ["<cat-toy>"]), (files["a1111"], ["<old-style>", "<old-style>_1"]))]
    ours.close()


@pytest.mark.parametrize(("name", "token", "message"), [
    ("a1111", None, r"needs torch.*diffrt export SRC OUT --textual-inversion"),
    ("wide", None, r"width 33, the text encoder's embeddings 32"),
    ("huge", None, r"token table has \d+ rows .* do not fit"),
    ("sdxl", "<x>", r"needs a text_encoder_2"),
    ("missing", None, r"no such textual-inversion file"),
    ("not_ti", None, r"not a textual-inversion embedding"),
    ("garbage", None, r"not a readable \.safetensors file"),
])
def test_bad_files_are_one_line_and_change_nothing(exported, files, tmp_path, name, token, message):
    ours = Pipeline.load(exported("sd15"))
    paths = dict(files, missing=tmp_path / "nope.safetensors", not_ti=tmp_path / "two.safetensors",
                 garbage=tmp_path / "garbage.safetensors")
    save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, paths["not_ti"])
    paths["garbage"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    ids = ours.tokenizers["text_encoder"](PROMPTS)
    with pytest.raises(DiffrtError, match=message) as info:
        ours.load_textual_inversion(paths[name], token=token)
    assert "\n" not in str(info.value)
    np.testing.assert_array_equal(ours.tokenizers["text_encoder"](PROMPTS), ids)
    assert not ours._token_tables
    ours.close()


def test_token_already_known_is_refused(exported, files):
    ours = Pipeline.load(exported("sd15"))
    ours.load_textual_inversion(files["single"])
    with pytest.raises(DiffrtError, match="'<cat-toy>' is already in"):
        ours.load_textual_inversion(files["multi"], token="<cat-toy>")
    with pytest.raises(DiffrtError, match=re.escape("'<|endoftext|>' is already in")):  # a token of the vocabulary
        ours.load_textual_inversion(files["multi"], token="<|endoftext|>")
    ours.close()


def test_files_that_are_no_embedding(tmp_path):
    """A model-sized file, and a single key that holds no numbers: one line each."""
    from diffrt.textual_inversion import parse, read_file

    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:
        f.truncate(65 << 20)  # sparse: nothing is written
    with pytest.raises(DiffrtError, match="far more than a textual-inversion embedding"):
        read_file(big)
    with pytest.raises(DiffrtError, match="not an array of numbers"):
        parse({"name": "<x>"}, None, "f.pt")
