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

from diffrt import __version__
from diffrt.errors import DiffrtError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EXPORT_MODULES = ("torch", "diffusers", "transformers", "onnx")
DEMO_PROMPT = "a photo of an astronaut riding a horse on mars"


def _size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or one number for a square) -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 512x512") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 512x768")
    width, height = parts
    return height, width


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


# -- the parser -----------------------------------------------------------------------

def _common_options() -> argparse.ArgumentParser:
    """-q/--verbose, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress output (results and errors still print)")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logs, and the warnings and progress bars of torch/diffusers/transformers")
    return common


def _add_generation_args(p: argparse.ArgumentParser, with_prompt: bool = True) -> None:
    from diffrt.runtime.backends import backend_names
    from diffrt.runtime.schedulers import SCHEDULER_NAMES

    if with_prompt:
        p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt (what to avoid; used with CFG)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: preset / checkpoint)")
    p.add_argument("--cfg", type=float, default=None, help="guidance_scale (<= 1 disables classifier-free guidance)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the first image (image i uses seed+i); default: random, printed")
    p.add_argument("--scheduler", default=None, help=f"one of: {', '.join(SCHEDULER_NAMES)} (default: the checkpoint's)")
    p.add_argument("--preset", default=None,
                   help="a named recipe: SD full-30step, lcm-4step; SDXL full-30step, sdxl-turbo, "
                        "sdxl-lightning-4step, lcm-sdxl-4step")
    p.add_argument("--backend", default="ort",
                   help=f"inference backend: {', '.join(backend_names())} (each needs its library: "
                        "onnxruntime, openvino, TensorRT + CuPy, torch + diffusers); default ort")
    p.add_argument("-O", "--backend-option", action="append", metavar="KEY=VALUE",
                   help="a backend option, repeatable: ort: intra_op_num_threads; openvino: precision=fp32|bf16|fp16, "
                        "num_threads, num_streams, performance_hint=latency|throughput")
    p.add_argument("--graph-precision", default=None, choices=("fp32", "fp16", "bf16", "int8"),
                   help="which of the artifact's graphs to run (default: the backend's choice; ort: fp32 on a CPU); "
                        "int8: the stages `diffrt quantize` added")
    p.add_argument("--attention", default=None, choices=("fused", "portable"),
                   help="fused or portable attention graphs (default: ort fused, openvino portable)")
    p.add_argument("--vae", default=None,
                   help="VAE decoder: default (the checkpoint's), or tiny if exported with --tiny-vae (faster, rougher)")
    p.add_argument("--cache", default=None, metavar="SPEC",
                   help="step cache: off (default), deepcache:N (the full UNet every N steps, its shallow part "
                        "between) or fbcache:T (Flux: the blocks after the first skipped while its residual moves "
                        "by at most T); needs an artifact exported with --step-cache; bench: a comma list "
                        "compared side by side, e.g. off,deepcache:3")
    verify = p.add_mutually_exclusive_group()
    verify.add_argument("--no-verify", action="store_const", const="size", dest="verify", default="stamp",
                        help="check file sizes only, not sha256 (by default files are hashed once, then again "
                             "only when they change)")
    verify.add_argument("--verify-full", action="store_const", const="full", dest="verify",
                        help="hash every file of the stages loaded, even those verified before")


def _add_lora_branch_args(p: argparse.ArgumentParser, rank_flag: str) -> None:
    required = rank_flag == "--rank"
    p.add_argument(rank_flag, dest="rank" if required else "lora_branches", type=int, required=required,
                   default=None, metavar="RANK",
                   help="also write UNet graphs with unmerged LoRA branches of this rank (the most a request's "
                        "LoRAs add up to per layer, e.g. 16), so requests with different LoRAs share a batch"
                   if not required else "the branches' rank: the most a request's LoRAs add up to per layer")
    p.add_argument("--lora-targets", default="attention", choices=("attention", "transformer"),
                   help="UNet layers given a branch: attention projections (default) or every Linear of the "
                        "transformer blocks (CLIP text encoders: always attention and MLP)")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="diffrt", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", parents=[common], help="export a diffusers checkpoint to an artifact folder")
    p.add_argument("src", help="local diffusers folder (with model_index.json), hub id 'org/name', or a "
                               "single-file checkpoint with --config")
    p.add_argument("out", help="artifact folder to write (appears only when complete)")
    p.add_argument("--family", default="auto", help="model family: sd or sdxl; auto: from model_index.json")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default), or fp16, bf16, fp16,bf16: half-precision graphs beside the fp32 ones, "
                        "checked against them (fp32 is always exported); int8 in the list (e.g. fp32,int8) then runs "
                        "`diffrt quantize OUT` (static int8 UNet)")
    p.add_argument("--no-fused-attention", dest="fused_attention", action="store_false",
                   help="do not add the fused-attention UNet/VAE graphs (what the ort backend runs by default)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14..20 (default 17)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is done)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="a LoRA .safetensors fused into the exported weights (strength default 1); repeatable")
    p.add_argument("--tiny-vae", default=None, metavar="PATH",
                   help="also export this AutoencoderTiny (TAESD) folder as a fast decoder, chosen with --vae tiny")
    p.add_argument("--safety-checker", default=None, metavar="FOLDER",
                   help="also export this saved StableDiffusionSafetyChecker folder ('checkpoint': SRC's own "
                        "safety_checker/), run after decoding with diffrt generate --safety")
    p.add_argument("--step-cache", default=None, metavar="deepcache[:BRANCH]|fbcache",
                   help="also export the UNet as DeepCache's full and shallow graphs, for generate --cache "
                        "deepcache:N (BRANCH: the cache branch, default 0, DeepCache's shallowest); fbcache (Flux): "
                        "the transformer as First-Block Cache's head and tail graphs, for --cache fbcache:T")
    p.add_argument("--controlnet", action="append", default=None, metavar="FOLDER",
                   help="also export this saved diffusers ControlNetModel folder (and the UNet taking its residuals), "
                        "used with diffrt generate --control-image; repeatable (several ControlNets at once)")
    p.add_argument("--config", default=None, metavar="DIFFUSERS_FOLDER",
                   help="SRC is a single-file checkpoint (.safetensors/.ckpt, original layout): the diffusers "
                        "folder of its architecture (configs, tokenizer, scheduler; nothing is downloaded)")
    p.add_argument("--textual-inversion", action="append", default=None, metavar="FILE[:TOKEN]",
                   help="bake a textual-inversion embedding (.safetensors or A1111 .pt) into the text encoder(s), "
                        "under TOKEN (default: the file's); repeatable")
    _add_lora_branch_args(p, "--lora-branches")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lora-branches", parents=[common],
                       help="add LoRA-branch UNet graphs to an artifact (per-row LoRAs: mixed-LoRA batches)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    _add_lora_branch_args(p, "--rank")
    p.set_defaults(func=cmd_lora_branches)

    p = sub.add_parser("quantize", parents=[common],
                       help="add int8 stages (denoiser; text encoders with --stages) beside the fp32 ones")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    p.add_argument("--method", default="static", choices=("dynamic", "static", "weights", "hybrid"),
                   help="dynamic, static (ONNX Runtime: int8 MatMul weights / calibrated QDQ, default), weights, "
                        "hybrid (NNCF, the int8 extra: weight-only / optimum-intel's hybrid)")
    p.add_argument("--stages", default=None, help="roles to quantize, comma-separated (default: the denoiser), "
                   "e.g. unet,text_encoder")
    p.add_argument("--prompts", default=None, help="calibration prompts, one per line (default: the list that "
                   "ships with diffrt); the last 4 measure the error")
    p.add_argument("--exclude", default="auto", help="node groups kept in float: auto (measured, default), none, "
                   "or a list of time_embedding,time_emb_proj,conv_in,conv_out,attention_scores,text_projection")
    p.add_argument("--calibration-steps", type=int, default=None, help="denoising steps per prompt (default 4)")
    p.add_argument("--calibration-size", type=_size, default=None, help="WIDTHxHEIGHT of the calibration runs "
                   "(default: the checkpoint's size, at most 256)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", parents=[common], help="generate images from an artifact folder")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    _add_generation_args(p)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the checkpoint's)")
    p.add_argument("-n", type=int, default=1, help="images per prompt; -o x.png then writes x-0.png, x-1.png, ...")
    p.add_argument("-o", "--output", default="out.png", help="image file to write (default out.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--safety", default=None, choices=("flag", "blur", "block", "off"),
                   help="with an artifact exported with --safety-checker: report flagged images (flag, the default), "
                        "blur or black them out (blur, block), or skip the check (off)")
    p.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default: the prompt)")
    p.add_argument("--negative-2", default=None,
                   help="SDXL: the second text encoder's negative prompt (default: --negative)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="SD/SDXL: condition on the text encoder's state N layers before the usual one "
                        "(diffusers' clip_skip; prompts only, not negative prompts)")
    p.add_argument("--weighted-prompts", nargs="?", const="compel", default=None, choices=("compel", "a1111"),
                   metavar="SYNTAX",
                   help="SD/SDXL: read weights in the prompts as compel does, (words)1.3 word+ word- (SYNTAX "
                        "compel, the default), or (words:1.3) [words] (a1111); prompts over 75 tokens are chunked "
                        "where the UNet takes a longer text (docs/prompt_weighting.md)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="a LoRA .safetensors merged at run time (strength default 1); repeatable")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="img2img: start from this RGB picture (PNG/JPEG; the output takes its size, rounded down to "
                        "a multiple of the VAE's scale factor, unless --size)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how much of the schedule to redo, in (0, 1] (default diffusers': SD 0.8, "
                        "SDXL 0.3, SD3 and Flux 0.6)")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="with --image: inpaint where this mask is white (default strength as diffusers' inpainting "
                        "pipelines: SD 1.0, SDXL 0.9999, SD3 and Flux 0.6; the checkpoint's size)")
    p.add_argument("--control-image", action="append", default=None, metavar="PATH",
                   help="with an artifact exported with --controlnet: the control image of each ControlNet, in "
                        "export order ('none' for one not used); the size defaults to the first one's")
    p.add_argument("--control-scale", type=float, nargs="+", default=None, metavar="X",
                   help="controlnet_conditioning_scale: one for all ControlNets or one per ControlNet (default 1)")
    p.add_argument("--control-start", type=float, nargs="+", default=None, metavar="S",
                   help="control_guidance_start: the fraction of the steps where the ControlNets start (default 0)")
    p.add_argument("--control-end", type=float, nargs="+", default=None, metavar="E",
                   help="control_guidance_end: the fraction of the steps where they stop (default 1)")
    p.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess_mode: ControlNets on the conditional rows only, residuals ramped")
    p.add_argument("--padding-mask-crop", type=int, default=None, metavar="N",
                   help="with --mask: inpaint only the mask's bounding box padded by N pixels, at the output size, "
                        "then paste it back into the whole picture (diffusers' padding_mask_crop)")
    p.add_argument("--refiner", default=None, metavar="OUT2",
                   help="SDXL: an exported refiner artifact that denoises the last part of the schedule")
    p.add_argument("--high-noise-frac", type=float, default=None,
                   help="with --refiner: the fraction of the schedule the base denoises (default 0.8)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", parents=[common], help="time the pipeline stages (JSON + table)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    _add_generation_args(p, with_prompt=False)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--runs", type=int, default=5, help="timed runs (rounds) per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="calls per configuration before the timed ones, kept out of the statistics (default 1)")
    p.add_argument("--precision", default=None, metavar="LIST",
                   help="graph precisions to compare, comma-separated: default, fp32, fp16, bf16, int8 (with --backend "
                        "ort,openvino: every pair); default: the backend's choice")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse", help="the prompt of every run")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a prompt set, one per line: runs cycle through it (the same prompt for every "
                        "configuration within a round)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write everything (machine, artifact hash, every run's timings, statistics) here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", parents=[common], help="describe an artifact folder and check its files")
    p.add_argument("out", help="artifact folder")
    p.add_argument("--verify", action="store_true",
                   help="also hash every file against the manifest and every engine cache entry against its "
                        "meta.json (slower)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="the engine cache to check (default OUT/engines)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("build", parents=[common], help="build TensorRT engines for an artifact (NVIDIA GPU)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt",),
                   help="the backend to build for (only tensorrt builds ahead of time; ort and openvino "
                        "compile at load)")
    p.add_argument("--batch", default=None, metavar="N|LO-HI", help="images per request, e.g. 1-4 (default 1)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default: the checkpoint's)")
    p.add_argument("--min-size", type=_size, default=None, help="smallest WIDTHxHEIGHT, with --max-size")
    p.add_argument("--max-size", type=_size, default=None, help="largest WIDTHxHEIGHT, with --min-size")
    p.add_argument("--static", action="store_true", help="one fixed shape (min = opt = max): fastest, for it only")
    p.add_argument("--text-chunks", type=int, default=3, metavar="N",
                   help="SD/SDXL UNet: weighted prompts of up to N chunks of 75 tokens (default 3; 1 with --static)")
    p.add_argument("--precision", default=None, choices=("fp16", "bf16", "fp32"),
                   help="which of the artifact's graphs to build (default: fp16 if exported, then bf16, fp32)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5 (default 3)")
    p.add_argument("--workspace-gib", type=float, default=None, help="TensorRT workspace limit in GiB "
                   "(default: TensorRT's)")
    p.add_argument("--refittable", action="store_true", help="engines whose weights can be replaced later (LoRA)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="engine cache root (default OUT/engines); give the same to generate with -O cache_dir=DIR")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("demo", parents=[common], help="tiny random checkpoint -> export -> image, offline")
    p.add_argument("--dir", default=None, help="work folder, kept afterwards (default: a new temp folder)")
    p.add_argument("--kind", default="sd15",
                   choices=("sd15", "sd2", "lcm", "sdxl", "flux", "flux-dev", "sd3", "sd3-no-t5"),
                   help="which tiny model (default sd15)")
    p.add_argument("-o", "--output", default="demo.png", help="image file to write (default demo.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    _add_generation_args(p, with_prompt=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", parents=[common], help="serve an artifact over HTTP (OpenAI-compatible; the serve extra)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="ort",
                   help="inference backend: ort, openvino, tensorrt or torch (default ort)")
    p.add_argument("-O", "--backend-option", action="append", metavar="KEY=VALUE", help="a backend option, repeatable")
    p.add_argument("--graph-precision", default=None, choices=("fp32", "fp16", "bf16", "int8"),
                   help="which of the artifact's graphs to run (default: the backend's choice)")
    p.add_argument("--attention", default=None, choices=("fused", "portable"), help="fused or portable attention graphs")
    p.add_argument("--no-verify", action="store_const", const="size", dest="verify", default="stamp",
                   help="check file sizes only at load, not sha256")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the folder's name)")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=FILE",
                   help="a LoRA .safetensors requests can name ({\"loras\": {NAME: strength}}); repeatable")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="load every DIR/*.safetensors as a LoRA named after its file")
    p.add_argument("--workers", type=int, default=1,
                   help="batches run at once, each by its own worker thread on one copy of the weights "
                        "(default 1; OpenVINO: one stream each)")
    p.add_argument("--max-batch", type=int, default=4, help="images per pipeline batch (default 4; 1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a request waits for others to batch with (default 10)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request timeout, queued + running (504)")
    p.add_argument("--max-n", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--max-steps", type=int, default=100, help="num_inference_steps limit (default 100)")
    p.add_argument("--max-size", type=int, default=2048, help="height and width limit in pixels (default 2048)")
    p.add_argument("--max-cost", type=float, default=256.0, metavar="MPX_STEPS",
                   help="per-request work limit: steps x height x width x images / 1e6, defaults included "
                        "(default 256; 30 steps of four 1024x1024 images is 126); beyond: 400")
    p.add_argument("--max-prompt-chars", type=int, default=4000,
                   help="longest prompt or negative prompt in characters (default 4000); beyond: 400")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY'; repeatable: each key's jobs are private to it. "
                        "Visible in `ps`: prefer --api-key-file or $DIFFRT_API_KEY (every key given is accepted)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="a file of API keys, one per line (# comments)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up generation")
    p.add_argument("--safety", default=None, choices=("flag", "blur", "block", "off"),
                   help="with an artifact exported with --safety-checker: flag images in the answer (the default), "
                        "also blur or black them out (blur, block), or skip the check (off)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve (ray[serve]), one replica per device")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: a fixed number of replicas")
    p.add_argument("--min-replicas", type=int, default=None, help="with --ray: autoscaling lower bound")
    p.add_argument("--max-replicas", type=int, default=None, help="with --ray: autoscaling upper bound")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="with --ray: autoscaling target of ongoing requests per replica")
    p.add_argument("--autoscaling-config", default=None, metavar="JSON",
                   help="with --ray: more of Ray Serve's autoscaling_config, as JSON")
    p.add_argument("--ray-address", default=None, help="with --ray: an existing cluster (default: start a local one)")
    p.set_defaults(func=cmd_serve)
    return parser


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
