"""A disk cache of built engines: ROOT/<backend>/<key>/, one folder per key.

The key hashes exactly the fields that change the built engine (the stage's file
hashes, static shapes, precision, library version, CPU/device), never "the file
exists". Each entry folder describes itself in meta.json: the fields its key covers
and the size and sha256 of each file, so a reader can check an entry without
trusting its name.

Entries are published atomically: the backend writes into a temporary folder beside
the entries, meta.json is written last, and the folder is renamed into place, so a
reader sees a complete entry or none. A temporary folder left by a process that died
mid-build (its pid gone, the folder an hour old) is removed by the next publish on
this machine. A damaged entry costs a rebuild, never an error,
and a root this process cannot write (an artifact owned by another user, a read-only
mount) is still read from; only publishing is switched off, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from diffrt.artifacts import sha256_file

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
CACHE_FORMAT = 1
_KEY_CHARS = 32  # 128 bits of sha256; meta.json's fields are compared on lookup as well
STALE_AFTER_S = 3600.0  # a temporary folder this old, whose process is gone, is an orphan


def cache_key(fields: Mapping[str, Any]) -> str:
    """Hex digest of `fields` (JSON-serializable), independent of the dict order."""
    canonical = json.dumps({"format": CACHE_FORMAT, "fields": fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:_KEY_CHARS]


def _normalized(fields: Mapping[str, Any]) -> Any:
    """`fields` as it reads back from meta.json (tuples become lists, and so on)."""
    return json.loads(json.dumps(fields, sort_keys=True))


class EngineCache:
    """The entries of one backend under one cache root."""

    def __init__(self, root: str | Path, backend: str):
        self.root = Path(root)
        self.folder = self.root / backend
        self.backend = backend
        self.writable = True  # switched off, with one warning, by the first failed write

    def entry_path(self, key: str) -> Path:
        return self.folder / key

    def lookup(self, key: str, fields: Mapping[str, Any]) -> Path | None:
        """The complete entry for `key`, or None (a miss). A damaged entry is removed."""
        entry = self.entry_path(key)
        if not entry.is_dir():
            logger.info("%s engine cache miss: %s", self.backend, entry)
            return None
        problem = _check_entry(entry, key, fields)
        if problem:
            self.discard(key, problem)
            return None
        logger.info("%s engine cache hit: %s", self.backend, entry)
        return entry

    def publish(self, key: str, fields: Mapping[str, Any], write: Callable[[Path], None]) -> Path | None:
        """Build an entry: `write(folder)` fills a temporary folder with the engine's
        files; meta.json is added and the folder renamed into place. Returns the entry,
        or None when the root is not writable (the caller runs without a disk cache)."""
        if not self.writable:
            return None
        self._sweep_orphans()
        try:
            tmp = self._temp_folder(key)
        except OSError as exc:
            self._disable(exc)
            return None
        try:
            write(tmp)
            files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
            meta = {"format": CACHE_FORMAT, "backend": self.backend, "key": key, "fields": _normalized(fields),
                    "files": files}
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            return self._rename_into_place(tmp, key)
        except OSError as exc:
            self._disable(exc)
            return None
        except Exception as exc:  # noqa: BLE001 - the library's own failure to serialize: run uncached
            logger.warning("%s engine cache: could not write entry %s (%s: %s); running without it",
                           self.backend, key, type(exc).__name__, exc)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded

    def _sweep_orphans(self) -> None:
        """Remove temporary folders (`.<key>.<pid>.<token>.tmp`) whose process is gone
        and that are older than STALE_AFTER_S: a build killed midway (a compiled UNet
        blob is GBs). The age guard spares a live build of another machine sharing the
        folder, whose pid means nothing here."""
        try:
            candidates = list(self.folder.glob(".*.tmp"))
        except OSError:
            return
        now = time.time()
        for tmp in candidates:
            try:
                pid = int(tmp.name.split(".")[2])
                old = now - tmp.stat().st_mtime > STALE_AFTER_S
            except (IndexError, ValueError, OSError):
                continue
            if old and not _pid_alive(pid):
                logger.info("%s engine cache: removing %s, left by process %d that is gone", self.backend, tmp, pid)
                shutil.rmtree(tmp, ignore_errors=True)

    def _temp_folder(self, key: str) -> Path:
        """A new folder beside the entries (same file system, so the rename is atomic).
        Made with mkdir, not mkdtemp: its private 0700 would keep other accounts from
        reading the engine once it is published."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        return tmp

    def discard(self, key: str, reason: str) -> None:
        """Remove a damaged entry (if this process may) so that it is rebuilt."""
        entry = self.entry_path(key)
        logger.warning("%s engine cache entry %s is unusable (%s); rebuilding it", self.backend, entry, reason)
        try:
            shutil.rmtree(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove %s (%s); it stays unused", entry, exc)

    def _rename_into_place(self, tmp: Path, key: str) -> Path:
        entry = self.entry_path(key)
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process published the same key first (a non-empty folder is not
            # replaced); its entry is as good as ours.
            if not entry.is_dir():
                raise
        logger.info("%s engine cache: stored %s", self.backend, entry)
        return entry

    def _disable(self, exc: OSError) -> None:
        self.writable = False
        logger.warning("%s engine cache %s cannot be written (%s); running without a disk cache",
                       self.backend, self.folder, exc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _check_entry(entry: Path, key: str, fields: Mapping[str, Any]) -> str:
    """Why `entry` cannot be used ('' when it can). Sizes are checked, not hashes:
    hashing a multi-GB engine at every load would cost as much as importing it."""
    try:
        meta = json.loads((entry / META_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{META_NAME} unreadable: {exc}"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        return f"{META_NAME} is not a format-{CACHE_FORMAT} entry for key {key}"
    if meta.get("fields") != _normalized(fields):
        return f"{META_NAME} describes other fields than the key's"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"{META_NAME} lists no files"
    for name, record in files.items():
        path = entry / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        expected = record.get("size") if isinstance(record, dict) else None
        if size != expected:
            return f"{name} has {size} bytes, {META_NAME} says {expected}"
    return ""


__all__ = ["CACHE_FORMAT", "META_NAME", "EngineCache", "cache_key"]
