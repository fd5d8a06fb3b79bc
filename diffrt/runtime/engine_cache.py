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

An entry is checked as strictly as the artifact's own files: a lookup hashes each file
against meta.json unless a keyed stamp (diffrt.stamps, in ROOT/verified.json) says this
account hashed it and it has not changed since; publishing stamps what it wrote. An
entry must be a real folder (no links) holding exactly meta.json and the files it
lists. One that fails is removed and rebuilt: a same-size altered engine never runs.
`verify_entries` hashes every entry built from given stages (verify="full"), and
`entry_problems` reports without removing (`diffrt inspect --verify`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffrt.artifacts import StageSpec, path_problem, sha256_file
from diffrt.stamps import STAMPS_NAME, VerifiedStamps

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
CACHE_FORMAT = 1
_KEY_CHARS = 32  # 128 bits of sha256; meta.json's fields are compared on lookup as well
STALE_AFTER_S = 3600.0  # a temporary folder this old, whose process is gone, is an orphan
# Folders under a cache root that are not EngineCache entries: ONNX Runtime's TensorRT
# provider keeps its own engines there (no meta.json; the provider checks them itself).
FOREIGN_FOLDERS = ("ort-trt",)


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
        """The complete, verified entry for `key`, or None (a miss). A damaged or altered
        entry is removed. Files are hashed unless stamped (then stamped)."""
        entry = self.entry_path(key)
        if not os.path.lexists(entry):
            logger.info("%s engine cache miss: %s", self.backend, entry)
            return None
        stamps = VerifiedStamps(self.root / STAMPS_NAME)
        problem = entry_problem(entry, key, fields, stamps=stamps, name=f"{self.backend}/{key}")
        stamps.save()
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
            entry = self._rename_into_place(tmp, key)
            if json.loads((entry / META_NAME).read_text(encoding="utf-8")) == meta:  # ours, not a racing twin's
                self._stamp(key, files)
            return entry
        except OSError as exc:
            self._disable(exc)
            return None
        except Exception as exc:  # noqa: BLE001 - the library's own failure to serialize: run uncached
            logger.warning("%s engine cache: could not write entry %s (%s: %s); running without it",
                           self.backend, key, type(exc).__name__, exc)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded

    def _stamp(self, key: str, files: Mapping[str, Mapping[str, Any]]) -> None:
        """Record the files just written and hashed, so the next lookup need not hash them."""
        stamps = VerifiedStamps(self.root / STAMPS_NAME)
        try:
            for name, record in files.items():
                stamps.remember(f"{self.backend}/{key}/{name}", self.entry_path(key) / name, record["sha256"])
        except OSError:
            return  # removed under us: the next lookup finds out
        stamps.save()

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
            if os.path.islink(entry) or not entry.is_dir():
                entry.unlink()  # a link itself, never what it points to; or a stray file
            else:
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


def _read_meta(entry: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta.json, '') of a real entry folder, or (None, why it is unusable)."""
    try:
        if not stat.S_ISDIR(os.lstat(entry).st_mode):
            return None, "not a folder (a link or a file)"
        meta = json.loads((entry / META_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{META_NAME} unreadable: {exc}"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return None, f"{META_NAME} is not a format-{CACHE_FORMAT} entry"
    return meta, ""


def entry_problem(entry: Path, key: str | None = None, fields: Mapping[str, Any] | None = None,
                  stamps: VerifiedStamps | None = None, name: str = "", mode: str = "stamp") -> str:
    """Why `entry` cannot be used ('' when it can): meta.json for `key` and `fields`
    (when given), exactly the files it lists, none a link, each of its size and sha256.
    `mode`: "stamp" skips hashing a file with a valid stamp in `stamps` (under
    `name`/<file>), "full" hashes every file, "size" none; a file hashed and found
    right is stamped."""
    meta, problem = _read_meta(entry)
    if meta is None:
        return problem
    if key is not None and meta.get("key") != key:
        return f"{META_NAME} is not the entry for key {key}"
    if fields is not None and meta.get("fields") != _normalized(fields):
        return f"{META_NAME} describes other fields than the key's"
    files = meta.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(r, dict) for r in files.values()):
        return f"{META_NAME} lists no files"
    for file_name in files:
        if path_problem(file_name) or "/" in file_name or file_name == META_NAME:
            return f"{META_NAME} lists {file_name!r}, not a file name in the entry"
    try:
        present = {p.name for p in entry.iterdir()}
    except OSError as exc:
        return f"cannot list it ({exc})"
    unlisted = sorted(present - set(files) - {META_NAME})
    if unlisted:
        return f"{unlisted[0]} is not listed in {META_NAME}"
    for file_name, record in files.items():
        if problem := _file_problem(entry / file_name, record, stamps, f"{name}/{file_name}", mode):
            return f"{file_name} {problem}"
    return ""


def _file_problem(path: Path, record: Mapping[str, Any], stamps: VerifiedStamps | None, name: str,
                  mode: str) -> str:
    try:
        st = os.lstat(path)
    except OSError:
        return "is missing"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a link?)"
    if st.st_size != record.get("size"):
        return f"has {st.st_size} bytes, {META_NAME} says {record.get('size')}"
    sha256 = record.get("sha256")
    if mode == "size" or (mode == "stamp" and stamps is not None and stamps.trusted(name, path, sha256)):
        return ""
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return f"cannot be read ({exc})"
    if digest != sha256:
        return f"does not match its sha256 in {META_NAME} (damaged or altered)"
    if stamps is not None:
        stamps.remember(name, path, sha256)
    return ""


def _entries(root: Path) -> list[tuple[str, Path]]:
    """(backend, entry folder) of every entry under `root` (not temporary folders)."""
    found = []
    try:
        backends = sorted(p for p in root.iterdir()
                          if p.is_dir() and not p.name.startswith(".") and p.name not in FOREIGN_FOLDERS)
    except OSError:
        return []
    for folder in backends:
        try:
            found += [(folder.name, e) for e in sorted(folder.iterdir())
                      if not e.name.startswith(".") and (e.is_dir() or e.is_symlink())]
        except OSError:
            continue
    return found


def verify_entries(root: str | Path, stages: Sequence[StageSpec]) -> None:
    """Hash every file of every entry under `root` built from one of `stages` (its
    meta.json fields name the stage's file hashes), whatever the stamps say; remove
    those that do not match (they are rebuilt) and stamp the others."""
    root = Path(root)
    wanted = [[f.sha256 for f in spec.files] for spec in stages]
    stamps = VerifiedStamps(root / STAMPS_NAME)
    for backend, entry in _entries(root):
        meta, _ = _read_meta(entry)
        fields = meta.get("fields") if meta else None
        if not isinstance(fields, dict) or fields.get("files") not in wanted:
            continue  # another stage's, another artifact's, or unreadable: its own lookup judges it
        if problem := entry_problem(entry, stamps=stamps, name=f"{backend}/{entry.name}", mode="full"):
            EngineCache(root, backend).discard(entry.name, problem)
    stamps.save()


def entry_problems(root: str | Path, check_hashes: bool) -> tuple[int, list[str]]:
    """(entries checked, one line per unusable entry) under `root`, removing nothing:
    sizes and listing, and with `check_hashes` every file's sha256."""
    root = Path(root)
    entries = _entries(root)
    problems = []
    for _, entry in entries:
        if problem := entry_problem(entry, key=entry.name, mode="full" if check_hashes else "size"):
            problems.append(f"{entry}: {problem}")
    return len(entries), problems


__all__ = ["CACHE_FORMAT", "META_NAME", "EngineCache", "cache_key", "entry_problem", "entry_problems",
           "verify_entries"]
