"""ONNX -> ONNX graph passes run on exported stage folders (export side: they need
`onnx`; the checks need onnxruntime or OpenVINO).

Each pass reads a stage folder (model.onnx [+ model.onnx.data]) and writes a NEW one,
returning the written files (graph first) and a frozen report of what it did:

    files, report = fuse_attention("out/unet", "out/unet-fused")   # report.complete
    files, report = to_half("out/unet", "out/unet-fp16", dtype="fp16")
    compare_graphs("out/unet", "out/unet-fp16", feeds, runtime="openvino").max_abs_error

Each report's `initializers` (InitializerChanges) says what the pass did to the source's
initializers (cast in place, copied, removed): the new stage's weight map follows from it.
"""

from diffrt.export.passes.attention import AttentionReport, fuse_attention
from diffrt.export.passes.compare import Comparison, compare_graphs, psnr
from diffrt.export.passes.half import HalfReport, to_half

__all__ = ["AttentionReport", "Comparison", "HalfReport", "compare_graphs", "fuse_attention", "psnr", "to_half"]
