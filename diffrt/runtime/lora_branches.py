"""LoRA as unmerged low-rank branches: one denoiser call serves rows with different
LoRA sets (and rows with none). Torch-free.

An artifact given branches (`diffrt lora-branches OUT --rank 16`, or `diffrt export
... --lora-branches 16`) holds, beside its UNet and CLIP text-encoder graphs, copies
whose targeted Linear layers compute y = x W^T + (x @ down_b) @ up_b, with
`lora_down.<module>` (batch, in, rank) and `lora_up.<module>` (batch, rank, out) as
inputs (diffrt.export.passes.lora_branches). A pipeline loaded on such an artifact
runs them (unless `lora_branches=False`) and feeds each row its request's factors:

- a request's LoRAs are concatenated along the rank axis, each as down^T and
  (strength * alpha/rank * up)^T, zero-padded to the exported rank (a set whose ranks
  add up to more, for some layer, is refused when the request is made);
- with classifier-free guidance both halves of a sample get its factors (diffusers
  applies LoRA to the whole batch);
- a row with no LoRA gets zeros: its output is the base model's exactly.

So no weights change and requests with different LoRAs share a batch
(`Pipeline.batch_key` leaves LoRAs out). A text encoder without a branch graph (an
artifact given UNet branches only) keeps the merged mechanism (diffrt.runtime.loras.
MergedLoras, on the stages without branches), each request encoding its prompts under
its own set before the batch is stacked. A LoRA with a layer that has no branch (a
conv, or a Linear outside the exported targets) is refused at load, naming the
layers: it needs the merged mechanism (`lora_branches=False`) or branches exported
with `--lora-targets transformer`. Layers the stage's outputs do not depend on (SDXL's
last CLIP layer) need none.
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
from diffrt.lora import Lora, LoraLayer, first_names, read_lora, resolve

logger = logging.getLogger(__name__)

LORA_VARIANT = "lora-branches"
FUSED_LORA_VARIANT = "fused-attention+lora-branches"
# the branch variant made from each plain variant of a denoiser
BRANCH_OF = {DEFAULT_VARIANT: LORA_VARIANT, FUSED_VARIANT: FUSED_LORA_VARIANT}
FACT = "lora_branches"
DOWN_PREFIX = "lora_down."
UP_PREFIX = "lora_up."
_CACHED_SETS = 8  # factors of this many recent LoRA sets kept ready (~12 MB each: SD1.5, rank 16)

LoraSet = tuple[tuple[str, float], ...]


def select_branches(manifest: Manifest, specs: Mapping[str, StageSpec], denoiser: str, text_roles: Any,
                    wanted: bool | None, backend: Any) -> dict[str, StageSpec]:
    """The stages to open: the denoiser's branch variant when the artifact has one (and
    `wanted` is not False), with the text encoders' where they have one; else `specs`.
    `wanted=True` without a denoiser branch graph is an error."""
    if wanted is not None and not isinstance(wanted, bool):
        raise DiffrtError(f"lora_branches={wanted!r}: use True, False or None (use them when the artifact has them)")
    if wanted is False or not backend.runs_lora_branches:
        if wanted:
            raise DiffrtError(f"the {backend.name} backend cannot run LoRA-branch graphs; use ort or openvino")
        return dict(specs)
    found = _branch_of(manifest, specs[denoiser])
    if found is None:
        if wanted:
            raise DiffrtError(f"this artifact has no LoRA-branch {denoiser} graph for {specs[denoiser].describe()}; "
                              "add them with `diffrt lora-branches OUT --rank 16` (or load with lora_branches=False)")
        return dict(specs)
    out = {**specs, denoiser: found}
    for role in text_roles:
        if role in specs:
            out[role] = _branch_of(manifest, specs[role]) or specs[role]
    return out


def _branch_of(manifest: Manifest, spec: StageSpec) -> StageSpec | None:
    variant = BRANCH_OF.get(spec.variant)
    return next((s for s in manifest.variants(spec.role) if s.variant == variant and s.precision == spec.precision),
                None)


@dataclasses.dataclass(frozen=True)
class BranchLayout:
    """What a branch stage takes: the rank and each module's (in, out) features."""

    rank: int
    modules: Mapping[str, tuple[int, int]]
    ignored: frozenset[str] = frozenset()
    """Targeted modules the stage's outputs do not depend on: no branch needed."""

    @classmethod
    def of(cls, spec: StageSpec) -> BranchLayout | None:
        fact = spec.facts.get(FACT)
        if not fact:
            return None
        return cls(rank=int(fact["rank"]), modules={m: (int(i), int(o)) for m, (i, o) in fact["modules"].items()},
                   ignored=frozenset(fact.get("ignored", ())))

    def place(self, component: str, module: str) -> str | None:
        """The branch module a LoRA layer's module path is (text encoders: with or
        without transformers' text_model. prefix), '' when it may be ignored, or None."""
        found = resolve(component, module, {f"{m}.weight" for m in self.modules})
        if found is not None:
            return found.removesuffix(".weight")
        return "" if resolve(component, module, {f"{m}.weight" for m in self.ignored}) else None


