"""Which ONNX initializer holds which torch parameter: each stage's weight map.

The exporter writes, beside every stage graph, `<stage>/weight_map.json`: for each
parameter of the torch module the stage was exported from (its diffusers or
transformers state-dict name, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`), the
initializer(s) of the graph that hold its values and the transform that turns the
parameter into each of them. LoRA hot-swap, TensorRT refit and quantization find
their weights through it; this module reads it (numpy + json only: the runtime may
import it).

    from diffrt.weights import weight_map
    wm = weight_map("out/sdxl", "unet-fp16")          # checked against the manifest's sha256
    entry = wm["down_blocks.1.attentions.0.proj_in.weight"]
    entry.placements[0].initializer                   # e.g. 'onnx::MatMul_2590'
    entry.placements[0].transform                     # e.g. ('transpose', 'cast')
    wm.updates({name: new_values})                    # -> {initializer: array}, transforms applied

A transform is a sequence of these steps, applied in order to the parameter's array
(float32, its torch shape) to give the initializer's array:

- `transpose`: the axes reversed (a Linear weight the exporter folded into a MatMul's
  second input, (out, in) -> (in, out));
- `reshape`: to the initializer's shape, same element order (a GroupNorm scale stored
  as (C, 1, 1));
- `cast`: to the initializer's dtype (float16: values clipped to +-65504 first, as the
  half-precision pass does; bfloat16: round to nearest even).

No steps means the initializer holds the parameter as it is. Several parameters may
name the same initializer: the exporter stores equal tensors once (e.g. norm weights
still at their initial ones); `WeightMap.holders` lists them, and `updates` refuses
to change one of them alone. A parameter may have several placements (a half graph
keeps an fp32 copy for its fp32 islands beside the half one): update all of them.
A parameter with none says why in `absent`:

- `unused`: the stage's outputs do not depend on it (checked with autograd at export),
  e.g. the VAE encoder's weights in the decoder stage, SDXL's last CLIP layer;
- `folded`: the graph uses it, but only through a constant the exporter computed from
  it, so no initializer holds its values;
- `ambiguous`: several initializers hold exactly its values and the graph does not
  say which is this parameter's;
- `removed`: a graph pass dropped every initializer that held it (no node read them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from diffrt.errors import ArtifactError, DiffrtError

logger = logging.getLogger(__name__)

WEIGHT_MAP_NAME = "weight_map.json"
FORMAT_NAME = "diffrt-weight-map"
FORMAT_VERSION = 1
TRANSFORMS = ("transpose", "reshape", "cast")
ABSENT_REASONS = ("unused", "folded", "ambiguous", "removed")
DTYPES = ("float32", "float16", "bfloat16")
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Placement:
    """One initializer holding a parameter's values, and how they were transformed."""

    initializer: str
    shape: tuple[int, ...]
    dtype: str
    transform: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "transform", tuple(self.transform))
        unknown = [t for t in self.transform if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"{self.initializer}: transform step {unknown[0]!r}; allowed: {', '.join(TRANSFORMS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.initializer}: dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """The initializer's array for these parameter values (the parameter's shape)."""
        out = np.asarray(values, dtype=np.float32)
        for step in self.transform:
            if step == "transpose":
                out = out.T
            elif step == "reshape":
                out = out.reshape(self.shape)
            else:
                out = cast(out, self.dtype)
        out = np.ascontiguousarray(out)
        if tuple(out.shape) != self.shape:
            raise DiffrtError(f"{self.initializer}: the transform {'+'.join(self.transform) or 'identity'} gives shape "
                              f"{tuple(out.shape)}, the initializer has {self.shape}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "shape": list(self.shape), "dtype": self.dtype,
                "transform": list(self.transform)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Placement:
        return cls(initializer=data["initializer"], shape=tuple(data["shape"]), dtype=data["dtype"],
                   transform=tuple(data.get("transform", ())))


@dataclass(frozen=True)
class WeightEntry:
    """One torch parameter: its shape and dtype in the module, where the graph holds it."""

    parameter: str
    shape: tuple[int, ...]
    dtype: str
    placements: tuple[Placement, ...] = ()
    absent: str = ""
    """Why no initializer holds it (one of ABSENT_REASONS); '' when placed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "placements", tuple(self.placements))
        if bool(self.placements) == bool(self.absent):
            raise ValueError(f"{self.parameter}: a parameter has placements or an absent reason, not both or neither")
        if self.absent and self.absent not in ABSENT_REASONS:
            raise ValueError(f"{self.parameter}: absent={self.absent!r}; allowed: {', '.join(ABSENT_REASONS)}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype,
                                "stored": [p.to_json() for p in self.placements]}
        if self.absent:
            data["absent"] = self.absent
        return data

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> WeightEntry:
        return cls(parameter=name, shape=tuple(data["shape"]), dtype=data["dtype"],
                   placements=tuple(Placement.from_json(p) for p in data.get("stored", ())),
                   absent=data.get("absent", ""))


