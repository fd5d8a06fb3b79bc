"""`diffrt quantize OUT`: int8 stages beside an artifact's fp32 ones.

For each chosen role (default: the denoiser; `--stages unet,text_encoder` adds text
encoders) the fp32 portable graph is quantized by one method
(diffrt.export.passes.int8: dynamic / static with ONNX Runtime, weights / hybrid with
NNCF) into a new stage `<name>-int8` (precision "int8", same role and variant). Then:

1. Calibration: the fp32 pipeline runs a few steps on the calibration prompts
   (diffrt.export.calibration); all but the last `HELD_OUT` prompts calibrate, the
   inputs from the held-out prompts (another seed) are the fresh inputs the error
   is measured on.
2. Sensitive layers (`exclude="auto"`): the stage is quantized whole (less the groups
   `KEPT_FOR_SPEED` keeps in float: static's attention scores), then with each
   candidate group (time embedding, conv_in/conv_out, attention scores, ...) kept in
   float in turn; a group stays excluded when that cuts the relative RMS error on the
   held-out inputs by at least `KEEP_IF_BETTER`. Every trial is recorded.
3. The stage records its method, what was excluded, the trials, the calibration and
   the error against the fp32 stage (max abs and relative RMS on held-out inputs);
   the manifest's `checks["int8"]` gets a short generation's image PSNR against fp32.

The artifact's export lock is held throughout; the manifest is rewritten atomically at
the end (the new files recorded with their hashes, so verification covers them); a
failure leaves the artifact as it was. Running it again replaces the int8 stages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import (
    DEFAULT_VARIANT,
    Manifest,
    StageSpec,
    file_mode,
    file_record,
    read_manifest,
    write_manifest,
)
from diffrt.errors import DiffrtError
from diffrt.export.calibration import CalibrationSettings, collect, read_prompts
from diffrt.export.passes.int8 import (
    CALIBRATED,
    METHOD_PASSES,
    METHODS,
    NNCF_METHODS,
    SENSITIVE_GROUPS,
    group_nodes,
    require_nncf,
)
from diffrt.families import get_family

logger = logging.getLogger(__name__)

INT8 = "int8"
HELD_OUT = 4
KEEP_IF_BETTER = 0.10
EXCLUDE_MODES = ("auto", "none")
# Groups `--exclude auto` keeps in float for speed, not accuracy (not trialled). static:
# attention's activation-by-activation MatMuls. Quantized, they break OpenVINO's fused
# float attention kernel into an fp32 MatMul, Softmax, Transpose and layout reorders,
# and ONNX Runtime runs them as QLinearMatMul with re-quantization around the Softmax:
# measured on an SD1.5-size UNet step (256x256, Zen 4 AVX512-VNNI) in float 0.30 vs
# 0.39 s (OpenVINO) and 0.49 vs 0.57 s (ONNX Runtime). The Softmax input is also the
# activation int8 fits worst.
KEPT_FOR_SPEED = {"static": ("attention_scores",)}


def parse_stages(manifest: Manifest, family, stages: str | Sequence[str] | None) -> list[str]:
    """Roles to quantize: default the denoiser; else a comma list of the artifact's
    denoiser and text-encoder roles."""
    allowed = (family.DENOISER, *family.TOKENIZER_OF)
    if stages is None:
        return [family.DENOISER]
    roles = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
    roles = [r for r in roles if r]
    present = [r for r in allowed if manifest.variants(r)]
    bad = [r for r in roles if r not in present]
    if bad or not roles:
        raise DiffrtError(f"--stages {','.join(roles)}: choose from {', '.join(present)} (comma-separated)")
    return list(dict.fromkeys(roles))


def parse_exclude(exclude: str | Sequence[str]) -> str | tuple[str, ...]:
    """'auto' | 'none' | a comma list of groups kept in float."""
    if isinstance(exclude, str) and exclude in EXCLUDE_MODES:
        return exclude
    groups = [g.strip() for g in exclude.split(",")] if isinstance(exclude, str) else list(exclude)
    bad = [g for g in groups if g not in SENSITIVE_GROUPS]
    if bad or not groups:
        raise DiffrtError(f"--exclude {exclude!r}: auto, none, or a comma list of {', '.join(SENSITIVE_GROUPS)}")
    return tuple(groups)


def quantize_artifact(folder: str | Path, method: str = "static", stages: str | Sequence[str] | None = None,
                      prompts: str | Path | None = None, exclude: str | Sequence[str] = "auto",
                      settings: CalibrationSettings | None = None, image_check: bool = True) -> list[StageSpec]:
    """Add (or replace) the int8 stages of the artifact in `folder`; returns them."""
    from diffrt.export.publish import export_lock

    if method not in METHODS:
        raise DiffrtError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method in NNCF_METHODS:
        require_nncf()
    folder = Path(folder)
    excluding = parse_exclude(exclude)
    texts = read_prompts(prompts)
    with export_lock(folder):
        manifest = read_manifest(folder)
        family = get_family(manifest.family)
        roles = parse_stages(manifest, family, stages)
        settings = settings or _default_settings(manifest)
        return _quantize_locked(folder, manifest, family, roles, method, texts, excluding, settings, image_check)


def _default_settings(manifest: Manifest) -> CalibrationSettings:
    multiple = int(manifest.model["size_multiple"])
    height, width = (min(int(manifest.defaults[k]), 256) // multiple * multiple for k in ("height", "width"))
    return CalibrationSettings(height=height, width=width)


def _quantize_locked(folder: Path, manifest: Manifest, family, roles: list[str], method: str, texts: list[str],
                     excluding, settings: CalibrationSettings, image_check: bool) -> list[StageSpec]:
    from diffrt.verification import verify_files

    sources = [manifest.select(role, DEFAULT_VARIANT, "fp32") for role in roles]
    verify_files(folder, manifest, "full", stages=[s.name for s in sources])  # quantize only what export wrote
    held = min(HELD_OUT, len(texts) - 1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffrt-quantize-") as scratch:
        scratch = Path(scratch)
        feeds = collect(folder, roles, texts[:-held], settings, scratch / "engines")
        fresh = collect(folder, roles, texts[-held:], dataclasses.replace(settings, seed=settings.seed + 10_000),
                        scratch / "engines")
        logger.info("calibration inputs recorded in %.1fs", time.perf_counter() - t0)
        built = {}
        for source in sources:
            built[source.name] = _build(folder, source, method, feeds[source.role], fresh[source.role], excluding,
                                        scratch, {"prompts": len(texts) - held, **settings.to_json()})
        return _publish(folder, manifest, family, built, image_check)


def _build(folder: Path, source: StageSpec, method: str, feeds, fresh, excluding, scratch: Path,
           calibration: dict[str, Any]) -> tuple[Path, StageSpec]:
    """Quantize one stage into a scratch folder (choosing the exclusions); its spec."""
    from diffrt.export.passes.int8 import readable_copy

    with readable_copy(folder / source.name, scratch) as readable:  # copied once for all the trials when hard-linked
        return _build_from(readable, source, method, feeds, fresh, excluding, scratch, calibration)


def _build_from(stage_dir: Path, source: StageSpec, method: str, feeds, fresh, excluding, scratch: Path,
                calibration: dict[str, Any]) -> tuple[Path, StageSpec]:
    import onnx

    from diffrt.export.onnx_graph import GRAPH_NAME

    reference = _run(stage_dir, fresh)
    graph = onnx.load(str(stage_dir / GRAPH_NAME), load_external_data=False)
    sizes = {g: len(group_nodes(graph, g)) for g in SENSITIVE_GROUPS}  # nodes per group in the fp32 graph
    candidates = [g for g, n in sizes.items() if n]
    del graph
    calib = feeds if method in CALIBRATED else ()
    trials: list[dict[str, Any]] = []

    def attempt(groups: tuple[str, ...]) -> tuple[Path, dict[str, float]]:
        out = scratch / f"{source.name}-{len(trials)}"
        _quantize(stage_dir, out, method, calib, groups)
        error = _error(reference, _run(out, fresh))
        trials.append({"exclude": list(groups), **error})
        logger.info("%s %s, float: %s -> relative RMS error %.3g", source.name, method, ",".join(groups) or "none",
                    error["rms_relative"])
        return out, error

    chosen: tuple[str, ...] = () if excluding in EXCLUDE_MODES else tuple(excluding)
    for_speed = tuple(g for g in KEPT_FOR_SPEED.get(method, ()) if sizes[g]) if excluding == "auto" else ()
    chosen = (*chosen, *for_speed)
    best, error = attempt(chosen)
    if excluding == "auto":
        for group in (g for g in candidates if g not in for_speed):
            out, trial = attempt((*chosen, group))
            if trial["rms_relative"] <= (1 - KEEP_IF_BETTER) * error["rms_relative"]:
                shutil.rmtree(best)
                best, error, chosen = out, trial, (*chosen, group)
            else:
                shutil.rmtree(out)
    if not np.isfinite(error["max_abs"]):
        raise DiffrtError(f"{source.name}: the int8 graph ({method}) gives non-finite outputs; try another --method")
    facts = {INT8: {
        "method": method, "tool": _tool(method), "excluded": {g: sizes[g] for g in chosen},
        "kept_for_speed": list(for_speed),
        "candidates": [g for g in candidates if g not in for_speed] if excluding == "auto" else [], "trials": trials,
        "calibration": {**calibration, "inputs": len(feeds)} if method in CALIBRATED else None,
        "error": {**error, "inputs": len(fresh), "against": source.name},
    }}
    passes = (*source.passes, f"int8:{method}", *METHOD_PASSES.get(method, ()))
    spec = dataclasses.replace(source, name=f"{source.name}-{INT8}", precision=INT8, passes=passes,
                               facts={**source.facts, **facts}, reference=source.name, max_abs_error=error["max_abs"],
                               weight_map=None)
    return best, spec


def _quantize(source: Path, out: Path, method: str, calib, groups: tuple[str, ...]) -> None:
    from diffrt.export.passes.int8 import quantize_stage

    quantize_stage(source, out, method, calib, groups)


def _run(stage_dir: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The stage's outputs on each feed (ONNX Runtime, CPU; one session)."""
    import onnxruntime as ort

    from diffrt.export.onnx_graph import GRAPH_NAME

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(stage_dir / GRAPH_NAME), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, dict(f)), strict=True)) for f in feeds]


