"""LoRA branches on the SD1.5-size UNet: the per-step cost of the branch graph vs the
plain one (what a merged LoRA runs: the same graph with other weight values), and a
mixed batch of 4 rows with 4 different LoRAs vs a batch of 4 with one.

    python benchmarks/lora_branches.py --artifact /tmp/diffrt-workers-sd15/artifact \\
        [--workdir /tmp/diffrt-lora-branches] [--size 256x256] [--steps 4] [--rounds 2] [--backend ort]

The artifact (random weights, SD1.5's architecture; benchmarks/real_size_sd15.py) is
mirrored into --workdir with hard links (its own manifest), and given rank-16 branches
on every attention projection (`add_branch_stages`, 128 layers). Four random rank-16
LoRA files (PEFT layout, fp16) on the same layers go to --workdir/loras. Then, each in
a subprocess of its own (one UNet in memory at a time):

- plain: the pipeline with lora_branches=False and no LoRA: the per-step time of
  the merged mechanism (merging changes weight values, not the graph or its work);
- branches: the branch pipeline with the four LoRAs loaded.

Each measurement is one `generate` of --steps Euler steps (CFG, output_type latent);
its per-step time is the median of the denoiser calls after the first. Measurements
alternate within a process for --rounds rounds. Writes benchmarks/results/
lora_branches.json with each measurement's share of the machine's CPU that other
processes took (the machine is shared).

    python benchmarks/lora_branches.py --ops-only [--size 512x512] [--rows 2,8]

times what the branches add on their own, less exposed to a busy neighbour than two
whole UNets: an ONNX graph of only the branch ops (per layer MatMul, MatMul, Add, at
the shapes SD1.5's UNet gives them: tokens from the layer's block, 77 for attn2's
to_k/to_v) run by ONNX Runtime, the minimum of 10 runs, with the FLOPs they add.

    python benchmarks/lora_branches.py --switch-only [--rows 2,8]

times what switching a request's LoRAs costs with branches: building a set's factors on
the host (BranchLoras.feeds, in process, the four LoRA files loaded, an empty cache per
row count), each set's first use and the same set again (cached: the factors repeated
per row), with the bytes the feeds take.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_size_sd15 import CpuWindow, machine_info  # noqa: E402 - a sibling script, no package

DEFAULT_RESULTS = HERE / "results" / "lora_branches.json"
RANK = 16
COUNT = 4
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def mirror(source: Path, target: Path) -> Path:
    """Hard links to the artifact's files (no engines/), a manifest of its own."""
    if not (target / "manifest.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, copy_function=_link, ignore=shutil.ignore_patterns("engines"))
        (target / "manifest.json").unlink()
        shutil.copyfile(source / "manifest.json", target / "manifest.json")
    return target


def _link(src: str, dst: str) -> None:
    Path(dst).hardlink_to(src)


def add_branches(folder: Path) -> None:
    from diffrt.artifacts import read_manifest
    from diffrt.export.lora_branches import add_branch_stages

    if not any(s.facts.get("lora_branches") for s in read_manifest(folder).stages.values()):
        add_branch_stages(folder, RANK)


def write_loras(folder: Path, artifact: Path) -> list[Path]:
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
            rng = np.random.default_rng(100 + index)
            tensors = {}
            for module, (out, inp) in targets.items():
                tensors[f"unet.{module}.lora_A.weight"] = (rng.standard_normal((RANK, inp)) * 0.01).astype(np.float16)
                tensors[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((out, RANK)) * 0.01).astype(np.float16)
            save_file(tensors, str(path))
        paths.append(path)
    return paths


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """In the subprocess: load one configuration and time its measurements."""
    from diffrt.runtime.pipeline import Pipeline

    folder = Path(args.workdir) / "artifact"
    loras = {f"l{i}": p for i, p in enumerate(sorted((Path(args.workdir) / "loras").glob("*.safetensors")))}
    height, width = args.size
    branches = args.run == "branches"
    t0 = time.perf_counter()
    pipe = Pipeline.load(folder, backend=args.backend, lora_branches=branches, loras=loras if branches else None,
                         cache_dir=Path(args.workdir) / "engines", verify="size",
                         prepare={"height": height, "width": width})
    loaded = time.perf_counter() - t0
    common = dict(num_inference_steps=args.steps, scheduler="euler", height=height, width=width,
                  output_type="latent")
    sets = {"batch 1, no LoRA": [None], "batch 4, no LoRA": [None] * 4}
    if branches:
        sets = {"batch 1, one LoRA": [{"l0": 1.0}], **sets, "batch 4, one LoRA": [{"l0": 1.0}] * 4,
                "batch 4, four LoRAs": [{f"l{i}": 1.0} for i in range(4)]}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sets}
    for _ in range(args.rounds):
        for name, wanted in sets.items():
            requests = [pipe.request(f"prompt {i}", seed=i, loras=loras_, **common) for i, loras_ in enumerate(wanted)]
            window = CpuWindow()
            timings = pipe.generate(requests)[0].timings
            steady = timings["denoiser_calls"][1:]
            results[name].append({"step_s": statistics.median(steady), "calls_s": timings["denoiser_calls"],
                                  "others_cpu_share": window.others_share()})
            print(f"{args.run}: {name}: {statistics.median(steady):.3f}s/step "
                  f"(others' CPU {results[name][-1]['others_cpu_share']:.0%})", file=sys.stderr, flush=True)
    spec = pipe.models["unet"].spec
    pipe.close()
    return {"stage": spec.describe(), "load_s": loaded, "measurements": results}


