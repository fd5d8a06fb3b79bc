"""Request bodies, server limits, and their validation into pipeline calls.

Every bad input becomes an `ApiError`: an HTTP status (4xx) and a one-line message
naming the field, sent as OpenAI-style JSON
`{"error": {"message": ..., "type": "invalid_request_error", "param": FIELD, "code": ...}}`.
The server's own limits (size range, steps, images per request) are checked here; the
rest (scheduler, preset, guidance, seed, the size factor) by the pipeline's
`Pipeline.request`, whose DiffrtError is mapped back to the field it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffrt.errors import DiffrtError

OUTPUT_FORMATS = ("png", "jpeg", "webp", "npy")
MAX_SEED = 2**63 - 1


@dataclass
class ServeConfig:
    """The server's settings and limits (the `diffrt serve` options)."""

    model_name: str = "diffrt"
    workers: int = 1              # worker threads, each running batches on its own contexts
    max_batch: int = 4            # images per pipeline batch
    batch_wait_ms: float = 10.0   # how long the oldest request of a group waits for company
    max_queue: int = 64           # requests waiting (not running); beyond: 429
    timeout_s: float = 300.0      # per request, queued + running; beyond: 504 (and its work stops)
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()  # more keys; each key's jobs are private to it
    max_n: int = 4                # images per request
    max_steps: int = 100
    max_side: int = 2048          # pixels, height and width
    # steps x height x width x images / 1e6 per request (30 steps of four 1024x1024
    # images is 126); beyond: 400 before queueing
    max_cost: float = 256.0
    max_prompt_chars: int = 4000  # per prompt and negative prompt (OpenAI's dall-e-3 limit)
    max_body_bytes: int = 1 << 20
    warmup: bool = True           # one small generation before /readyz says ready
    max_jobs: int = 256           # playground jobs remembered per key (running + finished)
    max_job_bytes: int = 128 << 20  # kept job results per key (base64 bytes)
    job_ttl_s: float = 600.0      # a finished job is forgotten this long after it finished
    keep_alive_s: float = 5.0     # an idle keep-alive connection is closed after this
    header_timeout_s: float = 20.0  # a connection must send a complete request head in this
    body_timeout_s: float = 30.0  # and each part of its body within this of the previous

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted API key, in order (a job belongs to the index of its key)."""
        given = ((self.api_key,) if self.api_key else ()) + tuple(self.api_keys)
        return tuple(dict.fromkeys(given))


def check_api_key(key: str, source: str) -> str:
    """A key must be a Bearer token (RFC 6750: printable ASCII, no spaces): anything else
    could never be sent in an Authorization header, so it would never match."""
    if not key or not all(33 <= ord(c) <= 126 for c in key):
        bad = next((c for c in key if not 33 <= ord(c) <= 126), None)
        what = "is empty" if not key else f"has the character {bad!r}"
        raise DiffrtError(f"the API key from {source} {what}; a key must be printable ASCII without spaces "
                          "(an HTTP Authorization header cannot carry anything else)")
    return key


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ImagesRequest(BaseModel):
    """OpenAI Images API `POST /v1/images/generations`. Fields OpenAI has and this
    server ignores (quality, style, user, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: str | None = None
    loras: dict[str, float] | None = None
    """diffrt's extra field: {name: strength} of LoRAs the server loaded (GET /v1/loras)."""


class ControlNetInput(BaseModel):
    """One ControlNet of the artifact (in export order) in `POST /v1/generate`'s `controlnets`."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="its control image, base64 PNG/JPEG; null: not used")
    scale: float | None = Field(default=None, description="controlnet_conditioning_scale (default 1)")
    start: float | None = Field(default=None, description="control_guidance_start, fraction of the steps (default 0)")
    end: float | None = Field(default=None, description="control_guidance_end, fraction of the steps (default 1)")


class GenerateRequest(BaseModel):
    """`POST /v1/generate` (and `POST /v1/jobs`): every pipeline parameter."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    preset: str | None = None
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, e.g. 512x512")
    height: int | None = None
    width: int | None = None
    n: int = 1
    output_format: Literal["png", "jpeg", "webp", "npy"] = "png"
    vae: str | None = None
    loras: dict[str, float] | None = Field(default=None, description="{name: strength} of loaded LoRAs")
    image: str | None = Field(default=None, description="img2img: the start picture, a base64 RGB PNG or JPEG")
    strength: float | None = Field(default=None, description="with image: how much of the schedule to redo, (0, 1]")
    mask: str | None = Field(default=None, description="with image: inpaint where this mask (base64 "
                                                       "PNG/JPEG, the image's size) is white")
    padding_mask_crop: int | None = Field(default=None, description="with mask: inpaint only the mask's bounding "
                                          "box padded by this many pixels, pasted back into the whole picture")
    prompt_weighting: bool | Literal["compel", "a1111"] | None = Field(
        default=None, description="SD/SDXL: weighted and long prompts as compel reads them: true or \"compel\" "
                                  "((words)1.3, word+), \"a1111\" ((words:1.3), [words]); default off")
    cache: str | None = Field(default=None, description="step cache: \"deepcache:3\" (the full UNet every 3rd step) "
                                                         "or \"fbcache:0.12\" (Flux, SD3); an artifact exported with "
                                                         "--step-cache; default off")
    controlnets: list[ControlNetInput] | None = Field(
        default=None, description="one entry per ControlNet of the artifact (exported with --controlnet), in order")
    guess_mode: bool = Field(default=False, description="with controlnets: diffusers' guess_mode")
    options: dict[str, str | int | float | None] | None = Field(
        default=None, description="the model family's own options, e.g. SDXL {\"prompt_2\": ...}, "
                                  "{\"clip_skip\": 1}, SD3 {\"prompt_3\": ...}, Flux {\"max_sequence_length\": 256}")


# DiffrtError messages from the runtime start with the argument they are about.
_FIELD_OF_MESSAGE = (
    ("num_inference_steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
    ("height", "height"), ("width", "width"), ("scheduler", "scheduler"), ("unknown preset", "preset"),
    ("seed", "seed"), ("vae", "vae"), ("negative_prompt", "negative_prompt"),
    ("prompt_weighting", "prompt_weighting"), ("prompt", "prompt"),
    ("num_images_per_prompt", "n"), ("unknown LoRA", "loras"), ("LoRA", "loras"), ("image", "image"),
    ("strength", "strength"), ("mask_image", "mask"), ("padding_mask_crop", "padding_mask_crop"), ("cache=", "cache"),
    ("control", "controlnets"), ("guess_mode", "guess_mode"),
)
IMAGE_FORMATS = ("PNG", "JPEG")


def field_of(message: str) -> str | None:
    for prefix, name in _FIELD_OF_MESSAGE:
        if message.startswith(prefix):
            return name
    return None


def parse_size(value: str, param: str = "size") -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (height, width)."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", value)
    if not match:
        raise ApiError(400, f"{param} must be WIDTHxHEIGHT, e.g. 512x512, got {value!r}", param)
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


def _check_range(name: str, value: int | None, low: int, high: int, param: str | None = None) -> None:
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"{name} must be from {low} to {high}, got {value}", param or name)


