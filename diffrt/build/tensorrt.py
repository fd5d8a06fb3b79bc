"""TensorRT engines, built ahead of time: `diffrt build OUT --backend tensorrt`.

    diffrt build OUT --backend tensorrt --batch 1-4 --size 512x512
    diffrt build OUT --backend tensorrt --batch 1 --min-size 512x512 --max-size 1024x1024
    diffrt build OUT --backend tensorrt --batch 1 --size 1024x1024 --static
    diffrt generate OUT "a prompt" --backend tensorrt --size 512x512 -n 2

One engine per runtime stage (the stages `Pipeline.load(OUT, backend="tensorrt")`
opens: the text encoder(s), the portable-attention UNet, the VAE decoder(s)), each
with ONE optimization profile covering the request shapes asked for:

* `--batch LO-HI` counts images per request. The UNet's batch is doubled by
  classifier-free guidance; the profile runs from LO without CFG (guidance <= 1, LCM)
  to 2*HI with CFG, its optimum at LO with the checkpoint's default guidance. A text
  encoder's batch runs to the UNet's (up to HI prompts, each with a negative prompt).
* `--size WxH` fixes the image size; `--min-size/--max-size` give a range (optimum at
  the checkpoint's default size, clamped into it). Latent sizes are size / the VAE's
  scale factor. `--static` makes min = opt = max (one batch, one size, one prompt,
  CFG as the checkpoint's default guidance): the fastest engine, for that shape only.

Precision comes from the graph: networks are strongly typed, so the fp16 graphs
(`diffrt export --precision fp16`) build fp16 engines (SDXL's VAE stays fp32, as
exported). `--precision` picks which of the artifact's graphs to build (default: the
first of fp16, bf16, fp32 that it holds, which is also what the tensorrt backend loads).

Engines go to the engine cache, OUT/engines/tensorrt/<key>/ (engine.plan, profile.json,
meta.json); the key covers the stage's file hashes, the profile, the precision, the
TensorRT version, the GPU's name and compute capability, the optimization level,
refittability, the workspace limit and RECIPE, so an engine is never used on another
GPU or TensorRT version. Builds share a timing cache, engines/tensorrt/timing.cache.

Everything but `build_engine` and `build_plan` is pure (no TensorRT, no GPU) and is
tested on the CPU (tests/test_tensorrt.py); the TensorRT calls are checked against the
names the current TensorRT bindings define (tests/test_tensorrt_api.py). How the tensorrt
backend finds and checks these engines at run time: diffrt/runtime/tensorrt_engines.py.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from diffrt.artifacts import Manifest, StageSpec, atomic_write_text, read_manifest
from diffrt.errors import DiffrtError
from diffrt.families import get_family
from diffrt.runtime.engine_cache import EngineCache, cache_key
from diffrt.runtime.gpu import gpu_info
from diffrt.runtime.tensorrt_engines import (
    BACKEND,
    ENGINE_NAME,
    GRAPH_PRECISIONS,
    PROFILE_NAME,
    BuildOptions,
    BuiltEngine,
    InputRange,
    StageProfile,
    engine_fields,
    require_tensorrt,
    trt_logger,
)

logger = logging.getLogger(__name__)

TIMING_CACHE_NAME = "timing.cache"
DEFAULT_TEXT_CHUNKS = 3  # a UNet engine takes weighted prompts of up to 3 x 75 tokens (231 text tokens)
_ANY_GUIDANCE = 7.5  # a guidance scale that turns CFG on wherever the checkpoint allows it


# -- the shapes asked for -------------------------------------------------------------

@dataclass(frozen=True)
class BuildShapes:
    """Images per request (`batch`: lo, hi) and image sizes, (height, width) each."""

    batch: tuple[int, int]
    min_size: tuple[int, int]
    opt_size: tuple[int, int]
    max_size: tuple[int, int]
    static: bool = False
    text_chunks: int = DEFAULT_TEXT_CHUNKS  # weighted prompts: the UNet's text length up to this many chunks


def parse_batch(text: Any) -> tuple[int, int]:
    """'4' -> (4, 4); '1-4' -> (1, 4)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not match:
        raise DiffrtError(f"--batch {text!r}: use N or LO-HI images per request, e.g. --batch 1-4")
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) else lo
    if lo < 1 or hi < lo:
        raise DiffrtError(f"--batch {text!r}: need 1 <= LO <= HI, e.g. --batch 1-4")
    return lo, hi