class BranchLoras:
    """The LoRAs loaded into a branch pipeline: their layers in the stages with branches
    (`layouts`, by role = LoRA component: "unet", "text_encoder", ...) fed per row, and,
    through `merged`, their layers in LoRA-able stages without branches."""

    def __init__(self, layouts: Mapping[str, BranchLayout], merged: Any):
        self.layouts = dict(layouts)
        self._merged = merged
        self._loras: dict[str, Lora] = {}
        self._placed: dict[str, dict[str, dict[str, LoraLayer]]] = {}  # lora -> component -> branch module -> layer
        self._cache: OrderedDict[tuple[str, LoraSet], dict[str, np.ndarray]] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def loaded(self) -> Mapping[str, Lora]:
        return dict(self._loras)

    def add(self, name: str, source: str | Path | Lora) -> Lora:
        """Parse and check a LoRA (every layer in a stage with branches must have one that
        fits), then load the rest into the merged mechanism; nothing changes on error."""
        lora = source if isinstance(source, Lora) else read_lora(source)
        placed = {component: self._place(lora, component) for component in self.layouts}
        rest = Lora(path=lora.path, sha256=lora.sha256, layout=lora.layout,
                    layers={k: v for k, v in lora.layers.items() if k[0] not in self.layouts})
        self._merged.add(name, rest)  # checks the name, and the fit of the rest
        self._loras[name], self._placed[name] = lora, placed
        return lora

    def _place(self, lora: Lora, component: str) -> dict[str, LoraLayer]:
        layout = self.layouts[component]
        layers = lora.of(component)
        where = {m: layout.place(component, m) if layer.down.ndim == 2 else None for m, layer in layers.items()}
        missing = sorted(f"{component}.{m}" for m, found in where.items() if found is None)
        if missing:
            raise DiffrtError(f"LoRA {lora.path}: {len(missing)} layer(s) have no LoRA branch in this artifact: "
                              f"{first_names(missing)}; load it with lora_branches=False (merged), or add branches "
                              "for them (diffrt lora-branches OUT --lora-targets transformer)")
        placed = {where[m]: layer for m, layer in layers.items() if where[m]}
        wrong = [f"{component}.{m} ({layer.delta_shape[1]}->{layer.delta_shape[0]}, model "
                 f"{layout.modules[m][0]}->{layout.modules[m][1]})"
                 for m, layer in placed.items() if tuple(layer.delta_shape[::-1]) != layout.modules[m]]
        if wrong:
            raise DiffrtError(f"LoRA {lora.path}: shapes do not fit the model: {first_names(wrong, 2)}; it was made "
                              "for another base model")
        big = [f"{component}.{m} (rank {layer.rank})" for m, layer in placed.items() if layer.rank > layout.rank]
        if big:
            raise DiffrtError(f"LoRA {lora.path}: rank above the artifact's LoRA-branch rank {layout.rank}: "
                              f"{first_names(big, 2)}; add branches of a higher rank (diffrt lora-branches --rank)")
        return placed

    def check_set(self, loras: LoraSet) -> None:
        """A request's set must fit the exported rank in every layer (ranks add up)."""
        for component, layout in self.layouts.items():
            used: dict[str, int] = {}
            for name, _ in loras:
                for module, layer in self._placed[name][component].items():
                    used[module] = used.get(module, 0) + layer.rank
            over = sorted(m for m, r in used.items() if r > layout.rank)
            if over:
                raise DiffrtError(f"LoRAs {', '.join(n for n, _ in loras)} together have rank {used[over[0]]} in "
                                  f"{component}.{over[0]}, above the artifact's LoRA-branch rank {layout.rank}; use "
                                  "fewer at once or add branches of a higher rank (diffrt lora-branches --rank)")

    def merged_set(self, loras: LoraSet) -> LoraSet:
        """The part of a set that changes stages without branches (merged while a request
        encodes); the others are left out, so they never wait for a switch."""
        return tuple((n, s) for n, s in loras if any(c not in self.layouts for c in self._loras[n].components))

    def feeds(self, component: str, loras: LoraSet, rows: int) -> dict[str, np.ndarray]:
        """Every branch input of the `component` stage for `rows` rows all running `loras`."""
        single = self._factors(component, loras)
        return {name: np.repeat(value, rows, axis=0) for name, value in single.items()}

    def with_feeds(self, plan: Any, loras: LoraSet, component: str = "unet") -> Any:
        """A family's DenoisePlan with the denoiser's branch inputs as per-row feeds
        (stacked with the other requests' rows by stack_plans)."""
        return dataclasses.replace(plan, feeds={**plan.feeds, **self.feeds(component, loras, plan.model_rows)})

    def _factors(self, component: str, loras: LoraSet) -> dict[str, np.ndarray]:
        key = (component, loras)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        layout = self.layouts[component]
        rank = layout.rank
        out = {}
        for module, (inputs, outputs) in layout.modules.items():
            down = np.zeros((1, inputs, rank), np.float32)
            up = np.zeros((1, rank, outputs), np.float32)
            start = 0
            for name, strength in loras:
                layer = self._placed[name][component].get(module)
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
            self._cache[key] = out
            while len(self._cache) > _CACHED_SETS:
                self._cache.popitem(last=False)
        return out


__all__ = ["BRANCH_OF", "DOWN_PREFIX", "FACT", "FUSED_LORA_VARIANT", "LORA_VARIANT", "UP_PREFIX", "BranchLayout",
           "BranchLoras", "select_branches"]
