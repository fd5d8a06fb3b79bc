"""Ahead-of-time engine builds (`diffrt build`): TensorRT engines from an artifact's
ONNX graphs. Needs the build machine's TensorRT; the runtime only finds what these write
(diffrt/runtime/tensorrt_engines.py)."""
