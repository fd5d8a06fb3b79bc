"""The GPU check: every GPU backend installed here, side by side with the torch backend
and diffusers, inside one 10-minute command on a lent machine with no package registry.

    bash benchmarks/gpu_bundle.sh                    # here (a registry): the wheels that machine lacks
    bash benchmarks/gpu_check.sh                     # there (one NVIDIA GPU, python3): <= 9.5 minutes
    bash benchmarks/gpu_check.sh --device cpu        # the same flow on CPU backends (CI rehearses it)

What runs, in order, inside `--budget` seconds (gpu_check.sh: 480):
1. Schedulers on device arrays: every scheduler's loop on torch CUDA tensors and on CuPy
   arrays against numpy (max difference; whether the arrays stayed on the device).
2. `--quick` pass: a tiny random-weight SD checkpoint, exported (fp32 and fp16 graphs),
   at 128x128, 4 steps without CFG and 30 steps with CFG, for every variant below.
3. Unless --quick: an SD1.5-size checkpoint (real architecture, random weights,
   benchmarks/real_size_sd15.py), built and exported in a background process (niced)
   while step 2 runs, then the same cases at 512x512, while the budget lasts.

Variants (a library that is not installed here is reported as such, not failed): torch
(the baseline and oracle: the source checkpoint's diffusers modules, fp16, SDPA),
torch-bf16, torch-cudagraphs (torch.compile mode reduce-overhead), torch-compile,
ort-cuda, ort-cuda-graphs, ort-trt (onnxruntime-gpu), tensorrt, tensorrt-graphs
(`diffrt build` engines for the checked size). Every stage call is timed up to a device
synchronize (the pipeline's own timings do not synchronize); the first call of each case
is a warm-up (compilation, engine load, graph capture: `warmup_s`). Each image is compared
with the torch backend's (same latents) and the torch backend's with diffusers' own
pipeline. Results go to OUT/gpu_check.json and OUT/gpu_check.md after every variant
(OUT: --out, else $OUT, else benchmarks/results); a table ends the output. Nothing here
asserts a speed: exit status 1 means a variant FAILED (its traceback is printed), 2 a
setup problem (one line).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "a photo of an astronaut riding a horse"
GPU_CASES = ((4, 1.0), (30, 7.5))
CPU_CASES = ((2, 1.0), (3, 7.5))
SIZES = {"tiny": 128, "sd15": 512}  # on the GPU; --device cpu runs the tiny model at 64
NEEDS = ("diffusers", "transformers", "array_api_compat", "onnx", "tokenizers", "PIL")  # the check's own imports
STATIC = {"tensorrt": "statically checked: tests/test_tensorrt.py, tests/test_tensorrt_api.py",
          "onnxruntime-gpu": "statically checked: tests/test_ort_gpu_paths.py"}


@dataclass(frozen=True)
class Variant:
    """One backend configuration. `cost_s`: a rough bound on its seconds per model (an
    estimate, not a measurement: compilation dominates), to skip what the remaining
    budget cannot hold; `models`: the models it runs on."""

    label: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    builds_engines: bool = False
    cost_s: dict[str, float] = field(default_factory=lambda: {"tiny": 20.0, "sd15": 60.0})
    models: tuple[str, ...] = ("tiny", "sd15")


GPU_VARIANTS = (
    Variant("torch", "torch", {"device": "cuda", "dtype": "fp16"}),
    Variant("torch-bf16", "torch", {"device": "cuda", "dtype": "bf16"}),
    Variant("torch-cudagraphs", "torch", {"device": "cuda", "dtype": "fp16", "cuda_graphs": True},
            cost_s={"tiny": 120.0, "sd15": 200.0}),
    Variant("torch-compile", "torch", {"device": "cuda", "dtype": "fp16", "compile": True},
            cost_s={"sd15": 200.0}, models=("sd15",)),  # on the tiny model, torch-cudagraphs compiles already
    Variant("ort-cuda", "ort", {"device": "cuda"}),
    Variant("ort-cuda-graphs", "ort", {"device": "cuda", "cuda_graphs": True}),
    Variant("ort-trt", "ort", {"device": "tensorrt"}, cost_s={"tiny": 120.0, "sd15": 400.0}),
    Variant("tensorrt", "tensorrt", {}, builds_engines=True, cost_s={"tiny": 120.0, "sd15": 400.0}),
    Variant("tensorrt-graphs", "tensorrt", {"cuda_graphs": True}, builds_engines=True),
)
CPU_VARIANTS = (
    Variant("torch", "torch", {"device": "cpu", "dtype": "fp32"}),
    Variant("ort", "ort", {}),
    Variant("ort-iobinding", "ort", {"io_binding": True}),
)


class Budget:
    """Seconds left of the run; `clock` is injectable (tests)."""

    def __init__(self, seconds: float | None, clock=time.monotonic):
        self.clock, self.start, self.seconds = clock, clock(), seconds

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (self.clock() - self.start)

    def allows(self, cost: float) -> bool:
        return self.remaining() >= cost


class Report:
    """The results, written to OUT after every variant (a run cut short keeps them)."""

    def __init__(self, out_dir: Path, results: dict[str, Any]):
        self.out_dir, self.results = out_dir, results

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.results, indent=2, default=float)),
                           ("gpu_check.md", summary(self.results))):
            tmp = self.out_dir / f".{name}.part"
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, self.out_dir / name)


# -- what is installed here ---------------------------------------------------------------

def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable(variant: Variant) -> str | None:
    """Why the variant cannot run here ("not installed here: ..."), or None."""
    if variant.backend == "tensorrt" and not (_has("tensorrt") and _has("cupy")):
        missing = " and ".join(m for m in ("tensorrt", "cupy") if not _has(m))
        return f"not installed here: {missing} ({STATIC['tensorrt']})"
    if variant.backend == "ort":
        device = variant.options.get("device")
        provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(device)
        if provider is not None:
            import onnxruntime

            if provider not in onnxruntime.get_available_providers():
                return (f"not installed here: {provider} (onnxruntime {onnxruntime.__version__} has "
                        f"{', '.join(onnxruntime.get_available_providers())}; {STATIC['onnxruntime-gpu']})")
            if not _has("cupy"):
                return "not installed here: cupy (the ORT GPU path binds CuPy arrays)"
    if variant.backend == "torch" and variant.options.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            return f"no CUDA device for torch {torch.__version__}"
    return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    except ImportError:
        info["torch"] = None
    for name in ("cupy", "onnxruntime", "tensorrt", "diffusers", "transformers", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed (or its libraries are not): reported as absent
            info[name] = None
    if info["onnxruntime"]:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    return info


def synchronize() -> None:
    """Wait for the device's queued work, in whatever library has it."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            cupy.cuda.runtime.deviceSynchronize()
        except Exception:  # noqa: BLE001 - CuPy without a device: nothing to wait for
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


