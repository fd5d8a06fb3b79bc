"""int8 denoisers side by side: UNet step time, image PSNR vs fp32 and file size.

    python benchmarks/int8.py [--base /tmp/diffrt-workers-sd15/artifact] [--workdir /tmp/diffrt-int8-sd15]
                              [--methods dynamic,static,weights,hybrid] [--rounds 3]
                              [--exclude conv_in,conv_out,time_embedding] [--calibration-prompts 12]

1. quantize: for each method, a copy of the fp32 artifact (hard links: the fp32 files are
   never written) gets its int8 UNet by `diffrt.export.quantize` (skipped when the
   copy already has one by that method).
2. time: every configuration -- ORT fp32, OpenVINO fp32, OpenVINO bf16 (where the CPU
   has AVX512-BF16/AMX), and each method's int8 UNet on ORT and on OpenVINO -- loads in
   turn (one at a time: memory) and generates one LCM 4-step 256x256 image after a
   warm-up one; the order is reversed every other round; the step time is the median
   of a round's denoiser calls, reported as the median over rounds.
3. image: the first round's image of each configuration against ORT fp32's (same seed,
   latents and prompt): PSNR in dB.

Writes benchmarks/results/int8-sd15.json and prints a table. Measures the machine as it
is: on a shared machine, say so (the JSON records the load average).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diffrt.artifacts import read_manifest  # noqa: E402
from diffrt.export.calibration import CalibrationSettings, default_prompts  # noqa: E402
from diffrt.export.passes import psnr  # noqa: E402
from diffrt.export.quantize import quantize_artifact  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
CALL = dict(num_inference_steps=4, scheduler="lcm", guidance_scale=1.0, height=256, width=256, seed=0,
            output_type="np")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> dict[str, Any]:
    model, flags = "", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}, "cores": len(os.sched_getaffinity(0)),
            "machine": platform.machine()}


def prepare(base: Path, workdir: Path, method: str, exclude: str, prompts: Path, steps: int) -> dict[str, Any]:
    """The artifact copy with `method`'s int8 UNet; what quantizing it took."""
    folder = workdir / method
    if folder.exists():
        manifest = read_manifest(folder)
        spec = manifest.stages.get("unet-int8")
        if spec is not None and spec.facts["int8"]["method"] == method:
            return {"folder": str(folder), "seconds": None, **_facts(folder)}
        shutil.rmtree(folder)
    shutil.copytree(base, folder, copy_function=os.link, ignore=shutil.ignore_patterns("engines"))
    t0 = time.perf_counter()
    quantize_artifact(folder, method=method, prompts=prompts, exclude=exclude, image_check=False,
                      settings=CalibrationSettings(steps=steps, height=256, width=256))
    return {"folder": str(folder), "seconds": round(time.perf_counter() - t0, 1), **_facts(folder)}


def _facts(folder: Path) -> dict[str, Any]:
    spec = read_manifest(folder).stages["unet-int8"]
    info = spec.facts["int8"]
    return {"unet_bytes": sum(f.size for f in spec.files), "excluded": info["excluded"], "error": info["error"],
            "tool": info["tool"]}


def configs(base: Path, prepared: dict[str, dict[str, Any]], bf16: bool) -> list[dict[str, Any]]:
    # no engine caches on disk (GBs per configuration): every load compiles; loads are not timed
    rows = [{"name": "ort fp32", "folder": base, "backend": "ort", "graph_precision": "fp32", "options": {}},
            {"name": "openvino fp32", "folder": base, "backend": "openvino", "graph_precision": "fp32",
             "options": {"precision": "fp32"}}]
    if bf16:
        rows.append({"name": "openvino bf16", "folder": base, "backend": "openvino", "graph_precision": "fp32",
                     "options": {"precision": "bf16"}})
    for method, info in prepared.items():
        rows.append({"name": f"ort int8-{method}", "folder": Path(info["folder"]), "backend": "ort",
                     "graph_precision": "int8", "options": {}})
        rows.append({"name": f"openvino int8-{method}", "folder": Path(info["folder"]), "backend": "openvino",
                     "graph_precision": "int8", "options": {"precision": "bf16" if bf16 else "fp32"}})
    for row in rows:
        row["options"]["disk_cache"] = False
    return rows


