"""The torch backend (registered as "torch" in diffrt.runtime.backends; it lives outside
diffrt.runtime, which never imports torch): the SOURCE checkpoint's diffusers /
transformers modules, not
the ONNX graphs, behind the same stage IO contract.

It is the GPU baseline and the oracle the other GPU backends (TensorRT, ONNX
Runtime's CUDA providers) are compared with, and on the CPU a check of the
pipeline's device-array path (its contexts return torch tensors there too).

Each stage is the export wrapper it was exported from (diffrt.export.sd / sdxl:
TextEncoderStage, UNetStage, VaeDecoderStage, ...): the wrappers ARE the stage
definitions, so a context takes and returns exactly the names of the StageSpec it
is opened with. The artifact's fp32 spec is opened for its IO contract only; the
compute dtype is the `dtype` option. A stage the family keeps in fp32 (SDXL's VAE,
force_upcast) stays fp32 under fp16/bf16, as in the artifact's half graphs.

Contexts take numpy arrays or torch tensors (or DLPack arrays): moved to the device,
float inputs cast to the compute dtype except `timestep`, fed in float32 as
diffusers feeds it (fractional timesteps would round in fp16); integer ids stay
integer. They run under torch.inference_mode() and return torch tensors on the
device, float outputs as float32 (so the scheduler math runs in float32 as on the
other backends). Outputs are fresh ordinary tensors (cast or cloned outside
inference mode): callers may update them in place, and CUDA graphs cannot overwrite
them on the next call.

The source checkpoint: manifest.source["path"] (or the `source` option, for a
checkpoint that moved). By default only cheap checks are made: the folder exists,
its model_index.json names the artifact's pipeline class, and each loaded module's
config agrees with the manifest's model facts (shapes, latent channels, VAE
scaling). Changed weights of the same architecture pass those; `verify_source=True`
also hashes the whole checkpoint (every byte, as export did) against
manifest.source["sha256"].

Memory: one stage is loaded per `open` (in fp32 on the host, then moved and cast),
eval() and requires_grad_(False); only what the stage needs is kept (the VAE
decoder stage drops the VAE's encoder after loading, and the reverse).
The tiny VAE decoder (an artifact exported with --tiny-vae) is not part of the
source checkpoint: give its AutoencoderTiny folder as `tiny_vae`, else vae="tiny"
raises a one-line error when used.

Options (Pipeline.load(..., backend="torch", **options), CLI -O KEY=VALUE):
device ("cuda" when available, else "cpu"), dtype ("fp16" on CUDA, "fp32"
elsewhere; or "bf16"), channels_last (the UNet's memory format), compile (torch.compile
the denoiser; compile_mode, default "default"), cuda_graphs (CUDA only: compiles the
denoiser with mode="reduce-overhead", which captures CUDA graphs; implies compile),
source, tiny_vae, verify_source. Attention is SDPA everywhere: diffusers'
AttnProcessor2_0 set explicitly on the UNet and VAE, attn_implementation="sdpa" on
the CLIP encoders.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# imported here, not at open(): a missing library is the registry's one-line "install the extra"
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffrt.artifacts import Manifest, StageSpec, read_manifest
from diffrt.errors import DiffrtError
from diffrt.families import get_family
from diffrt.runtime.backends.base import check_feeds

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_INT_DTYPES = {"int64": torch.int64, "int32": torch.int32}
# Float inputs fed in float32 whatever the compute dtype (diffusers feeds the
# scheduler's float32 timesteps; the UNet casts its time embedding itself).
FLOAT32_INPUTS = ("timestep",)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# role -> (module config attribute, manifest.model key) pairs that must agree: a
# source checkpoint changed since export is refused before it runs with wrong shapes.
CONFIG_FACTS = {
    "text_encoder": (("hidden_size", "text_hidden_size"),),
    "text_encoder_2": (("hidden_size", "text_hidden_size_2"), ("projection_dim", "projection_dim")),
    "unet": (("in_channels", "latent_channels"), ("cross_attention_dim", "cross_attention_dim"),
             ("time_cond_proj_dim", "time_cond_proj_dim"), ("sample_size", "sample_size")),
    "vae_decoder": (("latent_channels", "vae_latent_channels"), ("scaling_factor", "vae_scaling_factor")),
    "vae_encoder": (("latent_channels", "vae_latent_channels"), ("scaling_factor", "vae_scaling_factor")),
}


def _flag(name: str, value: Any) -> bool:
    """A boolean option, also as the CLI passes it (-O compile=1, -O compile=true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise DiffrtError(f"torch backend: {name}={value!r}; use true or false")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays
            array = array.copy()
        return torch.from_numpy(np.ascontiguousarray(array))
    if hasattr(value, "__dlpack__"):  # CuPy and other device arrays: no host copy
        return torch.from_dlpack(value)
    return torch.as_tensor(value)


class TorchModel:
    """One stage: its export wrapper module on the backend's device, shared by its
    contexts. An eager module in inference mode keeps nothing between calls, so its
    contexts run at the same time; a torch.compile'd one (and the CUDA graphs it may
    capture) is not documented as safe to call from several threads, so its contexts
    take turns."""

    def __init__(self, spec: StageSpec, module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 compiled: bool = False, cuda_graphs: bool = False):
        self.spec = spec
        self.dtype = dtype
        self.module: Any = module
        self.device = device
        self.cuda_graphs = cuda_graphs
        self.turns = threading.Lock() if compiled or cuda_graphs else None

    def context(self) -> TorchContext:
        if self.module is None:
            raise DiffrtError(f"stage {self.spec.name}: the model is closed")
        return TorchContext(self)

    def update_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        raise DiffrtError("the torch backend runs the source checkpoint's modules, not the ONNX graphs whose "
                          "initializers update_weights names; load the changed checkpoint, or use backend ort, "
                          "openvino or tensorrt")

    def close(self) -> None:
        self.module = None

    def __enter__(self) -> TorchModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TorchContext:
    """One worker on a TorchModel: nothing of its own but the turn it takes."""

    def __init__(self, model: TorchModel):
        self.spec = model.spec
        self._model = model
        self._lock = threading.Lock()
        self._closed = False

    def prepare(self, shapes: Mapping[str, Any]) -> None:
        """Nothing to do: eager torch runs every shape (a compiled module compiles a new
        shape on its first run)."""

    def _input(self, tensor_spec, value: Any) -> torch.Tensor:
        t = _as_tensor(value)
        if t.ndim != len(tensor_spec.shape) or any(isinstance(d, int) and d != n
                                                   for d, n in zip(tensor_spec.shape, t.shape)):
            raise DiffrtError(f"stage {self.spec.name}: input {tensor_spec.name!r} has shape {tuple(t.shape)}, "
                              f"expected {tuple(tensor_spec.shape)}")
        if tensor_spec.dtype in _INT_DTYPES:
            dtype = _INT_DTYPES[tensor_spec.dtype]
        else:
            dtype = torch.float32 if tensor_spec.name in FLOAT32_INPUTS else self._model.dtype
        return t.to(device=self._model.device, dtype=dtype)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        module = self._model.module
        if module is None or self._closed:
            raise DiffrtError(f"stage {self.spec.name}: the {'context' if self._closed else 'model'} is closed")
        check_feeds(self.spec, feeds)
        tensors = {t.name: self._input(t, feeds[t.name]) for t in self.spec.inputs}
        with self._lock, self._model.turns or contextlib.nullcontext():
            with torch.inference_mode():
                if self._model.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = module(**tensors)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            # a text encoder's last output (skip_hidden_states) is absent from artifacts exported before clip_skip
            outs = tuple(outs)[:len(self.spec.outputs)]
            result = {}
            # outside inference mode: ordinary tensors the caller owns (taken before the
            # next caller's turn, which a CUDA graph would replay over these outputs)
            for tensor_spec, value in zip(self.spec.outputs, outs, strict=True):
                if value.is_floating_point():
                    value = value.clone() if value.dtype == torch.float32 else value.to(torch.float32)
                else:
                    value = value.clone()
                result[tensor_spec.name] = value
        return result

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> TorchContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnavailableModel:
    """A stage the source checkpoint does not hold (the tiny VAE decoder without the
    `tiny_vae` option): loading succeeds, using it says what to pass."""

    def __init__(self, spec: StageSpec, reason: str):
        self.spec = spec
        self.reason = reason

    def context(self) -> UnavailableModel:
        return self

    def prepare(self, shapes: Mapping[str, Any]) -> None:
        pass

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        raise DiffrtError(self.reason)

    def update_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        raise DiffrtError(self.reason)

    def close(self) -> None:
        pass


class _Source:
    """An artifact's source checkpoint, checked once per artifact folder."""

    def __init__(self, folder: Path, override: str | Path | None, verify: bool):
        self.manifest: Manifest = read_manifest(folder)
        self.family = get_family(self.manifest.family)
        given = override if override is not None else self.manifest.source.get("path")
        self.path = Path(given).expanduser() if given else None
        if self.path is None or not self.path.is_dir():
            raise DiffrtError(
                f"{self.path or 'manifest.source names no path'}: the source checkpoint this artifact was exported "
                "from is not there; the torch backend runs the source checkpoint's modules (the ONNX files are not "
                "enough): restore it, or pass its location with source=PATH (-O source=PATH)")
        from diffrt.export.checkpoint import checkpoint_hash, read_model_index

        class_name = read_model_index(self.path)["_class_name"]
        if class_name != self.manifest.pipeline_class:
            raise DiffrtError(f"{self.path} holds a {class_name}, but the artifact was exported from a "
                              f"{self.manifest.pipeline_class}; the torch backend needs the artifact's source checkpoint")
        if verify:
            expected = self.manifest.source.get("sha256")
            logger.info("hashing the source checkpoint %s", self.path)
            if not expected:
                raise DiffrtError("verify_source=true: manifest.source records no sha256 to check the checkpoint against")
            if checkpoint_hash(self.path) != expected:
                raise DiffrtError(f"{self.path} has changed since the artifact was exported (its sha256 differs from "
                                  "manifest.source); re-export, or pass verify_source=false to run it anyway")


class TorchBackend:
    name = "torch"
    graph_precisions = ("fp32",)  # the fp32 spec, for its IO contract only
    fused_attention = False
    fuses_attention_itself = True  # SDPA
    reads_graphs = False  # Pipeline.load checks the ONNX files' sizes only (verify_source= hashes the checkpoint)
    updates_weights = False  # it runs the checkpoint's modules, not the graphs whose initializers are named
    runs_lora_branches = False

    def __init__(self, device: str | None = None, dtype: str | None = None, compile: Any = False,
                 compile_mode: str | None = None, cuda_graphs: Any = False, channels_last: Any = False,
                 source: str | Path | None = None, tiny_vae: str | Path | None = None, verify_source: Any = False,
                 cache_dir: str | Path | None = None, workers: int = 1):
        """`cache_dir` and `workers` (which Pipeline.load passes to every backend) change
        nothing here: nothing is cached, and the contexts of a module share it as it is."""
        try:
            self.torch_device = torch.device(device if device is not None else
                                             "cuda" if torch.cuda.is_available() else "cpu")
        except (RuntimeError, TypeError) as exc:
            raise DiffrtError(f"torch backend: device={device!r} ({_first_line(exc)}); use cpu or cuda") from None
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise DiffrtError(f"torch backend: device={device!r} but this torch build sees no CUDA device "
                              f"(torch {torch.__version__}); use device=cpu or install a CUDA build of torch")
        self.device = self.torch_device.type
        if dtype is None:
            dtype = "fp16" if self.device == "cuda" else "fp32"
        if dtype not in DTYPES:
            raise DiffrtError(f"torch backend: dtype={dtype!r}; choose one of: {', '.join(DTYPES)}")
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.cuda_graphs = _flag("cuda_graphs", cuda_graphs)
        self.compile = _flag("compile", compile) or self.cuda_graphs
        if self.cuda_graphs and self.device != "cuda":
            raise DiffrtError("torch backend: cuda_graphs=true needs device=cuda")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise DiffrtError(f"torch backend: compile_mode={compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
        if self.cuda_graphs and compile_mode not in (None, "reduce-overhead", "max-autotune"):
            raise DiffrtError(f"torch backend: cuda_graphs=true compiles with mode reduce-overhead (or max-autotune), "
                              f"not compile_mode={compile_mode}")
        self.compile_mode = compile_mode or ("reduce-overhead" if self.cuda_graphs else "default")
        self.channels_last = _flag("channels_last", channels_last)
        self.verify_source = _flag("verify_source", verify_source)
        self.source = source
        self.tiny_vae = tiny_vae
        self._sources: dict[Path, _Source] = {}

    # -- arrays -----------------------------------------------------------------

    def to_device(self, array: Any) -> torch.Tensor:
        """A host array (or any tensor) as a torch tensor on the device, its dtype kept."""
        return _as_tensor(array).to(self.torch_device)

    def to_host(self, array: Any) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            array = array.detach()
            if array.dtype == torch.bfloat16:  # numpy has no bfloat16
                array = array.float()
            return array.cpu().numpy()
        return np.asarray(array)

    # -- stages -----------------------------------------------------------------

    def open(self, folder: Path, spec: StageSpec,
             profile: Mapping[str, int] | None = None) -> TorchModel | UnavailableModel:
        # Eager torch runs every shape; compiled modules recompile per new shape.
        folder = Path(folder).resolve()
        if folder not in self._sources:
            self._sources[folder] = _Source(folder, self.source, self.verify_source)
        source = self._sources[folder]
        family, model = source.family, source.manifest.model
        if spec.variant == getattr(family, "TINY_VARIANT", None) and self.tiny_vae is None:
            return UnavailableModel(spec, "vae='tiny': the torch backend runs the source checkpoint's modules and "
                                          "the tiny VAE is not one of them; pass its AutoencoderTiny folder as "
                                          "tiny_vae=PATH (-O tiny_vae=PATH)")
        dtype = self.dtype
        if dtype != torch.float32 and family.keeps_fp32(model, spec):
            dtype = torch.float32  # e.g. SDXL's VAE overflows in fp16 (force_upcast), as in the half artifacts
        module = self._load(source, spec)
        module = module.to(device=self.torch_device, dtype=dtype)
        if spec.role == family.DENOISER:
            if self.channels_last:
                module = module.to(memory_format=torch.channels_last)
            if self.compile:
                logger.info("compiling %s with torch.compile(mode=%r)", spec.name, self.compile_mode)
                module = torch.compile(module, mode=self.compile_mode)
        denoiser = spec.role == family.DENOISER
        return TorchModel(spec, module, self.torch_device, dtype, compiled=self.compile and denoiser,
                          cuda_graphs=self.cuda_graphs and denoiser)

    def _load(self, source: _Source, spec: StageSpec) -> torch.nn.Module:
        """The stage's export wrapper around the module(s) it needs, fp32, on the host."""
        from diffrt.export import sd as export_sd

        family, model, path = source.family, source.manifest.model, source.path
        export_family = importlib.import_module(family.EXPORT_MODULE)
        if not hasattr(export_family, "UNetStage"):  # the stages below are a UNet family's
            raise DiffrtError(f"the torch backend runs UNet families (SD 1.x/2.x, SDXL); this artifact is "
                              f"{family.NAME}: use the ort or openvino backend")
        needs = f"the torch backend runs the modules of the source checkpoint {path}"

        def load(name: str, cls) -> torch.nn.Module:
            module = export_sd.load_module(path, name, cls, needs)
            _check_config(spec, module.config, model, path / name)
            return module

        role = spec.role
        if spec.variant == getattr(family, "TINY_VARIANT", None):
            return export_sd.TinyVaeDecoderStage(export_sd.load_tiny_vae(Path(self.tiny_vae), model))
        if role in ("text_encoder", "text_encoder_2"):
            projection = role == "text_encoder_2"
            encoder = load(role, CLIPTextModelWithProjection if projection else CLIPTextModel)
            encoder.set_attn_implementation("sdpa")
            return export_family.text_encoder_stage(encoder, role)
        if role == family.DENOISER:
            unet = load("unet", UNet2DConditionModel)
            unet.set_attn_processor(AttnProcessor2_0())
            return export_family.UNetStage(unet)
        if role in (family.VAE_DECODER, family.VAE_ENCODER):
            vae = load("vae", AutoencoderKL)
            if role == family.VAE_DECODER:  # keep only what decode() uses
                vae.encoder, vae.quant_conv = None, None
            else:
                vae.decoder, vae.post_quant_conv = None, None
            vae.set_attn_processor(AttnProcessor2_0())
            stage = export_sd.VaeDecoderStage if role == family.VAE_DECODER else export_sd.VaeEncoderStage
            return stage(vae)
        raise DiffrtError(f"the torch backend has no module for stage {spec.describe()}")

    def describe(self) -> str:
        where = torch.cuda.get_device_name(self.torch_device) if self.device == "cuda" else "cpu"
        compiled = f", torch.compile mode={self.compile_mode}" if self.compile else ""
        return f"torch {torch.__version__} ({where}, {self.dtype_name}, SDPA{compiled})"


def _check_config(spec: StageSpec, config: Any, model: Mapping[str, Any], where: Path) -> None:
    for attribute, key in CONFIG_FACTS.get(spec.role, ()):
        if key == "vae_latent_channels" and model.get(key) is None:
            key = "latent_channels"  # older artifacts: the VAE's channels were the UNet's (an inpainting UNet's are not)
        if key not in model:
            continue
        have, want = getattr(config, attribute, None), model[key]
        same = have == want or (isinstance(have, (int, float)) and isinstance(want, (int, float))
                                and abs(float(have) - float(want)) <= 1e-6 * max(1.0, abs(float(want))))
        if not same:
            raise DiffrtError(f"{where}: its config has {attribute}={have!r} but the artifact was exported with "
                              f"{key}={want!r}; the source checkpoint changed since export: re-export it")


def make_backend(**options: Any) -> TorchBackend:
    return TorchBackend(**options)