def _check_size(flag: str, size: Sequence[int], multiple: int) -> tuple[int, int]:
    height, width = (int(v) for v in size)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise DiffrtError(f"{flag} {width}x{height}: {name} must be a positive multiple of {multiple}")
    return height, width


def build_shapes(manifest: Manifest, batch: Any = "1", size: Sequence[int] | None = None,
                 min_size: Sequence[int] | None = None, max_size: Sequence[int] | None = None,
                 static: bool = False, text_chunks: int = DEFAULT_TEXT_CHUNKS) -> BuildShapes:
    """Validate the requested shapes; sizes are (height, width). Default size: the checkpoint's.
    `text_chunks`: the most 75-token chunks of a weighted prompt the UNet engine takes
    (where its graph has a text-length dim; a static build takes one)."""
    if isinstance(text_chunks, bool) or not isinstance(text_chunks, int) or text_chunks < 1:
        raise DiffrtError(f"--text-chunks {text_chunks!r}: use a whole number >= 1 (chunks of 75 prompt tokens)")
    lo, hi = parse_batch(batch)
    model = manifest.model
    multiple = max(int(model.get("size_multiple", 8)), int(model["vae_scale_factor"]))
    if size is not None and (min_size is not None or max_size is not None):
        raise DiffrtError("give either --size or --min-size/--max-size, not both")
    if (min_size is None) != (max_size is None):
        raise DiffrtError("--min-size and --max-size go together; or give one --size")
    if static and (min_size is not None or lo != hi):
        raise DiffrtError("--static builds one shape: give one --batch N and --size WxH (or none: the default size)")
    default = (int(manifest.defaults["height"]), int(manifest.defaults["width"]))
    if min_size is None:
        one = _check_size("--size", size if size is not None else default, multiple)
        return BuildShapes((lo, hi), one, one, one, static, text_chunks)
    low, high = _check_size("--min-size", min_size, multiple), _check_size("--max-size", max_size, multiple)
    if low[0] > high[0] or low[1] > high[1]:
        raise DiffrtError(f"--min-size {low[1]}x{low[0]} is larger than --max-size {high[1]}x{high[0]}")
    opt = tuple(min(max(d, a), b) // multiple * multiple for d, a, b in zip(default, low, high, strict=True))
    return BuildShapes((lo, hi), low, opt, high, False, text_chunks)


# -- profiles -----------------------------------------------------------------------

def select_stages(manifest: Manifest, precision: str | None = None) -> dict[str, StageSpec]:
    """The stages the tensorrt backend loads, in `precision` (default: its preference)."""
    from diffrt.runtime.stage_choice import select_stages as pipeline_stages  # the same choice Pipeline.load makes

    if precision is None:
        precision = next((p for p in GRAPH_PRECISIONS if p in manifest.precisions), "fp32")
    if precision not in GRAPH_PRECISIONS:
        raise DiffrtError(f"--precision {precision!r}; choose one of: {', '.join(GRAPH_PRECISIONS)}")
    if precision not in manifest.precisions:
        raise DiffrtError(f"--precision {precision}: this artifact has {'/'.join(manifest.precisions)} graphs only; "
                          f"re-export with `diffrt export --precision {precision}` or build another precision")
    backend = SimpleNamespace(name=BACKEND, graph_precisions=(precision,), fused_attention=False)
    return pipeline_stages(manifest, get_family(manifest.family), backend, None, None)


def _named_dim(spec: StageSpec, tensor: str, name: str, dims: Mapping[str, int], model: Mapping[str, Any]) -> int:
    if name in dims:
        return int(dims[name])
    if any(word in name for word in ("seq", "length", "token")) and "text_max_length" in model:
        return int(model["text_max_length"])  # a text length left dynamic in the graph
    raise DiffrtError(f"stage {spec.name}: input {tensor} has dim {name!r}, which diffrt build cannot size; "
                      "re-export the model with this diffrt")


def _chunked_text(family: Any, model: Mapping[str, Any], high: dict, chunks: int) -> None:
    """The max corner of a UNet with a text-length dim (SD/SDXL exports with long weighted
    prompts): `chunks` chunks of text_max_length tokens (min and opt stay at one chunk)."""
    dim = getattr(family, "CHUNKED_TEXT_DIM", None)
    if dim is not None and dim in high.get(family.DENOISER, {}):
        high[family.DENOISER] = {**high[family.DENOISER], dim: chunks * int(model["text_max_length"])}


def stage_profiles(manifest: Manifest, specs: Mapping[str, StageSpec], shapes: BuildShapes) -> dict[str, StageProfile]:
    """Per stage key of `specs`, the min/opt/max shape of every input, from the family's
    named dims (family.stage_profiles) at the three corners of the requested shapes."""
    family = get_family(manifest.family)
    model = manifest.model
    lo, hi = shapes.batch
    default_cfg = family.uses_cfg(model, float(manifest.defaults["guidance_scale"]))
    sizes = {"opt": shapes.opt_size, "min": shapes.min_size, "max": shapes.max_size}
    corners = {"opt": family.stage_profiles(model, *shapes.opt_size, lo, default_cfg, prompts=1)}
    if shapes.static:
        corners["min"] = corners["max"] = corners["opt"]
    else:
        corners["min"] = family.stage_profiles(model, *shapes.min_size, lo, False, prompts=1)
        high = family.stage_profiles(model, *shapes.max_size, hi, family.uses_cfg(model, _ANY_GUIDANCE), prompts=hi)
        # stage_profiles assumes no negative prompt; with one, SDXL encodes it too. A text
        # encoder's batch never exceeds the UNet's (each text row conditions >= 1 UNet row).
        for role in family.TOKENIZER_OF:
            if role in high:
                high[role] = {**high[role], "batch": max(high[role]["batch"], high[family.DENOISER]["batch"])}
        _chunked_text(family, model, high, shapes.text_chunks)
        corners["max"] = high
    profiles = {}
    for key, spec in specs.items():
        ranges = []
        for tensor in spec.inputs:
            values = {}
            for corner, stage_dims in corners.items():
                height, width = sizes[corner]
                dims = {"height": height, "width": width, **stage_dims.get(spec.role, {})}
                values[corner] = tuple(d if isinstance(d, int) else _named_dim(spec, tensor.name, d, dims, model)
                                       for d in tensor.shape)
            low = tuple(min(v) for v in zip(*values.values(), strict=True))
            top = tuple(max(v) for v in zip(*values.values(), strict=True))
            ranges.append(InputRange(tensor.name, tensor.shape, low, values["opt"], top))
        profiles[key] = StageProfile(spec.name, spec.role, tuple(ranges))
    return profiles


# -- engine keys and the cache -----------------------------------------------------------

def _timing_cache(config, path: Path, log) -> None:
    """Load the shared timing cache into `config` (a new one when it is missing or from
    another GPU / TensorRT version: TensorRT logs that as an ERROR, which is then cleared
    from `log` so that it is not reported as the cause of a later failure)."""
    timing = None
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if data:
        try:
            timing = config.create_timing_cache(data)
        except Exception:  # noqa: BLE001 - TensorRT raises untyped errors for a foreign cache
            timing = None
        if timing is None or not config.set_timing_cache(timing, ignore_mismatch=False):
            logger.warning("timing cache %s is from another GPU or TensorRT; starting a new one", path)
            timing = None
            log.clear()
    if timing is None:
        timing = config.create_timing_cache(b"")
        if not config.set_timing_cache(timing, ignore_mismatch=False):
            logger.warning("TensorRT refused a new timing cache; building without one")


def _save_timing_cache(config, path: Path) -> None:
    import os
    import tempfile

    serialized = config.get_timing_cache().serialize()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(serialized))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot save the timing cache %s (%s)", path, exc)


