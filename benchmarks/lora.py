"""LoRA merged at run time on the SD1.5-size UNet: the wall time to switch adapters
between two requests vs one denoiser step, and the memory 10 loaded LoRAs take.

    python benchmarks/lora.py [--workdir /tmp/diffrt-real-size] [--size 512x512] [--rounds 2]

The artifact is the one benchmarks/real_size_sd15.py exports (random weights, SD1.5's
architecture) in --workdir/artifact. Ten random rank-16 LoRA files (PEFT layout, fp16,
as diffusers saves them) on every attention projection of the UNet (attn1 and attn2:
to_q, to_k, to_v, to_out.0; 128 layers) are written to --workdir/loras/. Then, per
backend (ort, openvino), in a subprocess of its own (its memory its own):

1. the UNet stage only (the graph the backend prefers: ORT's fused-attention one,
   OpenVINO's portable one), opened and prepared for the size (CFG: batch 2);
2. anonymous and total RSS before, and after `MergedLoras.add` of the 10 files (parsed
   and checked against the weight map; fp16 files stay fp16; no base values are kept:
   a switch reads the ones it changes from the graph file);
3. one denoiser step without LoRA (steady: its second run); then for --rounds rounds:
   switch to LoRA 0, to LoRA 1, and back to none, each switch timed on its own
   (`MergedLoras.using`: base values read, the merged weights computed in numpy, and
   `update_weights` called: ORT builds a new session, OpenVINO recompiles; the time in
   `update_weights` is recorded apart), then the first step after it and a
   second, steady one. A switch's cost between two requests is the switch plus what
   the first step after it takes beyond a steady step.

Prints a table and writes benchmarks/results/lora.json, with the share of the machine's
CPU time other processes took during each backend's run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_size_sd15 import (  # noqa: E402 - a sibling script, no package
    DEFAULT_WORKDIR,
    CpuWindow,
    current_anon_rss_gib,
    current_rss_gib,
    machine_info,
)
from workers import RssSampler  # noqa: E402 - the largest RSS seen every 20 ms

DEFAULT_RESULTS = HERE / "results" / "lora.json"
BACKENDS = ("ort", "openvino")
RANK = 16
COUNT = 10
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_loras(folder: Path, artifact: Path) -> list[Path]:
    """COUNT random rank-RANK PEFT-layout LoRA files on every attention projection."""
    from safetensors.numpy import save_file

    from diffrt.weights import weight_map

    folder.mkdir(parents=True, exist_ok=True)
    weights = weight_map(artifact, "unet")
    targets = {name.removesuffix(".weight"): entry.shape for name, entry in weights.entries.items()
               if name.endswith(".weight") and any(f".attn{i}.{p}." in name for i in (1, 2) for p in PROJECTIONS)}
    paths = []
    for index in range(COUNT):
        path = folder / f"lora-{index}.safetensors"
        if not path.exists():
            rng = np.random.default_rng(index)
            tensors = {}
            for module, (out, inp) in targets.items():
                tensors[f"unet.{module}.lora_A.weight"] = (rng.standard_normal((RANK, inp)) * 0.01).astype(np.float16)
                tensors[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((out, RANK)) * 0.01).astype(np.float16)
            save_file(tensors, str(path))
        paths.append(path)
    return paths


def _step(context, feeds) -> float:
    t0 = time.perf_counter()
    context.run(feeds)
    return time.perf_counter() - t0


def measure(backend_name: str, artifact: Path, loras: list[Path], height: int, width: int,
            rounds: int) -> dict[str, Any]:
    """One backend, in this process (see the module docstring)."""
    from diffrt.artifacts import read_manifest
    from diffrt.families import get_family
    from diffrt.runtime.backends import get_backend
    from diffrt.runtime.loras import MergedLoras
    from diffrt.runtime.pipeline import select_stages

    window = CpuWindow()
    manifest = read_manifest(artifact)
    backend = get_backend(backend_name, cache_dir=artifact / "engines")
    spec = select_stages(manifest, get_family(manifest.family), backend, None, None)["unet"]
    profile = {"batch": 2, "latent_height": height // 8, "latent_width": width // 8}
    t0 = time.perf_counter()
    model = backend.open(artifact, spec, profile=profile)
    context = model.context()
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, height // 8, width // 8), dtype=np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    context.prepare({k: v.shape for k, v in feeds.items()})
    load_s = time.perf_counter() - t0
    first_step = _step(context, feeds)
    steady = _step(context, feeds)

    before = {"rss_gib": current_rss_gib(), "anon_rss_gib": current_anon_rss_gib()}
    merged = MergedLoras(artifact, {"unet": model}, backend)
    in_backend: list[float] = []
    update = model.update_weights

    def timed_update(weights):
        t = time.perf_counter()
        update(weights)
        in_backend.append(time.perf_counter() - t)

    model.update_weights = timed_update
    t0 = time.perf_counter()
    parsed = [merged.add(f"lora{i}", path) for i, path in enumerate(loras)]
    add_s = time.perf_counter() - t0
    after = {"rss_gib": current_rss_gib(), "anon_rss_gib": current_anon_rss_gib()}

    switches = []
    for _ in range(rounds):
        for wanted in ((("lora0", 1.0),), (("lora1", 1.0),), ()):
            t0 = time.perf_counter()
            in_backend.clear()
            with RssSampler() as peak, merged.using(wanted):
                switch_s = time.perf_counter() - t0
                after_switch = _step(context, feeds)
                again = _step(context, feeds)
            switches.append({"to": wanted[0][0] if wanted else "none", "switch_s": round(switch_s, 3),
                             "update_weights_s": round(sum(in_backend), 3),
                             "first_step_s": round(after_switch, 3), "steady_step_s": round(again, 3),
                             "switch_cost_s": round(switch_s + after_switch - again, 3),
                             "rss_gib": round(current_rss_gib(), 3), "max_rss_gib": round(peak.rss, 3)})
    context.close()
    model.close()
    return {"backend": backend.describe(), "stage": spec.name, "size": f"{width}x{height}", "batch": 2,
            "load_s": round(load_s, 2), "first_step_s": round(first_step, 3), "steady_step_s": round(steady, 3),
            "loras": len(loras), "lora_files_bytes": sum(p.stat().st_size for p in loras),
            "lora_parsed_bytes": sum(p.nbytes for p in parsed),
            "add_s": round(add_s, 2),
            "rss_before_gib": round(before["rss_gib"], 3), "rss_after_gib": round(after["rss_gib"], 3),
            "anon_rss_before_gib": round(before["anon_rss_gib"], 3),
            "anon_rss_after_gib": round(after["anon_rss_gib"], 3),
            "switches": switches, "others_cpu_share": window.others_share()}


def print_table(report: dict[str, Any]) -> None:
    for name, run in report["runs"].items():
        mib = 2**20
        print(f"\n{name}: {run['backend']} ({run['stage']}, {run['size']}, batch 2); others took "
              f"{run['others_cpu_share']:.0%} of the CPU")
        print(f"  one denoiser step (steady): {run['steady_step_s']:.2f} s; load {run['load_s']:.1f} s")
        print(f"  10 LoRAs: files {run['lora_files_bytes'] / mib:.0f} MiB, parsed {run['lora_parsed_bytes'] / mib:.0f} "
              f"MiB; anon RSS +{(run['anon_rss_after_gib'] - run['anon_rss_before_gib']) * 1024:.0f} MiB, "
              f"RSS +{(run['rss_after_gib'] - run['rss_before_gib']) * 1024:.0f} MiB (add: {run['add_s']:.1f} s)")
        print(f"  {'to':>6} {'switch s':>9} {'in backend':>11} {'1st step s':>11} {'steady s':>9} {'cost s':>7} "
              f"{'cost/step':>10} {'RSS GiB':>8} {'max RSS':>8}")
        for s in run["switches"]:
            print(f"  {s['to']:>6} {s['switch_s']:>9.2f} {s['update_weights_s']:>11.2f} {s['first_step_s']:>11.2f} "
                  f"{s['steady_step_s']:>9.2f} "
                  f"{s['switch_cost_s']:>7.2f} {s['switch_cost_s'] / run['steady_step_s']:>10.2f} "
                  f"{s['rss_gib']:>8.2f} {s['max_rss_gib']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--size", default="512x512", help="WIDTHxHEIGHT of the denoiser step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # one backend, in this process
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    artifact = args.workdir / "artifact"
    loras = write_loras(args.workdir / "loras", artifact)
    if args.backend:
        print(json.dumps(measure(args.backend, artifact, loras, height, width, args.rounds)))
        return 0
    runs = {}
    for name in args.backends.split(","):
        command = [sys.executable, __file__, "--workdir", str(args.workdir), "--size", args.size, "--rounds",
                   str(args.rounds), "--backend", name]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    report = {"command": "python benchmarks/lora.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "rank": RANK, "targets": "every attention projection (attn1, attn2: "
              "to_q, to_k, to_v, to_out.0) of the UNet", "runs": runs}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
