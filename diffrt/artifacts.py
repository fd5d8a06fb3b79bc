"""The artifact folder contract: manifest.json schema, hashing, atomic writes.

An artifact folder describes itself. `manifest.json` lists every stage, its ONNX
files (with size and sha256), its IO specs (name, dtype, dims with symbolic names),
the precision and opset, the source checkpoint and its hash, the package versions
that produced it, and the model facts the runtime needs (latent channels, VAE
scaling, defaults). The runtime reads only this folder.

Writes are atomic (a temp file, then `os.replace`); the exporter builds the whole
folder under a temporary name and renames it into place only when it is complete,
so a half-written export is never mistaken for a finished one.

Every path a manifest names must stay inside the artifact folder (relative, no '..';
`read_manifest` refuses any other). Checking the folder's files against the manifest
is diffrt.verification; the keyed record of files already hashed is diffrt.stamps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from diffrt.errors import ArtifactError, DiffrtError
from diffrt.stamps import STAMPS_NAME, VerifiedStamps

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2
FORMAT_NAME = "diffrt"

DTYPES = ("float32", "float16", "bfloat16", "int32", "int64")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # int8: `diffrt quantize` (diffrt.export.quantize)


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


# Where an exported stage's max_abs_error was measured: against the torch module
# ("torch"), or against another stage of the artifact (the fp32 graph a pass started from).
TORCH_REFERENCE = "torch"
DEFAULT_VARIANT = "default"
# A stage graph whose attention blocks are one fused op each (ORT's MultiHeadAttention)
# instead of the portable MatMul-Softmax-MatMul that TensorRT and OpenVINO fuse themselves.
FUSED_VARIANT = "fused-attention"
# In an int8 stage's `passes`: its activation quantizers sit at the ops they quantize for, not
# above the layout ops before those (diffrt.export.passes.int8.quantizers_at_consumers; hybrid
# graphs without it compute wrong on OpenVINO).
QUANTIZERS_AT_CONSUMERS = "int8:quantizers-at-consumers"


@dataclass(frozen=True)
class StageSpec:
    """One exported graph of the artifact: its files, IO contract and provenance.

    `name` is the stage's key in the manifest and its folder (e.g. "unet",
    "unet-fused"); `role` is what it does in the pipeline ("text_encoder", "unet",
    "vae_decoder", ...). Several stages may share a role: an fp16 UNet beside the fp32
    one, a fused-attention graph beside the portable one, a tiny VAE decoder beside the
    full one. `variant` names what differs ("default", "fused-attention", "tiny");
    `precision` is the graph's weight/compute precision (its IO stays float32 unless
    the TensorSpecs say otherwise); `passes` lists the graph passes applied after the
    torch export, in order; `facts` holds what the runtime needs to know about this
    stage alone (e.g. a decoder's scaling factor).

    `files[0]` is the ONNX graph; any further files are its external data.
    `max_abs_error` is the largest output difference measured at export against
    `reference`: "torch" for a direct export, or the name of the stage a pass started from.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileRecord, ...] = ()
    max_abs_error: float | None = None
    role: str = ""
    variant: str = DEFAULT_VARIANT
    precision: str = "fp32"
    passes: tuple[str, ...] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)
    reference: str = TORCH_REFERENCE
    weight_map: FileRecord | None = None
    """<name>/weight_map.json: which initializer holds each torch parameter (diffrt.weights)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "passes", tuple(self.passes))
        object.__setattr__(self, "facts", MappingProxyType(dict(self.facts)))
        if not self.role:
            object.__setattr__(self, "role", self.name)
        if self.precision not in PRECISIONS:
            raise ValueError(f"StageSpec {self.name!r}: precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"StageSpec {self.name!r}: input/output names must be unique, got {names}")

    @property
    def graph_path(self) -> str:
        return self.files[0].path

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def describe(self) -> str:
        """e.g. 'unet-fused (unet, fused-attention, fp32)'."""
        return f"{self.name} ({self.role}, {self.variant}, {self.precision})"

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "variant": self.variant,
            "precision": self.precision,
            "passes": list(self.passes),
            "facts": dict(self.facts),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "files": [f.to_json() for f in self.files],
            "max_abs_error": self.max_abs_error,
            "reference": self.reference,
            **({"weight_map": self.weight_map.to_json()} if self.weight_map else {}),
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any], precision: str = "fp32") -> StageSpec:
        """`precision`: the default for a version-1 manifest, whose stages do not say."""
        return cls(
            name=name,
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            files=tuple(FileRecord.from_json(f) for f in data["files"]),
            max_abs_error=data.get("max_abs_error"),
            role=data.get("role", name),
            variant=data.get("variant", DEFAULT_VARIANT),
            precision=data.get("precision", precision),
            passes=tuple(data.get("passes", ())),
            facts=data.get("facts", {}),
            reference=data.get("reference", TORCH_REFERENCE),
            weight_map=FileRecord.from_json(data["weight_map"]) if data.get("weight_map") else None,
        )


@dataclass(frozen=True)
class Manifest:
    """The whole contract between export and runtime.

    `model` holds the facts the runtime needs about the checkpoint (e.g.
    vae_scale_factor, vae_scaling_factor, latent_channels, time_cond_proj_dim);
    `defaults` the generation defaults (num_inference_steps, guidance_scale,
    height, width, scheduler); `components` the copied non-graph folders
    (tokenizer/, scheduler/) with their files; `precisions` the graph precisions the
    export produced (stages say their own).

    Version 2 (this one) added role/variant/precision/passes/facts per stage and
    `precisions`; version-1 manifests (one stage per role, one `precision`) still load.
    """

    family: str
    pipeline_class: str
    precisions: tuple[str, ...]
    opset: int
    stages: dict[str, StageSpec]
    components: dict[str, tuple[FileRecord, ...]]
    model: dict[str, Any]
    defaults: dict[str, Any]
    source: dict[str, Any]
    versions: dict[str, str]
    manifest_version: int = MANIFEST_VERSION
    checks: dict[str, Any] = field(default_factory=dict)
    """End-to-end checks made at export, e.g. {"fp16": {"image_psnr_db": 41.2, ...}}."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "precisions", tuple(self.precisions))
        for precision in self.precisions:
            if precision not in PRECISIONS:
                raise ValueError(f"Manifest.precisions has {precision!r}; allowed: {', '.join(PRECISIONS)}")
        if not self.stages:
            raise ValueError("Manifest.stages must not be empty")

    @property
    def precision(self) -> str:
        """The first precision exported (for display)."""
        return self.precisions[0]

    def stage(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise ArtifactError(f"this artifact has no stage {name!r} (it has: {', '.join(self.stages)})")
        return self.stages[name]

    def variants(self, role: str) -> list[StageSpec]:
        return [s for s in self.stages.values() if s.role == role]

    def select(self, role: str, variant: str = DEFAULT_VARIANT, precision: str | Sequence[str] | None = None) -> StageSpec:
        """The stage for `role` with `variant`, in `precision` (or the first of several
        precisions, in order of preference; None: the first the artifact exported)."""
        wanted = list(self.precisions) if precision is None else [precision] if isinstance(precision, str) else list(precision)
        for p in wanted:
            for spec in self.stages.values():
                if spec.role == role and spec.variant == variant and spec.precision == p:
                    return spec
        have = ", ".join(f"{s.variant}/{s.precision}" for s in self.variants(role)) or "none"
        raise ArtifactError(
            f"this artifact has no {role} stage of variant {variant!r} in {' or '.join(wanted)} "
            f"(its {role} stages: {have}); re-export with the option that adds it"
        )

    def all_files(self) -> list[FileRecord]:
        return self.files_for(self.stages)

    def files_for(self, stage_names: Iterable[str]) -> list[FileRecord]:
        """The files of these stages plus every component (tokenizer, scheduler); a
        file two stages share (external data) is listed once."""
        files = [f for name in stage_names for f in self.stage(name).files]
        files += [self.stage(name).weight_map for name in stage_names if self.stage(name).weight_map]
        files += [f for group in self.components.values() for f in group]
        return list({f.path: f for f in files}.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "manifest_version": self.manifest_version,
            "family": self.family,
            "pipeline_class": self.pipeline_class,
            "precisions": list(self.precisions),
            "opset": self.opset,
            "stages": {name: s.to_json() for name, s in self.stages.items()},
            "components": {name: [f.to_json() for f in fs] for name, fs in self.components.items()},
            "model": self.model,
            "defaults": self.defaults,
            "source": self.source,
            "versions": self.versions,
            "checks": self.checks,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        version = int(data["manifest_version"])
        precisions = tuple(data["precisions"]) if version >= 2 else (data["precision"],)
        return cls(
            family=data["family"],
            pipeline_class=data["pipeline_class"],
            precisions=precisions,
            opset=int(data["opset"]),
            stages={n: StageSpec.from_json(n, s, precisions[0]) for n, s in data["stages"].items()},
            components={n: tuple(FileRecord.from_json(f) for f in fs) for n, fs in data["components"].items()},
            model=dict(data["model"]),
            defaults=dict(data["defaults"]),
            source=dict(data["source"]),
            versions=dict(data["versions"]),
            checks=dict(data.get("checks", {})),
        )  # a version-1 manifest is read into this version's model (manifest_version 2)


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
    if path.is_symlink():
        raise ArtifactError(link_message(MANIFEST_NAME, path))
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
    except RecursionError:
        raise ArtifactError(f"{path} is nested too deeply to be a diffrt manifest; re-export the model") from None
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
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ArtifactError(f"{path} is malformed ({type(exc).__name__}: {exc}); re-export the model") from None
    for stage in manifest.stages.values():  # a stage whose graph no record covers would load unverified
        if not stage.files:
            raise ArtifactError(f"{path}: stage {stage.name} lists no files (its graph would load unverified); "
                                "re-export the model")
    try:
        check_manifest_paths(manifest)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    return manifest


def permission_denied(path: Path) -> str:
    return (f"{path}: permission denied; this account cannot read the artifact (ask its owner to make it readable, "
            f"e.g. `chmod -R a+rX {path.parent}`)")


# --- confinement: every path a manifest names stays inside the artifact folder ------

def path_problem(path: Any) -> str:
    """Why a manifest path cannot name a file inside the artifact folder ('' when it
    can): it must be a relative POSIX path of plain names (no '..', '.', empty part,
    leading '/'). Checked before anything is opened, so nothing outside is touched."""
    if not isinstance(path, str) or not path:
        return "is not a non-empty string"
    if "\x00" in path:
        return "holds a NUL character"
    if path.startswith("/"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "is not a plain relative path (it has a '..', '.' or empty part)"
    return ""


def outside_message(entry: str, path: Any, problem: str) -> str:
    """The error for a manifest entry naming a path outside the artifact folder."""
    return (f"{MANIFEST_NAME} entry {entry} = {path!r} {problem}; an artifact names only files inside its own "
            "folder: re-export the model")


def link_message(entry: str, path: Path) -> str:
    """The error for a manifest entry reached through a symbolic link."""
    return (f"{MANIFEST_NAME} entry {entry}: {path} is a symbolic link; diffrt reads an artifact's files only inside "
            "its folder, never through links (put the real file there, or re-export)")


def check_manifest_paths(manifest: Manifest) -> None:
    """Refuse, in one line naming the entry, any file path or component name that could
    point outside the artifact folder, and a component file outside its own folder."""
    for name, stage in manifest.stages.items():
        for index, record in enumerate(stage.files):
            if problem := path_problem(record.path):
                raise ArtifactError(outside_message(f"stages.{name}.files[{index}].path", record.path, problem))
        if stage.weight_map and (problem := path_problem(stage.weight_map.path)):
            raise ArtifactError(outside_message(f"stages.{name}.weight_map.path", stage.weight_map.path, problem))
    for name, records in manifest.components.items():
        if (problem := path_problem(name)) or "/" in name:
            raise ArtifactError(outside_message("components", name, problem or "is not a folder name"))
        for index, record in enumerate(records):
            entry = f"components.{name}[{index}].path"
            if problem := path_problem(record.path):
                raise ArtifactError(outside_message(entry, record.path, problem))
            if not record.path.startswith(f"{name}/"):
                raise ArtifactError(outside_message(entry, record.path, f"is not inside {name}/"))


def __getattr__(name: str) -> Any:
    """The verification functions moved to diffrt.verification; importing them from
    here still works (resolved on first use: that module imports this one)."""
    if name in _MOVED:
        import diffrt.verification

        return getattr(diffrt.verification, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED = ("VERIFY_MODES", "artifact_file", "component_problem", "file_problem", "load_artifact", "verify_files")


__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "QUANTIZERS_AT_CONSUMERS",
    "STAMPS_NAME",
    "VERIFY_MODES",
    "FileRecord",
    "Manifest",
    "StageSpec",
    "TensorSpec",
    "VerifiedStamps",
    "atomic_write_text",
    "check_manifest_paths",
    "file_mode",
    "file_problem",
    "file_record",
    "folder_records",
    "link_message",
    "load_artifact",
    "outside_message",
    "path_problem",
    "read_manifest",
    "sha256_file",
    "verify_files",
    "write_manifest",
]
