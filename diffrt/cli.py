"""The `diffrt` command: export, generate, bench, inspect, demo.

User mistakes print one line (`error: ...`) and exit with status 2; progress and
logs go to stderr; results (paths, timings, JSON) go to stdout. Every setting is
checked before the model is loaded, and output paths before any compute is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import importlib.util
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from diffrt import cli_parser
from diffrt.errors import DiffrtError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EXPORT_MODULES = ("torch", "diffusers", "transformers", "onnx")
DEMO_PROMPT = "a photo of an astronaut riding a horse on mars"


# -- output on the terminal --------------------------------------------------------

class ReaderSafeStream(io.TextIOBase):
    """stdout/stderr for the length of one command: once the reader is gone (`diffrt
    generate ... 2>&1 | head -n 2`), further output is dropped instead of raising, so a
    closed pipe never stops the work (the images are still written) nor turns into a
    traceback. The descriptor is pointed at /dev/null, so the interpreter's own final
    flush of the stream does not fail either."""

    def __init__(self, stream):
        super().__init__()
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.reader_gone = True
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return self._stream.encoding


class Progress:
    """A progress bar on a terminal; on a pipe or file, a few plain lines instead of
    carriage returns; nothing with -q."""

    def __init__(self, label: str, quiet: bool, stream=None):
        self.label, self.quiet = label, quiet
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self._last_line = -1

    def __call__(self, step: int, total: int) -> None:
        if self.quiet:
            return
        if self.tty:
            filled = int(30 * step / total)
            print(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {step}/{total} steps", end="",
                  file=self.stream, flush=True)
            if step == total:
                print(file=self.stream)
            return
        tenth = step * 10 // total  # at most ~10 lines however many steps
        if tenth != self._last_line or step == total:
            self._last_line = tenth
            print(f"{self.label}: {step}/{total} steps", file=self.stream, flush=True)


def _timings_line(timings: dict, steps: int) -> str:
    calls = timings.get("denoiser_calls", [])
    per_call = statistics.median(calls) if calls else 0.0
    what = f"{steps} steps" if len(calls) == steps else f"{steps} steps, {len(calls)} denoiser calls"
    refiner = timings.get("refiner")
    if refiner:  # a base + refiner hand-off: the steps are split between the two
        what = (f"{steps} steps: base {len(calls)} calls, {per_call:.3f}s/call, refiner "
                f"{len(refiner['denoiser_calls'])} calls, {statistics.median(refiner['denoiser_calls'] or [0]):.3f}s/call")
        text = timings["text_encoder"] + refiner["text_encoder"]
        denoiser = timings["denoiser"] + refiner["denoiser"]
    else:
        what, text, denoiser = f"{what}, {per_call:.3f}s/call", timings["text_encoder"], timings["denoiser"]
    return (f"timings: text_encoder {text:.3f}s | denoiser {denoiser:.3f}s "
            f"({what}) | vae_decoder {timings['vae_decoder']:.3f}s | total {timings['total']:.3f}s")


def _configure_output(args: argparse.Namespace) -> None:
    """diffrt's own progress at INFO (off with -q); other libraries' warnings and
    progress bars only with --verbose: they are noise to a user of diffrt."""
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("diffrt").setLevel(level)
    if not verbose:
        warnings.simplefilter("ignore")
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(name, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock", "transformers", "diffusers", "torch"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


# -- checks done before any work ----------------------------------------------------

def _require_export_extra(command: str) -> None:
    """A runtime-only install has no torch/diffusers: say which extra to install."""
    for module in EXPORT_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise DiffrtError(
                f"`diffrt {command}` needs the export extra ({module} cannot be imported: {exc}); install it with "
                "`pip install torch==2.13.0` (or your CUDA build of torch), then `pip install -e '.[export]'` "
                "in a diffrt clone"
            ) from None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules[module] is None)
        return False


def _output_paths(output: Path, count: int) -> list[Path]:
    """-o x.png with -n 1 writes x.png; with -n N, x-0.png ... x-(N-1).png."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse outputs that could not be written, before the compute is spent."""
    first = paths[0]
    if first.suffix.lower() not in IMAGE_SUFFIXES:
        raise DiffrtError(f"-o {first}: use a .png, .jpg or .webp file name")
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise DiffrtError(f"-o {folders[0]} is a folder; name an image file, e.g. -o {folders[0] / 'out.png'}")
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise DiffrtError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another -o")
    folder = first.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DiffrtError(f"-o {first}: {folder} {what}; create the folder first, or choose another -o")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".diffrt-write-check-"):
            pass
    except OSError as exc:
        raise DiffrtError(f"-o {first}: cannot write in {folder} ({exc.strerror or exc}); choose another -o") from None


