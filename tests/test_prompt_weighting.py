"""Weighted and long prompts against compel (the oracle, on PyPI): token ids and text
embeddings of the same tiny random-weight text encoders, run by compel in torch and by
diffrt's exported ONNX stages; then whole images from diffusers given compel's
embeddings. compel is configured as diffrt documents it: truncate_long_prompts=False,
DownweightMode.REMOVE (diffrt's text encoder graphs take no attention mask, which
compel's default MASK mode needs), SDXL's PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED with
the second encoder's pooled output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

compel = pytest.importorskip("compel")
from compel import Compel, DownweightMode, ReturnedEmbeddingsType  # noqa: E402

from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.prompt_syntax import a1111_to_compel  # noqa: E402
from diffrt.runtime import prompt_weighting  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402

EMBEDDING_TOLERANCE = 1e-5
IMAGE_TOLERANCE = 1e-4

# over 75 tokens, sentences and phrases for compel's split points
LONG = ("a photograph of a red fox sitting in tall grass at sunrise, soft light, morning mist. " * 3
        + "(sharp focus)1.2, detailed fur, green eyes, (blurry background)0.7, national geographic. " * 2)
PROMPTS = {
    "plain": "a photo of a cat sitting on a mat",
    "up": "a photo of a (cat)1.4 sitting on a mat++",
    "down": "a photo of a cat- sitting on a (red mat)0.5",
    "nested": 'a ((fluffy)1.5 cat, sitting.)0.8 on a "blue mat"++ at (noon)-',
    "long": LONG,
}


def _compel(ref, sdxl: bool):
    """compel for SD, or for SDXL the two Compels of compel's CompelForSDXL recipe (whose
    own wrapper takes no downweight_mode)."""
    common = dict(truncate_long_prompts=False, downweight_mode=DownweightMode.REMOVE)
    if not sdxl:
        return Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, **common)
    penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    return (Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, returned_embeddings_type=penultimate,
                   **common),
            Compel(tokenizer=ref.tokenizer_2, text_encoder=ref.text_encoder_2, returned_embeddings_type=penultimate,
                   requires_pooled=True, **common))


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, exported):
    from diffusers import DiffusionPipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            ref = DiffusionPipeline.from_pretrained(tiny_checkpoint(kind), safety_checker=None,
                                                    requires_safety_checker=False)
            ref.set_progress_bar_config(disable=True)
            cache[kind] = (Pipeline.load(exported(kind)), ref, _compel(ref, kind == "sdxl"))
        return cache[kind]

    return get


def _theirs(comp, texts: list[str], sdxl: bool):
    """compel's conditioning of the texts (padded to the same length, as Compel.__call__
    does for a list), and the pooled; SDXL: both encoders', padded to the same length
    with their empty-prompt conditioning and concatenated, as CompelForSDXL does."""
    with torch.no_grad():
        if not sdxl:
            return comp(texts).numpy(), None
        left = comp[0](texts)
        right, pooled = comp[1](texts)
        if left.shape[1] != right.shape[1]:
            short, empty = (right, comp[1]([""])[0]) if left.shape[1] > right.shape[1] else (left, comp[0]([""]))
            repeats = (max(left.shape[1], right.shape[1]) - short.shape[1]) // empty.shape[1]
            short = torch.cat([short, empty.repeat(short.shape[0], repeats, 1)], dim=1)
            left, right = (left, short) if short.shape[-1] == right.shape[-1] else (short, right)
        return torch.cat([left, right], dim=-1).numpy(), pooled.numpy()


def _ours(pipe: Pipeline, texts: list[str], syntax: str = "compel"):
    """diffrt's weighted conditioning of the texts on every encoder, as the family
    concatenates it (SDXL: both encoders' hidden states on the feature axis)."""
    roles = list(pipe.tokenizers)
    chunks = max(prompt_weighting.count_chunks(pipe.tokenizers[r], texts, syntax) for r in roles)
    encode = prompt_weighting.weighted_encoder(pipe._encode, pipe.tokenizers, syntax, chunks)
    outs = [encode(role, texts) for role in roles]
    if len(roles) == 1:
        return outs[0]["last_hidden_state"], None
    return np.concatenate([o["hidden_states"] for o in outs], axis=-1), outs[-1]["text_embeds"]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_embeddings_match_compel(pipes, kind, name):
    """Each prompt with a short negative: compel's conditioning tensors (padded to the
    same length) and, for SDXL, its pooled embeddings."""
    ours_pipe, _, comp = pipes(kind)
    texts = [PROMPTS[name], "ugly, blurry"]
    theirs, theirs_pooled = _theirs(comp, texts, kind == "sdxl")
    ours, ours_pooled = _ours(ours_pipe, texts)
    assert ours.shape == theirs.shape
    if name == "long":
        assert ours.shape[1] > 77
    diff = float(np.abs(ours - theirs).max())
    print(f"{kind} {name}: shape {ours.shape}, max abs difference {diff:.2e}")
    assert diff <= EMBEDDING_TOLERANCE
    if kind == "sdxl":
        np.testing.assert_allclose(ours_pooled, theirs_pooled, rtol=0, atol=EMBEDDING_TOLERANCE)


def test_clip_skip_output_is_weighted_as_compel_weights_the_penultimate_layer(pipes):
    """clip_skip=1 conditions on the penultimate layer, final-normed (diffusers' rule):
    compel's PENULTIMATE_HIDDEN_STATES_NORMALIZED, weighted the same way."""
    from types import SimpleNamespace

    ours_pipe, ref, _ = pipes("sd15")
    encoder = ref.text_encoder
    if not hasattr(encoder, "text_model"):
        # compel 2.5 reads text_encoder.text_model.final_layer_norm, a level transformers 5
        # removed (AttributeError): give its own code the path it expects
        object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
    comp = Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, truncate_long_prompts=False,
                  downweight_mode=DownweightMode.REMOVE,
                  returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED)
    texts = [PROMPTS["nested"], PROMPTS["long"]]
    with torch.no_grad():
        theirs = comp(texts).numpy()
    encode = prompt_weighting.weighted_encoder(ours_pipe._encode, ours_pipe.tokenizers, "compel", 1)
    ours = encode("text_encoder", texts)["skip_hidden_states"][:, 1]
    assert float(np.abs(ours - theirs).max()) <= EMBEDDING_TOLERANCE


