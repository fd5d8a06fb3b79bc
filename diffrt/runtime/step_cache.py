"""Step caching: skip most of the denoiser's work on most steps. Torch-free.

DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024)
for UNets. The deep part of a UNet (everything below the skip branch it keeps) changes
slowly from step to step: on a full step the whole UNet runs and the feature entering
the last up-block layer of the cache branch is kept; on the next N-1 steps only the
shallow path runs (time embedding, conv_in, the down layers above the branch, the up
layers from the branch on, the output conv) on the kept feature. The artifact holds two
extra UNet graphs for it (`diffrt export --step-cache deepcache[:BRANCH]`,
diffrt/export/deepcache.py): the full UNet that also outputs the feature, and the
shallow UNet that takes it. Which layers are skipped follows the `DeepCache` package's
DeepCacheSDHelper (branch b: block b // 3 and layer b % 3, counted from the UNet's outer
end), which tests/test_step_cache.py compares against.

A request asks for it with `cache="deepcache:N"` (N: the interval; step i runs the
full UNet when i % N == 0, i counting denoiser calls) or `"deepcache:N:BRANCH"`; the
plain UNet runs when the cache is off, so uncached images do not change at all.

First-Block Cache (diffusers' FirstBlockCacheConfig) for Flux and SD3 / SD3.5:
`cache="fbcache:T"` on an artifact exported with `--step-cache fbcache`
(diffrt/export/fbcache.py): the first transformer block runs every step, the others
only when its residual moved by more than T (FirstBlockCacheHook). With CFG both rows
run in one call, so the decision is over the whole batch (diffusers' SD3 pipeline too
calls its transformer once per step).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffrt.artifacts import FUSED_VARIANT
from diffrt.errors import ArtifactError, DiffrtError

logger = logging.getLogger(__name__)

DEEPCACHE = "deepcache"
FBCACHE = "fbcache"
KINDS = (DEEPCACHE, FBCACHE)
FULL_VARIANT = "deepcache-full"
SHALLOW_VARIANT = "deepcache-shallow"
VARIANTS = (FULL_VARIANT, SHALLOW_VARIANT)
FEATURE = "deepcache_feature"
"""The full graph's extra output and the shallow graph's extra input."""
FACT = "deepcache"
"""The stages' facts key: {"branch": b, "block": b // 3, "layer": b % 3}."""
EXPORT_FLAG = "--step-cache deepcache"
# First-Block Cache (diffusers' FirstBlockCacheConfig): diffrt/export/fbcache.py
FB_FAMILIES = {"flux": "Flux", "sd3": "SD3"}
"""The families whose transformers have First-Block Cache graphs, and their names for users."""
HEAD_VARIANT = "fbcache-head"
TAIL_VARIANT = "fbcache-tail"
FB_TAIL_RESIDUAL = "fbcache_tail_residual"
FB_FIRST_RESIDUAL = "fbcache_first_residual"
FB_HIDDEN = "fbcache_hidden"
FB_ENCODER = "fbcache_encoder"
FUSED_PREFIX = "fused-attention+"


@dataclass(frozen=True)
class StepCache:
    """A request's step cache: `kind` "deepcache" with `interval` (a full step every N)
    and `branch` (None: the one the artifact was exported for), or "fbcache" with
    `threshold` (the other blocks are skipped while the first block's residual changes
    by at most this, relative)."""

    kind: str
    interval: int = 1
    branch: int | None = None
    threshold: float | None = None

    def __str__(self) -> str:
        if self.kind == FBCACHE:
            return f"{self.kind}:{self.threshold:g}"
        return f"{self.kind}:{self.interval}" + ("" if self.branch is None else f":{self.branch}")


def parse(value: Any) -> StepCache | None:
    """'off' / None / '' -> None; 'deepcache:3' or 'deepcache:3:1' -> a StepCache; any
    other value is a one-line error."""
    if value is None or isinstance(value, StepCache):
        return value
    if not isinstance(value, str):
        raise DiffrtError(f"cache={value!r}: give a string like 'deepcache:3' (or 'off')")
    text = value.strip().lower()
    if text in ("", "off", "none"):
        return None
    kind, _, rest = text.partition(":")
    if kind not in KINDS:
        raise DiffrtError(f"cache={value!r}: unknown step cache {kind!r}; use 'deepcache:N' (UNets: a full UNet "
                          "step every N steps, e.g. deepcache:3), 'fbcache:T' (Flux, SD3, e.g. fbcache:0.12) or 'off'")
    if kind == FBCACHE:
        try:
            threshold = float(rest)
        except ValueError:
            threshold = -1.0
        if not 0.0 <= threshold < 10.0:
            raise DiffrtError(f"cache={value!r}: use 'fbcache:T' with a threshold T >= 0, e.g. fbcache:0.12 "
                              "(higher skips more steps)")
        return StepCache(kind, threshold=threshold)
    parts = rest.split(":") if rest else []
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise DiffrtError(f"cache={value!r}: use 'deepcache:N' or 'deepcache:N:BRANCH' with whole numbers "
                          "(e.g. deepcache:3, deepcache:3:0)")
    interval = int(parts[0])
    if not 1 <= interval <= 1000:
        raise DiffrtError(f"cache={value!r}: the interval must be 1 or more (1 runs the full UNet every step)")
    return StepCache(kind, interval, int(parts[1]) if len(parts) == 2 else None)