def _prepare_request(args: argparse.Namespace, folder: Path, batch: int):
    """Read the manifest (not the weights) and validate every setting of the request
    (and of a refiner's, with --refiner): (request, refiner_request or None)."""
    from diffrt.artifacts import read_manifest
    from diffrt.families import get_family
    from diffrt.runtime.pipeline import handoff_request
    from diffrt.runtime.request import check_memory, make_request, read_scheduler_config

    manifest = read_manifest(folder)
    image = getattr(args, "image", None)
    if get_family(manifest.family).takes_image(manifest.model) and image is None:
        raise DiffrtError(f"{folder} is an SDXL refiner: it continues a base model's latents; run "
                          f'diffrt generate BASE_ARTIFACT "prompt" --refiner {folder} (or give it --image PATH)')
    height, width = args.size if args.size else (None, None)
    if getattr(args, "control_image", None):  # ControlNets: the first control image's size by default
        from diffrt.runtime import controlnet

        height, width = controlnet.default_size(controlnet.cli_images(args.control_image), height, width,
                                                int(manifest.model["vae_scale_factor"]))
    refiner = getattr(args, "refiner", None)
    frac = getattr(args, "high_noise_frac", None)
    if frac is not None and refiner is None:
        raise DiffrtError("--high-noise-frac is where a refiner takes over; give --refiner OUT2 too")
    options = {"prompt_2": getattr(args, "prompt_2", None), "negative_prompt_2": getattr(args, "negative_2", None),
               "clip_skip": getattr(args, "clip_skip", None), "strength": getattr(args, "strength", None),
               "mask_image": getattr(args, "mask", None), "padding_mask_crop": getattr(args, "padding_mask_crop", None),
               "prompt_weighting": getattr(args, "weighted_prompts", None)}
    request = make_request(
        manifest, read_scheduler_config(folder), args.prompt, negative_prompt=args.negative,
        num_inference_steps=args.steps, guidance_scale=args.cfg, height=height, width=width,
        num_images_per_prompt=batch, seed=args.seed, scheduler=args.scheduler, preset=args.preset, vae=args.vae,
        output_type="latent" if refiner else "pil", denoising_end=(0.8 if frac is None else frac) if refiner else None,
        image=image, **options,
    )
    if hasattr(args, "control_image"):  # ControlNets (--control-image ...), checked before loading
        from diffrt.runtime.controlnet import from_cli

        request = from_cli(manifest, request, args)
    if getattr(args, "cache", None):  # the artifact must hold the step cache's graphs: checked before loading
        from diffrt.runtime.step_cache import check

        request = dataclasses.replace(request, cache=check(manifest, get_family(manifest.family).DENOISER, args.cache))
    check_memory(manifest, request, weights_loaded=False)
    if refiner is None:
        return request, None
    other = read_manifest(Path(refiner))
    if not get_family(other.family).takes_image(other.model):
        raise DiffrtError(f"--refiner {refiner}: it holds a {other.pipeline_class}, not a refiner "
                          "(an exported StableDiffusionXLImg2ImgPipeline checkpoint)")
    refiner_request = handoff_request(manifest, request, other, read_scheduler_config(Path(refiner)),
                                      scheduler=args.scheduler)
    check_memory(other, refiner_request, weights_loaded=False)
    return request, refiner_request


