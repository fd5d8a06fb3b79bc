"""CLIP and T5 tokenizers for the runtime: prompt strings -> int64 token ids, torch-free.

T5: diffrt/runtime/t5_tokenizer.py (SD3's and Flux's T5 encoders); `load_tokenizer(folder, kind)`
reads either. CLIP:

Gives the ids diffusers' Stable Diffusion pipelines get from transformers (>= 5):

    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    tok(prompts, padding="max_length", max_length=tok.model_max_length,
        truncation=True, return_tensors="np").input_ids

by building the same `tokenizers.Tokenizer` transformers' CLIPTokenizer builds:

* normalizer: NFC, every run of whitespace -> one space, lowercase;
* pre-tokenizer: CLIP's regex (special tokens, contractions, letter runs, single digits,
  runs of other non-space characters), then byte-level (GPT-2 byte -> unicode map);
* model: BPE over vocab.json + merges.txt with the "</w>" end-of-word suffix;
* added tokens: the special tokens (and the pad token) as transformers registers them;
  they are split out of the raw text before normalization, so e.g. with SD 2.x's pad
  token "!" every "!" in a prompt becomes id 0 instead of BPE's "!</w>";
* post-processor: <|startoftext|> ... <|endoftext|>; truncation to model_max_length
  keeping both; right padding with the checkpoint's own pad token.

transformers 4.x's slow CLIPTokenizer (what diffusers used before transformers 5) gives
other ids for some prompts; transformers 4.x's CLIPTokenizerFast agrees with this one
except for the last point:

* without ftfy installed it cleans text with BERT's BasicTokenizer: every CJK ideograph
  becomes its own word ("</w>" on each), and control / format characters (\\x00, \\v,
  \\f, zero-width space and joiner, BOM) are deleted, gluing their neighbours together;
* with ftfy installed (as in OpenAI's SimpleTokenizer), ftfy.fix_text folds full-width
  forms and ligatures to ASCII ("ｆｕｌｌ" -> "full", "ﬁ" -> "fi") and unescapes HTML
  entities ("&amp;" -> "&");
* Python's str.lower() writes a word-final sigma ("ΣΑΣ" -> "σας"); tokenizers lowercases
  per character ("σασ");
* SD 1.x: upper-case "<|ENDOFTEXT|>" in a prompt was the eos token; in transformers 5 the
  pad token "<|endoftext|>" (a plain string in tokenizer_config.json) is added as a
  non-normalized token that replaces the normalized eos, so it is BPE'd as text.

SD 2.x's "!" is split out as the pad token by both transformers 4 and 5.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from diffrt.errors import DiffrtError
from diffrt.textual_inversion import TOKENS_FILE, read_tokens_file

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"
# CLIP's pre-tokenization pattern, as in transformers' CLIPTokenizer.__init__ (the
# special-token alternatives keep "<|endoftext|>" in one piece when it is not split out
# as an added token, e.g. with split_special_tokens=True).
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, in its order: the order
# tokens are added to the backend decides which AddedToken wins for a shared content.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# CLIPTokenizer.__init__ defaults.
_CLIP_DEFAULT_SPECIAL_TOKENS = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
}

# Larger than any text encoder's context: such a value is transformers' "no limit"
# placeholder (int(1e30)) or a mistake, and padding to it cannot work.
_MAX_SANE_MODEL_MAX_LENGTH = 1 << 20
# Characters of a prompt that are tokenized at all. A CLIP token covers a few characters
# (77 tokens are a few hundred), so text past this never reaches the encoder; cutting
# it first keeps a 1 MB prompt from costing seconds of BPE (only a prompt of more than
# this many mostly-blank characters could lose tokens the encoder would have seen).
MAX_PROMPT_CHARS = 10_000
# How much of the dropped text the truncation warning quotes.
EXCERPT_CHARS = 60


def clip_normalizer() -> normalizers.Normalizer:
    """NFC, whitespace runs -> " ", lowercase (transformers' CLIPTokenizer normalizer)."""
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """CLIP's regex split (keeping only the matches) followed by GPT-2's byte-level map."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


class CLIPTokenizer:
    """Prompts -> int64 ids [batch, model_max_length] for a CLIP text encoder.

    Build with `CLIPTokenizer.from_dir(checkpoint / "tokenizer")`.
    """

    def __init__(self, tokenizer: Tokenizer, model_max_length: int, pad_token: str, pad_token_id: int):
        self._tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.pad_token_id = pad_token_id
        self.max_prompt_chars = MAX_PROMPT_CHARS  # text past this is not tokenized (see MAX_PROMPT_CHARS)
        self._counter: Tokenizer | None = None
        self._expansions: dict[str, str] = {}  # multi-vector textual-inversion token -> "token token_1 ..."

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The configured `tokenizers.Tokenizer` (padding and truncation enabled)."""
        return self._tokenizer

    @classmethod
    def from_dir(cls, folder: str | Path) -> CLIPTokenizer:
        """Load a diffusers checkpoint's tokenizer/ folder.

        Reads tokenizer.json if present (only its vocab, merges and added tokens are used,
        as transformers' CLIPTokenizer does), else vocab.json + merges.txt; special tokens
        and model_max_length from tokenizer_config.json and special_tokens_map.json with
        transformers' precedence. Raises DiffrtError (a ValueError) naming the file
        and what to do for a missing or corrupted file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise DiffrtError(
                f"tokenizer folder {folder} does not exist or is not a directory; pass a checkpoint's "
                "tokenizer/ folder (vocab.json + merges.txt or tokenizer.json, tokenizer_config.json)"
            )
        # 1. Configuration: model_max_length, special tokens, added tokens.
        config = _read_json(folder / "tokenizer_config.json", required=True)
        model_max_length = _model_max_length(config, folder / "tokenizer_config.json")
        tokenizer_json = _read_json(folder / "tokenizer.json", required=False)
        special = _resolve_special_tokens(config, folder, tokenizer_json)

        # 2. The BPE model and the pipeline around it.
        vocab, merges = _read_vocab_and_merges(folder, tokenizer_json)
        unk = special.named.get("unk_token")
        tokenizer = _build_clip_tokenizer(vocab, merges, unk_token=str(unk) if unk is not None else None, folder=folder)

        # 3. Added tokens, in the order transformers adds them.
        tokenizer.add_tokens(_tokens_to_add(special))
        if config.get("split_special_tokens", False):  # transformers' option to BPE "<|endoftext|>" like text
            tokenizer.encode_special_tokens = True

        # 4. Post-processor, truncation and padding.
        ids = {key: _token_id(tokenizer, value, unk) for key, value in special.named.items()}
        for key in ("bos_token", "eos_token", "pad_token"):
            if ids.get(key) is None:
                raise DiffrtError(
                    f"{folder / 'tokenizer_config.json'}: {key}={special.named.get(key)!s:.40} has no id in the "
                    f"vocabulary; set {key} to a token of vocab.json (CLIP uses {_CLIP_DEFAULT_SPECIAL_TOKENS[key]!r})"
                )
        bos, eos, pad = (str(special.named[key]) for key in ("bos_token", "eos_token", "pad_token"))
        tokenizer.post_processor = processors.RobertaProcessing(
            (eos, ids["eos_token"]), (bos, ids["bos_token"]), trim_offsets=False, add_prefix_space=False
        )
        json_truncation = (tokenizer_json or {}).get("truncation") or {}
        json_padding = (tokenizer_json or {}).get("padding") or {}
        truncation_side = config.get("truncation_side") or json_truncation.get("direction", "Right").lower()
        padding_side = config.get("padding_side") or json_padding.get("direction", "Right").lower()
        for name, side in (("truncation_side", truncation_side), ("padding_side", padding_side)):
            if side not in ("right", "left"):
                raise DiffrtError(f"{folder / 'tokenizer_config.json'}: {name}={side!r}; expected 'right' or 'left'")
        tokenizer.enable_truncation(
            max_length=model_max_length, stride=0, strategy="longest_first", direction=truncation_side
        )
        tokenizer.enable_padding(
            direction=padding_side, pad_id=ids["pad_token"], pad_type_id=0, pad_token=pad, length=model_max_length
        )
        logger.debug("loaded CLIP tokenizer from %s (pad_token=%r, id %d)", folder, pad, ids["pad_token"])
        loaded = cls(tokenizer, model_max_length, pad, ids["pad_token"])
        baked = read_tokens_file(folder)  # textual-inversion tokens an export baked in
        if baked is not None:
            first, groups = baked
            if loaded.size != first:
                raise DiffrtError(f"{folder / TOKENS_FILE}: its tokens start at id {first}, the tokenizer's next id is "
                                  f"{loaded.size}; re-export the model")
            for group in groups:
                loaded.add_embedding_tokens(group)
        return loaded

    # -- textual inversion (diffrt/textual_inversion.py) -------------------------------

    @property
    def size(self) -> int:
        """The number of ids in use, added tokens included: the id the next added token gets."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def has_token(self, token: str) -> bool:
        return self._tokenizer.token_to_id(token) is not None

    def add_embedding_tokens(self, tokens: tuple[str, ...]) -> list[int]:
        """Add one embedding's tokens (token, token_1, ...) as transformers' add_tokens adds
        a string (normalized, not special); a prompt's `token` then expands to all of
        them (diffusers' maybe_convert_prompt). Returns their ids."""
        self._tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in tokens])
        self._counter = None
        if len(tokens) > 1:
            self._expansions[tokens[0]] = " ".join(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def expand_prompt(self, prompt: str) -> str:
        """diffusers' `_maybe_convert_prompt`: each multi-vector token found among the
        prompt's tokens is replaced (as a substring, everywhere) by its whole sequence."""
        if not self._expansions:
            return prompt
        plain = self._plain()
        for token in set(plain.encode(prompt, add_special_tokens=False).tokens):
            if token in self._expansions:
                prompt = prompt.replace(token, self._expansions[token])
        return prompt

    def _plain(self) -> Tokenizer:
        """The same tokenizer without truncation or padding (tokenize() in transformers)."""
        if self._counter is None:
            counter = Tokenizer.from_str(self._tokenizer.to_str())
            counter.no_truncation()
            counter.no_padding()
            self._counter = counter
        return self._counter

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids, int64 [len(prompts), model_max_length]: bos, tokens, eos, padding."""
        if self._expansions and isinstance(prompts, list) and all(isinstance(p, str) for p in prompts):
            prompts = [self.expand_prompt(p) for p in prompts]
        return _encode_prompts(self, self._tokenizer, prompts, self.model_max_length)


def _encode_prompts(owner: Any, tokenizer: Tokenizer, prompts: list[str], length: int) -> np.ndarray:
    """`tokenizer` (truncating and padding to `length`) on every prompt, int64
    [len(prompts), length]; a prompt cut short is logged (`_warn_truncated`)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}; wrap one prompt in a list")
    if not prompts:
        return np.zeros((0, length), dtype=np.int64)
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # the tokenizer would raise a bare TypeError
            raise DiffrtError(f"prompt text is not valid: a lone UTF-16 surrogate {prompt[exc.start]!r} at "
                              f"character {exc.start} (undecodable bytes?); pass Unicode text") from None
    texts = [prompt[: owner.max_prompt_chars] for prompt in prompts]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
    for prompt, text, encoding in zip(prompts, texts, encodings, strict=True):
        if encoding.overflowing or len(text) < len(prompt):
            _warn_truncated(owner, prompt, text, length)
    return np.array([e.ids for e in encodings], dtype=np.int64)


