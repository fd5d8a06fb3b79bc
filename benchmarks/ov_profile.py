"""Where an OpenVINO stage spends its time: a per-layer profile (PERF_COUNT) by node type.

    python benchmarks/ov_profile.py GRAPH[:PRECISION] [GRAPH[:PRECISION] ...]
                                    [--size 256] [--batch 1] [--rounds 3] [--top 20] [--out FILE.json]

Each GRAPH is a stage's model.onnx (inputs: seeded noise, named dims bound from --size and
--batch as benchmarks/attention_fusion.py binds them), PRECISION the
inference precision hint (f32 or bf16; default bf16 where the CPU has AVX512-BF16/AMX,
else f32). The graph is reshaped to static shapes (as diffrt's openvino backend does),
compiled with PERF_COUNT, run twice to warm up and `--rounds` times timed; then the last
run's per-layer times are summed by (layer type, kernel) and printed, largest first, with
the step time (median of the rounds). One graph at a time (memory), in the order given.

This is how benchmarks/README.md's int8 section saw why quantized attention made the
int8 UNet no faster than bf16 (int8 convolutions faster, attention's MatMuls split into
separate fp32 kernels with their reorders). Writes JSON with --out, with the CPU.

`ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/ov_profile.py ...` caps the oneDNN kernels
OpenVINO's CPU plugin uses (convolutions, fully connected, its JIT subgraphs) at AVX2;
the kernel names in the profile show which layers it reached. It is a rough stand-in
for an AVX2-only CPU, not one: OpenVINO's own JIT kernels (MVN) and MLAS GEMMs keep the
CPU's full ISA, and the plugin still plans for the ISA it detects, so some graphs that
run on real AVX2 machines fail to compile under the cap (measured: a bf16 text encoder's
Softmax, with AVX512-BF16 present). A graph it cannot compile is recorded with
OpenVINO's message.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

LATENT = 8  # VAE downscale


def profile(path: Path, precision: str, size: int, batch: int, rounds: int) -> dict:
    import openvino as ov

    from attention_fusion import make_feeds  # benchmarks/: seeded inputs, named dims bound from the image size

    core = ov.Core()
    model = core.read_model(str(path))
    feeds = make_feeds(path.parent, size, size, batch, LATENT)
    model.reshape({name: ov.PartialShape(list(value.shape)) for name, value in feeds.items()})
    t0 = time.perf_counter()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERF_COUNT": "YES",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    compile_s = time.perf_counter() - t0
    request = compiled.create_infer_request()
    for _ in range(2):
        request.infer(feeds)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        request.infer(feeds)
        times.append(time.perf_counter() - t0)
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for info in request.get_profiling_info():
        key = f"{info.node_type} / {info.exec_type}"
        total[key] += info.real_time.total_seconds()
        count[key] += 1
    layers = [{"layer": k, "ms": round(v * 1000, 2), "nodes": count[k]} for k, v in total.most_common()]
    return {"graph": str(path), "precision": precision, "size": size, "batch": batch, "compile_s": round(compile_s, 1),
            "step_s": round(statistics.median(times), 4), "step_runs_s": [round(t, 4) for t in times],
            "profiled_ms": round(sum(total.values()) * 1000, 1), "layers": layers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graphs", nargs="+", metavar="GRAPH[:PRECISION]")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="layer types printed per graph (default 20)")
    parser.add_argument("--out", type=Path, help="write the profiles as JSON here")
    args = parser.parse_args(argv)

    from diffrt.runtime.cpu import cpu_info

    cpu = cpu_info()
    default = "bf16" if cpu.has_bf16 else "f32"
    results = []
    for item in args.graphs:
        path, _, precision = item.partition(":")
        if precision not in ("", "f32", "bf16"):
            raise SystemExit(f"error: {item}: precision must be f32 or bf16")
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: no such graph file")
        try:
            result = profile(Path(path), precision or default, args.size, args.batch, args.rounds)
        except RuntimeError as exc:  # OpenVINO cannot compile it here (e.g. a kernel missing under an ISA cap)
            line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip() and "Exception from" not in ln), "?")
            results.append({"graph": path, "precision": precision or default, "error": line})
            print(f"\n{path}: OpenVINO could not compile it: {line}")
            continue
        results.append(result)
        print(f"\n{path} ({result['precision']}): step {result['step_s']:.3f} s (median of {args.rounds}), "
              f"profiled layers {result['profiled_ms']:.0f} ms")
        for row in result["layers"][:args.top]:
            share = 100 * row["ms"] / result["profiled_ms"] if result["profiled_ms"] else 0.0
            print(f"  {row['ms']:9.1f} ms {share:5.1f}%  n={row['nodes']:4d}  {row['layer']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python benchmarks/ov_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {**cpu.to_json(), "cores": os.cpu_count(), "platform": platform.platform(),
                        "load_average": list(os.getloadavg()),
                        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA")},
            "profiles": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