def _prepare(request) -> dict:
    """The request's shape, so that static-shape backends compile it at load."""
    s = request.settings
    return {"height": s.height, "width": s.width, "num_images": request.batch, "guidance_scale": s.guidance_scale}


def _backend_options(args: argparse.Namespace) -> dict:
    """-O KEY=VALUE pairs -> keyword options for the backend (ints and floats parsed),
    plus the graph choices Pipeline.load takes."""
    options = {"graph_precision": args.graph_precision, "attention": args.attention}
    for item in args.backend_option or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise DiffrtError(f"-O {item!r}: use KEY=VALUE, e.g. -O precision=fp32 or -O num_threads=2")
        for parse in (int, float):
            try:
                value = parse(value)
                break
            except ValueError:
                pass
        options[key] = value
    return options


# -- commands -------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> None:
    _require_export_extra("export")
    from diffrt.export import export

    t0 = time.perf_counter()
    from diffrt.lora import parse_file_strength

    if args.lora_branches is not None:
        from diffrt.export.lora_branches import check_options

        check_options(args.lora_branches, args.lora_targets)

    # int8 is not an export precision: `diffrt quantize` (default method) runs on the finished export
    wanted = [p.strip() for p in args.precision.split(",")]
    int8 = "int8" in wanted
    precision = ",".join(p for p in wanted if p != "int8") or "fp32"
    options = dict(family=args.family, precision=precision, opset=args.opset, overwrite=args.overwrite,
                   tiny_vae=args.tiny_vae, fused_attention=args.fused_attention,
                   loras=[parse_file_strength(item) for item in args.lora or ()],
                   textual_inversion=args.textual_inversion or (), safety_checker=args.safety_checker)
    if args.controlnet:
        options["controlnets"] = args.controlnet
    if args.step_cache:
        options["step_cache"] = args.step_cache
    if args.config is not None or Path(args.src).expanduser().is_file():  # a single-file checkpoint
        from diffrt.export.single_file import export_single_file

        manifest = export_single_file(args.src, args.out, args.config, **options)
    else:
        manifest = export(args.src, args.out, **options)
    if args.lora_branches is not None:  # rank and targets were checked before the export
        from diffrt.artifacts import read_manifest
        from diffrt.export.lora_branches import add_branch_stages

        add_branch_stages(args.out, args.lora_branches, args.lora_targets)
        manifest = read_manifest(args.out)
    if int8:
        from diffrt.artifacts import read_manifest
        from diffrt.export.quantize import quantize_artifact

        quantize_artifact(args.out)
        manifest = read_manifest(args.out)
    size = sum(f.size for f in manifest.all_files()) / 2**20
    print(f"wrote {args.out} ({len(manifest.stages)} stages, {size:.0f} MB) in {time.perf_counter() - t0:.1f}s")


def cmd_lora_branches(args: argparse.Namespace) -> None:
    _require_export_extra("lora-branches")
    from diffrt.export.lora_branches import add_branch_stages, check_options

    check_options(args.rank, args.lora_targets)
    t0 = time.perf_counter()
    for spec in add_branch_stages(args.out, args.rank, args.lora_targets):
        modules = len(spec.facts["lora_branches"]["modules"])
        print(f"added {spec.name}: {modules} LoRA branches of rank {args.rank} ({args.lora_targets})")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def cmd_quantize(args: argparse.Namespace) -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise DiffrtError(f"`diffrt quantize` needs onnx and onnxruntime ({exc}); install them with "
                          "`pip install -e '.[int8]'` in a diffrt clone") from None
    from diffrt.artifacts import read_manifest
    from diffrt.export.calibration import CalibrationSettings
    from diffrt.export.quantize import quantize_artifact

    settings = None
    if args.calibration_size is not None or args.calibration_steps is not None:
        height, width = args.calibration_size or (256, 256)
        settings = CalibrationSettings(steps=args.calibration_steps or 4, height=height, width=width)
    t0 = time.perf_counter()
    for spec in quantize_artifact(args.out, method=args.method, stages=args.stages, prompts=args.prompts,
                                  exclude=args.exclude, settings=settings):
        info = spec.facts["int8"]
        kept = ", ".join(f"{g} ({n} nodes)" for g, n in info["excluded"].items()) or "nothing"
        print(f"added {spec.name} ({info['method']}, {info['tool']}): relative RMS error vs {spec.reference} "
              f"{info['error']['rms_relative']:.3g}, max abs {spec.max_abs_error:.3g}; kept in float: {kept}")
    psnr = read_manifest(args.out).checks.get("int8", {}).get("image_psnr_db")
    print(f"done in {time.perf_counter() - t0:.1f}s" + (f"; image PSNR vs fp32 {psnr} dB" if psnr else ""))