def run_once(config: dict[str, Any]) -> tuple[list[float], float, np.ndarray]:
    from diffrt import Pipeline

    t0 = time.perf_counter()
    with Pipeline.load(config["folder"], backend=config["backend"], graph_precision=config["graph_precision"],
                       verify="size", prepare={"height": 256, "width": 256, "guidance_scale": 1.0},
                       **config["options"]) as pipe:
        load = time.perf_counter() - t0
        pipe(PROMPT, **CALL)  # warm-up
        out = pipe(PROMPT, **CALL)
    return [float(t) for t in out.timings["denoiser_calls"]], load, out.images


def write_report(args, machine, prepared, rows, steps, images, loadavg, rounds_done: int) -> list[dict]:
    """The JSON so far (written after every round, so a stopped run keeps what it measured)."""
    reference = images["ort fp32"]
    fp32_bytes = sum(f.size for f in read_manifest(args.base).stages["unet"].files)
    results = []
    for config in rows:
        name = config["name"]
        method = name.split("int8-")[1] if "int8-" in name else None
        results.append({
            "config": name, "unet_step_s": round(statistics.median(steps[name]), 4),
            "unet_step_s_rounds": [round(s, 4) for s in steps[name]],
            "image_psnr_db_vs_ort_fp32": round(psnr(reference, images[name]), 2),
            "unet_bytes": prepared[method]["unet_bytes"] if method else fp32_bytes,
        })
    report = {
        "command": "python benchmarks/int8.py " + " ".join(sys.argv[1:]),
        "workload": {"prompt": PROMPT, **{k: v for k, v in CALL.items() if k != "output_type"}},
        "machine": {**machine, "load_average_during_runs": [round(min(loadavg), 2), round(max(loadavg), 2)],
                    "note": args.note},
        "quantization": {m: {k: v for k, v in p.items() if k != "folder"} for m, p in prepared.items()},
        "calibration": {"prompts": args.calibration_prompts, "steps": args.calibration_steps, "size": "256x256",
                        "exclude": args.exclude},
        "rounds_done": rounds_done,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("/tmp/diffrt-workers-sd15/artifact"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffrt-int8-sd15"))
    parser.add_argument("--methods", default="dynamic,static,weights,hybrid")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exclude", default="conv_in,conv_out,time_embedding")
    parser.add_argument("--calibration-prompts", type=int, default=12)
    parser.add_argument("--calibration-steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "int8-sd15.json")
    parser.add_argument("--note", help="what else ran on the machine during the measurement, for the JSON "
                                       "(the load average is recorded either way)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("diffrt.runtime", "nncf"):
        logging.getLogger(name).setLevel(logging.WARNING)

    args.workdir.mkdir(parents=True, exist_ok=True)
    prompts = args.workdir / "prompts.txt"
    prompts.write_text("\n".join(default_prompts()[: args.calibration_prompts]) + "\n")
    machine = cpu()
    prepared = {m: prepare(args.base, args.workdir, m, args.exclude, prompts, args.calibration_steps)
                for m in args.methods.split(",")}
    bf16 = machine["flags"]["avx512_bf16"] or machine["flags"]["amx_tile"]
    rows = configs(args.base, prepared, bf16)
    steps: dict[str, list[float]] = {r["name"]: [] for r in rows}
    loads: dict[str, list[float]] = {r["name"]: [] for r in rows}
    images: dict[str, np.ndarray] = {}
    loadavg = []
    for round_ in range(args.rounds):
        for config in rows if round_ % 2 == 0 else rows[::-1]:
            calls, load, image = run_once(config)
            steps[config["name"]].append(statistics.median(calls))
            loads[config["name"]].append(load)
            images.setdefault(config["name"], image)
            loadavg.append(os.getloadavg()[0])
            logging.info("round %d %s: %.3f s/step", round_ + 1, config["name"], steps[config["name"]][-1])
        write_report(args, machine, prepared, rows, steps, images, loadavg, rounds_done=round_ + 1)
    results = write_report(args, machine, prepared, rows, steps, images, loadavg, rounds_done=args.rounds)
    base_step = results[0]["unet_step_s"]
    print(f"{machine['model']}, {machine['cores']} cores; flags: "
          + " ".join(f for f, on in machine["flags"].items() if on))
    print(f"{'config':<26} {'UNet step s':>11} {'vs ort fp32':>11} {'PSNR dB':>8} {'UNet MB':>8}")
    for r in results:
        print(f"{r['config']:<26} {r['unet_step_s']:>11.3f} {base_step / r['unet_step_s']:>10.2f}x "
              f"{r['image_psnr_db_vs_ort_fp32']:>8.1f} {r['unet_bytes'] / 2**20:>8.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
