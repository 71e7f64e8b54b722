"""Wire <-> ndarray: request bodies (``/classify``'s and OIP v2 inference requests) to N x C x H x W
float32 batches, with checks that say what was expected."""

from __future__ import annotations

import base64
import binascii
import io
import math

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


def as_numbers(value: object, what: str = "inputs") -> np.ndarray:
    """Nested JSON lists of numbers -> a float32 array; ``what`` names the value in error messages."""
    try:
        raw = np.asarray(value)
    except ValueError:
        raise BadInput(f"{what} must be a rectangular nested array of numbers (rows of unequal length found)")
    if raw.dtype.kind not in "iuf":
        raise BadInput(f"{what} must be numbers; got {'a ragged or mixed array' if raw.dtype == object else raw.dtype.name}")
    with np.errstate(over="ignore"):  # overflow becomes Inf, which check_values reports
        return raw.astype(np.float32, copy=False)


def decode_array(value: object, spec: InputSpec) -> np.ndarray:
    """Nested JSON lists of numbers -> N x C x H x W float32."""
    batch = to_batch(as_numbers(value), spec)
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


def _load_json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadInput(f"body is not valid JSON: {e}")


def _sized(batch: np.ndarray, max_batch: int) -> np.ndarray:
    """The batch as contiguous float32, refused when empty (400) or larger than ``max_batch`` (413)."""
    if len(batch) == 0:
        raise BadInput("inputs hold no image")
    if len(batch) > max_batch:
        raise PayloadTooLarge(f"{len(batch)} inputs in one request; at most {max_batch} are accepted")
    return np.ascontiguousarray(batch, dtype=np.float32)


def decode_classify_request(body: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    """``{"inputs": ...}`` or ``{"images": [...]}`` -> N x C x H x W float32 in the spec's range."""
    payload = _load_json(body)
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
    return _sized(batch, max_batch)


V2_TENSOR_KEYS = ("name", "shape", "datatype", "data")


def v2_input_shapes(spec: InputSpec) -> str:
    c, h, w = spec.shape
    return f"[N, {c}, {h}, {w}]" + (f" or [N, {h}, {w}]" if c == 1 else "")


def decode_v2_tensor(tensor: object, spec: InputSpec) -> np.ndarray:
    """One OIP v2 input tensor (any name; FP32; shape [N, C, H, W], or [N, H, W] for one channel;
    ``data`` flat or nested, row-major) -> N x C x H x W float32 in the spec's range."""
    if not isinstance(tensor, dict) or not all(k in tensor for k in V2_TENSOR_KEYS):
        raise BadInput('the input tensor must be an object with "name", "shape", "datatype" and "data"')
    name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
    if not isinstance(name, str):
        raise BadInput('the input tensor\'s "name" must be a string')
    if datatype != "FP32":
        raise BadInput(f"input tensor {name!r} has datatype {datatype!r}; expected FP32")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInput(f'input tensor {name!r}: "shape" must be a list of non-negative integers')
    c, h, w = spec.shape
    if not (len(shape) == 4 and shape[1:] == [c, h, w] or c == 1 and len(shape) == 3 and shape[1:] == [h, w]):
        raise BadInput(f"input tensor {name!r} has shape {shape}; expected {v2_input_shapes(spec)}")
    values = as_numbers(tensor["data"], f"input tensor {name!r} data")
    if values.size != math.prod(shape):
        raise BadInput(f"input tensor {name!r} holds {values.size} values; shape {shape} needs {math.prod(shape)}")
    batch = to_batch(values.reshape(shape), spec)
    check_values(batch, spec)
    return batch


def decode_v2_infer_request(body: bytes, spec: InputSpec, max_batch: int) -> tuple[np.ndarray, str | None]:
    """An OIP v2 inference request with one input tensor -> (N x C x H x W float32, the request's id)."""
    payload = _load_json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or len(payload["inputs"]) != 1:
        raise BadInput('body must be an OIP v2 inference request with exactly one input tensor: '
                       '{"inputs": [{"name": ..., "shape": [N, C, H, W], "datatype": "FP32", "data": [...]}]}')
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput('"id" must be a string')
    return _sized(decode_v2_tensor(payload["inputs"][0], spec), max_batch), request_id
