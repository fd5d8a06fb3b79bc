"""The text-to-image pipeline: tokenize, encode, denoise, decode. Torch-free.

    pipe = Pipeline.load("out/sd15", backend="ort")
    result = pipe("a photo of a cat", num_inference_steps=30, seed=0)
    result.images[0].save("cat.png"); print(result.timings)

With the same weights, prompt, scheduler config and `latents`, a deterministic
scheduler reproduces diffusers' image (tests/test_pipeline_parity.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import Manifest, load_artifact
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.families import Preset, get_family
from diffrt.runtime.backends import Session, get_backend
from diffrt.runtime.images import postprocess, to_pil
from diffrt.runtime.schedulers import Scheduler, make_scheduler
from diffrt.runtime.tokenizers import CLIPTokenizer

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np")


@dataclass
class PipelineOutput:
    """`images`: PIL images, or float32 NHWC in [0, 1] for output_type="np".
    `timings`: seconds per stage (text_encoder, denoiser, denoiser_steps, vae_decoder, total)."""

    images: Any
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """One generation's resolved settings (explicit args > preset > checkpoint defaults)."""

    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int


class Pipeline:
    def __init__(self, folder: Path, manifest: Manifest, backend, sessions: dict[str, Session]):
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.family = get_family(manifest.family)
        self._sessions = sessions
        self.tokenizer = CLIPTokenizer.from_dir(folder / "tokenizer")
        self.scheduler_config = _read_scheduler_config(folder)
        self._schedulers: dict[str, Scheduler] = {}

    @classmethod
    def load(cls, folder: str | Path, backend: str = "ort", verify: bool = True, **backend_options: Any) -> Pipeline:
        """Open an artifact folder. `verify` hashes every file against the manifest
        (sizes are always checked); `backend_options` go to the backend (e.g. providers)."""
        folder = Path(folder)
        manifest = load_artifact(folder, check_hashes=verify)
        family = get_family(manifest.family)
        engine = get_backend(backend, **backend_options)
        sessions = {}
        try:
            for name in (family.TEXT_ENCODER, family.DENOISER, family.VAE_DECODER):
                t0 = time.perf_counter()
                sessions[name] = engine.open(folder, manifest.stage(name))
                logger.info("loaded %s in %.2fs", name, time.perf_counter() - t0)
            return cls(folder, manifest, engine, sessions)
        except BaseException:
            for session in sessions.values():
                session.close()
            raise

    # -- settings ---------------------------------------------------------------

    @property
    def presets(self) -> dict[str, Preset]:
        return self.family.PRESETS

    def _scheduler(self, name: str) -> Scheduler:
        if name not in self._schedulers:
            try:
                self._schedulers[name] = make_scheduler(name, self.scheduler_config)
            except ValueError as exc:
                raise DiffrtError(f"scheduler: {exc}") from None
        return self._schedulers[name]

    def resolve(self, preset=None, scheduler=None, num_inference_steps=None, guidance_scale=None, height=None, width=None) -> Settings:
        """Explicit arguments win over the preset, the preset over the checkpoint's defaults."""
        defaults = self.manifest.defaults
        if preset is not None:
            if preset not in self.presets:
                raise DiffrtError(f"unknown preset {preset!r}; choose one of: {', '.join(self.presets)}")
            recipe = self.presets[preset]
            base_scheduler = recipe.scheduler or defaults["scheduler"]
            base_steps = recipe.num_inference_steps
            base_guidance = self.family.preset_guidance(recipe, self.manifest.model)
        else:
            base_scheduler = defaults["scheduler"]
            base_steps = defaults["num_inference_steps"]
            base_guidance = defaults["guidance_scale"]
        steps = base_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise DiffrtError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        guidance = float(base_guidance if guidance_scale is None else guidance_scale)
        if not np.isfinite(guidance) or guidance < 0:
            raise DiffrtError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        multiple = int(self.manifest.model["size_multiple"])
        sizes = {"height": defaults["height"] if height is None else height,
                 "width": defaults["width"] if width is None else width}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
                raise DiffrtError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
        name = base_scheduler if scheduler is None else scheduler
        self._scheduler(name)  # validates the name now, before any work
        return Settings(name, int(steps), guidance, int(sizes["height"]), int(sizes["width"]))

    # -- generation -------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        scheduler: str | None = None,
        preset: str | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int], None] | None = None,
        generator: np.random.Generator | None = None,
    ) -> PipelineOutput:
        """Generate images. `callback(step, total)` is called after every denoiser step.

        Randomness (initial noise when `latents` is None, and the noise that ancestral
        and LCM samplers inject) comes from `generator` if given, else from
        `np.random.default_rng(seed)`.
        """
        started = time.perf_counter()
        # 1. Check every input before doing any work.
        settings = self.resolve(preset, scheduler, num_inference_steps, guidance_scale, height, width)
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise DiffrtError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise DiffrtError(f"output_type={output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}")
        batch = len(prompts) * num_images_per_prompt
        model = self.manifest.model
        factor = int(model["vae_scale_factor"])
        shape = (batch, int(model["latent_channels"]), settings.height // factor, settings.width // factor)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise DiffrtError(f"latents must have shape {shape} for this batch and size, got {latents.shape}")
        timings: dict[str, Any] = {}
        rng = generator if generator is not None else np.random.default_rng(seed)

        # 2. Conditioning: text embeddings (uncond + cond in one batch when using CFG).
        t0 = time.perf_counter()
        cond = self.family.denoiser_conditioning(
            self._encode_text, model, prompts, negatives, num_images_per_prompt, settings.guidance_scale
        )
        timings["text_encoder"] = time.perf_counter() - t0

        # 3. Initial latents, scaled by the scheduler's initial sigma (as diffusers does).
        run = self._scheduler(settings.scheduler).plan(settings.num_inference_steps)
        noise = latents if latents is not None else rng.standard_normal(shape, dtype=np.float32)
        sample = (noise * np.float32(run.init_noise_sigma)).astype(np.float32)

        # 4. Denoising loop: one batched denoiser call per step.
        sample, timings["denoiser_steps"] = self._denoise(sample, cond, run, settings, rng, callback)
        timings["denoiser"] = float(sum(timings["denoiser_steps"]))

        # 5. Decode.
        t0 = time.perf_counter()
        decoder = self._sessions[self.family.VAE_DECODER]
        decoded = decoder.run({"latent_sample": sample / np.float32(model["vae_scaling_factor"])})["sample"]
        images = postprocess(np.asarray(decoded))
        timings["vae_decoder"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - started
        return PipelineOutput(images=to_pil(images) if output_type == "pil" else images, timings=timings)

    def _encode_text(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts)
        return self._sessions[self.family.TEXT_ENCODER].run({"input_ids": ids})["last_hidden_state"]

    def _denoise(self, sample, cond, run, settings: Settings, rng, callback) -> tuple[np.ndarray, list[float]]:
        unet = self._sessions[self.family.DENOISER]
        do_cfg = self.family.uses_cfg(self.manifest.model, settings.guidance_scale)
        guidance = np.float32(settings.guidance_scale)
        step_times = []
        total = len(run.timesteps)
        for i, t in enumerate(run.timesteps):
            t0 = time.perf_counter()
            model_input = np.concatenate([sample, sample]) if do_cfg else sample
            model_input = run.scale_model_input(model_input, i)
            timestep = np.full((model_input.shape[0],), t, dtype=np.float32)
            out = unet.run({"sample": model_input, "timestep": timestep, **cond})["out_sample"]
            if do_cfg:
                uncond, text = np.split(out, 2)
                out = uncond + guidance * (text - uncond)
            sample = run.step(out, i, sample, rng)
            step_times.append(time.perf_counter() - t0)
            if callback is not None:
                callback(i + 1, total)
        return sample, step_times

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions = {}

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DiffrtError("prompt must be a string or a non-empty list of strings")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    else:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
        raise DiffrtError(f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt)")
    return prompts, negatives


def _read_scheduler_config(folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read ({exc}); re-export the model") from None
