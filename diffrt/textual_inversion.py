"""Textual-inversion embeddings: new prompt tokens whose input embeddings were trained
for a concept (`<cat-toy>`). Torch-free (numpy): the runtime imports it.

    pipe = Pipeline.load("out/sd15")
    pipe.load_textual_inversion("cat-toy.safetensors")            # token from the file
    pipe.load_textual_inversion("style.safetensors", token="<my-style>")
    pipe("a <cat-toy> on a beach")

Files are read as diffusers' `load_textual_inversion` reads them:

- a single tensor under its token: `{"<cat-toy>": (dim,) or (n, dim)}` (diffusers'
  learned_embeds.safetensors; any single key, e.g. "emb_params", is the token's name
  unless `token=` names another);
- A1111's `.pt`: `{"name": ..., "string_to_param": {"*": (n, dim)}}` (needs torch to
  unpickle: accepted by `diffrt export --textual-inversion` only; at run time convert it
  to .safetensors first);
- SDXL's two-encoder form `{"clip_l": (n, 768), "clip_g": (n, 1280)}`: the first encoder
  gets clip_l, the second clip_g, under the same token (`token=` is required: the file
  names none). diffusers loads these with two calls (one per encoder and tokenizer).

An embedding of n > 1 vectors becomes the tokens `token, token_1, ..., token_{n-1}`,
and a prompt's `token` is expanded to all of them before tokenizing (diffusers'
`maybe_convert_prompt`). A single-tensor file on SDXL goes to the first encoder only,
as diffusers' default `pipe.load_textual_inversion` does.

Where the vectors go: each new token gets the next id of the tokenizer (as
transformers' `add_tokens` gives it) and its vector is written into that row of the
text encoder's token-embedding table. A compiled graph cannot grow that table, so the
exporter leaves SPARE_TOKEN_ROWS zero rows after the vocabulary (a few MB at most), and
the rows are written at run time through the weight map and `update_weights` (every
backend that updates weights takes a same-shape array: TensorRT refit allows nothing
else, ONNX Runtime's add_initializer and OpenVINO's Constant replacement are checked
against the graph's shapes). Artifacts exported before that have no room and are
refused in one line.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

# Zero rows the exporter appends to each CLIP token-embedding table for tokens added later.
SPARE_TOKEN_ROWS = 256
# The parameter (suffix) of a CLIP text encoder's token-embedding table in its weight map.
TABLE_PARAMETER = "token_embedding.weight"
# Written beside a tokenizer's files when the exporter bakes embeddings in (the runtime
# tokenizer adds these tokens, with these ids, when it loads).
TOKENS_FILE = "textual_inversion.json"
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# Embeddings are KBs (75 vectors of SDXL's 2048 floats are 600 KB); a larger file is a mistake.
MAX_FILE_BYTES = 64 << 20
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


@dataclass(frozen=True)
class Embedding:
    """One file's embedding for one text encoder role: its tokens (token, token_1, ...)
    and one float32 vector per token."""

    role: str
    tokens: tuple[str, ...]
    vectors: np.ndarray  # (len(tokens), dim)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file's tensors as float32 numpy arrays (its 8-byte header length,
    the JSON header, then the raw little-endian data), without the safetensors package."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DiffrtError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length].decode("utf-8"))
        start = 8 + length
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            array = np.frombuffer(data[start + begin:start + end], dtype=np.dtype(dtype).newbyteorder("<"))
            if dtype is np.uint16:  # bfloat16: the high half of a float32
                array = (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
            out[name] = array.astype(np.float32).reshape(info["shape"])
        return out
    except KeyError as exc:
        raise DiffrtError(f"{path}: a tensor of dtype {exc.args[0]!r}; textual-inversion embeddings are F32, F16 "
                          "or BF16") from None
    except (struct.error, ValueError, TypeError, UnicodeDecodeError, AttributeError):
        raise DiffrtError(f"{path} is not a readable .safetensors file (truncated or another format)") from None


def read_file(path: str | Path) -> dict[str, Any]:
    """A textual-inversion file's state dict, numpy arrays (a .safetensors file; a .pt
    file needs torch, hence the export side, diffrt/export/textual_inversion.py)."""
    path = Path(path)
    if not path.is_file():
        raise DiffrtError(f"{path}: no such textual-inversion file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DiffrtError(f"{path}: {path.stat().st_size / 2**20:.0f} MB is far more than a textual-inversion "
                          "embedding holds (a few KB); is it a model or LoRA file?")
    if path.suffix in (".pt", ".bin", ".ckpt"):
        raise DiffrtError(f"{path}: a {path.suffix} file is a pickle that needs torch to read; the runtime reads "
                          ".safetensors only: bake it in with `diffrt export SRC OUT --textual-inversion "
                          f"{path.name}` or convert it to .safetensors")
    return read_safetensors(path)


def parse(state: Mapping[str, Any], token: str | None, source: str) -> dict[str, tuple[str, np.ndarray]]:
    """{encoder key: (token, (n, dim) vectors)}: key None for a one-encoder embedding,
    "clip_l"/"clip_g" for SDXL's two-encoder form. diffusers' rules: a single key is the
    token (unless `token` names another), A1111's string_to_param["*"] under its "name"."""
    if set(SDXL_KEYS) <= set(state):
        if not token:
            raise DiffrtError(f"{source}: an SDXL embedding (clip_l + clip_g) names no token; give one "
                              "(token=..., or FILE:TOKEN on the command line)")
        return {key: (token, _vectors(state[key], source)) for key in SDXL_KEYS}
    if len(state) == 1:
        loaded, value = next(iter(state.items()))
    elif "string_to_param" in state and isinstance(state["string_to_param"], Mapping) \
            and "*" in state["string_to_param"]:
        loaded, value = str(state.get("name", "")), state["string_to_param"]["*"]
    else:
        raise DiffrtError(f"{source}: not a textual-inversion embedding (keys {', '.join(sorted(map(str, state)))[:80]}); "
                          "expected one tensor under its token, A1111's string_to_param, or clip_l + clip_g")
    token = token or loaded
    if not token:
        raise DiffrtError(f"{source}: the embedding names no token; give one (token=..., or FILE:TOKEN)")
    return {None: (token, _vectors(value, source))}


