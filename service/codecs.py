"""Wire <-> ndarray: request bodies to N x C x H x W float32 batches, with checks that say what was expected."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import orjson
from PIL import Image, UnidentifiedImageError

from service.defense.bundle import InputSpec
from service.errors import BadInput, PayloadTooLarge

IMAGE_FORMATS = {"PNG", "JPEG"}


def _describe(spec: InputSpec) -> str:
    c, h, w = spec.shape
    forms = [f"C x H x W = {c}x{h}x{w}", f"N x {c}x{h}x{w}"]
    if c == 1:
        forms = [f"H x W = {h}x{w}", f"N x {h}x{w}"] + forms
    return " or ".join(forms)


def to_batch(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Reshape one image or a batch to N x C x H x W, or raise BadInput naming the accepted shapes."""
    c, h, w = spec.shape
    shape = array.shape
    if array.ndim == 2 and c == 1 and shape == (h, w):
        return array.reshape(1, 1, h, w)
    if array.ndim == 3 and shape == (c, h, w):
        return array[None]
    if array.ndim == 3 and c == 1 and shape[1:] == (h, w):
        return array[:, None]
    if array.ndim == 4 and shape[1:] == (c, h, w):
        return array
    raise BadInput(f"inputs have shape {list(shape)}; expected {_describe(spec)}")


def check_values(batch: np.ndarray, spec: InputSpec) -> None:
    if not np.all(np.isfinite(batch)):
        raise BadInput("inputs contain NaN or Inf; expected finite floats")
    lo, hi = spec.range
    if batch.size and (batch.min() < lo or batch.max() > hi):
        raise BadInput(f"inputs range over [{batch.min():.4g}, {batch.max():.4g}]; expected values in "
                       f"[{lo:g}, {hi:g}] (scale 8-bit pixels by 1/255)")


def decode_array(value: object, spec: InputSpec) -> np.ndarray:
    """Nested JSON lists of numbers -> N x C x H x W float32."""
    try:
        raw = np.asarray(value)
    except ValueError:
        raise BadInput("inputs must be a rectangular nested array of numbers (rows of unequal length found)")
    if raw.dtype.kind not in "iuf":
        raise BadInput(f"inputs must be numbers; got {'a ragged or mixed array' if raw.dtype == object else raw.dtype.name}")
    with np.errstate(over="ignore"):  # overflow becomes Inf, which check_values reports
        batch = to_batch(raw.astype(np.float32, copy=False), spec)
    check_values(batch, spec)
    return batch


def decode_image(text: object, index: int, spec: InputSpec) -> np.ndarray:
    """One base64 PNG or JPEG -> C x H x W float32 in [0, 1]."""
    c, h, w = spec.shape
    if not isinstance(text, str):
        raise BadInput(f"images[{index}] must be a base64 string")
    try:
        blob = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(blob))
        if image.format not in IMAGE_FORMATS:
            raise BadInput(f"images[{index}] is {image.format}; expected PNG or JPEG")
        image = image.convert("L" if c == 1 else "RGB")
    except (binascii.Error, ValueError):
        raise BadInput(f"images[{index}] is not valid base64")
    except (UnidentifiedImageError, OSError):
        raise BadInput(f"images[{index}] could not be decoded as a PNG or JPEG image")
    if image.size != (w, h):
        raise BadInput(f"images[{index}] is {image.size[0]}x{image.size[1]} pixels; expected {w}x{h}")
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def decode_classify_request(body: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    """``{"inputs": ...}`` or ``{"images": [...]}`` -> N x C x H x W float32 in the spec's range."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadInput(f"body is not valid JSON: {e}")
    if not isinstance(payload, dict) or len({"inputs", "images"} & payload.keys()) != 1:
        raise BadInput('body must be a JSON object with exactly one of "inputs" (nested float arrays in '
                       '[0, 1]) or "images" (a list of base64 PNG/JPEG strings)')
    if "inputs" in payload:
        batch = decode_array(payload["inputs"], spec)
    else:
        images = payload["images"]
        if not isinstance(images, list) or not images:
            raise BadInput('"images" must be a non-empty list of base64 strings')
        if len(images) > max_batch:
            raise PayloadTooLarge(f"{len(images)} images in one request; at most {max_batch} are accepted")
        batch = np.stack([decode_image(t, i, spec) for i, t in enumerate(images)])
    if len(batch) == 0:
        raise BadInput("inputs hold no image")
    if len(batch) > max_batch:
        raise PayloadTooLarge(f"{len(batch)} inputs in one request; at most {max_batch} are accepted")
    return np.ascontiguousarray(batch, dtype=np.float32)
