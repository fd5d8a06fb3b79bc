"""The GPU check: every installed GPU backend, against the torch backend and diffusers.

    bash benchmarks/gpu_check.sh                  # on a machine with one NVIDIA GPU, <= 10 minutes
    python benchmarks/gpu_check.py --device cpu   # the same script on a CPU (a smoke run; CI runs it)

1. Builds a tiny random-weight SD checkpoint and, unless --quick, an SD1.5-size one
   (real architecture, random weights: benchmarks/real_size_sd15.py), and exports both
   with fp16 graphs beside the fp32 ones.
2. For each backend installed here — torch (the baseline and oracle: the source
   checkpoint's diffusers modules in fp16 with SDPA), ort-cuda (onnxruntime-gpu, CUDA
   provider, IOBinding), ort-trt (its TensorRT provider), tensorrt (`diffrt build` engines,
   CuPy buffers) — it runs 512x512 at 4 steps without CFG and at 30 steps with CFG,
   and times every stage with a device synchronize after each call (the pipeline's own
   timings do not synchronize: device work is asynchronous).
3. Checks each backend's image against the torch backend's (same seed, same latents)
   and the torch backend's against diffusers' own pipeline on the same weights (when
   diffusers is installed), as max abs difference on the [0, 1] scale.
4. Prints the per-stage table (text encoder, denoiser per call, VAE decoder, end to
   end, denoiser it/s) and writes benchmarks/results/gpu_check.json.

A backend whose library is missing is reported as such, not failed. Nothing here
asserts a speed: the numbers are measured, side by side, in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffrt.runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse"
# name -> (Pipeline.load backend, backend options, needs TensorRT engines built first)
GPU_BACKENDS = {
    "torch": ("torch", {"device": "cuda", "dtype": "fp16"}, False),
    "ort-cuda": ("ort", {"device": "cuda"}, False),
    "ort-trt": ("ort", {"device": "tensorrt"}, False),
    "tensorrt": ("tensorrt", {}, True),
}
CPU_BACKENDS = {
    "torch": ("torch", {"device": "cpu", "dtype": "fp32"}, False),
    "ort": ("ort", {}, False),
    "ort-iobinding": ("ort", {"io_binding": True}, False),
}


def synchronize() -> None:
    """Wait for the device's queued work, in whatever library has it."""
    for name in ("cupy", "torch"):
        module = sys.modules.get(name)
        if module is None:
            continue
        try:
            if name == "cupy":
                module.cuda.runtime.deviceSynchronize()
            elif module.cuda.is_available():
                module.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a library without a device: nothing to wait for
            pass


class StageTimer:
    """Wraps a pipeline's sessions: each call is timed up to a device synchronize."""

    def __init__(self, pipe: Pipeline):
        self.calls: dict[str, list[float]] = {}
        for key, session in pipe._sessions.items():
            session.run = self._timed(key, session.run)

    def _timed(self, key: str, run):
        def timed(feeds):
            synchronize()
            t0 = time.perf_counter()
            out = run(feeds)
            synchronize()
            self.calls.setdefault(key, []).append(time.perf_counter() - t0)
            return out
        return timed

    def reset(self) -> None:
        self.calls = {}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["compute_capability"] = f"{props.major}.{props.minor}"
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    for name in ("cupy", "onnxruntime", "tensorrt", "diffusers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed (or no libraries): reported as absent
            info[name] = None
    try:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    from diffrt.runtime.cpu import cpu_info

    cpu = cpu_info()
    info["cpu"] = cpu.model
    return info


def make_models(workdir: Path, quick: bool, precision: str) -> dict[str, Path]:
    """{model name: artifact folder}; checkpoints are written once and reused."""
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sd

    models = {}
    tiny_ckpt, tiny_art = workdir / "tiny-checkpoint", workdir / "tiny-artifact"
    if not (tiny_art / "manifest.json").is_file():
        make_tiny_sd(tiny_ckpt, kind="sd15", sample_size=32)
        export(tiny_ckpt, tiny_art, precision=precision, overwrite=True)
    models["tiny"] = tiny_art
    if not quick:
        from real_size_sd15 import StepTracker, build_checkpoint

        ckpt, art = workdir / "sd15-checkpoint", workdir / "sd15-artifact"
        if not (ckpt / "model_index.json").is_file():
            t0 = time.perf_counter()
            build_checkpoint(ckpt, seed=0, tracker=StepTracker())
            print(f"built the SD1.5-size checkpoint in {time.perf_counter() - t0:.0f}s", flush=True)
        if not (art / "manifest.json").is_file():
            t0 = time.perf_counter()
            export(ckpt, art, precision=precision, overwrite=True)
            print(f"exported it in {time.perf_counter() - t0:.0f}s", flush=True)
        models["sd15"] = art
    return models


def build_trt(artifact: Path, size: int) -> None:
    from diffrt.runtime.tensorrt_build import build_plan, plan_build, require_tensorrt

    require_tensorrt()
    plan = plan_build(artifact, batch="1", size=(size, size))
    build_plan(plan, progress=lambda line: print(f"  {line}", flush=True))


def run_case(pipe: Pipeline, timer: StageTimer, steps: int, guidance: float, size: int, latents) -> dict[str, Any]:
    args = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=0,
                output_type="np", latents=latents, scheduler="euler")
    pipe(PROMPT, **{**args, "num_inference_steps": 1})  # warm-up: kernels, engines, graph capture
    timer.reset()
    synchronize()
    t0 = time.perf_counter()
    out = pipe(PROMPT, **args)
    synchronize()
    total = time.perf_counter() - t0
    denoiser = timer.calls.get("unet", [])
    per_call = statistics.median(denoiser) if denoiser else float("nan")
    return {
        "image": out.images,
        "text_encoder_s": sum(timer.calls.get("text_encoder", [])),
        "denoiser_call_s": per_call,
        "denoiser_calls": len(denoiser),
        "vae_decoder_s": sum(timer.calls.get("vae_decoder", [])),
        "total_s": total,
        "denoiser_it_per_s": 1.0 / per_call if denoiser else None,
    }


