"""LoRA as unmerged low-rank branches: one denoiser call serves rows with different
LoRA sets (and rows with none). Torch-free.

An artifact given branches (`diffrt lora-branches OUT --rank 16`, or `diffrt export
... --lora-branches 16`) holds, beside its UNet graphs, copies whose targeted Linear
layers compute y = x W^T + (x @ down_b) @ up_b, with `lora_down.<module>` (batch, in,
rank) and `lora_up.<module>` (batch, rank, out) as inputs (diffrt.export.passes.
lora_branches). A pipeline loaded on such an artifact runs them (unless
`lora_branches=False`) and feeds each row its request's factors:

- a request's LoRAs are concatenated along the rank axis, each as down^T and
  (strength * alpha/rank * up)^T, zero-padded to the exported rank (a set whose ranks
  add up to more, for some layer, is refused when the request is made);
- with classifier-free guidance both halves of a sample get its factors (diffusers
  applies LoRA to the whole batch);
- a row with no LoRA gets zeros: its output is the base model's exactly.

So the UNet's weights never change and requests with different LoRAs share a batch
(`Pipeline.batch_key` leaves LoRAs out). Text-encoder layers of a LoRA stay merged
(diffrt.runtime.loras.MergedLoras, on the text encoders only), each request encoding
its prompts under its own set before the batch is stacked. A LoRA whose UNet layers
include one without a branch (a conv, or a Linear outside the exported targets) is
refused at load, naming the layers: it would need the merged mechanism
(`lora_branches=False`) or branches exported with `--lora-targets transformer`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import DEFAULT_VARIANT, FUSED_VARIANT, Manifest, StageSpec
from diffrt.errors import DiffrtError
from diffrt.lora import Lora, LoraLayer, first_names, read_lora

logger = logging.getLogger(__name__)

LORA_VARIANT = "lora-branches"
FUSED_LORA_VARIANT = "fused-attention+lora-branches"
# the branch variant made from each plain variant of a denoiser
BRANCH_OF = {DEFAULT_VARIANT: LORA_VARIANT, FUSED_VARIANT: FUSED_LORA_VARIANT}
FACT = "lora_branches"
DOWN_PREFIX = "lora_down."
UP_PREFIX = "lora_up."
_CACHED_SETS = 64  # factors of this many recent LoRA sets kept ready (a few MB each at SD1.5, rank 16)

LoraSet = tuple[tuple[str, float], ...]


def select_branches(manifest: Manifest, denoiser: StageSpec, wanted: bool | None, backend: Any) -> StageSpec:
    """The denoiser stage to open: its branch variant when the artifact has one (and
    `wanted` is not False), else `denoiser`. `wanted=True` without one is an error."""
    if wanted is not None and not isinstance(wanted, bool):
        raise DiffrtError(f"lora_branches={wanted!r}: use True, False or None (use them when the artifact has them)")
    variant = BRANCH_OF.get(denoiser.variant)
    found = next((s for s in manifest.variants(denoiser.role)
                  if s.variant == variant and s.precision == denoiser.precision), None)
    if wanted is False:
        return denoiser
    if found is not None and not getattr(backend, "reads_graphs", True):
        found = None  # a backend that does not run the ONNX graphs cannot feed their branches
    if found is None and wanted:
        raise DiffrtError(f"this artifact has no LoRA-branch {denoiser.role} graph for {denoiser.describe()}; add "
                          "them with `diffrt lora-branches OUT --rank 16` (or load with lora_branches=False)")
    return found or denoiser


@dataclasses.dataclass(frozen=True)
class BranchLayout:
    """What a branch stage takes: the rank and each module's (in, out) features."""

    rank: int
    modules: Mapping[str, tuple[int, int]]

    @classmethod
    def of(cls, spec: StageSpec) -> BranchLayout | None:
        fact = spec.facts.get(FACT)
        if not fact:
            return None
        return cls(rank=int(fact["rank"]), modules={m: (int(i), int(o)) for m, (i, o) in fact["modules"].items()})