def _generate(args: argparse.Namespace, folder: Path, outputs: list[Path]) -> None:
    from diffrt.runtime.pipeline import Pipeline, generate_with_refiner

    request, refiner_request = _prepare_request(args, folder, batch=len(outputs))
    settings = request.settings
    loras = _lora_args(args)  # parsed before the load: a bad file fails fast
    safety = getattr(args, "safety", None)  # the demo has no --safety
    with contextlib.ExitStack() as stack:
        pipe = stack.enter_context(Pipeline.load(folder, backend=args.backend, verify=args.verify,
                                                 prepare=_prepare(request),
                                                 loras={name: lora for name, (lora, _) in loras.items()},
                                                 safety=safety if refiner_request is None else "off",
                                                 **_backend_options(args)))
        if loras:
            request = pipe.with_loras(request, {name: strength for name, (_, strength) in loras.items()})
        if request.cache is not None:  # what the loaded pipeline can run it with (backend, LoRAs)
            from diffrt.runtime.step_cache import check_request

            request = dataclasses.replace(request, cache=check_request(pipe, request, request.cache))
        refiner = None
        if refiner_request is not None:
            refiner = stack.enter_context(Pipeline.load(args.refiner, backend=args.backend, verify=args.verify,
                                                        prepare=_prepare(request), safety=safety,
                                                        **_backend_options(args)))
        if not args.quiet:
            handoff = f", refiner from {request.denoising_end:g}" if refiner is not None else ""
            if request.strength is not None:
                handoff += f", from {args.image} at strength {request.strength:g}"
            print(f"generating {request.batch} image(s) {settings.width}x{settings.height}, {settings.scheduler}, "
                  f"{settings.num_inference_steps} steps{handoff}, guidance {settings.guidance_scale:g}, "
                  f"seed {request.seed}, backend {pipe.backend.describe()}", file=sys.stderr)
        progress = Progress("denoising", args.quiet)
        with _out_of_memory_names(request):
            if refiner is None:
                result = pipe.generate([request], progress=progress)[0]
            else:
                result = generate_with_refiner(pipe, refiner, request, refiner_request, progress=progress)
    for index, (image, path) in enumerate(zip(result.images, outputs, strict=True)):
        image.save(path)
        print(f"wrote {path} (seed {result.seed + index})")
        if result.safety and result.safety[index].flagged:
            done = {"blur": ", blurred", "block": ", replaced by black"}.get(safety, "")
            concepts = [i for i, score in enumerate(result.safety[index].concept_scores) if score > 0]
            print(f"{path}: flagged by the safety checker (concepts {concepts}{done})")
    print(_timings_line(result.timings, settings.num_inference_steps))


def _lora_args(args: argparse.Namespace) -> dict:
    """--lora FILE[:STRENGTH] (repeatable) -> {name: (parsed Lora, strength)}."""
    from diffrt.lora import parse_file_strength, read_lora

    out = {}
    for index, item in enumerate(getattr(args, "lora", None) or ()):
        path, strength = parse_file_strength(item)
        out[f"lora{index}"] = (read_lora(path), strength)
    return out


