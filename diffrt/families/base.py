"""The contract every model family satisfies, and the denoise plan a family hands the
runtime's loop. Torch-free.

A family is a module (families/sd.py, families/sdxl.py, ...) with the names `Family`
lists. The runtime never asks which family it runs: it reads the family's typed model
facts (`family.facts(manifest.model)`), validates a request's family-only options
(`family.check_options`), and asks `family.prepare(facts, request, encode)` for a
`DenoisePlan`: everything that differs between families — conditioning, latent layout,
how guidance is applied, the feed names, how latents reach the decoder — lives there.
tests/test_family_contract.py checks every registered family against `Family`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from diffrt.errors import ArtifactError

F = TypeVar("F")


# -- model facts ---------------------------------------------------------------------

def facts_from_json(cls: type[F], model: Mapping[str, Any], renamed: Mapping[str, str] | None = None) -> F:
    """A family's frozen facts dataclass from a manifest's `model` dict: unknown keys and
    missing required ones are refused by name (a misspelled fact is an error, never a
    silent default); `renamed` maps old spellings to current field names (artifacts
    written by earlier versions still load)."""
    if isinstance(model, cls):
        return model
    values = dict(model)
    for old, new in (renamed or {}).items():
        if old in values:
            value = values.pop(old)
            values.setdefault(new, value)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ArtifactError(f"manifest.json: model facts {', '.join(unknown)} are not {cls.__name__} facts "
                            f"(known: {', '.join(names)}); the artifact comes from another diffrt version or "
                            "was edited: re-export it")
    missing = sorted(name for name, f in names.items() if name not in values
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ArtifactError(f"manifest.json: model facts {', '.join(missing)} are missing; re-export the model")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest.json: model facts: {exc}; re-export the model") from None


def check_positive(facts: Any, names: tuple[str, ...]) -> None:
    """Facts that size arrays or divide must be positive integers (a damaged manifest's
    0 would otherwise surface as a ZeroDivisionError deep in a generation)."""
    for name in names:
        value = getattr(facts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def dit_largest_stage(terms: Mapping[str, int]) -> tuple[int, str]:
    """A DiT family's `min_activation_bytes` from its `activation_terms`: the stages run
    one after another, so the largest stage's sum, and its name."""
    stages = {
        "text encoder activations": terms["text_encoder_activations"],
        "transformer activations": terms["transformer_activations"] + terms.get("transformer_attention_scores", 0),
        "VAE decoder activations": terms["vae_decoder_activations"] + terms.get("vae_attention_scores", 0),
    }
    what = max(stages, key=lambda k: stages[k])
    return stages[what], what


def facts_to_json(facts: Any) -> dict[str, Any]:
    """What the exporter writes under the manifest's `model` (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(facts).items()}


# -- the denoise plan ----------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ClassifierFreeGuidance:
    """Batched CFG: the denoiser sees every sample twice, unconditional rows first, and
    the two halves are combined as uncond + scale * (cond - uncond). `scale` is a
    float32 scalar, or one per sample row (rows, 1, 1, 1) when requests with different
    scales share a batch (float32 products either way: a row never depends on others)."""

    scale: Any
    rows_per_sample: int = 2

    def model_input(self, sample: Any, xp: Any) -> Any:
        return xp.concat([sample, sample])

    def combine(self, output: Any, rows: int) -> Any:
        uncond, text = output[:rows], output[rows:]
        return uncond + self.scale * (text - uncond)


@dataclass(frozen=True, eq=False)
class NoGuidance:
    """One denoiser row per sample: no CFG (guidance off, or a guidance embedding fed as
    a conditioning input, as LCM's timestep_cond or Flux-dev's guidance)."""

    rows_per_sample: int = 1

    def model_input(self, sample: Any, xp: Any) -> Any:
        return sample

    def combine(self, output: Any, rows: int) -> Any:
        return output


def _identity(array: Any) -> Any:
    return array


def _no_step_feeds(i: int, t: float) -> Mapping[str, Any]:
    return {}


DenoiserCall = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""One denoiser call: feeds -> outputs (the denoiser context's `run`)."""
DenoiserHook = Callable[[int, Mapping[str, Any], DenoiserCall], Mapping[str, Any]]
"""`hook(i, feeds, call_next) -> outputs`: wraps step i's denoiser call. A hook may add
feeds (ControlNet residuals), run other stages first, or answer without calling the
denoiser at all (a step cache); `call_next` is the next hook, the last one the denoiser."""


