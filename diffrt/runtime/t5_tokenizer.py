"""T5 tokenizer for the runtime (SD3's text_encoder_3, Flux's text_encoder_2): prompt
strings -> int64 token ids, torch-free, with the `tokenizers` library only.

A checkpoint's T5 tokenizer folder holds spiece.model (SentencePiece) and usually
tokenizer.json; the runtime reads tokenizer.json, which `diffrt export` writes from
spiece.model when the checkpoint has none (diffrt.export.t5), so no sentencepiece here.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from diffrt.errors import DiffrtError
from diffrt.runtime.tokenizers import (
    _MAX_SANE_MODEL_MAX_LENGTH,
    MAX_PROMPT_CHARS,
    _encode_prompts,
    _read_json,
    _resolve_special_tokens,
    _token_id,
    _tokens_to_add,
)

logger = logging.getLogger(__name__)

# T5Tokenizer.__init__'s defaults (T5 has no bos token).
DEFAULT_SPECIAL_TOKENS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


class T5Tokenizer:
    """Prompts -> int64 ids [batch, max_length] for a T5 encoder (SD3's text_encoder_3,
    Flux's text_encoder_2), the ids transformers' (>= 5) T5TokenizerFast gives with
    diffusers' call:

        tok(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True).input_ids

    Built as transformers 5's T5Tokenizer.__init__ rebuilds the backend from a
    checkpoint's tokenizer.json (it keeps only the vocabulary and the SentencePiece
    normalizer's precompiled character map from the file): a Unigram model (unk id 2, no
    byte fallback), that Precompiled normalizer, whitespace split + Metaspace ("▁",
    prepended to every word), the special and `<extra_id_N>` sentinel tokens split out of
    the raw text first, then `... </s>`; truncation keeps the last place for `</s>`,
    padding with `<pad>` (id 0) on the right. A checkpoint with only spiece.model gets its
    tokenizer.json at export (diffrt.export.t5), so the runtime needs no sentencepiece.
    The length is given per call (diffusers' `max_sequence_length`)."""

    def __init__(self, tokenizer: Tokenizer, model_max_length: int | None, pad_token_id: int,
                 padding_side: str = "right", truncation_side: str = "right"):
        self._tokenizer = tokenizer  # no truncation or padding: `_sized` adds them per length
        self.model_max_length = model_max_length
        self.pad_token_id = pad_token_id
        self.max_prompt_chars = MAX_PROMPT_CHARS
        self._sides = (padding_side, truncation_side)
        self._counter: Tokenizer | None = None
        self._by_length: dict[int, Tokenizer] = {}

    @classmethod
    def from_dir(cls, folder: str | Path) -> T5Tokenizer:
        """Load a T5 tokenizer folder: tokenizer.json (required), tokenizer_config.json and
        special_tokens_map.json (optional; transformers' precedence, as for CLIP)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DiffrtError(f"tokenizer folder {folder} does not exist or is not a directory; pass a T5 "
                              "tokenizer folder (tokenizer.json, tokenizer_config.json)")
        config = _read_json(folder / "tokenizer_config.json", required=False) or {}
        path = folder / "tokenizer.json"
        tokenizer_json = _read_json(path, required=False)
        if tokenizer_json is None:
            raise DiffrtError(f"{path} is missing; diffrt's runtime reads T5 tokenizers from tokenizer.json "
                              "(diffrt export writes it from spiece.model): re-export the model")
        special = _resolve_special_tokens(config, folder, tokenizer_json, defaults=DEFAULT_SPECIAL_TOKENS)
        if not any("<extra_id_" in str(t) for t in special.extra):  # T5Tokenizer's sentinel tokens
            special.extra += [f"<extra_id_{i}>" for i in range(int(config.get("extra_ids", 100)))]
        tokenizer = Tokenizer(_unigram(tokenizer_json, path))
        charsmap = _precompiled_charsmap(tokenizer_json.get("normalizer"))
        if charsmap is not None:
            tokenizer.normalizer = normalizers.Precompiled(charsmap)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ])
        tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
        tokenizer.add_tokens(_tokens_to_add(special))
        if config.get("split_special_tokens", False):
            tokenizer.encode_special_tokens = True
        unk = special.named.get("unk_token")
        ids = {key: _token_id(tokenizer, special.named[key], unk) if key in special.named else None
               for key in ("eos_token", "pad_token")}
        for key, value in ids.items():
            if value is None:
                raise DiffrtError(f"{folder / 'tokenizer_config.json'}: {key}={special.named.get(key)!s:.40} has no "
                                  f"id in the vocabulary; T5 uses {DEFAULT_SPECIAL_TOKENS[key]!r}")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", ids["eos_token"])])
        sides = [config.get(name) or "right" for name in ("padding_side", "truncation_side")]
        if any(side not in ("right", "left") for side in sides):
            raise DiffrtError(f"{folder / 'tokenizer_config.json'}: padding_side/truncation_side {sides}; expected "
                              "'right' or 'left'")
        length = config.get("model_max_length")
        sane = isinstance(length, int) and not isinstance(length, bool) and 2 < length < _MAX_SANE_MODEL_MAX_LENGTH
        return cls(tokenizer, length if sane else None, ids["pad_token"], *sides)

    def __call__(self, prompts: list[str], max_length: int | None = None) -> np.ndarray:
        """Token ids, int64 [len(prompts), max_length]: tokens, `</s>`, padding.
        `max_length` (default: the tokenizer's model_max_length) is diffusers'
        max_sequence_length."""
        length = self.model_max_length if max_length is None else max_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise DiffrtError(f"T5 tokenizer: max_length must be a positive integer (the tokenizer folder gives "
                              f"none), got {max_length!r}")
        return _encode_prompts(self, self._sized(length), prompts, length)

    def _sized(self, length: int) -> Tokenizer:
        """A copy truncating and padding to `length`, built once per length (the shared
        backend is never reconfigured under a concurrent call)."""
        sized = self._by_length.get(length)
        if sized is None:
            sized = Tokenizer.from_str(self._tokenizer.to_str())
            padding_side, truncation_side = self._sides
            sized.enable_truncation(max_length=length, stride=0, strategy="longest_first", direction=truncation_side)
            sized.enable_padding(direction=padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                                 pad_token=sized.id_to_token(self.pad_token_id), length=length)
            self._by_length[length] = sized
        return sized


def _unigram(tokenizer_json: dict[str, Any], path: Path) -> Unigram:
    """The Unigram model of a T5 tokenizer.json, as transformers 5 rebuilds it (unk id
    2, the T5 vocabulary's <pad>, </s>, <unk> order; no byte fallback)."""
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab")
    try:
        pieces = [(str(piece), float(score)) for piece, score in vocab]
        if model.get("type") != "Unigram" or len(pieces) < 3:
            raise ValueError(f"model type {model.get('type')!r}")
        return Unigram(pieces, unk_id=2, byte_fallback=False)
    except (TypeError, ValueError) as exc:
        raise DiffrtError(f"{path} does not hold a SentencePiece Unigram model with a vocabulary ({exc}); it is "
                          "not a T5 tokenizer -- re-download the checkpoint's tokenizer folder") from None


def _precompiled_charsmap(normalizer: Any) -> bytes | None:
    """The SentencePiece normalizer's character map (base64 in tokenizer.json), from a
    Precompiled normalizer alone or inside a Sequence; None when there is none."""
    if not isinstance(normalizer, dict):
        return None
    parts = normalizer.get("normalizers") if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts or []:
        if isinstance(part, dict) and part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return base64.b64decode(part["precompiled_charsmap"])
    return None


__all__ = ["DEFAULT_SPECIAL_TOKENS", "T5Tokenizer"]