def check_text(name: str, value: str | None, limit: int) -> None:
    """Refuse text the pipeline cannot (or should not) tokenize, before it is queued:
    over the length limit, or not encodable (a lone UTF-16 surrogate such as the JSON
    escape \\ud800 makes the tokenizer raise, which would fail its whole batch)."""
    if value is None:
        return
    if len(value) > limit:
        raise ApiError(400, f"{name} is {len(value)} characters; this server takes at most {limit} "
                            "(the text encoder reads only its first tokens anyway)", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{name} is not valid text: a lone UTF-16 surrogate {value[exc.start]!r} at "
                            f"character {exc.start}; send Unicode text", name) from None


def make_call(body: GenerateRequest, config: ServeConfig, size_multiple: int) -> dict[str, Any]:
    """Check the server's limits and build the pipeline call (a `__call__` keyword dict;
    the server always asks for float arrays, output_type="np", and encodes them itself)."""
    check_text("prompt", body.prompt, config.max_prompt_chars)
    check_text("negative_prompt", body.negative_prompt, config.max_prompt_chars)
    if not body.prompt.strip():
        raise ApiError(400, "prompt must not be empty", "prompt")
    height, width = body.height, body.width
    if body.size is not None:
        if height is not None or width is not None:
            raise ApiError(400, "give size or height/width, not both", "size")
        height, width = parse_size(body.size)
    for name, value in (("height", height), ("width", width)):
        param = "size" if body.size is not None else name
        _check_range(name, value, size_multiple, config.max_side, param)
        if value is not None and value % size_multiple:
            raise ApiError(400, f"{name} must be a multiple of {size_multiple}, got {value}", param)
    _check_range("n", body.n, 1, config.max_n)
    _check_range("num_inference_steps", body.num_inference_steps, 1, config.max_steps)
    if body.seed is not None:
        _check_range("seed", body.seed, 0, MAX_SEED - body.n + 1)
    call = {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
            "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale,
            "height": height, "width": width, "num_images_per_prompt": body.n, "seed": body.seed,
            "scheduler": body.scheduler, "preset": body.preset, "vae": body.vae, "loras": body.loras,
            "strength": body.strength, "cache": body.cache, "output_type": "np"}
    if body.image is not None:
        call["image"] = decode_image(body.image, config.max_side)
    if body.mask is not None:
        call["mask_image"] = decode_image(body.mask, config.max_side, "mask")
    if body.padding_mask_crop is not None:
        call["padding_mask_crop"] = body.padding_mask_crop
    if body.controlnets is not None or body.guess_mode:
        call.update(controlnet_call(body.controlnets, body.guess_mode, config.max_side))
    if body.prompt_weighting:  # off: not passed at all (families without it would refuse the name)
        call["prompt_weighting"] = body.prompt_weighting
    call = {k: v for k, v in call.items() if v is not None}
    return {**call, **family_options(body.options, config.max_prompt_chars)}