def exported_branch(stages: Mapping[str, Any], denoiser: str) -> int | None:
    """The DeepCache branch an artifact's stages were exported for (None: no DeepCache graphs)."""
    for spec in stages.values():
        if spec.role == denoiser and spec.variant.endswith(FULL_VARIANT) and FACT in spec.facts:
            return int(spec.facts[FACT]["branch"])
    return None


def check(manifest: Any, denoiser: str, value: Any) -> StepCache | None:
    """`value` parsed and checked against the artifact: it must hold the graphs for it."""
    cache = parse(value)
    if cache is None:
        return None
    if cache.kind == FBCACHE:
        if not any(s.role == denoiser and s.variant == HEAD_VARIANT for s in manifest.stages.values()):
            how = "re-export it with `diffrt export SRC OUT --step-cache fbcache`" \
                if manifest.family in FB_FAMILIES else \
                f"First-Block Cache is for {' and '.join(FB_FAMILIES.values())} transformers (UNets: deepcache:N)"
            raise DiffrtError(f"cache={str(cache)!r}: this artifact has no First-Block Cache graphs; {how}")
        return cache
    branch = exported_branch(manifest.stages, denoiser)
    if branch is None:
        kind = "a UNet" if denoiser == "unet" else f"a {denoiser}"
        how = f"re-export it with `diffrt export SRC OUT {EXPORT_FLAG}`" if denoiser == "unet" else \
            "DeepCache is for UNet models (SD 1.x/2.x, SDXL)"
        raise DiffrtError(f"cache={str(cache)!r}: this artifact has no DeepCache graphs of {kind}; {how}")
    if cache.branch is not None and cache.branch != branch:
        raise DiffrtError(f"cache={str(cache)!r}: this artifact's DeepCache graphs cache branch {branch}; use "
                          f"deepcache:{cache.interval} (or :{branch}), or re-export with "
                          f"`{EXPORT_FLAG}:{cache.branch}`")
    return StepCache(cache.kind, cache.interval, branch)


def check_request(pipe: Any, request: Any, value: Any) -> StepCache | None:
    """A request's `cache=` checked against the pipeline (Pipeline.request)."""
    cache = check(pipe.manifest, pipe.family.DENOISER, value)
    if cache is None:
        return None
    if not pipe.backend.reads_graphs:
        raise DiffrtError(f"cache={str(cache)!r}: the {pipe.backend.name} backend runs the checkpoint's own UNet, "
                          "not the artifact's DeepCache graphs; use backend='ort' or 'openvino'")
    if request.loras or pipe._branches is not None:
        raise DiffrtError(f"cache={str(cache)!r} with LoRAs is not supported yet: the DeepCache graphs hold the "
                          "exported weights only; run LoRA requests with cache='off'")
    if getattr(request, "controlnet", None) is not None:
        raise DiffrtError(f"cache={str(cache)!r} with control_image is not supported yet; use cache='off'")
    return cache


def attach(pipe: Any, cache: StepCache, plan: Any) -> Any:
    """`plan` with the cache's hook innermost (it answers in place of the UNet)."""
    first, second = pipe.lazy_contexts(lazy_specs(pipe, cache), "step cache")
    if cache.kind == FBCACHE:
        hook: Any = FirstBlockCacheHook(first, second, cache.threshold)
    else:
        hook = DeepCacheHook(first, second, cache.interval)
    return dataclasses.replace(plan, denoiser_hooks=(*plan.denoiser_hooks, hook))


def cached_steps(plan: Any) -> int | None:
    """How many denoiser calls of the run just made the plan's step cache answered
    without the full model (None: the plan has no step cache)."""
    hooks = [h for h in plan.denoiser_hooks if isinstance(h, (DeepCacheHook, FirstBlockCacheHook))]
    return hooks[-1].cached_steps if hooks else None


def lazy_specs(pipe: Any, cache: StepCache) -> dict[str, Any]:
    """The cache's two graphs (DeepCache: full and shallow; First-Block Cache: head and
    tail), keyed for Pipeline.lazy_contexts. Their models are opened by the first
    cached request (uncached pipelines never load them) in the plain denoiser's
    precision and attention form (the portable graph where a shallow path has no
    attention), verified as `load` verified the rest, and shared with every worker() view."""
    denoiser = pipe.family.DENOISER
    plain = pipe.models[denoiser].spec
    prefix = FUSED_PREFIX if plain.variant == FUSED_VARIANT else ""
    variants = (HEAD_VARIANT, TAIL_VARIANT) if cache.kind == FBCACHE else VARIANTS
    return {f"{denoiser}:{variant}": _select(pipe.manifest, denoiser, prefix, variant, plain.precision)
            for variant in variants}


def _select(manifest: Any, denoiser: str, prefix: str, variant: str, precision: str) -> Any:
    try:
        return manifest.select(denoiser, prefix + variant, [precision])
    except ArtifactError:
        if not prefix:
            raise
        return manifest.select(denoiser, variant, [precision])


