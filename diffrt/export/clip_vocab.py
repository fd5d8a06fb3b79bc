"""Write CLIP BPE tokenizer folders (vocab.json, merges.txt, special_tokens_map.json,
tokenizer_config.json), the files a diffusers Stable Diffusion checkpoint's `tokenizer/`
folder holds.

Two vocabularies:

* `write_tiny_clip_tokenizer` -- a small CLIP-style vocabulary trained here, offline and
  deterministically, from a short embedded English text. For `diffrt demo` and for tests
  that build tiny random-weight checkpoints (the text encoder's `vocab_size` must be at
  least the vocabulary's size).
* `write_real_clip_tokenizer` -- OpenAI CLIP's 49408-token vocabulary, rebuilt from
  `bpe_simple_vocab_16e6.txt.gz` exactly as CLIP's `SimpleTokenizer` builds it (the same
  vocab.json / merges.txt as `openai/clip-vit-large-patch14`). `find_clip_bpe_vocab`
  locates that file in an installed package (clip-anytorch, open_clip_torch or OpenAI's
  clip); install clip-anytorch with `pip install --no-deps clip-anytorch`, since its
  dependencies pull a CUDA torch.

Both layouts are loadable by transformers' `CLIPTokenizer.from_pretrained` and by
`diffrt.runtime.tokenizers.CLIPTokenizer.from_dir`. Imports no torch.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path

from diffrt.errors import DiffrtError
from diffrt.runtime.tokenizers import BOS_TOKEN, EOS_TOKEN, clip_normalizer, clip_pre_tokenizer

logger = logging.getLogger(__name__)

BPE_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the gz file: with 256
# byte symbols, their 256 "</w>" forms and 2 special tokens that makes 49408 ids.
NUM_CLIP_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77
# Packages that ship OpenAI's BPE merges file, in the order they are tried.
_BPE_VOCAB_DISTRIBUTIONS = ("clip-anytorch", "open_clip_torch", "clip")

# A small English text with the kind of words prompts use; the tiny vocabulary's merges
# are learned from it. Changing it changes every tiny checkpoint's token ids.
_TINY_CORPUS = """
a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus.
a painting of a small red fox sitting in a snowy forest at sunset, oil on canvas.
portrait of an old man with a long white beard, dramatic lighting, studio photo.
a cozy cabin in the mountains with warm light in the windows, digital art.
a bowl of fresh fruit on a wooden table: apples, oranges, bananas and grapes.
the city at night with neon lights reflecting in the rain, cinematic, wide angle.
a cute cat wearing a tiny hat, watercolor illustration, soft pastel colors.
an ancient castle on a cliff above the stormy sea, fantasy landscape, matte painting.
a robot reading a book in a library full of plants, concept art, trending.
a field of sunflowers under a bright blue sky with white clouds, summer morning.
a close up of a flower with drops of water, macro photography, beautiful bokeh.
a dragon flying over a village, epic scene, golden hour, very detailed texture.
a girl walking her dog along the beach, film photo, natural light, 35mm.
the interior of a modern kitchen with marble counters and green plants, render.
a steaming cup of coffee next to an open notebook and a pen, top view.
it's a quiet street in an old town; there are bicycles and flowers everywhere.
they're standing by the river where the water is clear and the stones are round.
we've seen the northern lights over the frozen lake, and it was wonderful.
i'll paint the portrait again with better colors, lighter shadows and stronger lines.
the quick brown fox jumps over the lazy dog. the five boxing wizards jump quickly.
abstract shapes and patterns, vibrant colors, minimal design, black and white, 4k, 8k.
a knight in shining armor holding a glowing sword, medieval battlefield, smoke and fire.
an underwater coral reef with colorful fish, jellyfish and a sleeping turtle, photorealistic.
a futuristic spaceship landing in the desert near a pyramid, science fiction poster.
a vintage car parked in front of a diner, retro style, faded polaroid, nostalgic mood.
a snowy owl perched on a branch in winter, feathers in fine detail, telephoto lens.
a busy market in marrakech with spices, lanterns and carpets, travel photography.
a chef cooking pasta in a rustic italian kitchen, tomatoes, basil and olive oil.
a lighthouse during a thunderstorm with lightning striking the ocean, long exposure.
a giant tree house connected by rope bridges in a misty jungle, whimsical, pixar style.
a ballerina dancing on stage under a spotlight, motion blur, elegant, graceful pose.
a samurai standing in a bamboo grove, cherry blossoms falling, ukiyo-e woodblock print.
a scientist looking through a microscope in a laboratory, blue light, clean composition.
a herd of elephants crossing a river in the savanna at dawn, national geographic.
a portrait of a queen wearing a golden crown with jewels, renaissance painting, baroque.
an isometric view of a tiny island with a windmill, low poly, pastel palette, 3d.
a child flying a kite on a windy hill, autumn leaves, warm tones, children's book.
a cyberpunk hacker in a dark room lit by monitors, hologram interface, synthwave.
a mountain lake reflecting snowy peaks, crystal clear water, hyperrealistic, 16k uhd.
a bouquet of roses, tulips and daisies in a glass vase, still life, chiaroscuro.
a wolf howling at the full moon on a rocky ridge, silhouette, starry night sky.
"""


def find_clip_bpe_vocab() -> Path | None:
    """Return the path of OpenAI's `bpe_simple_vocab_16e6.txt.gz` from an installed
    package, or None when no package that ships it is installed.

    Looks at the installed files of each distribution without importing it (importing
    `clip` would import torch).
    """
    for dist_name in _BPE_VOCAB_DISTRIBUTIONS:
        try:
            files = importlib.metadata.files(dist_name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if file.name == BPE_VOCAB_FILENAME:
                path = Path(file.locate())
                if path.is_file():
                    return path
    # Installed without metadata (e.g. a source checkout on sys.path).
    for module in ("clip", "open_clip"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                path = Path(location) / BPE_VOCAB_FILENAME
                if path.is_file():
                    return path
    return None


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's map from each byte to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the others (controls, space, 0x7f-0xa0,
    0xad) map to chr(256 + n) in byte order. The dict's order is the order of the first
    256 vocabulary ids.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The vocabulary CLIP's SimpleTokenizer builds: 256 byte symbols, their "</w>" forms,
    one token per merge, then <|startoftext|> and <|endoftext|>."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise DiffrtError(f"the merges produce duplicate tokens ({len(tokens) - len(vocab)} of them)")
    return vocab


def _write_tokenizer_folder(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> None:
    if pad_token not in vocab:
        raise DiffrtError(
            f"pad_token={pad_token!r} is not in the vocabulary; use '<|endoftext|>' (SD 1.x) or '!' (SD 2.x)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)

    # The layout of the diffusers SD 1.x / 2.x checkpoints' tokenizer/ folders (no
    # "added_tokens_decoder", so transformers reads special_tokens_map.json too).
    def added_token(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special_tokens_map = {
        "bos_token": added_token(BOS_TOKEN),
        "eos_token": added_token(EOS_TOKEN),
        "pad_token": pad_token,
        "unk_token": added_token(EOS_TOKEN),
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **added_token(BOS_TOKEN)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **added_token(EOS_TOKEN)},
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **added_token(EOS_TOKEN)},
    }
    for name, content in (("special_tokens_map.json", special_tokens_map), ("tokenizer_config.json", tokenizer_config)):
        with open(folder / name, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
            f.write("\n")
    logger.debug("wrote a %d-token CLIP tokenizer to %s (pad_token=%r)", len(vocab), folder, pad_token)


def write_real_clip_tokenizer(folder: Path, bpe_gz_path: Path, pad_token: str = EOS_TOKEN) -> None:
    """Write OpenAI CLIP's 49408-token tokenizer, built from `bpe_simple_vocab_16e6.txt.gz`
    as CLIP's SimpleTokenizer builds it, to `folder`.

    `pad_token` is "<|endoftext|>" for SD 1.x (CLIP ViT-L/14) and "!" for SD 2.x
    (OpenCLIP ViT-H/14). `find_clip_bpe_vocab()` locates the gz file.
    """
    bpe_gz_path = Path(bpe_gz_path)
    try:
        with gzip.open(bpe_gz_path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DiffrtError(
            f"cannot read {bpe_gz_path} ({e}); it should be OpenAI's {BPE_VOCAB_FILENAME} "
            "(`pip install --no-deps clip-anytorch` ships it)"
        ) from e
    # Line 0 is a version header; like SimpleTokenizer, keep exactly NUM_CLIP_MERGES.
    merges = [tuple(line.split()) for line in lines[1 : NUM_CLIP_MERGES + 1]]
    if len(merges) != NUM_CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise DiffrtError(
            f"{bpe_gz_path} does not hold {NUM_CLIP_MERGES} 'a b' merge lines after its header; "
            f"it should be OpenAI's {BPE_VOCAB_FILENAME}"
        )
    _write_tokenizer_folder(Path(folder), _clip_vocab(merges), merges, pad_token)


@functools.lru_cache(maxsize=8)
def _train_tiny_merges(num_merges: int) -> tuple[tuple[str, str], ...]:
    """Learn `num_merges` BPE merges from `_TINY_CORPUS`, deterministically.

    Words come from the same normalizer and pre-tokenizer the runtime uses, so they are
    byte-level strings; the last symbol of each word carries the "</w>" suffix, as in
    CLIP. Each step merges the most frequent adjacent pair (ties: the smallest pair).
    """
    normalizer, pre_tokenizer = clip_normalizer(), clip_pre_tokenizer()
    text = normalizer.normalize_str(_TINY_CORPUS)
    word_counts = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    words = [[*w[:-1], w[-1] + "</w>"] for w in word_counts]
    counts = list(word_counts.values())
    seen = set(bytes_to_unicode().values()) | {s + "</w>" for s in bytes_to_unicode().values()}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, count in zip(words, counts, strict=True):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        # A pair whose concatenation is already a token (e.g. "ab"+"c" after "a"+"bc")
        # would give CLIP's vocabulary a duplicate entry; skip it.
        candidates = [(-c, p) for p, c in pair_counts.items() if "".join(p) not in seen]
        if not candidates:
            raise DiffrtError(
                f"the embedded corpus yields only {len(merges)} merges; ask for a vocab_size of at most "
                f"{len(merges) + 2 * 256 + 2}"
            )
        _, best = min(candidates)
        merges.append(best)
        seen.add("".join(best))
        words = [_apply_merge(word, best) for word in words]
    return tuple(merges)


def _apply_merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_tiny_clip_tokenizer(folder: Path, pad_token: str = EOS_TOKEN, vocab_size: int = 1000) -> None:
    """Write a tiny CLIP-style BPE tokenizer of exactly `vocab_size` tokens to `folder`.

    Ids 0-511 are the 256 byte symbols and their "</w>" forms (so any text encodes without
    unknown tokens), then `vocab_size - 514` merges learned from an embedded English text,
    then "<|startoftext|>" and "<|endoftext|>" as the last two ids. Deterministic: the same
    arguments always write the same files. A text encoder for it needs a `vocab_size` of
    at least this `vocab_size`, `bos_token_id = vocab_size - 2` and
    `eos_token_id = vocab_size - 1`; the pad token "!" is id 0.
    """
    if vocab_size < 2 * 256 + 2:
        raise DiffrtError(f"vocab_size={vocab_size} is too small: a CLIP BPE vocabulary needs at least {2 * 256 + 2}")
    merges = list(_train_tiny_merges(vocab_size - 2 * 256 - 2))
    _write_tokenizer_folder(Path(folder), _clip_vocab(merges), merges, pad_token)