@contextlib.contextmanager
def _out_of_memory_names(request):
    """A backend's failed allocation, as one line with the request's size and what to do."""
    from diffrt.errors import OutOfMemoryError

    try:
        yield
    except OutOfMemoryError as exc:
        s = request.settings
        raise DiffrtError(f"{s.width}x{s.height} with {request.batch} image(s) did not fit in memory ({exc}); "
                          "use a smaller size or fewer images") from None


def cmd_generate(args: argparse.Namespace) -> None:
    from diffrt.runtime.request import check_count

    outputs = _output_paths(Path(args.output), check_count("num_images_per_prompt (-n)", args.n))
    _check_outputs(outputs, args.overwrite)
    _generate(args, Path(args.out), outputs)


def cmd_bench(args: argparse.Namespace) -> None:
    from diffrt.bench import bench, configs_from, read_prompts, table
    from diffrt.runtime.request import check_count

    check_count("--runs", args.runs)
    if args.warmup < 0:
        raise DiffrtError(f"--warmup must be an integer >= 0, got {args.warmup}")
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    if args.seed is None:
        args.seed = 0  # run i uses seed + i: the same images for every configuration and every rerun
    batch = check_count("--batch", args.batch)
    caches, args.cache = args.cache, None  # --cache LIST: one configuration each, not one request's option
    requests = {}
    for prompt in dict.fromkeys(prompts):  # each prompt validated once, before anything loads
        args.prompt = prompt
        request, _ = _prepare_request(args, Path(args.out), batch=batch)
        requests[prompt] = dataclasses.replace(request, output_type="np")
    first = requests[prompts[0]]
    options = _backend_options(args)
    options.pop("graph_precision")
    attention = options.pop("attention")
    if args.precision and args.graph_precision:
        raise DiffrtError("give --precision LIST (bench compares graph precisions) or --graph-precision, not both")
    configs = configs_from(args.backend, args.precision or args.graph_precision, options, caches)

    def load(folder, config):
        from diffrt.runtime.pipeline import Pipeline

        return Pipeline.load(folder, backend=config.backend, verify=args.verify, prepare=_prepare(first),
                             graph_precision=config.graph_precision, attention=attention, **dict(config.options))

    def request_for(_pipe, prompt, index):
        return dataclasses.replace(requests[prompt], seed=args.seed + index)

    report = bench(args.out, configs, request_for, prompts, runs=args.runs, warmup=args.warmup, load=load,
                   progress=None if args.quiet else (lambda text: print(text, file=sys.stderr)))
    report["settings"] = {**first.settings.__dict__, "batch": batch, "seed": args.seed}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _say(args, f"wrote {args.json}")
    print(table(report), end="")


