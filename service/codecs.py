"""Wire <-> ndarray: request bodies (``/classify``'s and OIP v2 inference requests) to N x C x H x W
float32 batches, with checks that say what was expected."""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass

import numpy as np
import orjson
from PIL import Image, ImageOps

from service.defense.bundle import InputSpec
from service.errors import BadInput, PayloadTooLarge, shown

IMAGE_FORMATS = {"PNG", "JPEG"}
MAX_REQUEST_ID = 256


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
    hint = ""
    if c > 1 and array.ndim in (3, 4) and shape[-3:] == (h, w, c):
        hint = (f" (channels last? send channels first: numpy's x.transpose({'0, 3, 1, 2' if array.ndim == 4 else '2, 0, 1'}))")
    raise BadInput(f"inputs have shape {list(shape)}; expected {_describe(spec)}{hint}")


def check_values(batch: np.ndarray, spec: InputSpec) -> None:
    lo, hi = spec.range
    if not batch.size:
        return
    low, high = batch.min(), batch.max()
    if lo <= low and high <= hi:  # NaN fails both comparisons, an infinity one: only then look closer
        return
    if not np.all(np.isfinite(batch)):
        raise BadInput("inputs contain NaN or Inf; expected finite floats")
    if low < lo or high > hi:
        raise BadInput(f"inputs range over [{low:.4g}, {high:.4g}]; expected values in "
                       f"[{lo:g}, {hi:g}] (scale 8-bit pixels by 1/255)")


# what a JSON value that is not numbers became in numpy, in the words of the error message
NOT_NUMBERS = {"O": "a ragged or mixed array", "U": "text (JSON strings)", "S": "text (JSON strings)",
               "b": "booleans (true/false)"}


def as_numbers(value: object, what: str = "inputs") -> np.ndarray:
    """Nested JSON lists of numbers -> a float32 array; ``what`` names the value in error messages."""
    if value is None:
        raise BadInput(f"{what} must be numbers; got null")
    try:
        raw = np.asarray(value)
    except ValueError:
        raise BadInput(f"{what} must be a rectangular nested array of numbers (rows of unequal length found)")
    if raw.dtype.kind not in "iuf":
        raise BadInput(f"{what} must be numbers; got {NOT_NUMBERS.get(raw.dtype.kind, raw.dtype.name)}")
    with np.errstate(over="ignore"):  # overflow becomes Inf, which check_values reports
        return raw.astype(np.float32, copy=False)


def decode_array(value: object, spec: InputSpec) -> np.ndarray:
    """Nested JSON lists of numbers -> N x C x H x W float32."""
    batch = to_batch(as_numbers(value), spec)
    check_values(batch, spec)
    return batch


EXIF_ORIENTATION = 0x0112
SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow's RGB -> L