@pytest.mark.parametrize("name", list(PROMPTS))
def test_token_ids_match_compel(pipes, name):
    """The chunked token ids of the full prompt are compel's tokenization."""
    ours_pipe, _, comp = pipes("sd15")
    with torch.no_grad():
        _, tokens = comp(PROMPTS[name], return_tokenization=True)
    ours = prompt_weighting.weighted_text(ours_pipe.tokenizers["text_encoder"], PROMPTS[name], "compel")
    np.testing.assert_array_equal(ours.variants[0][0].reshape(-1), np.asarray(tokens[0]).reshape(-1))


def test_plain_text_equals_the_unweighted_path(pipes):
    """Without weights (and within one chunk) the conditioning is the plain encoder's."""
    ours_pipe, _, _ = pipes("sd15")
    texts = [PROMPTS["plain"], ""]
    weighted, _ = _ours(ours_pipe, texts)
    np.testing.assert_array_equal(weighted, ours_pipe._encode("text_encoder", texts)["last_hidden_state"])


@pytest.mark.parametrize("prompt", ["a (cat:1.3) on a [mat]", "((fluffy)) cat, [[blurry]], (sunset:0.6)"])
def test_a1111_syntax_is_compel_on_the_converted_text(pipes, prompt):
    """AUTOMATIC1111's (words:w) / (words) / [words] give compel's embeddings of the
    converted text; the converted weights are A1111's (1.1 per (), 1/1.1 per [])."""
    ours_pipe, _, comp = pipes("sd15")
    converted = a1111_to_compel(prompt)
    theirs, _ = _theirs(comp, [converted], False)
    ours, _ = _ours(ours_pipe, [prompt], syntax="a1111")
    assert float(np.abs(ours - theirs).max()) <= EMBEDDING_TOLERANCE
    parsed = compel.prompt_parser.PromptParser().parse_conjunction(a1111_to_compel("((a)) [b] (c:0.6)"))
    weights = {f.text: f.weight for f in parsed.prompts[0].children}
    assert weights == pytest.approx({"a": 1.1 * 1.1, "b": 1 / 1.1, "c": 0.6})