# -- models --------------------------------------------------------------------------------

def _ready(artifact: Path) -> bool:
    from diffrt.artifacts import read_manifest

    try:
        read_manifest(artifact)
        return True
    except Exception:  # noqa: BLE001 - missing or from another diffrt: export it again
        return False


def make_tiny(workdir: Path, precision: str) -> Path:
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sd

    checkpoint, artifact = workdir / "tiny-checkpoint", workdir / "tiny-artifact"
    if not _ready(artifact):
        make_tiny_sd(checkpoint, kind="sd15", sample_size=32)
        export(checkpoint, artifact, precision=precision, overwrite=True)
    return artifact


def quiet_libraries() -> None:
    """diffusers' and transformers' warnings (no accelerate, no torchvision) are noise here."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def prepare_sd15(workdir: Path, precision: str) -> Path:
    """Build (once) and export the SD1.5-size checkpoint; run in its own process."""
    from real_size_sd15 import StepTracker, build_checkpoint

    from diffrt.export import export

    quiet_libraries()

    checkpoint, artifact = workdir / "sd15-checkpoint", workdir / "sd15-artifact"
    if not (checkpoint / "model_index.json").is_file():
        t0 = time.perf_counter()
        build_checkpoint(checkpoint, seed=0, tracker=StepTracker())
        print(f"built the SD1.5-size checkpoint in {time.perf_counter() - t0:.0f}s", flush=True)
    if not _ready(artifact):
        t0 = time.perf_counter()
        export(checkpoint, artifact, precision=precision, overwrite=True)
        print(f"exported it ({precision}) in {time.perf_counter() - t0:.0f}s", flush=True)
    return artifact


def start_sd15(workdir: Path, precision: str) -> subprocess.Popen:
    """The SD1.5-size build and export, niced, in the background (CPU work while the GPU
    runs the tiny model); its output goes to WORKDIR/sd15-prepare.log."""
    log = open(workdir / "sd15-prepare.log", "w")  # noqa: SIM115 - the child writes it; closed with the run
    command = [sys.executable, str(Path(__file__).resolve()), "--prepare-sd15", "--workdir", str(workdir),
               "--precision", precision]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))


def prepare_for(size: int) -> dict[str, int]:
    """The request shape Pipeline.load prepares (and the engines gpu_check builds cover)."""
    return {"height": size, "width": size}


def build_trt(artifact: Path, size: int) -> None:
    """TensorRT engines for the checked size: one image, with or without CFG."""
    from diffrt.build.tensorrt import build_plan, plan_build

    plan = plan_build(artifact, batch="1", size=(size, size))
    build_plan(plan, progress=lambda line: print(f"  {line}", flush=True))


# -- one variant ---------------------------------------------------------------------------

class StageTimer:
    """Wraps a pipeline's sessions (each call timed up to a device synchronize) and its
    backend's to_host (host copies are counted between the first and last denoiser call)."""

    def __init__(self, pipe):
        self.events: list[tuple[str, float]] = []
        for key, session in pipe._contexts.items():
            session.run = self._timed(key, session.run)
        to_host = pipe.backend.to_host

        def counted(array):
            self.events.append(("to_host", 0.0))
            return to_host(array)

        pipe.backend.to_host = counted

    def _timed(self, key: str, run):
        def timed(feeds):
            synchronize()
            t0 = time.perf_counter()
            out = run(feeds)
            synchronize()
            self.events.append((key, time.perf_counter() - t0))
            return out
        return timed

    def seconds(self, key: str) -> list[float]:
        return [s for k, s in self.events if k == key]

    def host_copies_in_loop(self, denoiser: str) -> int:
        marks = [i for i, (k, _) in enumerate(self.events) if k == denoiser]
        return sum(1 for k, _ in self.events[marks[0]:marks[-1]] if k == "to_host") if marks else 0


