"""The generic engine cache: keys over fields, atomic entries with meta.json, damaged
entries rebuilt, an unwritable root tolerated. No backend needed: entries hold
whatever files the `write` callback puts there."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from diffrt.artifacts import sha256_file
from diffrt.runtime.engine_cache import CACHE_FORMAT, EngineCache, cache_key

FIELDS = {"stage": "unet", "files": ["ab" * 32], "inputs": {"sample": [2, 4, 64, 64]}, "precision": "fp32",
          "library": "1.2.3", "cpu": {"model": "AMD EPYC", "flags": ["avx2", "fma"]}}


def _write_engine(payload: bytes = b"engine bytes"):
    def write(folder: Path) -> None:
        (folder / "engine.bin").write_bytes(payload)

    return write


def test_key_is_stable_and_order_free():
    shuffled = dict(reversed(list(FIELDS.items())))
    assert cache_key(FIELDS) == cache_key(shuffled) == cache_key(json.loads(json.dumps(FIELDS)))
    assert len(cache_key(FIELDS)) == 32 and all(c in "0123456789abcdef" for c in cache_key(FIELDS))


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": {"sample": [2, 4, 64, 48]}},
        {"precision": "bf16"},
        {"library": "1.2.4"},
        {"files": ["cd" * 32]},
        {"cpu": {"model": "AMD EPYC", "flags": ["avx2", "avx512f", "fma"]}},
        {"extra": 1},
    ],
)
def test_key_changes_with_every_field(change):
    assert cache_key({**FIELDS, **change}) != cache_key(FIELDS)


def test_publish_then_lookup(tmp_path, caplog):
    cache = EngineCache(tmp_path, "ort")
    key = cache_key(FIELDS)
    with caplog.at_level(logging.INFO, logger="diffrt"):
        assert cache.lookup(key, FIELDS) is None
        entry = cache.publish(key, FIELDS, _write_engine())
        assert cache.lookup(key, FIELDS) == entry
    assert entry == tmp_path / "ort" / key
    assert "ort engine cache miss" in caplog.text and "ort engine cache hit" in caplog.text
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["format"] == CACHE_FORMAT and meta["key"] == key and meta["backend"] == "ort"
    assert meta["fields"] == json.loads(json.dumps(FIELDS))
    assert meta["files"] == {"engine.bin": {"size": 12, "sha256": sha256_file(entry / "engine.bin")}}
    # Nothing but the entry is left: the temporary folder was renamed, not copied.
    assert [p.name for p in (tmp_path / "ort").iterdir()] == [key]
    # Readable by other accounts as far as the umask allows (not mkdtemp's 0700).
    umask = os.umask(0o022)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_failing_write_leaves_nothing_and_is_not_fatal(tmp_path, caplog):
    cache = EngineCache(tmp_path, "ort")
    key = cache_key(FIELDS)

    def broken(folder: Path) -> None:
        (folder / "engine.bin").write_bytes(b"half")
        raise RuntimeError("the library could not serialize")

    with caplog.at_level(logging.WARNING, logger="diffrt"):
        assert cache.publish(key, FIELDS, broken) is None
    assert "could not write entry" in caplog.text
    assert list((tmp_path / "ort").iterdir()) == []
    assert cache.writable  # a library failure is not an unwritable root
    assert cache.publish(key, FIELDS, _write_engine()) == tmp_path / "ort" / key


def test_publishing_a_key_twice_keeps_one_entry(tmp_path):
    """Two processes building the same engine: the second rename finds the first's
    entry and leaves it."""
    key = cache_key(FIELDS)
    first = EngineCache(tmp_path, "ort").publish(key, FIELDS, _write_engine(b"first"))
    second = EngineCache(tmp_path, "ort").publish(key, FIELDS, _write_engine(b"other"))
    assert first == second and (first / "engine.bin").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "ort").iterdir()] == [key]


def _damage_missing_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def _damage_bad_json(entry: Path) -> None:
    (entry / "meta.json").write_text("{")


def _damage_truncated_file(entry: Path) -> None:
    (entry / "engine.bin").write_bytes(b"eng")


def _damage_missing_file(entry: Path) -> None:
    (entry / "engine.bin").unlink()


def _damage_other_fields(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["fields"]["precision"] = "bf16"
    (entry / "meta.json").write_text(json.dumps(meta))


def _damage_same_size_content(entry: Path) -> None:
    (entry / "engine.bin").write_bytes(b"ENGINE bytes")  # what only a hash notices


def _damage_unlisted_file(entry: Path) -> None:
    (entry / "engine.bin.data").write_bytes(b"weights a loader might pick up")


def _damage_file_is_a_link(entry: Path) -> None:
    outside = entry.parent.parent / "outside.bin"
    outside.write_bytes((entry / "engine.bin").read_bytes())  # identical bytes: only the link is wrong
    (entry / "engine.bin").unlink()
    (entry / "engine.bin").symlink_to(outside)


def _damage_meta_names_a_path(entry: Path) -> None:
    outside = entry.parent.parent / "outside.bin"
    outside.write_bytes((entry / "engine.bin").read_bytes())
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"] = {"../../outside.bin": meta["files"]["engine.bin"]}
    (entry / "engine.bin").unlink()
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_damage_missing_meta, _damage_bad_json, _damage_truncated_file,
                                    _damage_missing_file, _damage_other_fields, _damage_same_size_content,
                                    _damage_unlisted_file, _damage_file_is_a_link, _damage_meta_names_a_path])
def test_damaged_entry_is_a_miss_and_removed(tmp_path, caplog, damage):
    cache = EngineCache(tmp_path, "ort")
    key = cache_key(FIELDS)
    entry = cache.publish(key, FIELDS, _write_engine())
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        assert cache.lookup(key, FIELDS) is None
    assert "is unusable" in caplog.text and "rebuilding" in caplog.text
    assert not entry.exists()
    assert cache.publish(key, FIELDS, _write_engine()) == entry and cache.lookup(key, FIELDS) == entry


def test_discard_of_an_undeletable_entry_warns(tmp_path, caplog, monkeypatch):
    cache = EngineCache(tmp_path, "ort")
    key = cache_key(FIELDS)
    cache.publish(key, FIELDS, _write_engine())

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("diffrt.runtime.engine_cache.shutil.rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        cache.discard(key, "test")  # no exception
    assert "cannot remove" in caplog.text


def test_unwritable_root_warns_once_and_runs_uncached(tmp_path, caplog):
    """The root's parent is a regular file: not creatable by anyone, root included."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = EngineCache(blocker / "engines", "ort")
    key = cache_key(FIELDS)
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        assert cache.lookup(key, FIELDS) is None
        assert cache.publish(key, FIELDS, _write_engine()) is None
        assert cache.publish(cache_key({**FIELDS, "precision": "bf16"}), FIELDS, _write_engine()) is None
    assert not cache.writable
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1