@pytest.mark.parametrize("name", ["nested", "long"])
@pytest.mark.parametrize("kind, backend", [("sd15", "ort"), ("sdxl", "ort"), ("sd15", "openvino")])
def test_image_matches_diffusers_given_compels_embeddings(pipes, exported, kind, backend, name):
    """diffusers' pipeline with compel's prompt_embeds (+ pooled for SDXL) and diffrt with
    prompt_weighting on: the same image from the same latents (OpenVINO at fp32
    inference precision, which every CPU has). "long" (over 150 tokens: 3 chunks, so
    231 text tokens into the UNet) with a one-chunk negative that compel pads."""
    ours_pipe, ref, comp = pipes(kind)
    if backend == "openvino":
        pytest.importorskip("openvino")
        ours_pipe = Pipeline.load(exported(kind), backend="openvino", precision="fp32")
    sdxl = kind == "sdxl"
    prompt, negative = PROMPTS[name], "ugly, (blurry)1.3"
    cond, pooled = _theirs(comp, [prompt, negative], sdxl)
    assert cond.shape[1] == (231 if name == "long" else 77)  # compel's chunks, 77 tokens each
    shape = ours_pipe.family.latent_shape(ours_pipe.facts, 1, 64, 64)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")
    given = dict(prompt_embeds=torch.from_numpy(cond[:1]), negative_prompt_embeds=torch.from_numpy(cond[1:]))
    if sdxl:
        given.update(pooled_prompt_embeds=torch.from_numpy(pooled[:1]),
                     negative_pooled_prompt_embeds=torch.from_numpy(pooled[1:]))
    theirs = ref(latents=latents, **given, **kw).images
    ours = ours_pipe(prompt, negative_prompt=negative, latents=latents.numpy(), prompt_weighting=True, **kw).images
    if backend == "openvino":
        ours_pipe.close()
    diff = float(np.abs(ours - theirs).max())
    print(f"{kind} {backend} {name} image: max abs difference {diff:.2e}")
    assert diff <= IMAGE_TOLERANCE


def test_option_off_keeps_todays_images(pipes):
    ours_pipe, _, _ = pipes("sd15")
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", seed=1)
    plain = ours_pipe("a (cat)1.3", **kw).images
    np.testing.assert_array_equal(ours_pipe("a (cat)1.3", prompt_weighting=False, **kw).images, plain)
    assert np.abs(ours_pipe("a (cat)1.3", prompt_weighting=True, **kw).images - plain).max() > 0


@pytest.mark.parametrize("prompt, syntax, where", [
    ("a (cat on a mat", "compel", "at character 2: unbalanced '('"),
    ("a cat) on a mat", "compel", "at character 5: unbalanced ')'"),
    ('a "cat on a mat', "compel", "at character 2: unbalanced '\"'"),
    ("a (cat:1.2.3) on a mat", "a1111", "at character 2: the group's weight '1.2.3' is not a number"),
    ("a [cat on a mat", "a1111", "at character 2: unbalanced '['"),
])
def test_bad_syntax_is_one_line_naming_the_position(pipes, prompt, syntax, where):
    ours_pipe, _, _ = pipes("sd15")
    with pytest.raises(DiffrtError, match="prompt_weighting") as info:
        ours_pipe.request(prompt, prompt_weighting=syntax)
    message = str(info.value)
    assert "\n" not in message and where in message


