"""Stand-ins for CuPy and TensorRT that run diffrt's TensorRT code paths on a CPU.

No GPU, TensorRT or CuPy on CI machines, so these emulate what the code under test
relies on, and record what it does; the tests assert on the records:

* CuPy: a "device" array is a numpy array (an ndarray subclass) in memory allocated the
  way CuPy allocates: every new array starts on a 512-byte boundary (CuPy's allocation
  unit, ALLOCATION_UNIT_SIZE in cupy/cuda/memory.pyx), a view keeps its offset, and
  `.data.ptr` is its address. Implicit conversion to numpy stays allowed (numpy code
  paths are not what is tested here). Streams record synchronizations; a stream in
  capture records executions into a graph that `launch` replays.
* TensorRT: the builder "serializes" the path of the ONNX graph it parsed (and whether
  it was built refittable); an engine's IO tensors are the graph's; an execution context
  records every address given to set_tensor_address and, when executed, runs the graph
  with ONNX Runtime (CPU) on the memory at those addresses: a wrong address or a stale
  buffer gives a wrong image. A Refitter takes weights named as the graph's initializers;
  like TensorRT, which combines some weights when it optimizes, it reports the other
  initializers of a node whose weight was set as missing until they are set too, and
  refit_cuda_engine makes the engine run with the new values (ONNX Runtime's
  add_initializer).

`install(monkeypatch)` puts both in sys.modules (and re-imports diffrt's TensorRT
backend against them) for one test.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import types
import weakref
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

ALLOCATION_UNIT = 512


class Recorder:
    """What the code did: addresses handed to TensorRT, and the order of executions,
    synchronizations and frees."""

    def __init__(self):
        self.addresses: list[tuple[str, int]] = []
        self.events: list[str] = []
        self.network_flags: list[int] = []
        self.executed_on: list[int] = []  # the stream handle of every execute_async_v3
        self.refits: list[dict[str, np.ndarray]] = []  # the weights of every refit_cuda_engine
        self.fail_build = False
        self._blocks: dict[int, weakref.ref] = {}
        self.streams: dict[int, FakeStream] = {}

    def register(self, raw: np.ndarray) -> None:
        self._blocks[raw.ctypes.data] = weakref.ref(raw)

    def memory(self, pointer: int, shape, dtype) -> np.ndarray:
        """The fake device memory at `pointer`, as an array of `shape` and `dtype`."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        for start, ref in list(self._blocks.items()):
            raw = ref()
            if raw is None:
                del self._blocks[start]
            elif start <= pointer and pointer + nbytes <= start + raw.nbytes:
                return raw[pointer - start:pointer - start + nbytes].view(dtype).reshape(shape)
        raise AssertionError(f"address {pointer:#x} ({nbytes} bytes) is not in fake device memory")


RECORD = Recorder()


# -- CuPy ------------------------------------------------------------------------------------

def empty(shape, dtype=np.float32) -> FakeArray:
    shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + ALLOCATION_UNIT, np.uint8)
    RECORD.register(raw)
    start = (-raw.ctypes.data) % ALLOCATION_UNIT
    return raw[start:start + nbytes].view(dtype).reshape(shape).view(FakeArray)


def _fresh(array) -> FakeArray:
    out = empty(array.shape, array.dtype)
    np.copyto(out.view(np.ndarray), np.asarray(array).view(np.ndarray))
    return out


class FakeArray(np.ndarray):
    """A CuPy array stand-in; new results are reallocated aligned, as CuPy allocates them."""

    @property
    def data(self):
        return SimpleNamespace(ptr=int(self.__array_interface__["data"][0]))

    def get(self) -> np.ndarray:
        return np.array(self.view(np.ndarray), copy=True)

    def copy(self, order="C") -> FakeArray:
        return _fresh(self)

    def astype(self, dtype, *args, **kwargs) -> FakeArray:
        out = empty(self.shape, dtype)
        np.copyto(out.view(np.ndarray), self.view(np.ndarray), casting="unsafe")
        return out

    def __array_wrap__(self, array, context=None, return_scalar=False):
        if return_scalar or not array.flags.owndata:
            return super().__array_wrap__(array, context, return_scalar)
        return _fresh(array)

    def __array_function__(self, func, types, args, kwargs):
        result = super().__array_function__(func, types, args, kwargs)
        if isinstance(result, np.ndarray) and result.flags.owndata:
            return _fresh(result)
        return result


def asarray(array, dtype=None) -> FakeArray:
    if isinstance(array, FakeArray) and (dtype is None or array.dtype == np.dtype(dtype)):
        return array
    host = np.asarray(array.view(np.ndarray) if isinstance(array, FakeArray) else array, dtype=dtype)
    return _fresh(host)