def test_readable_but_unwritable_root_still_serves_hits(tmp_path, monkeypatch):
    """An artifact with engines built by another account: lookups work, and a miss
    does not try to write (simulated: creating the temporary folder fails)."""
    key = cache_key(FIELDS)
    entry = EngineCache(tmp_path, "ort").publish(key, FIELDS, _write_engine())
    cache = EngineCache(tmp_path, "ort")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache, "_temp_folder", refuse)
    other = cache_key({**FIELDS, "precision": "bf16"})
    assert cache.publish(other, FIELDS, _write_engine()) is None and not cache.writable
    assert cache.lookup(key, FIELDS) == entry


def test_publish_removes_orphaned_temporary_folders(tmp_path):
    """A build killed midway leaves `.<key>.<pid>.<token>.tmp`; the next publish removes
    it once its process is gone and it is old, and leaves a live or recent one alone."""
    import subprocess
    import sys
    import time

    cache = EngineCache(tmp_path, "openvino")
    cache.folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    hour_ago = time.time() - 2 * 3600
    orphan = cache.folder / f".{'a' * 32}.{dead_pid}.0123abcd.tmp"
    recent = cache.folder / f".{'b' * 32}.{dead_pid}.0123abcd.tmp"  # dead but recent: maybe another machine's
    live = cache.folder / f".{'c' * 32}.{os.getpid()}.0123abcd.tmp"  # old but its process runs
    for folder in (orphan, recent, live):
        folder.mkdir()
        (folder / "model.blob").write_bytes(b"half a blob")
    for folder in (orphan, live):
        os.utime(folder, (hour_ago, hour_ago))
    key = cache_key(FIELDS)
    assert cache.publish(key, FIELDS, _write_engine()) == cache.folder / key
    assert not orphan.exists() and recent.is_dir() and live.is_dir()


def test_lookup_hashes_an_entry_once_then_trusts_its_stamp(tmp_path, monkeypatch):
    import diffrt.runtime.engine_cache as engine_cache

    hashed = []
    real = engine_cache.sha256_file
    monkeypatch.setattr(engine_cache, "sha256_file", lambda path, *a: hashed.append(path.name) or real(path, *a))
    cache = EngineCache(tmp_path, "ort")
    key = cache_key(FIELDS)
    entry = cache.publish(key, FIELDS, _write_engine())
    assert hashed == ["engine.bin"]  # hashed once, to write meta.json, and stamped
    hashed.clear()
    assert cache.lookup(key, FIELDS) == entry and hashed == []
    (tmp_path / "verified.json").unlink()  # e.g. the record lost, or made under another key
    assert cache.lookup(key, FIELDS) == entry and hashed == ["engine.bin"]
    hashed.clear()
    assert cache.lookup(key, FIELDS) == entry and hashed == []


def test_an_entry_that_is_a_link_is_unlinked_not_followed(tmp_path):
    cache = EngineCache(tmp_path / "root", "ort")
    key = cache_key(FIELDS)
    elsewhere = EngineCache(tmp_path / "elsewhere", "ort").publish(key, FIELDS, _write_engine())
    cache.folder.mkdir(parents=True)
    cache.entry_path(key).symlink_to(elsewhere)
    assert cache.lookup(key, FIELDS) is None
    assert not os.path.lexists(cache.entry_path(key)) and (elsewhere / "engine.bin").read_bytes() == b"engine bytes"