class BranchLoras:
    """The LoRAs loaded into a branch pipeline: their UNet layers (fed per row) and,
    through `merged`, their text-encoder layers (merged per request while it encodes)."""

    def __init__(self, layout: BranchLayout, merged: Any):
        self.layout = layout
        self._merged = merged
        self._loras: dict[str, Lora] = {}
        self._cache: OrderedDict[LoraSet, dict[str, np.ndarray]] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def loaded(self) -> Mapping[str, Lora]:
        return dict(self._loras)

    def add(self, name: str, source: str | Path | Lora) -> Lora:
        """Parse and check a LoRA (every UNet layer must have a branch that fits), then
        load its text-encoder layers into the merged mechanism; nothing changes on error."""
        lora = source if isinstance(source, Lora) else read_lora(source)
        self._check_layers(lora)
        text = Lora(path=lora.path, sha256=lora.sha256, layout=lora.layout,
                    layers={k: v for k, v in lora.layers.items() if k[0] != "unet"})
        self._merged.add(name, text)  # checks the name, the text encoders' fit
        self._loras[name] = lora
        return lora

    def _check_layers(self, lora: Lora) -> None:
        layers = lora.of("unet")
        modules = self.layout.modules
        missing = sorted(f"unet.{m}" for m, layer in layers.items() if m not in modules or layer.down.ndim != 2)
        if missing:
            raise DiffrtError(f"LoRA {lora.path}: {len(missing)} UNet layer(s) have no LoRA branch in this artifact: "
                              f"{first_names(missing)}; load it with lora_branches=False (merged), or add branches "
                              "for them (diffrt lora-branches OUT --lora-targets transformer)")
        wrong = [f"unet.{m} ({layer.delta_shape[1]}->{layer.delta_shape[0]}, model {modules[m][0]}->{modules[m][1]})"
                 for m, layer in layers.items() if tuple(layer.delta_shape[::-1]) != modules[m]]
        if wrong:
            raise DiffrtError(f"LoRA {lora.path}: shapes do not fit the model: {first_names(wrong, 2)}; it was made "
                              "for another base model")
        big = [f"unet.{m} (rank {layer.rank})" for m, layer in layers.items() if layer.rank > self.layout.rank]
        if big:
            raise DiffrtError(f"LoRA {lora.path}: rank above the artifact's LoRA-branch rank {self.layout.rank}: "
                              f"{first_names(big, 2)}; add branches of a higher rank (diffrt lora-branches --rank)")

    def check_set(self, loras: LoraSet) -> None:
        """A request's set must fit the exported rank in every layer (ranks add up)."""
        used: dict[str, int] = {}
        for name, _ in loras:
            for module, layer in self._loras[name].of("unet").items():
                used[module] = used.get(module, 0) + layer.rank
        over = sorted(m for m, r in used.items() if r > self.layout.rank)
        if over:
            raise DiffrtError(f"LoRAs {', '.join(n for n, _ in loras)} together have rank {used[over[0]]} in "
                              f"unet.{over[0]}, above the artifact's LoRA-branch rank {self.layout.rank}; use fewer "
                              "at once or add branches of a higher rank (diffrt lora-branches --rank)")

    def text_set(self, loras: LoraSet) -> LoraSet:
        """The part of a set that changes the text encoders (what must be merged while a
        request encodes); LoRAs of the UNet only are left out, so they never wait."""
        return tuple((n, s) for n, s in loras if any(c != "unet" for c in self._loras[n].components))

    def feeds(self, loras: LoraSet, rows: int) -> dict[str, np.ndarray]:
        """Every branch input for `rows` denoiser rows all running `loras`."""
        single = self._factors(loras)
        return {name: np.repeat(value, rows, axis=0) for name, value in single.items()}

    def with_feeds(self, plan: Any, loras: LoraSet) -> Any:
        """A family's DenoisePlan with the branch inputs as per-row feeds (stacked with
        the other requests' rows by stack_plans)."""
        return dataclasses.replace(plan, feeds={**plan.feeds, **self.feeds(loras, plan.model_rows)})

    def _factors(self, loras: LoraSet) -> dict[str, np.ndarray]:
        with self._cache_lock:
            if loras in self._cache:
                self._cache.move_to_end(loras)
                return self._cache[loras]
        rank = self.layout.rank
        out = {}
        for module, (inputs, outputs) in self.layout.modules.items():
            down = np.zeros((1, inputs, rank), np.float32)
            up = np.zeros((1, rank, outputs), np.float32)
            start = 0
            for name, strength in loras:
                layer: LoraLayer | None = self._loras[name].layers.get(("unet", module))
                if layer is None:
                    continue
                r = layer.rank
                down[0, :, start:start + r] = layer.down.reshape(r, -1).T
                # strength * scale folded into up, in float32 (as the merged delta is computed)
                up[0, start:start + r, :] = (layer.up.reshape(-1, r).astype(np.float32)
                                             * np.float32(strength * layer.scale)).T
                start += r
            out[DOWN_PREFIX + module], out[UP_PREFIX + module] = down, up
        with self._cache_lock:
            self._cache[loras] = out
            while len(self._cache) > _CACHED_SETS:
                self._cache.popitem(last=False)
        return out


__all__ = ["BRANCH_OF", "DOWN_PREFIX", "FACT", "FUSED_LORA_VARIANT", "LORA_VARIANT", "UP_PREFIX", "BranchLayout",
           "BranchLoras", "select_branches"]
