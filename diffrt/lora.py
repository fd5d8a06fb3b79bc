"""LoRA files, read with numpy only (the runtime imports this module).

    from diffrt.lora import read_lora
    lora = read_lora("style.safetensors")
    lora.layers[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")]
    # -> LoraLayer(down (rank, in), up (out, rank), scale alpha/rank)
    lora.layers[key].delta(0.8)          # strength * scale * up @ down, the weight's shape

`read_lora` parses the `.safetensors` layouts diffusers' `load_lora_weights` reads for
SD 1.x/2.x and SDXL and normalizes them to one structure:

- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, the older
  `.lora.down.weight` / `.lora.up.weight` and attention-processor forms
  (`attn1.processor.to_q_lora.down.weight`, `self_attn.to_q_lora...`,
  `mlp.fc1.lora_linear_layer...`), under `unet.`, `text_encoder.` or `text_encoder_2.`
  (keys with none of these prefixes are the UNet's). The scale is `lora_alpha / rank`
  from the adapter config diffusers writes into the file's metadata
  (`lora_adapter_metadata`: r, lora_alpha, alpha_pattern, use_rslora), else a
  `<module>.alpha` tensor, else 1.
- kohya / A1111: `lora_unet_*`, `lora_te_*` (`lora_te1_*` / `lora_te2_*` for SDXL's two
  encoders) with `.lora_down.weight` / `.lora_up.weight` / `.alpha` (scale alpha/rank),
  SDXL's sgm block names (`input_blocks_4_1_...`) included: the key conversion of
  diffusers' `lora_conversion_utils.py`, restated in plain Python.

Linear and Conv layers (LoCon: a conv `down` of (rank, in, kh, kw) and `up` of
(out, rank, 1, 1)) are both kept as they are in the file. DoRA and LoRA biases are
refused (one line), as is a file that is missing, truncated or not safetensors.

`Lora.layers` maps (component, module) -> LoraLayer: `component` is the checkpoint
folder the weights belong to ("unet", "text_encoder", "text_encoder_2") and `module`
the diffusers / transformers module path whose `.weight` the delta is added to. Text
encoder paths are written without transformers' `text_model.` prefix (recent
transformers flattens CLIPTextModel; `resolve` finds either spelling in a model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# safetensors dtypes -> numpy (BF16: bit patterns, widened to float32 below)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: delta = strength * scale * up @ down, computed in float32.

    Linear: down (rank, in), up (out, rank). Conv: down (rank, in, kh, kw), up
    (out, rank, 1, 1); the delta is (out, in, kh, kw). `down` and `up` are float16
    when the file stores float16, else float32 (bf16 widened)."""

    down: np.ndarray
    up: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, strength: float = 1.0) -> np.ndarray:
        """strength * scale * up @ down, in the weight's shape (float32)."""
        up = self.up.reshape(self.up.shape[0], -1).astype(np.float32, copy=False)
        down = self.down.reshape(self.rank, -1).astype(np.float32, copy=False)
        product = (up * np.float32(strength * self.scale)) @ down
        return product.reshape(self.delta_shape)

    @property
    def nbytes(self) -> int:
        return int(self.down.nbytes + self.up.nbytes)


@dataclass(frozen=True)
class Lora:
    """A parsed LoRA file: its layers by (component, module), where it came from."""

    path: str
    sha256: str
    layout: str
    """"peft", "diffusers" (older down/up names) or "kohya"."""
    layers: Mapping[tuple[str, str], LoraLayer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k[0] == c for k in self.layers))

    def of(self, component: str) -> dict[str, LoraLayer]:
        """module -> layer for one component."""
        return {module: layer for (c, module), layer in self.layers.items() if c == component}

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


# -- the file ---------------------------------------------------------------------------------

