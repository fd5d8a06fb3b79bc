"""diffrt's CLIPTokenizer against transformers' CLIPTokenizer on the same files.

The reference is what diffusers' StableDiffusionPipeline does with transformers >= 5:
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    tok(prompts, padding="max_length", max_length=tok.model_max_length,
        truncation=True, return_tensors="np").input_ids
Ids must be equal, exactly, for OpenAI CLIP's real 49408-token vocabulary (rebuilt from
clip-anytorch's bpe_simple_vocab_16e6.txt.gz; install it with
`pip install --no-deps clip-anytorch`) and for the tiny vocabulary, with SD 1.x's pad
token "<|endoftext|>" and SD 2.x's "!", in each tokenizer/ folder layout checkpoints use.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from diffrt.errors import DiffrtError
from diffrt.export.clip_vocab import (
    NUM_CLIP_MERGES,
    find_clip_bpe_vocab,
    write_real_clip_tokenizer,
    write_tiny_clip_tokenizer,
)
from diffrt.runtime.tokenizers import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer

SD1_PAD, SD2_PAD = EOS_TOKEN, "!"
LONG_PROMPT = "an extremely detailed " + "very " * 90 + "long prompt that goes past seventy seven tokens for sure"
AWKWARD_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photo Of A CAT!",
    "",
    "   ",
    "café crème brûlée, Ångström, naïve façade",  # precomposed accents
    "e\u0301 combining acute, a\u0308, o\u0302\u0323",  # combining characters (NFC composes some)
    "東京の夜景, 北京烤鸭, 서울",  # CJK: one word per letter run, not per character
    "a cat 🐱 with a 🎩 hat 👍🏽 🇯🇵",  # emoji, skin tone modifier, flag
    "ｆｕｌｌ－ｗｉｄｔｈ　ＡＢＣ　１２３",  # full-width forms, ideographic space
    "non\u00a0breaking\u00a0space and\u2009thin\u2003em\u3000ideographic",
    "Ⅻ ½ ² ﬁ ligature ß İstanbul ΣΑΣ Ω",  # compatibility characters, special casing
    "mixed русский текст and العربية and עברית and हिन्दी",
    "ascii art: ¯\\_(ツ)_/¯ ʕ•ᴥ•ʔ (╯°□°)╯︵ ┻━┻",
    "control\x00chars\x07here\x1b[0m and zero\u200bwidth\u200dzwj \ufeffbom",
    "(((masterpiece))), [[bad hands]], {best quality}",
    "[cat:dog:0.5], (red:1.3), <lora:foo:0.8>, a | b, a AND b",
    "1234567890 3.14 1,000,000 2024-01-01 10:30pm 4k 8k 50%",
    "it's don't I'm we're they've you'll he'd IT'S DON'T rock'n'roll ''quoted'' ’curly’",
    "multiple    spaces\n\nnewlines\ttabs\r\nand\vvertical\ffeed",
    "hello!!! world??? wow... ok;;; --- ___ *** ### @@@ $$$",
    "!",
    "a!b!c !!! ! end!",
    "<|startoftext|>inside<|endoftext|> and <|ENDOFTEXT|> upper",
    "&amp; &lt;b&gt; html entities &quot;",
    "x",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a " * 80,
    LONG_PROMPT,
]
LAYOUTS = ("as_written", "special_tokens_map_overrides", "added_tokens_decoder", "saved_by_transformers")


def _transformers_clip_tokenizer():
    transformers = pytest.importorskip("transformers", reason="the reference needs the export extra (transformers)")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(
            f"transformers {transformers.__version__}: the reference is transformers>=5's tokenizers-backed "
            "CLIPTokenizer; 4.x's slow CLIPTokenizer differs on CJK, control characters and ftfy fixes"
        )
    return transformers.CLIPTokenizer


def reference_ids(folder_or_tokenizer, prompts: list[str]) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline gets for `prompts`."""
    tok = folder_or_tokenizer
    if isinstance(tok, Path):
        tok = _transformers_clip_tokenizer().from_pretrained(tok)
    return tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np"
    ).input_ids


# ---------------------------------------------------------------- fixtures: tokenizer/ folders


@pytest.fixture(scope="session")
def bpe_gz() -> Path:
    path = find_clip_bpe_vocab()
    if path is None:
        pytest.skip(
            "clip-anytorch is not installed, so there is no bpe_simple_vocab_16e6.txt.gz to build the real "
            "CLIP vocabulary from; install it with `pip install --no-deps clip-anytorch`"
        )
    return path


