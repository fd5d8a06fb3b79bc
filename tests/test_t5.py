"""The T5 pieces SD3 and Flux share: the runtime tokenizer against transformers'
T5TokenizerFast, the exported encoder against transformers' T5EncoderModel (external
data included), and the precision rule the manifest records.

The tokenizer reference is diffusers' call (SD3's `_get_t5_prompt_embeds`, Flux's):
    tok(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
        add_special_tokens=True).input_ids
on a tiny SentencePiece Unigram model trained here (T5's <pad>/</s>/<unk> layout and
its nmt_nfkc normalizer), in the folder layouts checkpoints have: as transformers
saves it, a hub-style one (added_tokens_decoder, special_tokens_map.json), and
spiece.model alone (converted to tokenizer.json at export).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentencepiece", reason="the tiny T5 tokenizer is trained with sentencepiece (export extra)")
torch = pytest.importorskip("torch")

from diffrt.artifacts import StageSpec  # noqa: E402
from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.export import onnx_graph  # noqa: E402
from diffrt.export.t5 import ensure_tokenizer_json, t5_stage, tiny_t5_encoder, write_tiny_t5_tokenizer  # noqa: E402
from diffrt.families import t5  # noqa: E402
from diffrt.runtime.t5_tokenizer import T5Tokenizer  # noqa: E402
from diffrt.runtime.tokenizers import load_tokenizer  # noqa: E402

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "A Photo Of A CAT!",
    "café naïve crème brûlée, Ångström",
    "ｆｕｌｌ ｗｉｄｔｈ ﬁ ligature ½ ² Ⅻ",
    "東京の夜景 北京 서울 русский",
    "multiple    spaces\n\nnewlines\ttabs\u00a0nbsp\u3000ideographic",
    "the end </s> after eos <pad> <unk> and <extra_id_0> <extra_id_99> sentinels",
    "</s></s>x<extra_id_3>y",
    "(((masterpiece))), [[bad hands]], {best quality} 4k 50% 3.14",
    "xyzzy qwv zzz unknown letters",
    "a cat 🐱 with a 🎩 hat",
    "red " * 300,  # past every length below: truncated, </s> kept last
]
LENGTHS = (8, 77, 256)
LAYOUTS = ("saved_by_transformers", "hub_style", "spiece_only")


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    """{layout: folder} of one tiny trained T5 tokenizer."""
    root = tmp_path_factory.mktemp("t5_tokenizers")
    saved = root / "saved_by_transformers"
    write_tiny_t5_tokenizer(saved)
    hub = root / "hub_style"
    shutil.copytree(saved, hub)
    # the hub's T5-XXL layout: the specials and sentinels in added_tokens_decoder,
    # additional_special_tokens, special_tokens_map.json, legacy/add_prefix_space flags
    vocab = {piece: i for i, (piece, _) in enumerate(json.loads((hub / "tokenizer.json").read_text())["model"]["vocab"])}
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    sentinels = [f"<extra_id_{i}>" for i in range(100)]
    config = json.loads((hub / "tokenizer_config.json").read_text())
    config.pop("extra_special_tokens", None)
    config.update(added_tokens_decoder={str(vocab[t]): {"content": t, **entry} for t in ("<pad>", "</s>", "<unk>",
                                                                                          *sentinels)},
                  additional_special_tokens=sentinels, legacy=True, add_prefix_space=True, extra_ids=100)
    (hub / "tokenizer_config.json").write_text(json.dumps(config))
    (hub / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": sentinels}))
    spiece = root / "spiece_only"
    spiece.mkdir()
    shutil.copy(saved / "spiece.model", spiece / "spiece.model")
    return {"saved_by_transformers": saved, "hub_style": hub, "spiece_only": spiece}


def reference_ids(folder: Path, prompts: list[str], length: int) -> np.ndarray:
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(folder)
    return tok(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
               return_tensors="np").input_ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_equal_transformers(t5_folders, layout, tmp_path):
    """Every prompt at every length: ids byte-identical to transformers' on the
    checkpoint's folder (a spiece.model-only folder as the exporter completes it)."""
    folder = t5_folders[layout]
    runtime_folder = folder
    if layout == "spiece_only":
        runtime_folder = tmp_path / "copied"
        shutil.copytree(folder, runtime_folder)
        ensure_tokenizer_json(runtime_folder)
        assert not (folder / "tokenizer.json").exists()
    ours = load_tokenizer(runtime_folder, "t5")
    for length in LENGTHS:
        theirs = reference_ids(folder, PROMPTS, length)
        got = ours(PROMPTS, max_length=length)
        assert got.dtype == np.int64 and got.shape == (len(PROMPTS), length)
        mismatched = [p for p, a, b in zip(PROMPTS, got, theirs, strict=True) if not np.array_equal(a, b)]
        assert not mismatched, f"{layout}, length {length}: {mismatched[:3]}"
    assert (got[:, -1] != 0).any() and (got == 0).any()  # both truncation and padding happened


