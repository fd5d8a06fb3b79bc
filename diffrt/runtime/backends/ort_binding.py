"""ONNX Runtime's IOBinding for the ort backend: inputs bound where they are, outputs
left on the device (CuPy arrays over ORT's buffers on CUDA), and the fixed buffers a
CUDA-graph session replays on. See ort.py for when it is used."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from diffrt.artifacts import StageSpec
from diffrt.errors import DiffrtError
from diffrt.runtime import arrays as device_arrays
from diffrt.runtime.backends.base import check_feeds, raise_if_out_of_memory

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
# ORT's type strings (OrtValue.data_type()) -> numpy
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


class IoBinding:
    """Runs a session through ORT's IOBinding on one device ("cpu" or "cuda").

    Inputs are bound in place (numpy by host pointer; CuPy by device pointer, numpy
    inputs copied to the device first), cast to the graph's input dtype where needed;
    outputs are allocated by ORT on the device and returned without a copy: numpy on
    the CPU, CuPy arrays owning ORT's buffers on CUDA. `cuda_graph`: the session was
    created with the CUDA provider's enable_cuda_graph; inputs are copied into fixed
    buffers and outputs out of fixed ones (ORT replays the captured graph on the
    addresses it captured)."""

    def __init__(self, device: str, device_id: int = 0, cuda_graph: bool = False):
        if device not in ("cpu", "cuda"):
            raise DiffrtError(f"IoBinding device={device!r}; allowed: cpu, cuda")
        self.device, self.device_id, self.cuda_graph = device, device_id, cuda_graph
        self._fixed: dict[str, Any] = {}  # cuda_graph: name -> (input array | output OrtValue), one shape

    def run(self, session: ort.InferenceSession, spec: StageSpec, feeds: Mapping[str, Any]) -> dict[str, Any]:
        binding = session.io_binding()
        keep = []  # inputs must outlive the run
        check_feeds(spec, feeds)
        for tensor in spec.inputs:
            array = self._input(tensor.name, feeds[tensor.name], NUMPY_DTYPES[tensor.dtype])
            keep.append(array)
            binding.bind_input(tensor.name, self.device, self.device_id, array.dtype, list(array.shape),
                               _pointer(array))
        outputs = self._bind_outputs(session, binding, spec)
        if self.device == "cuda":
            _cuda_sync()  # the inputs were written on CuPy's stream; ORT computes on its own
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own types; an allocation failure is the user's size
            raise_if_out_of_memory(exc, spec, feeds)
            raise
        values = outputs if outputs is not None else binding.get_outputs()
        result = {}
        for tensor, value in zip(spec.outputs, values, strict=True):
            array = value.numpy() if self.device == "cpu" else _cupy_view(value)
            result[tensor.name] = array.copy() if self.cuda_graph else array
        return result

    def _input(self, name: str, array: Any, dtype: Any) -> Any:
        if self.device == "cpu":
            return np.ascontiguousarray(np.asarray(array), dtype=dtype)
        import cupy

        # aligned: the TensorRT provider hands bound addresses to TensorRT (256-byte rule)
        array = device_arrays.aligned(cupy.ascontiguousarray(cupy.asarray(array, dtype=dtype)))
        if not self.cuda_graph:
            return array
        fixed = self._fixed.get(name)
        if fixed is None or fixed.shape != array.shape:
            if fixed is not None:
                raise DiffrtError(f"input {name!r}: shape {tuple(array.shape)} differs from the captured CUDA graph's "
                                  f"{tuple(fixed.shape)}; load with cuda_graphs=False to run several shapes")
            fixed = self._fixed[name] = array.copy()
        else:
            fixed[...] = array
        return fixed

    def close(self) -> None:
        """Free the fixed buffers once CuPy's stream is done with them (the last
        output copy may still be queued there)."""
        if self.device == "cuda" and self._fixed:
            _cuda_sync()
        self._fixed.clear()

    def _bind_outputs(self, session: ort.InferenceSession, binding: Any, spec: StageSpec) -> list | None:
        if not self.cuda_graph:
            for tensor in spec.outputs:
                binding.bind_output(tensor.name, self.device, self.device_id)
            return None
        values = []
        for tensor in spec.outputs:
            key = f"out:{tensor.name}"
            if key not in self._fixed:  # allocated once, at the captured shape
                shape = [d if isinstance(d, int) else -1 for d in tensor.shape]
                if -1 in shape:
                    shape = _output_shape(spec, tensor, self._fixed)
                self._fixed[key] = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, NUMPY_DTYPES[tensor.dtype], "cuda", self.device_id)
            binding.bind_ortvalue_output(tensor.name, self._fixed[key])
            values.append(self._fixed[key])
        return values


def _output_shape(spec: StageSpec, tensor: Any, fixed: Mapping[str, Any]) -> list[int]:
    """An output's shape from the named dims its inputs bound (CUDA graphs need it up front)."""
    dims: dict[str, int] = {}
    for spec_input in spec.inputs:
        if spec_input.name in fixed:
            dims.update({d: int(v) for d, v in zip(spec_input.shape, fixed[spec_input.name].shape) if isinstance(d, str)})
    unbound = [d for d in tensor.shape if isinstance(d, str) and d not in dims]
    if unbound:
        raise DiffrtError(f"stage {spec.name}: output {tensor.name!r} has dims {', '.join(unbound)} no input fixes; "
                          "CUDA graphs need static output shapes (use cuda_graphs only for the denoiser)")
    return [dims[d] if isinstance(d, str) else d for d in tensor.shape]


def _pointer(array: Any) -> int:
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    return array.data.ptr  # CuPy


def _cuda_sync() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def _cupy_view(value: ort.OrtValue) -> Any:
    """A CuPy array over an OrtValue's device buffer, keeping the OrtValue alive."""
    import cupy

    dtype = np.dtype(_ORT_TYPES[value.data_type()])
    shape = tuple(value.shape())
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = cupy.cuda.UnownedMemory(value.data_ptr(), size, value)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))
