"""DeepCache end to end: uncached vs cache="deepcache:N" on an SD1.5-size random-weight model.

    python benchmarks/step_cache.py [--source /tmp/diffrt-workers-sd15] [--workdir /tmp/diffrt-step-cache-sd15]
                                    [--steps 20] [--size 256] [--interval 3] [--runs 3] [--backend ort]

--source: a folder with an SD1.5-size `checkpoint/` and its fp32 `artifact/` (what
`benchmarks/real_size_sd15.py --phases build,export --workdir DIR` writes). The artifact
is copied into --workdir with hard links (nothing of the source is written; the
manifest is replaced atomically, never written through a link), and DeepCache's full
and shallow UNet graphs (and their fused-attention forms) are added to the copy, as
`diffrt export --step-cache deepcache` would have written them.

Then one pipeline generates the same image (same prompt, seed, scheduler DDIM, CFG 7.5)
uncached and cached, alternating which goes first per round, one warm-up call each; the
median of the runs is reported with the image PSNR of the cached image against the
uncached one (random weights: the PSNR says how far the schedule moved, not quality).
Writes benchmarks/results/step_cache_sd15.json. Speeds on a shared machine: the load
average before and after is recorded beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "step_cache_sd15.json"


def add_deepcache(source: Path, workdir: Path, branch: int) -> Path:
    """workdir/artifact: source/artifact hard-linked, plus DeepCache's graphs."""
    from diffrt.artifacts import read_manifest, write_manifest
    from diffrt.export import deepcache
    from diffrt.families import get_family
    from diffrt.runtime.step_cache import exported_branch

    artifact = workdir / "artifact"
    if (artifact / "manifest.json").is_file():
        manifest = read_manifest(artifact)
        if exported_branch(manifest.stages, "unet") == branch:
            return artifact
        raise SystemExit(f"{artifact} holds other DeepCache graphs; remove it or use another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    staging = workdir / ".artifact-partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "artifact", staging, copy_function=os.link, ignore=shutil.ignore_patterns("engines"))
    manifest = read_manifest(staging)
    fam = get_family(manifest.family)
    stages, feeds = deepcache.export_stages(fam, source / "checkpoint", staging, manifest.opset, manifest.model, branch)
    stages.update(deepcache.derive_fused(stages, feeds, staging))
    write_manifest(staging, dataclasses.replace(manifest, stages={**manifest.stages, **stages}))
    os.replace(staging, artifact)
    return artifact


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/tmp/diffrt-workers-sd15", type=Path)
    parser.add_argument("--workdir", default="/tmp/diffrt-step-cache-sd15", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--results", default=DEFAULT_RESULTS, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from diffrt.bench import machine
    from diffrt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    artifact = add_deepcache(args.source, args.workdir, args.branch)
    prepare_s = time.perf_counter() - t0
    load_start = os.getloadavg()
    cache = f"deepcache:{args.interval}:{args.branch}"
    call = dict(prompt="a photo of an astronaut riding a horse on mars", num_inference_steps=args.steps,
                guidance_scale=7.5, height=args.size, width=args.size, seed=0, scheduler="ddim", output_type="np")
    configs = {"off": None, cache: cache}
    times: dict[str, list[dict]] = {name: [] for name in configs}
    images = {}
    with Pipeline.load(artifact, backend=args.backend, prepare={"height": args.size, "width": args.size}) as pipe:
        for name, value in configs.items():  # warm-up (the cached one opens its graphs here)
            t = time.perf_counter()
            images[name] = pipe(cache=value, **call).images
            print(f"warm-up {name}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
        for round_index in range(args.runs):
            order = list(configs) if round_index % 2 == 0 else list(reversed(configs))
            for name in order:
                result = pipe(cache=configs[name], **call)
                times[name].append({"total": result.timings["total"], "denoiser": result.timings["denoiser"],
                                    "vae_decoder": result.timings["vae_decoder"], "load_avg": os.getloadavg()[0]})
                print(f"round {round_index + 1} {name}: {result.timings['total']:.1f}s", file=sys.stderr)
        described = pipe.backend.describe()
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in ("total", "denoiser", "vae_decoder")}
               for name, runs in times.items()}
    import numpy as np

    report = {
        "benchmark": "step_cache_sd15",
        "command": "python benchmarks/step_cache.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "backend": described,
        "load_average_1min": {"before": load_start[0], "after": os.getloadavg()[0]},
        "note": "measured on a shared 2-core machine while other jobs ran (load averages above): compare the "
                "two configurations with each other (alternating order, same process), not with other runs",
        "settings": {k: v for k, v in call.items() if k != "output_type"} | {"cache": cache, "runs": args.runs},
        "model": "SD1.5-size random weights (" + str(args.source / "checkpoint") + ")",
        "prepare_seconds": round(prepare_s, 1),
        "runs": times, "median": medians,
        "speedup_end_to_end": medians["off"]["total"] / medians[cache]["total"],
        "speedup_denoiser": medians["off"]["denoiser"] / medians[cache]["denoiser"],
        "image_psnr_db_cached_vs_uncached": round(psnr(images[cache], images["off"]), 2),
        "image_max_abs_cached_vs_uncached": float(np.abs(images[cache] - images["off"]).max()),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("median", "speedup_end_to_end", "speedup_denoiser",
                                             "image_psnr_db_cached_vs_uncached", "load_average_1min")}, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
