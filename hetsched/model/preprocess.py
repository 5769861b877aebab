"""Image preprocessing (encoded JPEG/PNG -> model input tensor) and result postprocessing (top-k).

Pure functions with strict limits: everything here runs on bytes sent by untrusted clients, so every
failure on bad input is a :class:`~hetsched.errors.ProtocolError` with a wire error code, and the
cost of a request is bounded *before* it is paid:

* ``TOO_LARGE``        the encoded payload is over ``ImageLimits.max_encoded_bytes``;
* ``BAD_IMAGE``        not JPEG/PNG, corrupt or truncated (truncated images are never accepted:
                       this module relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being False
                       and never changes it);
* ``IMAGE_TOO_LARGE``  width, height or width*height over the limits, read from the header before
                       any pixel is decoded (decompression bombs); Pillow's own bomb check
                       (``Image.MAX_IMAGE_PIXELS``) is a second line and maps to the same code;
* ``IMAGE_TOO_SMALL``  a side under ``ImageLimits.min_side``.

Preprocessing is the ImageNet evaluation transform (torchvision's ``Resize(resize) ->
CenterCrop(size) -> ToTensor -> Normalize(mean, std)`` for PIL images) exactly as the reference tool
``shared/models/tools/verify.py`` computes it, which produced the model's published top-5 scores; the
output is bit-identical to that tool's. It differs from torchvision in two roundings:

* resize: the shorter side becomes ``resize``, the longer ``round(long * resize / short)`` (torchvision
  truncates with ``int()``), bilinear with Pillow's ``Image.BILINEAR`` on the uint8 image.
  This matters: with ``int()`` chelsea.jpg scores 0.706 Egyptian cat instead of the reference 0.646;
* crop: the top-left is ``(h - size) // 2`` (torchvision: ``int(round((h - size) / 2.0))``, half to
  even; the two differ by one pixel when ``h - size`` is 3 mod 4). A crop larger than the resized
  image overhangs it with zeros, centred the same way (PIL ``crop`` semantics).

Then ``x * scale`` (computed as ``x / (1 / scale)`` in float32 to match the tool's ``x / 255.0``),
``(x - mean) / std`` with ``mean``/``std`` in RGB order, ``channel_order: BGR`` reverses the
channel axis, ``layout`` picks NCHW or NHWC (``auto``, the default, is decided from the model by
:func:`hetsched.model.inputs.resolve_input_config`: NHWC when the model input is [1, H, W, 3],
else NCHW; unresolved it means NCHW). ``dtype: uint8`` (for models that take raw pixels) skips scale, mean and std and
returns the resized, cropped uint8 pixels; ``float16`` casts the float32 result.

For normal aspect ratios the resized image is made whole and cropped. For extreme ones (an
8 x 16384 strip would become 256 x 524288) only the crop window is resampled (Pillow's
``resize(box=...)``, same filter taps), so the cost stays bounded by the crop size; pixels can then
differ by one grey level (Pillow rounds its intermediate pass to uint8 and may order the two passes
differently for a box).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFile

from hetsched.config import InputConfig
from hetsched.errors import ConfigError, ProtocolError
from hetsched.model.inputs import PREPROCESS_DTYPES, model_input_layout, resolve_input_config  # noqa: F401

log = logging.getLogger(__name__)

__all__ = [
    "ImageLimits", "sniff_format", "decode_image", "preprocess_array", "preprocess_encoded",
    "model_input_shape", "model_input_layout", "resolve_input_config", "load_labels", "softmax",
    "looks_like_probabilities", "top_k",
]


@dataclass(frozen=True)
class ImageLimits:
    max_encoded_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000  # width*height from the header, checked BEFORE decoding
    min_side: int = 8  # smaller images are refused
    max_side: int = 16384


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Only for a helpful message when refusing: these are NOT accepted.
_OTHER_MAGIC = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
                (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"))
# Pillow's format names that are accepted (MPO is a multi-picture JPEG as written by some cameras;
# its first picture is the image).
_PIL_FORMATS = ("JPEG", "PNG")
_ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG"})
# A progressive JPEG costs one pass over all coefficients per scan; real encoders write about 10.
# Thousands of tiny scans in a few MB is a known CPU bomb, so cap them (counted cheaply: an
# FF DA pair can only be an SOS marker outside APPn payloads, as entropy data stuffs FF with 00).
_MAX_JPEG_SCANS = 100
# Above this many resized pixels, resample only the crop window (see the module docstring).
_FULL_RESIZE_MAX_PIXELS = 4 * 1024 * 1024
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not SOF.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_WNID = re.compile(r"^n\d{8}\s+")


def _byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of any buffer (bytes, bytearray, memoryview, uint8 array)."""
    view = memoryview(data)  # TypeError for non-buffers
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except TypeError:  # not C-contiguous
        return memoryview(view.tobytes())