def run_case(pipe, timer: StageTimer, steps: int, guidance: float, size: int, latents) -> dict[str, Any]:
    args = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=0,
                output_type="np", latents=latents, scheduler="euler")
    t0 = time.perf_counter()
    pipe(PROMPT, **{**args, "num_inference_steps": 1})  # warm-up: compilation, engines, graph capture
    warmup = time.perf_counter() - t0
    timer.events.clear()
    synchronize()
    t0 = time.perf_counter()
    out = pipe(PROMPT, **args)
    synchronize()
    total = time.perf_counter() - t0
    denoiser = pipe.family.DENOISER
    calls = timer.seconds(denoiser)
    per_call = statistics.median(calls) if calls else float("nan")
    return {"image": out.images, "warmup_s": warmup, "text_encoder_s": sum(timer.seconds("text_encoder")),
            "denoiser_call_s": per_call, "denoiser_calls": len(calls), "vae_decoder_s": sum(timer.seconds("vae_decoder")),
            "total_s": total, "denoiser_it_per_s": 1.0 / per_call if calls else None,
            "host_copies_in_loop": timer.host_copies_in_loop(denoiser)}


def run_variant(variant: Variant, artifact: Path, cases, size: int, latents, images: dict) -> dict[str, Any]:
    from diffrt.runtime.pipeline import Pipeline

    entry: dict[str, Any] = {}
    if variant.builds_engines:
        t0 = time.perf_counter()
        build_trt(artifact, size)
        entry["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Pipeline.load(artifact, backend=variant.backend, prepare=prepare_for(size), **variant.options) as pipe:
        entry["load_s"] = time.perf_counter() - t0
        entry["describe"] = pipe.backend.describe()
        timer = StageTimer(pipe)
        for steps, guidance in cases:
            case = run_case(pipe, timer, steps, guidance, size, latents)
            images[(variant.label, steps)] = case.pop("image")
            entry[f"{steps}steps"] = case
    entry["status"] = "ok"
    return entry


def check_model(name: str, artifact: Path, variants, cases, size: int, device: str, budget: Budget,
                report: Report) -> dict[str, Any]:
    """Every variant on one artifact; the first is the baseline (the torch backend, itself
    compared with diffusers)."""
    from diffrt.artifacts import read_manifest

    manifest = read_manifest(artifact)
    factor = int(manifest.model["vae_scale_factor"])
    latents = np.random.default_rng(0).standard_normal((1, 4, size // factor, size // factor), dtype=np.float32)
    result: dict[str, Any] = {"artifact": str(artifact), "size": size, "backends": {}}
    report.results["models"][name] = result
    images: dict[tuple[str, int], np.ndarray] = {}
    for variant in (v for v in variants if name in v.models):
        why = unavailable(variant)
        cost = variant.cost_s.get(name, 60.0)
        if why is None and not budget.allows(cost):
            why = f"skipped: {budget.remaining():.0f}s of the budget left, this takes up to {cost:.0f}s"
        if why is not None:
            result["backends"][variant.label] = {"status": why}
        else:
            print(f"[{name}] {variant.label} ...", flush=True)
            try:
                result["backends"][variant.label] = run_variant(variant, artifact, cases, size, latents, images)
            except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others' numbers
                traceback.print_exc()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                result["backends"][variant.label] = {"status": f"FAILED: {type(exc).__name__}: {first}"}
        print(f"[{name}] {variant.label}: {result['backends'][variant.label]['status']}", flush=True)
        report.save()
    baseline = variants[0].label
    for (label, steps), image in images.items():
        if label != baseline and (baseline, steps) in images:
            diff = float(np.abs(image - images[(baseline, steps)]).max())
            result["backends"][label][f"{steps}steps"]["max_abs_diff_vs_torch"] = diff
    if variants[0].backend == "torch" and budget.allows(30.0):
        compare_with_diffusers(manifest, result, images, baseline, cases, size, device, latents)
    report.save()
    return result


def compare_with_diffusers(manifest, result, images, baseline, cases, size, device, latents) -> None:
    """The baseline's images against diffusers' own pipeline on the same weights and latents."""
    import diffusers
    import torch

    try:
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(manifest.source["path"], dtype=dtype).to(device)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for steps, guidance in cases:
            if (baseline, steps) in images:
                out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                           latents=torch.from_numpy(latents).to(device, dtype), output_type="np")
                diff = float(np.abs(images[(baseline, steps)] - np.asarray(out.images, dtype=np.float32)).max())
                result["backends"][baseline][f"{steps}steps"]["max_abs_diff_vs_diffusers"] = diff
    except Exception as exc:  # noqa: BLE001 - the oracle is extra information; say why it is missing
        result["diffusers"] = f"not compared: {type(exc).__name__}: {str(exc).strip()[:200]}"


# -- schedulers on device arrays ----------------------------------------------------------------

def scheduler_check(device: str) -> dict[str, Any]:
    """Every scheduler's loop on numpy and on each device array type here: the max
    difference relative to numpy's sample scale, and whether every step stayed that type."""
    from diffrt.runtime.schedulers import SCHEDULER_NAMES, make_scheduler

    config = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
    kinds: dict[str, Any] = {}
    import torch

    kinds[f"torch-{device}"] = (lambda a: torch.from_numpy(a).to(device), torch.Tensor, lambda t: t.cpu().numpy())
    if device == "cuda" and _has("cupy"):
        import cupy

        kinds["cupy"] = (cupy.asarray, cupy.ndarray, cupy.asnumpy)
    out: dict[str, Any] = {}
    for kind, (to_array, array_type, to_numpy) in kinds.items():
        worst, stayed = 0.0, True
        for name in SCHEDULER_NAMES:
            reference = _scheduler_loop(make_scheduler(name, config), name, lambda a: a)
            ours = _scheduler_loop(make_scheduler(name, config), name, to_array)
            stayed = stayed and all(isinstance(x, array_type) for x in ours)
            scale = max(float(np.abs(r).max()) for r in reference) + 1e-6
            worst = max(worst, max(float(np.abs(to_numpy(x) - r).max()) for x, r in zip(ours, reference)) / scale)
        out[kind] = {"schedulers": len(SCHEDULER_NAMES), "max_rel_diff_vs_numpy": worst, "stayed_on_device": stayed}
    return out


def _scheduler_loop(scheduler, name: str, to_array) -> list:
    run = scheduler.plan(25 if name != "lcm" else 4)
    rng = np.random.default_rng(1)
    shape = (2, 4, 8, 8)
    x = to_array((rng.standard_normal(shape, dtype=np.float32) * np.float32(run.init_noise_sigma)))
    noise_rng = np.random.default_rng(2)
    outputs = np.random.default_rng(3).standard_normal((len(run.timesteps), *shape), dtype=np.float32)
    trace = []

    class Noise:
        def standard_normal(self, size, dtype=np.float32):
            return noise_rng.standard_normal(size, dtype=dtype)

    for i in range(len(run.timesteps)):
        x = run.step(to_array(outputs[i]) + run.scale_model_input(x, i) * np.float32(0.01), i, x, Noise())
        trace.append(x)
    return trace


# -- the report -------------------------------------------------------------------------------

def _fmt(value, scale=1.0, digits=1, form="f") -> str:
    return "-" if value is None else f"{value * scale:.{digits}{form}}"


def summary(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = [f"GPU check {results.get('date', '')} on {m.get('gpu') or 'no GPU'} | torch {m.get('torch')} "
             f"CUDA {m.get('cuda')} | CuPy {m.get('cupy')} | onnxruntime {m.get('onnxruntime')} | "
             f"TensorRT {m.get('tensorrt')} | device {results.get('device')}"]
    for kind, entry in results.get("schedulers", {}).items():
        lines.append(f"schedulers on {kind}: {entry['schedulers']} schedulers, max diff vs numpy "
                     f"{entry['max_rel_diff_vs_numpy']:.2e} of the sample scale, stayed on device: "
                     f"{entry['stayed_on_device']}")
    lines += ["", "| model | variant | steps | warm-up s | text enc ms | denoiser ms/call | calls | VAE ms | total s | "
              "it/s | host copies in loop | diff vs torch | torch vs diffusers |", "|" + "---|" * 13]
    for model, result in results.get("models", {}).items():
        for label, entry in result["backends"].items():
            cases = [(k, v) for k, v in entry.items() if k.endswith("steps")]
            if not cases:
                lines.append(f"| {model} | {label} | {entry.get('status', '')} |" + " |" * 10)
            for key, case in cases:
                lines.append(
                    f"| {model} | {label} | {key[:-5]} | {_fmt(case['warmup_s'])} | {_fmt(case['text_encoder_s'], 1e3)} "
                    f"| {_fmt(case['denoiser_call_s'], 1e3, 2)} | {case['denoiser_calls']} | "
                    f"{_fmt(case['vae_decoder_s'], 1e3)} | {_fmt(case['total_s'], digits=3)} | "
                    f"{_fmt(case['denoiser_it_per_s'])} | {case['host_copies_in_loop']} | "
                    f"{_fmt(case.get('max_abs_diff_vs_torch'), form='e')} | "
                    f"{_fmt(case.get('max_abs_diff_vs_diffusers'), form='e')} |")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    failed = failures(results)
    lines.append(f"FAILED: {', '.join(failed)}" if failed else f"no variant failed ({results.get('wall_s', 0):.0f}s)")
    return "\n".join(lines)


def failures(results: dict[str, Any]) -> list[str]:
    return [f"{m}/{label}" for m, r in results.get("models", {}).items() for label, e in r["backends"].items()
            if str(e.get("status", "")).startswith("FAILED")]


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same flow on CPU backends (the rehearsal CI runs)")
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default: no limit)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffrt-gpu-check"))
    parser.add_argument("--out", type=Path, default=None,
                        help="where gpu_check.json and gpu_check.md go (default: $OUT, else benchmarks/results)")
    parser.add_argument("--prepare-sd15", action="store_true", help=argparse.SUPPRESS)  # the background export
    parser.add_argument("--precision", default="fp16", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def missing_needs() -> list[str]:
    return [name for name in NEEDS if not _has(name)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.prepare_sd15:
        prepare_sd15(args.workdir, args.precision)
        return 0
    missing = missing_needs()
    if missing:
        print(f"gpu_check: {', '.join(missing)} cannot be imported here; make the bundle with "
              "`bash benchmarks/gpu_bundle.sh` on a machine with a package registry and run this through "
              "benchmarks/gpu_check.sh with the .gpu-bundle folder beside it (README, GPU)", file=sys.stderr)
        return 2
    quiet_libraries()
    gpu = args.device == "cuda"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_check: torch {torch.__version__} sees no CUDA device here; use --device cpu for the CPU "
                  "run", file=sys.stderr)
            return 2
    out_dir = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    budget = Budget(args.budget)
    variants = GPU_VARIANTS if gpu else CPU_VARIANTS
    cases = GPU_CASES if gpu else CPU_CASES
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device,
                               "machine": machine(), "budget_s": args.budget,
                               "cases": [{"steps": s, "guidance_scale": g} for s, g in cases], "models": {},
                               "notes": []}
    report = Report(out_dir, results)
    print(json.dumps(results["machine"]), flush=True)
    # fp16 graphs only where a backend here runs them (the torch backend reads the checkpoint)
    half = gpu and (_has("tensorrt") or any(unavailable(v) is None for v in variants if v.backend == "ort"))
    background = start_sd15(args.workdir, "fp16" if half else "fp32") if gpu and not args.quick else None
    try:
        results["schedulers"] = scheduler_check(args.device)
        report.save()
        tiny = make_tiny(args.workdir, "fp16" if gpu else "fp32")
        check_model("tiny", tiny, variants, cases, SIZES["tiny"] if gpu else 64, args.device, budget, report)
        if background is not None:
            run_sd15(background, args.workdir, variants, cases, budget, report)
    finally:
        if background is not None and background.poll() is None:
            background.kill()
            background.wait()
    results["wall_s"] = budget.clock() - budget.start
    report.save()
    print(summary(results))
    print(f"wrote {out_dir / 'gpu_check.json'} and gpu_check.md")
    return 1 if failures(results) else 0


def run_sd15(background: subprocess.Popen, workdir: Path, variants, cases, budget: Budget, report: Report) -> None:
    """Wait for the background export while the budget leaves room to use it, then check it."""
    reserve = min(v.cost_s["sd15"] for v in variants)
    try:
        code = background.wait(timeout=max(0.0, budget.remaining() - reserve))
    except subprocess.TimeoutExpired:
        report.results["notes"].append(f"sd15: not run: its build and export did not finish within the budget "
                                       f"(log: {workdir / 'sd15-prepare.log'}); run again on the same machine: "
                                       "it resumes from the work folder")
        return
    if code != 0:
        tail = (workdir / "sd15-prepare.log").read_text(errors="replace").strip().splitlines()[-1:]
        report.results["models"]["sd15"] = {"backends": {"export": {"status": f"FAILED: {' '.join(tail)}"}}}
        return
    check_model("sd15", workdir / "sd15-artifact", variants, cases, SIZES["sd15"], "cuda", budget, report)


if __name__ == "__main__":
    sys.exit(main())