def diffusers_image(checkpoint: Path, device: str, steps: int, guidance: float, size: int, latents) -> np.ndarray:
    """diffusers' own pipeline on the same weights and latents (the torch backend's oracle)."""
    import diffusers
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=dtype).to(device)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
               latents=torch.from_numpy(latents).to(device, dtype), output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def check_model(name: str, artifact: Path, backends: dict, cases: list[tuple[int, float]], size: int,
                device: str) -> dict[str, Any]:
    from diffrt.artifacts import read_manifest

    manifest = read_manifest(artifact)
    factor = int(manifest.model["vae_scale_factor"])
    latents = np.random.default_rng(0).standard_normal((1, 4, size // factor, size // factor), dtype=np.float32)
    result: dict[str, Any] = {"artifact": str(artifact), "size": size, "backends": {}}
    images: dict[tuple[str, int], np.ndarray] = {}
    for label, (backend, options, needs_build) in backends.items():
        entry: dict[str, Any] = {}
        result["backends"][label] = entry
        try:
            if needs_build:
                build_trt(artifact, size)
            t0 = time.perf_counter()
            with Pipeline.load(artifact, backend=backend, **options) as pipe:
                entry["load_s"] = time.perf_counter() - t0
                entry["describe"] = pipe.backend.describe()
                timer = StageTimer(pipe)
                for steps, guidance in cases:
                    case = run_case(pipe, timer, steps, guidance, size, latents)
                    images[(label, steps)] = case.pop("image")
                    entry[f"{steps}steps"] = case
        except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the others' numbers
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            entry["error"] = f"{type(exc).__name__}: {first}"
            if "not installed" not in first and "has no" not in first:
                traceback.print_exc()
            print(f"[{name}] {label}: {entry['error']}", flush=True)
    oracle = "torch"
    for (label, steps), image in images.items():
        if label != oracle and (oracle, steps) in images:
            diff = float(np.abs(image - images[(oracle, steps)]).max())
            result["backends"][label][f"{steps}steps"]["max_abs_diff_vs_torch"] = diff
    try:
        checkpoint = Path(manifest.source["path"])
        for steps, guidance in cases:
            if (oracle, steps) in images:
                reference = diffusers_image(checkpoint, device, steps, guidance, size, latents)
                diff = float(np.abs(images[(oracle, steps)] - reference).max())
                result["backends"][oracle][f"{steps}steps"]["max_abs_diff_vs_diffusers"] = diff
    except ImportError:
        result["diffusers"] = "not installed: the torch backend was not compared with diffusers"
    return result


def table(results: dict[str, Any]) -> str:
    lines = ["| model | backend | steps | text encoder ms | denoiser ms/call | calls | VAE ms | total s | "
             "denoiser it/s | max diff vs torch | torch vs diffusers |", "|" + "---|" * 11]
    for model, result in results["models"].items():
        for label, entry in result["backends"].items():
            if "error" in entry:
                lines.append(f"| {model} | {label} | - | {entry['error']} |" + " |" * 7)
                continue
            for key, case in entry.items():
                if not key.endswith("steps"):
                    continue

                def fmt(value, scale=1.0, digits=1):
                    return "-" if value is None else f"{value * scale:.{digits}f}"

                lines.append(
                    f"| {model} | {label} | {key[:-5]} | {fmt(case['text_encoder_s'], 1e3)} | "
                    f"{fmt(case['denoiser_call_s'], 1e3)} | {case['denoiser_calls']} | "
                    f"{fmt(case['vae_decoder_s'], 1e3)} | {fmt(case['total_s'], digits=3)} | "
                    f"{fmt(case['denoiser_it_per_s'])} | {fmt(case.get('max_abs_diff_vs_torch'), digits=5)} | "
                    f"{fmt(case.get('max_abs_diff_vs_diffusers'), digits=5)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffrt-gpu-check"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same flow on CPU backends (a smoke run of this script)")
    parser.add_argument("--quick", action="store_true", help="the tiny model only (no SD1.5-size export)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512; 64 with --device cpu)")
    parser.add_argument("--backends", default=None, help="comma-separated subset of the backends")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/gpu_check.json")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    backends = dict(GPU_BACKENDS if gpu else CPU_BACKENDS)
    if args.backends:
        chosen = [b.strip() for b in args.backends.split(",")]
        unknown = set(chosen) - set(backends)
        if unknown:
            parser.error(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from {', '.join(backends)}")
        backends = {b: backends[b] for b in chosen}
    size = args.size or (512 if gpu else 64)
    cases = [(4, 1.0), (30, 7.5)] if gpu else [(2, 1.0), (3, 7.5)]
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": args.device,
                               "cases": [{"steps": s, "guidance_scale": g} for s, g in cases], "models": {}}
    print(json.dumps(results["machine"]), flush=True)
    models = make_models(args.workdir, args.quick or not gpu, "fp16" if gpu else "fp32")
    for name, artifact in models.items():
        model_size = size if name != "tiny" else min(size, 128)
        results["models"][name] = check_model(name, artifact, backends, cases, model_size, args.device)
    results["wall_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=float))
    print(table(results))
    print(f"wrote {args.output} ({results['wall_s']:.0f}s)")
    failed = [f"{m}/{b}" for m, r in results["models"].items() for b, e in r["backends"].items()
              if "error" in e and "not installed" not in e["error"] and "has no" not in e["error"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