def decode_image(text: object, index: int | str, spec: InputSpec) -> np.ndarray:
    """One base64 PNG or JPEG -> C x H x W float32 in [0, 1].

    The size in the file's header is checked before any pixel is decoded (an image of the wrong size,
    however large it claims to be, costs a header read). EXIF orientation is applied. 16-bit grey
    images are scaled by 1/65535. Images with an alpha channel: when their colour channels are uniform
    (a drawing that lives in the alpha channel alone), the alpha channel is the image; otherwise they are
    composited over black, the background of MNIST and the convention of the shipped bundles. Errors name
    the image ``images[index]``, or ``index`` itself when it is a string.
    """
    c, h, w = spec.shape
    where = index if isinstance(index, str) else f"images[{index}]"
    if not isinstance(text, str):
        raise BadInput(f"{where} must be a base64 string")
    if text.startswith("data:"):  # a data URL, as a browser's FileReader or canvas.toDataURL() gives
        head, comma, text = text.partition(",")
        if not comma or not head.endswith(";base64"):
            raise BadInput(f"{where} is a data URL without ';base64,'; expected "
                           "data:image/png;base64,... or plain base64")
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{where} is not valid base64")
    try:
        image = Image.open(io.BytesIO(blob))  # reads the header only
        if image.format not in IMAGE_FORMATS:
            raise BadInput(f"{where} is {image.format}; expected PNG or JPEG")
        # wrong either way round: refused before getexif(), which decodes a PNG's pixel data to reach an
        # EXIF chunk stored after it (a header claiming 12000 x 12000 pixels would be decoded)
        if image.size not in ((w, h), (h, w)):
            raise BadInput(f"{where} is {image.size[0]}x{image.size[1]} pixels; expected {w}x{h}")
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        width, height = image.size[::-1] if orientation in SWAPS_AXES else image.size
        if (width, height) != (w, h):
            raise BadInput(f"{where} is {width}x{height} pixels; expected {w}x{h}")
        pixels = pixels_as_served(image, c)  # getexif() is cached: the orientation is not read twice
    except BadInput:
        raise
    except Image.DecompressionBombError:
        raise BadInput(f"{where} claims more pixels than a decoder should read; expected {w}x{h}")
    except Exception:  # noqa: BLE001 - truncated, corrupt, a decompression bomb: all the client's input
        raise BadInput(f"{where} could not be decoded as a PNG or JPEG image")
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def pixels_as_served(image: Image.Image, channels: int) -> np.ndarray:
    """What ``decode_image`` makes of an opened image, for training on a folder of them: its EXIF
    orientation applied, then H x W (grey) or H x W x 3 (RGB) float32 in [0, 1] by the same rules."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return _pixels(image, channels)


def _pixels(image: Image.Image, channels: int) -> np.ndarray:
    """H x W (grey) or H x W x 3 (RGB) float32 in [0, 1] by the rules of ``decode_image``."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNG
        grey = np.asarray(image, dtype=np.float32) / 65535.0
        grey = np.clip(grey, 0.0, 1.0)
        return grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        colour, alpha = rgba[..., :3], rgba[..., 3:]
        if np.ptp(colour) == 0 and np.ptp(alpha) > 0:  # the drawing is in the alpha channel alone
            out = np.repeat(alpha, 3, axis=2)
        else:
            out = colour * alpha  # over black
        return out @ LUMA if channels == 1 else out
    image = image.convert("L" if channels == 1 else "RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


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


V2_TENSOR_KEYS = ("name", "shape", "datatype")  # and "data", or parameters.binary_data_size


def v2_input_shapes(spec: InputSpec) -> str:
    c, h, w = spec.shape
    return f"[N, {c}, {h}, {w}]" + (f" or [N, {h}, {w}]" if c == 1 else "")


def decode_v2_tensor(tensor: object, spec: InputSpec, binary: "BinaryReader | None" = None) -> np.ndarray:
    """One OIP v2 input tensor (any name; FP32, FP16, FP64 or UINT8 8-bit pixels; shape [N, C, H, W], or
    [N, H, W] for one channel;
    ``data`` flat or nested, row-major, or, with the binary data extension, ``parameters.binary_data_size``
    little-endian bytes taken from ``binary``) -> N x C x H x W float32 in the spec's range."""
    if not isinstance(tensor, dict) or not all(k in tensor for k in V2_TENSOR_KEYS):
        raise BadInput('the input tensor must be an object with "name", "shape", "datatype" and "data"')
    name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
    if not isinstance(name, str):
        raise BadInput('the input tensor\'s "name" must be a string')
    if datatype not in IMAGE_DTYPES:
        raise BadInput(f"input tensor {shown(name)} has datatype {shown(datatype, 24)}; expected FP32 (or FP16, "
                       "FP64, or UINT8 for 8-bit pixels)")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInput(f'input tensor {shown(name)}: "shape" must be a list of non-negative integers')
    c, h, w = spec.shape
    if not (len(shape) == 4 and shape[1:] == [c, h, w] or c == 1 and len(shape) == 3 and shape[1:] == [h, w]):
        raise BadInput(f"input tensor {shown(name)} has shape {shown(shape)}; expected {v2_input_shapes(spec)}")
    parameters = tensor.get("parameters")
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if "data" in tensor:
            raise BadInput(f"input tensor {shown(name)} has both \"data\" and parameters.binary_data_size")
        if binary is None:
            raise BadInput(f"input tensor {shown(name)} gives binary_data_size but the request has no "
                           "Inference-Header-Content-Length header")
        values = binary.take(name, size, IMAGE_DTYPES[datatype])
    elif "data" in tensor:
        values = as_numbers(tensor["data"], f"input tensor {shown(name)} data")
    else:
        raise BadInput(f'input tensor {shown(name)} has no "data" (nor parameters.binary_data_size)')
    if values.size != math.prod(shape):
        raise BadInput(f"input tensor {shown(name)} holds {values.size} values; shape {shown(shape)} needs {math.prod(shape)}")
    if datatype == "UINT8":  # 8-bit pixels: 0..255 spans the bundle's range
        if values.size and not (values.min() >= 0 and values.max() <= 255 and np.all(values == np.rint(values))):
            raise BadInput(f"input tensor {shown(name)} is UINT8 but holds values other than integers 0..255")
        lo, hi = spec.range
        values = (lo + values * np.float32((hi - lo) / 255)).astype(np.float32)
    batch = to_batch(values.reshape(shape), spec)
    check_values(batch, spec)
    return batch


class BinaryReader:
    """The binary part of an OIP v2 request (after the JSON header), read tensor by tensor in order."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, name: str, size: object, dtype: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        if type(size) is not int or size < 0 or size % itemsize:
            raise BadInput(f"input tensor {shown(name)}: binary_data_size must be a multiple of {itemsize} bytes, got {size}")
        if self.offset + size > len(self.data):
            raise BadInput(f"input tensor {shown(name)}: binary_data_size {size} runs past the end of the body "
                           f"({len(self.data) - self.offset} bytes left)")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return np.frombuffer(chunk, dtype=dtype).astype(np.float32)

    def check_consumed(self) -> None:
        if self.offset != len(self.data):
            raise BadInput(f"{len(self.data) - self.offset} bytes of binary data follow the tensors that use them")


@dataclass(frozen=True)
class V2Request:
    """What an OIP v2 request asks besides its input: its id, which outputs (None: all) and which of
    them as binary data (``binary_all``: parameters.binary_data_output)."""

    id: str | None = None
    outputs: tuple[str, ...] | None = None
    binary: frozenset = frozenset()
    binary_all: bool = False

    def wants_binary(self, name: str) -> bool:
        return self.binary_all or name in self.binary


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, BinaryReader | None]:
    """(the JSON header, the binary part) of a body with ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, None
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadInput(f"Inference-Header-Content-Length {shown(header_length, 24)} must be a byte count of at most the "
                       f"body's {len(body)} bytes")
    n = int(header_length)
    return body[:n], BinaryReader(body[n:])


def _output_requests(payload: dict) -> tuple[tuple[str, ...] | None, frozenset]:
    outputs = payload.get("outputs")
    if outputs is None:
        return None, frozenset()
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise BadInput('"outputs" must be a list of objects with a "name"')
    binary = {o["name"] for o in outputs if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")}
    return tuple(o["name"] for o in outputs), frozenset(binary)


def decode_v2_infer_request(body: bytes, spec: InputSpec, max_batch: int, header_length: str | None = None,
                            output_names: list[str] | None = None) -> tuple[np.ndarray, V2Request]:
    """An OIP v2 inference request with one input tensor, as JSON or with the binary data extension
    (``header_length``: the Inference-Header-Content-Length header) -> (N x C x H x W float32, what else
    it asks). ``output_names``: the outputs the model has; a request naming another is a 400 here, before
    any work is done for it."""
    header, binary = split_binary(body, header_length)
    payload = _load_json(header)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or len(payload["inputs"]) != 1:
        raise BadInput('body must be an OIP v2 inference request with exactly one input tensor: '
                       '{"inputs": [{"name": ..., "shape": [N, C, H, W], "datatype": "FP32", "data": [...]}]}')
    request_id = payload.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID):
        raise BadInput(f'"id" must be a string of at most {MAX_REQUEST_ID} characters (it is echoed back)')
    parameters = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    outputs, binary_names = _output_requests(payload)
    unknown = [o for o in outputs or () if output_names is not None and o not in output_names]
    if unknown:
        raise BadInput(f"unknown output(s) {', '.join(shown(u, 48) for u in unknown[:8])}; this model has: {', '.join(output_names)}")
    batch = _sized(decode_v2_tensor(payload["inputs"][0], spec, binary), max_batch)
    if binary is not None:
        binary.check_consumed()
    return batch, V2Request(request_id, outputs, binary_names, bool(parameters.get("binary_data_output")))


def encode_v2_response(content: dict, tensors: list[tuple[str, str, np.ndarray]],
                       request: V2Request) -> tuple[bytes, int | None]:
    """The response body: ``content`` with an ``outputs`` list built from ``tensors`` (name, datatype,
    array), each as JSON ``data`` or, when asked, as binary data after the JSON header. Returns (body,
    the JSON header's length when there is binary data, else None)."""
    outputs, chunks = [], []
    for name, datatype, values in tensors:
        entry = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if request.wants_binary(name):
            raw = np.ascontiguousarray(values, dtype=BINARY_DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = values.ravel().tolist()
        outputs.append(entry)
    header = orjson.dumps({**content, "outputs": outputs})
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


# the OIP v2 datatypes an image tensor may have -> their little-endian numpy types: what the v2 front takes
# (read into float32; UINT8 is 8-bit pixels, scaled onto the bundle's range) and the upstreams send
IMAGE_DTYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "UINT8": "u1"}

# OIP v2 datatypes -> little-endian numpy types of the binary data extension (BOOL: one byte each)
BINARY_DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "BOOL": "?"}