def _vectors(value: Any, source: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DiffrtError(f"{source}: the embedding is a {type(value).__name__}, not an array of numbers") from None
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not array.shape[0] or not np.isfinite(array).all():
        raise DiffrtError(f"{source}: the embedding has shape {array.shape} (or non-finite values); expected "
                          "(dim,) or (vectors, dim) of finite numbers")
    return array


def expand(token: str, count: int) -> tuple[str, ...]:
    """diffusers' multi-vector tokens: token, token_1, ..., token_{count-1}."""
    return (token, *(f"{token}_{i}" for i in range(1, count)))


def embeddings_for(parsed: Mapping[str | None, tuple[str, np.ndarray]], roles: tuple[str, ...],
                   source: str) -> list[Embedding]:
    """Which text encoder role each part of a file goes to: a one-encoder embedding to
    the first CLIP encoder (`roles[0]` must be "text_encoder", as diffusers' default),
    SDXL's clip_l/clip_g to text_encoder/text_encoder_2."""
    out = []
    for key, (token, vectors) in parsed.items():
        role = "text_encoder" if key is None else SDXL_KEYS[key]
        if role not in roles:
            what = "an SDXL (clip_l + clip_g) embedding" if key is not None else "a one-encoder embedding"
            raise DiffrtError(f"{source}: {what} needs a {role} this artifact has no place for (it has "
                              f"{', '.join(roles)}); use an embedding made for this model family")
        out.append(Embedding(role, expand(token, vectors.shape[0]), vectors))
    return out


def check_fits(embedding: Embedding, tokenizer: Any, rows: int, dim: int, source: str) -> tuple[int, ...]:
    """The ids the tokens will get (the tokenizer's next ones), after diffusers' checks:
    the token is new, the vectors have the encoder's width; and there is a row for each."""
    for token in embedding.tokens[:1] + (f"{embedding.tokens[0]}_1",):
        if tokenizer.has_token(token):
            raise DiffrtError(f"{source}: token {token!r} is already in the {embedding.role} tokenizer's vocabulary; "
                              "choose another token (token=..., or FILE:TOKEN)")
    if embedding.vectors.shape[1] != dim:
        raise DiffrtError(f"{source}: its {embedding.role} vectors have width {embedding.vectors.shape[1]}, the "
                          f"text encoder's embeddings {dim}: it was made for another model")
    first = tokenizer.size
    ids = tuple(range(first, first + len(embedding.tokens)))
    if ids[-1] >= rows:
        raise DiffrtError(f"{source}: the {embedding.role} token table has {rows} rows and {first} are taken; "
                          f"{len(embedding.tokens)} more do not fit (an artifact exported before textual-inversion "
                          "support has no spare rows: re-export it, or bake the embedding in with diffrt export "
                          "--textual-inversion)")
    return ids


def write_tokens_file(folder: Path, groups: list[tuple[str, ...]], first_id: int,
                      sources: list[dict[str, Any]] | None = None) -> None:
    """Record the tokens baked into an artifact, for its runtime tokenizer (TOKENS_FILE),
    and where they came from (`sources`: file name, sha256, tokens; for the record only)."""
    data = {"format": "diffrt-textual-inversion", "version": 1, "first_id": first_id, "groups": [list(g) for g in groups],
            "sources": sources or []}
    (folder / TOKENS_FILE).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def read_tokens_file(folder: Path) -> tuple[int, list[tuple[str, ...]]] | None:
    """(first id, token groups) of TOKENS_FILE in a tokenizer folder, None without one."""
    path = folder / TOKENS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["first_id"]), [tuple(str(t) for t in g) for g in data["groups"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DiffrtError(f"{path} is malformed ({type(exc).__name__}); re-export the model") from None


__all__ = ["SPARE_TOKEN_ROWS", "TOKENS_FILE", "Embedding", "check_fits", "embeddings_for", "expand", "parse",
           "read_file", "read_safetensors", "read_tokens_file", "write_tokens_file"]
