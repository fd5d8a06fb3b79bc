"""OpenVINO thread/stream settings on one stage, side by side, in one process.

    python benchmarks/openvino_settings.py ARTIFACT [--size 256x256] [--batch 1] [--rounds 3]
        [--results benchmarks/results/openvino_settings.json]

Compiles the UNet once per setting (fp32 here, or the backend's default precision with
--default-precision) for one static shape, runs one warm-up call each, then `--rounds`
rounds of one call per setting, alternating, so drift hits all alike. Prints and writes
the median seconds per call, the CPU, and how many attention blocks OpenVINO fused
(attention_ops). What chose the backend's defaults (latency hint, threads and streams
left to OpenVINO): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from diffrt.artifacts import read_manifest
from diffrt.runtime.backends import get_backend
from diffrt.runtime.cpu import cpu_info

SETTINGS = {
    "default (latency hint; threads, streams: OpenVINO's choice)": {},
    "num_streams=2, throughput hint": {"num_streams": 2, "performance_hint": "throughput"},
    "num_threads=1": {"num_threads": 1},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="an exported artifact folder")
    parser.add_argument("--size", default="256x256", help="WIDTHxHEIGHT (default 256x256)")
    parser.add_argument("--batch", type=int, default=1, help="UNet batch (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--default-precision", action="store_true", help="the backend's precision, not fp32")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/openvino_settings.json"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    manifest = read_manifest(args.artifact)
    spec = manifest.stage("unet")
    factor = 8  # Stable Diffusion's VAE: latents are 1/8 of the image
    dim = next(t.shape[-1] for t in spec.inputs if t.name == "encoder_hidden_states")
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((args.batch, 4, height // factor, width // factor), dtype=np.float32),
             "timestep": np.full((args.batch,), 500.0, dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((args.batch, 77, dim), dtype=np.float32)}
    precision = {} if args.default_precision else {"precision": "fp32"}
    models, sessions = {}, {}
    for name, options in SETTINGS.items():
        backend = get_backend("openvino", disk_cache=False, **precision, **options)
        models[name] = backend.open(args.artifact, spec)
        sessions[name] = models[name].context()
        sessions[name].run(feeds)  # compile + warm-up
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(feeds)
            times[name].append(round(time.perf_counter() - started, 4))
    result = {"cpu": cpu_info().to_json(), "describe": cpu_info().describe(), "size": args.size, "batch": args.batch,
              "attention": next(iter(models.values())).describe_graph(),
              "unet_call_seconds": {n: {"median": statistics.median(v), "runs": v} for n, v in times.items()}}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['describe']}; UNet {args.size} batch {args.batch}")
    for name, t in result["unet_call_seconds"].items():
        print(f"  {name:<62} {t['median']:.3f} s/call  {t['runs']}")
    print(f"  {result['attention']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