def ascontiguousarray(array) -> FakeArray:
    return array if array.flags.c_contiguous else array.copy()


class FakeStream:
    def __init__(self, non_blocking: bool = False):
        self.ptr = id(self)
        self.capturing: list | None = None
        RECORD.streams[self.ptr] = self

    def record(self):
        return SimpleNamespace(stream=self.ptr)

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        RECORD.events.append(f"synchronize {self.ptr}")

    def __enter__(self):
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc):
        _CURRENT.pop()

    def begin_capture(self, mode=None) -> None:
        self.capturing = []

    def end_capture(self):
        graph, self.capturing = FakeGraph(self.capturing), None
        return graph


class FakeGraph:
    def __init__(self, work: list):
        self.work = work

    def launch(self, stream=None) -> None:
        for run in self.work:
            run()

    def __del__(self):
        RECORD.events.append("free graph")


_CURRENT = [FakeStream()]


def make_cupy() -> types.ModuleType:
    cupy = _module("cupy")
    cupy.__version__ = "0+fake"
    cupy.ndarray, cupy.empty, cupy.asarray, cupy.ascontiguousarray = FakeArray, empty, asarray, ascontiguousarray
    cupy.asnumpy = lambda a: np.asarray(a).view(np.ndarray).copy()
    cupy.from_dlpack = lambda x: _fresh(np.from_dlpack(x))
    props = {"name": b"Fake GPU (CPU emulation)", "major": 9, "minor": 0}
    runtime = SimpleNamespace(getDeviceProperties=lambda device: props, deviceSynchronize=lambda: None)
    cupy.cuda = SimpleNamespace(Stream=FakeStream, get_current_stream=lambda: _CURRENT[-1],
                                Device=lambda *a: SimpleNamespace(id=0), runtime=runtime)
    return cupy


# -- TensorRT --------------------------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}
TIMING_CACHE = b"timing cache of this fake GPU"


def _session(graph: str, weights: dict | None = None):
    options = ort.SessionOptions()
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in (weights or {}).values()]
    for name, value in zip(weights or {}, values):
        options.add_initializer(name, value)
    # ORT's NchwcTransformer would keep the graph's own Conv weights (see backends/ort.py)
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["NchwcTransformer"] if weights else None)
    session.keep = (weights, values)  # ORT reads them for as long as the session lives
    return session


def make_tensorrt(strongly_typed_flag: bool = True) -> types.ModuleType:
    trt = _module("tensorrt")
    trt.__version__ = "11.4.0.106+fake"
    trt.DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 UINT8 BOOL")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.BuilderFlag = enum.Enum("BuilderFlag", "REFIT")
    trt.Weights = FakeWeights
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    flags = {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1} if strongly_typed_flag else {
        "PREFER_JIT_PYTHON_PLUGINS": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", flags)

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self):
            pass

    trt.ILogger = ILogger

    class Network:
        def __init__(self):
            self.graph, self.inputs = None, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, log):
            self.network = network

        def parse_from_file(self, path):
            self.network.graph = path
            self.network.inputs = [SimpleNamespace(name=i.name, shape=tuple(d if isinstance(d, int) else -1
                                                                            for d in i.shape))
                                   for i in _session(path).get_inputs()]
            return True

    class Config:
        builder_optimization_level = 3

        def __init__(self, log):
            self.log, self.timing, self.flags = log, None, set()

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def set_memory_pool_limit(self, pool, size):
            pass

        def create_timing_cache(self, data):
            return SimpleNamespace(data=bytes(data), serialize=lambda: TIMING_CACHE)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data not in (b"", TIMING_CACHE):  # as TensorRT: the mismatch is logged as an ERROR
                self.log.log(ILogger.Severity.ERROR, "IBuilderConfig::setTimingCache: the timing cache was "
                                                      "created on a different device")
                return False
            self.timing = cache
            return True

        def get_timing_cache(self):
            return self.timing

        def add_optimization_profile(self, profile):
            return 0

    class Builder:
        def __init__(self, log):
            self.log = log

        def create_network(self, flags=0):
            RECORD.network_flags.append(int(flags))
            return Network()

        def create_builder_config(self):
            return Config(self.log)

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda name, lo, opt, hi: None)

        def build_serialized_network(self, network, config):
            if RECORD.fail_build:
                return None
            return json.dumps({"graph": network.graph, "refit": "REFIT" in config.flags}).encode()

    class Runtime:
        def __init__(self, log):
            pass

        def deserialize_cuda_engine(self, plan):
            data = json.loads(bytes(plan))
            return Engine(data["graph"], trt, data.get("refit", False))

    trt.Builder, trt.OnnxParser, trt.Runtime, trt.Refitter = Builder, OnnxParser, Runtime, Refitter
    return trt


