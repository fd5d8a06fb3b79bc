"""The text-to-image pipeline: tokenize, encode, denoise, decode. Torch-free.

    pipe = Pipeline.load("out/sd15", backend="ort")
    result = pipe("a photo of a cat", num_inference_steps=30, seed=0)
    result.images[0].save("cat.png"); print(result.timings)

With the same weights, prompt, scheduler config and `latents`, a deterministic
scheduler reproduces diffusers' image (tests/test_pipeline_parity.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import (
    DEFAULT_VARIANT,
    FUSED_VARIANT,
    PRECISIONS,
    STAMPS_NAME,
    Manifest,
    StageSpec,
    read_manifest,
    verify_files,
)
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.families import Preset, get_family
from diffrt.runtime import arrays
from diffrt.runtime.backends import Session, get_backend
from diffrt.runtime.images import postprocess, to_pil
from diffrt.runtime.request import (
    Settings,
    check_count,
    check_guidance,
    check_memory,
    check_scheduler,
    check_size,
    make_request,
    read_scheduler_config,
    resolve_settings,
)
from diffrt.runtime.schedulers import Scheduler, plan_window
from diffrt.runtime.tokenizers import CLIPTokenizer

logger = logging.getLogger(__name__)

# The cache folder inside an artifact: built engines (engines/<backend>/<key>/) and
# the record of verified files. Not part of the manifest: deleting it loses nothing.
ENGINES_DIR = "engines"
ATTENTION_FORMS = ("fused", "portable")


@dataclass
class PipelineOutput:
    """`images`: PIL images, or float32 NHWC in [0, 1] for output_type="np".
    `timings`: seconds per stage: text_encoder, denoiser (all calls), denoiser_calls (one
    entry per denoiser call), vae_decoder, total.
    `seed`: the seed of the first image (image i used seed + i); None when a
    `generator` supplied the randomness.
    `settings`: what was run (scheduler, num_inference_steps, guidance_scale, height, width)."""

    images: Any
    timings: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    settings: Settings | None = None


class PerImageNoise:
    """Noise drawn row by row, each image of the batch from its own generator, so an
    image is the same whether it is generated alone or in a batch (batch row i is
    image i's noise from `np.random.default_rng(seed + i)`)."""

    def __init__(self, seed: int, count: int):
        self._generators = [np.random.default_rng(seed + i) for i in range(count)]

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> PerImageNoise:
        """Row i draws from default_rng(seeds[i]) (batched requests: each its own seeds)."""
        noise = cls(0, 0)
        noise._generators = [np.random.default_rng(seed) for seed in seeds]
        return noise

    def standard_normal(self, size: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        if size[0] != len(self._generators):
            raise ValueError(f"noise for a batch of {size[0]} requested from {len(self._generators)} per-image generators")
        return np.stack([g.standard_normal(size[1:], dtype=dtype) for g in self._generators])


class Pipeline:
    def __init__(self, folder: Path, manifest: Manifest, backend, sessions: dict[str, Session]):
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.family = get_family(manifest.family)
        self._sessions = sessions
        roles = [r for r in self.family.runtime_roles(manifest.model) if r in self.family.TOKENIZER_OF]
        self.tokenizers = {role: CLIPTokenizer.from_dir(folder / self.family.TOKENIZER_OF[role]) for role in roles}
        self.scheduler_config = read_scheduler_config(folder)
        self._schedulers: dict[tuple[str, tuple], Scheduler] = {}

    @classmethod
    def load(
        cls,
        folder: str | Path,
        backend: str = "ort",
        verify: bool | str = True,
        cache_dir: str | Path | None = None,
        prepare: Mapping[str, Any] | None = None,
        graph_precision: str | None = None,
        attention: str | None = None,
        **backend_options: Any,
    ) -> Pipeline:
        """Open an artifact folder.

        `verify`: True/"stamp" (default) hashes the files of the stages it opens unless a
        stamp in the cache folder says they were verified before and have not been
        written, replaced or swapped since; "full" hashes them all; False/"size" checks
        sizes only. `cache_dir`: where built engines and stamps go (default OUT/engines).
        `prepare`: the request shape to get ready for at load, a dict with any of
        height, width, num_images (default: the checkpoint's size, one image) and
        guidance_scale (default: the checkpoint's), so that backends compiling static
        shapes (OpenVINO) do it now, not in the first request; other shapes still work.
        `graph_precision`: which of the artifact's graphs to run, "fp32", "fp16" or
        "bf16" (default: the backend's preference among those exported).
        `attention`: "fused" or "portable" graphs where the artifact has both (default:
        the backend's preference: ORT fused, OpenVINO portable).
        `backend_options` go to the backend (e.g. providers, precision, num_threads).
        """
        folder = Path(folder)
        cache_root = Path(cache_dir) if cache_dir is not None else folder / ENGINES_DIR
        manifest = read_manifest(folder)
        family = get_family(manifest.family)
        profiles = _profiles(manifest, family, prepare or {})
        engine = get_backend(backend, cache_dir=cache_root, **backend_options)
        specs = _select_stages(manifest, family, engine, graph_precision, attention)
        mode = ("stamp" if verify else "size") if isinstance(verify, bool) else verify
        if mode == "stamp" and not getattr(engine, "reads_graphs", True):
            mode = "size"  # the torch backend never opens the ONNX files: do not hash GBs of them
        verify_files(folder, manifest, mode, stages=[s.name for s in specs.values()],
                     stamps_path=cache_root / STAMPS_NAME)
        sessions = {}
        try:
            for key, spec in specs.items():
                t0 = time.perf_counter()
                sessions[key] = engine.open(folder, spec, profile=profiles.get(spec.role))
                logger.info("loaded %s in %.2fs", spec.describe(), time.perf_counter() - t0)
            return cls(folder, manifest, engine, sessions)
        except BaseException:
            for session in sessions.values():
                session.close()
            raise

    # -- settings ---------------------------------------------------------------

    @property
    def presets(self) -> dict[str, Preset]:
        return self.family.PRESETS

    def _scheduler(self, name: str, overrides: tuple[tuple[str, Any], ...] = ()) -> Scheduler:
        key = (name, overrides)
        if key not in self._schedulers:
            self._schedulers[key] = check_scheduler(name, self.scheduler_config, dict(overrides))
        return self._schedulers[key]

    def resolve(self, preset=None, scheduler=None, num_inference_steps=None, guidance_scale=None, height=None, width=None) -> Settings:
        """Explicit arguments win over the preset, the preset over the checkpoint's defaults."""
        return resolve_settings(self.manifest, self.scheduler_config, preset, scheduler, num_inference_steps,
                                guidance_scale, height, width)

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
        vae: str | None = None,
        *,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        image: np.ndarray | None = None,
        refiner: Pipeline | None = None,
        high_noise_frac: float | None = None,
    ) -> PipelineOutput:
        """Generate images.

        `callback(step, total)` is called after every denoiser call with the number of
        requested steps completed so far (PNDM makes one call more than it has steps);
        an exception it raises stops the generation there (the server cancels so).
        Non-finite values (NaN/inf, e.g. a half-precision overflow) in the latents or
        decoded images raise DiffrtError instead of becoming a black image.
        Randomness (initial noise when `latents` is None, and the noise that ancestral
        and LCM samplers inject): image i of the batch draws from its own
        `np.random.default_rng(seed + i)`; a missing seed is drawn at random and returned
        in `result.seed`. A `generator` replaces all of that with one shared stream.
        `vae`: the decoder variant, "default" (the checkpoint's VAE) or "tiny" when the
        artifact was exported with a tiny VAE (AutoencoderTiny / TAESD).
        `output_type="latent"` returns the latents undecoded (to hand to a refiner).

        SDXL (diffusers' names and defaults): `prompt_2`/`negative_prompt_2` for the
        second text encoder, the size/crop micro-conditioning, and for a refiner
        artifact `aesthetic_score`/`negative_aesthetic_score`. `denoising_end` stops a
        base model part-way (with output_type="latent"); a refiner continues those
        latents (`image=`) from `denoising_start`. Or in one call: `refiner=` a loaded
        refiner Pipeline and `high_noise_frac` (default 0.8): the base denoises the first
        80% of the schedule, the refiner the rest, in latent space, and decodes.
        """
        started = time.perf_counter()
        latents = None if latents is None else np.asarray(latents, dtype=np.float32)
        options = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                       target_size=target_size, negative_original_size=negative_original_size,
                       negative_crops_coords_top_left=negative_crops_coords_top_left,
                       negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                       negative_aesthetic_score=negative_aesthetic_score)
        takes_image = self.family.takes_image(self.manifest.model)
        if takes_image:
            if latents is not None:
                raise DiffrtError("latents= is initial noise; a refiner starts from a base model's latents: "
                                  "pass them as image=")
            image, height, width = self._check_image(image, denoising_start, height, width)
        elif image is not None:
            raise DiffrtError("image= is for a refiner artifact (it continues a base model's latents); "
                              "this artifact generates from noise")
        if refiner is not None:
            if not isinstance(refiner, Pipeline) or not refiner.family.takes_image(refiner.manifest.model):
                raise DiffrtError("refiner= must be a loaded refiner Pipeline (an exported "
                                  "StableDiffusionXLImg2ImgPipeline checkpoint)")
            if denoising_end is not None:
                raise DiffrtError("with refiner=, give high_noise_frac (where the refiner takes over), "
                                  "not denoising_end")
            denoising_end = 0.8 if high_noise_frac is None else high_noise_frac
        elif high_noise_frac is not None:
            raise DiffrtError("high_noise_frac is where a refiner takes over; pass refiner= too")
        # 1. Check every input before doing any work.
        request = make_request(
            self.manifest, self.scheduler_config, prompt, negative_prompt, num_inference_steps, guidance_scale,
            height, width, num_images_per_prompt, seed, scheduler, preset,
            "latent" if refiner is not None else output_type, vae, prompt_2=prompt_2,
            negative_prompt_2=negative_prompt_2, options=options, denoising_start=denoising_start,
            denoising_end=denoising_end,
        )
        if refiner is not None:  # the refiner's own checks, before the base spends any time
            # the same steps and guidance as the base; its own scheduler unless one was named
            refiner_args = dict(prompt=prompt, negative_prompt=negative_prompt,
                                num_inference_steps=request.settings.num_inference_steps,
                                guidance_scale=request.settings.guidance_scale,
                                num_images_per_prompt=num_images_per_prompt, scheduler=scheduler,
                                output_type=output_type, vae=vae, prompt_2=prompt_2,
                                negative_prompt_2=negative_prompt_2, denoising_start=request.denoising_end)
            refiner_request = make_request(refiner.manifest, refiner.scheduler_config, height=request.settings.height,
                                           width=request.settings.width, **refiner_args)
            check_memory(refiner.manifest, refiner_request, weights_loaded=True,
                         attention_scores=refiner._materializes_attention())
        check_memory(self.manifest, request, weights_loaded=True, attention_scores=self._materializes_attention())
        settings = request.settings
        model = self.manifest.model
        factor = int(model["vae_scale_factor"])
        shape = (request.batch, int(model["latent_channels"]), settings.height // factor, settings.width // factor)
        for name, array in (("latents", latents), ("image", image)):
            if array is not None and array.shape != shape:
                raise DiffrtError(f"{name} must have shape {shape} for this batch and size, got {array.shape}")
        rng = generator if generator is not None else PerImageNoise(request.seed, request.batch)

        if refiner is not None:
            sample, timings = self._denoise_request([request], latents, None, rng, callback)
            refined = refiner(image=self._to_host(sample), generator=rng, callback=callback, **refiner_args)
            timings["refiner"] = refined.timings
            timings["vae_decoder"] = refined.timings.get("vae_decoder", 0.0)
            timings["total"] = time.perf_counter() - started
            return PipelineOutput(images=refined.images, timings=timings,
                                  seed=None if generator is not None else request.seed, settings=settings)
        sample, timings = self._denoise_request([request], latents, image, rng, callback)

        # 5. Decode (or hand the latents on).
        images = self._decode(sample, request.vae, output_type, timings)
        timings["total"] = time.perf_counter() - started
        return PipelineOutput(images=images, timings=timings,
                              seed=None if generator is not None else request.seed, settings=settings)

    def _decode(self, sample: Any, vae: str, output_type: str, timings: dict[str, Any]) -> Any:
        """Latents -> float32 NHWC images in [0, 1] on the host ("np"), PIL images
        ("pil"), or the latents themselves on the host ("latent")."""
        if output_type == "latent":
            return _check_finite(self._to_host(sample), "latents")
        t0 = time.perf_counter()
        decoder = self._sessions[_decoder_key(self.family, vae)]
        facts = decoder.spec.facts
        scaling = np.float32(facts.get("scaling_factor", self.manifest.model["vae_scaling_factor"]))
        latent = sample / scaling + np.float32(facts.get("shift_factor", 0.0))
        decoded = decoder.run({"latent_sample": latent})["sample"]
        images = postprocess(_check_finite(self._to_host(decoded), "decoded images"))  # the one device -> host copy
        timings["vae_decoder"] = time.perf_counter() - t0
        return to_pil(images) if output_type == "pil" else images

    # -- batching across requests (the server's dynamic batching) -----------------

    def batch_key(self, **call: Any) -> tuple:
        """What a call must share with others to run in the same denoiser calls: the
        resolved size, steps, scheduler (with a preset's config) and guidance mode (CFG
        or not), plus the decoder. Calls with equal keys can go to `generate_batch`
        together. Raises DiffrtError on a call that is invalid (as calling it would),
        including one whose activations cannot fit in the memory available."""
        request = self._request_of(call)
        check_memory(self.manifest, request, weights_loaded=True, attention_scores=self._materializes_attention())
        return self._key_of(request)

    def _key_of(self, request) -> tuple:
        settings = request.settings
        do_cfg = self.family.uses_cfg(self.manifest.model, settings.guidance_scale)
        return (settings.height, settings.width, settings.num_inference_steps, settings.scheduler,
                settings.scheduler_config, do_cfg, request.vae)

    def generate_batch(self, calls: Sequence[Mapping[str, Any]],
                       callback: Callable[[int, int], None] | None = None) -> list[PipelineOutput]:
        """Run several calls (each a dict of `__call__` keyword arguments, with equal
        `batch_key`s) and return one PipelineOutput per call, in order. Each call keeps
        its own prompts, negative prompts, guidance scale and seed; its images are the
        ones it gets when called alone. `callback(step, total)` as in `__call__`."""
        started = time.perf_counter()
        if not calls:
            return []
        requests = [self._request_of(call) for call in calls]
        if len({self._key_of(request) for request in requests}) > 1:
            raise DiffrtError("generate_batch: the calls differ in size, steps, scheduler, guidance mode or VAE; "
                              "group them by batch_key()")
        first = requests[0]
        rows = tuple(p for r in requests for p in r.prompts for _ in range(r.num_images_per_prompt))
        negatives = tuple(p for r in requests for p in r.negative_prompts for _ in range(r.num_images_per_prompt))
        # the whole batch's memory (a bound on each request's too)
        check_memory(self.manifest, dataclasses.replace(first, prompts=rows, negative_prompts=negatives,
                                                        num_images_per_prompt=1),
                     weights_loaded=True, attention_scores=self._materializes_attention())
        # image j of request r draws from default_rng(seed_r + j), exactly as alone
        rng = PerImageNoise.from_seeds([r.seed + j for r in requests for j in range(r.batch)])
        sample, timings = self._denoise_request(requests, None, None, rng, callback)
        timings["batch_images"] = int(sample.shape[0])
        # One decoder call for the whole batch (the VAE is half the work of a few-step
        # pipeline); the latents go to the host only if a call asked for them.
        kinds = {request.output_type for request in requests}
        decoded = self._decode(sample, first.vae, "np", timings) if kinds - {"latent"} else None
        latents = _check_finite(self._to_host(sample), "latents") if "latent" in kinds else None
        outputs, start = [], 0
        for request in requests:
            rows = slice(start, start + request.batch)
            start += request.batch
            if request.output_type == "latent":
                images = latents[rows]
            else:
                images = to_pil(decoded[rows]) if request.output_type == "pil" else decoded[rows]
            outputs.append(PipelineOutput(images=images, timings={**timings, "total": time.perf_counter() - started},
                                          seed=request.seed, settings=request.settings))
        return outputs

    def _request_of(self, call: Mapping[str, Any]):
        known = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
                 "num_images_per_prompt", "seed", "scheduler", "preset", "output_type", "vae"}
        unknown = set(call) - known
        if unknown:
            raise DiffrtError(f"batched calls take {', '.join(sorted(known))}; got {', '.join(sorted(unknown))}")
        args = dict(call)
        return make_request(self.manifest, self.scheduler_config, args.pop("prompt", None), **args)

    def _check_image(self, image, denoising_start, height, width) -> tuple[np.ndarray, int, int]:
        """A refiner's input: latents from a base model (output_type="latent") and the
        fraction of the schedule the base ran; the size follows from the latents."""
        if image is None or denoising_start is None:
            raise DiffrtError("a refiner continues a base model's latents: pass image=<the base's latents, "
                              "output_type='latent'> and denoising_start=<the base's denoising_end, e.g. 0.8> "
                              "(or call the base with refiner=this pipeline)")
        image = np.asarray(image, dtype=np.float32)
        channels = int(self.manifest.model["latent_channels"])
        if image.ndim != 4 or image.shape[1] != channels:
            raise DiffrtError(f"image must be latents of shape (batch, {channels}, height/8, width/8) from a base "
                              f"model's output_type='latent', got shape {image.shape}")
        factor = int(self.manifest.model["vae_scale_factor"])
        size = (image.shape[2] * factor, image.shape[3] * factor)
        if (height, width) not in ((None, None), size):
            raise DiffrtError(f"height/width {height}x{width} disagree with the image latents' size {size[0]}x{size[1]}; "
                              "leave them out")
        return image, size[0], size[1]

    def _denoise_request(self, requests, latents, image, rng, callback) -> tuple[np.ndarray, dict[str, Any]]:
        """Conditioning, initial latents and the denoising loop of one request, or of
        several that share a batch_key (their rows one after the other); returns the
        denoised latents (still scaled by the VAE's factor) and the timings so far."""
        request = requests[0]
        settings = request.settings
        timings: dict[str, Any] = {}
        # 2. Conditioning: text embeddings (uncond + cond in one batch when using CFG).
        # The family builds it on the host (small arrays); it goes to the device once.
        t0 = time.perf_counter()
        do_cfg = self.family.uses_cfg(self.manifest.model, settings.guidance_scale)
        cond = _stack_conditioning([self.family.denoiser_conditioning(self._encode, self.manifest.model, r)
                                    for r in requests], [r.batch for r in requests], do_cfg)
        cond = {name: self._to_device(array) for name, array in cond.items()}
        guidance = _row_guidance([r.settings.guidance_scale for r in requests], [r.batch for r in requests])
        timings["text_encoder"] = time.perf_counter() - t0

        # 3. Initial latents: noise scaled by the scheduler's initial sigma (as diffusers
        # does), or a base model's latents that a refiner continues as they are.
        scheduler = self._scheduler(settings.scheduler, settings.scheduler_config)
        try:
            run = plan_window(scheduler, settings.num_inference_steps, request.denoising_start, request.denoising_end)
        except ValueError as exc:
            raise DiffrtError(str(exc)) from None
        if image is not None:
            sample = self._to_device(image)
        else:
            shape = (sum(r.batch for r in requests), int(self.manifest.model["latent_channels"]),
                     *(size // int(self.manifest.model["vae_scale_factor"]) for size in (settings.height, settings.width)))
            noise = latents if latents is not None else rng.standard_normal(shape, dtype=np.float32)
            sample = self._to_device((noise * np.float32(run.init_noise_sigma)).astype(np.float32))

        # 4. Denoising loop: one batched denoiser call per step.
        sample, timings["denoiser_calls"] = self._denoise(sample, cond, run, request, rng, callback,
                                                          self._to_device(guidance) if guidance.ndim else guidance)
        timings["denoiser"] = float(sum(timings["denoiser_calls"]))
        return sample, timings

    def _materializes_attention(self) -> bool:
        """Whether the UNet graph running here builds full attention score tensors: a
        portable graph on a backend that does not fuse attention itself (ONNX Runtime)."""
        spec = self._sessions[self.family.DENOISER].spec
        return spec.variant != FUSED_VARIANT and not getattr(self.backend, "fuses_attention_itself", False)

    def _encode(self, role: str, texts: list[str]) -> dict[str, np.ndarray]:
        """Tokenize with the role's tokenizer and run that text encoder: its outputs by
        name, on the host (the family combines them there, once per request)."""
        ids = self.tokenizers[role](texts)
        return {name: self._to_host(array) for name, array in self._sessions[role].run({"input_ids": ids}).items()}

    def _to_device(self, array: np.ndarray) -> Any:
        to_device = getattr(self.backend, "to_device", None)
        return array if to_device is None else to_device(array)

    def _to_host(self, array: Any) -> np.ndarray:
        to_host = getattr(self.backend, "to_host", None)
        return np.asarray(array) if to_host is None else to_host(array)

    def _denoise(self, sample, cond, run, request, rng, callback, guidance) -> tuple[np.ndarray, list[float]]:
        """`guidance`: the CFG scale, a float32 scalar, or one per row (batched requests)."""
        settings = request.settings
        unet = self._sessions[self.family.DENOISER]
        do_cfg = self.family.uses_cfg(self.manifest.model, settings.guidance_scale)
        call_times = []
        # Progress counts requested steps. Schedulers that make more calls than steps make
        # the extra ones first (PNDM's warm-up), so after call k, max(0, k - extra) of them
        # are done. A base/refiner hand-off counts across both: the base's calls first.
        windowed = request.denoising_start is not None or request.denoising_end is not None
        steps = settings.num_inference_steps
        extra = 0 if windowed else len(run.timesteps) - steps
        done = steps - len(run.timesteps) if request.denoising_start is not None else 0
        # Everything the loop touches lives where the backend computes (numpy on CPU; a
        # GPU backend's device arrays): the sample, the conditioning, and every step's
        # timestep row, moved once here. No host round trip per step.
        xp = arrays.namespace(sample)
        rows = sample.shape[0] * (2 if do_cfg else 1)
        timesteps = self._to_device(np.repeat(run.timesteps.astype(np.float32)[:, None], rows, axis=1))
        for i in range(len(run.timesteps)):
            t0 = time.perf_counter()
            model_input = xp.concat([sample, sample]) if do_cfg else sample
            model_input = run.scale_model_input(model_input, i)
            out = unet.run({"sample": model_input, "timestep": timesteps[i], **cond})["out_sample"]
            if do_cfg:
                uncond, text = out[: sample.shape[0]], out[sample.shape[0]:]
                out = uncond + guidance * (text - uncond)
            sample = run.step(out, i, sample, rng)
            call_times.append(time.perf_counter() - t0)
            if callback is not None:
                callback(max(0, done + i + 1 - extra), steps)
        return sample, call_times

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions = {}

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_finite(array: np.ndarray, what: str) -> np.ndarray:
    """A NaN or inf would otherwise become a black image (or poisoned latents), silently."""
    if not np.isfinite(array).all():
        raise DiffrtError(f"the generation's {what} hold non-finite values (NaN or inf): the model overflowed; "
                          "use a lower guidance_scale, another scheduler, or fp32 graphs (graph_precision='fp32')")
    return array


def _stack_conditioning(parts: list[dict[str, np.ndarray]], batches: list[int], do_cfg: bool) -> dict[str, np.ndarray]:
    """Several requests' denoiser conditioning as one batch: their rows in order, and
    with CFG all unconditional rows first, then all conditional ones (the loop's
    [uncond..., cond...] layout)."""
    if len(parts) == 1:
        return parts[0]
    stacked = {}
    for name in parts[0]:
        arrays = [part[name] for part in parts]
        if not do_cfg:
            stacked[name] = np.concatenate(arrays)
            continue
        halves = [(a[:b], a[b:]) for a, b in zip(arrays, batches, strict=True)]
        stacked[name] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
    return stacked


def _row_guidance(scales: list[float], batches: list[int]) -> np.ndarray:
    """One float32 scale for a batch that shares it (the single-request case), else one
    per row of shape (rows, 1, 1, 1): float32 products either way, so a row's result does
    not depend on the others."""
    if len(set(scales)) == 1:
        return np.float32(scales[0])
    return np.repeat(np.asarray(scales, dtype=np.float32), batches).reshape(-1, 1, 1, 1)


def _decoder_key(family, variant: str) -> str:
    return family.VAE_DECODER if variant == DEFAULT_VARIANT else f"{family.VAE_DECODER}:{variant}"


def _select_stages(manifest: Manifest, family, backend, graph_precision: str | None,
                   attention: str | None) -> dict[str, StageSpec]:
    """The stages a generation opens: one per runtime role in the backend's preferred
    graph precision and attention form (or as asked), plus every other VAE decoder
    variant the artifact holds in that precision (chosen per call with `vae=`)."""
    if attention not in (None, *ATTENTION_FORMS):
        raise DiffrtError(f"attention={attention!r}; choose one of: {', '.join(ATTENTION_FORMS)}")
    if graph_precision is not None:
        if graph_precision not in PRECISIONS:
            raise DiffrtError(f"graph_precision={graph_precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if graph_precision not in getattr(backend, "graph_precisions", PRECISIONS):
            raise DiffrtError(f"backend {backend.name!r} cannot run {graph_precision} graphs; it runs: "
                              f"{', '.join(backend.graph_precisions)}")
    precisions = [graph_precision] if graph_precision else list(getattr(backend, "graph_precisions", PRECISIONS))
    precisions = [p for p in precisions if p in manifest.precisions] or precisions
    fused = attention == "fused" or (attention is None and getattr(backend, "fused_attention", False))
    specs = {}
    for role in family.runtime_roles(manifest.model):
        has_fused = any(s.variant == FUSED_VARIANT for s in manifest.variants(role))
        if attention == "fused" and role in family.ATTENTION_ROLES and not has_fused:
            raise ArtifactError(f"this artifact has no fused-attention {role} graph; export it with a diffrt that "
                                "fuses attention (the default), or use attention='portable'")
        variant = FUSED_VARIANT if fused and has_fused else DEFAULT_VARIANT
        kept_fp32 = family.keeps_fp32(manifest.model, manifest.select(role, variant))  # e.g. SDXL's VAE
        specs[role] = manifest.select(role, variant, [*precisions, "fp32"] if kept_fp32 else precisions)
    for spec in manifest.variants(family.VAE_DECODER):
        if spec.variant not in (DEFAULT_VARIANT, FUSED_VARIANT) and spec.precision == specs[family.VAE_DECODER].precision:
            specs[_decoder_key(family, spec.variant)] = spec
    return specs


def _profiles(manifest: Manifest, family, prepare: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    unknown = set(prepare) - {"height", "width", "num_images", "guidance_scale"}
    if unknown:
        raise DiffrtError(f"prepare: unknown key(s) {', '.join(sorted(unknown))}; use height, width, num_images, "
                          "guidance_scale")
    height, width = check_size(manifest, prepare.get("height"), prepare.get("width"))
    guidance = check_guidance(prepare.get("guidance_scale", manifest.defaults["guidance_scale"]))
    batch = check_count("prepare num_images", prepare.get("num_images", 1))
    return family.stage_profiles(manifest.model, height, width, batch, family.uses_cfg(manifest.model, guidance))
