"""OpenAI's `POST /v1/images/edits`: a multipart form (image, mask, prompt, n, size,
response_format, ...) as an inpainting (or img2img) call of the pipeline, so that the
`openai` client's `client.images.edit(...)` works unchanged.

The form is parsed with the standard library's email parser (no multipart dependency).
OpenAI's mask convention is transparency: where the mask's alpha is 0 the image is
edited; a mask without an alpha channel is read as diffrt's (white = repaint). Without
a mask, an image with transparent pixels is edited there (OpenAI's rule); an opaque
image without a mask is redone as a whole (img2img at `strength`). The output has the
image's size (rounded down to the model's size multiple) unless `size` is given.
diffrt's extra form fields: `strength`, `seed`, `negative_prompt`, `num_inference_steps`,
`guidance_scale`.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from diffrt.serve.schemas import (
    ApiError,
    GenerateRequest,
    ServeConfig,
    make_call,
    open_image,
)

# text fields and how to read them (OpenAI's, then diffrt's extras); others are ignored
_TEXT_FIELDS = {"prompt": str, "model": str, "n": int, "size": str, "response_format": str, "output_format": str,
                "strength": float, "seed": int, "negative_prompt": str, "num_inference_steps": int,
                "guidance_scale": float}
_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}


@dataclass(frozen=True)
class EditForm:
    fields: dict[str, Any]
    files: dict[str, bytes]


def parse_form(body: bytes, content_type: str) -> EditForm:
    """The multipart/form-data body's text fields (typed, by `_TEXT_FIELDS`) and files."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "send the edit as multipart/form-data (image, mask and prompt fields), as the OpenAI "
                            "client does", "body")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "the multipart/form-data body could not be parsed (no parts or no boundary)", "body")
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name in _FILE_FIELDS:
            key = _FILE_FIELDS[name]
            if key in files:
                raise ApiError(400, f"{key}: send one {key} (this server edits one picture per request)", key)
            files[key] = data
        elif name in _TEXT_FIELDS:
            fields[name] = _typed(name, data)
    return EditForm(fields, files)


def _typed(name: str, data: bytes) -> Any:
    kind = _TEXT_FIELDS[name]
    try:
        text = data.decode("utf-8")
        return text if kind is str else kind(text)
    except (UnicodeDecodeError, ValueError):
        what = {int: "an integer", float: "a number"}.get(kind, "UTF-8 text")
        raise ApiError(400, f"{name} must be {what}, got {data[:40]!r}", name) from None


def edit_call(form: EditForm, config: ServeConfig, size_multiple: int) -> tuple[GenerateRequest, dict[str, Any]]:
    """The edit as a /v1/generate body (for the server's limits and encoding) and the
    pipeline call, its image and mask included."""
    f = form.fields
    if f.get("model") is not None and f["model"] != config.model_name:
        raise ApiError(404, f"model {f['model']!r} is not served here; this server serves {config.model_name!r}",
                       "model", "model_not_found")
    if "prompt" not in f:
        raise ApiError(400, "prompt is required", "prompt")
    if "image" not in form.files:
        raise ApiError(400, "image is required: the picture to edit, a PNG or JPEG file", "image")
    if f.get("response_format") not in (None, "b64_json"):
        message = ("response_format 'url' is not supported: this server does not host image files; "
                   "use response_format='b64_json'") if f["response_format"] == "url" else \
            f"response_format must be b64_json, got {f['response_format']!r}"
        raise ApiError(400, message, "response_format")
    output_format = f.get("output_format") or "png"
    if output_format not in ("png", "jpeg", "webp"):
        raise ApiError(400, f"output_format must be png, jpeg or webp, got {output_format!r}", "output_format")
    image = open_image(form.files["image"], config.max_side, "image")
    mask = open_image(form.files["mask"], config.max_side, "mask") if "mask" in form.files else None
    image, mask = _picture_and_mask(image, mask)
    size = None if f.get("size") in (None, "auto") else f["size"]
    body = GenerateRequest(prompt=f["prompt"], n=1 if f.get("n") is None else f["n"], size=size, output_format=output_format,
                           strength=f.get("strength"), seed=f.get("seed"), negative_prompt=f.get("negative_prompt"),
                           num_inference_steps=f.get("num_inference_steps"), guidance_scale=f.get("guidance_scale"))
    call = make_call(body, config, size_multiple)
    if size is None:  # the picture's own size (inpainting would otherwise default to the checkpoint's)
        call["height"], call["width"] = (side - side % size_multiple for side in (image.height, image.width))
        if not call["height"] or not call["width"]:
            raise ApiError(400, f"image is {image.width}x{image.height}; edits need at least {size_multiple} "
                                "pixels each way", "image")
    call["image"] = image
    if mask is not None:
        call["mask_image"] = mask
    return body, call


def _picture_and_mask(image: Image.Image, mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]:
    """RGB picture and a white-means-repaint grayscale mask, from OpenAI's conventions."""
    if mask is None and _has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L") if (alpha == 0).any() else None
    elif mask is not None and _has_alpha(mask):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    if image.mode != "RGB":  # OpenAI takes RGBA, LA and L pictures
        image = image.convert("RGB")
    return image, mask


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


__all__ = ["EditForm", "edit_call", "parse_form"]
