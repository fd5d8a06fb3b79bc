"""Can ONNX Runtime compute a diffusion UNet in bf16 on this x86 CPU? Measured, side by side.

    python benchmarks/ort_bf16.py [--channels 128,256,512] [--latent 32] [--batch 2]
                                  [--runs 5] [--workdir DIR] [--out benchmarks/results/ort_bf16.json]

Four parts, all on ONNX Runtime's CPU execution provider (the only compute provider in
the pip wheel besides Azure's remote one):

1. Kernel probe: every op type a diffrt UNet graph computes with, as a one-node graph at
   opset 22 with bfloat16 inputs and outputs: does a session start and run?  (ORT picks
   kernels by type when the session starts; a node whose type has no CPU kernel is not
   moved elsewhere, the session fails with NOT_IMPLEMENTED.)
2. A UNet-like model: a tiny SD1.x checkpoint (diffrt.export.tiny) whose UNet is
   replaced by a wider one (--channels; SD1.5 is 320,640,1280,1280), exported by diffrt
   with --precision bf16, so the bf16 graphs are exactly what diffrt's half-precision
   pass (diffrt/export/passes/half.py) writes. Its fp32 and bf16 UNet graphs (portable
   and fused attention) are each opened in ORT; the ops of the bf16 graph without a
   bf16 kernel are listed from the probe, with counts.
3. What ORT can run instead, timed against fp32 (alternating, median of --runs):
   "bf16 weights, fp32 compute" (every large fp32 initializer stored as bf16 behind a
   Cast; ORT folds the Casts at load), and the fp32 graph with the session option
   mlas.enable_gemm_fastmath_arm64_bfloat16=1 (ARM64's bf16 GEMM; read on aarch64 only).
   Each with its max abs difference from the fp32 output.
4. The machine: CPU model and flags, ORT version and providers.

Writes the JSON to --out and prints a summary. The artifact is kept in --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "ort_bf16.json"
DEFAULT_WORKDIR = Path("/tmp/diffrt-ort-bf16")
PROBE_OPSET = 22  # the opset diffrt's bf16 pass raises graphs to (Conv, InstanceNorm, Sin/Cos admit bf16 there)
FASTMATH_KEY = "mlas.enable_gemm_fastmath_arm64_bfloat16"
LARGE = 4096  # initializers with at least this many elements are stored as bf16 in the weights-only variant


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="128,256,512", help="the UNet's block_out_channels (default 128,256,512)")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (default 32: a 256x256 image "
                        "at SD's VAE factor 8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (default 2: one image with CFG)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per graph after one warm-up (default 5)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"checkpoint + artifact (default "
                        f"{DEFAULT_WORKDIR}; reused)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.channel_list = tuple(int(c) for c in args.channels.split(","))
    if any(c % 32 for c in args.channel_list):
        parser.error("--channels: each must be a multiple of 32 (GroupNorm's 32 groups)")
    return args


# --- 1. kernel probe --------------------------------------------------------------------

# (op, inputs as (shape, kind), attributes): kind "x" = a bf16 tensor, "i64" = int64 constant data
PROBES: dict[str, tuple[list[tuple[tuple[int, ...], str]], dict[str, Any]]] = {
    "MatMul": ([((2, 8, 16), "x"), ((16, 8), "x")], {}),
    "Gemm": ([((4, 16), "x"), ((8, 16), "x"), ((8,), "x")], {"transB": 1}),
    "Conv": ([((1, 8, 6, 6), "x"), ((8, 8, 3, 3), "x"), ((8,), "x")], {"pads": [1, 1, 1, 1]}),
    "Add": ([((2, 8), "x"), ((2, 8), "x")], {}),
    "Sub": ([((2, 8), "x"), ((2, 8), "x")], {}),
    "Mul": ([((2, 8), "x"), ((2, 8), "x")], {}),
    "Div": ([((2, 8), "x"), ((2, 8), "x")], {}),
    "Sigmoid": ([((2, 8), "x")], {}),
    "Erf": ([((2, 8), "x")], {}),
    "Tanh": ([((2, 8), "x")], {}),
    "Sqrt": ([((2, 8), "x")], {}),
    "Softmax": ([((2, 8), "x")], {"axis": -1}),
    "Gelu": ([((2, 8), "x")], {}),
    "LayerNormalization": ([((2, 8), "x"), ((8,), "x"), ((8,), "x")], {"axis": -1}),
    "InstanceNormalization": ([((1, 4, 6), "x"), ((4,), "x"), ((4,), "x")], {}),
    "GroupNormalization": ([((1, 8, 6), "x"), ((8,), "x"), ((8,), "x")], {"num_groups": 2}),
    "ReduceMean": ([((2, 8), "x")], {"axes": [1]} if PROBE_OPSET < 18 else {}),
    "Pow": ([((2, 8), "x"), ((1,), "x")], {}),
    "Sin": ([((2, 8), "x")], {}),
    "Cos": ([((2, 8), "x")], {}),
    "Transpose": ([((2, 8), "x")], {"perm": [1, 0]}),
    "Reshape": ([((2, 8), "x"), ((2,), "i64")], {}),
    "Concat": ([((2, 8), "x"), ((2, 8), "x")], {"axis": 0}),
    "Slice": ([((2, 8), "x"), ((1,), "i64"), ((1,), "i64")], {}),
    "Resize": ([((1, 2, 4, 4), "x"), ((0,), "roi"), ((4,), "scales")], {"mode": "nearest"}),
    "Cast": ([((2, 8), "x")], {"to": 1}),
    "Shape": ([((2, 8), "x")], {}),
    "Unsqueeze": ([((2, 8), "x"), ((1,), "i64")], {}),
    # ORT's contrib op, what diffrt's fused-attention graphs use (query, key, value: B x S x hidden)
    "MultiHeadAttention": ([((1, 4, 8), "x"), ((1, 4, 8), "x"), ((1, 4, 8), "x")], {"num_heads": 2}),
}
DOMAINS = {"MultiHeadAttention": "com.microsoft"}
I64_VALUES = {"Reshape": [[4, 4]], "Slice": [[0], [1]], "Unsqueeze": [[0]]}


def probe_graph(op: str, half: int | None = None):
    """A model around one `op` node on bfloat16 tensors: float32 graph inputs cast to
    bf16 (ORT's Python API takes no bfloat16 arrays), the op, its output cast back
    (index/shape inputs as constants). Cast has bf16 CPU kernels, so the op decides.
    `half`: the type in the middle (default bfloat16; float for the control run)."""
    from onnx import TensorProto, helper

    half = TensorProto.BFLOAT16 if half is None else half

    specs, attrs = PROBES[op]
    inputs, initializers, names, nodes = [], [], [], []
    i64 = iter(I64_VALUES.get(op, []))
    for k, (shape, kind) in enumerate(specs):
        name = f"in{k}"
        if kind == "x":
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
            nodes.append(helper.make_node("Cast", [name], [name + "_bf16"], to=half))
            name += "_bf16"
        elif kind == "i64":
            initializers.append(helper.make_tensor(name, TensorProto.INT64, list(shape), next(i64)))
        elif kind == "roi":
            initializers.append(helper.make_tensor(name, TensorProto.FLOAT, [0], []))
        else:  # Resize scales: float32 by the schema
            initializers.append(helper.make_tensor(name, TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0]))
        names.append(name)
    if op == "Cast":  # bf16 -> float itself
        nodes.append(helper.make_node("Cast", names, ["out"], to=TensorProto.FLOAT))
    elif op == "Shape":  # int64 out: nothing to cast back
        nodes.append(helper.make_node("Shape", names, ["out"]))
    else:
        nodes.append(helper.make_node(op, names, ["out_bf16"], domain=DOMAINS.get(op, ""), **attrs))
        nodes.append(helper.make_node("Cast", ["out_bf16"], ["out"], to=TensorProto.FLOAT))
    out_type = TensorProto.INT64 if op == "Shape" else TensorProto.FLOAT
    graph = helper.make_graph(nodes, op, inputs, [helper.make_tensor_value_info("out", out_type, None)],
                              initializers)
    opsets = [helper.make_opsetid("", PROBE_OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), inputs


def probe(op: str, half: int | None = None) -> str:
    """"ok" when a session with `op` on bf16 (or `half`) starts and runs, else ORT's one line."""
    import onnxruntime as ort

    model, inputs = probe_graph(op, half)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the kernel itself, unfused
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {v.name: rng.random([d.dim_value for d in v.type.tensor_type.shape.dim], dtype=np.float32) + 0.5
                 for v in inputs}
        session.run(None, feeds)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - ORT's error is the finding
        return one_line(exc)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# --- 2. the UNet-like model ------------------------------------------------------------


def make_artifact(workdir: Path, channels: tuple[int, ...]) -> tuple[Path, dict[str, Any]]:
    """A tiny SD1.x checkpoint with a wider UNet, exported with bf16 graphs (reused when there)."""
    artifact = workdir / f"artifact-{'-'.join(map(str, channels))}"
    config = dict(in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, sample_size=32)
    if (artifact / "manifest.json").is_file():
        return artifact, config
    import torch
    from diffusers import UNet2DConditionModel

    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sd

    checkpoint = make_tiny_sd(workdir / "checkpoint")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    unet.save_pretrained(checkpoint / "unet")
    log(f"exporting the UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters) with bf16 graphs")
    export(checkpoint, artifact, precision="bf16", overwrite=True)
    return artifact, config


def graph_ops(path: Path) -> dict[str, dict[str, int]]:
    """Op counts of a graph: all nodes, and those computing in bf16 (an input or output
    typed bfloat16 after shape inference)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                             *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    every, bf16 = {}, {}
    for node in model.graph.node:
        every[node.op_type] = every.get(node.op_type, 0) + 1
        if any(types.get(n) == onnx.TensorProto.BFLOAT16 for n in (*node.input, *node.output) if n) \
                and node.op_type != "Cast":
            bf16[node.op_type] = bf16.get(node.op_type, 0) + 1
    return {"all": dict(sorted(every.items())), "bf16": dict(sorted(bf16.items()))}


def weights_only_bf16(source: Path, out: Path) -> Path:
    """The fp32 graph with every large float initializer stored as bf16 behind a Cast to
    float: what ORT can hold in bf16 (it computes in fp32)."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if out.is_file():
        return out
    model = onnx.load(str(source))
    casts = []
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) < LARGE:
            continue
        values = numpy_helper.to_array(tensor).astype(ml_dtypes.bfloat16)
        name = tensor.name
        stored = numpy_helper.from_array(values.view(np.uint16), name + "__bf16")
        stored.data_type = TensorProto.BFLOAT16
        tensor.CopyFrom(stored)
        casts.append(helper.make_node("Cast", [name + "__bf16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}__upcast"))
    nodes = [*casts, *model.graph.node]  # the Casts first: every reader comes after them
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


# --- 3. sessions and timing ------------------------------------------------------------


def feeds_for(session, batch: int, latent: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        if value.name == "timestep":
            feeds[value.name] = np.full((batch,), 500.0, dtype=np.float32)
            continue
        shape = [batch if d == "batch" else latent if isinstance(d, str) and "latent" in d else d
                 for d in value.shape]
        feeds[value.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def open_session(path: Path, config: dict[str, str] | None = None):
    """(session, None) or (None, ORT's one line)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), None
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        return None, one_line(exc)


def time_alternating(sessions: dict[str, Any], feeds: dict[str, np.ndarray], runs: int) -> dict[str, Any]:
    """One warm-up each, then `runs` rounds calling every session in turn (drift hits all alike)."""
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    return {"outputs": outputs, "times": times}


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    from diffrt.runtime.cpu import cpu_info

    cpu = cpu_info()
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    interesting = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")) or f == "bf16")
    return {"cpu": cpu.describe(), "model": cpu.model, "has_bf16": cpu.has_bf16, "has_amx": cpu.has_amx,
            "flags": interesting, "machine": platform.machine(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}  # the machine may be shared


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "ort_bf16", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "command": " ".join(["python", *sys.argv]), "machine": machine()}
    log("probing bf16 kernels, one op at a time")
    result["kernel_probe"] = {op: probe(op) for op in PROBES}
    # the same graphs in float32: a probe graph that is wrong in itself would fail here too
    result["kernel_probe_fp32_control"] = {op: probe(op, 1) for op in PROBES}
    missing = {op for op, status in result["kernel_probe"].items() if status != "ok"}

    artifact, config = make_artifact(args.workdir, args.channel_list)
    manifest = json.loads((artifact / "manifest.json").read_text())
    unet_stages = {name: s for name, s in manifest["stages"].items() if s["role"] == "unet"}
    graphs: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    for name, stage in unet_stages.items():
        path = artifact / name / "model.onnx"
        session, error = open_session(path)
        ops = graph_ops(path)
        entry = {"precision": stage["precision"], "variant": stage["variant"], "session": "ok" if session else error,
                 "ops": ops["all"]}
        if stage["precision"] == "bf16":
            entry["bf16_ops"] = ops["bf16"]
            entry["bf16_ops_without_cpu_kernel"] = {op: n for op, n in ops["bf16"].items() if op in missing}
            entry["bf16_ops_not_probed"] = sorted(op for op in ops["bf16"] if op not in PROBES)
            entry["export_max_abs_error_vs_fp32"] = stage.get("max_abs_error")
            entry["export_checked_on"] = "OpenVINO (diffrt/export/variants.py CHECK_RUNTIME)"
        graphs[name] = entry
        if session is not None:
            sessions[name] = session
    fp32 = "unet-fused" if "unet-fused" in sessions else "unet"
    weights_only = weights_only_bf16(artifact / fp32 / "model.onnx", args.workdir / "weights-bf16" / f"{fp32}.onnx")
    extra = {f"{fp32} with bf16 weights, fp32 compute": open_session(weights_only),
             f"{fp32} with {FASTMATH_KEY}=1": open_session(artifact / fp32 / "model.onnx", {FASTMATH_KEY: "1"})}
    for name, (session, error) in extra.items():
        graphs[name] = {"session": "ok" if session else error}
        if session is not None:
            sessions[name] = session

    log(f"timing {', '.join(sessions)}: {args.runs} rounds")
    feeds = feeds_for(sessions[fp32], args.batch, args.latent)
    timed = time_alternating(sessions, feeds, args.runs)
    reference = timed["outputs"][fp32]
    base = statistics.median(timed["times"][fp32])
    for name, times in timed["times"].items():
        median = statistics.median(times)
        graphs[name].update({"median_seconds": round(median, 4), "times": [round(t, 4) for t in times],
                             "speed_vs_reference_fp32": round(base / median, 3),
                             "max_abs_diff_vs_fp32": float(np.abs(timed["outputs"][name] - reference).max())})
    result.update({"unet_config": {**config, "block_out_channels": list(args.channel_list)},
                   "inputs": {k: list(v.shape) for k, v in feeds.items()}, "runs": args.runs, "graphs": graphs,
                   "fp32_reference_graph": fp32, "seconds": round(time.perf_counter() - started, 1)})
    result["finding"] = finding(result, fp32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    log(f"wrote {args.out}")
    return 0


def finding(result: dict[str, Any], fp32: str) -> str:
    probe_ok = sorted(op for op, s in result["kernel_probe"].items() if s == "ok")
    bf16 = [g for g in result["graphs"].values() if g.get("precision") == "bf16"]
    ran = [g for g in bf16 if g["session"] == "ok"]
    text = (f"ONNX Runtime {result['machine']['onnxruntime']} CPU EP on {result['machine']['cpu']}: "
            f"bf16 kernels for {', '.join(probe_ok) or 'no probed op'}; ")
    if ran:
        return text + "the bf16 UNet graph runs (see graphs for its speed)."
    return text + (f"the bf16 UNet graphs do not start ({bf16[0]['session'] if bf16 else 'none exported'}); "
                   "ORT cannot compute the UNet in bf16 here. It can store the weights in bf16 and compute "
                   "in fp32 (see 'bf16 weights, fp32 compute').")


def summary(result: dict[str, Any]) -> str:
    lines = [f"# ONNX Runtime and bf16: {result['machine']['cpu']}", "",
             f"ORT {result['machine']['onnxruntime']}, providers {result['machine']['providers']}", "",
             "| op (bf16 in/out, opset 22) | CPU EP |", "|---|---|"]
    lines += [f"| {op} | {status} |" for op, status in result["kernel_probe"].items()]
    lines += ["", "| UNet graph | session | median s | speed vs fp32 | max abs diff vs fp32 |", "|---|---|---:|---:|---:|"]
    for name, g in result["graphs"].items():
        lines.append(f"| {name} | {g['session'][:120]} | {g.get('median_seconds', '–')} | "
                     f"{g.get('speed_vs_reference_fp32', '–')} | {g.get('max_abs_diff_vs_fp32', '–')} |")
    return "\n".join(lines + ["", result["finding"]]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