def cmd_inspect(args: argparse.Namespace) -> None:
    from diffrt.artifacts import MANIFEST_NAME, read_manifest, sha256_file
    from diffrt.runtime.engine_cache import entry_problems
    from diffrt.verification import component_problem, file_problem

    folder = Path(args.out)
    manifest = read_manifest(folder)
    print(f"{folder}: {manifest.pipeline_class} (family {manifest.family}), {'/'.join(manifest.precisions)}, "
          f"opset {manifest.opset}")
    print(f"source: {manifest.source.get('id')} sha256 {manifest.source.get('sha256', '')[:16]}")
    for name, stage in manifest.stages.items():
        size = sum(f.size for f in stage.files) / 2**20
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in stage.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in stage.outputs)
        passes = f", passes {'+'.join(stage.passes)}" if stage.passes else ""
        print(f"  {name} [{stage.role}, {stage.variant}, {stage.precision}{passes}]: {size:.1f} MB, "
              f"err {stage.max_abs_error:.1e} vs {stage.reference}; in: {ins}; out: {outs}")
    print(f"defaults: {json.dumps(manifest.defaults)}")
    print(f"versions: {json.dumps(manifest.versions)}")
    # What every other check trusts: compare it with the exporter's to trust the artifact.
    print(f"manifest: sha256 {sha256_file(folder / MANIFEST_NAME)}")
    records = manifest.all_files()
    problems = [p for p in (component_problem(folder, n, rs) for n, rs in manifest.components.items()) if p]
    problems += [p for p in (file_problem(folder, r, check_hash=args.verify) for r in records) if p]
    cache_root = Path(args.cache_dir) if args.cache_dir else folder / "engines"
    entries, engine_problems = entry_problems(cache_root, check_hashes=args.verify)
    checked = "sizes and sha256" if args.verify else "sizes (add --verify to hash them)"
    for problem in problems + engine_problems:
        print(f"  problem: {problem}")
    if problems:
        raise DiffrtError(f"{folder}: {len(problems)} of {len(records)} files do not match the manifest "
                          f"(first: {problems[0]})")
    print(f"files: {len(records)} checked ({checked}): ok")
    if engine_problems:
        raise DiffrtError(f"{cache_root}: {len(engine_problems)} of {entries} engine cache entries do not match their "
                          f"meta.json (first: {engine_problems[0]}); a load removes and rebuilds them")
    print(f"engines: {entries} cache entries in {cache_root} checked ({checked}): ok")


def cmd_build(args: argparse.Namespace) -> None:
    """Build TensorRT engines ahead of time (diffrt/build/tensorrt.py says how)."""
    from diffrt.build.tensorrt import BuildOptions, build_plan, plan_build, require_tensorrt

    options = BuildOptions(opt_level=args.opt_level, refit=args.refittable, workspace_gib=args.workspace_gib)
    plan = plan_build(args.out, batch=args.batch or "1", size=args.size, min_size=args.min_size,
                      max_size=args.max_size, static=args.static, precision=args.precision, options=options,
                      text_chunks=args.text_chunks)
    require_tensorrt()  # after every argument is checked: what to install, in one line
    t0 = time.perf_counter()
    built = build_plan(plan, cache_dir=args.cache_dir, progress=lambda line: _say(args, line))
    for engine in built:
        print(f"{engine.profile.stage}: {engine.path}")
    print(f"{len(built)} TensorRT engine(s) ready in {time.perf_counter() - t0:.1f}s; run them with "
          f"diffrt generate {args.out} \"a prompt\" --backend tensorrt")


DEMO_MARKER = ".diffrt-demo"  # in a --dir the demo made: it may replace checkpoint/ and artifact/ there


