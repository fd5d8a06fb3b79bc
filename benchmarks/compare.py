"""diffrt vs what users would pick instead, side by side, in one run on one machine.

    python benchmarks/compare.py [--quick] [--runners a,b] [--workloads W1-256,...]
                                 [--runs 3] [--workdir DIR] [--results DIR] [--tiny]

Every runner gets the same SD1.5-size random-weight checkpoint (built and exported by
benchmarks/real_size_sd15.py, once, in --workdir), the same prompt, initial latents,
steps and size. `--workloads W3-512` runs the SDXL workload instead, on an SDXL-size one
(benchmarks/real_size_sdxl.py; fp32 weights 13.9 GB, so its runners go one at a time on
a 24 GiB machine); one run measures one model. Runners: diffrt configurations
(harness/specs.py: one line each; int8 and DeepCache ones on artifact variants made once
by diffrt's own commands, "not available: <why>" until diffrt can make them), diffusers +
torch (fp32; bf16 where the CPU has bf16 instructions; with the DeepCache package),
optimum-onnx and optimum-intel (default, statically reshaped, hybrid int8), the peers in
their own venvs (`bash benchmarks/peers/setup.sh`). Each runner is its own process,
speaking JSON lines (peers/worker.py), so its peak RSS is its own. Runs alternate
round-robin between the runners alive at once (harness/schedule.py). Beside every speed,
the image's error against the fp32 reference image (PSNR, max abs; LCM's step noise is
diffrt's for every runner, so W1 compares too).

Writes benchmarks/results/compare-<tag>.json (everything), .md (tables) and .png (chart),
and benchmarks/results/flops_sd15.json or flops_sdxl.json (FLOPs, counted once). --tiny
runs the whole harness on a tiny random-weight checkpoint in seconds (for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import prepare, report, schedule  # noqa: E402
from harness.specs import (ARTIFACT_VARIANTS, DEFAULT_WORKLOADS, KINDS, MODELS, PROMPT, QUICK_WORKLOADS,  # noqa: E402
                           RUNNERS, SEED, WORKLOADS, tiny_workload)
from harness.workers import NOT_INSTALLED, mem_available_gib, runner_python, runner_script  # noqa: E402

from diffrt.runtime.cpu import cpu_info, installed_versions  # noqa: E402

DEFAULT_WORKDIR = Path("/tmp/diffrt-compare")
DEFAULT_RESULTS = HERE / "results"
DEFAULT_VENVS = Path(os.environ.get("DIFFRT_BENCH_VENVS", Path.home() / ".cache" / "diffrt-bench" / "venvs"))
PACKAGES = ("diffrt", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers", "matplotlib")
REFERENCE_ORDER = ("diffusers-fp32", "diffrt-ort")  # image error is measured against the first present (fp32)
# Every runner draws LCM's step noise as diffrt does (peers/diffusers_api.py), so W1's images compare too.
SAME_NOISE = "LCM step noise: row i from np.random.default_rng(seed + i), for every runner"
NO_BF16 = "not available: CPU has no bf16 instructions"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_WORKLOADS)} at batch 1 "
                        "(default budget 10 min)")
    parser.add_argument("--runners", help=f"comma-separated, from: {', '.join(RUNNERS)} (default: all)")
    parser.add_argument("--workloads", help=f"comma-separated, from: {', '.join(WORKLOADS)}, all on one model "
                        f"(default: the SD1.5 ones, {', '.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell after the warm-up (default 3)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"models, peer exports, caches, logs (default {DEFAULT_WORKDIR}; reused)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"output folder (default {DEFAULT_RESULTS})")
    parser.add_argument("--tiny", action="store_true", help="a tiny random-weight checkpoint: seconds, for tests")
    parser.add_argument("--venv-root", type=Path, default=DEFAULT_VENVS,
                        help=f"the peers' venvs (default {DEFAULT_VENVS}, or $DIFFRT_BENCH_VENVS)")
    parser.add_argument("--budget-min", type=float, help="no run starts after this many minutes of measuring "
                        "(default 30; 10 with --quick)")
    parser.add_argument("--cell-budget", type=float, default=60.0,
                        help="runs after the first of a cell only while they fit in this many seconds (default 60)")
    parser.add_argument("--worker-gib", type=float,
                        help="memory one runner process may need (default: each runner's estimate in "
                             "harness/specs.py; 0.5 with --tiny); another starts only while that much plus room "
                             "for the live ones to grow is free")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one request may take (default 1800)")
    parser.add_argument("--tag", help="output name: compare-TAG.* (default: tiny, quick, full or custom; "
                        "for SDXL tiny-sdxl, sdxl or sdxl-custom)")
    parser.add_argument("--report-from", type=Path, metavar="JSON",
                        help="measure nothing: summarize an earlier run's JSON again with this report code "
                             "(its raw runs unchanged; images read from its workdir) and rewrite its .json/.md/.png")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    args.runner_names = _selection(parser, "--runners", args.runners, RUNNERS)
    names = list(QUICK_WORKLOADS) if args.quick and not args.workloads else None
    args.workload_names = names or _selection(parser, "--workloads", args.workloads, WORKLOADS, DEFAULT_WORKLOADS)
    models = {name: WORKLOADS[name].model for name in args.workload_names}
    if len(set(models.values())) > 1:
        parser.error(f"--workloads: one model per run, got {', '.join(f'{n} ({m})' for n, m in models.items())}")
    args.model = next(iter(models.values()))
    if args.budget_min is None:
        args.budget_min = 10.0 if args.quick else 30.0
    if args.worker_gib is None and args.tiny:
        args.worker_gib = 0.5
    if args.tag is None:
        if args.model == "sd15":
            custom = args.runners or args.workloads or args.runs != 3
            args.tag = "tiny" if args.tiny else ("custom" if custom else ("quick" if args.quick else "full"))
        else:  # its own names: an SDXL run never overwrites the SD1.5 results (--workloads is always given)
            custom = args.runners or args.runs != 3 or args.quick
            args.tag = f"tiny-{args.model}" if args.tiny else (f"{args.model}-custom" if custom else args.model)
    args.workdir = args.workdir.expanduser().resolve()
    args.results = args.results.expanduser().resolve()
    return args


def _selection(parser: argparse.ArgumentParser, flag: str, text: str | None, table: dict,
               default: tuple[str, ...] | None = None) -> list[str]:
    if not text:
        return list(table if default is None else default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(table)}")
    return names


def growth_gib(args: argparse.Namespace, cells: list[schedule.Cell]) -> float:
    """Room each live runner needs beyond its 256x256 estimate: activations grow with
    pixels x batch (ORT's arena keeps its peak), about 0.5 GiB per 256x256 image at SD1.5
    size (diffrt-ort: 8.45 GiB at 512x512 with CFG vs ~4.3 GiB at 256x256).

    Calibrated for SD1.5, and safe as it is for SDXL: the SDXL estimates
    (RunnerSpec.sdxl_memory_gib) are already for W3-512's 512x512, so this only adds
    margin (2 GiB per live runner at 512x512, batch 1), and a second SDXL runner (16+
    GiB next to one holding 14 GB of weights) never starts on a 24 GiB machine anyway."""
    if args.tiny:
        return 0.0
    largest = max(c.workload.height * c.workload.width * c.workload.denoiser_batch(c.batch) for c in cells)
    return max(1.0, 0.5 * largest / (256 * 256))


def cells_for(args: argparse.Namespace) -> list[schedule.Cell]:
    cells = []
    for name in args.workload_names:
        workload = tiny_workload(WORKLOADS[name]) if args.tiny else WORKLOADS[name]
        for batch in ((1,) if args.quick else workload.batches):
            cells.append(schedule.Cell(workload, batch))
    return cells


# --- before measuring -----------------------------------------------------------------


def initial_state(name: str, venv_root: Path) -> schedule.RunnerState:
    spec = RUNNERS[name]
    status = "ok"
    if spec.requires_bf16 and not cpu_info().has_bf16:
        status = NO_BF16
    elif runner_python(spec, venv_root) is None:
        status = NOT_INSTALLED
    result = {"name": name, "kind": spec.kind, "description": spec.description, "options": spec.options,
              "decoder": spec.decoder, "denoiser": spec.denoiser,
              "status": status, "info": {}, "processes": [], "cells": {},
              "cold_start": {"empty_cache": None,
                             "warm_cache": None if spec.cache_option else "n/a: no engine cache"}}
    return schedule.RunnerState(spec, result)


def prepare_peers(states: list[schedule.RunnerState], models: prepare.Models, args) -> dict[str, Path]:
    """Each peer kind's own conversion of the checkpoint, once; a failure marks its runners."""
    dirs: dict[str, Path] = {}
    done: dict[str, dict[str, Any] | str] = {}
    for state in states:
        kind = state.spec.kind
        if state.result["status"] != "ok" or KINDS[kind].model != "peer":
            continue
        if kind not in done:
            out = models.folder / "peer-models" / kind  # per model: WORKDIR/sd15, sdxl, tiny, tiny-sdxl
            log(f"{kind}: its own export of the checkpoint (made once, then reused): {out}")
            try:
                done[kind] = prepare.prepare_peer(runner_python(state.spec, args.venv_root), runner_script(state.spec),
                                                  models.peer_checkpoint, out, args.workdir / "logs" / f"prepare-{kind}.log",
                                                  args.run_timeout * 2)
                dirs[kind] = out
            except RuntimeError as exc:
                done[kind] = f"failed: {exc}"
        if isinstance(done[kind], str):
            state.result["status"] = done[kind]
        else:
            state.result["prepare"] = done[kind]
    return dirs


def prepare_variants(states: list[schedule.RunnerState], models: prepare.Models, args) -> dict[str, Path]:
    """diffrt's artifact variants the selected runners need (int8, DeepCache), each made
    once; one diffrt cannot make yet marks its runners "not available: <why>"."""
    dirs: dict[str, Path] = {}
    done: dict[str, Path | str] = {}
    for state in states:
        variant = state.spec.artifact
        if variant is None or state.result["status"] != "ok":
            continue
        if variant not in done:
            log(f"diffrt artifact variant {variant}: {' '.join(ARTIFACT_VARIANTS[variant].command)} (made once)")
            try:
                done[variant] = prepare.prepare_variant(models, ARTIFACT_VARIANTS[variant],
                                                        args.workdir / "logs" / f"prepare-artifact-{variant}.log",
                                                        args.run_timeout * 2)
                dirs[f"artifact:{variant}"] = done[variant]
            except prepare.VariantUnavailable as exc:
                done[variant] = f"not available: {exc}"
        if isinstance(done[variant], str):
            state.result["status"] = done[variant]
    return dirs


def measure_gemm(tiny: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "harness" / "machine.py")] + (["--n", "512", "--repeats", "2"] if tiny else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, check=True)
    return json.loads(proc.stdout)


