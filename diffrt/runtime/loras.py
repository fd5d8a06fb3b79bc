"""LoRA merged into a loaded pipeline's weights at run time: no reload, no recompile
of the artifact, one set of LoRAs live at a time.

    loras = MergedLoras(folder, pipe.models)
    loras.add("style", "style.safetensors")            # parsed, checked against the model
    wanted = loras.check({"style": 0.8})                # (("style", 0.8),): the request's set
    with loras.using(wanted):                           # merged into the weights while held
        ...run the stages...

Switching sets computes, for each targeted parameter, base + sum(strength * scale *
up @ down) in float32 and hands the result to the backend through the stage's weight
map (`WeightMap.updates`: transposes and casts as exported) and
`CompiledModel.update_weights`. Nothing is kept to go back: a switch reads the base
values of the parameters it changes from the artifact's graph file (memory-mapped, one
tensor at a time, as stored: restoring writes those arrays back, so no LoRA is the
exported graph bit for bit), so the loaded LoRAs cost their own size and no copy of
the weights. A strength of 0 drops the LoRA from the set, so it is the same set as
without it.

Several workers share the compiled models, so the merged set is the models': a worker
that needs another set waits until the runs on the current one have finished (and
runs that want the current set wait behind it, so a switch is never starved). The
server keeps requests with different sets out of one batch (`Pipeline.batch_key`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.errors import DiffrtError
from diffrt.lora import (
    COMPONENTS,
    Lora,
    check_strength,
    first_names,
    read_lora,
    resolve,
)
from diffrt.runtime.backends.initializers import read_values
from diffrt.weights import WeightMap, weight_map

logger = logging.getLogger(__name__)

LoraSet = tuple[tuple[str, float], ...]


@dataclass
class _Stage:
    """One compiled model LoRAs reach, and its weight map."""

    key: str
    model: Any
    weights: WeightMap
    folder: Path

    def read(self, parameters: set[str]) -> dict[str, np.ndarray]:
        """The exported values (as stored, by initializer) of these parameters' placements."""
        names = {p.initializer for name in parameters for p in self.weights[name].placements}
        return read_values(self.folder / self.model.spec.graph_path, sorted(names))

    def base_value(self, parameter: str, base: Mapping[str, np.ndarray]) -> np.ndarray:
        """The parameter's exported value as float32, in its torch shape (from an fp32
        placement where there is one: a half graph keeps fp32 copies for its islands)."""
        entry = self.weights[parameter]
        placement = min(entry.placements, key=lambda p: p.dtype != "float32")
        value = base[placement.initializer]
        if value.dtype == np.uint16 or value.dtype.name == "bfloat16":  # bfloat16 bit patterns
            value = (value.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
        value = value.astype(np.float32)
        for step in reversed(placement.transform):
            value = value.T if step == "transpose" else value.reshape(entry.shape) if step == "reshape" else value
        return value.reshape(entry.shape)


class MergedLoras:
    """The LoRAs loaded into a pipeline (by name) and the set merged into its models."""

    def __init__(self, folder: Path, models: Mapping[str, Any], backend: Any = None):
        """`backend`: the models' backend, asked whether it can change weights after load."""
        self._folder = Path(folder)
        self._backend = backend
        self._models = models
        self._stages: dict[str, list[_Stage]] = {}  # component -> the models holding its weights
        self._loras: dict[str, Lora] = {}
        self._targets: dict[str, dict[str, dict[str, str]]] = {}  # lora -> stage key -> module -> parameter
        self._active: LoraSet = ()
        self._users = 0
        self._pending: Counter[LoraSet] = Counter()  # the sets of runs not yet started
        self._change = threading.Condition()
        self._loading = threading.Lock()

    @property
    def loaded(self) -> Mapping[str, Lora]:
        return dict(self._loras)

    @property
    def active(self) -> LoraSet:
        return self._active

    # -- loading ------------------------------------------------------------------------------

    def add(self, name: str, source: str | Path | Lora) -> Lora:
        """Parse (unless given parsed) and check a LoRA against the loaded model; on any
        error nothing changes. Replacing a loaded name is refused (its weights may be live)."""
        if not isinstance(name, str) or not name or any(c in name for c in "=:,/\\ \t\n"):
            raise DiffrtError(f"LoRA name {name!r}: use a short name without spaces, '=', ':', ',' or slashes")
        if name in self._loras:
            raise DiffrtError(f"a LoRA named {name!r} is already loaded; choose another name")
        if self._backend is not None and not self._backend.updates_weights:
            raise DiffrtError(f"the {self._backend.name} backend cannot change weights after loading; fuse the "
                              "LoRA at export instead (diffrt export --lora FILE) or use ort or openvino")
        lora = source if isinstance(source, Lora) else read_lora(source)
        with self._loading:  # one add at a time; a switch meanwhile sees it whole or not at all
            targets = self._match(lora)
            with self._change:
                self._targets[name], self._loras[name] = targets, lora
        logger.info("LoRA %s: %s (%s, %d layers, %.1f MB)", name, lora.path, lora.layout, len(lora.layers),
                    lora.nbytes / 2**20)
        return lora

    def _match(self, lora: Lora) -> dict[str, dict[str, str]]:
        """stage key -> module -> the parameter each layer of `lora` changes there."""
        targets: dict[str, dict[str, str]] = {}
        missing = [c for c in lora.components if not self._stages_of(c)]
        if missing:
            raise DiffrtError(f"LoRA {lora.path} changes the {', '.join(missing)}, which this pipeline does not have "
                              f"(it has {', '.join(self._components()) or 'no LoRA-able stage'}); "
                              "it was made for another base model")
        for component in lora.components:
            layers = lora.of(component)
            for stage in self._stages_of(component):
                placed = {m: resolve(component, m, stage.weights.entries) for m in layers}
                unknown = [f"{component}.{m}" for m, p in placed.items() if p is None]
                if unknown:
                    raise DiffrtError(f"LoRA {lora.path}: {len(unknown)} layer(s) match nothing in the model: "
                                      f"{first_names(unknown)}; it was made for another base model")
                self._check_fits(lora, component, layers, placed, stage.weights)
                targets[stage.key] = {m: p for m, p in placed.items() if stage.weights[p].placements}
        return targets

    def _check_fits(self, lora: Lora, component: str, layers: Mapping[str, Any], placed: Mapping[str, str],
                    weights: WeightMap) -> None:
        wrong = [f"{component}.{m} (delta {list(layer.delta_shape)}, weight {list(weights[placed[m]].shape)})"
                 for m, layer in layers.items()
                 if int(np.prod(layer.delta_shape)) != int(np.prod(weights[placed[m]].shape))]
        if wrong:
            raise DiffrtError(f"LoRA {lora.path}: shapes do not fit the model: {first_names(wrong, 2)}; "
                              "it was made for another base model")
        for module, parameter in placed.items():
            entry = weights[parameter]
            if entry.absent in ("folded", "ambiguous"):
                raise DiffrtError(f"LoRA {lora.path}: {component}.{module} is not reachable in stage "
                                  f"{weights.stage} ({entry.absent} at export); fuse the LoRA at export instead "
                                  "(diffrt export --lora)")
            shared = {h for p in entry.placements for h in weights.holders(p.initializer)} - {parameter}
            if shared:
                raise DiffrtError(f"LoRA {lora.path}: {component}.{module} shares its stored values with "
                                  f"{first_names(sorted(shared))} in stage {weights.stage}; fuse the LoRA at "
                                  "export instead (diffrt export --lora)")

    def _components(self) -> list[str]:
        return [c for c in COMPONENTS if self._stages_of(c)]

    def _stages_of(self, component: str) -> list[_Stage]:
        if component not in self._stages:
            self._stages[component] = [
                _Stage(key, model, weight_map(self._folder, model.spec), self._folder)
                for key, model in self._models.items() if model.spec.role == component]
        return self._stages[component]

    # -- the set a request runs with ----------------------------------------------------------

    def check(self, loras: Mapping[str, Any] | None) -> LoraSet:
        """A request's `loras` ({name: strength}) -> its set: names loaded, strengths
        finite and >= 0, zero strengths dropped, sorted by name."""
        if loras is None:
            return ()
        if not isinstance(loras, Mapping):
            raise DiffrtError(f"loras must be a mapping of LoRA name to strength, e.g. {{'style': 0.8}}; got "
                              f"{type(loras).__name__}")
        unknown = [n for n in loras if n not in self._loras]
        if unknown:
            loaded = ", ".join(sorted(self._loras)) or "none"
            raise DiffrtError(f"unknown LoRA {first_names([repr(n) for n in unknown])}; loaded: {loaded}")
        checked = ((name, check_strength(name, strength)) for name, strength in loras.items())
        return tuple(sorted((n, s) for n, s in checked if s != 0.0))

    @contextlib.contextmanager
    def using(self, wanted: LoraSet) -> Iterator[None]:
        """Hold the models' weights at `wanted` for a run (switching when needed)."""
        with self._change:
            self._pending[wanted] += 1
            try:
                while not self._may_run(wanted):
                    self._change.wait()
            finally:
                self._pending[wanted] -= 1
                if not self._pending[wanted]:
                    del self._pending[wanted]
            if wanted != self._active:
                try:
                    self._switch(wanted)
                except BaseException:
                    self._change.notify_all()  # the set changed (to the base): waiters look again
                    raise
            self._users += 1
        try:
            yield
        finally:
            with self._change:
                self._users -= 1
                self._change.notify_all()

    def _may_run(self, wanted: LoraSet) -> bool:
        """Another set: once no run holds the weights. The current set: unless a run
        waits to switch to another one (it goes first once the current runs end, so a
        stream of runs on the current set never starves a switch)."""
        if wanted != self._active:
            return self._users == 0
        return not any(pending != self._active for pending in self._pending)

    @property
    def _waiting(self) -> int:
        """Runs waiting to start (tests wait for this)."""
        return sum(self._pending.values())

    def _switch(self, wanted: LoraSet) -> None:
        """Write the weights of `wanted` in place of the active set's (caller holds the lock)."""
        try:
            self._write(wanted)
        except BaseException:
            # some stages may hold the new set already: put every stage back to its base
            logger.warning("LoRA switch to %s failed; restoring the base weights", _describe(wanted))
            self._write((), everything=True)
            raise

    def _write(self, wanted: LoraSet, everything: bool = False) -> None:
        started = time.perf_counter()
        old, new = self._contributions(self._active), self._contributions(wanted)
        if everything:  # every parameter any LoRA targets back to base (after a failed switch)
            old = self._contributions(tuple((n, 1.0) for n in self._targets))
        changed = 0
        for key in sorted(set(old) | set(new)):
            stage = self._stage(key)
            params = {p for p in set(old.get(key, {})) | set(new.get(key, {}))
                      if old.get(key, {}).get(p) != new.get(key, {}).get(p)}
            if not params:
                continue
            updates: dict[str, np.ndarray] = {}
            base = stage.read(params)
            merged = {p: self._merged(stage, new[key][p], base) for p in params if p in new.get(key, {})}
            if merged:
                updates.update(stage.weights.updates(merged))
            for p in params - set(merged):  # back to the exported values, as stored
                updates.update({pl.initializer: _stored(base[pl.initializer], pl.dtype)
                                for pl in stage.weights[p].placements})
            stage.model.update_weights(updates)
            changed += len(params)
        self._active = wanted
        logger.info("LoRA set %s merged (%d weights) in %.2fs", _describe(wanted), changed,
                    time.perf_counter() - started)

    def _contributions(self, loras: LoraSet) -> dict[str, dict[str, tuple[tuple[str, str, float], ...]]]:
        """stage key -> parameter -> the (lora, module, strength) deltas it gets."""
        out: dict[str, dict[str, list[tuple[str, str, float]]]] = {}
        for name, strength in loras:
            for key, placed in self._targets[name].items():
                for module, parameter in placed.items():
                    out.setdefault(key, {}).setdefault(parameter, []).append((name, module, strength))
        return {k: {p: tuple(v) for p, v in params.items()} for k, params in out.items()}

    def _merged(self, stage: _Stage, contributions: tuple[tuple[str, str, float], ...],
                base: Mapping[str, np.ndarray]) -> np.ndarray:
        first = contributions[0]
        value = stage.base_value(self._targets[first[0]][stage.key][first[1]], base)
        for name, module, strength in contributions:
            layer = self._loras[name].layers[(stage.weights.component, module)]
            value = value + layer.delta(strength).reshape(value.shape)
        return value

    def _stage(self, key: str) -> _Stage:
        return next(s for stages in list(self._stages.values()) for s in stages if s.key == key)


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """A graph's stored values as `WeightMap.updates` hands them over: bfloat16 bit
    patterns (how the graph reader returns them) as ml_dtypes.bfloat16 where installed."""
    if dtype != "bfloat16" or values.dtype != np.uint16:
        return values
    try:
        import ml_dtypes
    except ImportError:
        return values
    return values.view(ml_dtypes.bfloat16)


def _describe(loras: LoraSet) -> str:
    return ", ".join(f"{n}:{s:g}" for n, s in loras) or "(none)"


__all__ = ["LoraSet", "MergedLoras"]