def _check_demo_settings(args: argparse.Namespace) -> None:
    """What can be checked before a model exists (the rest is checked again, fully,
    once the artifact is there): nothing is built for a run that would be refused."""
    from diffrt.families import get_family
    from diffrt.runtime.request import check_count, check_guidance, check_seed
    from diffrt.runtime.schedulers import SCHEDULER_NAMES

    from diffrt.export.tiny import DEMO_KINDS

    family = get_family(DEMO_KINDS[args.kind][0])
    check_seed(args.seed)
    if args.steps is not None:
        check_count("num_inference_steps (--steps)", args.steps)
    if args.cfg is not None:
        check_guidance(args.cfg)
    if args.scheduler is not None and args.scheduler not in SCHEDULER_NAMES:
        raise DiffrtError(f"unknown scheduler {args.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    if args.preset is not None and args.preset not in family.PRESETS:
        raise DiffrtError(f"unknown preset {args.preset!r}; choose one of: {', '.join(family.PRESETS)}")
    if args.vae not in (None, "default"):
        raise DiffrtError(f"--vae {args.vae}: the demo's artifact has only its own VAE decoder (default)")


def _demo_workdir(path: str | None) -> tuple[Path, bool]:
    """(the demo's work folder, whether it was made here): a new temp folder, or --dir
    when it is new, empty, or an earlier demo's (never inside another artifact)."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="diffrt-demo-")), True
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DiffrtError(f"--dir {folder} is a file; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / DEMO_MARKER).is_file():
        what = "an exported artifact" if (folder / "manifest.json").is_file() else "files the demo did not make"
        raise DiffrtError(f"--dir {folder} holds {what}; give a new or empty folder (or an earlier demo's --dir)")
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("made by `diffrt demo`; it may replace checkpoint/ and artifact/ here\n")
    return folder, made


def cmd_demo(args: argparse.Namespace) -> None:
    _require_export_extra("demo")
    outputs = [Path(args.output)]
    _check_outputs(outputs, args.overwrite)
    _check_demo_settings(args)
    workdir, made = _demo_workdir(args.dir)
    try:
        _demo(args, workdir, outputs)
    except BaseException:
        if made and args.dir is None:  # a failed run leaves no temp folder behind
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def _demo(args: argparse.Namespace, workdir: Path, outputs: list[Path]) -> None:
    args.prompt, args.size = DEMO_PROMPT, None
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny

    checkpoint, artifact = workdir / "checkpoint", workdir / "artifact"
    t0 = time.perf_counter()
    _say(args, f"1/3 building a tiny random-weight {args.kind} checkpoint in {checkpoint}")
    make_tiny(checkpoint, kind=args.kind, sample_size=64)
    _say(args, f"2/3 exporting it to {artifact}")
    export(checkpoint, artifact, overwrite=True)
    _say(args, "3/3 generating")
    _generate(args, artifact, outputs)
    print(f"demo finished in {time.perf_counter() - t0:.1f}s (random weights: the image is noise-like by design)")
    print(f"the checkpoint and the artifact are kept in {workdir} (delete it when done)")
    print(f'next: diffrt generate {artifact} "a prompt" -o my.png')


def cmd_serve(args: argparse.Namespace) -> None:
    # before importing the server, whose modules need these (pydantic comes with fastapi)
    missing = [n for n in ("fastapi", "pydantic", "uvicorn", "prometheus_client") if not _importable(n)]
    if missing:
        raise DiffrtError(f"diffrt serve needs {', '.join(missing)}: pip install -e '.[serve]' in a diffrt clone")
    from diffrt.serve.server import serve_from_args

    serve_from_args(args, _backend_options(args))


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


# -- the parser (diffrt/cli_parser.py) ------------------------------------------------

COMMANDS = {"export": cmd_export, "lora-branches": cmd_lora_branches, "quantize": cmd_quantize,
            "generate": cmd_generate, "bench": cmd_bench, "inspect": cmd_inspect, "build": cmd_build,
            "demo": cmd_demo, "serve": cmd_serve}


def build_parser() -> argparse.ArgumentParser:
    return cli_parser.build_parser(COMMANDS, __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.verbose = getattr(args, "verbose", False)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ReaderSafeStream(sys.stdout), ReaderSafeStream(sys.stderr)
    try:
        _configure_output(args)
        return _run(args)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stdout, sys.stderr = streams


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
        sys.stdout.flush()
    except DiffrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; use a smaller --size or fewer images (-n/--batch)", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: input nested too deeply to read (a damaged or hostile file?)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`diffrt inspect OUT | head`): not an error. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a folder we cannot write, a full disk, ...: the system's words, one line
        if args.verbose:
            raise
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    return 0


def os_error_line(exc: OSError) -> str:
    """An OSError as one line that names the file and says what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = {
        errno.ENOSPC: "free some disk space or write somewhere else",
        errno.EDQUOT: "free some disk space or write somewhere else",
        errno.EACCES: "choose a folder you can write to",
        errno.EPERM: "choose a folder you can write to",
        errno.EROFS: "choose a folder on a writable file system",
        errno.EISDIR: "name a file, not a folder",
        errno.ENOENT: "check the path",
    }.get(exc.errno, "rerun with --verbose for the details")
    return f"{reason}:{where}; {advice}"


if __name__ == "__main__":
    sys.exit(main())
