"""The export side of textual inversion (diffrt/textual_inversion.py has the formats
and rules): every CLIP text encoder stage of SD/SDXL is exported with SPARE_TOKEN_ROWS
zero rows after its vocabulary (room for embeddings loaded at run time), and
`diffrt export ... --textual-inversion FILE[:TOKEN]` writes embeddings into those rows
and records their tokens beside the artifact's tokenizer (textual_inversion.json), so
the runtime tokenizer knows them. `.pt` files (A1111's pickles) are read here, with
torch; the runtime reads .safetensors only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffrt.artifacts import sha256_file
from diffrt.errors import DiffrtError
from diffrt.textual_inversion import (
    SPARE_TOKEN_ROWS,
    Embedding,
    check_fits,
    embeddings_for,
    parse,
    read_file,
    write_tokens_file,
)

logger = logging.getLogger(__name__)

# The families whose text encoders are CLIP models with a token table this module handles.
FAMILIES = ("sd", "sdxl")


def reserve_token_rows(encoder: Any, rows: int = SPARE_TOKEN_ROWS) -> None:
    """Append `rows` zero rows to a CLIP encoder's token-embedding table (in place). No
    prompt id reaches them until an embedding is written there, so the outputs are
    the checkpoint's; the config's vocab_size stays (the trace inputs draw from it)."""
    import torch

    table = encoder.get_input_embeddings()
    weight = table.weight.detach()
    grown = torch.nn.Embedding(weight.shape[0] + rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    grown.weight.data = torch.cat([weight, weight.new_zeros(rows, weight.shape[1])])
    grown.requires_grad_(False)
    encoder.set_input_embeddings(grown)


def read_state(path: Path) -> dict[str, Any]:
    """A .safetensors or .pt embedding file's state dict, tensors as numpy arrays."""
    if path.suffix not in (".pt", ".bin", ".ckpt"):
        return read_file(path)
    if not path.is_file():
        raise DiffrtError(f"{path}: no such textual-inversion file")
    import torch

    try:
        # weights_only: a pickle may run code when loaded; diffusers' load_state_dict loads these so too
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad pickle
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"{path}: cannot read it as a textual-inversion .pt file ({first})") from None
    return _to_numpy(state) if isinstance(state, dict) else {"": _to_numpy(state)}


def _to_numpy(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().float().numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


def parse_item(item: str | os.PathLike | tuple) -> tuple[Path, str | None]:
    """"FILE[:TOKEN]" (the CLI form) or (FILE, TOKEN) -> (path, token or None)."""
    if isinstance(item, tuple):
        path, token = item
        return Path(path), token or None
    text = os.fspath(item)
    if not Path(text).exists() and ":" in text:
        path, _, token = text.rpartition(":")
        return Path(path), token or None
    return Path(text), None


@dataclass
class BakedEmbeddings:
    """Embeddings to write into the exported text encoders: per role, (embedding, ids)."""

    rows: dict[str, list[tuple[Embedding, tuple[int, ...]]]] = field(default_factory=dict)
    tokenizers: dict[str, str] = field(default_factory=dict)  # role -> tokenizer folder name
    first_ids: dict[str, int] = field(default_factory=dict)
    sources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # role -> file, sha256, tokens

    def wrap(self, role: str, load: Callable[[], Any]) -> Callable[[], Any]:
        """The stage loader of `role`, writing this role's vectors into its table."""
        if role not in self.rows:
            return load

        def loaded() -> Any:
            import torch

            stage = load()
            weight = stage.weights.get_input_embeddings().weight
            for embedding, ids in self.rows[role]:
                weight.data[list(ids)] = torch.from_numpy(embedding.vectors).to(weight.dtype)
            return stage

        return loaded

    def finish_tokenizer(self, folder: Path, component: str) -> None:
        """Record the tokens in a copied tokenizer folder of the artifact."""
        for role, name in self.tokenizers.items():
            if name == component and role in self.rows:
                write_tokens_file(folder, [e.tokens for e, _ in self.rows[role]], self.first_ids[role],
                                  self.sources.get(role))


def prepare(items: Sequence, folder: Path, fam: Any) -> BakedEmbeddings | None:
    """Read and check every --textual-inversion item before the long part: the files, the
    tokens (new to the checkpoint's tokenizers, no duplicates), the vectors' width, the
    spare rows; the ids follow diffusers' order (file by file, token by token)."""
    if not items:
        return None
    if fam.NAME not in FAMILIES:
        raise DiffrtError(f"--textual-inversion: {fam.NAME} artifacts take none (SD 1.x/2.x and SDXL do)")
    from diffrt.runtime.tokenizers import CLIPTokenizer

    roles = tuple(r for r, tok in fam.TOKENIZER_OF.items() if (folder / r).is_dir() and (folder / tok).is_dir())
    tokenizers = {r: CLIPTokenizer.from_dir(folder / fam.TOKENIZER_OF[r]) for r in roles}
    baked = BakedEmbeddings(tokenizers={r: fam.TOKENIZER_OF[r] for r in roles},
                            first_ids={r: t.size for r, t in tokenizers.items()})
    for item in items:
        path, token = parse_item(item)
        source = f"--textual-inversion {path}"
        for embedding in embeddings_for(parse(read_state(path), token, source), roles, source):
            config = _text_config(folder / embedding.role)
            rows = int(config["vocab_size"]) + SPARE_TOKEN_ROWS
            ids = check_fits(embedding, tokenizers[embedding.role], rows, int(config["hidden_size"]), source)
            tokenizers[embedding.role].add_embedding_tokens(embedding.tokens)
            baked.rows.setdefault(embedding.role, []).append((embedding, ids))
            baked.sources.setdefault(embedding.role, []).append(
                {"file": path.name, "sha256": sha256_file(path), "tokens": list(embedding.tokens)})
            logger.info("%s: %s -> %s rows %d..%d", path, ", ".join(embedding.tokens), embedding.role, ids[0], ids[-1])
    return baked


def _text_config(path: Path) -> dict[str, Any]:
    from diffrt.export.checkpoint import read_json

    config = read_json(path / "config.json")
    return config.get("text_config", config)  # a nested text_config in some saved CLIP configs


__all__ = ["BakedEmbeddings", "prepare", "read_state", "reserve_token_rows"]