class FakeWeights:
    """trt.Weights(array) or trt.Weights(DataType, pointer, count)."""

    def __init__(self, array_or_type, pointer=None, count=None):
        if pointer is None:
            self.array = np.array(array_or_type, copy=True)
        else:  # bfloat16 bit patterns: kept as uint16 (numpy has no bfloat16)
            self.array = np.ctypeslib.as_array((ctypes.c_uint16 * count).from_address(pointer)).copy()


class Refitter:
    def __init__(self, engine, log):
        import onnx

        self.engine, self.log, self.new = engine, log, {}
        graph = onnx.load(engine.graph, load_external_data=False).graph
        self.shapes = {i.name: tuple(i.dims) for i in graph.initializer}
        # the initializers a node reads together: TensorRT may have combined them
        self.groups = [[n for n in node.input if n in self.shapes] for node in graph.node]

    def set_named_weights(self, name, weights):
        if name not in self.shapes or weights.array.size != int(np.prod(self.shapes[name])):
            self.log.log(type(self.log).Severity.ERROR, f"no refittable weights {name!r} of that size")
            return False
        self.new[name] = weights.array.reshape(self.shapes[name])
        return True

    def get_missing_weights(self):
        return sorted({n for group in self.groups if set(group) & set(self.new) for n in group} - set(self.new))

    def refit_cuda_engine(self):
        if self.get_missing_weights() or not self.engine.refittable:
            return False
        RECORD.refits.append(dict(self.new))
        self.engine.weights.update(self.new)
        self.engine.session = _session(self.engine.graph, self.engine.weights)
        return True


class Engine:
    def __init__(self, graph: str, trt, refittable: bool = False):
        self.graph, self.refittable, self.weights = graph, refittable, {}
        self.session = _session(graph)
        self.io = [(t.name, trt.TensorIOMode.INPUT, t.type) for t in self.session.get_inputs()]
        self.io += [(t.name, trt.TensorIOMode.OUTPUT, t.type) for t in self.session.get_outputs()]
        self.trt = trt
        self._shapes: dict[tuple, dict[str, tuple]] = {}

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, index):
        return self.io[index][0]

    def get_tensor_mode(self, name):
        return next(mode for n, mode, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return self.trt.DataType[_ORT_TYPES[next(t for n, _, t in self.io if n == name)]]

    def output_shapes(self, shapes: dict[str, tuple]) -> dict[str, tuple]:
        key = tuple(sorted(shapes.items()))
        if key not in self._shapes:
            feeds = {i.name: np.zeros(shapes[i.name], _NUMPY[_ORT_TYPES[i.type]]) for i in self.session.get_inputs()}
            outputs = self.session.run(None, feeds)
            self._shapes[key] = {o.name: v.shape for o, v in zip(self.session.get_outputs(), outputs)}
        return self._shapes[key]

    def create_execution_context(self):
        return Context(self)


class Context:
    def __init__(self, engine: Engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes[name] if name in self.shapes else self.engine.output_shapes(self.shapes)[name]

    def set_tensor_address(self, name, pointer):
        RECORD.addresses.append((name, int(pointer)))
        self.addresses[name] = int(pointer)
        return True

    def execute_async_v3(self, stream_handle):
        addresses, shapes = dict(self.addresses), dict(self.shapes)
        stream = RECORD.streams[stream_handle]
        RECORD.executed_on.append(stream_handle)
        if stream.capturing is not None:
            stream.capturing.append(lambda: self._run(addresses, shapes))
        else:
            self._run(addresses, shapes)
        RECORD.events.append("execute")
        return True

    def _run(self, addresses, shapes) -> None:
        session = self.engine.session
        feeds = {i.name: RECORD.memory(addresses[i.name], shapes[i.name], _NUMPY[_ORT_TYPES[i.type]]).copy()
                 for i in session.get_inputs()}
        for output, value in zip(session.get_outputs(), session.run(None, feeds)):
            RECORD.memory(addresses[output.name], value.shape, value.dtype)[...] = value

    def __del__(self):
        RECORD.events.append("free context")


# -- installing them ---------------------------------------------------------------------------

def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() sees it installed
    return module


def install(monkeypatch, strongly_typed_flag: bool = True) -> Recorder:
    """Fake CuPy and TensorRT for one test; diffrt's TensorRT backend is imported anew
    against them (and dropped afterwards). Returns a fresh recorder."""
    global RECORD
    RECORD = Recorder()
    monkeypatch.setitem(sys.modules, "cupy", make_cupy())
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(strongly_typed_flag))
    for module in ("diffrt.runtime.backends.tensorrt", "diffrt.runtime.backends.tensorrt_runner"):
        monkeypatch.setitem(sys.modules, module, None)  # restored (removed) after the test
        del sys.modules[module]
    return RECORD
