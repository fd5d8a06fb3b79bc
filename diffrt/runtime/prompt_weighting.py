"""Weighted and long prompts (opt-in): compel's embeddings, torch-free.

    texts --prompt_syntax.parse--> (text, weight) fragments --tokenizer--> token ids with
    a weight each --chunks of model_max_length - 2, each in BOS/EOS and padded--> the
    text encoder stage --weights applied, chunks concatenated--> embeddings

as compel 2.x builds them (`Compel(..., truncate_long_prompts=False)`, its default
`split_long_text_mode=SENTENCES`, `downweight_mode=DownweightMode.REMOVE`):

* a chunk holds at most model_max_length - 2 tokens (75 for CLIP); a longer prompt is
  split after the last '.' among the next 75 tokens, else the last ',' '.' ';' ':', else
  the last word end, else at 75; each chunk is encoded on its own and the chunks'
  embeddings are concatenated on the token axis;
* a token of weight w != 1 gets `empty + (z - empty) * w`, where `empty` is the
  encoding of the empty prompt (BOS, EOS, padding) at the same position;
* for each fragment of weight w < 1, the prompt is encoded again without that fragment
  (compel's DownweightMode.REMOVE), and the result is the normalized blend of the full
  encoding (weight 1) with each of those (weight tan((1 - w) * pi / 2)): at w = 0.5 half
  way to the prompt without it. compel's default, DownweightMode.MASK, masks the
  fragment in the encoder's attention instead; diffrt's text encoder graphs take no
  attention mask, so REMOVE is the mode implemented. Where removing a fragment shortens
  the prompt by a chunk, the shorter encoding is padded with empty chunks (compel fails);
* prompts of a batch (prompts and negatives) are padded to the same number of chunks
  with the empty prompt's encoding (compel's `pad_conditioning_tensors_to_same_length`);
* pooled outputs (SDXL's `text_embeds`) come from the whole prompt text, truncated to
  one chunk (compel's `get_pooled_embeddings`, which reads the text as written).

Every output of the encoder stage with a token axis is weighted the same way (so
clip_skip's per-layer output too); outputs without one are the pooled ones.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from diffrt.errors import DiffrtError
from diffrt.prompt_syntax import Fragment, a1111_to_compel, parse

# compel's SplitLongTextMode fallbacks: sentence ends, then phrase ends, then word ends.
SENTENCE_ENDS = (".</w>",)
PHRASE_ENDS = (".</w>", ",</w>", ";</w>", ":</w>")
END_OF_WORD = "</w>"
DOWNWEIGHT_EPSILON = 1e-5  # compel: a weight of 0 would give an infinite blend weight

EncodeIds = Callable[[np.ndarray], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Vocab:
    """What chunking needs of a CLIP tokenizer: a copy without truncation or padding,
    the special ids, the context length, and the empty prompt's ids."""

    plain: Tokenizer
    bos: int
    eos: int
    pad: int
    length: int
    empty: np.ndarray  # (length,) int64: BOS, EOS, padding


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def vocab(tokenizer: Any) -> Vocab:
    """The Vocab of a runtime CLIPTokenizer, built once per tokenizer and token count
    (a textual inversion adds tokens)."""
    key = tokenizer.size
    with _VOCABS_LOCK:
        cached = _VOCABS.get(tokenizer)
        if cached is not None and cached[0] == key:
            return cached[1]
    plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    empty = np.asarray(tokenizer([""])[0], dtype=np.int64)
    found = Vocab(plain=plain, bos=int(empty[0]), eos=int(empty[1]), pad=int(tokenizer.pad_token_id),
                  length=int(tokenizer.model_max_length), empty=empty)
    with _VOCABS_LOCK:
        _VOCABS[tokenizer] = (key, found)
    return found


# -- token ids and weights ---------------------------------------------------------------

def fragment_tokens(tokenizer: Any, v: Vocab, fragments: Sequence[Fragment]) -> tuple[list[int], list[float]]:
    """Each fragment tokenized on its own (no BOS/EOS), concatenated, a weight per token."""
    ids: list[int] = []
    weights: list[float] = []
    for fragment in fragments:
        text = tokenizer.expand_prompt(fragment.text[: tokenizer.max_prompt_chars])
        tokens = v.plain.encode(text, add_special_tokens=False).ids
        ids += tokens
        weights += [float(fragment.weight)] * len(tokens)
    return ids, weights


