"""The `diffrt` command: export, generate, bench, inspect, demo.

User mistakes print one line (`error: ...`) and exit with status 2; progress and
logs go to stderr; results (paths, timings, JSON) go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from diffrt import __version__
from diffrt.errors import DiffrtError


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


def _progress_bar(label: str):
    def report(step: int, total: int) -> None:
        filled = int(30 * step / total)
        print(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {step}/{total}", end="", file=sys.stderr, flush=True)
        if step == total:
            print(file=sys.stderr)

    return report


def _print_timings(timings: dict) -> None:
    steps = timings.get("denoiser_steps", [])
    per_step = statistics.median(steps) if steps else 0.0
    print(
        f"timings: text_encoder {timings['text_encoder']:.3f}s | denoiser {timings['denoiser']:.3f}s "
        f"({len(steps)} steps, {per_step:.3f}s/step) | vae_decoder {timings['vae_decoder']:.3f}s | "
        f"total {timings['total']:.3f}s"
    )


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def cmd_export(args: argparse.Namespace) -> None:
    from diffrt.export import export

    manifest = export(args.src, args.out, family=args.family, precision=args.precision, opset=args.opset,
                      overwrite=args.overwrite)
    for name, stage in manifest.stages.items():
        print(f"{name}: {stage.graph_path} (max abs error vs torch {stage.max_abs_error:.2e})")
    print(f"wrote {args.out}")


def _generate(args: argparse.Namespace, folder: Path, output: Path) -> None:
    from diffrt.runtime.pipeline import Pipeline

    height, width = args.size if args.size else (None, None)
    with Pipeline.load(folder, backend=args.backend, verify=not args.no_verify) as pipe:
        settings = pipe.resolve(args.preset, args.scheduler, args.steps, args.cfg, height, width)
        print(
            f"generating {args.n} image(s) {settings.width}x{settings.height}, {settings.scheduler}, "
            f"{settings.num_inference_steps} steps, guidance {settings.guidance_scale:g}, backend {pipe.backend.describe()}",
            file=sys.stderr,
        )
        result = pipe(
            args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
            height=height, width=width, num_images_per_prompt=args.n, seed=args.seed, scheduler=args.scheduler,
            preset=args.preset, callback=_progress_bar("denoising"),
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(result.images, _output_paths(output, len(result.images)), strict=True):
        image.save(path)
        print(f"wrote {path}")
    _print_timings(result.timings)


def cmd_generate(args: argparse.Namespace) -> None:
    output = Path(args.output)
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise DiffrtError(f"-o {output}: use a .png, .jpg or .webp file name")
    _generate(args, Path(args.out), output)


def cmd_bench(args: argparse.Namespace) -> None:
    from diffrt.runtime.pipeline import Pipeline

    height, width = args.size if args.size else (None, None)
    with Pipeline.load(args.out, backend=args.backend, verify=not args.no_verify) as pipe:
        settings = pipe.resolve(args.preset, args.scheduler, args.steps, args.cfg, height, width)
        call = dict(num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                    height=settings.height, width=settings.width, scheduler=settings.scheduler,
                    num_images_per_prompt=args.batch, seed=0, output_type="np")
        pipe("warm-up", **call)
        runs = []
        for i in range(args.runs):
            t = pipe("a photo of an astronaut riding a horse", **call).timings
            runs.append(t)
            print(f"run {i + 1}/{args.runs}: {t['total']:.3f}s", file=sys.stderr)
    median = {k: statistics.median(r[k] for r in runs) for k in ("text_encoder", "denoiser", "vae_decoder", "total")}
    median["denoiser_per_step"] = statistics.median(s for r in runs for s in r["denoiser_steps"])
    report = {"artifact": str(args.out), "backend": pipe.backend.describe(), "batch": args.batch,
              "settings": settings.__dict__, "runs": args.runs, "median_seconds": median}
    print(json.dumps(report, indent=2))
    print("\n| stage | median s |\n|---|---|")
    for key, value in median.items():
        print(f"| {key} | {value:.4f} |")


def cmd_inspect(args: argparse.Namespace) -> None:
    from diffrt.artifacts import read_manifest

    manifest = read_manifest(args.out)
    print(f"{args.out}: {manifest.pipeline_class} (family {manifest.family}), {manifest.precision}, opset {manifest.opset}")
    print(f"source: {manifest.source.get('id')} sha256 {manifest.source.get('sha256', '')[:16]}")
    for name, stage in manifest.stages.items():
        size = sum(f.size for f in stage.files) / 2**20
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in stage.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in stage.outputs)
        print(f"  {name}: {size:.1f} MB, err {stage.max_abs_error:.1e}; in: {ins}; out: {outs}")
    print(f"defaults: {json.dumps(manifest.defaults)}")
    print(f"versions: {json.dumps(manifest.versions)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sd

    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="diffrt-demo-"))
    checkpoint, artifact = workdir / "checkpoint", workdir / "artifact"
    t0 = time.perf_counter()
    print(f"1/3 building a tiny random-weight {args.kind} checkpoint in {checkpoint}", file=sys.stderr)
    make_tiny_sd(checkpoint, kind=args.kind, sample_size=64)
    print(f"2/3 exporting it to {artifact}", file=sys.stderr)
    export(checkpoint, artifact, overwrite=True)
    print("3/3 generating", file=sys.stderr)
    args.out, args.size, args.n = artifact, None, 1
    _generate(args, artifact, Path(args.output))
    print(f"demo finished in {time.perf_counter() - t0:.1f}s (random weights: the image is noise-like by design)")


def _add_generation_args(p: argparse.ArgumentParser, with_prompt: bool = True) -> None:
    if with_prompt:
        p.add_argument("prompt")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: preset/checkpoint)")
    p.add_argument("--cfg", type=float, default=None, help="guidance_scale (<= 1 disables CFG)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--scheduler", default=None, help="ddim, pndm, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_karras, lcm")
    p.add_argument("--preset", default=None, help="full-30step, lcm-4step")
    p.add_argument("--backend", default="ort")
    p.add_argument("--no-verify", action="store_true",
                   help="check file sizes only, not sha256 (faster start for large models)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a diffusers checkpoint to ONNX")
    p.add_argument("src", help="local diffusers folder or hub id")
    p.add_argument("out", help="artifact folder to write")
    p.add_argument("--family", default="auto")
    p.add_argument("--precision", default="fp32", help="fp32 (fp16/bf16: not yet)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate images from an artifact folder")
    p.add_argument("out", help="artifact folder")
    _add_generation_args(p)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8")
    p.add_argument("-n", type=int, default=1, help="images per prompt")
    p.add_argument("-o", "--output", default="out.png")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="time the pipeline stages (JSON + table)")
    p.add_argument("out", help="artifact folder")
    _add_generation_args(p, with_prompt=False)
    p.add_argument("--size", type=_size, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="describe an artifact folder")
    p.add_argument("out")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="tiny random checkpoint -> export -> image, offline")
    p.add_argument("--dir", default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--kind", default="sd15", choices=("sd15", "sd2", "lcm"))
    p.add_argument("-o", "--output", default="demo.png")
    _add_generation_args(p, with_prompt=False)
    p.set_defaults(func=cmd_demo, prompt="a photo of an astronaut riding a horse on mars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except DiffrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