def _warn_truncated(owner: Any, prompt: str, text: str, length: int) -> None:
    """Say how much of a too-long prompt the text encoder never sees (CLIP takes 77
    tokens, bos and eos included; diffusers truncates the same way, with a warning):
    counts and the start of the dropped text, never the whole of it (a log line
    must not carry a megabyte prompt)."""
    if owner._counter is None:  # the same pipeline without truncation or padding, built once
        counter = Tokenizer.from_str(owner._tokenizer.to_str())
        counter.no_truncation()
        counter.no_padding()
        owner._counter = counter
    total = len(owner._counter.encode(text, add_special_tokens=True).ids)
    dropped = total - length
    excerpt = _excerpt(owner._counter, text, max(dropped, 0)) or prompt[len(text):]
    excerpt = excerpt if len(excerpt) <= EXCERPT_CHARS else excerpt[:EXCERPT_CHARS] + "..."
    if len(text) == len(prompt):
        logger.warning("prompt truncated: the text encoder takes %d tokens, the prompt has %d; the last %d "
                       "were dropped, starting %r", length, total, dropped, excerpt)
    else:
        logger.warning("prompt truncated: the text encoder takes %d tokens; the prompt has %d characters, "
                       "only the first %d were tokenized (%d tokens) and the rest was dropped, starting %r",
                       length, len(prompt), len(text), total, excerpt)


