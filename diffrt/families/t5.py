"""The T5 text encoder stage that SD3 (text_encoder_3) and Flux (text_encoder_2) share:
its IO contract, the request option that sizes it, and its precision rule. Torch-free.

The torch side (export wrapper, tokenizer conversion, tiny models) is
diffrt/export/t5.py; the runtime tokenizer is diffrt/runtime/t5_tokenizer.py (a family
names it with TOKENIZER_KIND = {role: "t5"}).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError

TOKENIZER_KIND = "t5"
# The ONNX dim of the token axis: the request's max_sequence_length, not a fixed size.
LENGTH_DIM = "t5_length"
# diffusers' SD3 and Flux pipelines refuse max_sequence_length > 512 (T5's training length).
MAX_SEQUENCE_LENGTH = 512

# The precision rule, recorded on the T5 stage (StageSpec.facts["half_precisions"]) and
# read back by `keeps_fp32`: the half precisions T5 gets graphs in. fp16 is left out:
# T5's residual stream outgrows fp16 (real T5-XXL reaches |x| ~ 1e4-1e5), and the RMS
# norm's mean(x^2) overflows it from |x| ~ 256 on. Measured with
# benchmarks/t5_precision.py (a tiny T5 with its feed-forward output scaled up): with
# block outputs up to |x| = 1.2e3 the fp16 graph's output is all wrong (max error
# 2.86 on outputs of max 2.86: the norm's variance is inf, its output 0), at 1.2e5 it
# is NaN, while the bf16 graph stays within 0.12 (4% of the outputs' scale) at every
# scale (onnx's reference evaluator, rounding after every op; OpenVINO computing in
# bf16 agrees). ONNX Runtime's CPU EP hides the overflow (it computes most ops of an fp16
# graph in fp32), a GPU would not. So T5 runs in bf16 or fp32; an fp16 generation runs
# the fp32 T5 (TensorRT's demoDiffusion also keeps T5 out of plain fp16).
HALF_PRECISIONS = ("bf16",)
FP16_REASON = ("T5's activations overflow fp16 (benchmarks/t5_precision.py): it runs in bf16 or fp32, and an fp16 "
               "generation runs it in fp32")


def stage_facts() -> dict[str, Any]:
    """The facts the T5 stage carries in the manifest: its precision rule."""
    return {"half_precisions": list(HALF_PRECISIONS)}


def keeps_fp32(spec: Any) -> str:
    """Why this T5 stage has no graph in `spec.precision` ("" = it does), from the rule
    recorded on the stage; at run time, called with the fp32 spec, a non-empty answer
    lets an fp16 generation fall back to the fp32 T5."""
    allowed = spec.facts.get("half_precisions", HALF_PRECISIONS)
    return "" if spec.precision in allowed else FP16_REASON


def stage_io(hidden_size: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """input_ids (batch, t5_length) -> last_hidden_state (batch, t5_length, d_model)."""
    return ((TensorSpec("input_ids", "int64", ("batch", LENGTH_DIM)),),
            (TensorSpec("last_hidden_state", "float32", ("batch", LENGTH_DIM, int(hidden_size))),))


def check_max_sequence_length(value: Any) -> int | None:
    """max_sequence_length: None (the family's default) or 1..512, as diffusers allows."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_SEQUENCE_LENGTH:
        raise DiffrtError(f"max_sequence_length must be an integer from 1 to {MAX_SEQUENCE_LENGTH} (T5 tokens), "
                          f"got {value!r}")
    return int(value)


__all__ = ["FP16_REASON", "HALF_PRECISIONS", "LENGTH_DIM", "MAX_SEQUENCE_LENGTH", "TOKENIZER_KIND",
           "check_max_sequence_length", "keeps_fp32", "stage_facts", "stage_io"]
