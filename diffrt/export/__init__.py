"""Export a diffusers checkpoint into an artifact folder (needs torch + diffusers).

    from diffrt.export import export
    manifest = export("path/to/sd15", "out/sd15")

The folder is built under a temporary name beside OUT and renamed into place only
when every stage is exported, checked against torch, and the manifest is written;
one export at a time per OUT (diffrt/export/publish.py: the lock, what is replaced).

One stage at a time: the model facts come from the components' config.json files, and
each stage's torch module is loaded, exported, mapped, checked and freed before the next
one loads, so the peak is one stage's weights (SDXL's UNet), not the checkpoint's. Each
stage folder gets a `weight_map.json` (diffrt.weights: which initializer holds each torch
parameter, under which transform), derived graphs included.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import importlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from diffrt import __version__
from diffrt.artifacts import (
    DEFAULT_VARIANT,
    TORCH_REFERENCE,
    Manifest,
    StageSpec,
    file_mode,
    file_record,
    folder_records,
    write_manifest,
)
from diffrt.errors import DiffrtError
from diffrt.export.checkpoint import (
    checkpoint_hash,
    read_json,
    read_model_index,
    resolve_source,
)
from diffrt.export.lora import check_components, fuse, read_loras
from diffrt.export.publish import (
    export_lock,
    publish,
    replaceable,
    staging_path,
    sweep_partials,
)
from diffrt.export.single_file import NEEDS_CONFIG, is_single_file
from diffrt.export.textual_inversion import prepare as prepare_embeddings
from diffrt.export.variants import derive_stages, image_checks, parse_precisions
from diffrt.families import family_for_pipeline_class, get_family
from diffrt.runtime.cpu import installed_versions

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# An exported stage whose outputs differ from torch by more than this (relative to
# the outputs' magnitude) is a broken export, not rounding.
CHECK_TOLERANCE = 1e-3


def _versions() -> dict[str, str]:
    return {"diffrt": __version__, **installed_versions(("torch", "diffusers", "transformers", "onnx", "onnxruntime"))}


def export(
    src: str | os.PathLike,
    out: str | os.PathLike,
    family: str = "auto",
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    tiny_vae: str | os.PathLike | None = None,
    fused_attention: bool = True,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
    textual_inversion: Sequence = (),
    source_id: str | None = None,
    safety_checker: str | os.PathLike | None = None,
    controlnets: Sequence[str | os.PathLike] = (),
    step_cache: str | None = None,
) -> Manifest:
    """Export every stage of `src` (a diffusers folder or hub id) to ONNX under `out`.

    `precision`: "fp32" (default), or "fp16", "bf16", "fp16,bf16": half-precision
    graphs of every stage beside the fp32 ones (which are always exported: they are
    the reference the half graphs are checked against, and what CPU backends run).
    `tiny_vae`: a diffusers AutoencoderTiny folder (e.g. a saved madebyollin/taesd),
    exported as an alternative VAE decoder that generation can choose per call.
    `fused_attention`: also write the UNet and VAE decoder with each attention block as
    one MultiHeadAttention op (what ONNX Runtime runs best; the portable graph stays
    for OpenVINO and TensorRT, which fuse attention themselves).
    `loras`: (LoRA file, strength) pairs fused into the exported weights (diffrt/export/lora.py);
    each stage they change records them in its facts["loras"].
    `textual_inversion`: embedding files ("FILE[:TOKEN]" or (file, token)) written into
    the text encoders' token tables, their tokens recorded for the runtime tokenizers
    (diffrt/export/textual_inversion.py).
    `source_id`: what the manifest names as the source (default `src`; a single-file
    checkpoint converted to a temporary folder, diffrt/export/single_file.py).
    `safety_checker`: a saved StableDiffusionSafetyChecker folder ("checkpoint": the
    source's own safety_checker/), exported as the optional safety_checker stage with
    its CLIP preprocessing config (diffrt/export/safety.py).
    `controlnets`: saved diffusers ControlNetModel folders, each exported as a stage
    controlnet_<i>, with the UNet also as a variant taking their residuals
    (diffrt/export/controlnet.py).
    `step_cache`: "deepcache" or "deepcache:BRANCH": the UNet also as DeepCache's full
    and shallow graphs, for requests with cache="deepcache:N" (diffrt/export/deepcache.py);
    "fbcache" (Flux, SD3): the transformer also as First-Block Cache's head and tail graphs, for
    cache="fbcache:T" (diffrt/export/fbcache.py)."""
    started = time.perf_counter()
    out = Path(out)
    precisions = parse_precisions(precision)
    if not 14 <= opset <= 20:
        raise DiffrtError(f"--opset {opset} is out of range; use 14..20 (default {DEFAULT_OPSET})")
    if out.exists() and not overwrite:
        raise DiffrtError(f"{out} already exists; choose another OUT or pass --overwrite")
    if is_single_file(src):  # a file, not a folder: it needs the architecture's configs
        raise DiffrtError(f"{src}: a file, not a diffusers folder; {NEEDS_CONFIG} "
                          "(Python: diffrt.export.single_file.export_single_file)")
    folder = resolve_source(str(src))
    model_index = read_model_index(folder)
    pipeline_class = model_index["_class_name"]
    fam = family_for_pipeline_class(pipeline_class) if family == "auto" else get_family(family)
    if pipeline_class not in fam.PIPELINE_CLASSES:
        raise DiffrtError(f"{folder} holds a {pipeline_class}, not a {fam.NAME} pipeline; use --family auto")
    scheduler = _default_scheduler(folder)  # before the long part: a bad config fails fast
    fused = read_loras(loras)  # likewise a bad LoRA file
    cache_kind = _check_step_cache(step_cache, fam)  # and a step cache the family has no graphs for
    baked = prepare_embeddings(textual_inversion, folder, fam)  # and a bad embedding file
    safety = _check_safety_checker(safety_checker, folder)  # and a folder that is not a safety checker

    out.parent.mkdir(parents=True, exist_ok=True)
    with export_lock(out):  # held until OUT is in place: a second exporter is refused
        replaces = replaceable(out, overwrite)
        sweep_partials(out)
        staging = staging_path(out)
        staging.mkdir()
        logger.info("exporting %s (%s, family %s) -> %s", src, pipeline_class, fam.NAME, out)
        try:
            manifest = _export_into(staging, source_id or src, folder, fam, pipeline_class, scheduler, precisions,
                                    opset, tiny_vae, fused_attention, fused, baked, safety=safety,
                                    controlnets=controlnets, step_cache=cache_kind)
            _apply_umask_modes(staging)
            publish(staging, out, replaces)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("export finished in %.1fs: %s", time.perf_counter() - started, out)
    return manifest


def _export_into(staging: Path, src, folder: Path, fam, pipeline_class: str, scheduler: str,
                 precisions: tuple[str, ...], opset: int, tiny_vae, fused_attention: bool,
                 loras: Sequence = (), baked=None, safety: Path | None = None, controlnets: Sequence = (),
                 step_cache: tuple[str, int] | None = None) -> Manifest:
    """Write the whole artifact into `staging`; returns its manifest."""
    model, stages, feeds = _export_stages(fam, folder, staging, opset, tiny_vae, loras, baked, safety, controlnets)
    if controlnets and fused_attention:  # the ControlNets' and the residual UNet's fused graphs
        from diffrt.export.controlnet import derive_fused

        stages.update(derive_fused(stages, feeds, staging))
    if step_cache is not None and step_cache[0] == "fbcache":  # First-Block Cache's head and tail graphs
        from diffrt.export import fbcache

        cached, cache_feeds = fbcache.export_stages(fam, folder, staging, opset, model, loras)
        stages.update(cached)
        feeds.update(cache_feeds)
    elif step_cache is not None:  # DeepCache's full and shallow UNet graphs (and their fused forms)
        from diffrt.export import deepcache

        cached, cache_feeds = deepcache.export_stages(fam, folder, staging, opset, model, step_cache[1], loras)
        stages.update(cached)
        feeds.update(cache_feeds)
        if fused_attention:
            stages.update(deepcache.derive_fused(cached, feeds, staging))
    stages.update(derive_stages(fam, stages, feeds, staging, precisions, fused_attention, model))
    # the family's exporter may complete a copied component (SD3: a T5 tokenizer.json from spiece.model)
    finish = getattr(importlib.import_module(fam.EXPORT_MODULE), "finish_component", None)
    components = {}
    for component in (*fam.tokenizers(model), "scheduler"):
        if not (folder / component).is_dir():
            raise DiffrtError(f"{folder / component} is missing; the checkpoint is incomplete")
        shutil.copytree(folder / component, staging / component)
        if finish is not None:
            finish(staging / component, component)
        if baked is not None:
            baked.finish_tokenizer(staging / component, component)
        components[component] = folder_records(staging, staging / component)
    if safety is not None:  # the safety checker's CLIP preprocessing config (written with its stage)
        components["feature_extractor"] = folder_records(staging, staging / "feature_extractor")
    preset = fam.PRESETS[fam.default_preset(pipeline_class, model)]
    size = model["sample_size"] * model["vae_scale_factor"]
    manifest = Manifest(
        family=fam.NAME,
        pipeline_class=pipeline_class,
        precisions=precisions,
        opset=opset,
        stages=stages,
        components=components,
        model=model,
        defaults={
            "preset": preset.name,
            "scheduler": scheduler,
            "num_inference_steps": preset.num_inference_steps,
            "guidance_scale": fam.preset_guidance(preset, model),
            "height": size,
            "width": size,
        },
        source={"id": str(src), "path": str(folder), "sha256": checkpoint_hash(folder)},
        versions=_versions(),
    )
    write_manifest(staging, manifest)
    if len(precisions) > 1:
        manifest = dataclasses.replace(manifest, checks=image_checks(staging, manifest, fam))
        shutil.rmtree(staging / "engines", ignore_errors=True)
        write_manifest(staging, manifest)
    return manifest


def _check_step_cache(value: str | None, fam) -> tuple[str, int] | None:
    """--step-cache: ("deepcache", branch) or ("fbcache", 0), or None (checked before the long part)."""
    if value is None:
        return None
    if value.strip().lower() == "fbcache":
        from diffrt.runtime.step_cache import FB_FAMILIES

        if fam.NAME not in FB_FAMILIES:
            raise DiffrtError(f"--step-cache fbcache: First-Block Cache graphs are made for "
                              f"{' and '.join(FB_FAMILIES.values())} models; this is {fam.NAME} "
                              "(UNets: --step-cache deepcache)")
        return ("fbcache", 0)
    from diffrt.export.deepcache import parse_option

    branch = parse_option(value)
    if fam.DENOISER != "unet":
        raise DiffrtError(f"--step-cache {value}: DeepCache is for UNet models (SD 1.x/2.x, SDXL); {fam.NAME} has "
                          "none (Flux, SD3: --step-cache fbcache)")
    return ("deepcache", branch)


def _check_safety_checker(value, folder: Path) -> Path | None:
    """The --safety-checker folder, loaded once to fail before the long part (small
    next to the UNet; loaded again at its turn), or None."""
    if value is None:
        return None
    from diffrt.export import safety as safety_side

    path = safety_side.resolve_folder(value, folder)
    safety_side.load_checker(path)
    return path


def _default_scheduler(folder: Path) -> str:
    """Our name for the checkpoint's scheduler. A class we do not implement (e.g.
    UniPC) falls back to DPM++ 2M, the closest multistep solver, on the same betas."""
    from diffrt.runtime.schedulers import make_scheduler, scheduler_name_for

    config = read_json(folder / "scheduler" / "scheduler_config.json")
    try:
        name = scheduler_name_for(config.get("_class_name", ""), config)
    except ValueError:
        logger.warning("scheduler %s is not implemented; the default will be dpmpp_2m", config.get("_class_name"))
        name = "dpmpp_2m"
    try:
        make_scheduler(name, config)
    except ValueError as exc:
        raise DiffrtError(f"{folder / 'scheduler' / 'scheduler_config.json'}: {exc}") from None
    return name


def _export_stages(fam, folder: Path, staging: Path, opset: int, tiny_vae: str | os.PathLike | None = None,
                   loras: Sequence = (), baked=None, safety: Path | None = None, controlnets: Sequence = ()):
    """Export and check every stage of the family (and the opt-in tiny VAE decoder),
    one torch module in memory at a time; returns (model facts, stage specs, each
    stage's check inputs as numpy)."""
    torch_side = importlib.import_module(fam.EXPORT_MODULE)

    # configs only (no weights): the facts, and a broken component found before the long part
    model = torch_side.model_facts(folder, torch_side.read_configs(folder))
    io = fam.stage_io(model)
    from diffrt.export import controlnet as controlnet_side  # ControlNets: checked before the long part

    controlnet_sources = controlnet_side.check_sources(controlnets, folder, model, fam.takes_image(model))
    inputs = torch_side.SampleInputs(model)  # one generator, drawn stage by stage in this order
    names = fam.stages(model)
    check_components(loras, names)
    # what a stage's own facts record (SD3's T5: its precision rule); none for most stages
    stage_facts = getattr(torch_side, "stage_facts", lambda name, model: {})
    jobs = [(name, name, DEFAULT_VARIANT, dict(stage_facts(name, model)),
             functools.partial(torch_side.load_stage, folder, name, model, inputs)) for name in names]
    jobs[names.index(fam.VAE_DECODER)][3]["scaling_factor"] = model["vae_scaling_factor"]
    if tiny_vae is not None:
        # checked before the long part starts (small: loaded again at its turn)
        facts = torch_side.tiny_vae_facts(torch_side.load_tiny_vae(Path(tiny_vae), model))
        jobs.append((fam.TINY_VAE_DECODER, fam.VAE_DECODER, fam.TINY_VARIANT, facts,
                     lambda: torch_side.tiny_vae_stage(torch_side.load_tiny_vae(Path(tiny_vae), model), model)))
    if safety is not None:  # the optional safety checker: its own IO and facts, checked like the rest
        from diffrt.export import safety as safety_side

        checker = safety_side.load_checker(safety)
        io = {**io, safety_side.SAFETY_CHECKER: safety_side.stage_io(checker)}
        safety_side.write_preprocessor(staging, safety, folder, checker)
        jobs.append((safety_side.SAFETY_CHECKER, safety_side.SAFETY_CHECKER, DEFAULT_VARIANT,
                     safety_side.facts(checker), lambda: safety_side.stage(safety_side.load_checker(safety))))
        del checker
    controlnet_side.add_jobs(io, jobs, controlnet_sources, folder, model, fam.DENOISER)
    if baked is not None:  # textual-inversion vectors into the text encoders' token tables
        jobs = [(name, role, variant, facts, baked.wrap(name, load)) for name, role, variant, facts, load in jobs]
    stages, feeds = {}, {}
    for index, (name, role, variant, facts, load) in enumerate(jobs, start=1):
        inputs_, outputs = io[name] if name in io else io[role]
        spec = StageSpec(name=name, inputs=inputs_, outputs=outputs, role=role, variant=variant, facts=facts)
        stages[name], feeds[name] = _export_torch_stage(spec, load, staging, opset, f"[{index}/{len(jobs)}]",
                                                        loras)
    return model, stages, feeds


def _export_torch_stage(spec: StageSpec, load, staging: Path, opset: int, progress: str, loras: Sequence = ()):
    """load() -> torch module -> staging/<name>/model.onnx, its weight map, checked
    against torch at another shape; the module is freed before the next stage loads.
    Returns the stage's spec and the (numpy) check inputs, for checking derived graphs."""
    from diffrt.export import weight_map
    from diffrt.export.onnx_graph import check_graph, export_graph, reference_outputs

    t0, name = time.perf_counter(), spec.name
    logger.info("%s %s: loading its torch module ...", progress, name)
    stage = load()
    if fused := fuse(stage, loras):  # before export: the graph, its weight map and check see the fused weights
        spec = dataclasses.replace(spec, facts={**spec.facts, "loras": fused})
    if sum(p.numel() * p.element_size() for p in stage.module.parameters()) >= LARGE_STAGE_BYTES:
        fix_mmap_threshold()
    logger.info("%s %s: exporting to ONNX (opset %d) ...", progress, name, opset)
    files = export_graph(stage.module, stage.trace_inputs, spec, staging / name, opset)
    logger.info("%s %s: mapping its torch parameters to initializers ...", progress, name)
    mapped = weight_map.map_torch_stage(stage, name, staging / name, [t.name for t in spec.inputs])
    record = weight_map.write(staging / name, staging, mapped)
    logger.info("%s %s: checking against torch ...", progress, name)
    feeds = {k: v.numpy() for k, v in stage.check_inputs.items()}
    reference = reference_outputs(stage.module, stage.check_inputs, spec)
    del stage  # free the torch weights before onnxruntime loads its own copy
    release_memory()
    error, scale = check_graph(files[0], feeds, reference, spec)
    release_memory()  # and onnxruntime's, before the next stage's module loads
    if not error <= CHECK_TOLERANCE * max(1.0, scale):
        raise RuntimeError(f"{name}: exported graph differs from torch by {error:.3g} (max |output| {scale:.3g})")
    records = tuple(file_record(staging, p) for p in files)
    logger.info(
        "%s %s: done in %.1fs (%.0f MB%s), max abs error vs torch %.2e",
        progress, name, time.perf_counter() - t0, sum(r.size for r in records) / 2**20,
        ", external data" if len(files) > 1 else "", error,
    )
    spec = dataclasses.replace(spec, files=records, max_abs_error=error, reference=TORCH_REFERENCE, weight_map=record)
    return spec, feeds


# A stage whose weights pass this gets its large temporary copies memory-mapped (fix_mmap_threshold).
LARGE_STAGE_BYTES = 2**30
_MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_mmap_threshold() -> None:
    """Serve allocations of 4 MiB and more with mmap from now on (glibc; elsewhere nothing).

    torch's exporter runs ONNX shape inference node by node, copying each weight the node
    reads into a one-node model and freeing it again. glibc raises its mmap threshold to
    the largest block freed (up to 32 MiB), so after the first few those copies come from
    the heap, which they fragment: SDXL's UNet export held 1.3 to 3 GiB above its 9.6 GiB
    of weights that way (benchmarks/README.md). With a fixed threshold each copy is mapped
    and unmapped, and the peak stays within 1.1x the weights. The price: those copies
    fault in fresh pages (the UNet's export takes longer), and the setting is process-wide
    and permanent (glibc has no way back to its dynamic threshold), hence only for stages
    over LARGE_STAGE_BYTES, where it decides whether the export fits in memory."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    if mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1:
        logger.info("large stage: glibc's mmap threshold fixed at %d MiB for this process (export memory)",
                    _MMAP_THRESHOLD >> 20)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's malloc_trim):
    glibc keeps freed blocks for reuse, so the GBs onnxruntime's check of one stage
    freed would otherwise sit under the next stage's export and raise its peak."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere there is nothing to trim
    except (OSError, AttributeError):
        return
    trim(0)


def _apply_umask_modes(folder: Path) -> None:
    """Give every file and folder of the artifact the mode the umask gives new ones.

    Copies (copytree keeps the source's modes) and temp files (0600) would otherwise
    leave parts of an artifact readable only by the account that exported it, and a
    serving account could not load it."""
    files = file_mode()
    folders = files | ((files & 0o444) >> 2)  # x wherever r: 0o644 -> 0o755, 0o600 -> 0o700
    folder.chmod(folders)
    for path in folder.rglob("*"):
        path.chmod(folders if path.is_dir() else files)


__all__ = ["DEFAULT_OPSET", "export"]
