"""Derived stage graphs: fused attention and half precision, made by the graph passes
(diffrt.export.passes) from the exported fp32 graphs and checked against them.

Every derived stage records the passes applied, the stage it was made from
(`reference`) and the largest output difference from it on the same check inputs the
torch comparison used. Then one short generation per half precision is compared with
the fp32 one, and the image PSNR goes into the manifest's `checks`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import FUSED_VARIANT, Manifest, StageSpec, file_record
from diffrt.errors import DiffrtError
from diffrt.runtime.request import FLOW_SCHEDULERS

# A stage fact: the stage's own model computes attention scores in fp32 (a ControlNet's
# config, SD 2.x), so its half graphs upcast attention as the denoiser's do.
UPCAST_FACT = "upcast_attention"

logger = logging.getLogger(__name__)

HALF_PRECISIONS = ("fp16", "bf16")
# A fused graph differs from the portable one only in summation order.
FUSED_TOLERANCE = 1e-4
# Relative to max(1, largest output): these catch a broken graph, not rounding. Measured
# on SD1.5-size random weights (benchmarks/README.md): fp16 ~1e-3, bf16 ~5e-3 relative.
HALF_TOLERANCE = {"fp16": 1e-2, "bf16": 5e-2}
# Which runtime checks a half graph here (no GPU): ONNX Runtime's CPU EP runs fp16 graphs
# with fp16 activations between ops (it casts around its fp32 kernels); it cannot load
# bf16 graphs, which OpenVINO reads (at f32 inference precision it measures the error of
# the bf16 weights only: it computes in f32 and drops the activation casts).
CHECK_RUNTIME = {"fp16": "ort", "bf16": "openvino"}
CHECK_METHOD = {
    "fp16": "onnxruntime CPU: fp16 weights and activations between ops, fp32 kernels",
    "bf16": "OpenVINO CPU at f32 inference precision: bf16 weights, f32 compute",
}


def parse_precisions(precision: str | Sequence[str]) -> tuple[str, ...]:
    """'fp32' | 'fp16' | 'bf16' | 'fp16,bf16' -> the precisions of the artifact, fp32
    first: the fp32 graphs are always exported (they are the check's reference and what
    CPU backends run)."""
    items = [p.strip() for p in precision.split(",")] if isinstance(precision, str) else list(precision)
    unknown = [p for p in items if p not in ("fp32", *HALF_PRECISIONS)]
    if unknown or not items:
        raise DiffrtError(f"--precision {','.join(items)!s}: use fp32, fp16, bf16 or a comma list like fp16,bf16")
    if "bf16" in items:
        try:
            import openvino  # noqa: F401 - the bf16 check needs it
        except ImportError:
            raise DiffrtError("--precision bf16: checking bf16 graphs needs OpenVINO (onnxruntime has no bf16 "
                              "kernels on the CPU): pip install -e '.[openvino]'") from None
    return ("fp32", *dict.fromkeys(p for p in items if p != "fp32"))


def derive_stages(
    fam,
    stages: dict[str, StageSpec],
    feeds: Mapping[str, Mapping[str, np.ndarray]],
    staging: Path,
    precisions: Sequence[str],
    fused_attention: bool,
    model: Mapping[str, Any],
) -> dict[str, StageSpec]:
    """Fused-attention variants of the stages with attention, then a half-precision
    copy of every stage (fused ones included) for each half precision."""
    from diffrt.export.passes import fuse_attention, to_half

    derived: dict[str, StageSpec] = {}
    if fused_attention:
        for source in [s for s in stages.values() if s.role in fam.ATTENTION_ROLES and s.variant == "default"]:
            name = f"{source.name}-fused"
            t0 = time.perf_counter()
            files, report = fuse_attention(staging / source.name, staging / name)
            if not report.complete:
                raise RuntimeError(f"{source.name}: fused {report.fused} of {report.found} attention blocks "
                                   f"({'; '.join(report.not_fused) or 'none found'})")
            spec = dataclasses.replace(source, name=name, variant=FUSED_VARIANT,
                                       passes=(*source.passes, "fuse_attention"))
            spec = _mapped(spec, source, staging, report.initializers)
            derived[name] = _checked(spec, source, files, staging, feeds[source.name], "ort", FUSED_TOLERANCE)
            logger.info("%s: %d attention blocks fused in %.1fs, max abs error vs %s %.2e", name, report.fused,
                        time.perf_counter() - t0, source.name, derived[name].max_abs_error)
    fp32_stages = {**stages, **derived}
    for precision in (p for p in precisions if p in HALF_PRECISIONS):
        for source in fp32_stages.values():
            # asked per precision: a stage may take one half precision and not the other (T5: bf16, not fp16)
            reason = fam.keeps_fp32(model, dataclasses.replace(source, precision=precision))
            if reason:
                logger.info("%s: no %s graph (%s)", source.name, precision, reason)
                continue
            name = f"{source.name}-{precision}"
            t0 = time.perf_counter()
            upcast = (bool(model.get("upcast_attention")) and source.role == fam.DENOISER
                      or bool(source.facts.get(UPCAST_FACT)))
            files, report = to_half(staging / source.name, staging / name, dtype=precision, upcast_attention=upcast)
            spec = dataclasses.replace(source, name=name, precision=precision,
                                       passes=(*source.passes, f"to_half:{precision}" + (":upcast" if upcast else "")))
            spec = _mapped(spec, source, staging, report.initializers)
            origin = feeds[source.name.removesuffix("-fused")]
            derived[name] = _checked(spec, source, files, staging, origin, CHECK_RUNTIME[precision],
                                     HALF_TOLERANCE[precision])
            logger.info("%s: %s in %.1fs (%d fp32 nodes kept), max abs error vs %s %.2e", name, precision,
                        time.perf_counter() - t0, report.fp32_nodes, source.name, derived[name].max_abs_error)
    return derived


def _mapped(spec: StageSpec, source: StageSpec, staging: Path, changes) -> StageSpec:
    """The derived stage's weight map, from its source's and what the pass did."""
    from diffrt.export import weight_map
    from diffrt.weights import read_weight_map

    if source.weight_map is None:
        return dataclasses.replace(spec, weight_map=None)
    derived = weight_map.derive(read_weight_map(staging / source.weight_map.path), spec.name, changes)
    return dataclasses.replace(spec, weight_map=weight_map.write(staging / spec.name, staging, derived))


def _checked(spec: StageSpec, source: StageSpec, files: list[Path], staging: Path, feeds, runtime: str,
             tolerance: float) -> StageSpec:
    from diffrt.export.passes import compare_graphs

    _share_identical_data(staging, source, files)
    result = compare_graphs(staging / source.name, staging / spec.name, feeds, runtime=runtime)
    if not result.max_abs_error <= tolerance * max(1.0, result.max_abs_reference):
        raise RuntimeError(f"{spec.name}: differs from {source.name} by {result.max_abs_error:.3g} "
                           f"(max |output| {result.max_abs_reference:.3g}, tolerance {tolerance:g} relative)")
    records = tuple(file_record(staging, p) for p in files)
    return dataclasses.replace(spec, files=records, max_abs_error=result.max_abs_error, reference=source.name)


def _share_identical_data(staging: Path, source: StageSpec, files: list[Path]) -> None:
    """A fused graph keeps every weight as it was: when its external-data file is
    byte-identical to the source's, make it a hard link, so a 3.2 GiB UNet is stored
    once for both graphs (each stage folder still holds its own model.onnx.data)."""
    if len(files) < 2 or len(source.files) < 2:
        return
    ours, theirs = files[1], staging / source.files[1].path
    if ours.stat().st_size != theirs.stat().st_size:
        return
    if file_record(staging, ours).sha256 != source.files[1].sha256:
        return
    tmp = ours.with_name(f".{ours.name}.link")
    os.link(theirs, tmp)
    os.replace(tmp, ours)
    logger.info("%s: weights identical to %s's, stored once (hard link)", ours, theirs)


def image_checks(staging: Path, manifest: Manifest, fam) -> dict[str, Any]:
    """One short generation per half precision against fp32, on the same backend and
    seed: image PSNR in dB (higher is closer; inf = identical)."""
    if fam.takes_image(manifest.model):
        logger.info("no image check: a refiner generates only from a base model's latents")
        return {}

    height, width = (min(int(manifest.defaults[k]), 256) // int(manifest.model["size_multiple"])
                     * int(manifest.model["size_multiple"]) for k in ("height", "width"))
    # ddim: deterministic for every noise-predicting checkpoint; a flow-matching one runs its own sampler
    own = manifest.defaults["scheduler"]
    scheduler = own if own in FLOW_SCHEDULERS else "ddim"
    call = dict(num_inference_steps=2, scheduler=scheduler, seed=0, height=height, width=width, output_type="np")
    results = {}
    runtime_log = logging.getLogger("diffrt.runtime")
    level = runtime_log.level
    runtime_log.setLevel(logging.WARNING)  # the check's own loads are not export progress
    try:
        _run_image_checks(staging, manifest, call, height, width, results)
    finally:
        runtime_log.setLevel(level)
    return results


def _run_image_checks(staging: Path, manifest: Manifest, call: dict, height: int, width: int,
                      results: dict[str, Any]) -> None:
    from diffrt.export.passes import psnr
    from diffrt.runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="diffrt-check-") as cache:
        for precision in (p for p in manifest.precisions if p in HALF_PRECISIONS):
            backend = {"ort": ("ort", {}), "openvino": ("openvino", {"precision": "fp32"})}[CHECK_RUNTIME[precision]]
            images = {}
            for graphs in ("fp32", precision):
                with Pipeline.load(staging, backend=backend[0], verify="size", cache_dir=cache, attention="portable",
                                   graph_precision=graphs, prepare={"height": height, "width": width},
                                   **backend[1]) as pipe:
                    images[graphs] = pipe("a photo of an astronaut riding a horse on mars", **call).images
            value = psnr(images["fp32"], images[precision])
            results[precision] = {"image_psnr_db": round(value, 2), "method": CHECK_METHOD[precision],
                                  "settings": {k: v for k, v in call.items() if k != "output_type"}}
            logger.info("%s pipeline vs fp32: image PSNR %.1f dB (%s)", precision, value, CHECK_METHOD[precision])


__all__ = ["HALF_PRECISIONS", "derive_stages", "image_checks", "parse_precisions"]
