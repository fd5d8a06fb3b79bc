"""The artifact folder contract: manifest.json schema, hashing, atomic writes.

An artifact folder describes itself. `manifest.json` lists every stage, its ONNX
files (with size and sha256), its IO specs (name, dtype, dims with symbolic names),
the precision and opset, the source checkpoint and its hash, the package versions
that produced it, and the model facts the runtime needs (latent channels, VAE
scaling, defaults). The runtime reads only this folder.

Writes are atomic (a temp file, then `os.replace`); the exporter builds the whole
folder under a temporary name and renames it into place only when it is complete,
so a half-written export is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffrt.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMAT_NAME = "diffrt"

DTYPES = ("float32", "float16", "bfloat16", "int32", "int64")
PRECISIONS = ("fp32",)  # fp16 / bf16 arrive with the GPU and OpenVINO backends


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` holds ints (static) or names (dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TensorSpec.name must be a non-empty string")
        if self.dtype not in DTYPES:
            raise ValueError(f"TensorSpec.dtype={self.dtype!r} for {self.name!r}; allowed: {', '.join(DTYPES)}")
        for dim in self.shape:
            if not (isinstance(dim, str) and dim) and not (isinstance(dim, int) and dim > 0):
                raise ValueError(f"TensorSpec.shape of {self.name!r} has dim {dim!r}; allowed: positive int or a name")
        object.__setattr__(self, "shape", tuple(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class FileRecord:
    """A file of the artifact, relative to the folder, with what it must hash to."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileRecord:
        return cls(path=data["path"], size=int(data["size"]), sha256=data["sha256"])


