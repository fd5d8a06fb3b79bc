"""Checking an artifact folder against its manifest: every file the runtime reads is
named by the manifest, lies inside the folder (no '..', absolute paths or links), has
the recorded size and, unless a keyed stamp (diffrt.stamps) vouches for it, the
recorded sha256; copied folders (tokenizer/, scheduler/) hold nothing unlisted.

What this protects against, and what not, is README.md's "Security" section: the
manifest is the reference, so this catches any file that differs from it (corruption,
truncation, a file edited, replaced or added), not an artifact rewritten consistently,
manifest included, by someone who can write the folder.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from diffrt.artifacts import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    link_message,
    outside_message,
    path_problem,
    permission_denied,
    read_manifest,
    sha256_file,
)
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.stamps import VerifiedStamps

logger = logging.getLogger(__name__)

VERIFY_MODES = ("stamp", "full", "size")


def _lstat_inside(folder: Path, relpath: str) -> tuple[Path, os.stat_result]:
    """folder/relpath and its stat, walking one name at a time without following links.
    Raises ArtifactError for a path that leaves the folder or passes through a symbolic
    link; OSError (FileNotFoundError, NotADirectoryError, ...) when it is not there."""
    if problem := path_problem(relpath):
        raise ArtifactError(outside_message("path", relpath, problem))
    current = folder
    for part in relpath.split("/"):
        current = current / part
        st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(link_message(repr(relpath), current))
    return current, st


def artifact_file(folder: str | Path, relpath: str) -> Path:
    """folder/relpath for reading: a regular file inside the folder reached without
    links, or a one-line ArtifactError naming it."""
    folder = Path(folder)
    try:
        path, st = _lstat_inside(folder, relpath)
    except OSError:
        raise ArtifactError(f"{folder / relpath} is missing; the artifact folder is incomplete, re-export it") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is not a regular file; re-export the model")
    return path


def file_problem(folder: Path, record: FileRecord, check_hash: bool = True) -> str | None:
    """What is wrong with one artifact file, in one line, or None if it matches its record."""
    try:
        path, st = _lstat_inside(folder, record.path)
    except ArtifactError as exc:
        return str(exc)
    except PermissionError:
        return permission_denied(folder / record.path)
    except OSError:
        return f"{folder / record.path} is missing; the artifact folder is incomplete, re-export it"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file; the artifact folder is damaged, re-export it"
    if st.st_size != record.size:
        return f"{path} has {st.st_size} bytes, the manifest says {record.size}: the file is corrupted or truncated; re-export"
    if not os.access(path, os.R_OK):
        return permission_denied(path)
    if check_hash:
        try:
            digest = sha256_file(path)
        except PermissionError:
            return permission_denied(path)
        if digest != record.sha256:
            return f"{path} does not match its sha256 in {MANIFEST_NAME}: the file is corrupted or altered; re-export"
    return None


def component_problem(folder: Path, name: str, records: Iterable[FileRecord]) -> str | None:
    """What is wrong with a copied folder (tokenizer/, scheduler/), or None: it must be
    a real folder holding only the files the manifest lists (any other file could
    change what the runtime reads, unverified), with no links. Listed files themselves
    are checked by file_problem."""
    listed = {r.path for r in records}
    root = folder / name
    try:
        st = os.lstat(root)
    except OSError:
        return f"{root} is missing; the artifact folder is incomplete, re-export it"
    if stat.S_ISLNK(st.st_mode):
        return link_message(f"components.{name}", root)
    if not stat.S_ISDIR(st.st_mode):
        return f"{root} is not a folder; the artifact folder is damaged, re-export it"
    pending = [root]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except PermissionError:
            return permission_denied(current)
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                return link_message(f"components.{name}", path)
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif path.relative_to(folder).as_posix() not in listed:
                return (f"{path} is not listed in {MANIFEST_NAME} (components.{name}): diffrt reads only the files "
                        "its manifest lists and hashes; remove it, or re-export the model")
    return None


def unrecorded_components(manifest: Manifest) -> list[str]:
    """Folders the runtime reads (tokenizers, scheduler) for which the manifest records
    no files. diffrt's exporter has always recorded them; a hand-made or edited
    manifest may not: such a folder is read unverified, with a warning."""
    from diffrt.families import get_family  # families import this module

    try:
        needed = [*get_family(manifest.family).tokenizers(manifest.model), "scheduler"]
    except (DiffrtError, KeyError, TypeError):
        return []  # an unknown family or model facts: the pipeline refuses it itself
    return [name for name in needed if name not in manifest.components]


def verify_files(folder: Path, manifest: Manifest, check_hashes: bool | str = "stamp",
                 stages: Iterable[str] | None = None, stamps_path: Path | None = None,
                 cache_root: Path | None = None) -> None:
    """Refuse a folder whose files do not match the manifest: missing, resized,
    unreadable or changed content, a link or a path outside the folder, a file in a
    copied folder (tokenizer/, scheduler/) that the manifest does not list; a one-line
    ArtifactError naming the file.

    `check_hashes`: "full" (or True) hashes every byte; "stamp" hashes only files with
    no valid stamp in `stamps_path` (diffrt.stamps: keyed, so a forged or copied record
    is not trusted), then records them; "size" (or False) checks existence and sizes.
    `stages`: check only these stages' files (and the components); default all.
    "full" with a `stamps_path` also hashes the engine cache entries built from these
    stages (under `cache_root`, default the stamps file's folder), discarding any that
    do not match their meta.json, so a load with verify="full" runs no unhashed engine.
    """
    mode = ("full" if check_hashes else "size") if isinstance(check_hashes, bool) else check_hashes
    if mode not in VERIFY_MODES:
        raise DiffrtError(f"verify={check_hashes!r}; choose one of: {', '.join(VERIFY_MODES)} (or True/False)")
    for name, records in manifest.components.items():
        if problem := component_problem(folder, name, records):
            raise ArtifactError(problem)
    for name in unrecorded_components(manifest):
        logger.warning("%s records no files of %s/: they are read unverified (re-export the model to record them)",
                       folder / MANIFEST_NAME, name)
    stamps = VerifiedStamps(stamps_path if mode != "size" else None)
    names = list(manifest.stages) if stages is None else list(stages)
    hashed = 0
    for record in manifest.files_for(names):
        skip_hash = mode == "size" or (mode == "stamp" and stamps.trusted(record.path, folder / record.path,
                                                                          record.sha256))
        problem = file_problem(folder, record, check_hash=not skip_hash)
        if problem:
            raise ArtifactError(problem)
        if not skip_hash:
            hashed += record.size
            stamps.remember(record.path, folder / record.path, record.sha256)
    stamps.save()
    if hashed:
        logger.info("verified %.0f MB of %s against its manifest", hashed / 2**20, folder)
    if mode == "full" and stamps_path is not None:
        from diffrt.runtime.engine_cache import verify_entries  # the runtime's cache builds on this module

        verify_entries(cache_root or stamps_path.parent, [manifest.stage(n) for n in names])


def load_artifact(folder: str | Path, check_hashes: bool | str = True, stages: Iterable[str] | None = None,
                  stamps_path: Path | None = None) -> Manifest:
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest, check_hashes=check_hashes, stages=stages, stamps_path=stamps_path)
    return manifest


__all__ = ["VERIFY_MODES", "artifact_file", "component_problem", "file_problem", "load_artifact",
           "unrecorded_components", "verify_files"]