@dataclass(frozen=True, eq=False)
class DenoisePlan:
    """Everything the runtime's denoising loop needs from a family for one batch.

    The loop (diffrt/runtime/denoise.py) draws noise in `noise_shape`, packs it into
    the scheduler's layout with `pack`, and per step feeds the denoiser
    {sample_feed: guidance.model_input(x), timestep_feed: t * timestep_scale per model
    row, **feeds, **static_feeds, **step_feeds(i, t)}, reads `output_name`, combines
    it with `guidance.combine`, and steps the scheduler. `to_decoder` turns the final
    latents into the decoder's input.
    """

    rows: int
    """Samples (images) in the batch."""
    noise_shape: tuple[int, ...]
    """The latents as the VAE sees them, batch first: (rows, vae latent channels, h, w)."""
    feeds: Mapping[str, np.ndarray]
    """Per-row conditioning in the denoiser's batch layout (with CFG: every unconditional
    row, then every conditional one), stacked when requests share a batch."""
    guidance: ClassifierFreeGuidance | NoGuidance
    static_feeds: Mapping[str, np.ndarray] = field(default_factory=dict)
    """The same for every row, step and request (never stacked): e.g. Flux's img_ids/txt_ids."""
    sample_feed: str = "sample"
    timestep_feed: str = "timestep"
    output_name: str = "out_sample"
    timestep_scale: float = 1.0
    """The denoiser's timestep input is t * this (1 for UNets; Flux takes t / 1000)."""
    pack: Callable[[Any], Any] = _identity
    """VAE latents -> the layout the denoiser and scheduler work in (identity for UNets)."""
    unpack: Callable[[Any], Any] = _identity
    step_feeds: Callable[[int, float], Mapping[str, Any]] = _no_step_feeds
    """Inputs that change per step and depend only on the step (not on the sample)."""
    denoiser_hooks: tuple[DenoiserHook, ...] = ()
    """Wrappers of every step's denoiser call, outermost first (see DenoiserHook): the
    runtime adds them for work that needs other stages (ControlNets, step caches)."""
    after_step: Callable[[int, Any], Any] | None = None
    """`after_step(i, sample) -> sample` after the scheduler's step i: 4-channel
    inpainting puts the known region back. None: the sample as stepped."""
    extra_channels: Any = None
    """Concatenated to the scaled model input on channels before every denoiser call,
    one row per model row: a 9-channel inpainting UNet's mask and masked-image latents
    (diffusers' StableDiffusionInpaintPipeline). None: the sample alone."""
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    schedule: Mapping[str, Any] = field(default_factory=dict)
    """What this model adds to the scheduler's plan, e.g. flow matching's resolution-
    dependent shift {"mu": ...} (Flux: diffusers' calculate_shift of the image tokens)."""

    @property
    def model_rows(self) -> int:
        return self.rows * self.guidance.rows_per_sample

    def to_decoder(self, latents: Any, decoder_facts: Mapping[str, Any] | None = None) -> Any:
        """Final latents -> the VAE decoder's `latent_sample`: unpacked, then
        latents / scaling_factor + shift_factor (float32, as diffusers does); a decoder
        stage's own facts (e.g. a tiny VAE's scaling_factor) replace the model's."""
        facts = decoder_facts or {}
        scaling = np.float32(facts.get("scaling_factor", self.scaling_factor))
        shift = np.float32(facts.get("shift_factor", self.shift_factor))
        return self.unpack(latents) / scaling + shift