@pytest.fixture(scope="session")
def base_folders(tmp_path_factory):
    """Folders written by diffrt.export.clip_vocab, built once: {(vocab, pad): folder}."""
    root = tmp_path_factory.mktemp("clip_tokenizers")
    cache: dict[tuple[str, str], Path] = {}

    def get(vocab: str, pad: str) -> Path:
        if (vocab, pad) not in cache:
            folder = root / f"{vocab}_{'sd2' if pad == SD2_PAD else 'sd1'}"
            if vocab == "tiny":
                write_tiny_clip_tokenizer(folder, pad_token=pad)
            else:
                write_real_clip_tokenizer(folder, find_clip_bpe_vocab(), pad_token=pad)
            cache[vocab, pad] = folder
        return cache[vocab, pad]

    return get


def make_layout(src: Path, dst: Path, layout: str, pad: str) -> Path:
    """A copy of `src` in one of the layouts diffusers checkpoints' tokenizer/ folders have."""
    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    other_pad = SD1_PAD if pad == SD2_PAD else SD2_PAD
    if layout == "special_tokens_map_overrides":
        # stabilityai/stable-diffusion-2-1: the config says "<|endoftext|>", the map "!",
        # and the map wins. Here the config names the other pad; the map names `pad`.
        config["pad_token"] = other_pad
    elif layout == "added_tokens_decoder":
        # Newer configs (e.g. SDXL's tokenizer_2): added_tokens_decoder with non-normalized
        # special tokens; special_tokens_map.json is then ignored (given a wrong pad here).
        vocab = json.loads((dst / "vocab.json").read_text())
        config.update(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=pad)
        entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        config["added_tokens_decoder"] = {str(vocab[t]): {"content": t, **entry} for t in (BOS_TOKEN, EOS_TOKEN)}
        special_map = json.loads((dst / "special_tokens_map.json").read_text())
        (dst / "special_tokens_map.json").write_text(json.dumps({**special_map, "pad_token": other_pad}))
    elif layout == "saved_by_transformers":
        # What `pipe.save_pretrained` writes with transformers 5: tokenizer.json + config only.
        shutil.rmtree(dst)
        _transformers_clip_tokenizer().from_pretrained(src).save_pretrained(dst)
        assert not (dst / "vocab.json").exists()
        return dst
    elif layout != "as_written":
        raise ValueError(layout)
    config_path.write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture
def folder(request, base_folders, tmp_path) -> Path:
    vocab, pad, layout = request.param
    if vocab == "real":
        request.getfixturevalue("bpe_gz")
    return make_layout(base_folders(vocab, pad), tmp_path / "tokenizer", layout, pad)


def _cases(vocabs=("tiny", "real"), pads=(SD1_PAD, SD2_PAD), layouts=LAYOUTS) -> list:
    return [
        pytest.param((v, p, layout), id=f"{v}-{'sd2' if p == SD2_PAD else 'sd1'}-{layout}")
        for v in vocabs
        for p in pads
        for layout in layouts
    ]


def _folder_params(cases: list):
    return pytest.mark.parametrize("folder", cases, indirect=True)


# ---------------------------------------------------------------- ids against transformers


@_folder_params(_cases())
def test_ids_match_transformers(folder):
    ids = CLIPTokenizer.from_dir(folder)(AWKWARD_PROMPTS)
    expected = reference_ids(folder, AWKWARD_PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(AWKWARD_PROMPTS), 77)
    mismatched = [p for p, a, b in zip(AWKWARD_PROMPTS, ids, expected, strict=True) if not np.array_equal(a, b)]
    assert not mismatched, f"ids differ from transformers for {mismatched}"


@_folder_params(_cases(layouts=("as_written",)))
def test_each_prompt_alone_matches_transformers(folder):
    """Batching must not change a prompt's ids (padding is to 77, never to the longest)."""
    tok = CLIPTokenizer.from_dir(folder)
    ref = _transformers_clip_tokenizer().from_pretrained(folder)
    batch = tok(AWKWARD_PROMPTS)
    for i, prompt in enumerate(AWKWARD_PROMPTS):
        single = tok([prompt])
        np.testing.assert_array_equal(single[0], batch[i], err_msg=repr(prompt))
        np.testing.assert_array_equal(single, reference_ids(ref, [prompt]), err_msg=repr(prompt))


@_folder_params(_cases(layouts=("as_written", "saved_by_transformers")))
def test_special_tokens_and_padding(folder):
    tok = CLIPTokenizer.from_dir(folder)
    ref = _transformers_clip_tokenizer().from_pretrained(folder)
    assert (tok.model_max_length, tok.pad_token, tok.pad_token_id) == (77, ref.pad_token, ref.pad_token_id)
    vocab_size = len(json.loads(ref.backend_tokenizer.to_str())["model"]["vocab"])
    bos, eos = vocab_size - 2, vocab_size - 1  # CLIP's last two ids
    assert tok.pad_token_id == (0 if tok.pad_token == SD2_PAD else eos)
    ids = tok(["A", LONG_PROMPT])
    assert ids[0, :3].tolist() == [bos, 320, eos]  # 320 is "a</w>" in both vocabularies
    assert (ids[0, 3:] == tok.pad_token_id).all()
    # Truncation keeps bos and eos: 75 prompt tokens between them.
    assert ids[1, 0] == bos and ids[1, -1] == eos and tok.pad_token_id not in ids[1, 1:-1]