def network_flags(trt) -> int:
    """create_network's flags: a strongly typed network (the graph's dtypes set the
    precision). TensorRT 10 needs the STRONGLY_TYPED flag for that; TensorRT 11 deprecates
    it (every network is strongly typed, the flag is ignored: NvInfer.h) and a later
    release may remove it, so it is passed only while it exists."""
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def build_engine(trt, graph: Path, profile: StageProfile, options: BuildOptions, timing_cache: Path, log) -> Any:
    """Parse the ONNX graph (external data beside it) into a strongly typed network,
    add the one optimization profile, build; returns TensorRT's serialized engine."""
    builder = trt.Builder(log)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, log)
    log.clear()
    if not parser.parse_from_file(str(graph)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = " ".join(f"{errors[0].desc()} (node {errors[0].node()})".split()) if errors else log.why()
        raise DiffrtError(f"TensorRT cannot parse stage {profile.stage} ({graph}): {first}; "
                          f"{len(errors)} parser error(s) in all")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    _timing_cache(config, timing_cache, log)
    ranges = {r.name: r for r in profile.inputs}
    opt_profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rng = ranges.get(tensor.name)
        if rng is None:
            raise DiffrtError(f"stage {profile.stage}: the graph has an input {tensor.name!r} its manifest does not "
                              "list; re-export the model")
        dims = tuple(tensor.shape)
        fixed = [(d, a) for d, a, b in zip(dims, rng.min, rng.max, strict=False) if d >= 0 and not d == a == b]
        if len(dims) != len(rng.min) or fixed:
            raise DiffrtError(f"stage {profile.stage}: graph input {tensor.name} has shape {list(dims)}, the profile "
                              f"{rng.describe()}; re-export the model")
        if any(d < 0 for d in dims):
            opt_profile.set_shape(tensor.name, rng.min, rng.opt, rng.max)
    log.clear()
    if config.add_optimization_profile(opt_profile) < 0:
        raise DiffrtError(f"stage {profile.stage}: TensorRT refused the profile {profile.describe()} ({log.why()})")
    log.clear()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DiffrtError(f"TensorRT could not build stage {profile.stage}: {log.why('see the log above')}")
    _save_timing_cache(config, timing_cache)
    return serialized


@dataclass(frozen=True)
class BuildPlan:
    """What `diffrt build` will do, fully validated before TensorRT is needed."""

    folder: Path
    manifest: Manifest
    specs: Mapping[str, StageSpec]
    profiles: Mapping[str, StageProfile]
    options: BuildOptions


def plan_build(folder: str | Path, batch: Any = "1", size=None, min_size=None, max_size=None, static: bool = False,
               precision: str | None = None, options: BuildOptions | None = None,
               text_chunks: int = DEFAULT_TEXT_CHUNKS) -> BuildPlan:
    folder = Path(folder)
    manifest = read_manifest(folder)
    shapes = build_shapes(manifest, batch, size, min_size, max_size, static, text_chunks)
    specs = select_stages(manifest, precision)
    return BuildPlan(folder, manifest, specs, stage_profiles(manifest, specs, shapes), options or BuildOptions())


def build_plan(plan: BuildPlan, cache_dir: str | Path | None = None,
               progress: Callable[[str], None] = lambda line: None) -> list[BuiltEngine]:
    """Build (or find already built) every engine of the plan; `progress` gets one line per stage."""
    trt = require_tensorrt()
    log = trt_logger(trt)
    gpu = gpu_info()
    root = Path(cache_dir) if cache_dir is not None else plan.folder / "engines"
    cache = EngineCache(root, BACKEND)
    built = []
    for index, (key, spec) in enumerate(plan.specs.items(), start=1):
        profile = plan.profiles[key]
        fields = engine_fields(spec, profile, trt.__version__, gpu, plan.options)
        name = cache_key(fields)
        label = f"[{index}/{len(plan.specs)}] {spec.describe()}"
        entry = cache.lookup(name, fields)
        if entry is not None:
            progress(f"{label}: already built, {entry}")
            built.append(BuiltEngine(entry, profile))
            continue
        progress(f"{label}: building for {profile.describe()} on {gpu.name} (TensorRT {trt.__version__})")
        t0 = time.perf_counter()
        serialized = build_engine(trt, plan.folder / spec.graph_path, profile, plan.options,
                                  cache.folder / TIMING_CACHE_NAME, log)

        def write(tmp: Path, serialized=serialized, profile=profile) -> None:
            with open(tmp / ENGINE_NAME, "wb") as f:
                f.write(memoryview(serialized))
            atomic_write_text(tmp / PROFILE_NAME, json.dumps(profile.to_json(), indent=2) + "\n")

        entry = cache.publish(name, fields, write)
        del serialized
        if entry is None:
            raise DiffrtError(f"cannot write the {spec.name} engine under {cache.folder}; use --cache-dir DIR")
        progress(f"{label}: built in {time.perf_counter() - t0:.1f}s, {entry}")
        built.append(BuiltEngine(entry, profile))
    return built



__all__ = ["build_engine", "build_plan", "build_shapes", "BuildPlan", "BuildShapes", "network_flags", "parse_batch", "plan_build", "select_stages", "stage_profiles", "TIMING_CACHE_NAME"]