def _error(reference: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max abs difference, and RMS difference relative to the reference's RMS, over all outputs and inputs."""
    diff_sq = ref_sq = count = 0.0
    max_abs = 0.0
    for ref, out in zip(reference, got, strict=True):
        for name, a in ref.items():
            a, b = a.astype(np.float64), out[name].astype(np.float64)
            max_abs = max(max_abs, float(np.max(np.abs(a - b))))
            diff_sq += float(np.sum((a - b) ** 2))
            ref_sq += float(np.sum(a ** 2))
            count += a.size
    rms = float(np.sqrt(diff_sq / max(count, 1)))
    rel = float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0 else float("inf")
    return {"max_abs": max_abs, "rms": rms, "rms_relative": rel}


def _tool(method: str) -> str:
    package = "nncf" if method in NNCF_METHODS else "onnxruntime"
    return f"{package} {metadata.version(package)}"


def _publish(folder: Path, manifest: Manifest, family, built: dict[str, tuple[Path, StageSpec]],
             image_check: bool) -> list[StageSpec]:
    """Move the new stage folders in place (replacing older int8 ones), record their
    files, run the image check, write the manifest. On failure the manifest is the one
    before, less any int8 stage whose folder was replaced."""
    old = {n: s for n, s in manifest.stages.items() if s.precision == INT8}
    added: list[StageSpec] = []
    moved: list[Path] = []
    try:
        for name, (scratch_dir, spec) in built.items():
            target = folder / spec.name
            staged = folder / f".{spec.name}.new-{os.getpid()}"
            shutil.move(scratch_dir, staged)  # a rename where the scratch folder is on the same file system
            for path in staged.iterdir():  # ONNX Runtime writes its external data 0600: the umask's mode, as export
                path.chmod(file_mode())
            moved.append(staged)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
            moved[-1] = target
            files = sorted(target.iterdir(), key=lambda p: (p.name != "model.onnx", p.name))
            added.append(dataclasses.replace(spec, files=tuple(file_record(folder, p) for p in files)))
        stages = {n: s for n, s in manifest.stages.items() if n not in old}
        stages.update({s.name: s for s in added})
        precisions = (*manifest.precisions, INT8) if INT8 not in manifest.precisions else manifest.precisions
        new = dataclasses.replace(manifest, stages=stages, precisions=precisions)
        checks = dict(manifest.checks)
        if image_check:
            checks[INT8] = image_check_int8(folder, new, family, added)
        write_manifest(folder, dataclasses.replace(new, checks=checks))
    except BaseException:
        for path in moved:  # the manifest still names the old int8 stages: they are stale now, so drop them
            shutil.rmtree(path, ignore_errors=True)
        if moved:
            write_manifest(folder, dataclasses.replace(
                manifest, stages={n: s for n, s in manifest.stages.items() if n not in old},
                precisions=tuple(p for p in manifest.precisions if p != INT8),
                checks={k: v for k, v in manifest.checks.items() if k != INT8}))
        raise
    for name in old:
        if name not in {s.name for s in added}:
            shutil.rmtree(folder / name, ignore_errors=True)
    return added


def image_check_int8(folder: Path, manifest: Manifest, family, added: list[StageSpec]) -> dict[str, Any]:
    """One short generation with the int8 stages against fp32 (ONNX Runtime, same seed):
    image PSNR in dB."""
    from diffrt.export.passes import psnr
    from diffrt.runtime.pipeline import Pipeline
    from diffrt.runtime.request import FLOW_SCHEDULERS

    if family.takes_image(manifest.model):
        return {}
    multiple = int(manifest.model["size_multiple"])
    height, width = (min(int(manifest.defaults[k]), 256) // multiple * multiple for k in ("height", "width"))
    own = manifest.defaults["scheduler"]
    call = dict(num_inference_steps=2, scheduler=own if own in FLOW_SCHEDULERS else "ddim", seed=0, height=height,
                width=width, output_type="np")
    write_manifest(folder, manifest)  # the pipeline reads the folder's manifest (rewritten with the checks after)
    images = {}
    with tempfile.TemporaryDirectory(prefix="diffrt-check-") as cache:
        for graphs in ("fp32", INT8):
            with Pipeline.load(folder, backend="ort", verify="size", cache_dir=cache, attention="portable",
                               graph_precision=graphs, prepare={"height": height, "width": width}) as pipe:
                images[graphs] = pipe("a photo of an astronaut riding a horse on mars", **call).images
    value = psnr(images["fp32"], images[INT8])
    logger.info("int8 pipeline vs fp32: image PSNR %.1f dB", value)
    return {"image_psnr_db": round(value, 2), "method": f"onnxruntime CPU, int8 stages: {', '.join(s.name for s in added)}",
            "settings": {k: v for k, v in call.items() if k != "output_type"}}


__all__ = ["EXCLUDE_MODES", "INT8", "parse_exclude", "parse_stages", "quantize_artifact"]