@dataclass(frozen=True)
class WeightMap:
    """Every parameter of the module a stage was exported from -> its placements.

    `component` is the checkpoint folder the parameters come from ("unet", "vae",
    "text_encoder_2"; "tiny_vae" for the --tiny-vae decoder) and `module` its class."""

    stage: str
    component: str
    module: str
    entries: Mapping[str, WeightEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    def __getitem__(self, parameter: str) -> WeightEntry:
        if parameter not in self.entries:
            raise KeyError(f"{parameter!r} is not a parameter of {self.component} ({self.module}) in stage {self.stage}")
        return self.entries[parameter]

    def __contains__(self, parameter: object) -> bool:
        return parameter in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def holders(self, initializer: str) -> tuple[str, ...]:
        """The parameters whose values `initializer` holds (several: stored once, shared)."""
        return tuple(name for name, entry in self.entries.items()
                     if any(p.initializer == initializer for p in entry.placements))

    def updates(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New parameter values -> the initializer arrays to hand a backend.

        Parameters the stage does not use are skipped (nothing holds them). A parameter
        that shares its initializer with others must come with all of them, at equal
        values: changing one alone would change the others too."""
        out: dict[str, np.ndarray] = {}
        for name, array in values.items():
            entry = self[name]
            array = np.asarray(array)
            if tuple(array.shape) != entry.shape:
                raise DiffrtError(f"{name}: new values have shape {tuple(array.shape)}, the parameter has {entry.shape}")
            if entry.absent == "unused" or entry.absent == "removed":
                continue
            if entry.absent:
                raise DiffrtError(f"{name}: stage {self.stage} holds no initializer with its values ({entry.absent}); "
                                  "re-export the stage with the new weights instead")
            for placement in entry.placements:
                new = placement.apply(array)
                if placement.initializer in out and not np.array_equal(out[placement.initializer], new):
                    raise DiffrtError(f"{placement.initializer} holds {', '.join(self.holders(placement.initializer))} "
                                      f"(equal at export); {name} differs from the others given: pass them equal")
                out[placement.initializer] = new
        for initializer in out:
            missing = [p for p in self.holders(initializer) if p not in values]
            if missing:
                raise DiffrtError(f"{initializer} also holds {', '.join(missing)} (equal at export, stored once): "
                                  "updating it changes them too; pass them with the same values")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "stage": self.stage, "component": self.component,
                "module": self.module, "parameters": {n: e.to_json() for n, e in self.entries.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightMap:
        return cls(stage=data["stage"], component=data["component"], module=data["module"],
                   entries={n: WeightEntry.from_json(n, e) for n, e in data["parameters"].items()})


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> `dtype` exactly as the half-precision pass stores weights."""
    values = np.asarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    if dtype == "float16":
        return np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
    if dtype == "bfloat16":
        return _to_bfloat16(values)
    raise DiffrtError(f"cannot cast to {dtype!r}; weight maps use {', '.join(DTYPES)}")


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even into bfloat16 (numpy only): an ml_dtypes.bfloat16 array
    when ml_dtypes is installed (it comes with onnx), else its uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    quiet_nan = ((bits >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)
    out = np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)
    try:
        import ml_dtypes
    except ImportError:
        return out
    return out.view(ml_dtypes.bfloat16)


def read_weight_map(path: str | Path) -> WeightMap:
    """Parse a weight_map.json (no verification; see `weight_map` for an artifact's)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read as a weight map ({exc}); re-export the model") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a diffrt weight map (no \"format\": \"{FORMAT_NAME}\"); re-export the model")
    if not isinstance(data.get("version"), int) or data["version"] > FORMAT_VERSION:
        raise ArtifactError(f"{path} has weight-map version {data.get('version')!r}; this diffrt reads up to "
                            f"{FORMAT_VERSION}: upgrade diffrt")
    try:
        return WeightMap.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is malformed ({type(exc).__name__}: {exc}); re-export the model") from None


def weight_map(folder: str | Path, stage: Any) -> WeightMap:
    """The weight map of `stage` (a StageSpec or a stage name) of the artifact in
    `folder`, checked against the size and sha256 the manifest records for it."""
    from diffrt.artifacts import read_manifest
    from diffrt.verification import artifact_file, file_problem

    folder = Path(folder)
    spec = read_manifest(folder).stage(stage) if isinstance(stage, str) else stage
    record = spec.weight_map
    if record is None and spec.precision == "int8":  # diffrt quantize's stages: no fp32 weights to merge into
        raise ArtifactError(f"stage {spec.name} of {folder} is an int8 graph: LoRAs and weight updates need the fp32 "
                            "graphs (load with graph_precision='fp32' / --graph-precision fp32)")
    if record is None:
        raise ArtifactError(f"stage {spec.name} of {folder} has no weight map (exported before diffrt recorded them); "
                            "re-export the model")
    if problem := file_problem(folder, record):
        raise ArtifactError(problem)
    result = read_weight_map(artifact_file(folder, record.path))
    if result.stage != spec.name:
        raise ArtifactError(f"{folder / record.path} maps stage {result.stage!r}, not {spec.name!r}; re-export")
    return result


__all__ = ["ABSENT_REASONS", "TRANSFORMS", "WEIGHT_MAP_NAME", "Placement", "WeightEntry", "WeightMap", "cast",
           "read_weight_map", "weight_map"]
