"""Arrays of any library: the namespace an array's math runs in, and host copies.

The runtime's hot path (scheduler steps, classifier-free guidance, the decoder's
scaling) runs on whatever array a backend returned: numpy on CPU backends, CuPy
arrays on a GPU (TensorRT, ONNX Runtime's CUDA providers), torch tensors (the torch
backend). `namespace(x)` gives the array-API namespace of `x`; for numpy it is numpy
itself, so the CPU path computes exactly what it did before. Other libraries go
through `array_api_compat` (a small pure-Python package, a dependency of the runtime),
which gives CuPy and torch the standard names (`concat`, `asarray(device=)`, ...).

Scalars stay numpy float32 (np.float32 * array keeps float32 in every library: numpy,
CuPy and torch all treat a numpy scalar as a weak scalar next to an array, and
CuPy/torch arrays take priority over numpy scalars in binary operators).

Device pointers: TensorRT requires every tensor address it is given to be 256-byte
aligned ("The pointer must have at least 256-byte alignment", setTensorAddress in
TensorRT's NvInferRuntime.h), and ONNX Runtime's TensorRT provider hands the addresses
bound through IOBinding to TensorRT as they are. CuPy allocates in 512-byte units, so a
fresh array is aligned; a view is not (row i of a (steps, rows) float32 array starts
i * rows * 4 bytes in). `aligned` copies such a view before its address is handed on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffrt.errors import DiffrtError


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of the arrays (numpy for numpy arrays and scalars)."""
    import_compat = not all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays)
    if not import_compat and hasattr(np, "concat"):  # numpy >= 2 is the standard namespace itself
        return np
    import array_api_compat

    if not import_compat:
        return array_api_compat.numpy

    return array_api_compat.array_namespace(*(a for a in arrays if not isinstance(a, (np.generic, float, int))))


def is_numpy(array: Any) -> bool:
    return isinstance(array, (np.ndarray, np.generic))


def device(array: Any) -> Any:
    """The array's device in its own library's terms ("cpu" for numpy)."""
    if is_numpy(array):
        return "cpu"
    import array_api_compat

    return array_api_compat.device(array)


def as_float32(array: Any) -> Any:
    """The array as float32 in its own namespace, without a copy when it already is."""
    if is_numpy(array):
        return np.asarray(array, dtype=np.float32)
    xp = namespace(array)
    return array if array.dtype == xp.float32 else xp.astype(array, xp.float32)


def like(host: np.ndarray, reference: Any) -> Any:
    """A numpy array as the array type of `reference`, on its device (one copy)."""
    if is_numpy(reference):
        return host
    xp = namespace(reference)
    return xp.asarray(host, device=device(reference))


def to_host(array: Any) -> np.ndarray:
    """A numpy copy of any array (numpy arrays are returned as they are)."""
    if is_numpy(array) or not hasattr(array, "__dlpack__"):  # numpy, or a Python scalar / list
        return np.asarray(array)
    if hasattr(array, "get") and type(array).__module__.startswith("cupy"):
        return array.get()
    if type(array).__module__.startswith("torch"):
        return array.detach().cpu().numpy()
    return np.from_dlpack(array)



DEVICE_ALIGNMENT = 256  # bytes, TensorRT's requirement for every tensor address


def data_pointer(array: Any) -> int:
    """The address of the array's first element (numpy: host memory; CuPy: device memory)."""
    if is_numpy(array):
        return int(np.asarray(array).ctypes.data)
    return int(array.data.ptr)


def aligned(array: Any, alignment: int = DEVICE_ALIGNMENT) -> Any:
    """`array` itself when its data starts on an `alignment`-byte boundary, else a copy
    (CuPy allocates every new array 512-byte aligned)."""
    if data_pointer(array) % alignment == 0:
        return array
    copy = array.copy()
    if data_pointer(copy) % alignment:
        raise DiffrtError(f"cannot get a {alignment}-byte aligned buffer for a {type(array).__name__} of shape "
                          f"{tuple(array.shape)} (its allocator returned {data_pointer(copy):#x})")
    return copy