@_folder_params(_cases(vocabs=("tiny",)) + _cases(vocabs=("real",), layouts=("as_written",)))
def test_backend_pipeline_matches_transformers(folder):
    """The same tokenizers.Tokenizer: normalizer, pre-tokenizer, BPE model, added tokens,
    post-processor (padding/truncation are set per call by transformers, so not compared).
    The structure does not depend on the vocabulary, so the real one is checked once."""
    ours = json.loads(CLIPTokenizer.from_dir(folder).backend_tokenizer.to_str())
    theirs = json.loads(_transformers_clip_tokenizer().from_pretrained(folder).backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "model", "added_tokens", "post_processor", "decoder"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("layout", ["special_tokens_map_overrides", "added_tokens_decoder"])
def test_which_file_decides_the_pad(base_folders, tmp_path, layout):
    """Without added_tokens_decoder (SD 2.1: pad "<|endoftext|>" in tokenizer_config.json,
    "!" in special_tokens_map.json) the map wins; with it, the map is ignored."""
    folder = make_layout(base_folders("tiny", SD2_PAD), tmp_path / "t", layout, SD2_PAD)
    config_pad = json.loads((folder / "tokenizer_config.json").read_text())["pad_token"]
    map_pad = json.loads((folder / "special_tokens_map.json").read_text())["pad_token"]
    assert (config_pad, map_pad) == (
        (SD1_PAD, SD2_PAD) if layout == "special_tokens_map_overrides" else (SD2_PAD, SD1_PAD)
    )
    tok = CLIPTokenizer.from_dir(folder)
    assert (tok.pad_token, tok.pad_token_id) == ("!", 0)


def test_empty_batch_and_wrong_argument(base_folders):
    tok = CLIPTokenizer.from_dir(base_folders("tiny", SD1_PAD))
    assert tok([]).shape == (0, 77) and tok([]).dtype == np.int64
    with pytest.raises(TypeError, match="list of str"):
        tok("a single string")
    with pytest.raises(TypeError, match="list of str"):
        tok(["ok", None])


# ---------------------------------------------------------------- the real vocabulary


def _load_simple_tokenizer(bpe_gz: Path, monkeypatch):
    """OpenAI's SimpleTokenizer from clip-anytorch, without importing the `clip` package
    (torch) and with ftfy stubbed out (only its text clean-up uses it)."""
    pytest.importorskip("regex", reason="clip's simple_tokenizer needs the regex package")
    monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=lambda text: text))
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", bpe_gz.parent / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bpe_gz))


def test_real_vocab_is_clips(bpe_gz, base_folders, monkeypatch):
    folder = base_folders("real", SD1_PAD)
    simple = _load_simple_tokenizer(bpe_gz, monkeypatch)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab == simple.encoder
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == NUM_CLIP_MERGES + 1
    assert [tuple(line.split(" ")) for line in lines[1:]] == list(simple.bpe_ranks)
    # Plain ASCII prompts (where ftfy, html.unescape and NFC change nothing) give
    # SimpleTokenizer's ids between bos and eos.
    tok = CLIPTokenizer.from_dir(folder)
    for prompt in AWKWARD_PROMPTS:
        if not prompt.isascii() or "&" in prompt or "<|" in prompt or len(prompt) > 100:
            continue
        expected = [49406, *simple.encode(prompt), 49407]
        ids = tok([prompt])[0]
        assert ids[: len(expected)].tolist() == expected, repr(prompt)


def test_find_clip_bpe_vocab(bpe_gz):
    assert bpe_gz.name == "bpe_simple_vocab_16e6.txt.gz" and bpe_gz.is_file()
    with gzip.open(bpe_gz) as f:
        assert f.readline().startswith(b'"bpe_simple_vocab_16e6.txt#version: 0.2')


def test_write_real_clip_tokenizer_rejects_a_bad_file(tmp_path):
    not_gz = tmp_path / "bpe.txt.gz"
    not_gz.write_text("not gzip")
    with pytest.raises(ValueError, match="bpe.txt.gz"):
        write_real_clip_tokenizer(tmp_path / "out", not_gz)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="merge lines"):
        write_real_clip_tokenizer(tmp_path / "out", short)


# ---------------------------------------------------------------- the tiny vocabulary