def controlnet_call(controlnets: list[ControlNetInput] | None, guess_mode: bool, max_side: int) -> dict[str, Any]:
    """`controlnets` as the pipeline's ControlNet keywords (it checks the count against
    the artifact's ControlNets); each image decoded here, a bad one a 400 naming it."""
    if not controlnets:
        raise ApiError(400, "guess_mode is for a request with controlnets" if controlnets is None else
                       "controlnets must hold one entry per ControlNet of the artifact", "controlnets")
    images = [None if c.image is None else decode_image(c.image, max_side, f"controlnets[{k}].image")
              for k, c in enumerate(controlnets)]
    return {"control_image": images, "guess_mode": guess_mode,
            "controlnet_conditioning_scale": [1.0 if c.scale is None else c.scale for c in controlnets],
            "control_guidance_start": [0.0 if c.start is None else c.start for c in controlnets],
            "control_guidance_end": [1.0 if c.end is None else c.end for c in controlnets]}


def family_options(options: dict[str, Any] | None, max_chars: int) -> dict[str, Any]:
    """The request's `options` as pipeline keywords: the family validates names and values
    when the request is built (an unknown one is a 400 naming those it accepts); text
    options get the prompt's checks here. The core parameters have their own fields."""
    out = {}
    for name, value in (options or {}).items():
        if name in _CORE_FIELDS:
            raise ApiError(400, f"options.{name}: {name} is a request field of its own, not a family option",
                           "options")
        if isinstance(value, str):
            check_text(f"options.{name}", value, max_chars)
        if value is not None:
            out[name] = value
    return out


_CORE_FIELDS = frozenset({"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
                          "num_images_per_prompt", "seed", "scheduler", "preset", "vae", "loras", "strength",
                          "output_type", "image", "mask_image", "latents", "generator", "noise", "image_noise",
                          "prompt_weighting", "cache", "control_image", "controlnet_conditioning_scale",
                          "control_guidance_start", "control_guidance_end", "guess_mode", "padding_mask_crop"})


def decode_image(value: str, max_side: int, param: str = "image") -> Any:
    """A base64 PNG or JPEG (a data: URL prefix allowed) as a fully read PIL image; its
    size is checked from the header before any pixel is decoded. The pipeline checks
    the mode (RGB) and the rest."""
    import base64
    import binascii

    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} must be a base64-encoded PNG or JPEG", param) from None
    return open_image(raw, max_side, param, "a base64-encoded ")


def open_image(raw: bytes, max_side: int, param: str = "image", form: str = "") -> Any:
    """A PNG or JPEG file's bytes as a fully read PIL image (see decode_image)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw))
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ApiError(400, f"{param} must be {form or 'a '}PNG or JPEG", param) from None
    if image.format not in IMAGE_FORMATS:
        raise ApiError(400, f"{param} is a {image.format} file; send a PNG or JPEG", param)
    if not 0 < image.width <= max_side or not 0 < image.height <= max_side:
        raise ApiError(400, f"{param} is {image.width}x{image.height}; this server takes at most {max_side} "
                            "pixels each way", param)
    try:
        image.load()
    except (OSError, ValueError) as exc:  # truncated or corrupt data
        raise ApiError(400, f"{param} is not a complete {image.format} image ({exc})", param) from None
    return image


def images_to_generate(body: ImagesRequest, config: ServeConfig) -> GenerateRequest:
    """An OpenAI Images request as a /v1/generate one (the artifact's default settings)."""
    if body.model is not None and body.model != config.model_name:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {config.model_name!r}",
                       "model", "model_not_found")
    if body.response_format not in (None, "b64_json"):
        message = ("response_format 'url' is not supported: this server does not host image files; "
                   "use response_format='b64_json'") if body.response_format == "url" else \
            f"response_format must be b64_json, got {body.response_format!r}"
        raise ApiError(400, message, "response_format")
    output_format = body.output_format or "png"
    if output_format not in ("png", "jpeg", "webp"):
        raise ApiError(400, f"output_format must be png, jpeg or webp, got {output_format!r}", "output_format")
    size = None if body.size in (None, "auto") else body.size
    return GenerateRequest(prompt=body.prompt, n=1 if body.n is None else body.n, size=size,
                           output_format=output_format, loras=body.loras)


def check_cost(steps: int, height: int, width: int, images: int, config: ServeConfig) -> None:
    """The per-request work limit, on the resolved settings (defaults and presets
    included), so that no single request can hold the worker for minutes."""
    cost = steps * height * width * images / 1e6
    if cost > config.max_cost:
        raise ApiError(400, f"this request is {steps} steps x {width}x{height} x {images} image(s) = {cost:g} "
                            f"megapixel-steps, over the server's limit of {config.max_cost:g}; use fewer steps, a "
                            "smaller size or fewer images", None, "request_too_large")


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's errors (a RequestValidationError) -> one 400 naming the first field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or "body"
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", "body")
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return ApiError(400, "the request body must be a JSON object", "body")
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param)
    if kind == "missing":
        return ApiError(400, f"{param} is required", param)
    return ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param)


def runtime_error(exc: DiffrtError) -> ApiError:
    message = str(exc).splitlines()[0] if str(exc) else "invalid request"
    return ApiError(400, message, field_of(message))
