"""One TensorRT execution context and its CUDA graphs: the run state a context of the
tensorrt backend (tensorrt.py) holds per engine. Every TensorRT call's status is checked."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cupy as cp

from diffrt.errors import DiffrtError
from diffrt.runtime.arrays import DEVICE_ALIGNMENT
from diffrt.runtime.tensorrt_engines import check_shapes

if TYPE_CHECKING:
    from diffrt.runtime.backends.tensorrt import _Engine

logger = logging.getLogger(__name__)

MAX_GRAPHS = 4  # CUDA graphs kept per engine (one per input shape), least recently used dropped


class _Captured:
    """A CUDA graph of one engine run at one input shape, with its fixed buffers."""

    def __init__(self, inputs: dict[str, cp.ndarray], outputs: dict[str, cp.ndarray], graph: Any):
        self.inputs, self.outputs, self.graph = inputs, outputs, graph




class Runner:
    """One context's execution context on one engine, and its CUDA graphs."""

    def __init__(self, loaded: _Engine):
        self.loaded, self.label, self.profile = loaded, loaded.label, loaded.profile
        self.inputs, self.outputs, self.dtypes = loaded.inputs, loaded.outputs, loaded.dtypes
        self.context = loaded.execution_context()
        self.log = loaded.backend.log
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    # -- the TensorRT calls, each status checked ---------------------------------------

    def set_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """Set the input shapes (checked against the profile first); the output shapes."""
        check_shapes(self.label, self.profile, shapes)
        self.log.clear()
        for name in self.inputs:
            if not self.context.set_input_shape(name, tuple(int(d) for d in shapes[name])):
                raise DiffrtError(f"TensorRT engine {self.label}: set_input_shape({name}, {list(shapes[name])}) failed "
                                  f"({self.log.why()})")
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise DiffrtError(f"TensorRT engine {self.label}: output {name} has no shape ({list(shape)}) for the "
                                  f"inputs {dict(shapes)}")
            out[name] = shape
        return out

    def set_addresses(self, arrays: Mapping[str, cp.ndarray]) -> None:
        self.log.clear()
        for name, array in arrays.items():
            pointer = array.data.ptr
            if pointer % DEVICE_ALIGNMENT:  # TensorRT's rule (setTensorAddress, NvInferRuntime.h)
                raise DiffrtError(f"TensorRT engine {self.label}: tensor {name} starts at {pointer:#x}, which is not "
                                  f"{DEVICE_ALIGNMENT}-byte aligned")
            if not self.context.set_tensor_address(name, pointer):
                raise DiffrtError(f"TensorRT engine {self.label}: set_tensor_address({name}) failed "
                                  f"({self.log.why()})")

    def execute(self, stream: cp.cuda.Stream) -> None:
        self.log.clear()
        if not self.context.execute_async_v3(stream.ptr):
            raise DiffrtError(f"TensorRT engine {self.label}: execute_async_v3 failed ({self.log.why()})")

    # -- one run -----------------------------------------------------------------------

    def run(self, arrays: dict[str, cp.ndarray], stream: cp.cuda.Stream, cuda_graphs: bool) -> dict[str, cp.ndarray]:
        """Enqueue a run on `stream`; outputs are allocated on the caller's current
        stream before `stream` is made to wait for it (see TensorRTContext.run)."""
        shapes = {name: arrays[name].shape for name in self.inputs}
        output_shapes = self.set_shapes(shapes)
        outputs = {name: cp.empty(shape, dtype=self.dtypes[name]) for name, shape in output_shapes.items()}
        key = tuple(shapes[name] for name in self.inputs)
        captured = self.graphs.get(key) if cuda_graphs else None
        if cuda_graphs and captured is None:
            captured = self._fixed_buffers(arrays, output_shapes)
        wait_for_caller(stream)
        if not cuda_graphs:
            self.set_addresses({**arrays, **outputs})
            self.execute(stream)
            return outputs
        with stream:
            for name in self.inputs:
                captured.inputs[name][...] = arrays[name]
        if captured.graph is None:
            self._capture(captured, stream)  # the warm-up run inside leaves this call's outputs
        else:
            self.graphs.move_to_end(key)
            captured.graph.launch(stream=stream)
        with stream:
            for name in self.outputs:
                outputs[name][...] = captured.outputs[name]
        return outputs

    def _fixed_buffers(self, arrays: Mapping[str, cp.ndarray], output_shapes: Mapping[str, tuple]) -> _Captured:
        key = tuple(arrays[name].shape for name in self.inputs)
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        captured = _Captured({n: cp.empty(arrays[n].shape, dtype=self.dtypes[n]) for n in self.inputs},
                             {n: cp.empty(s, dtype=self.dtypes[n]) for n, s in output_shapes.items()}, None)
        self.graphs[key] = captured
        return captured

    def _capture(self, captured: _Captured, stream: cp.cuda.Stream) -> None:
        """Warm-up run (TensorRT finishes its shape-dependent setup there), then capture
        the same run into a CUDA graph."""
        self.set_addresses({**captured.inputs, **captured.outputs})
        self.execute(stream)
        stream.synchronize()
        stream.begin_capture()
        try:
            self.execute(stream)
        finally:
            graph = stream.end_capture()
        captured.graph = graph
        logger.info("TensorRT engine %s: captured a CUDA graph for %s", self.label,
                    {n: list(b.shape) for n, b in captured.inputs.items()})

    def close(self) -> None:
        """Free the graphs, their buffers and the execution context (the caller
        synchronized the stream: work still queued there may read them)."""
        self.graphs.clear()
        self.context = None


def wait_for_caller(stream: cp.cuda.Stream) -> None:
    stream.wait_event(cp.cuda.get_current_stream().record())
