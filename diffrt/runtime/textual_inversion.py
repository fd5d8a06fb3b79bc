"""`Pipeline.load_textual_inversion`: a textual-inversion file's tokens added to the
runtime tokenizers and their vectors written into the text encoders' token-embedding
tables through the weight map and `update_weights` (no reload). Torch-free; the file
formats and the rules are diffrt/textual_inversion.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.errors import DiffrtError
from diffrt.runtime.backends.initializers import read_values
from diffrt.textual_inversion import (
    TABLE_PARAMETER,
    Embedding,
    check_fits,
    embeddings_for,
    parse,
    read_file,
)
from diffrt.weights import WeightMap, weight_map

logger = logging.getLogger(__name__)


def load_into(pipe: Any, path: str | Path, token: str | None = None) -> list[str]:
    """Load one embedding file into `pipe` (every worker of it sees it: they share the
    models and tokenizers). Every check runs before anything changes; returns the tokens
    added (token, token_1, ... for a multi-vector embedding)."""
    source = str(path)
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise DiffrtError(f"token must be a non-empty string, got {token!r}")
    roles = tuple(r for r in pipe.family.runtime_roles(pipe.facts) if r in pipe.tokenizers)
    embeddings = embeddings_for(parse(read_file(path), token, source), roles, source)
    # 1. Checks and the new tables, nothing changed yet.
    planned = []
    for embedding in embeddings:
        tokenizer = pipe.tokenizers[embedding.role]
        if not hasattr(tokenizer, "add_embedding_tokens"):
            raise DiffrtError(f"{source}: the {embedding.role} tokenizer takes no textual-inversion tokens (CLIP only)")
        model = pipe.models[embedding.role]
        wm, parameter = _table_parameter(pipe.folder, model.spec)
        table = _current_table(pipe, embedding.role, wm, parameter)
        ids = check_fits(embedding, tokenizer, table.shape[0], table.shape[1], source)
        table = table.copy()
        table[list(ids)] = embedding.vectors
        planned.append((embedding, ids, table, wm.updates({parameter: table})))
    # 2. The weights first (a backend refusing them leaves the tokenizers as they were), then the tokens.
    for embedding, ids, table, updates in planned:
        pipe.models[embedding.role].update_weights(updates)
        pipe._token_tables[embedding.role] = table
        got = pipe.tokenizers[embedding.role].add_embedding_tokens(embedding.tokens)
        if tuple(got) != ids:  # the tokenizer assigns ids itself: they must be the rows written
            raise DiffrtError(f"{source}: the {embedding.role} tokenizer gave {embedding.tokens} ids {got}, "
                              f"expected {list(ids)}")
        logger.info("%s: %s -> %s rows %d..%d", source, ", ".join(embedding.tokens), embedding.role, ids[0], ids[-1])
    return list(embeddings[0].tokens)


def _table_parameter(folder: Path, spec: Any) -> tuple[WeightMap, str]:
    wm = weight_map(folder, spec)
    names = [name for name in wm if name.endswith(TABLE_PARAMETER)]
    if len(names) != 1 or not wm[names[0]].placements:
        raise DiffrtError(f"stage {spec.name}: its weight map has no single token-embedding table "
                          f"(*{TABLE_PARAMETER}); re-export the model")
    return wm, names[0]


def _current_table(pipe: Any, role: str, wm: WeightMap, parameter: str) -> np.ndarray:
    """The table as the model runs it now (float32): what earlier loads wrote, else the
    graph's values (a half graph's stored values, widened exactly)."""
    if role in pipe._token_tables:
        return pipe._token_tables[role]
    placement = wm[parameter].placements[0]
    stored = read_values(pipe.folder / pipe.models[role].spec.graph_path, [placement.initializer])
    values = stored[placement.initializer]
    if placement.dtype == "bfloat16":
        values = (values.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    values = np.asarray(values, dtype=np.float32)
    if "transpose" in placement.transform:
        values = values.T
    return values.reshape(wm[parameter].shape)


__all__ = ["Embedding", "load_into"]