def split_point(v: Vocab, ids: Sequence[int], room: int) -> int:
    """How many of `ids` the next chunk takes (compel's _find_next_best_split_point)."""
    if len(ids) <= room:
        return room
    tokens = [v.plain.id_to_token(i) or "" for i in ids[:room]]
    for accepts in (lambda t: t in SENTENCE_ENDS, lambda t: t in PHRASE_ENDS, lambda t: t.endswith(END_OF_WORD)):
        for index in range(len(tokens) - 1, -1, -1):
            if accepts(tokens[index]):
                return index + 1
    return room


def chunked(v: Vocab, ids: Sequence[int], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and weights as chunks (k, length): BOS, up to length - 2 tokens, EOS,
    padding; BOS/EOS/padding weigh 1. No tokens: one chunk, the empty prompt's."""
    room = v.length - 2
    rows, row_weights = [], []
    while True:
        cut = split_point(v, ids, room)
        part, part_weights, ids, weights = ids[:cut], weights[:cut], ids[cut:], weights[cut:]
        pad = v.length - len(part) - 2
        rows.append([v.bos, *part, v.eos] + [v.pad] * pad)
        row_weights.append([1.0, *part_weights, 1.0] + [1.0] * pad)
        if not ids:
            break
    return np.asarray(rows, dtype=np.int64), np.asarray(row_weights, dtype=np.float32)


@dataclass(frozen=True)
class WeightedText:
    """One prompt's encodings to blend: the full prompt first, then the prompt without
    each fragment weighted below 1, with compel's blend weights."""

    variants: tuple[tuple[np.ndarray, np.ndarray], ...]  # (ids, weights), each (chunks, length)
    blend: tuple[float, ...]
    pooled_text: str  # what compel's pooled embedding reads

    @property
    def chunks(self) -> int:
        return int(self.variants[0][0].shape[0])


def weighted_text(tokenizer: Any, text: str, syntax: str) -> WeightedText:
    """Parse and tokenize one prompt (a DiffrtError for bad syntax)."""
    v = vocab(tokenizer)
    fragments = parse(text, syntax)
    full = chunked(v, *fragment_tokens(tokenizer, v, fragments))
    variants, blend = [full], [1.0]
    for index, fragment in enumerate(fragments):
        if fragment.weight < 1:
            without = chunked(v, *fragment_tokens(tokenizer, v, fragments[:index] + fragments[index + 1:]))
            variants.append(_to_chunks(v, without, full[0].shape[0]))
            blend.append(math.tan((1.0 - max(DOWNWEIGHT_EPSILON, fragment.weight)) * math.pi / 2))
    return WeightedText(tuple(variants), tuple(blend), a1111_to_compel(text) if syntax == "a1111" else text)


def _to_chunks(v: Vocab, variant: tuple[np.ndarray, np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
    """A variant padded with empty chunks (or cut) to `count` chunks."""
    ids, weights = variant
    if ids.shape[0] < count:
        extra = count - ids.shape[0]
        ids = np.concatenate([ids, np.repeat(v.empty[None], extra, axis=0)])
        weights = np.concatenate([weights, np.ones((extra, v.length), dtype=np.float32)])
    return ids[:count], weights[:count]


def count_chunks(tokenizer: Any, texts: Sequence[str], syntax: str) -> int:
    """The most chunks any of `texts` takes (each text's syntax checked on the way)."""
    v = vocab(tokenizer)
    return max((chunked(v, *fragment_tokens(tokenizer, v, parse(t, syntax)))[0].shape[0] for t in texts), default=1)


# -- embeddings ------------------------------------------------------------------------

def _one_chunk(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """The texts' ids as the plain path makes them (truncated to one chunk, padded),
    without its truncation warning: the whole text is encoded in chunks as well."""
    texts = [tokenizer.expand_prompt(t[: tokenizer.max_prompt_chars]) for t in texts]
    return np.array([e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)],
                    dtype=np.int64)


def _token_axis(array: np.ndarray) -> int | None:
    """The token axis of an encoder output: (batch, seq, hidden) -> 1, clip_skip's
    (batch, layers, seq, hidden) -> 2; pooled (batch, hidden) -> None."""
    return {3: 1, 4: 2}.get(array.ndim)


def _weighted(z: np.ndarray, empty: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """compel's build_weighted_embedding_tensor for one chunk: tokens of weight 1 as
    encoded, the others empty + (z - empty) * w."""
    shape = [1] * z.ndim
    shape[axis - 1] = weights.shape[0]  # z: one row, batch axis dropped
    w = weights.reshape(shape)
    return np.where(w == 1, z, empty + (z - empty) * w)


def encode_weighted(run: EncodeIds, tokenizer: Any, texts: Sequence[str], syntax: str,
                    chunks: int | None = None) -> dict[str, np.ndarray]:
    """The encoder outputs of `texts` with compel's weighting and chunking, every text
    padded to `chunks` chunks (default: the longest's) with the empty prompt's encoding.
    `run(ids)` runs the text encoder stage on (rows, length) int64 ids (one call)."""
    v = vocab(tokenizer)
    parsed = [weighted_text(tokenizer, t, syntax) for t in texts]
    chunks = max([p.chunks for p in parsed] + [chunks or 1])
    # one encoder call: the empty prompt, every distinct chunk, the pooled texts
    rows: dict[bytes, int] = {}
    ordered: list[np.ndarray] = []

    def row(ids: np.ndarray) -> int:
        key = ids.tobytes()
        if key not in rows:
            rows[key] = len(ordered)
            ordered.append(ids)
        return rows[key]

    empty_row = row(v.empty)
    index = [[[row(chunk) for chunk in ids] for ids, _ in p.variants] for p in parsed]
    pooled_ids = _one_chunk(tokenizer, [p.pooled_text for p in parsed])
    pooled_rows = [row(ids) for ids in pooled_ids]
    out = {name: np.asarray(a) for name, a in run(np.stack(ordered)).items()}
    result = {}
    for name, array in out.items():
        axis = _token_axis(array)
        if axis is None:
            result[name] = array[pooled_rows]
            continue
        empty = array[empty_row]
        per_text = [_blend(array, empty, p, rows_of, axis) for p, rows_of in zip(parsed, index, strict=True)]
        padded = [np.concatenate([e] + [empty] * (chunks - p.chunks), axis=axis - 1)
                  for e, p in zip(per_text, parsed, strict=True)]
        result[name] = np.stack(padded).astype(array.dtype, copy=False)
    return result


def _blend(array: np.ndarray, empty: np.ndarray, text: WeightedText, rows_of: list[list[int]],
           axis: int) -> np.ndarray:
    """One text's embedding (no batch axis): each variant's chunks weighted and
    concatenated, the variants blended with normalized weights (compel's
    apply_embedding_weights)."""
    encodings = []
    for (_, weights), chunk_rows in zip(text.variants, rows_of, strict=True):
        parts = [_weighted(array[r], empty, w, axis) for r, w in zip(chunk_rows, weights, strict=True)]
        encodings.append(np.concatenate(parts, axis=axis - 1))
    if len(encodings) == 1:
        return encodings[0]
    blend = np.asarray(text.blend, dtype=np.float32)
    blend = blend / np.sum(blend, dtype=np.float32)
    return np.sum(np.stack(encodings) * blend.reshape((-1,) + (1,) * encodings[0].ndim), axis=0, dtype=np.float32)


def weighted_encoder(encode: Callable[..., Mapping[str, np.ndarray]], tokenizers: Mapping[str, Any], syntax: str,
                     chunks: int) -> Callable[..., dict[str, np.ndarray]]:
    """A family's `encode(role, texts)` callback that weights and chunks: `encode` must
    also take (rows, length) int64 token ids in place of texts."""

    def run(role: str, texts: list[str], *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return encode_weighted(lambda ids: encode(role, ids, *args, **kwargs), tokenizers[role], texts, syntax,
                               chunks)

    return run


def check_text_length(specs: Sequence[Any], chunks: int) -> None:
    """Refuse `chunks` > 1 where one of the stage specs (the denoiser first) takes a fixed text length
    (`encoder_hidden_states` with an integer length: UNets exported before the length
    became the named dim "text_length"); one line naming the first such stage."""
    if chunks <= 1:
        return
    for spec in specs:
        length = next((t.shape[1] for t in spec.inputs if t.name == "encoder_hidden_states"), None)
        if isinstance(length, int):
            what = "UNet" if spec is specs[0] else f"stage {spec.name}"  # specs[0]: the denoiser that runs
            raise DiffrtError(f"prompt_weighting: a prompt of this request needs {chunks} chunks of {length - 2} "
                              f"tokens, but this artifact's {what} takes {length} tokens of text (fixed in its "
                              "graph); shorten the prompt to one chunk, or export the model again with this diffrt")


def request_texts(request: Any) -> list[str]:
    """Every text a request encodes: prompts, negatives and a family's second prompts."""
    texts = [*request.prompts, *request.negative_prompts]
    for name in ("prompt_2", "negative_prompt_2"):
        texts += list(getattr(request.options, name, None) or ())
    return texts