def test_long_prompt_on_a_fixed_length_unet_is_refused(exported, tmp_path):
    """Older exports fix the UNet's text length at 77 (an integer in the manifest's
    encoder_hidden_states spec, here written into a copy's manifest): a prompt of three
    chunks is refused in one line at request time; one chunk still runs."""
    import json

    from conftest import copy_artifact

    folder = copy_artifact(exported("sd15"), tmp_path / "fixed")
    manifest = json.loads((folder / "manifest.json").read_text())
    for stage in manifest["stages"].values():
        for tensor in stage["inputs"]:
            if tensor["name"] == "encoder_hidden_states":
                tensor["shape"][1] = 77
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(folder)
    try:
        with pytest.raises(DiffrtError, match="needs 3 chunks of 75 tokens.*UNet takes 77") as info:
            pipe.request(LONG, prompt_weighting=True)
        assert "\n" not in str(info.value)
        pipe.request(PROMPTS["nested"], prompt_weighting=True)  # one chunk
    finally:
        pipe.close()


def test_long_prompts_batch_only_with_the_same_chunk_count(pipes):
    """Requests whose prompts take 3 chunks share a batch (one UNet call of 231 text
    tokens per step), each with the image it gets alone; a one-chunk request does not
    join them (its conditioning is 77 tokens long)."""
    pipe, _, _ = pipes("sd15")
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", prompt_weighting=True)
    first = pipe.request(LONG, seed=1, **kw)
    second = pipe.request(LONG.replace("red fox", "(grey cat)1.3"), negative_prompt="ugly", seed=2, **kw)
    short = pipe.request(PROMPTS["up"], seed=3, **kw)
    assert pipe.batch_key(first) == pipe.batch_key(second) != pipe.batch_key(short)
    together = pipe.generate([first, second])
    for request, out in zip((first, second), together, strict=True):
        alone = pipe.generate([request])[0].images
        assert out.images.shape == alone.shape and float(np.abs(out.images - alone).max()) <= 1e-5
    with pytest.raises(DiffrtError, match="group them by batch_key"):
        pipe.generate([first, short])


def test_bad_option_value_is_one_line(pipes):
    ours_pipe, _, _ = pipes("sd15")
    with pytest.raises(DiffrtError, match="prompt_weighting='sdxl'; choose one of: compel, a1111"):
        ours_pipe.request("a cat", prompt_weighting="sdxl")


# -- the CLI flag and the server field ------------------------------------------------------

FAST = dict(num_inference_steps=2, scheduler="euler", height=64, width=64, seed=3)