def _v1_image(value: object, what: str, spec: InputSpec) -> np.ndarray:
    """One image of a TF Serving / KServe v1 request -> C x H x W float32: nested numbers, channels last
    (TF's convention: H x W x C, or H x W for one channel) or first (C x H x W), or ``{"b64": "<base64 PNG
    or JPEG>"}`` (TF Serving's form for binary values)."""
    c, h, w = spec.shape
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise BadInput(f'{what} is an object; expected {{"b64": "<base64 PNG or JPEG>"}} or nested numbers')
        return decode_image(value["b64"], what, spec)
    array = as_numbers(value, what)
    if array.shape == (c, h, w):
        return array
    if array.shape == (h, w, c):
        return np.ascontiguousarray(array.transpose(2, 0, 1))
    if c == 1 and array.shape == (h, w):
        return array[None]
    raise BadInput(f"{what} has shape {list(array.shape)}; expected {h}x{w}x{c} (channels last), {c}x{h}x{w}"
                   + (f" or {h}x{w}" if c == 1 else "") + ', or {"b64": ...}')


def _named(value: object, what: str) -> object:
    """TF's named form of a model with one input, ``{"<input name>": value}``, unwrapped (a ``b64`` object
    is a value, not a name)."""
    if isinstance(value, dict) and len(value) == 1 and "b64" not in value:
        return next(iter(value.values()))
    if isinstance(value, dict) and "b64" not in value:
        raise BadInput(f"{what} names {len(value)} inputs; the model takes one")
    return value


