"""The backend protocol: a session per stage, `run(feeds) -> outputs`, explicit lifecycle.

Arrays are numpy on CPU backends. A GPU backend's sessions take and return device
arrays (CuPy arrays for TensorRT and ONNX Runtime's CUDA providers, torch tensors for
the torch backend) so that latents, text embeddings and timesteps stay on the device
across all steps: the pipeline moves what it makes on the host (noise, timesteps,
conditioning) to the device once with `backend.to_device`, steps the schedulers on
whatever array it holds (they use the array's own namespace, diffrt.runtime.arrays),
and calls `backend.to_host` once, on the decoded image. Sessions also accept host
(numpy) feeds. Arrays cross between libraries through DLPack (a session takes any
array with `__dlpack__`: torch.from_dlpack, cupy.from_dlpack), never through a host
copy. That is why the protocol names no array type.

`profile` binds some of a stage's named dims (e.g. {"batch": 2, "latent_height": 64,
"latent_width": 64}) to the values the caller expects, so that backends which compile
for static shapes (OpenVINO, TensorRT) can compile at load instead of on the first
request. Dims it leaves unbound are taken from the feeds when the stage runs; a
backend that compiles per shape then compiles (or loads from its engine cache) once
per new shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from diffrt.artifacts import StageSpec
from diffrt.errors import DiffrtError, OutOfMemoryError


# How the backends' libraries report a failed allocation (ONNX Runtime's BFC arena and
# CPU allocator, C++'s bad_alloc through OpenVINO, CUDA).
_ALLOCATION_FAILURES = ("Failed to allocate", "bad_alloc", "out of memory", "OUT_OF_MEMORY")


def raise_if_out_of_memory(exc: BaseException, spec: StageSpec, feeds: Mapping[str, Any]) -> None:
    """Re-raise a backend's failed allocation as one line naming the stage and the shapes
    it was given; any other error is left to the caller."""
    text = str(exc)
    if isinstance(exc, MemoryError) or any(marker in text for marker in _ALLOCATION_FAILURES):
        shapes = ", ".join(f"{name}{list(getattr(value, 'shape', ()))}" for name, value in feeds.items())
        raise OutOfMemoryError(f"{spec.name} ran out of memory on inputs {shapes}") from None


def check_feeds(spec: StageSpec, feeds: Mapping[str, Any]) -> None:
    """Every input of the stage is fed (one line naming the first missing one)."""
    for tensor in spec.inputs:
        if tensor.name not in feeds:
            raise DiffrtError(f"stage {spec.name}: input {tensor.name!r} was not fed")


class Session(Protocol):
    spec: StageSpec

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run the stage; every input of `spec` must be fed."""

    def close(self) -> None:
        """Release the session's memory; the session is unusable afterwards."""


class Backend(Protocol):
    name: str
    graph_precisions: tuple[str, ...]
    """The graph precisions this backend runs, preferred first (an artifact may hold
    fp32, fp16 and bf16 graphs of a stage)."""
    fused_attention: bool
    """Whether it prefers a stage's fused-attention graph variant (ORT's
    MultiHeadAttention) over the portable MatMul-Softmax-MatMul one, when there is one."""
    fuses_attention_itself: bool
    """Whether it fuses a portable graph's attention itself (OpenVINO, TensorRT): the
    up-front memory estimate, a lower bound, then leaves the score tensors out."""

    device: str
    """Where its sessions' outputs live: "cpu" (numpy arrays) or "cuda"."""

    def to_device(self, array: Any) -> Any:
        """A host (numpy) array as the array type its sessions take on its device
        (the same numpy array on CPU backends)."""

    def to_host(self, array: Any) -> Any:
        """A numpy array with the contents of one of its sessions' outputs."""

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> Session:
        """Load the stage's graph (or a built engine for it) from the artifact folder."""

    def describe(self) -> str:
        """One line: library version and device, for timings and reports."""
