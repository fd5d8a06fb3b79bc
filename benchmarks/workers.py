"""Workers: the memory a second worker adds and the images/s of 1 vs 2 workers, on each
CPU backend, side by side in one run, on the SD1.5-size model.

    python benchmarks/workers.py [--workdir /tmp/diffrt-real-size] [--size 256x256] [--steps 4] [--images 4]
                                [--rounds 2]

The artifact is the one benchmarks/real_size_sd15.py exports (random weights, SD1.5's
architecture) in --workdir/artifact; with --prepare this script runs that script's
build and export phases first. Each backend first loads once in a subprocess of its
own ("prime": ONNX Runtime saves its optimized graphs, OpenVINO its compiled blobs), so
that every measured run starts from the same warm engine cache. Then, for each backend
(ort, openvino) and each worker count (1, 2), one subprocess (its memory its own):

1. `Pipeline.load(artifact, backend, workers=N, prepare=size)`, then one warm-up image
   per worker (first calls allocate and, on OpenVINO, create the requests).
2. "one": the pipeline alone generates --images images one after another (seed i for
   image i): images/s, and the largest RSS a sampling thread saw meanwhile.
3. with N = 2, "two": a second worker (`pipe.worker()`, its own contexts on the same
   compiled models) and the pipeline generate the same --images images side by side
   (worker w takes images w, w+2, ...): images/s, largest RSS, and the largest
   difference from phase "one"'s images of the same seeds (0: the same images).

"The memory a second worker adds" is measured on the anonymous RSS (memory only this
process holds; weights mapped from the engine cache or model.onnx.data are file-backed
pages the kernel may drop and re-read, so the total RSS moves with the machine's memory
pressure) two ways: the largest in "two" minus the largest in "one" of the N=2 run (same
process, same model, same images: the second context's run state), and the largest in
"two" of the N=2 run minus the largest in "one" of the N=1 run (also what N=2 costs at
load: OpenVINO sets up each of its streams when it compiles). Both are compared with the
bytes of the weights the pipeline loaded (the artifact's graph files); the target is at
most 10%. The 1-vs-2-worker comparison is phase "one" of the N=1 run (each backend's best
one-worker setting: OpenVINO then compiles one stream over all cores) against phase "two"
of the N=2 run (OpenVINO: two streams). The machine is shared, so the N=1 and N=2 runs
alternate for --rounds rounds (N=1, N=2, N=1, N=2, ...: both see the same neighbours),
every phase records the share of the machine's CPU other processes used meanwhile, and
the table shows each run's best round (the one least slowed by others) with that share.

Writes benchmarks/results/workers.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_size_sd15 import (  # noqa: E402 - a sibling script, no package
    DEFAULT_WORKDIR,
    GIB,
    PROMPT,
    CpuWindow,
    current_anon_rss_gib,
    current_rss_gib,
    machine_info,
)

DEFAULT_RESULTS = HERE / "results" / "workers.json"
BACKENDS = ("ort", "openvino")
WORKERS = (1, 2)


class RssSampler:
    """The largest RSS (and anonymous RSS) seen every 20 ms while a phase runs."""

    def __init__(self):
        self.rss = self.anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.rss, self.anon = max(self.rss, current_rss_gib()), max(self.anon, current_anon_rss_gib())

    def __enter__(self) -> RssSampler:
        self.rss, self.anon = current_rss_gib(), current_anon_rss_gib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss, self.anon = max(self.rss, current_rss_gib()), max(self.anon, current_anon_rss_gib())


def _generate(pipe, seeds: list[int], args: argparse.Namespace) -> dict[int, np.ndarray]:
    return {seed: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=args.height,
                       width=args.width, seed=seed, scheduler="euler", output_type="np").images
            for seed in seeds}


def _phase(run) -> dict[str, Any]:
    window = CpuWindow()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        images = run()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "images": len(images), "images_per_s": round(len(images) / seconds, 4),
            "max_rss_gib": round(rss.rss, 3), "max_anon_rss_gib": round(rss.anon, 3),
            "others_cpu_share": window.others_share(), "_images": images}


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """One backend at one worker count, in this process."""
    from diffrt.runtime.cpu import cpu_info
    from diffrt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(args.workdir / "artifact", backend=args.backend, workers=args.workers,
                         prepare={"height": args.height, "width": args.width})
    result: dict[str, Any] = {"backend": args.backend, "workers": args.workers, "describe": pipe.backend.describe(),
                              "cpu": cpu_info().describe(), "load_seconds": round(time.perf_counter() - t0, 2),
                              "weights_bytes": sum(f.size for m in pipe.models.values() for f in m.spec.files),
                              "rss_after_load_gib": round(current_rss_gib(), 3)}
    seeds = list(range(args.images))
    _generate(pipe, [1000], args)  # warm-up
    one = _phase(lambda: _generate(pipe, seeds, args))
    result["one"] = one
    if args.workers == 2:
        worker = pipe.worker()
        _generate(worker, [1001], args)  # its warm-up, alone
        done: dict[int, np.ndarray] = {}

        def side_by_side() -> dict[int, np.ndarray]:
            threads = [threading.Thread(target=lambda p=p, w=w: done.update(_generate(p, seeds[w::2], args)))
                       for w, p in enumerate((pipe, worker))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return done

        two = _phase(side_by_side)
        result["two"] = two
        result["two_vs_one_max_abs_diff"] = float(max(np.abs(two["_images"][s] - one["_images"][s]).max()
                                                      for s in seeds))
        result["second_worker_adds_rss_gib"] = round(two["max_rss_gib"] - one["max_rss_gib"], 3)
        result["second_worker_adds_anon_gib"] = round(two["max_anon_rss_gib"] - one["max_anon_rss_gib"], 3)
        result["second_worker_share_of_weights"] = round(result["second_worker_adds_anon_gib"] * GIB
                                                         / result["weights_bytes"], 4)
        worker.close()
    pipe.close()
    for phase in ("one", "two"):
        if phase in result:
            del result[phase]["_images"]
    return result


def prime(args: argparse.Namespace) -> dict[str, Any]:
    """Load once, so that the engine cache holds what the measured runs load."""
    from diffrt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    Pipeline.load(args.workdir / "artifact", backend=args.backend,
                  prepare={"height": args.height, "width": args.width}).close()
    return {"backend": args.backend, "prime_seconds": round(time.perf_counter() - t0, 2)}


def run_subprocess(args: argparse.Namespace, backend: str, workers: int) -> dict[str, Any]:
    out = args.workdir / f"workers-{backend}-{workers}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", f"{backend}:{workers}", "--workdir",
           str(args.workdir), "--size", f"{args.width}x{args.height}", "--steps", str(args.steps), "--images",
           str(args.images), "--results", str(out)]
    print(f"[workers] {backend}, {workers or 'prime:'} worker(s) ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def print_table(report: dict[str, Any]) -> None:
    rows = []
    for backend in report["backends"]:
        one, two = report["runs"][f"{backend}:1"], report["runs"][f"{backend}:2"]
        weights = two["weights_bytes"] / GIB

        def rounds(run: dict[str, Any], phase: str) -> str:
            return ", ".join(f"{r[phase]['images_per_s']:.4f} ({r[phase]['others_cpu_share']:.0%})"
                             for r in run.get("rounds", [run]))

        rows.append((backend, "1", f"{one['one']['images_per_s']:.4f}", rounds(one, "one"),
                     f"{one['one']['max_anon_rss_gib']:.2f}", "", "", f"{one['one']['others_cpu_share']:.0%}"))
        rows.append((backend, "2", f"{two['two']['images_per_s']:.4f}", rounds(two, "two"),
                     f"{two['two']['max_anon_rss_gib']:.2f}",
                     f"{two['second_worker_adds_anon_gib']:+.3f} ({two['second_worker_share_of_weights']:.1%})",
                     f"{two['second_worker_vs_one_worker_process_anon_gib']:+.3f} "
                     f"({two['second_worker_vs_one_worker_process_share_of_weights']:.1%})",
                     f"{two['two']['others_cpu_share']:.0%}"))
        print(f"{backend}: weights {weights:.2f} GiB ({two['describe']})")
    header = ("backend", "workers", "images/s", "each round (others' CPU)", "max anon RSS GiB",
              "2nd worker adds GiB (same process)", "vs the 1-worker process", "others CPU")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where real_size_sd15.py left (or --prepare makes) artifact/ (default {DEFAULT_WORKDIR})")
    parser.add_argument("--size", type=_size, default=(256, 256), help="WIDTHxHEIGHT (default 256x256)")
    parser.add_argument("--steps", type=int, default=4, help="euler steps per image, CFG 7.5 (default 4)")
    parser.add_argument("--images", type=int, default=4, help="images per timed phase (default 4)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default ort,openvino)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating N=1/N=2 rounds per backend (default 2)")
    parser.add_argument("--prepare", action="store_true", help="build and export the checkpoint first")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"JSON out (default {DEFAULT_RESULTS})")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # BACKEND:WORKERS, one subprocess
    args = parser.parse_args(argv)
    args.width, args.height = args.size
    if args.config:
        args.backend, workers = args.config.split(":")
        args.workers = int(workers)
        args.results.write_text(json.dumps(run_config(args) if args.workers else prime(args), indent=2) + "\n")
        return 0
    if args.prepare:
        subprocess.run([sys.executable, str(HERE / "real_size_sd15.py"), "--phases", "build,export", "--workdir",
                        str(args.workdir), "--results", str(args.workdir / "prepare.json")], check=True)
    if not (args.workdir / "artifact" / "manifest.json").is_file():
        raise SystemExit(f"error: no artifact in {args.workdir}; run with --prepare (or real_size_sd15.py) first")
    started = time.perf_counter()
    backends = [b for b in args.backends.split(",") if b]
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                              "machine": machine_info(), "size": f"{args.width}x{args.height}", "steps": args.steps,
                              "images": args.images, "backends": backends, "runs": {}}
    for backend in backends:
        report["runs"][f"{backend}:prime"] = run_subprocess(args, backend, 0)
        rounds = {workers: [] for workers in WORKERS}
        for _ in range(args.rounds):
            for workers in WORKERS:
                rounds[workers].append(run_subprocess(args, backend, workers))
        for workers, runs in rounds.items():  # the best round, the others kept beside it
            phase = "one" if workers == 1 else "two"
            best = max(runs, key=lambda run: run[phase]["images_per_s"])
            report["runs"][f"{backend}:{workers}"] = {**best, "rounds": runs}
        one, two = report["runs"][f"{backend}:1"], report["runs"][f"{backend}:2"]
        across = two["two"]["max_anon_rss_gib"] - one["one"]["max_anon_rss_gib"]
        two["second_worker_vs_one_worker_process_anon_gib"] = round(across, 3)
        two["second_worker_vs_one_worker_process_share_of_weights"] = round(across * GIB / two["weights_bytes"], 4)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['runs'][f'{backends[0]}:1']['cpu']}; {args.width}x{args.height}, {args.steps} euler steps, "
          f"CFG; {args.images} images per phase")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
