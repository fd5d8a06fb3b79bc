"""Verification stamps: a record of files already hashed, that nobody else can write.

A stamp says "this file, at this absolute path, with this size, mtime, ctime, inode
and device, hashed to this sha256". A file whose stamp still matches was verified
before and has not been written, replaced or swapped since, so a load need not read
it again. Stamps are kept in the cache folder (default OUT/engines/verified.json).

That file lives beside the artifact, where whoever can change the artifact can also
change the record. So every stamp carries an HMAC-SHA256 of all of the above under a
secret key that never leaves this account: a stamp edited to match a changed file, or
copied from another machine or account, fails its MAC and is not trusted (the file is
hashed). The key is 32 random bytes in `$XDG_CONFIG_HOME/diffrt/stamp.key` (default
`~/.config/diffrt/stamp.key`), created with mode 0600 on first use; the environment
variable DIFFRT_STAMP_KEY_FILE names another file. A key that cannot be read or
created, or that other accounts could read or write, switches stamps off: every load
then hashes, as with verify="full".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAMPS_NAME = "verified.json"
STAMP_KEY_ENV = "DIFFRT_STAMP_KEY_FILE"
KEY_BYTES = 32
_MAC_VERSION = 1  # bump when what the MAC covers changes: older stamps are then hashed again


def key_path() -> Path | None:
    """Where the stamp key lives: $DIFFRT_STAMP_KEY_FILE, else the user's config folder."""
    override = os.environ.get(STAMP_KEY_ENV)
    if override:
        return Path(override).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME")
    try:
        base = Path(config) if config else Path.home() / ".config"
    except RuntimeError:  # no home directory (a bare service account)
        return None
    return base / "diffrt" / "stamp.key"


def load_key(create: bool = True) -> bytes | None:
    """The stamp key, created on first use; None (stamps off, with a log line saying
    why) when it is missing and cannot be made, or is not private to this account."""
    path = key_path()
    if path is None:
        logger.info("no home folder for the stamp key; set %s to keep verification stamps", STAMP_KEY_ENV)
        return None
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            return None
    except (OSError, ValueError) as exc:
        logger.warning("verification stamps are off: %s (%s); every load hashes its files", path, exc)
        return None
    try:
        _create_key(path)
        return _read_key(path)
    except (OSError, ValueError) as exc:
        logger.info("cannot create the stamp key %s (%s); every load hashes its files (set %s to a private, "
                    "writable path to keep stamps)", path, exc, STAMP_KEY_ENV)
        return None


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_uid != os.geteuid():
            raise ValueError("owned by another account")
        if st.st_mode & 0o077:
            raise ValueError(f"mode {stat.S_IMODE(st.st_mode):o}: other accounts can read or write it; "
                             "chmod 600 it (or delete it: a new one is made)")
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise ValueError(f"holds {len(data)} bytes, not {KEY_BYTES}; delete it and a new one is made")
    return data


def _create_key(path: Path) -> None:
    """Write a new key beside `path`, then link it into place: a concurrent reader sees
    no key or a whole one, and of two processes creating it at once, one key wins."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use that one
        logger.info("created the verification stamp key %s", path)
    finally:
        tmp.unlink(missing_ok=True)


def stat_stamp(path: Path) -> list[int]:
    """What changes when a file is rewritten, replaced or swapped: size, mtime, ctime
    (which `touch` cannot set back), inode and device."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _mac(key: bytes, path: Path, stamp: list[int], sha256: str) -> str:
    message = json.dumps([_MAC_VERSION, os.path.realpath(path), stamp, sha256], separators=(",", ":"))
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


class VerifiedStamps:
    """The stamps recorded in one file, by name (an artifact file's manifest path, or
    an engine file's path under the cache root).

    `path=None`, or no usable key: nothing is trusted or remembered, so every check
    hashes. A record that cannot be written (an artifact owned by another account) is
    not an error: the next load hashes again."""

    def __init__(self, path: Path | None, key: bytes | None = None):
        self.path = path
        self.key = key if key is not None or path is None else load_key()
        self.entries: dict[str, dict[str, Any]] = {}
        self._changed: set[str] = set()
        if self.path is not None and self.key is not None:
            self.entries = _read_entries(self.path)

    @property
    def enabled(self) -> bool:
        return self.path is not None and self.key is not None

    def trusted(self, name: str, file: Path, sha256: str) -> bool:
        """Whether `file` was hashed to `sha256` by this account and is unchanged since."""
        entry = self.entries.get(name)
        if not self.enabled or not entry or entry.get("sha256") != sha256 or not isinstance(entry.get("mac"), str):
            return False
        try:
            stamp = stat_stamp(file)
        except OSError:
            return False  # missing: the caller's own check says so
        if entry.get("stat") != stamp:
            return False
        return hmac.compare_digest(entry["mac"], _mac(self.key, file, stamp, sha256))

    def remember(self, name: str, file: Path, sha256: str) -> None:
        """Record that `file` (just hashed) hashes to `sha256`."""
        if not self.enabled:
            return
        stamp = stat_stamp(file)
        self.entries[name] = {"stat": stamp, "sha256": sha256, "mac": _mac(self.key, file, stamp, sha256)}
        self._changed.add(name)

    def forget(self, name: str) -> None:
        if self.enabled and name in self.entries:
            del self.entries[name]
            self._changed.add(name)

    def save(self) -> None:
        """Write what changed over the file's current contents (another process may have
        recorded other files since this one read it)."""
        if not self.enabled or not self._changed:
            return
        from diffrt.artifacts import atomic_write_text  # artifacts imports this module

        merged = _read_entries(self.path)
        for name in self._changed:
            if name in self.entries:
                merged[name] = self.entries[name]
            else:
                merged.pop(name, None)
        try:
            atomic_write_text(self.path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            logger.info("cannot record verified files in %s (%s); the next load hashes them again", self.path, exc)
            return
        self._changed.clear()


def _read_entries(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


__all__ = ["STAMPS_NAME", "STAMP_KEY_ENV", "VerifiedStamps", "key_path", "load_key", "stat_stamp"]