@dataclass(frozen=True)
class StageSpec:
    """One exported stage: its graph file(s) and IO contract.

    `files[0]` is the ONNX graph; any further files are its external data.
    `max_abs_error` is the largest difference measured against torch at export.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileRecord, ...] = ()
    max_abs_error: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "files", tuple(self.files))
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"StageSpec {self.name!r}: input/output names must be unique, got {names}")

    @property
    def graph_path(self) -> str:
        return self.files[0].path

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "files": [f.to_json() for f in self.files],
            "max_abs_error": self.max_abs_error,
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> StageSpec:
        return cls(
            name=name,
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            files=tuple(FileRecord.from_json(f) for f in data["files"]),
            max_abs_error=data.get("max_abs_error"),
        )


@dataclass(frozen=True)
class Manifest:
    """The whole contract between export and runtime.

    `model` holds the facts the runtime needs about the checkpoint (e.g.
    vae_scale_factor, vae_scaling_factor, latent_channels, time_cond_proj_dim);
    `defaults` the generation defaults (num_inference_steps, guidance_scale,
    height, width, scheduler); `components` the copied non-graph folders
    (tokenizer/, scheduler/) with their files.
    """

    family: str
    pipeline_class: str
    precision: str
    opset: int
    stages: dict[str, StageSpec]
    components: dict[str, tuple[FileRecord, ...]]
    model: dict[str, Any]
    defaults: dict[str, Any]
    source: dict[str, Any]
    versions: dict[str, str]
    manifest_version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"Manifest.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if not self.stages:
            raise ValueError("Manifest.stages must not be empty")

    def stage(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise ArtifactError(f"this artifact has no stage {name!r} (it has: {', '.join(self.stages)})")
        return self.stages[name]

    def all_files(self) -> list[FileRecord]:
        files = [f for s in self.stages.values() for f in s.files]
        files += [f for group in self.components.values() for f in group]
        return files

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "manifest_version": self.manifest_version,
            "family": self.family,
            "pipeline_class": self.pipeline_class,
            "precision": self.precision,
            "opset": self.opset,
            "stages": {name: s.to_json() for name, s in self.stages.items()},
            "components": {name: [f.to_json() for f in fs] for name, fs in self.components.items()},
            "model": self.model,
            "defaults": self.defaults,
            "source": self.source,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            family=data["family"],
            pipeline_class=data["pipeline_class"],
            precision=data["precision"],
            opset=int(data["opset"]),
            stages={n: StageSpec.from_json(n, s) for n, s in data["stages"].items()},
            components={n: tuple(FileRecord.from_json(f) for f in fs) for n, fs in data["components"].items()},
            model=dict(data["model"]),
            defaults=dict(data["defaults"]),
            source=dict(data["source"]),
            versions=dict(data["versions"]),
            manifest_version=int(data["manifest_version"]),
        )


# --- hashing -------------------------------------------------------------------

def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(root: Path, path: Path) -> FileRecord:
    return FileRecord(path=path.relative_to(root).as_posix(), size=path.stat().st_size, sha256=sha256_file(path))


def folder_records(root: Path, folder: Path) -> tuple[FileRecord, ...]:
    """Records of every file under `folder` (sorted, so the order is stable)."""
    return tuple(file_record(root, p) for p in sorted(folder.rglob("*")) if p.is_file())


# --- atomic writes -------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (not thread-safe, but brief)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from open(): 0o666 minus the umask (0o644 with umask 022)."""
    return 0o666 & ~current_umask()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half.

    The file gets the permissions the umask gives, like any file open() creates
    (mkstemp's private 0600 would make an artifact unreadable to other accounts).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")


# --- reading and verifying -----------------------------------------------------

def read_manifest(folder: str | Path) -> Manifest:
    """Parse and validate OUT/manifest.json; every problem is an ArtifactError naming the file."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such folder; run `diffrt export SRC {folder}` first")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {folder} is not a diffrt artifact folder (run `diffrt export SRC {folder}`)")
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ArtifactError(permission_denied(path)) from None
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the model") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a diffrt manifest (no \"format\": \"{FORMAT_NAME}\"); re-export the model")
    version = data.get("manifest_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path}: manifest_version is missing or not an integer; re-export the model")
    if version > MANIFEST_VERSION:
        raise ArtifactError(
            f"{path} has manifest_version {version}, newer than this diffrt reads ({MANIFEST_VERSION}); upgrade diffrt"
        )
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is malformed ({type(exc).__name__}: {exc}); re-export the model") from None


def permission_denied(path: Path) -> str:
    return (f"{path}: permission denied; this account cannot read the artifact (ask its owner to make it readable, "
            f"e.g. `chmod -R a+rX {path.parent}`)")


def file_problem(folder: Path, record: FileRecord, check_hash: bool = True) -> str | None:
    """What is wrong with one artifact file, in one line, or None if it matches its record."""
    path = folder / record.path
    if not path.is_file():
        return f"{path} is missing; the artifact folder is incomplete, re-export it"
    size = path.stat().st_size
    if size != record.size:
        return f"{path} has {size} bytes, the manifest says {record.size}: the file is corrupted or truncated; re-export"
    if not os.access(path, os.R_OK):
        return permission_denied(path)
    if check_hash:
        try:
            digest = sha256_file(path)
        except PermissionError:
            return permission_denied(path)
        if digest != record.sha256:
            return f"{path} does not match its sha256 in {MANIFEST_NAME}: the file is corrupted; re-export"
    return None


def verify_files(folder: Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Refuse a folder whose files do not match the manifest: missing, resized, unreadable
    or (if `check_hashes`) changed content. Sizes are always checked; hashing reads every byte."""
    for record in manifest.all_files():
        problem = file_problem(folder, record, check_hashes)
        if problem:
            raise ArtifactError(problem)


def load_artifact(folder: str | Path, check_hashes: bool = True) -> Manifest:
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest, check_hashes=check_hashes)
    return manifest


__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "FileRecord",
    "Manifest",
    "StageSpec",
    "TensorSpec",
    "atomic_write_text",
    "file_mode",
    "file_problem",
    "file_record",
    "folder_records",
    "load_artifact",
    "read_manifest",
    "sha256_file",
    "verify_files",
    "write_manifest",
]