def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a .safetensors file (float16 kept, others as float32) and its
    `__metadata__`, read without the safetensors package: an 8-byte little-endian
    header length, a JSON header (name -> dtype, shape, data_offsets), the data."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DiffrtError(f"LoRA file {path}: {exc.strerror or exc}; give the path of a .safetensors LoRA") from None
    if len(data) < 8:
        raise DiffrtError(f"LoRA file {path} is truncated ({len(data)} bytes); download it again")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_MAX_HEADER, len(data) - 8):
        raise DiffrtError(f"LoRA file {path} is not a .safetensors file or is truncated (header of {length} bytes "
                          f"in a file of {len(data)}); LoRAs are read from .safetensors files")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DiffrtError(f"LoRA file {path} has an unreadable safetensors header; it is damaged") from None
    if not isinstance(header, dict):
        raise DiffrtError(f"LoRA file {path} has an unreadable safetensors header; it is damaged")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + length:]
    tensors = {}
    for name, info in header.items():
        tensors[name] = _tensor(path, name, info, body)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor(path: Path, name: str, info: Any, body: memoryview) -> np.ndarray:
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise DiffrtError(f"LoRA file {path}: tensor {name!r} has a malformed header entry; the file is damaged") \
            from None
    if dtype not in _DTYPES:
        raise DiffrtError(f"LoRA file {path}: tensor {name!r} is {dtype}; LoRA weights are F32, F16 or BF16")
    if not 0 <= start <= end <= len(body):
        raise DiffrtError(f"LoRA file {path} is truncated: tensor {name!r} ends at byte {end} of {len(body)}; "
                          "download it again")
    array = np.frombuffer(body[start:end], dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
    if array.size != math.prod(shape):
        raise DiffrtError(f"LoRA file {path}: tensor {name!r} holds {array.size} values for shape {list(shape)}; "
                          "the file is damaged")
    if dtype == "BF16":
        array = (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
    # fp16 stays fp16 (half the memory of float32; deltas are computed in float32)
    return array.astype(np.float16 if dtype == "F16" else np.float32).reshape(shape)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora(path: str | Path, layers_per_block: int = 2) -> Lora:
    """Parse a LoRA .safetensors file (see the module docstring for the layouts).
    `layers_per_block`: the UNet's, to place kohya SDXL files' sgm block numbers
    (2 for SD 1.x/2.x and SDXL)."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise DiffrtError(f"LoRA file {path} holds no tensors")
    if any(".dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise DiffrtError(f"LoRA file {path} is a DoRA; diffrt applies plain LoRA (and LoCon) only")
    if all(k.startswith(_KOHYA_PREFIXES) for k in tensors):
        layers, layout = _kohya_layers(path, tensors, layers_per_block), "kohya"
    else:
        layers, layout = _diffusers_layers(path, tensors, metadata)
    return Lora(path=str(path), sha256=file_sha256(path), layout=layout, layers=layers)


def _layer(path: Path, where: str, down: np.ndarray, up: np.ndarray, scale: float) -> LoraLayer:
    rank = down.shape[0] if down.ndim else 0
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != rank or rank == 0 \
            or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise DiffrtError(f"LoRA file {path}: {where} has down {list(down.shape)} and up {list(up.shape)}, "
                          "which are not a rank-r pair; the file is damaged or not a LoRA")
    if not (np.isfinite(down).all() and np.isfinite(up).all()):
        raise DiffrtError(f"LoRA file {path}: {where} holds NaN or inf values; the file is damaged")
    return LoraLayer(down=down, up=up, scale=float(scale))


# -- diffusers / PEFT keys ----------------------------------------------------------------------

# (suffix of the down key, suffix of the up key, what replaces them in the module path)
_DOWN_UP = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
            (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), (".down.weight", ".up.weight"))
# diffusers' old attention-processor names (UNET_TO_DIFFUSERS, DIFFUSERS_OLD_TO_PEFT in
# diffusers/utils/state_dict_utils.py): UNet attention and CLIP attention spell them differently
_OLD_UNET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_OLD_TEXT = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def _split_component(key: str) -> tuple[str, str]:
    for component in ("text_encoder_2", "text_encoder", "unet"):
        if key.startswith(component + "."):
            return component, key[len(component) + 1:]
    return "unet", key


def _module_path(component: str, stem: str) -> str:
    """A diffusers-format stem (the key without its down/up suffix) -> the module path."""
    parts = [p for p in stem.split(".") if p != "processor"]
    table = _OLD_UNET if component == "unet" else _OLD_TEXT
    if parts and parts[-1] in table:
        parts[-1:] = table[parts[-1]].split(".")
    path = ".".join(parts)
    return path.removeprefix("text_model.") if component != "unet" else path


def _diffusers_layers(path: Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str]) -> tuple[dict[tuple[str, str], LoraLayer], str]:
    config = _adapter_config(path, metadata)
    used: set[str] = set()
    found: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, str]] = {}
    layout = "diffusers"
    for key in tensors:
        for down_suffix, up_suffix in _DOWN_UP:
            if key.endswith(down_suffix) and key[:-len(down_suffix)] + up_suffix in tensors:
                stem = key[:-len(down_suffix)]
                component, rest = _split_component(stem)
                found[(component, _module_path(component, rest))] = (tensors[key], tensors[stem + up_suffix], stem)
                used.update((key, stem + up_suffix))
                layout = "peft" if down_suffix == ".lora_A.weight" else layout
                break
    alphas = {k[:-len(".alpha")]: float(v.reshape(-1)[0]) for k, v in tensors.items()
              if k.endswith(".alpha") and v.size == 1}
    used.update(k + ".alpha" for k in alphas)
    unknown = [k for k in tensors if k not in used]
    if unknown:
        raise DiffrtError(f"LoRA file {path}: keys that are not LoRA down/up pairs: {_first(unknown)}; "
                          "diffrt reads diffusers/PEFT and kohya LoRA layouts")
    layers = {}
    for (component, module), (down, up, stem) in found.items():
        alpha = _alpha(config, component, module, stem, alphas, down.shape[0])
        scale = alpha / math.sqrt(down.shape[0]) if config.get(f"{component}.use_rslora") else alpha / down.shape[0]
        layers[(component, module)] = _layer(path, stem, down, up, scale)
    return layers, layout


def _adapter_config(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """diffusers' `lora_adapter_metadata` (the PEFT LoraConfig of each component, keys
    prefixed "unet." / "text_encoder." ...), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise DiffrtError(f"LoRA file {path}: its lora_adapter_metadata is not JSON; the file is damaged") from None
    for component in COMPONENTS:
        if config.get(f"{component}.use_dora") or config.get(f"{component}.lora_bias"):
            raise DiffrtError(f"LoRA file {path} uses DoRA or LoRA biases ({component}); diffrt applies plain LoRA")
    return config if isinstance(config, dict) else {}


def _alpha(config: Mapping[str, Any], component: str, module: str, stem: str, alphas: Mapping[str, float],
           rank: int) -> float:
    """The module's alpha: PEFT's alpha_pattern (a regex on the module path, as
    peft.tuners.tuners_utils matches it) or lora_alpha from the metadata; else the
    file's `.alpha` tensor; else the rank (scale 1, diffusers' default)."""
    if f"{component}.lora_alpha" in config:
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", module):
                return float(value)
        return float(config[f"{component}.lora_alpha"])
    if stem in alphas:
        return alphas[stem]
    return float(rank)


# -- kohya / A1111 keys (diffusers/loaders/lora_conversion_utils.py) ----------------------------

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_SGM = ("input_blocks", "middle_block", "output_blocks")
_NOT_SGM = ("down_blocks", "mid_block", "up_blocks")


def _kohya_layers(path: Path, tensors: Mapping[str, np.ndarray],
                  layers_per_block: int) -> dict[tuple[str, str], LoraLayer]:
    names = {k.split(".", 1)[0] for k in tensors}
    unknown = [k for k in tensors if k.split(".", 1)[1:] not in (["lora_down.weight"], ["lora_up.weight"], ["alpha"])]
    missing = [n for n in names if n + ".lora_down.weight" not in tensors or n + ".lora_up.weight" not in tensors]
    if unknown or missing:
        raise DiffrtError(f"LoRA file {path}: kohya keys without a lora_down/lora_up pair: "
                          f"{_first(unknown or [m + '.*' for m in missing])}; the file is damaged or another layout")
    renamed = _sgm_to_diffusers(path, sorted(names), layers_per_block)
    alphas = {n: float(tensors[n + ".alpha"].reshape(-1)[0]) for n in names if n + ".alpha" in tensors}
    # diffusers gives a module without an .alpha the alpha most modules have (get_peft_kwargs)
    common = Counter(alphas.values()).most_common(1)[0][0] if alphas else None
    layers = {}
    for name in sorted(names):
        down, up = tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"]
        alpha = alphas.get(name, common if common is not None else float(down.shape[0]))
        layers[_kohya_module(renamed[name])] = _layer(path, name, down, up, alpha / down.shape[0])
    return layers


def _sgm_to_diffusers(path: Path, names: list[str], layers_per_block: int) -> dict[str, str]:
    """kohya SDXL files name UNet blocks as sgm/LDM does (input_blocks_4_1_...): the
    diffusers block names (_maybe_map_sgm_blocks_to_diffusers, delimiter "_", slice 5)."""
    has_sgm = any(p in n for n in names for p in _SGM)
    has_diffusers = any(p in n and not any(s in n for s in _SGM) for n in names for p in _NOT_SGM)
    if not has_sgm:
        return {n: n for n in names}
    if has_diffusers:  # both: diffusers drops the sgm ones
        return {n: n for n in names if not any(p in n for p in _SGM)}
    out, span = {}, layers_per_block + 1
    inner_names = ("resnets", "attentions", "upsamplers")
    for name in names:
        parts = name.split("_")
        if "text" in name or not any(p in name for p in _SGM) or "input_blocks_0_0" in name:
            out[name] = name
            continue
        try:
            block, inner = int(parts[4]), int(parts[5])
        except (IndexError, ValueError):
            raise DiffrtError(f"LoRA file {path}: kohya key {name!r} has no block numbers; the file is damaged") \
                from None
        if "input_blocks" in name:
            kind = inner_names[inner] if "op" not in name else "downsamplers"
            index = str((block - 1) % span) if "op" not in name else "0"
            middle = [str((block - 1) // span), kind, index]
        elif "middle_block" in name:
            if block > 2:
                raise DiffrtError(f"LoRA file {path}: kohya key {name!r} names middle block {block} (0-2 exist)")
            middle = [("resnets", "attentions", "resnets")[block], ("0", "0", "1")[block]]
            out[name] = "_".join(parts[:4] + middle + parts[5:])
            continue
        else:
            index = str(block % span) if inner < 2 else "0"
            middle = [str(block // span), inner_names[inner], index]
        out[name] = "_".join(parts[:4] + middle + parts[6:])
    return out


def _kohya_module(name: str) -> tuple[str, str]:
    """A kohya layer name (diffusers block names) -> (component, module path)."""
    if name.startswith("lora_unet_"):
        return "unet", _kohya_unet(name.removeprefix("lora_unet_").replace("_", "."))
    component = "text_encoder_2" if name.startswith("lora_te2_") else "text_encoder"
    text = name.split("_", 2)[2].replace("_", ".")
    for old, new in (("text.model", "text_model"), ("self.attn", "self_attn"), ("q.proj", "q_proj"),
                     ("k.proj", "k_proj"), ("v.proj", "v_proj"), ("out.proj", "out_proj"),
                     ("text.projection", "text_projection")):
        text = text.replace(old, new)
    return component, text.removeprefix("text_model.")


def _kohya_unet(name: str) -> str:
    """_convert_unet_lora_key, up to the module path (no .lora suffixes involved)."""
    for old, new in (("input.blocks.0.0", "conv_in"), ("out.2", "conv_out"), ("input.blocks", "down_blocks"),
                     ("down.blocks", "down_blocks"), ("middle.block", "mid_block"), ("mid.block", "mid_block"),
                     ("output.blocks", "up_blocks"), ("up.blocks", "up_blocks"),
                     ("transformer.blocks", "transformer_blocks"), ("to.q", "to_q"), ("to.k", "to_k"),
                     ("to.v", "to_v"), ("to.out.0", "to_out.0"), ("proj.in", "proj_in"), ("proj.out", "proj_out"),
                     ("emb.layers", "time_emb_proj"), ("conv.in", "conv_in"), ("conv.out", "conv_out"),
                     ("time.embed.0", "time_embedding.linear_1"), ("time.embed.2", "time_embedding.linear_2"),
                     ("label.emb.0.0", "add_embedding.linear_1"), ("label.emb.0.2", "add_embedding.linear_2"),
                     ("time.embedding.linear.1", "time_embedding.linear_1"),
                     ("time.embedding.linear.2", "time_embedding.linear_2")):
        name = name.replace(old, new)
    if "emb" in name and "time.emb.proj" not in name:  # SDXL: emb_layers_1 -> time_emb_proj (index dropped)
        name = re.sub(r"\.\d+(?=\D*$)", "", name, count=1)
    if ".in." in name:
        name = name.replace("in.layers.2", "conv1")
    if ".out." in name:
        name = name.replace("out.layers.3", "conv2")
    if "downsamplers" in name or "upsamplers" in name:
        name = name.replace("op", "conv")
    for old, new in (("skip.connection", "conv_shortcut"), ("time.emb.proj", "time_emb_proj"),
                     ("conv.shortcut", "conv_shortcut")):
        name = name.replace(old, new)
    return name


# -- against a model ----------------------------------------------------------------------------

def resolve(component: str, module: str, parameters: Iterable[str] | Mapping[str, Any]) -> str | None:
    """The parameter name `<module>.weight` has in a model whose parameter names are
    `parameters` (a text encoder's with or without transformers' `text_model.` prefix),
    or None."""
    names = parameters if isinstance(parameters, (set, frozenset, Mapping)) else set(parameters)
    candidates = [f"{module}.weight"]
    if component != "unet":
        candidates.append(f"text_model.{module}.weight")
    return next((c for c in candidates if c in names), None)


def check_strength(name: str, strength: Any) -> float:
    """A LoRA strength: a finite number >= 0 (one line otherwise)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)):
        raise DiffrtError(f"LoRA {name!r}: strength must be a number >= 0, got {strength!r}")
    value = float(strength)
    if not math.isfinite(value) or value < 0:
        raise DiffrtError(f"LoRA {name!r}: strength must be a finite number >= 0, got {strength!r}")
    return value


def parse_file_strength(text: str) -> tuple[str, float]:
    """'FILE[:STRENGTH]' (the CLI's --lora) -> (file, strength; 1.0 when not given)."""
    head, sep, tail = text.rpartition(":")
    if not (sep and head and re.fullmatch(r"[-+0-9.eEinfatyINFATY]+", tail)):
        return text, 1.0
    try:
        value = float(tail)
    except ValueError:
        raise DiffrtError(f"--lora {text!r}: {tail!r} is not a strength; use FILE or FILE:STRENGTH, e.g. "
                          "style.safetensors:0.8") from None
    return head, check_strength(head, value)


def _first(names: list[str], count: int = 3) -> str:
    more = f" (and {len(names) - count} more)" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def first_names(names: list[str], count: int = 3) -> str:
    """'a, b, c (and 4 more)': the first few of a list, for one-line errors."""
    return _first(names, count)


__all__ = ["COMPONENTS", "Lora", "LoraLayer", "check_strength", "file_sha256", "first_names", "parse_file_strength",
           "read_lora", "read_safetensors", "resolve"]