def sniff_format(data: bytes | memoryview) -> str | None:  # any bytes-like object
    """``"jpeg"``, ``"png"`` or None, from the magic bytes at the start of ``data``."""
    try:
        head = data[:8] if isinstance(data, bytes) else bytes(_byte_view(data)[:8])
    except TypeError:
        return None
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    return None


def _describe_format(data: bytes) -> str:
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    return "unknown"


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    # The IHDR chunk must come first: length 13, type, width, height (big-endian).
    if len(data) >= 24 and data[8:16] == b"\x00\x00\x00\x0dIHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _jpeg_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the last SOF before the first SOS, as Pillow reads it; None if not found.

    Walks marker segments by their lengths only; each step advances at least 2 bytes.
    """
    size = None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers, no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: the header is over
            break
        seglen = (data[i + 2] << 8) | data[i + 3]
        if seglen < 2:
            break
        if marker in _SOF_MARKERS and i + 9 <= n:
            size = ((data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6])
        i += 2 + seglen
    return size


def _check_size(width: int, height: int, limits: ImageLimits, where: str) -> None:
    if width <= 0 or height <= 0:
        raise ProtocolError("BAD_IMAGE", f"image {where} gives a size of {width}x{height}")
    if width > limits.max_side or height > limits.max_side:
        raise ProtocolError("IMAGE_TOO_LARGE", f"image is {width}x{height} ({where}); the largest side "
                                               f"accepted is {limits.max_side}")
    if width * height > limits.max_pixels:
        raise ProtocolError("IMAGE_TOO_LARGE", f"image is {width}x{height} = {width * height} pixels ({where}); "
                                               f"at most {limits.max_pixels} are accepted")
    if width < limits.min_side or height < limits.min_side:
        raise ProtocolError("IMAGE_TOO_SMALL", f"image is {width}x{height}; both sides must be at least "
                                               f"{limits.min_side}")


_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def _open(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except _BOMB_ERRORS as exc:  # the Warning only arrives here if warnings are set to "error"
        raise ProtocolError("IMAGE_TOO_LARGE", f"image over Pillow's decompression-bomb limit: {exc}") from exc
    except MemoryError as exc:
        raise ProtocolError("IMAGE_TOO_LARGE", "out of memory reading the image header") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser failure is a bad image
        raise ProtocolError("BAD_IMAGE", f"cannot read the image header: {exc or type(exc).__name__}") from exc
    if img.format not in _ACCEPTED_FORMATS:  # pragma: no cover - formats= already restricts this
        img.close()
        raise ProtocolError("BAD_IMAGE", f"unsupported image format {img.format}; send JPEG or PNG")
    return img


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) of a JPEG; 1 when absent or unreadable (a broken EXIF block does not
    make the picture itself bad). Reads only the APP1 segment, at most 64 KiB."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF is common in the wild
        log.debug("ignoring unreadable EXIF: %s", exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# EXIF orientation -> the transpose that displays the picture upright (as ImageOps.exif_transpose).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode.startswith("I"):  # 16-bit greyscale PNG: I;16, I;16B or I (32-bit) holding 0..65535
        a = np.asarray(img)
        if a.dtype.kind == "i":
            a = np.clip(a, 0, 65535)
        g = (a >> 8).astype(np.uint8)  # the high byte, as Pillow itself reduces 16-bit RGB PNGs
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning; alpha is dropped below
    # Alpha is dropped (not composited), like torchvision's / PIL's convert("RGB").
    return np.asarray(img.convert("RGB"))


def decode_image(data: bytes | memoryview, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode a JPEG or PNG into a uint8 H x W x 3 RGB array (possibly read-only).

    Sizes are checked from the header before any pixel data is decoded. JPEG EXIF orientation is
    applied. Raises ProtocolError (TOO_LARGE, BAD_IMAGE, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global some other code set: Pillow would then fill missing data with grey silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; refusing to decode "
                           "images whose truncation would go unnoticed (leave it False)")
    try:
        n = memoryview(data).nbytes
    except TypeError:
        raise ProtocolError("BAD_IMAGE", f"expected encoded image bytes, got {type(data).__name__}") from None
    if n > limits.max_encoded_bytes:
        raise ProtocolError("TOO_LARGE", f"encoded image is {n} bytes; at most {limits.max_encoded_bytes} "
                                         "are accepted")
    if n == 0:
        raise ProtocolError("BAD_IMAGE", "empty payload: expected JPEG or PNG bytes")
    raw = data if isinstance(data, bytes) else _byte_view(data).tobytes()
    fmt = sniff_format(raw)
    if fmt is None:
        raise ProtocolError("BAD_IMAGE", f"not a JPEG or PNG image (format: {_describe_format(raw)}); "
                                         "send JPEG or PNG")
    header = _png_header_size(raw) if fmt == "png" else _jpeg_header_size(raw)
    if header is not None:  # early refusal; Pillow's reading of the header is checked again below
        _check_size(*header, limits, "from the header")
    if fmt == "jpeg" and raw.count(b"\xff\xda") > _MAX_JPEG_SCANS:
        raise ProtocolError("BAD_IMAGE", f"JPEG has more than {_MAX_JPEG_SCANS} scans")

    img = _open(raw)
    try:
        width, height = img.size
        _check_size(width, height, limits, "from the header")
        orientation = _exif_orientation(img) if img.format in ("JPEG", "MPO") else 1
        try:
            img.load()
        except _BOMB_ERRORS as exc:
            raise ProtocolError("IMAGE_TOO_LARGE", f"image over Pillow's decompression-bomb limit: {exc}") from exc
        except MemoryError as exc:
            raise ProtocolError("IMAGE_TOO_LARGE", f"out of memory decoding a {width}x{height} image") from exc
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is a bad image
            what = "truncated" if "truncated" in str(exc) else "corrupt"
            raise ProtocolError("BAD_IMAGE", f"{what} {img.format} data: {exc or type(exc).__name__}") from exc
        if img.size != (width, height):  # pragma: no cover - defensive: the decoder changed its mind
            raise ProtocolError("BAD_IMAGE", f"image size changed while decoding ({width}x{height} -> "
                                             f"{img.size[0]}x{img.size[1]})")
        try:
            op = _ORIENT.get(orientation)
            # same pixel count, and both sides were checked: bounded like the decode itself
            rgb = _to_rgb(img.transpose(op) if op is not None else img)
        except MemoryError as exc:
            raise ProtocolError("IMAGE_TOO_LARGE", f"out of memory converting a {width}x{height} image") from exc
        except Exception as exc:  # noqa: BLE001 - e.g. an unusual mode Pillow cannot convert
            raise ProtocolError("BAD_IMAGE", f"cannot convert {img.mode} image to RGB: {exc}") from exc
    finally:
        img.close()
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:  # pragma: no cover - defensive
        raise ProtocolError("BAD_IMAGE", f"decoded to an unexpected array {rgb.dtype} {rgb.shape}")
    return rgb


_DTYPES = PREPROCESS_DTYPES


def _check_cfg(cfg: InputConfig) -> None:
    if cfg.layout not in ("NCHW", "NHWC", "auto"):
        raise ValueError(f"input.layout must be NCHW, NHWC or auto, got {cfg.layout!r}")
    if cfg.dtype not in _DTYPES + ("auto",):
        raise ValueError(f"input.dtype must be one of {', '.join(_DTYPES)} or auto, got {cfg.dtype!r}")
    if cfg.channel_order not in ("RGB", "BGR"):
        raise ValueError(f"input.channel_order must be RGB or BGR, got {cfg.channel_order!r}")
    if cfg.size < 1 or cfg.resize < 1:
        raise ValueError(f"input.size and input.resize must be >= 1, got {cfg.size}, {cfg.resize}")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or any(s == 0 for s in cfg.std):
        raise ValueError(f"input.mean and input.std need 3 values each, std non-zero: {cfg.mean}, {cfg.std}")


def model_input_shape(cfg: InputConfig) -> tuple[int, ...]:
    """Shape of the tensor :func:`preprocess_array` returns for ``cfg`` (``layout: auto`` not yet
    resolved by :func:`~hetsched.model.inputs.resolve_input_config` means NCHW)."""
    _check_cfg(cfg)
    return (1, cfg.size, cfg.size, 3) if cfg.layout == "NHWC" else (1, 3, cfg.size, cfg.size)


def _resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """Shorter side -> ``resize``, longer side rounded: the same float expression as the reference
    tool (shared/models/tools/verify.py). torchvision truncates instead (``int()``), which moves
    chelsea.jpg's Egyptian-cat score from 0.646 to 0.706: the reference numbers need rounding."""
    s = resize / min(width, height)
    return max(resize, round(width * s)), max(resize, round(height * s))


