"""The backend protocol: a compiled model per stage, a context per worker.

    model = backend.open(folder, spec, profile=...)   # the weights / engine, loaded once
    context = model.context()                          # one worker's run state
    outputs = context.run(feeds)
    context.close(); model.close()

A `CompiledModel` is what is expensive and shared: the loaded weights, the compiled
graph or engine (an ONNX Runtime InferenceSession, OpenVINO's compiled models, a
TensorRT engine, the torch modules). A `Context` is what one worker needs to run it
and must not share: OpenVINO's InferRequest, a TensorRT execution context and its
CUDA stream, ONNX Runtime's IOBinding buffers. Any number of contexts of one model run
at the same time, each on its own thread, on one copy of the weights; one context
serves one call at a time (a second caller waits for it). `model.update_weights`
replaces named initializers of the graph (a LoRA, a fine-tune) for every context of
the model.

Arrays are numpy on CPU backends. A GPU backend's contexts take and return device
arrays (CuPy arrays for TensorRT and ONNX Runtime's CUDA providers, torch tensors for
the torch backend) so that latents, text embeddings and timesteps stay on the device
across all steps: the pipeline moves what it makes on the host (noise, timesteps,
conditioning) to the device once with `backend.to_device`, steps the schedulers on
whatever array it holds (they use the array's own namespace, diffrt.runtime.arrays),
and calls `backend.to_host` once, on the decoded image. Contexts also accept host
(numpy) feeds. Arrays cross between libraries through DLPack (a context takes any
array with `__dlpack__`: torch.from_dlpack, cupy.from_dlpack), never through a host
copy. That is why the protocol names no array type.

`profile` binds some of a stage's named dims (e.g. {"batch": 2, "latent_height": 64,
"latent_width": 64}) to the values the caller expects, so that backends which compile
for static shapes (OpenVINO, TensorRT) can compile at load instead of on the first
request. Dims it leaves unbound are taken from the feeds when the stage runs; a
backend that compiles per shape then compiles (or loads from its engine cache) once
per new shape. `context.prepare(shapes)` gets a context ready for full input shapes
(OpenVINO: its InferRequest; TensorRT: the engine and its execution context).

What a backend can do is said by typed attributes of `Backend` (below), which the
pipeline reads as they are: every backend defines every one of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

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


def profile_shapes(spec: StageSpec, profile: Mapping[str, int] | None) -> dict[str, tuple[int, ...]] | None:
    """The stage's full input shapes when `profile` binds every named dim of it, else
    None. Names the stage does not use are ignored: one profile serves every stage."""
    if not profile:
        return None
    named = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    for name, value in profile.items():
        if name in named and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DiffrtError(f"profile[{name!r}] must be a positive integer, got {value!r}")
    if named - set(profile):
        return None
    return {t.name: tuple(int(profile[d]) if isinstance(d, str) else d for d in t.shape) for t in spec.inputs}


class Context(Protocol):
    """One worker's run state on a compiled model. Not shared between threads: one
    call at a time (a second caller waits); give each worker its own context."""

    spec: StageSpec

    def prepare(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Get ready to run these full input shapes (compile, allocate), now rather
        than on the first run. A backend that runs any shape as it comes does nothing."""

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run the stage; every input of `spec` must be fed."""

    def close(self) -> None:
        """Release this context's buffers (the model and other contexts stay usable)."""


class CompiledModel(Protocol):
    """A stage's loaded weights and compiled graph or engine, shared by its contexts."""

    spec: StageSpec

    def context(self) -> Context:
        """A new context on this model: its own run state, the model's weights."""

    def update_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the values of the named initializers of the stage's graph (shapes and
        dtypes as in the graph; see diffrt.weights for the names of a checkpoint's
        parameters); every other weight keeps its value. Every context of the model runs
        with the new values from its next call on; a call already running finishes with
        the old ones. Updates add up: a later call keeps what an earlier one set. A
        backend whose `updates_weights` is False raises DiffrtError."""

    def close(self) -> None:
        """Release the weights; the model and its contexts are unusable afterwards."""


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
    reads_graphs: bool
    """Whether it runs the artifact's ONNX graphs (the torch backend runs the source
    checkpoint's modules instead: Pipeline.load then checks the graph files' sizes only)."""
    updates_weights: bool
    """Whether its compiled models take `update_weights` (TensorRT: engines built with
    `diffrt build --refittable` only; the others say so when called)."""
    runs_lora_branches: bool
    """Whether it runs an artifact's LoRA-branch graph variants when they are there (ORT,
    OpenVINO); TensorRT runs the engines `diffrt build` made from the plain graphs."""

    device: str
    """Where its contexts' outputs live: "cpu" (numpy arrays) or "cuda"."""

    def to_device(self, array: Any) -> Any:
        """A host (numpy) array as the array type its contexts take on its device
        (the same numpy array on CPU backends)."""

    def to_host(self, array: Any) -> np.ndarray:
        """A numpy array with the contents of one of its contexts' outputs."""

    def open(self, folder: Path, spec: StageSpec, profile: Mapping[str, int] | None = None) -> CompiledModel:
        """Load the stage's graph (or a built engine for it) from the artifact folder,
        compiled for `profile` where the backend compiles per shape."""

    def describe(self) -> str:
        """One line: library version and device, for timings and reports."""
