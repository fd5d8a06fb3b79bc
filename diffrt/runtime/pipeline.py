"""The text-to-image pipeline: tokenize, encode, denoise, decode. Torch-free.

    pipe = Pipeline.load("out/sd15", backend="ort")
    result = pipe("a photo of a cat", num_inference_steps=30, seed=0)
    result.images[0].save("cat.png"); print(result.timings)

A Pipeline is immutable once loaded and runs one generation at a time. For several
at once, give each thread its own `pipe.worker()`: a view on the same compiled models
(one copy of the weights) with its own contexts (run state); see backends/base.py.

With the same weights, prompt, scheduler config and `latents`, a deterministic
scheduler reproduces diffusers' image (tests/test_pipeline_parity.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from diffrt.artifacts import (
    DEFAULT_VARIANT,
    FUSED_VARIANT,
    STAMPS_NAME,
    Manifest,
    StageSpec,
    read_manifest,
    verify_files,
)
from diffrt.errors import DiffrtError
from diffrt.families import Preset, get_family
from diffrt.families.base import DenoisePlan, stack_plans
from diffrt.runtime import controlnet, img2img, mask_crop
from diffrt.runtime import prompt_weighting
from diffrt.runtime import safety as safety_checker
from diffrt.runtime import step_cache
from diffrt.runtime.backends import CompiledModel, Context, get_backend
from diffrt.runtime.backends.base import profile_shapes
from diffrt.runtime.denoise import denoise, device_plan
from diffrt.runtime.images import postprocess, to_pil
from diffrt.runtime.lora_branches import (
    FUSED_LORA_VARIANT,
    BranchLayout,
    BranchLoras,
    select_branches,
)
from diffrt.runtime.loras import MergedLoras
from diffrt.runtime.request import (
    Request,
    Settings,
    check_count,
    check_guidance,
    check_memory,
    check_size,
    make_request,
    read_scheduler_config,
    resolve_settings,
)
from diffrt.runtime.stage_choice import decoder_key, select_stages
from diffrt.runtime.tokenizers import load_tokenizer

logger = logging.getLogger(__name__)

# The cache folder inside an artifact: built engines (engines/<backend>/<key>/) and
# the record of verified files. Not part of the manifest: deleting it loses nothing.
ENGINES_DIR = "engines"
# Held while a pipeline opens stages on first use (lazy_contexts), so concurrent workers open each once.
_LAZY_LOCK = threading.Lock()


@dataclass
class PipelineOutput:
    """`images`: PIL images, or float32 NHWC in [0, 1] for output_type="np".
    `timings`: seconds per stage: text_encoder, denoiser (all calls), denoiser_calls (one
    entry per denoiser call), vae_decoder, total.
    `seed`: the seed of the first image (image i used seed + i); None when a
    `generator` supplied the randomness.
    `settings`: what was run (scheduler, num_inference_steps, guidance_scale, height, width).
    `nsfw_content_detected`: per image, whether the safety checker flagged it (as diffusers'
    output); None when no checker ran. `safety`: per image, its safety_checker.Verdict (scores)."""

    images: Any
    timings: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    settings: Settings | None = None
    nsfw_content_detected: list[bool] | None = None
    safety: list[Any] | None = None


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
    _verify_encoder: tuple[str, Path | None] = ("size", None)  # set by `load`
    _safety: tuple[str, Any] = ("off", None)  # set by `load`: the default policy, the preprocessing config

    def __init__(self, folder: Path, manifest: Manifest, backend, models: dict[str, CompiledModel],
                 shapes: Mapping[str, Mapping[str, tuple[int, ...]] | None] | None = None):
        """`models`: a compiled model per stage key (see `load`), which this pipeline owns
        and closes; `shapes`: full input shapes per stage key to get its contexts ready
        for (Context.prepare), for this pipeline and every `worker()` of it."""
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.family = get_family(manifest.family)
        self.facts = self.family.facts(manifest.model)
        self._models = dict(models)
        self._shapes = {key: value for key, value in (shapes or {}).items() if value}
        self._owner = True  # closes the models; a worker() view closes its own contexts only
        roles = [r for r in self.family.runtime_roles(self.facts) if r in self.family.TOKENIZER_OF]
        kinds = getattr(self.family, "TOKENIZER_KIND", {})  # role -> "t5" where not CLIP (SD3, Flux)
        self.tokenizers = {role: load_tokenizer(folder / self.family.TOKENIZER_OF[role], kinds.get(role, "clip"))
                           for role in roles}
        self.scheduler_config = read_scheduler_config(folder)
        self._contexts = _open_contexts(self._models, self._shapes)
        # LoRA: merged into the weights, or (a denoiser with LoRA branches) fed per row where stages have branches
        layouts = {m.spec.role: BranchLayout.of(m.spec) for m in self._models.values() if BranchLayout.of(m.spec)}
        layouts = layouts if self.family.DENOISER in layouts else {}
        merged = {k: m for k, m in self._models.items() if m.spec.role not in layouts}
        self._loras = MergedLoras(folder, merged, backend)  # shared with worker() views, as the models are
        self._branches = BranchLoras(layouts, self._loras) if layouts else None
        self._token_tables: dict[str, np.ndarray] = {}  # textual inversion: each role's table as it runs now

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
        workers: int = 1,
        loras: Mapping[str, str | Path] | None = None,
        lora_branches: bool | None = None,
        safety: str | None = None,
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
        "bf16" (default: the backend's preference among those exported), or "int8":
        the int8 stages `diffrt quantize` added, the other stages as by default.
        `attention`: "fused" or "portable" graphs where the artifact has both (default:
        the backend's preference: ORT fused, OpenVINO portable).
        `workers`: how many generations will run at once (this pipeline and its
        `worker()` views); OpenVINO compiles one stream per worker.
        `loras`: LoRA files to load by name, {"style": "style.safetensors"} (see
        `load_lora`); a call then names the ones it runs with, `loras={"style": 0.8}`.
        `lora_branches`: run the artifact's LoRA-branch UNet (`diffrt lora-branches`), so
        requests with different LoRAs share a batch (diffrt.runtime.lora_branches);
        None (default): when the artifact has one; False: merge LoRAs into the weights.
        `safety`: the default safety-checker policy, "off", "flag", "blur" or "block"
        (None: "flag" where the artifact has a safety checker, diffrt.runtime.safety).
        `backend_options` go to the backend (e.g. providers, precision, num_threads).
        """
        folder = Path(folder)
        cache_root = Path(cache_dir) if cache_dir is not None else folder / ENGINES_DIR
        manifest = read_manifest(folder)
        family = get_family(manifest.family)
        profiles = _profiles(manifest, family, prepare or {})
        workers = check_count("workers", workers)
        engine = get_backend(backend, cache_dir=cache_root, workers=workers, **backend_options)
        specs = select_stages(manifest, family, engine, graph_precision, attention)
        specs = select_branches(manifest, specs, family.DENOISER, family.TOKENIZER_OF, lora_branches, engine)
        safety = safety_checker.check_policy(safety, safety_checker.SAFETY_CHECKER in manifest.stages, engine.name)
        if safety != "off":  # the checker runs in fp32 on every backend (a small CLIP vision tower)
            specs[safety_checker.SAFETY_CHECKER] = manifest.select(safety_checker.SAFETY_CHECKER, precision="fp32")
        mode = ("stamp" if verify else "size") if isinstance(verify, bool) else verify
        if mode == "stamp" and not engine.reads_graphs:
            mode = "size"  # the torch backend never opens the ONNX files: do not hash GBs of them
        verify_files(folder, manifest, mode, stages=[s.name for s in specs.values()],
                     stamps_path=cache_root / STAMPS_NAME)
        models: dict[str, CompiledModel] = {}
        try:
            for key, spec in specs.items():
                t0 = time.perf_counter()
                models[key] = engine.open(folder, spec, profile=profiles.get(spec.role))
                logger.info("loaded %s in %.2fs", spec.describe(), time.perf_counter() - t0)
            shapes = {key: profile_shapes(spec, profiles.get(spec.role)) for key, spec in specs.items()}
            pipe = cls(folder, manifest, engine, models, shapes)
            pipe._verify_encoder = (mode, cache_root / STAMPS_NAME)  # how img2img's VAE encoder is checked
            if safety != "off":
                spec = specs[safety_checker.SAFETY_CHECKER]
                pipe._safety = (safety, safety_checker.load_preprocessing(folder, spec.facts))
            for name, path in (loras or {}).items():
                pipe.load_lora(name, path)
            return pipe
        except BaseException:
            for model in models.values():
                model.close()
            raise

    def worker(self) -> Pipeline:
        """Another pipeline on the same compiled models (no second copy of the weights)
        with contexts of its own, for one more thread to generate at the same time as
        this one: `[pipe] + [pipe.worker() for _ in range(n - 1)]`, one per thread. Load
        with `workers=n` so that backends that split the device between runs (OpenVINO's
        streams) do. Close a worker when done with it; closing the pipeline it came from
        closes the models, after which its workers fail."""
        view = copy.copy(self)
        view._owner = False
        view._contexts = _open_contexts(self._models, self._shapes)
        return view

    def load_lora(self, name: str, path: str | Path) -> Any:
        """Load a LoRA .safetensors file (diffusers/PEFT or kohya layout, see
        diffrt.lora) under `name`, checked against this model: keys that match nothing
        or shapes that do not fit are a one-line error and nothing changes. Calls name
        it with a strength, `loras={name: 0.8}`; it is merged into the weights
        (`update_weights`) while a call that names it runs, and taken out again when a
        call names another set. Shared with every `worker()`. Returns the parsed Lora."""
        return self._loras.add(name, path) if self._branches is None else self._branches.add(name, path)

    def with_loras(self, request: Request, loras: Mapping[str, float] | None) -> Request:
        """`request` run with these {name: strength} LoRAs instead (checked as in `request`)."""
        wanted = self._loras.check(loras)
        if self._branches is not None:
            self._branches.check_set(wanted)  # the set's ranks fit the branches
        return dataclasses.replace(request, loras=wanted)

    @property
    def loras(self) -> Mapping[str, Any]:
        """The loaded LoRAs by name (diffrt.lora.Lora)."""
        return MappingProxyType(self._loras.loaded if self._branches is None else self._branches.loaded)

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> list[str]:
        """Load a textual-inversion embedding (.safetensors; diffusers' single-token,
        multi-vector and SDXL clip_l/clip_g forms, see diffrt.textual_inversion): its
        tokens join the tokenizers and its vectors the text encoders' token tables
        (`update_weights`, no reload). `token` names it (default: the file's). Call it
        between generations; shared with every `worker()`. Returns the tokens added."""
        from diffrt.runtime.textual_inversion import load_into

        return load_into(self, path, token)

    @property
    def models(self) -> Mapping[str, CompiledModel]:
        """The compiled model of each stage (by role, e.g. "unet"; other decoder
        variants as "vae_decoder:tiny"), shared by every worker: `.spec` is the stage
        it runs, and `pipe.models["unet"].update_weights({initializer: array})`
        changes the weights all of them run."""
        return MappingProxyType(self._models)

    # -- settings ---------------------------------------------------------------

    @property
    def presets(self) -> dict[str, Preset]:
        return self.family.PRESETS

    def resolve(self, preset=None, scheduler=None, num_inference_steps=None, guidance_scale=None, height=None,
                width=None) -> Settings:
        """Explicit arguments win over the preset, the preset over the checkpoint's defaults."""
        return resolve_settings(self.manifest, self.scheduler_config, preset, scheduler, num_inference_steps,
                                guidance_scale, height, width)

    # -- requests -----------------------------------------------------------------

    def request(
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
        vae: str | None = None,
        *,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        image: Any = None,
        loras: Mapping[str, float] | None = None,
        strength: float | None = None,
        noise: np.ndarray | None = None,
        image_noise: np.ndarray | None = None,
        sample_mode: str | None = None,
        mask_image: Any = None,
        padding_mask_crop: int | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] | None = None,
        control_guidance_end: float | Sequence[float] | None = None,
        guess_mode: bool = False,
        cache: str | None = None,
        **options: Any,
    ) -> Request:
        """Validate a generation once, before any work: a `Request` for `generate`.
        `options` are the family's own (SDXL: prompt_2, negative_prompt_2,
        original_size, crops_coords_top_left, target_size, their negative_ forms,
        aesthetic_score, negative_aesthetic_score); an unknown one is a one-line error
        naming those accepted. A request whose activations cannot fit in the memory
        available is refused here too. `loras`: {name: strength} of loaded LoRAs
        (`load_lora`) to run with; strength 0 is the same as leaving one out.

        img2img: `image` is a picture (PIL RGB image, file path, or (H, W, 3) array:
        uint8, or float in [0, 1]) or latents (batch, latent channels, h, w); the output
        has the picture's size rounded down to a multiple of the VAE's scale factor
        unless height/width are given (then it is resized to them; SD3 and Flux: the
        checkpoint's size unless given, as diffusers'). `strength` in (0, 1]
        (default diffusers': SD 0.8, SDXL 0.3, SD3 and Flux 0.6) is how much of the
        schedule is redone.
        `noise` (batch, C, h, w), the noise added at the start step, and `image_noise`
        (1 or batch, C, h, w), the VAE encoder's sample noise, replace those draws;
        `sample_mode="argmax"` takes the encoder's mode instead of a sample
        (diffrt.runtime.img2img). Inpainting (SD 1.x/2.x and SDXL, regular and 9-channel inpainting
        UNets; SD3 and Flux, regular transformers): `mask_image` (white = repaint, the
        picture's size; default strength 1.0, SDXL 0.9999, SD3 and Flux 0.6, and the
        checkpoint's size, as diffusers' inpainting pipelines). `padding_mask_crop=N`:
        only the mask's box padded by N pixels is inpainted, then pasted back into the
        whole picture (diffrt.runtime.mask_crop).
        ControlNets (an artifact exported with --controlnet): `control_image` (one per
        ControlNet), `controlnet_conditioning_scale`, `control_guidance_start`/`_end` (a
        number, or one per ControlNet), `guess_mode`, as diffusers' ControlNet pipelines;
        without height/width the first control image's size (diffrt.runtime.controlnet)."""
        if control_image is not None:
            height, width = controlnet.default_size(control_image, height, width, int(self.facts.vae_scale_factor))
        request = make_request(self.manifest, self.scheduler_config, prompt, negative_prompt, num_inference_steps,
                               guidance_scale, height, width, num_images_per_prompt, seed, scheduler, preset,
                               latents, output_type, vae, denoising_start=denoising_start,
                               denoising_end=denoising_end, image=image, strength=strength, noise=noise,
                               image_noise=image_noise, sample_mode=sample_mode, mask_image=mask_image,
                               padding_mask_crop=padding_mask_crop, **options)
        control = controlnet.check_request(self.manifest, control_image, request.settings.height,
                                           request.settings.width, controlnet_conditioning_scale, control_guidance_start,
                                           control_guidance_end, guess_mode, self.backend)
        request = dataclasses.replace(self.with_loras(request, loras), controlnet=control)
        controlnet.check_combination(self, request)  # not with image=, LoRAs (yet)
        request = dataclasses.replace(request, cache=step_cache.check_request(self, request, cache))  # "deepcache:3"
        self._prompt_chunks(request)  # weighted prompts: their syntax, and a long one on a fixed-length UNet
        check_memory(self.manifest, request, weights_loaded=True, attention_scores=self._materializes_attention(),
                     unopened_weights=self._unopened_weight_bytes(request))
        return request

    def batch_key(self, request: Request) -> tuple:
        """What requests must share to run in the same denoiser calls (`generate`): the
        size, steps, scheduler (with a preset's config), guidance mode (CFG or not), the
        decoder, the part of the schedule and the LoRA set (merged into the weights; not
        with LoRA branches, where each row gets its own).
        A request that starts from an image shares with none."""
        s = request.settings
        # family options that size the conditioning (SD3's and Flux's max_sequence_length)
        shaping = tuple(getattr(request.options, name, None) for name in getattr(self.family, "BATCH_OPTIONS", ()))
        shaping += (self._prompt_chunks(request),)  # weighted prompts: the conditioning's length in chunks
        return (s.height, s.width, s.num_inference_steps, s.scheduler, s.scheduler_config, request.do_cfg,
                request.vae, request.denoising_start, request.denoising_end,
                request.loras if self._branches is None else (), *shaping,  # branches: each row its own
                request.cache,  # a step cache runs other graphs on some steps
                id(request) if request.from_image or request.controlnet is not None else None)  # image=, ControlNets: alone

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
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        image: Any = None,
        refiner: Pipeline | None = None,
        high_noise_frac: float | None = None,
        loras: Mapping[str, float] | None = None,
        safety: str | None = None,
        cache: str | None = None,
        **options: Any,
    ) -> PipelineOutput:
        """Generate images, diffusers-style: `pipe.request(...)` then `pipe.generate([...])`.

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
        `options`: the family's own (see `request`).
        `safety`: this call's safety-checker policy (default: the one `load` was given).

        A base/refiner ensemble (SDXL): `denoising_end` stops a base model part-way
        (with output_type="latent"); a refiner continues those latents (`image=`) from
        `denoising_start`. Or in one call: `refiner=` a loaded refiner Pipeline and
        `high_noise_frac` (default 0.8): the base denoises the first 80% of the
        schedule, the refiner the rest, in latent space, and decodes.

        img2img: `image=` a picture (PIL image, path or array) and `strength=` (see
        `request`; also `noise`, `image_noise`, `sample_mode`), as diffusers'
        StableDiffusionImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline (SD3, Flux: their
        img2img pipelines). Its random
        draws, in order: the VAE encoder's sample, the noise added at the start step.
        """
        call = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, height=height, width=width,
                    num_images_per_prompt=num_images_per_prompt, seed=seed, scheduler=scheduler, preset=preset,
                    latents=latents, vae=vae, denoising_start=denoising_start, image=image, loras=loras,
                    cache=cache, **options)
        if refiner is None:
            if high_noise_frac is not None:
                raise DiffrtError("high_noise_frac is where a refiner takes over; pass refiner= too")
            request = self.request(output_type=output_type, denoising_end=denoising_end, **call)
            return self.generate([request], progress=callback, generator=generator, safety=safety)[0]
        if not isinstance(refiner, Pipeline) or not refiner.family.takes_image(refiner.facts):
            raise DiffrtError("refiner= must be a loaded refiner Pipeline (an exported "
                              "StableDiffusionXLImg2ImgPipeline checkpoint)")
        if denoising_end is not None:
            raise DiffrtError("with refiner=, give high_noise_frac (where the refiner takes over), not denoising_end")
        base = self.request(output_type="latent", denoising_end=0.8 if high_noise_frac is None else high_noise_frac,
                            **call)
        second = handoff_request(self.manifest, base, refiner.manifest, refiner.scheduler_config, scheduler,
                                 output_type)
        return generate_with_refiner(self, refiner, base, second, progress=callback, generator=generator)

    def generate(self, requests: Sequence[Request], progress: Callable[[int, int], None] | None = None,
                 generator: Any = None, safety: str | None = None) -> list[PipelineOutput]:
        """Run requests that share a `batch_key` in one batch (one denoiser call per
        step, one decoder call) and return one PipelineOutput per request, in order.
        Each keeps its own prompts, negative prompts, guidance scale, options and seeds:
        its images are the ones it gets alone. `progress(step, total)` as in `__call__`;
        `generator` replaces the per-image seeds with one shared noise stream.
        `safety`: the safety-checker policy for these requests (default: `load`'s)."""
        started = time.perf_counter()
        requests = list(requests)
        if not requests:
            return []
        if len({self.batch_key(r) for r in requests}) > 1:
            raise DiffrtError("generate: the requests differ in size, steps, scheduler, guidance mode, VAE, "
                              "schedule window or LoRAs; group them by batch_key()")
        if len(requests) > 1 and any(r.latents is not None or r.from_image for r in requests):
            raise DiffrtError("requests with latents= or image= run alone: give generate() one of them")
        first = requests[0]
        rows = tuple(p for r in requests for p in r.prompts for _ in range(r.num_images_per_prompt))
        # the whole batch's memory (a bound on each request's too), now that the graphs are known
        check_memory(self.manifest, dataclasses.replace(first, prompts=rows, negative_prompts=rows,
                                                        num_images_per_prompt=1),
                     weights_loaded=True, attention_scores=self._materializes_attention(),
                     unopened_weights=self._unopened_weight_bytes(first))
        # image j of request r draws from default_rng(seed_r + j), exactly as alone
        rng = generator if generator is not None else PerImageNoise.from_seeds(
            [r.seed + j for r in requests for j in range(r.batch)])
        # the weights hold this LoRA set while it runs (with LoRA branches: each request's, as it encodes)
        with self._loras.using(first.loras) if self._branches is None else contextlib.nullcontext():
            sample, plan, timings = self._denoise(requests, rng, progress)
        if len(requests) > 1:
            timings["batch_images"] = int(plan.rows)
        # One decoder call for the whole batch (the VAE is half the work of a few-step
        # pipeline); the latents go to the host only if a request asked for them.
        kinds = {r.output_type for r in requests}
        decoded = self._decode(sample, plan, first.vae, timings) if kinds - {"latent"} else None
        decoded, verdicts = self._check_safety(decoded, safety, timings)
        latents = _check_finite(self._to_host(plan.unpack(sample)), "latents") if "latent" in kinds else None
        outputs, start = [], 0
        for request in requests:
            span = slice(start, start + request.batch)
            start += request.batch
            if request.output_type == "latent":
                images = latents[span]
            else:
                images = to_pil(decoded[span]) if request.output_type == "pil" else decoded[span]
                if request.overlay is not None:  # padding_mask_crop: back into the whole picture
                    images = mask_crop.paste_back_all(request.overlay, images, request.output_type)
            outputs.append(PipelineOutput(images=images, timings={**timings, "total": time.perf_counter() - started},
                                          seed=None if generator is not None else request.seed,
                                          settings=request.settings,
                                          **_safety_fields(verdicts, span, request.output_type)))
        return outputs

    def _denoise(self, requests: list[Request], rng: Any, progress) -> tuple[Any, DenoisePlan, dict[str, Any]]:
        """1-4: conditioning (the family's plan), initial latents, the denoising loop;
        returns the denoised latents (packed, still scaled by the VAE's factor)."""
        first = requests[0]
        settings = first.settings
        timings: dict[str, Any] = {}
        # 1. The family's plan: conditioning built on the host (small arrays), moved to the device once.
        t0 = time.perf_counter()
        plan = stack_plans([self._prepare(r) for r in requests])
        on_device = device_plan(plan, self._to_device)
        timings["text_encoder"] = time.perf_counter() - t0

        # 2. The schedule (or the part of it this request runs).
        try:
            run = img2img.plan_run(first, **plan.schedule)
        except ValueError as exc:
            raise DiffrtError(str(exc)) from None

        # 3. Initial latents: noise scaled by the scheduler's initial sigma (as diffusers
        # does), or an image's latents noised to the run's first step (img2img), or a
        # base model's latents that a refiner continues as they are. Noise is
        # drawn in the VAE's layout and packed; `latents=` comes in the denoiser's layout
        # already, as diffusers' latents= does (Flux: packed 2x2 patches).
        sigma = np.float32(run.init_noise_sigma)
        if first.from_image:
            t0 = time.perf_counter()
            start, known, noise = img2img.start_latents(first, plan, run, rng, self._encode_image,
                                                        inpainting_unet=first.masked_pixels is not None)
            if first.masked_pixels is not None:  # a 9-channel inpainting UNet: mask and masked picture as input
                channels = img2img.inpainting_channels(first, plan, rng, self._encode_image)
                on_device = dataclasses.replace(on_device, extra_channels=self._to_device(channels))
            timings["vae_encoder"] = time.perf_counter() - t0
            sample = self._to_device(plan.pack(start))
            if first.mask is not None and first.masked_pixels is None:  # 4-channel: the known region put back
                if first.sample_mode == "sample":  # diffusers encodes the masked picture here too (unused with a
                    rng.standard_normal(plan.noise_shape, dtype=np.float32)  # regular denoiser): its draw, skipped
                # in the scheduler's layout (Flux: packed; the mask on every latent channel first)
                blend = (known, noise, np.ascontiguousarray(np.broadcast_to(first.mask, known.shape)))
                on_device = dataclasses.replace(on_device, after_step=img2img.keep_unmasked(
                    run, *(self._to_device(np.ascontiguousarray(plan.pack(a))) for a in blend)))
        elif first.latents is not None:
            sample = self._to_device((first.latents * sigma).astype(np.float32))
        else:
            noise = rng.standard_normal(plan.noise_shape, dtype=np.float32)
            sample = self._to_device(plan.pack((noise * sigma).astype(np.float32)))

        # 4. Denoising loop: one batched denoiser call per step. Progress counts requested
        # steps: extra calls come first (PNDM's warm-up); a refiner continues the base's count.
        steps = settings.num_inference_steps
        windowed = first.denoising_start is not None or first.denoising_end is not None
        extra = 0 if windowed else len(run.timesteps) - steps
        done = steps - len(run.timesteps) if first.denoising_start is not None else 0
        counted = (0, len(run.timesteps), 0) if first.strength is not None else (done, steps, extra)  # img2img: its part
        denoiser = self._contexts[self.family.DENOISER]
        if first.controlnet is not None:  # ControlNets run in a hook; the UNet variant taking residuals denoises
            on_device, denoiser = controlnet.attach(self, first, on_device, len(run.timesteps))
        if first.cache is not None:  # a step cache answers each call with its own UNet graphs
            on_device = step_cache.attach(self, first.cache, on_device)
        sample, timings["denoiser_calls"] = denoise(on_device, run, sample, denoiser, rng, self._to_device, progress,
                                                    counted)
        if first.cache is not None:  # calls the step cache answered without the full denoiser
            timings["cached_steps"] = step_cache.cached_steps(on_device)
        timings["denoiser"] = float(sum(timings["denoiser_calls"]))
        return sample, plan, timings

    def _prepare(self, request: Request) -> DenoisePlan:
        """The family's plan for one request; with LoRA branches, its text encoded with
        its LoRAs' factors (or under them merged, for a text encoder without branches)
        and its denoiser rows fed its LoRAs' factors."""
        if self._branches is None:
            return self.family.prepare(self.facts, request, self._weighted(request, self._encode))
        branches, loras = self._branches, request.loras

        def encode(role: str, texts: list[str], *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
            extra = branches.feeds(role, loras, len(texts)) if role in branches.layouts else None
            return self._encode(role, texts, *args, feeds=extra, **kwargs)

        with self._loras.using(branches.merged_set(loras)):
            plan = self.family.prepare(self.facts, request, self._weighted(request, encode))
        return branches.with_feeds(plan, loras, self.family.DENOISER)

    def _weighted(self, request: Request, encode: Callable[..., dict[str, np.ndarray]]) -> Callable[..., Any]:
        """`encode` as is, or with compel's weighting and chunking when the request asks
        for it (option prompt_weighting; diffrt.runtime.prompt_weighting)."""
        syntax = getattr(request.options, "prompt_weighting", None)
        if syntax is None:
            return encode
        return prompt_weighting.weighted_encoder(encode, self.tokenizers, syntax, self._prompt_chunks(request))

    def _prompt_chunks(self, request: Request) -> int:
        """How many text-encoder contexts (chunks of 75 tokens) a weighted request's
        conditioning spans (1 without weighting). A prompt of more than one is refused
        where the UNet graph takes a fixed text length."""
        syntax = getattr(request.options, "prompt_weighting", None)
        if syntax is None:
            return 1
        texts = prompt_weighting.request_texts(request)
        chunks = max(prompt_weighting.count_chunks(self.tokenizers[role], texts, syntax) for role in self.tokenizers)
        specs = [self._models[self.family.DENOISER].spec]
        if request.controlnet is not None or request.cache is not None:  # their graphs take the text too
            specs += list(self.manifest.stages.values())
        prompt_weighting.check_text_length(specs, chunks)  # a fixed-length graph (older exports): one chunk
        return chunks

    def _decode(self, sample: Any, plan: DenoisePlan, vae: str, timings: dict[str, Any]) -> np.ndarray:
        """5. Latents -> float32 NHWC images in [0, 1] on the host."""
        t0 = time.perf_counter()
        decoder = self._contexts[decoder_key(self.family, vae)]
        decoded = decoder.run({"latent_sample": plan.to_decoder(sample, decoder.spec.facts)})["sample"]
        images = postprocess(_check_finite(self._to_host(decoded), "decoded images"))  # the one device -> host copy
        timings["vae_decoder"] = time.perf_counter() - t0
        return images

    def _check_safety(self, decoded: np.ndarray | None, policy: str | None,
                      timings: dict[str, Any]) -> tuple[np.ndarray | None, list | None]:
        """6. The safety checker on the decoded batch (when it runs): the images after
        the policy (blurred or black where flagged) and one Verdict per image."""
        default, preprocessing = self._safety
        if policy not in (None, "off") and preprocessing is None and safety_checker.SAFETY_CHECKER in self.manifest.stages:
            safety_checker.check_policy(policy, True, self.backend.name)  # a backend that cannot run it says so
            raise DiffrtError(f"safety={policy!r}: this pipeline was loaded with safety='off', so its safety "
                              "checker is not open; load it with safety='flag' (or blur, block)")
        policy = default if policy is None else safety_checker.check_policy(policy, preprocessing is not None)
        if decoded is None or policy == "off":
            return decoded, None
        t0 = time.perf_counter()
        verdicts = safety_checker.run_checker(self._contexts[safety_checker.SAFETY_CHECKER], preprocessing, decoded,
                                              self._to_device, self._to_host)
        timings["safety_checker"] = time.perf_counter() - t0
        if any(v.flagged for v in verdicts):
            logger.warning("the safety checker flagged %d of %d image(s) (policy %s)",
                           sum(v.flagged for v in verdicts), len(verdicts), policy)
        return safety_checker.apply_policy(decoded, verdicts, policy), verdicts

    def _encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """The VAE encoder stage on a preprocessed picture: its latent distribution's
        parameters (mean and logvar on channels), on the host."""
        context = self._image_encoder()
        return self._to_host(context.run({"sample": self._to_device(pixels)})["latent_parameters"])

    def _image_encoder(self) -> Context:
        """The VAE encoder's context. Its model is opened by the first call that starts
        from a picture (text-to-image never loads it), in the decoder's precision,
        verified as `load` verified the rest, and shared with every worker() view."""
        return self.lazy_contexts(self._image_encoder_specs(), "img2img")[0]

    def _image_encoder_specs(self) -> dict[str, StageSpec]:
        key = self.family.VAE_ENCODER
        precision = self._models[self.family.VAE_DECODER].spec.precision
        return {key: self.manifest.select(key, DEFAULT_VARIANT, [precision, "fp32"])}

    def _unopened_weight_bytes(self, request: Request) -> int:
        """The weight files of the stages `request` will open on first use (the VAE
        encoder, ControlNets, step-cache graphs) that no earlier request opened: the
        memory check counts them beside the activations."""
        specs: dict[str, StageSpec] = {}
        if request.pixels is not None or request.masked_pixels is not None:
            specs.update(self._image_encoder_specs())
        if request.controlnet is not None:
            specs.update(controlnet.lazy_specs(self))
        if request.cache is not None:
            specs.update(step_cache.lazy_specs(self, request.cache))
        with _LAZY_LOCK:
            return sum(f.size for key, spec in specs.items() if key not in self._models for f in spec.files)

    def lazy_contexts(self, specs: Mapping[str, StageSpec], why: str) -> list[Context]:
        """This worker's contexts on stages opened by the first request that needs them
        (the VAE encoder, ControlNets, step-cache graphs: a plain generation never loads
        them), keyed as `specs`: each model opened once, its files verified as `load`
        verified the rest, and shared with every worker() view."""
        with _LAZY_LOCK:
            missing = {key: spec for key, spec in specs.items() if key not in self._models}
            if missing:
                mode, stamps_path = self._verify_encoder
                verify_files(self.folder, self.manifest, mode, stages=[s.name for s in missing.values()],
                             stamps_path=stamps_path)
                for key, spec in missing.items():
                    t0 = time.perf_counter()
                    self._models[key] = self.backend.open(self.folder, spec, profile=None)
                    logger.info("loaded %s in %.2fs (%s)", spec.describe(), time.perf_counter() - t0, why)
            for key in specs:
                if key not in self._contexts:
                    self._contexts[key] = self._models[key].context()
            return [self._contexts[key] for key in specs]

    def _materializes_attention(self) -> bool:
        """Whether the UNet graph running here builds full attention score tensors: a
        portable graph on a backend that does not fuse attention itself (ONNX Runtime)."""
        spec = self._models[self.family.DENOISER].spec
        return spec.variant not in (FUSED_VARIANT, FUSED_LORA_VARIANT) and not self.backend.fuses_attention_itself

    def _encode(self, role: str, texts: list[str], max_length: int | None = None,
                feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Tokenize with the role's tokenizer and run that text encoder: its outputs by
        name, on the host (the family combines them there, once per request).
        `max_length`: the token length of a T5 encoder's input (max_sequence_length).
        `texts` may be token ids already, int64 (rows, length) (weighted prompts' chunks)."""
        tokenizer = self.tokenizers[role]
        if isinstance(texts, np.ndarray):
            ids = texts
        else:
            ids = tokenizer(texts) if max_length is None else tokenizer(texts, max_length=max_length)
        inputs = {"input_ids": ids, **(feeds or {})}  # feeds: LoRA branch factors, host arrays as the ids are
        return {name: self._to_host(array) for name, array in self._contexts[role].run(inputs).items()}

    def _to_device(self, array: np.ndarray) -> Any:
        return self.backend.to_device(array)

    def _to_host(self, array: Any) -> np.ndarray:
        return self.backend.to_host(array)

    def close(self) -> None:
        """Release this pipeline's contexts and, unless it is a `worker()` view, the
        compiled models (the weights)."""
        for context in self._contexts.values():
            context.close()
        self._contexts = {}
        if self._owner:
            for model in self._models.values():
                model.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def handoff_request(base_manifest: Manifest, base: Request, refiner_manifest: Manifest,
                    refiner_scheduler_config: Mapping[str, Any], scheduler: str | None = None,
                    output_type: str = "pil") -> Request:
    """The refiner's request of a base/refiner ensemble, validated before the base runs:
    the base's prompts, steps, guidance, size and decoder; its own scheduler unless one
    was named; the options the family hands on (SDXL's prompt_2); starting where the
    base stops (its denoising_end). Its `image` is a placeholder of the base latents'
    shape until the base has run (`generate_with_refiner` puts them in)."""
    family = get_family(base_manifest.family)
    s = base.settings
    placeholder = np.zeros(family.latent_shape(family.facts(base_manifest.model), base.batch, s.height, s.width),
                           np.float32)
    carried = {name: getattr(base.options, name) for name in family.HANDOFF_OPTIONS}
    return make_request(refiner_manifest, refiner_scheduler_config, list(base.prompts),
                        negative_prompt=list(base.negative_prompts) if base.negative_given else None,
                        num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                        num_images_per_prompt=base.num_images_per_prompt, scheduler=scheduler, output_type=output_type,
                        vae=base.vae, denoising_start=base.denoising_end, image=placeholder, **carried)


def generate_with_refiner(base: Pipeline, refiner: Pipeline, base_request: Request, refiner_request: Request,
                          progress: Callable[[int, int], None] | None = None, generator: Any = None) -> PipelineOutput:
    """Two plans over one schedule: the base denoises up to its denoising_end, the
    refiner continues its latents from there (their injected noise from the same
    per-image streams) and decodes."""
    started = time.perf_counter()
    check_memory(refiner.manifest, refiner_request, weights_loaded=True,
                 attention_scores=refiner._materializes_attention())  # before the base spends any time
    rng = generator if generator is not None else PerImageNoise.from_seeds(
        [base_request.seed + j for j in range(base_request.batch)])
    first = base.generate([base_request], progress=progress, generator=rng)[0]
    second = dataclasses.replace(refiner_request, image=first.images)
    refined = refiner.generate([second], progress=progress, generator=rng)[0]
    timings = {k: v for k, v in first.timings.items() if k != "total"}
    timings["refiner"] = refined.timings
    timings["vae_decoder"] = refined.timings.get("vae_decoder", 0.0)
    timings["total"] = time.perf_counter() - started
    return PipelineOutput(images=refined.images, timings=timings,
                          seed=None if generator is not None else base_request.seed, settings=base_request.settings)


def _check_finite(array: np.ndarray, what: str) -> np.ndarray:
    """A NaN or inf would otherwise become a black image (or poisoned latents), silently."""
    if not np.isfinite(array).all():
        raise DiffrtError(f"the generation's {what} hold non-finite values (NaN or inf): the model overflowed; "
                          "use a lower guidance_scale, another scheduler, or fp32 graphs (graph_precision='fp32')")
    return array


def _safety_fields(verdicts: list | None, span: slice, output_type: str) -> dict[str, Any]:
    """A request's part of the batch's safety verdicts, as PipelineOutput fields."""
    if verdicts is None or output_type == "latent":
        return {}
    mine = verdicts[span]
    return {"nsfw_content_detected": [v.flagged for v in mine], "safety": mine}


def _profiles(manifest: Manifest, family, prepare: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    unknown = set(prepare) - {"height", "width", "num_images", "guidance_scale"}
    if unknown:
        raise DiffrtError(f"prepare: unknown key(s) {', '.join(sorted(unknown))}; use height, width, num_images, "
                          "guidance_scale")
    height, width = check_size(manifest, prepare.get("height"), prepare.get("width"))
    guidance = check_guidance(prepare.get("guidance_scale", manifest.defaults["guidance_scale"]))
    batch = check_count("prepare num_images", prepare.get("num_images", 1))
    return family.stage_profiles(manifest.model, height, width, batch, family.uses_cfg(manifest.model, guidance))


def _open_contexts(models: Mapping[str, CompiledModel],
                   shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, Context]:
    """A context on each model, made ready for its stage's prepared shapes."""
    contexts: dict[str, Context] = {}
    try:
        for key, model in models.items():
            contexts[key] = model.context()
            if key in shapes:
                contexts[key].prepare(shapes[key])
    except BaseException:
        for context in contexts.values():
            context.close()
        raise
    return contexts