def _excerpt(counter: Tokenizer, text: str, dropped: int) -> str:
    """The start of the dropped text, as transformers shows it: the first overflowing
    tokens, decoded."""
    ids = counter.encode(text, add_special_tokens=False).ids
    return counter.decode(ids[len(ids) - dropped:][:EXCERPT_CHARS]).replace(END_OF_WORD_SUFFIX, " ").strip()


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise DiffrtError(
                f"{path} is missing; a diffusers checkpoint's tokenizer/ folder has it "
                "(re-download the checkpoint or re-save its tokenizer with transformers' save_pretrained)"
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffrtError(f"{path} is not valid JSON ({e}); re-download the checkpoint's tokenizer/ folder") from e
    if not isinstance(data, dict):
        raise DiffrtError(f"{path} holds a JSON {type(data).__name__}, not an object; re-download it")
    return data


def _model_max_length(config: dict[str, Any], path: Path) -> int:
    value = config.get("model_max_length")
    if isinstance(value, bool) or not isinstance(value, int) or not 2 < value < _MAX_SANE_MODEL_MAX_LENGTH:
        raise DiffrtError(
            f"{path}: model_max_length={value!r}; set it to the text encoder's context length "
            "(max_position_embeddings, 77 for CLIP)"
        )
    return value


def _as_added_token(value: Any, special: bool | None = None) -> Any:
    """transformers' reading of a serialized special token: a dict -> AddedToken, a str
    stays a str (it becomes AddedToken(special=True, normalized=False) when added)."""
    if not isinstance(value, dict):
        return value
    fields = {
        k: v for k, v in value.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    }
    if special is not None:
        fields["special"] = special
    return AddedToken(**fields)


@dataclass
class _SpecialTokens:
    """Special tokens as transformers holds them before adding them to the backend."""

    named: dict[str, str | AddedToken]  # bos_token, eos_token, ... in transformers' order
    extra: list[str | AddedToken] = field(default_factory=list)  # additional_special_tokens
    added_tokens_decoder: dict[int, AddedToken] = field(default_factory=dict)


def _resolve_special_tokens(
    config: dict[str, Any], folder: Path, tokenizer_json: dict[str, Any] | None,
    defaults: dict[str, str] = _CLIP_DEFAULT_SPECIAL_TOKENS,
) -> _SpecialTokens:
    """The special and added tokens, with transformers 5's precedence
    (`PreTrainedTokenizerBase._from_pretrained`):

    * with "added_tokens_decoder" in tokenizer_config.json, it and tokenizer_config.json's
      *_token values are all there is; special_tokens_map.json is ignored;
    * without it (the SD 1.x / 2.x checkpoints' layout), special_tokens_map.json overrides
      tokenizer_config.json -- SD 2.x's config says pad "<|endoftext|>", its map "!",
      and the pad is "!" -- and tokenizer.json's "added_tokens" are the added tokens;
    * a key given by neither takes the tokenizer class's default (`defaults`: CLIPTokenizer's,
      or T5Tokenizer's); a key set to null has no token.
    """
    named_keys = list(_SPECIAL_TOKEN_KEYS) + [
        k
        for k in config
        if k.endswith("_token") and k not in _SPECIAL_TOKEN_KEYS and isinstance(config[k], (str, dict))
    ]
    named = {key: _as_added_token(config[key]) for key in named_keys if key in config}
    extra = [
        _as_added_token(t) for t in config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    ]
    added_tokens_decoder: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        try:
            for index, token in config["added_tokens_decoder"].items():
                added_tokens_decoder[int(index)] = _as_added_token(token)
        except (AttributeError, TypeError, ValueError) as e:
            raise DiffrtError(
                f"{folder / 'tokenizer_config.json'}: added_tokens_decoder is malformed ({e}); "
                'expected {"<id>": {"content": ..., "special": ...}}'
            ) from e
    else:
        special_map = _read_json(folder / "special_tokens_map.json", required=False) or {}
        for key, value in special_map.items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                extra += [t for t in (_as_added_token(v, special=True) for v in value) if t not in extra]
            elif key.endswith("_token") and isinstance(value, (str, dict)):
                named[key] = _as_added_token(value, special=True)
                if key not in named_keys:
                    named_keys.append(key)
        for token in (tokenizer_json or {}).get("added_tokens") or []:
            token = dict(token)
            added_tokens_decoder[int(token.pop("id"))] = _as_added_token(token)
    for key, default in defaults.items():
        named.setdefault(key, default)
    # A named token whose text is an added token's takes that token's attributes.
    by_content = {str(t): t for t in added_tokens_decoder.values()}
    named = {k: by_content.get(str(named[k]), named[k]) for k in named_keys if named.get(k) is not None}
    return _SpecialTokens(named, extra, added_tokens_decoder)


def _tokens_to_add(special: _SpecialTokens) -> list[AddedToken]:
    """The list TokenizersBackend.__init__ hands to `add_tokens`: the added_tokens_decoder
    by id, then each named and extra special token whose text is not among them; a str
    becomes AddedToken(special=True), which also means normalized=False."""
    tokens: list[Any] = [special.added_tokens_decoder[i] for i in sorted(special.added_tokens_decoder)]
    encoder = [str(t) for t in tokens]
    for value in [*special.named.values(), *special.extra]:
        if str(value) not in encoder and value not in tokens:
            tokens.append(value)
    named_texts = {str(v) for v in special.named.values()}
    out = []
    for token in tokens:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in named_texts:
            token.special = True
        out.append(token)
    return out


def _token_id(tokenizer: Tokenizer, token: str | AddedToken, unk_token: str | AddedToken | None) -> int | None:
    """transformers' convert_tokens_to_ids: the token's id, else the unk token's id."""
    index = tokenizer.token_to_id(str(token))
    if index is None and unk_token is not None:
        index = tokenizer.token_to_id(str(unk_token))
    return index


def _read_vocab_and_merges(
    folder: Path, tokenizer_json: dict[str, Any] | None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if tokenizer_json is not None:
        path = folder / "tokenizer.json"
        model = tokenizer_json.get("model") or {}
        vocab, merges = model.get("vocab"), model.get("merges")
        if model.get("type") not in (None, "BPE") or not isinstance(vocab, dict) or not isinstance(merges, list):
            raise DiffrtError(
                f"{path} does not hold a BPE model with a vocab and merges (model type {model.get('type')!r}); "
                "it is not a CLIP tokenizer -- re-download the checkpoint's tokenizer/ folder"
            )
        try:
            pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        except TypeError as e:
            raise DiffrtError(f"{path}: model.merges is malformed ({e}); re-download the file") from e
        return vocab, pairs
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise DiffrtError(
                f"{path} is missing and there is no tokenizer.json in {folder}; a CLIP tokenizer folder needs "
                "vocab.json and merges.txt (re-download the checkpoint's tokenizer/ folder)"
            )
    _read_json(vocab_path, required=True)  # a clear error for a corrupted vocab.json
    try:
        vocab, merges = BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as e:  # tokenizers raises a plain Exception for parse errors
        raise DiffrtError(
            f"cannot read {merges_path} with {vocab_path.name} ({e}); re-download the checkpoint's tokenizer/ folder"
        ) from e
    return vocab, merges


def _build_clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str | None, folder: Path
) -> Tokenizer:
    """The backend transformers' CLIPTokenizer.__init__ builds (without added tokens)."""
    try:
        model = BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD_SUFFIX,
            fuse_unk=False,
            unk_token=unk_token,
        )
    except Exception as e:  # e.g. a merge whose parts are not in the vocabulary
        raise DiffrtError(
            f"the vocabulary and merges in {folder} do not fit together ({e}); re-download the tokenizer/ folder"
        ) from e
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = clip_normalizer()
    tokenizer.pre_tokenizer = clip_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()  # only for debugging: ids never go back to text here
    return tokenizer


# The tokenizer kinds a family names per text encoder (its TOKENIZER_KIND; "clip" when unnamed).
TOKENIZER_KINDS = ("clip", "t5")


def load_tokenizer(folder: str | Path, kind: str = "clip") -> Any:
    """The runtime tokenizer of `kind` ("clip": CLIPTokenizer, "t5": T5Tokenizer) for a
    tokenizer folder of an artifact."""
    if kind == "t5":
        from diffrt.runtime.t5_tokenizer import (
            T5Tokenizer,  # it builds on this module's helpers
        )

        return T5Tokenizer.from_dir(folder)
    if kind != "clip":
        raise DiffrtError(f"tokenizer kind {kind!r} is not known; known: {', '.join(TOKENIZER_KINDS)}")
    return CLIPTokenizer.from_dir(folder)