class DeepCacheHook:
    """A DenoisePlan denoiser hook (one per generation: it holds the cached feature):
    step i runs the full UNet graph when i % interval == 0 and keeps its feature,
    otherwise the shallow graph on the kept feature. It answers in place of the plain
    UNet (`call_next` is not called). Both CFG halves run in the same call, as always."""

    def __init__(self, full: Any, shallow: Any, interval: int):
        self.full, self.shallow, self.interval = full, shallow, interval
        self.feature: Any = None
        self.full_steps = 0
        self.cached_steps = 0

    def __call__(self, i: int, feeds: Mapping[str, Any], call_next: Any) -> Mapping[str, Any]:
        foreign = sorted(set(feeds) - {t.name for t in self.full.spec.inputs})
        if foreign:  # another hook's input (a ControlNet's residuals): never dropped silently
            raise DiffrtError(f"the step cache's UNet graphs do not take {', '.join(foreign)} (fed by another "
                              "per-step feature, e.g. a ControlNet); run that request with cache='off'")
        if self.feature is None or i % self.interval == 0:
            outputs = self.full.run(feeds)
            self.feature = outputs[FEATURE]
            self.full_steps += 1
            return outputs
        self.cached_steps += 1
        # the shallow graph takes only what its path reads (branch 0 of a UNet whose last
        # up block has no attention reads no text embeddings)
        wanted = {t.name for t in self.shallow.spec.inputs}
        return self.shallow.run({**{k: v for k, v in feeds.items() if k in wanted}, FEATURE: self.feature})


def image_tokens(head: Any, shape: tuple[int, ...]) -> int:
    """The image tokens of a transformer input of `shape`, as the head graph `head` (a
    StageSpec) counts them: Flux's input is packed tokens (batch, tokens, channels);
    SD3's is latents (batch, channels, height, width), cut into patch x patch tokens
    (the exporter records the patch size in the stage's facts)."""
    return patch_tokens(shape, head.facts.get(FBCACHE, {}).get("patch_size"))


def patch_tokens(shape: tuple[int, ...], patch: int | None) -> int:
    """Tokens of packed input (patch None: (batch, tokens, channels)) or of latents
    (batch, channels, height, width) cut into patch x patch tokens."""
    if patch is None:
        return int(shape[1])
    return (int(shape[-2]) // int(patch)) * (int(shape[-1]) // int(patch))


class FirstBlockCacheHook:
    """A DenoisePlan denoiser hook for First-Block Cache, as diffusers' FBCHeadBlockHook
    decides: the head graph runs every step; when the relative mean absolute change of
    its first-block residual from the last fully computed step's is at most `threshold`
    (always computed on the first step), the head's own answer (its hidden states plus
    the cached residual of the other blocks) is the step's output; otherwise the tail
    graph runs and its residual is cached."""

    def __init__(self, head: Any, tail: Any, threshold: float):
        self.head, self.tail, self.threshold = head, tail, threshold
        self.first_residual: Any = None
        self.tail_residual: Any = None
        self.computed = 0
        self.cached_steps = 0

    def __call__(self, i: int, feeds: Mapping[str, Any], call_next: Any) -> Mapping[str, Any]:
        from diffrt.runtime import arrays

        foreign = sorted(set(feeds) - {t.name for t in self.head.spec.inputs})
        if foreign:
            raise DiffrtError(f"the step cache's transformer graphs do not take {', '.join(foreign)}; run that "
                              "request with cache='off'")
        sample = feeds["hidden_states"]
        xp = arrays.namespace(sample)
        residual = self.tail_residual
        if residual is None:  # nothing cached yet: the head's answer is not used
            inner = self.head.spec.input(FB_TAIL_RESIDUAL).shape[-1]
            residual = xp.zeros((sample.shape[0], image_tokens(self.head.spec, sample.shape), inner),
                                dtype=sample.dtype)
        head = self.head.run({**feeds, FB_TAIL_RESIDUAL: residual})
        current = head[FB_FIRST_RESIDUAL]
        if self.first_residual is not None and self.tail_residual is not None:
            change = float(xp.mean(xp.abs(current - self.first_residual)) / xp.mean(xp.abs(self.first_residual)))
            if not change > self.threshold:
                self.cached_steps += 1
                return {"out_sample": head["out_sample"]}
        self.first_residual = current
        wanted = {t.name for t in self.tail.spec.inputs}
        tail = self.tail.run({**{k: v for k, v in feeds.items() if k in wanted}, FB_HIDDEN: head[FB_HIDDEN],
                              FB_ENCODER: head[FB_ENCODER]})
        self.tail_residual = tail[FB_TAIL_RESIDUAL]
        self.computed += 1
        return {"out_sample": tail["out_sample"]}


__all__ = ["DEEPCACHE", "FBCACHE", "FB_FAMILIES", "FEATURE", "FirstBlockCacheHook", "FULL_VARIANT", "SHALLOW_VARIANT",
           "DeepCacheHook", "StepCache", "attach", "check", "check_request", "exported_branch", "image_tokens", "parse",
           "patch_tokens"]