def branch_ops(args: argparse.Namespace) -> dict[str, Any]:
    """The branch ops alone at SD1.5 shapes, timed with ONNX Runtime (see the docstring)."""
    import onnx
    import onnxruntime as ort

    from diffrt.artifacts import read_manifest

    facts = read_manifest(args.workdir / "artifact").stage("unet-fused-lora").facts["lora_branches"]
    height, width = args.size
    results = {}
    for rows in args.rows:
        nodes, inputs, outputs, feeds, flops = [], {}, [], {}, 0
        rng = np.random.default_rng(0)
        for index, (module, (n_in, n_out)) in enumerate(facts["modules"].items()):
            tokens = 77 if ".attn2.to_k" in module or ".attn2.to_v" in module else _tokens(module, height, width)
            x, base = f"x_{tokens}_{n_in}", f"y_{tokens}_{n_out}"
            for name, shape in ((x, (rows, tokens, n_in)), (base, (rows, tokens, n_out)),
                                (f"a{index}", (rows, n_in, RANK)), (f"b{index}", (rows, RANK, n_out))):
                if name not in inputs:
                    inputs[name] = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))
                    feeds[name] = rng.standard_normal(shape).astype(np.float32)
            nodes += [onnx.helper.make_node("MatMul", [x, f"a{index}"], [f"l{index}"]),
                      onnx.helper.make_node("MatMul", [f"l{index}", f"b{index}"], [f"d{index}"]),
                      onnx.helper.make_node("Add", [base, f"d{index}"], [f"o{index}"])]
            outputs.append(onnx.helper.make_tensor_value_info(f"o{index}", onnx.TensorProto.FLOAT, None))
            flops += 2 * rows * tokens * RANK * (n_in + n_out) + rows * tokens * n_out
        graph = onnx.helper.make_graph(nodes, "branches", list(inputs.values()), outputs)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        times = []
        for _ in range(11):
            window = CpuWindow()
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - t0, window.others_share()))
        best = min(t for t, _ in times[1:])
        results[f"rows {rows}"] = {"min_s": best, "gflops": flops / 1e9,
                                   "others_cpu_share": [s for _, s in times[1:]]}
        print(f"branch ops alone, {rows} UNet rows at {width}x{height}: {best * 1e3:.1f} ms, {flops / 1e9:.2f} GFLOP "
              f"(others' CPU {min(s for _, s in times[1:]):.0%}-{max(s for _, s in times[1:]):.0%})")
    return results


def switch_times(args: argparse.Namespace) -> dict[str, Any]:
    """Each LoRA set's branch feeds built on the host: first use, then cached (min of 5)."""
    from diffrt.artifacts import read_manifest
    from diffrt.runtime.lora_branches import BranchLayout, BranchLoras
    from diffrt.runtime.loras import MergedLoras

    folder = args.workdir / "artifact"
    layout = BranchLayout.of(read_manifest(folder).stage("unet-fused-lora"))
    paths = sorted((args.workdir / "loras").glob("*.safetensors"))
    results = {}
    for rows in args.rows:
        branches = BranchLoras({"unet": layout}, MergedLoras(folder, {}))  # an empty factor cache per row count
        for index, path in enumerate(paths):
            branches.add(f"l{index}", path)
        first, cached, size = [], [], 0
        for index in range(len(paths)):
            loras = ((f"l{index}", 1.0),)  # two at once would exceed the branches' rank 16
            t0 = time.perf_counter()
            feeds = branches.feeds("unet", loras, rows)
            first.append(time.perf_counter() - t0)
            again = []
            for _ in range(5):
                t0 = time.perf_counter()
                branches.feeds("unet", loras, rows)
                again.append(time.perf_counter() - t0)
            cached.append(min(again))
            size = sum(v.nbytes for v in feeds.values())
        results[f"rows {rows}"] = {"first_use_s": first, "cached_s": cached, "feed_bytes": size}
        print(f"LoRA set switch, {rows} UNet rows: first use {min(first) * 1e3:.0f}-{max(first) * 1e3:.0f} ms, "
              f"cached {min(cached) * 1e3:.1f}-{max(cached) * 1e3:.1f} ms, feeds {size / 1e6:.0f} MB")
    return results