def _axis_window(src: int, new: int, crop: int) -> tuple[int, int, int]:
    """One axis of the center crop of an image resized from ``src`` to ``new`` pixels:
    (first resized pixel, number of resized pixels kept, zero padding before them).
    ``off = (new - crop) // 2`` as the reference tool computes it; a negative offset means the crop
    overhangs the image and the overhang is zero (PIL's crop semantics)."""
    off = (new - crop) // 2
    first = max(off, 0)
    return first, min(new, off + crop) - first, max(-off, 0)


def _resize_crop(rgb: np.ndarray, resize: int, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    new_w, new_h = _resized_size(w, h, resize)
    x0, nx, pad_left = _axis_window(w, new_w, size)
    y0, ny, pad_top = _axis_window(h, new_h, size)
    if (new_w, new_h) == (w, h):
        window = rgb[y0:y0 + ny, x0:x0 + nx]
    elif new_w * new_h <= _FULL_RESIZE_MAX_PIXELS:
        resized = np.asarray(Image.fromarray(rgb, "RGB").resize((new_w, new_h), Image.BILINEAR))
        window = resized[y0:y0 + ny, x0:x0 + nx]
    else:
        # Only the crop window: Pillow's resampler uses source pixels outside the box as needed,
        # with the same filter scale, so this equals resize-then-crop within one grey level.
        box = (x0 * w / new_w, y0 * h / new_h, (x0 + nx) * w / new_w, (y0 + ny) * h / new_h)
        window = np.asarray(Image.fromarray(rgb, "RGB").resize((nx, ny), Image.BILINEAR, box=box))
    if window.shape[:2] == (size, size):
        return window
    out = np.zeros((size, size, 3), np.uint8)
    out[pad_top:pad_top + ny, pad_left:pad_left + nx] = window
    return out


def preprocess_array(rgb: np.ndarray, cfg: InputConfig) -> np.ndarray:
    """uint8 H x W x 3 RGB -> contiguous model input, ``model_input_shape(cfg)``: float32 (also for
    ``dtype: auto``), float16, or uint8 (the resized, cropped pixels: no scale, mean or std)."""
    _check_cfg(cfg)
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ProtocolError("BAD_IMAGE", f"expected a uint8 HxWx3 RGB array, got {desc}")
    crop = _resize_crop(np.ascontiguousarray(rgb), cfg.resize, cfg.size)
    if cfg.dtype == "uint8":
        return _arrange(crop, cfg)
    x = crop.astype(np.float32)
    if cfg.scale != 0:
        x /= np.float32(1.0 / cfg.scale)  # bit-exact with the reference's x / 255.0 in float32
    else:
        x *= np.float32(0.0)
    x -= np.asarray(cfg.mean, np.float32)
    x /= np.asarray(cfg.std, np.float32)
    return _arrange(x.astype(np.float16) if cfg.dtype == "float16" else x, cfg)


def _arrange(x: np.ndarray, cfg: InputConfig) -> np.ndarray:
    """H x W x 3 RGB -> channel order and layout of ``cfg``, with the batch axis, contiguous."""
    if cfg.channel_order == "BGR":
        x = x[:, :, ::-1]
    x = x if cfg.layout == "NHWC" else x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None])