def decode_v1_predict_request(body: bytes, spec: InputSpec, max_batch: int) -> tuple[np.ndarray, bool]:
    """A TF Serving / KServe v1 predict request -> (N x C x H x W float32, whether it was columnar).

    Row format ``{"instances": [image, ...]}``, each image as ``_v1_image`` reads it (or ``{"<input>":
    image}``); columnar ``{"inputs": batch}`` (or ``{"inputs": {"<input>": batch}}``), the batch a list of
    such images. ``signature_name`` may be given (the gateway's model has one signature)."""
    payload = _load_json(body)
    if not isinstance(payload, dict) or len({"instances", "inputs"} & payload.keys()) != 1:
        raise BadInput('body must be a JSON object with exactly one of "instances" (a list of images) or '
                       '"inputs" (the batch), as TF Serving and KServe v1 take')
    unknown = set(payload) - {"instances", "inputs", "signature_name"}
    if unknown:
        raise BadInput(f"unknown field(s) {shown(sorted(unknown))}; expected instances or inputs, and signature_name")
    columnar = "inputs" in payload
    rows = _named(payload["inputs"], "inputs") if columnar else payload["instances"]
    key = "inputs" if columnar else "instances"
    if not isinstance(rows, list) or not rows:
        raise BadInput(f'"{key}" must be a non-empty list of images')
    if len(rows) > max_batch:
        raise PayloadTooLarge(f"{len(rows)} inputs in one request; at most {max_batch} are accepted")
    batch = np.stack([_v1_image(_named(r, f"{key}[{i}]"), f"{key}[{i}]", spec) for i, r in enumerate(rows)])
    check_values(batch, spec)
    return _sized(batch, max_batch), columnar