def best_gemm(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """The ceiling: per figure, the best of the measurements (taken before and after the
    runners, so one taken while a neighbour was busy does not set it)."""
    best = dict(measurements[0])
    for m in measurements[1:]:
        for key, value in m.items():
            if key.endswith("_gflops") and isinstance(value, float) and isinstance(best.get(key), float):
                best[key] = max(best[key], value)
    best.pop("others_cpu_share", None)  # per measurement, in "measurements"
    return {**best, "measurements": measurements}


def count_flops(args, models: prepare.Models, cells: list[schedule.Cell]) -> dict[str, Any]:
    import flops

    unet = {(c.workload.denoiser_batch(c.batch), c.workload.height, c.workload.width) for c in cells}
    vae = {(c.batch, c.workload.height, c.workload.width) for c in cells}
    sdxl = models.model in ("sdxl", "sd35m")  # SDXL-size default shapes
    if args.tiny:
        out = args.workdir / ("flops_tiny.json" if models.model == "sd15" else f"flops_tiny_{models.model}.json")
    else:  # the SD1.5 table the benchmark README quotes (batch 1 and 2 at 256 and 512); SDXL's at 512 and 1024
        out = args.results / f"flops_{models.model}.json"
        unet |= {flops.parse_shape(s) for s in (flops.DEFAULT_UNET_SDXL if sdxl else flops.DEFAULT_UNET)}
        vae |= {flops.parse_shape(s) for s in (flops.DEFAULT_VAE_SDXL if sdxl else flops.DEFAULT_VAE)}
    data = flops.read_flops(out, models.checkpoint)
    if flops.missing(data, sorted(unet), sorted(vae)):
        log(f"counting FLOPs -> {out}")
        subprocess.run([sys.executable, str(HERE / "flops.py"), "--checkpoint", str(models.checkpoint), "--out", str(out),
                        "--unet", ",".join("x".join(map(str, s)) for s in sorted(unet)),
                        "--vae", ",".join("x".join(map(str, s)) for s in sorted(vae))],
                       check=True, stdout=subprocess.DEVNULL)
        data = flops.read_flops(out, models.checkpoint)
    return {**data, "file": str(out)}


def machine_info() -> dict[str, Any]:
    cpu = cpu_info()
    mem_total = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total = round(int(line.split()[1]) / 2**20, 1)
    versions = installed_versions(PACKAGES)
    return {"cpu": {**cpu.to_json(), "describe": cpu.describe()}, "memory_gib": mem_total,
            "memory_available_gib_at_start": round(mem_available_gib(), 1),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "platform": platform.platform(), "main_venv_versions": versions}


# --- main -----------------------------------------------------------------------------


def summarize(result: dict[str, Any], workloads: dict[str, Any]) -> None:
    """Per-cell summaries and image agreement from the raw runs in `result`."""
    for r in result["runners"].values():
        r["summary"] = {key: report.summarize_cell(cell, workloads[cell["workload"]], result["flops"], result["gemm"],
                                                   result["settings"]["runs"], decoder=r.get("decoder", "full"),
                                                   denoiser=r.get("denoiser", "full"))
                        for key, cell in r["cells"].items()}
    result["image_agreement"] = report.image_agreement(result["runners"], REFERENCE_ORDER,
                                                       same_noise=bool(result["settings"].get("same_noise")))


def report_again(path: Path, folder: Path) -> int:
    result = json.loads(path.read_text())
    tiny = result["model"]["description"].startswith("tiny")
    result["model"].setdefault("name", "sd15")  # runs from before SDXL was measured
    for name, r in result["runners"].items():
        r.setdefault("decoder", RUNNERS[name].decoder if name in RUNNERS else "full")  # runs before it was recorded
        r.setdefault("denoiser", RUNNERS[name].denoiser if name in RUNNERS else "full")
    summarize(result, {name: tiny_workload(w) if tiny else w for name, w in WORKLOADS.items()})
    result["reported_again"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_outputs(result, folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from:
        return report_again(args.report_from, args.results)
    started = time.perf_counter()
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cells = cells_for(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    states = [initial_state(name, args.venv_root) for name in args.runner_names]

    models = prepare.prepare_models(args.workdir, args.tiny, log, model=args.model)
    model_dirs = {"artifact": models.artifact, "checkpoint": models.checkpoint,
                  **prepare_peers(states, models, args), **prepare_variants(states, models, args)}
    latents = {}
    for cell in cells:
        w = cell.workload
        latents[(w.height, w.width, cell.batch)] = prepare.write_latents(
            args.workdir / "inputs", models.latent_channels, w.height // models.vae_scale_factor,
            w.width // models.vae_scale_factor, cell.batch, SEED)
    log("measuring dense GEMM throughput")
    gemm_before = measure_gemm(args.tiny)
    flops_data = count_flops(args, models, cells)
    prepared = time.perf_counter()

    plan = schedule.Plan(cells=cells, runs=args.runs, cell_budget_s=args.cell_budget,
                         deadline=prepared + 60 * args.budget_min, run_timeout_s=args.run_timeout,
                         memory_gib=args.worker_gib, growth_gib=growth_gib(args, cells), workdir=args.workdir,
                         venv_root=args.venv_root, model_dirs=model_dirs, latents=latents,
                         vae_scale_factor=models.vae_scale_factor, log=log)
    times = {"started": started, "prepared": prepared}
    # After each group, what is measured so far (runners still to come: "not run yet"), so
    # a run stopped midway (a large model: ~10 min per runner) leaves its finished rows.
    plan.after_group = lambda groups: write_outputs(
        build_result(args, date, cells, states, groups, plan, best_gemm([gemm_before]), flops_data, models,
                     {**times, "finished": time.perf_counter()}, partial=True), args.results, quiet=True)
    groups = schedule.run_all(plan, states)
    times["finished"] = time.perf_counter()
    if args.tiny:  # seconds of work: nothing to drift over
        gemm = best_gemm([gemm_before])
    else:
        log("measuring dense GEMM throughput again")
        gemm = best_gemm([gemm_before, measure_gemm(args.tiny)])
    write_outputs(build_result(args, date, cells, states, groups, plan, gemm, flops_data, models, times),
                  args.results)
    return 0


def build_result(args, date: str, cells: list[schedule.Cell], states: list[schedule.RunnerState],
                 groups: list[list[str]], plan: schedule.Plan, gemm: dict[str, Any], flops_data: dict[str, Any],
                 models: prepare.Models, times: dict[str, float], partial: bool = False) -> dict[str, Any]:
    """The run's JSON. partial: written between groups; runners not measured yet say so
    (copies: the states themselves are left as they are)."""
    workloads = list({c.workload.name: c.workload for c in cells}.values())
    done = {name for group in groups for name in group}
    runners = {}
    for state in states:
        r = state.result
        peaks = [p["peak_rss_gib"] for p in r["processes"] if p["peak_rss_gib"] is not None]
        r["peak_rss_gib"] = max(peaks) if peaks else None
        if partial and r["status"] == "ok" and state.spec.name not in done:
            r = {**r, "status": "not run yet (partial result: written after a group, before the run ended)"}
        runners[state.spec.name] = r
    result = {
        "benchmark": "compare",
        "mode": args.tag,
        **({"partial": f"written after group {len(groups)}; the run had not finished"} if partial else {}),
        "date_utc": date,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "gemm": gemm,
        "flops": flops_data,
        "model": {"name": args.model, "description": MODELS[args.model][1 if args.tiny else 0],
                  "checkpoint": str(models.checkpoint), "artifact": str(models.artifact)},
        "settings": {"prompt": PROMPT, "seed": SEED, "same_noise": SAME_NOISE, "runs": args.runs,
                     "budget_minutes": args.budget_min,
                     "cell_budget_seconds": args.cell_budget, "worker_gib": args.worker_gib,
                     "growth_gib": plan.growth_gib,
                     "venv_root": str(args.venv_root), "workdir": str(args.workdir)},
        "workloads": [{**w.to_json(), "batches": sorted({c.batch for c in cells if c.workload.name == w.name})}
                      for w in workloads],
        "groups": groups,
        "sequence": [list(item) for item in plan.sequence],
        "wall_seconds": {"prepare": round(times["prepared"] - times["started"], 1),
                         "measure": round(times["finished"] - times["prepared"], 1),
                         "total": round(time.perf_counter() - times["started"], 1)},
        "runners": runners,
    }
    summarize(result, {w.name: w for w in workloads})
    return result


def write_outputs(result: dict[str, Any], folder: Path, quiet: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"compare-{result['mode']}"
    text = report.markdown(result)
    stem.with_suffix(".md").write_text(text)
    png = stem.with_suffix(".png")
    png.unlink(missing_ok=True)  # never leave an older run's chart beside this run's tables
    drawn = report.chart(result, png)
    result["chart"] = str(png) if drawn else "not drawn: matplotlib is not installed"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        print(text)
    log(f"wrote {stem}.json, .md{', .png' if drawn else ''} ({result['wall_seconds']['total']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