def test_default_length_and_errors(t5_folders, tmp_path, caplog):
    tok = T5Tokenizer.from_dir(t5_folders["saved_by_transformers"])
    assert tok(["a cat"]).shape == (1, 512)  # the folder's model_max_length, as transformers pads by default
    with pytest.raises(DiffrtError, match="lone UTF-16 surrogate"):
        tok(["bad \udc80 text"], max_length=8)
    with pytest.raises(DiffrtError, match="max_length must be a positive integer"):
        tok(["a cat"], max_length=0)
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        tok(["red " * 40], max_length=8)
    assert "prompt truncated: the text encoder takes 8 tokens" in caplog.text
    missing = tmp_path / "only_config"
    missing.mkdir()
    shutil.copy(t5_folders["saved_by_transformers"] / "tokenizer_config.json", missing)
    with pytest.raises(DiffrtError, match="tokenizer.json is missing"):
        T5Tokenizer.from_dir(missing)
    with pytest.raises(DiffrtError, match="neither tokenizer.json nor spiece.model"):
        ensure_tokenizer_json(missing)
    clip = tmp_path / "clip"
    from diffrt.export.clip_vocab import write_tiny_clip_tokenizer

    write_tiny_clip_tokenizer(clip, pad_token="!")
    (clip / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(DiffrtError, match="not a T5 tokenizer"):
        T5Tokenizer.from_dir(clip)


@pytest.mark.parametrize("external", [False, True])
def test_exported_encoder_matches_transformers(tmp_path, monkeypatch, external):
    """The T5 stage at a length it was not traced at, on ONNX Runtime and OpenVINO,
    against transformers' T5EncoderModel; `external`: the weights forced out of the
    graph file into model.onnx.data (as a real T5-XXL's 19 GB must be)."""
    from diffrt.export.passes.compare import run_graph

    if external:
        monkeypatch.setattr(onnx_graph, "_PROTOBUF_LIMIT", 0)
    encoder = tiny_t5_encoder(vocab_size=200)
    stage = t5_stage(encoder, torch.Generator().manual_seed(0), "text_encoder_3")
    inputs, outputs = t5.stage_io(encoder.config.d_model)
    spec = StageSpec(name="text_encoder_3", inputs=inputs, outputs=outputs, role="text_encoder_3")
    files = onnx_graph.export_graph(stage.module, stage.trace_inputs, spec, tmp_path / "t5", 17)
    assert [f.name for f in files] == (["model.onnx", "model.onnx.data"] if external else ["model.onnx"])
    ids = torch.randint(3, 200, (3, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = encoder(input_ids=ids).last_hidden_state.numpy()
    runtimes = [("ort", "f32")] + ([("openvino", "f32")] if _has("openvino") else [])
    for runtime, precision in runtimes:
        got = run_graph(tmp_path / "t5", {"input_ids": ids.numpy()}, runtime, precision)["last_hidden_state"]
        assert np.abs(got - expected).max() < 1e-4, runtime


def test_fp16_t5_overflows_where_bf16_does_not(tmp_path):
    """Why T5 gets no fp16 graph (families/t5.py): with block outputs pushed to ~1e3
    (real T5-XXL goes past 1e4), the fp16 graph's output is wrong by its whole scale
    while the bf16 one stays close; onnx's reference evaluator rounds after every op, as
    a GPU computing in half does (ONNX Runtime's CPU EP would compute most ops in fp32
    and hide it)."""
    from diffrt.export.passes import to_half
    from diffrt.export.passes.compare import run_graph

    encoder = tiny_t5_encoder(vocab_size=200, d_model=64, layers=4)
    with torch.no_grad():
        for block in encoder.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(300.0)
    stage = t5_stage(encoder, torch.Generator().manual_seed(0), "text_encoder_3")
    inputs, outputs = t5.stage_io(64)
    spec = StageSpec(name="text_encoder_3", inputs=inputs, outputs=outputs, role="text_encoder_3")
    onnx_graph.export_graph(stage.module, stage.trace_inputs, spec, tmp_path / "fp32", 17)
    feeds = {k: v.numpy() for k, v in stage.check_inputs.items()}
    reference = run_graph(tmp_path / "fp32", feeds, "ort")["last_hidden_state"]
    errors = {}
    for dtype in ("fp16", "bf16"):
        to_half(tmp_path / "fp32", tmp_path / dtype, dtype=dtype)
        with np.errstate(all="ignore"):
            got = run_graph(tmp_path / dtype, feeds, "reference")["last_hidden_state"].astype(np.float64)
        errors[dtype] = float(np.nan_to_num(np.abs(got - reference), nan=np.inf).max())
    scale = float(np.abs(reference).max())
    assert errors["fp16"] > 0.5 * scale, errors
    assert errors["bf16"] < 0.05 * scale, errors


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