def _tokens(module: str, height: int, width: int) -> int:
    """Tokens of a UNet attention block: the latent (size / 8) halved per level."""
    parts = module.split(".")
    if parts[0] == "mid_block":
        level = 3
    else:
        index = int(parts[1])
        level = index if parts[0] == "down_blocks" else 3 - index
    return (height // 8 >> level) * (width // 8 >> level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=Path("/tmp/diffrt-workers-sd15/artifact"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffrt-lora-branches"))
    parser.add_argument("--size", type=lambda t: tuple(int(v) for v in t.lower().split("x"))[::-1],
                        default=(256, 256), help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="ort", choices=("ort", "openvino"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--run", choices=("plain", "branches"), help=argparse.SUPPRESS)
    parser.add_argument("--ops-only", action="store_true", help="time the branch ops alone (see above)")
    parser.add_argument("--switch-only", action="store_true", help="time LoRA set switches alone (see above)")
    parser.add_argument("--rows", type=lambda t: [int(v) for v in t.split(",")], default=[2, 8],
                        help="UNet rows for --ops-only and --switch-only (CFG: 2 per image)")
    args = parser.parse_args(argv)
    if args.ops_only:
        results = branch_ops(args)
        path = args.results.with_name(args.results.stem + "_ops.json")
        path.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine_info(), "rank": RANK,
                                    "size": list(args.size), "results": results}, indent=2) + "\n")
        print(f"wrote {path}")
        return 0
    if args.switch_only:
        results = switch_times(args)
        path = args.results.with_name(args.results.stem + "_switch.json")
        path.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine_info(), "rank": RANK,
                                    "results": results}, indent=2) + "\n")
        print(f"wrote {path}")
        return 0
    if args.run:
        print(json.dumps(run_config(args)))
        return 0
    folder = mirror(args.artifact, args.workdir / "artifact")
    add_branches(folder)
    write_loras(args.workdir / "loras", folder)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine_info(), "rank": RANK,
                              "size": list(args.size), "steps": args.steps, "backend": args.backend, "runs": {}}
    for config in ("plain", "branches"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", config], check=True,
                             capture_output=True, text=True)
        report["runs"][config] = json.loads(out.stdout.strip().splitlines()[-1])
    summarize(report)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


def _best(run: dict[str, Any], name: str) -> float:
    return min(m["step_s"] for m in run["measurements"][name])


def summarize(report: dict[str, Any]) -> None:
    plain, branches = report["runs"]["plain"], report["runs"]["branches"]
    rows = {
        "plain graph, batch 1 (= merged LoRA)": _best(plain, "batch 1, no LoRA"),
        "branch graph, batch 1, one LoRA": _best(branches, "batch 1, one LoRA"),
        "branch graph, batch 1, no LoRA": _best(branches, "batch 1, no LoRA"),
        "plain graph, batch 4 (= merged LoRA)": _best(plain, "batch 4, no LoRA"),
        "branch graph, batch 4, one LoRA": _best(branches, "batch 4, one LoRA"),
        "branch graph, batch 4, four LoRAs": _best(branches, "batch 4, four LoRAs"),
    }
    report["summary"] = {
        "step_s_best": rows,
        "branch_overhead_batch1": rows["branch graph, batch 1, one LoRA"] / rows["plain graph, batch 1 (= merged LoRA)"] - 1,
        "branch_overhead_batch4": rows["branch graph, batch 4, one LoRA"] / rows["plain graph, batch 4 (= merged LoRA)"] - 1,
        "mixed_vs_one_batch4": rows["branch graph, batch 4, four LoRAs"] / rows["branch graph, batch 4, one LoRA"] - 1,
        "others_cpu_share": sorted(m["others_cpu_share"] for run in (plain, branches)
                                   for ms in run["measurements"].values() for m in ms),
    }
    for label, seconds in rows.items():
        print(f"{label:40s} {seconds:7.3f} s/step")
    s = report["summary"]
    print(f"branch overhead: batch 1 {s['branch_overhead_batch1']:+.1%}, batch 4 {s['branch_overhead_batch4']:+.1%}; "
          f"four LoRAs vs one (batch 4): {s['mixed_vs_one_batch4']:+.1%}; others' CPU share "
          f"{min(s['others_cpu_share']):.0%}-{max(s['others_cpu_share']):.0%}")


if __name__ == "__main__":
    sys.exit(main())