def stack_plans(plans: list[DenoisePlan]) -> DenoisePlan:
    """Several requests' plans (equal batch keys) as one batch: their rows in order; with
    CFG all unconditional rows first, then all conditional ones (the loop's layout), and
    one guidance scale per row where the requests' scales differ."""
    if len(plans) == 1:
        return plans[0]
    first = plans[0]
    rows = [p.rows for p in plans]
    cfg = isinstance(first.guidance, ClassifierFreeGuidance)
    feeds = {}
    for name in first.feeds:
        parts = [p.feeds[name] for p in plans]
        if cfg:
            halves = [(a[:r], a[r:]) for a, r in zip(parts, rows, strict=True)]
            feeds[name] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
        else:
            feeds[name] = np.concatenate(parts)
    guidance = first.guidance
    if cfg:
        scales = [float(p.guidance.scale) for p in plans]
        if len(set(scales)) > 1:
            guidance = ClassifierFreeGuidance(np.repeat(np.asarray(scales, dtype=np.float32), rows).reshape(-1, 1, 1, 1))
    return dataclasses.replace(first, rows=sum(rows), noise_shape=(sum(rows), *first.noise_shape[1:]), feeds=feeds,
                               guidance=guidance)


# -- the family contract -------------------------------------------------------------

@runtime_checkable
class Family(Protocol):
    """What the exporter, the runtime, the server and the engine builders ask of a family
    module. Functions taking `facts` accept the family's Facts dataclass or the
    manifest's raw `model` dict (converted and checked by `facts`)."""

    NAME: str
    PIPELINE_CLASSES: tuple[str, ...]
    EXPORT_MODULE: str
    DENOISER: str
    VAE_DECODER: str
    VAE_ENCODER: str
    TINY_VARIANT: str
    TINY_VAE_DECODER: str
    ATTENTION_ROLES: tuple[str, ...]
    TOKENIZER_OF: Mapping[str, str]
    PRESETS: Mapping[str, Any]
    DECODER_MEMORY_FACTS: tuple[str, ...]
    HANDOFF_OPTIONS: tuple[str, ...]
    """Options a base hands on to a refiner with its latents (SDXL: prompt_2, ...)."""
    Facts: type
    Options: type

    def facts(self, model: Mapping[str, Any]) -> Any: ...
    def stages(self, facts: Any) -> tuple[str, ...]: ...
    def runtime_roles(self, facts: Any) -> tuple[str, ...]: ...
    def tokenizers(self, facts: Any) -> tuple[str, ...]: ...
    def takes_image(self, facts: Any) -> bool: ...
    def inpainting(self, facts: Any) -> str | None: ...
    """How the checkpoint inpaints (mask_image=): None (it does not), "blend" (a regular
    denoiser; the known region is put back after every step) or "unet" (a dedicated
    inpainting denoiser taking the mask and the masked picture's latents as input)."""
    def keeps_fp32(self, facts: Any, spec: Any) -> str: ...
    def check_options(self, facts: Any, options: Mapping[str, Any], prompts: int) -> Any: ...
    def default_preset(self, pipeline_class: str, model: Any = None) -> str: ...
    def preset_guidance(self, preset: Any, facts: Any) -> float: ...
    def uses_cfg(self, facts: Any, guidance_scale: float) -> bool: ...
    def stage_io(self, facts: Any) -> dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]]: ...
    def stage_profiles(self, facts: Any, height: int, width: int, batch: int, do_cfg: bool,
                       prompts: int = 1) -> dict[str, dict[str, int]]: ...
    def latent_shape(self, facts: Any, batch: int, height: int, width: int) -> tuple[int, ...]: ...
    def activation_terms(self, facts: Any, height: int, width: int, batch: int, do_cfg: bool,
                         attention_scores: bool) -> dict[str, int]: ...
    def min_activation_bytes(self, facts: Any, height: int, width: int, batch: int, do_cfg: bool,
                             attention_scores: bool) -> tuple[int, str]: ...
    def prepare(self, facts: Any, request: Any, encode: Callable[[str, list[str]], Mapping[str, np.ndarray]]
                ) -> DenoisePlan: ...


__all__ = ["ClassifierFreeGuidance", "DenoisePlan", "Family", "NoGuidance", "check_positive", "facts_from_json",
           "facts_to_json", "stack_plans"]
