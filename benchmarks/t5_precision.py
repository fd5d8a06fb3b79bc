"""How far an fp16 / bf16 T5 encoder graph is from the fp32 one when T5's activations
grow into fp16's danger zone (|x| > 65504), on a tiny random T5 (v1.1 kind: gated GELU,
RMS norms) whose feed-forward output weights (`wo`) are scaled up by a factor.

Real T5-XXL (SD3's and Flux's text encoder) is known to overflow fp16 in its residual
stream (transformers keeps its `wo` layers in fp32 and clamps infinities; TensorRT's
demoDiffusion builds T5 strongly typed); random test weights do not show it, so this
pushes the activations there on purpose and measures, per scale:

- the largest |activation| of the residual stream in torch fp32 (block outputs);
- fp16 graph (diffrt's to_half: weights and activations in fp16, fp32 islands for the
  norm statistics and Softmax) on ONNX Runtime's CPU EP and on onnx's reference
  evaluator (rounds after every op): max |error| vs the fp32 graph, and how many
  outputs are not finite;
- bf16 graph on the reference evaluator (bf16 after every op), and on OpenVINO at
  bf16 inference precision where the CPU computes in bf16 (AVX512_BF16 or AMX).

    python benchmarks/t5_precision.py --out benchmarks/results/t5_precision.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffrt.artifacts import StageSpec, TensorSpec
from diffrt.export.onnx_graph import export_graph
from diffrt.export.passes import to_half
from diffrt.export.passes.compare import run_graph
from diffrt.export.t5 import t5_stage, tiny_t5_encoder
from diffrt.runtime.cpu import cpu_info

SCALES = (1.0, 30.0, 300.0, 3000.0, 30000.0)


def residual_max(encoder, ids: torch.Tensor) -> float:
    """Largest |value| any T5 block writes to the residual stream (fp32 torch)."""
    seen = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: seen.append(float(out[0].abs().max())))
             for block in encoder.encoder.block]
    with torch.no_grad():
        encoder(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return max(seen)


def error(got: np.ndarray, ref: np.ndarray) -> dict:
    finite = np.isfinite(got)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs_error": float(diff[finite].max()) if finite.any() else None,
            "nonfinite_outputs": int((~finite).sum()), "max_abs_reference": float(np.abs(ref).max())}


def measure(scale: float, work: Path, args) -> dict:
    encoder = tiny_t5_encoder(vocab_size=200, d_model=args.d_model, layers=args.layers, seed=0)
    with torch.no_grad():
        for block in encoder.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(scale)
    stage = t5_stage(encoder, torch.Generator().manual_seed(0), "text_encoder_3")
    spec = StageSpec(name="t5", role="text_encoder_3",
                     inputs=(TensorSpec("input_ids", "int64", ("batch", "t5_length")),),
                     outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "t5_length", args.d_model)),))
    folder = work / f"s{scale:g}"
    export_graph(stage.module, stage.trace_inputs, spec, folder / "fp32", 17)
    feeds = {k: v.numpy() for k, v in stage.check_inputs.items()}
    row = {"scale": scale, "residual_max_abs_fp32": residual_max(encoder, stage.check_inputs["input_ids"])}
    reference = run_graph(folder / "fp32", feeds, "ort")["last_hidden_state"]
    for dtype in ("fp16", "bf16"):
        to_half(folder / "fp32", folder / dtype, dtype=dtype)
        row[f"{dtype}_reference_evaluator"] = error(run_graph(folder / dtype, feeds, "reference")["last_hidden_state"],
                                                    reference)
    row["fp16_onnxruntime_cpu"] = error(run_graph(folder / "fp16", feeds, "ort")["last_hidden_state"], reference)
    if cpu_info().has_bf16:
        row["bf16_openvino_bf16"] = error(run_graph(folder / "bf16", feeds, "openvino", "bf16")["last_hidden_state"],
                                          reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/t5_precision.json")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="t5-precision-") as tmp:
        rows = [measure(scale, Path(tmp), args) for scale in SCALES]
    cpu = cpu_info()
    result = {"command": " ".join(["python", *sys.argv]), "cpu": cpu.model or platform.processor(),
              "cpu_bf16": cpu.has_bf16, "model": {"d_model": args.d_model, "layers": args.layers,
                                                    "feed_forward_proj": "gated-gelu"},
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'wo scale':>9} {'max |resid|':>12} {'fp16 ORT':>22} {'fp16 ref':>22} {'bf16 ref':>12} {'bf16 OV':>12}")
    for r in rows:
        def fmt(key):
            e = r.get(key)
            if e is None:
                return "-"
            bad = f" ({e['nonfinite_outputs']} non-finite)" if e["nonfinite_outputs"] else ""
            return ("n/a" if e["max_abs_error"] is None else f"{e['max_abs_error']:.2e}") + bad
        print(f"{r['scale']:>9g} {r['residual_max_abs_fp32']:>12.3g} {fmt('fp16_onnxruntime_cpu'):>22} "
              f"{fmt('fp16_reference_evaluator'):>22} {fmt('bf16_reference_evaluator'):>12} "
              f"{fmt('bf16_openvino_bf16'):>12}")


if __name__ == "__main__":
    main()
