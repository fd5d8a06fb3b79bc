"""LoRA fused into the exported weights (`diffrt export --lora FILE[:STRENGTH]`).

The deltas are diffrt.lora's (numpy: strength * alpha/rank * up @ down, the same
arithmetic the runtime merges with), added to the torch parameters of each stage's
module after it loads and before it is exported, mapped and checked; the graphs then
hold base + deltas like any other weights. diffusers' `load_lora_weights` +
`fuse_lora` computes the same sum (tests/test_lora.py compares the images). Each
stage a LoRA changes records it in its manifest facts: `facts["loras"]` = [{"file",
"sha256", "strength"}], in the order given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffrt.errors import DiffrtError
from diffrt.lora import Lora, check_strength, first_names, read_lora, resolve

if TYPE_CHECKING:
    from diffrt.export.sd import StageModule

logger = logging.getLogger(__name__)


def read_loras(loras: Iterable[tuple[str | Path, float]]) -> list[tuple[Lora, float]]:
    """(file, strength) pairs -> parsed LoRAs, checked before the export starts."""
    out = []
    for item in loras:
        try:
            path, strength = item
        except (TypeError, ValueError):
            raise DiffrtError(f"loras: give (file, strength) pairs, got {item!r}") from None
        out.append((read_lora(path), check_strength(str(path), strength)))
    return out


def check_components(loras: Sequence[tuple[Lora, float]], stages: Iterable[str]) -> None:
    """Every component a LoRA changes is exported by some stage (else: another base)."""
    present = set(stages)
    for lora, _ in loras:
        missing = [c for c in lora.components if c not in present]
        if missing:
            raise DiffrtError(f"--lora {lora.path} changes the {', '.join(missing)}, which this checkpoint does not "
                              f"have; it was made for another base model")


def fuse(stage: StageModule, loras: Sequence[tuple[Lora, float]]) -> list[dict[str, Any]]:
    """Add each LoRA's deltas for the stage's component to its module's parameters;
    the records of those that changed it."""
    import torch

    if not loras or stage.weights is None:
        return []
    params = dict(stage.weights.named_parameters())
    records = []
    for lora, strength in loras:
        layers = lora.of(stage.component)
        if not layers:
            continue
        placed = {m: resolve(stage.component, m, params) for m in layers}
        unknown = [f"{stage.component}.{m}" for m, p in placed.items() if p is None]
        if unknown:
            raise DiffrtError(f"--lora {lora.path}: {len(unknown)} layer(s) match nothing in the model: "
                              f"{first_names(unknown)}; it was made for another base model")
        wrong = [f"{stage.component}.{m}" for m, layer in layers.items()
                 if params[placed[m]].numel() != _size(layer.delta_shape)]
        if wrong:
            raise DiffrtError(f"--lora {lora.path}: shapes do not fit the model: {first_names(wrong)}; "
                              "it was made for another base model")
        with torch.no_grad():
            for module, layer in layers.items():
                param = params[placed[module]]
                param.add_(torch.from_numpy(layer.delta(strength).reshape(tuple(param.shape))).to(param.dtype))
        records.append({"file": Path(lora.path).name, "sha256": lora.sha256, "strength": strength})
        logger.info("%s: fused LoRA %s at strength %g (%d layers)", stage.component, lora.path, strength,
                    len(layers))
    return records


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for d in shape:
        size *= d
    return size


__all__ = ["check_components", "fuse", "read_loras"]