def test_tiny_vocab_layout_and_determinism(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "a", vocab_size=700)
    write_tiny_clip_tokenizer(tmp_path / "b", vocab_size=700)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab, key=vocab.get)
    assert len(vocab) == 700 and list(vocab.values()) == list(range(700))
    assert by_id[:2] == ["!", '"'] and by_id[256:258] == ["!</w>", '"</w>'] and by_id[-2:] == [BOS_TOKEN, EOS_TOKEN]
    merges = (tmp_path / "a" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert ["".join(m.split(" ")) for m in merges] == by_id[512:-2]
    # Common words are single tokens, so the tiny checkpoints see word-like ids.
    words = ["a", "portrait", "of", "the", "light"]
    ids = CLIPTokenizer.from_dir(tmp_path / "a")([" ".join(words)])[0]
    assert ids[:7].tolist() == [698, *(vocab[w + "</w>"] for w in words), 699]


@pytest.mark.parametrize("vocab_size", [513, 100_000])
def test_tiny_vocab_size_out_of_range(tmp_path, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_clip_tokenizer(tmp_path, vocab_size=vocab_size)


def test_tiny_vocab_rejects_unknown_pad(tmp_path):
    with pytest.raises(ValueError, match="pad_token"):
        write_tiny_clip_tokenizer(tmp_path, pad_token="<pad>")


# ---------------------------------------------------------------- from_dir errors


def _corrupt(folder: Path, case: str) -> None:
    config_path = folder / "tokenizer_config.json"
    if case == "no tokenizer_config.json":
        config_path.unlink()
    elif case == "tokenizer_config.json not JSON":
        config_path.write_text("{ not json")
    elif case == "tokenizer_config.json a list":
        config_path.write_text("[]")
    elif case == "no model_max_length":
        config = json.loads(config_path.read_text())
        del config["model_max_length"]
        config_path.write_text(json.dumps(config))
    elif case == "model_max_length placeholder":
        config = json.loads(config_path.read_text())
        config["model_max_length"] = 1000000000000000019884624838656  # transformers' "no limit"
        config_path.write_text(json.dumps(config))
    elif case == "no vocab.json":
        (folder / "vocab.json").unlink()
    elif case == "no merges.txt":
        (folder / "merges.txt").unlink()
    elif case == "vocab.json not JSON":
        (folder / "vocab.json").write_text('{"a": 0,')
    elif case == "merges.txt bad line":
        with open(folder / "merges.txt", "a", encoding="utf-8") as f:
            f.write("one two three\n")
    elif case == "merges.txt unknown token":
        with open(folder / "merges.txt", "a", encoding="utf-8") as f:
            f.write("q\u4e00 z\n")
    elif case == "tokenizer.json not JSON":
        (folder / "tokenizer.json").write_text("{")
    elif case == "tokenizer.json not BPE":
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    elif case == "no pad token":
        config = json.loads(config_path.read_text())
        config["pad_token"] = None
        config_path.write_text(json.dumps(config))
        (folder / "special_tokens_map.json").unlink()
    else:
        raise ValueError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no tokenizer_config.json", r"tokenizer_config\.json is missing"),
        ("tokenizer_config.json not JSON", r"tokenizer_config\.json is not valid JSON"),
        ("tokenizer_config.json a list", r"tokenizer_config\.json holds a JSON list"),
        ("no model_max_length", r"tokenizer_config\.json: model_max_length=None.*77"),
        ("model_max_length placeholder", r"tokenizer_config\.json: model_max_length=1000000000000000019884624838656"),
        ("no vocab.json", r"vocab\.json is missing"),
        ("no merges.txt", r"merges\.txt is missing"),
        ("vocab.json not JSON", r"vocab\.json is not valid JSON"),
        ("merges.txt bad line", r"merges\.txt"),
        ("merges.txt unknown token", r"do not fit together"),
        ("tokenizer.json not JSON", r"tokenizer\.json is not valid JSON"),
        ("tokenizer.json not BPE", r"tokenizer\.json does not hold a BPE model"),
        ("no pad token", r"pad_token=None"),
    ],
)
def test_from_dir_errors(base_folders, tmp_path, case, message):
    folder = tmp_path / "tokenizer"
    shutil.copytree(base_folders("tiny", SD1_PAD), folder)
    if case.startswith("tokenizer.json"):
        (folder / "tokenizer.json").write_text("{}")  # created, then corrupted below
    _corrupt(folder, case)
    with pytest.raises(DiffrtError, match=message):
        CLIPTokenizer.from_dir(folder)


def test_from_dir_not_a_folder(tmp_path):
    with pytest.raises(DiffrtError, match="does not exist or is not a directory"):
        CLIPTokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        CLIPTokenizer.from_dir(tmp_path / "file")
