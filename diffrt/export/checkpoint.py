"""Finding and reading a source checkpoint: a local diffusers folder or a hub id."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from diffrt.artifacts import sha256_file
from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a text-to-image export reads from a hub repo: configs, safetensors weights,
# tokenizer and scheduler files; not the fp16/non-EMA variants or single-file .ckpt.
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "tokenizer*/*", "scheduler/*"]
_HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.ckpt"]


def resolve_source(src: str) -> Path:
    """A local diffusers folder for `src`, downloading a hub id if the machine is online.

    Raises a one-line DiffrtError for a path that is not a diffusers folder, or a hub
    id that cannot be fetched (offline, unknown repo, gated).
    """
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DiffrtError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder saved with "
                "`pipeline.save_pretrained(...)` or a hub id like 'org/name'"
            )
        return path.resolve()
    if not _HUB_ID.match(src):
        raise DiffrtError(f"{src}: no such folder, and not a hub id of the form 'org/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DiffrtError(f"{src} looks like a hub id but huggingface_hub is not installed; pip install 'diffrt[export]'") from None
    logger.info("downloading %s from the hub ...", src)
    try:
        folder = snapshot_download(src, allow_patterns=_HUB_PATTERNS, ignore_patterns=_HUB_IGNORE)
    except Exception as exc:  # noqa: BLE001 - offline, 404, gated: all one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(
            f"could not download {src!r} from the hub ({type(exc).__name__}: {first}); check the id and the network, "
            "or pass a local diffusers folder"
        ) from None
    return Path(folder)


def read_model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffrtError(f"{path} cannot be read as JSON ({exc}); is the checkpoint complete?") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise DiffrtError(f"{path} has no _class_name; it is not a diffusers pipeline index")
    return data


def quiet_library_progress() -> None:
    """diffrt's own log lines say what is loading and saving; the libraries' progress
    bars ("Loading pipeline components", "Writing model shards") only add noise."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffrtError(f"{path} is missing; the checkpoint is incomplete") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffrtError(f"{path} cannot be read as JSON ({exc})") from None


def checkpoint_hash(folder: Path) -> str:
    """sha256 over every file of the checkpoint (relative path + content hash), so the
    manifest says exactly which weights it was exported from."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()