def preprocess_encoded(data: Any, cfg: InputConfig, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded JPEG/PNG (bytes, memoryview or a uint8 array) -> model input tensor."""
    return preprocess_array(decode_image(data, limits), cfg)


# ---------------------------------------------------------------------------------------------
# postprocessing


def load_labels(path: str | None) -> list[str] | None:
    """Class names, one per line (line i = class i). A leading WordNet id (``n01440764 tench,
    Tinca tinca`` -> ``tench, Tinca tinca``) is dropped. None when ``path`` is None."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"input.labels: cannot read {path}: {exc.strerror or exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConfigError(f"input.labels: {path} has no labels")
    return [_WNID.sub("", line.strip(), count=1) for line in lines]


def softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64 inside, input's float dtype out)."""
    a = np.asarray(x)
    out_dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64
    z = a.astype(np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(out_dtype)


def looks_like_probabilities(x: np.ndarray, tol: float = 1e-3) -> bool:
    """All values in [0, 1] and summing to 1 (within ``tol``), i.e. the model already applied softmax."""
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)):
        return False
    return bool(a.min() >= -1e-6 and a.max() <= 1.0 + 1e-6 and abs(a.sum() - 1.0) <= tol)


def top_k(output: np.ndarray, k: int, labels: Sequence[str] | None = None) -> list[dict]:
    """The ``k`` best classes of one class vector, best first: ``{"index", "score"[, "label"]}``.

    ``output`` may have any shape with a single non-singleton axis (e.g. [1, 1000]). Scores are
    softmax probabilities; softmax is skipped when the output already looks like probabilities.
    Ties keep the lower index first.
    """
    a = np.asarray(output)
    if a.size == 0:
        raise ValueError("top_k: empty model output")
    if sum(1 for d in a.shape if d != 1) > 1:
        raise ValueError(f"top_k: expected one class vector, got shape {a.shape}")
    if k < 0:
        raise ValueError(f"top_k: k must be >= 0, got {k}")
    v = a.reshape(-1)
    if labels is not None and len(labels) != v.size:
        raise ValueError(f"top_k: {len(labels)} labels for {v.size} classes")
    from hetsched.model.topk import topk_scores  # the one top-k
    order, scores = topk_scores(v, k, apply_softmax=not looks_like_probabilities(v))
    out = []
    for i, score in zip(order.tolist(), scores.tolist()):
        item = {"index": i, "score": score}
        if labels is not None:
            item["label"] = labels[i]
        out.append(item)
    return out