def test_cli_weighted_prompts_flag(pipes, exported, tmp_path):
    """--weighted-prompts gives the pipeline's image with prompt_weighting on (a1111 when
    named); a bad prompt is one line on stderr."""
    import subprocess
    import sys

    from PIL import Image

    ours_pipe, _, _ = pipes("sd15")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffrt.cli", "generate", str(exported("sd15")), *args,
                               "--steps", "2", "--scheduler", "euler", "--size", "64x64", "--seed", "3"],
                              capture_output=True, text=True, timeout=600)

    for flag, prompt, syntax in ((["--weighted-prompts"], "a (red cat)1.4", True),
                                 (["--weighted-prompts", "a1111"], "a (red cat:1.4)", "a1111")):
        out = tmp_path / f"{syntax}.png"
        result = cli(prompt, *flag, "-o", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        expected = ours_pipe(prompt, prompt_weighting=syntax, **FAST).images[0]
        np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    result = cli("a (red cat", "--weighted-prompts", "-o", str(tmp_path / "bad.png"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "prompt_weighting" in line]
    assert len(lines) == 1 and "at character 2: unbalanced '('" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_server_prompt_weighting_field(pipes):
    """/v1/generate's prompt_weighting: the pipeline's image with the option; bad syntax
    is a 400 naming the field."""
    pytest.importorskip("fastapi")
    from serve_util import LiveServer, decode_npy

    ours_pipe, _, _ = pipes("sd15")
    fast = {"num_inference_steps": 2, "scheduler": "euler", "size": "64x64", "seed": 3, "output_format": "npy"}
    with LiveServer(ours_pipe, warmup=False) as server:
        for value in (True, "a1111"):
            prompt = "a (red cat)1.4" if value is True else "a (red cat:1.4)"
            status, _, body = server.post("/v1/generate", {"prompt": prompt, "prompt_weighting": value, **fast})
            assert status == 200, body
            expected = ours_pipe(prompt, prompt_weighting=value, output_type="np", **FAST).images[0]
            np.testing.assert_allclose(decode_npy(body["images"][0]["b64"]), expected, atol=1e-6)
        status, _, body = server.post("/v1/generate", {"prompt": "a (red cat", "prompt_weighting": True, **fast})
        assert status == 400, body
        assert body["error"]["param"] == "prompt_weighting" and "unbalanced '('" in body["error"]["message"]


def test_refiner_handoff_weights_the_refiners_prompt_too(pipes, exported):
    """base + refiner in one call with prompt_weighting: the refiner reads the prompt
    with weights as well (its image is the two calls spelled out, both weighted), not as
    plain text."""
    base, _, _ = pipes("sdxl")
    refiner = Pipeline.load(exported("sdxl-refiner"))
    prompt = "a (lighthouse)1.4 at dusk-"
    shape = base.family.latent_shape(base.facts, 1, 64, 64)
    latents = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    kw = dict(num_inference_steps=6, guidance_scale=5.0, height=64, width=64, scheduler="euler", seed=2)
    together = base(prompt, latents=latents, refiner=refiner, high_noise_frac=0.5, output_type="np",
                    prompt_weighting=True, **kw).images
    handed = base(prompt, latents=latents, denoising_end=0.5, output_type="latent", prompt_weighting=True,
                  **kw).images
    kw.pop("height"), kw.pop("width")

    def refine(weighting):
        return refiner(prompt, image=handed, denoising_start=0.5, output_type="np", prompt_weighting=weighting,
                       **kw).images

    np.testing.assert_allclose(together, refine(True), atol=1e-6)
    assert np.abs(together - refine(None)).max() > 1e-4
    refiner.close()


# -- the parser against compel's, on generated prompts -------------------------------------

def _generated_prompts():
    """Prompts in the documented syntax: words (some with ',' '.' '-' '\\''), '+'/'-'
    suffixes on plain words, nested parenthesized groups with a number or signs after
    them, quoted groups at the top level."""
    from hypothesis import strategies as st

    words = st.sampled_from(["cat", "red", "a", "sitting", "well-known", "x2", "mat,", "dusk.", "o'clock"])
    word = st.builds(lambda w, s: w + (s if w[-1].isalnum() else ""), words, st.sampled_from(["", "+", "++", "-"]))
    weight = st.sampled_from(["", "1.3", "0.5", "2", ".7", "+", "--"])

    def group(inner, marks=("(", ")")):
        return st.builds(lambda ws, w: marks[0] + " ".join(ws) + marks[1] + w, st.lists(inner, min_size=1, max_size=4),
                         weight)

    item = st.recursive(word, group, max_leaves=8)
    return st.lists(item | group(item, ('"', '"')), min_size=1, max_size=6).map(" ".join)


def test_parse_matches_compels_parser_on_generated_prompts():
    from hypothesis import given, settings

    from diffrt.prompt_syntax import parse

    parser = compel.prompt_parser.PromptParser()

    @settings(max_examples=40, deadline=None, database=None)
    @given(_generated_prompts())
    def check(prompt):
        theirs = [(f.text, f.weight) for f in parser.parse_conjunction(prompt).prompts[0].children]
        assert [(f.text, f.weight) for f in parse(prompt)] == theirs, prompt

    check()
