"""Inpainting's `padding_mask_crop`, as diffusers' inpainting pipelines do it with
VaeImageProcessor: work on the part of the picture around the mask, at the request's
size, then paste the result back into the whole picture. Torch-free (PIL).

1. `crop_region`: the mask's bounding box (pixels that are not 0), padded by N pixels
   each way and widened or heightened (within the picture) to the request's aspect
   ratio (get_crop_region).
2. The picture and the mask are cropped to it and resized to the request's size with
   `resize_mode="fill"` (`resize_and_fill`: scaled to fit, centred, the empty bands
   filled by stretching the edge rows or columns); the generation then runs on those
   as on any picture and mask.
3. `paste_back`: each generated image is scaled to cover the crop region and centre-
   cropped to it (`resize_mode="crop"`), pasted there into a blank picture of the
   original size, and the original picture is laid over it where the mask is not
   white, with the mask's grey levels as transparency (apply_overlay): the output has
   the original picture's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from diffrt.errors import DiffrtError

# VaeImageProcessor's resample ("lanczos") for its own resizes
LANCZOS = Image.Resampling.LANCZOS


@dataclass(frozen=True, eq=False)
class CropOverlay:
    """What `paste_back` needs after the generation: the crop box (x1, y1, x2, y2) in the
    original picture, the original picture and its mask (PIL)."""

    box: tuple[int, int, int, int]
    picture: Image.Image
    mask: Image.Image


def check_padding(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DiffrtError(f"padding_mask_crop must be an integer >= 0 (pixels around the mask), got {value!r}")
    return int(value)


def crop_inputs(picture: Any, mask: Any, height: int, width: int, padding: int,
                load: Any) -> tuple[Image.Image, Image.Image, CropOverlay]:
    """The picture and mask as the generation sees them (cropped around the mask and
    resized to height x width, "fill"), and what paste_back needs. `load(x, what)`
    reads a picture or path (img2img.load_image); the mask: a PIL image, path or uint8
    (H, W) array, of the picture's size."""
    original = load(picture, "image")
    if not isinstance(original, Image.Image):
        raise DiffrtError("padding_mask_crop takes a picture as a PIL image, a file or a uint8 array (as diffusers, "
                          "whose crop-and-fill resize is PIL's), not a float array")
    mask = _mask_image(mask)
    if mask.size != original.size:
        raise DiffrtError(f"mask_image is {mask.width}x{mask.height} but image is {original.width}x{original.height}; "
                          "give a mask of the picture's size")
    box = crop_region(mask, width, height, padding)
    cropped = resize_and_fill(original.crop(box), width, height)
    cropped_mask = resize_and_fill(mask.crop(box), width, height).convert("L")
    return cropped, cropped_mask, CropOverlay(box, original, mask)


def _mask_image(mask: Any) -> Image.Image:
    from diffrt.runtime.img2img import load_mask

    return load_mask(mask)


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """VaeImageProcessor.get_crop_region: the box around the mask's non-zero pixels,
    padded, then grown to width/height's aspect ratio (kept inside the picture)."""
    array = np.array(mask.convert("L"))
    h, w = array.shape
    rows, cols = np.flatnonzero(array.any(axis=1)), np.flatnonzero(array.any(axis=0))
    if rows.size == 0:  # an all-black mask: diffusers' loops count every row and column as empty
        top, bottom, left, right = h, h, w, w
    else:
        top, bottom, left, right = rows[0], h - 1 - rows[-1], cols[0], w - 1 - cols[-1]
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(w - right + pad, w)), int(min(h - bottom + pad, h))
    if x2 <= x1 or y2 <= y1:
        raise DiffrtError("padding_mask_crop: the mask is all black (nothing to repaint); white marks the region")
    ratio_crop, ratio_out = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio_out:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio_out - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio_out - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(start: int, end: int, diff: int, limit: int) -> tuple[int, int]:
    """get_crop_region's widening of one axis by `diff`, shifted back inside [0, limit]."""
    start -= diff // 2
    end += diff - diff // 2
    if end >= limit:
        start -= end - limit
        end = limit
    if start < 0:
        end -= start
        start = 0
    return start, min(end, limit)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """VaeImageProcessor._resize_and_fill: scaled to fit inside width x height keeping
    its aspect ratio, centred on an RGB canvas, the empty bands filled by stretching
    the image's first and last rows (or columns)."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """VaeImageProcessor._resize_and_crop: scaled to cover width x height keeping its
    aspect ratio, centred, the excess cut off."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def paste_back(overlay: CropOverlay, image: Image.Image) -> Image.Image:
    """VaeImageProcessor.apply_overlay: the generated image in the crop box of a picture
    of the original size, under the original picture wherever the mask is not white."""
    width, height = overlay.picture.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(overlay.picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay.mask.convert("L")))
    kept = kept.convert("RGBA")
    x, y, x2, y2 = overlay.box
    base = Image.new("RGBA", (width, height))
    base.paste(resize_and_crop(image, x2 - x, y2 - y), (x, y))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept)
    return out.convert("RGB")


def paste_back_all(overlay: CropOverlay, images: Any, output_type: str) -> Any:
    """`paste_back` on a request's images: PIL images, or (output_type "np") float32
    NHWC arrays, made 8-bit to paste as diffusers does, returned as float32 in [0, 1]."""
    if output_type == "pil":
        return [paste_back(overlay, image) for image in images]
    pils = [Image.fromarray((np.asarray(image) * 255).round().astype(np.uint8)) for image in images]
    return np.stack([np.asarray(paste_back(overlay, p), dtype=np.float32) / np.float32(255) for p in pils])


__all__ = ["CropOverlay", "check_padding", "crop_inputs", "crop_region", "paste_back", "paste_back_all",
           "resize_and_crop", "resize_and_fill"]
