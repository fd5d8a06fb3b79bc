"""Fused vs unfused attention on ONNX Runtime's CPU EP, side by side, in one run.

    python benchmarks/attention_fusion.py ARTIFACT [--stages unet,vae_decoder]
        [--sizes 512x512,768x768] [--batches 1,2] [--rounds 2] [--calls 1]
        [--workdir /tmp/diffrt-attention-fusion] [--results benchmarks/results/attention_fusion.json]

1. fuse:    each stage's graph goes through `diffrt.export.passes.fuse_attention` into
            WORKDIR/<stage>-fused (the pass's own seconds and peak RSS are recorded).
2. time:    for every stage x size x batch, `--rounds` rounds of one subprocess per
            variant, alternating unfused/fused (the order flips every round, so a
            neighbour's load spike is not charged to one variant). A subprocess loads
            the graph, runs one warm-up call, then `--calls` timed calls on the same
            seeded inputs; its peak RSS (getrusage ru_maxrss) is its own. The first
            output is saved, and the fused one compared with the unfused one.
3. profile: per stage x size x batch x variant, one more subprocess with ORT's
            profiler on: the share of the last call's kernel time spent in attention
            (unfused: the nodes the fusion removes (scores MatMul, Softmax, values
            MatMul, head split/merge transposes, the scale arithmetic); fused: the
            MultiHeadAttention nodes), and in the q/k/v/out projections.

Prints a markdown table and writes JSON (every number, plus the machine: CPU and flags,
load average, package versions). The machine is shared: each row records how much of
the machine's CPU other processes took meanwhile; read seconds as indicative only.
Real size (SD1.5, `benchmarks/real_size_sd15.py --phases build,export`): about 20 s per
UNet call at 768x768 batch 2 on 2 cores, so the default grid takes ~30 minutes with
the VAE decoder; `--stages unet` roughly halves it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root, for diffrt

DEFAULT_RESULTS = HERE / "results" / "attention_fusion.json"
DEFAULT_WORKDIR = Path("/tmp/diffrt-attention-fusion")
VARIANTS = ("unfused", "fused")
PACKAGES = ("diffrt", "onnx", "onnxruntime", "numpy")
GIB = 2**30
_PROJECTION = re.compile(r"/(to_q|to_k|to_v|to_out(\.\d+)?)/")


# --- child side --------------------------------------------------------------------


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def child_fuse(args: argparse.Namespace) -> dict[str, Any]:
    from diffrt.export.passes import fuse_attention

    t0 = time.perf_counter()
    files, report = fuse_attention(args.graph, args.out)
    return {"seconds": round(time.perf_counter() - t0, 3), "files": [str(f) for f in files],
            "found": report.found, "fused": report.fused, "not_fused": list(report.not_fused)}


def make_feeds(graph_folder: Path, height: int, width: int, batch: int, vae_scale_factor: int) -> dict:
    """Seeded inputs for the stage graph: named dims bound from the image size."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    model = onnx.load(str(graph_folder / "model.onnx"), load_external_data=False)
    feeds = {}
    for value in model.graph.input:
        dims = []
        for dim in value.type.tensor_type.shape.dim:
            name = dim.dim_param
            if not name:
                dims.append(dim.dim_value)
            elif name == "batch":
                dims.append(batch)
            elif name == "text_length":  # the UNet's conditioning: one 77-token CLIP chunk
                dims.append(77)
            else:
                size = height if "height" in name else width
                dims.append(size // vae_scale_factor if name.startswith("latent") else size)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if value.name == "timestep":
            feeds[value.name] = np.full(dims, 501.0, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 1000, size=dims).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def _session(graph: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(graph / "model.onnx"), options, providers=["CPUExecutionProvider"])


def child_time(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    feeds = make_feeds(args.graph, args.height, args.width, args.batch, args.vae_scale_factor)
    t0 = time.perf_counter()
    session = _session(args.graph, args.threads)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = session.run(None, feeds)[0]
    warmup = time.perf_counter() - t0
    np.save(args.out, first)
    calls = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        session.run(None, feeds)
        calls.append(round(time.perf_counter() - t0, 3))
    return {"load_seconds": round(load, 3), "warmup_seconds": round(warmup, 3), "call_seconds": calls}


def child_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Kernel time of the last of two calls, split into attention / projections / rest."""
    feeds = make_feeds(args.graph, args.height, args.width, args.batch, args.vae_scale_factor)
    session = _session(args.graph, args.threads, profile_prefix=str(args.out))
    session.run(None, feeds)
    session.run(None, feeds)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    run = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-1]
    attention_nodes = set(json.loads(Path(args.attention_nodes).read_text()))
    total = attention = projections = 0
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if not run["ts"] <= event["ts"] <= run["ts"] + run["dur"]:
            continue
        name = event["name"].removesuffix("_kernel_time")
        total += event["dur"]
        if name in attention_nodes:
            attention += event["dur"]
        elif _PROJECTION.search(name):
            projections += event["dur"]
    return {"kernel_seconds": round(total / 1e6, 3), "attention_share": round(attention / max(total, 1), 4),
            "projection_share": round(projections / max(total, 1), 4), "run_seconds": round(run["dur"] / 1e6, 3)}


CHILDREN = {"fuse": child_fuse, "time": child_time, "profile": child_profile}


def run_child(args: argparse.Namespace) -> int:
    result = CHILDREN[args.child](args)
    result["peak_rss_gib"] = round(peak_rss_gib(), 3)
    args.result_json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# --- parent side -------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ChildFailed(Exception):
    """A child exited with an error or was killed (the OOM killer, most often)."""


def spawn(child: str, workdir: Path, **options: Any) -> dict[str, Any]:
    """Run one child in a fresh interpreter; returns its JSON plus what the parent saw."""
    result_json = workdir / "child-result.json"
    result_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--result-json", str(result_json)]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    t0, busy0 = time.perf_counter(), busy_cpu_seconds()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    own = usage.ru_utime + usage.ru_stime
    others = max(0.0, busy_cpu_seconds() - busy0 - own) / max(wall * (os.cpu_count() or 1), 1e-9)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        hint = " (killed by SIGKILL: out of memory?)" if code == -9 else ""
        raise ChildFailed(f"{child} child failed with status {code}{hint}", " ".join(cmd))
    result = json.loads(result_json.read_text())
    result["others_cpu_share"] = round(others, 3)
    return result


def attention_node_names(unfused: Path, fused: Path) -> list[str]:
    """Nodes the fusion removed, plus the fused nodes: attention as the profiler sees it."""
    import onnx

    before = {n.name for n in onnx.load(str(unfused / "model.onnx"), load_external_data=False).graph.node}
    after = onnx.load(str(fused / "model.onnx"), load_external_data=False).graph.node
    after_names = {n.name for n in after}
    return sorted((before - after_names) | {n.name for n in after if n.op_type == "MultiHeadAttention"})


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(height), int(width)


def vae_scale_factor(artifact: Path) -> int:
    try:
        return int(json.loads((artifact / "manifest.json").read_text())["model"]["vae_scale_factor"])
    except (OSError, KeyError, ValueError):
        return 8


def fuse_stages(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    fused = {}
    for stage in args.stages:
        out = args.workdir / f"{stage}-fused"
        shutil.rmtree(out, ignore_errors=True)
        print(f"=== fuse {stage}", file=sys.stderr, flush=True)
        try:
            fused[stage] = spawn("fuse", args.workdir, graph=args.artifact / stage, out=out)
        except ChildFailed as exc:
            raise SystemExit(f"error: {exc.args[0]}: {exc.args[1]}") from None
        if fused[stage]["fused"] == 0:
            print(f"warning: no attention fused in {stage}", file=sys.stderr)
    return fused


def measure_config(args, stage: str, height: int, width: int, batch: int, names: Path) -> dict[str, Any]:
    import numpy as np

    graphs = {"unfused": args.artifact / stage, "fused": args.workdir / f"{stage}-fused"}
    common = dict(height=height, width=width, batch=batch, vae_scale_factor=args.vae_scale_factor,
                  threads=args.threads)
    rows: dict[str, dict[str, Any]] = {v: {"calls": [], "peak_rss_gib": 0.0, "others_cpu_share": []} for v in VARIANTS}
    for variant in VARIANTS:
        (args.workdir / f"out-{variant}.npy").unlink(missing_ok=True)
    for round_index in range(args.rounds):
        for variant in VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]:
            row = rows[variant]
            if "failed" in row:
                continue
            print(f"=== time {stage} {width}x{height} batch {batch} {variant} (round {round_index + 1})",
                  file=sys.stderr, flush=True)
            out = args.workdir / f"out-{variant}.npy"
            try:
                result = spawn("time", args.workdir, graph=graphs[variant], out=out, calls=args.calls, **common)
            except ChildFailed as exc:  # e.g. the unfused graph's score tensors do not fit: that is a result
                print(f"warning: {exc.args[0]}: {exc.args[1]}", file=sys.stderr, flush=True)
                row["failed"] = "killed (out of memory?)" if "SIGKILL" in exc.args[0] else exc.args[0]
                continue
            row["calls"] += result["call_seconds"]
            row["peak_rss_gib"] = max(row["peak_rss_gib"], result["peak_rss_gib"])
            row["others_cpu_share"].append(result["others_cpu_share"])
            row["load_seconds"] = result["load_seconds"]
    outputs = {v: args.workdir / f"out-{v}.npy" for v in VARIANTS}
    difference = None
    if all(path.is_file() for path in outputs.values()):
        reference, fused = np.load(outputs["unfused"]), np.load(outputs["fused"])
        difference = {"max_abs_difference": float(np.max(np.abs(fused.astype(np.float64) - reference))),
                      "max_abs_output": float(np.max(np.abs(reference)))}
    for variant in VARIANTS:
        row = rows[variant]
        if "failed" in row:
            continue
        row["median_call_seconds"] = round(float(np.median(row["calls"])), 3)
        if args.profile:
            print(f"=== profile {stage} {width}x{height} batch {batch} {variant}", file=sys.stderr, flush=True)
            profile = spawn("profile", args.workdir, graph=graphs[variant], out=args.workdir / f"profile-{variant}",
                            attention_nodes=names, **common)
            row["profile"] = {k: profile[k] for k in ("kernel_seconds", "attention_share", "projection_share")}
    return {"stage": stage, "height": height, "width": width, "batch": batch,
            **(difference or {"max_abs_difference": None, "max_abs_output": None}), **rows}


def machine() -> dict[str, Any]:
    from diffrt.runtime.cpu import cpu_info, installed_versions

    versions = installed_versions(PACKAGES)
    return {"cpu": cpu_info().to_json(), "describe": cpu_info().describe(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "versions": versions}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| stage | size | batch | unfused s/call | fused s/call | unfused peak GiB | fused peak GiB "
        "| attention share unfused / fused | max abs diff | others' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in result["configs"]:
        u, f = row["unfused"], row["fused"]

        def cell(v: dict[str, Any], text: str) -> str:
            return v["failed"] if "failed" in v else text

        share = " / ".join(v["failed"] if "failed" in v else f"{100 * v['profile']['attention_share']:.1f}%"
                           for v in (u, f) if "profile" in v or "failed" in v)
        others = max(u["others_cpu_share"] + f["others_cpu_share"], default=0.0)
        diff = "–" if row["max_abs_difference"] is None else f"{row['max_abs_difference']:.2e}"
        lines.append(
            f"| {row['stage']} | {row['width']}x{row['height']} | {row['batch']} "
            f"| {cell(u, format(u.get('median_call_seconds', 0), '.3f'))} "
            f"| {cell(f, format(f.get('median_call_seconds', 0), '.3f'))} "
            f"| {cell(u, format(u['peak_rss_gib'], '.2f'))} | {cell(f, format(f['peak_rss_gib'], '.2f'))} | {share} "
            f"| {diff} | {100 * others:.0f}% |")
    lines.append("")
    for stage, fuse in result["fuse"].items():
        lines.append(f"- fuse_attention({stage}): {fuse['fused']} of {fuse['found']} attention blocks fused in "
                     f"{fuse['seconds']:.1f} s, peak RSS {fuse['peak_rss_gib']:.2f} GiB")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.vae_scale_factor = vae_scale_factor(args.artifact)
    result: dict[str, Any] = {"artifact": str(args.artifact), "machine": machine(), "rounds": args.rounds,
                              "calls_per_round": args.calls, "threads": args.threads or "ort default"}
    result["fuse"] = fuse_stages(args)
    result["configs"] = []
    for stage in args.stages:
        names = args.workdir / f"{stage}-attention-nodes.json"
        names.write_text(json.dumps(attention_node_names(args.artifact / stage, args.workdir / f"{stage}-fused")))
        for height, width in args.sizes:
            for batch in args.batches:
                result["configs"].append(measure_config(args, stage, height, width, batch, names))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, nargs="?", help="an exported artifact folder")
    parser.add_argument("--stages", default="unet,vae_decoder", help="comma-separated (default unet,vae_decoder)")
    parser.add_argument("--sizes", default="512x512,768x768", help="WIDTHxHEIGHT list (default 512x512,768x768)")
    parser.add_argument("--batches", default="1,2", help="comma-separated (default 1,2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per config (default 2)")
    parser.add_argument("--calls", type=int, default=1, help="timed calls per subprocess, after a warm-up (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: ORT's choice)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled runs")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"scratch (default {DEFAULT_WORKDIR})")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"JSON (default {DEFAULT_RESULTS})")
    # child-process options
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    for name in ("graph", "out", "attention-nodes"):
        parser.add_argument(f"--{name}", type=Path, help=argparse.SUPPRESS)
    for name in ("height", "width", "batch", "vae-scale-factor"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None:
        if args.artifact is None:
            parser.error("ARTIFACT is required")
        args.stages = [s for s in args.stages.split(",") if s]
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        args.batches = [int(b) for b in args.batches.split(",") if b]
        if min(args.rounds, args.calls) < 1:
            parser.error("--rounds and --calls must be >= 1")
        for stage in args.stages:
            if not (args.artifact / stage / "model.onnx").is_file():
                parser.error(f"{args.artifact / stage / 'model.onnx'} is missing; pass an exported artifact folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    started = time.perf_counter()
    result = run(args)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
