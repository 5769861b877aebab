"""Raw camera pixels (rgb24, bgr24, nv12, nv21) -> RGB uint8 H x W x 3 -> model input.

Pure numpy. Everything here runs on bytes sent by untrusted clients, so every failure on bad input
is a :class:`~hetsched.errors.ProtocolError` with a wire error code, checked from the declared
width and height *before* any pixel is converted (docs/protocol.md, "Raw pixel frames"):

* ``BAD_IMAGE``        a width or height of 0, an odd width or height for nv12/nv21, an unknown
                       encoding or color;
* ``IMAGE_TOO_LARGE``  a side over ``ImageLimits.max_side`` or width*height over ``max_pixels``;
* ``IMAGE_TOO_SMALL``  a side under ``ImageLimits.min_side``;
* ``SIZE_MISMATCH``    the payload's byte count is not what the encoding needs for that size.

Byte layouts (every byte an unsigned 8-bit sample, rows top to bottom, no row padding):

* ``rgb24`` / ``bgr24``: H rows of W pixels of 3 bytes (R, G, B or B, G, R): ``W*H*3`` bytes.
* ``nv12`` / ``nv21``: YUV 4:2:0 semi-planar as Android (NV21) and V4L2/most decoders (NV12) deliver:
  the Y plane (H rows of W bytes), then the chroma plane (H/2 rows of W/2 pairs, ``U V`` for nv12,
  ``V U`` for nv21) that covers 2x2 Y samples each: ``W*H*3/2`` bytes; W and H must be even.

YUV -> RGB (ITU-R BT.601/BT.709 with ``Kr``/``Kb`` below), per pixel, with ``U``/``V`` of its 2x2 block
(chroma is upsampled by repetition, as FFmpeg's unscaled converters do):

* ``bt601`` (the default): limited ("TV", MPEG) range, Y in 16..235, U/V in 16..240, Kr 0.299, Kb 0.114;
* ``bt709``: limited range, Kr 0.2126, Kb 0.0722 (HD cameras and H.264 streams tagged BT.709);
* ``full``: full ("PC", JPEG) range BT.601, Y, U, V in 0..255 (JPEG/JFIF, many webcams' MJPEG).

``R = Y' + 2(1-Kr) V'``, ``G = Y' - 2Kb(1-Kb)/Kg U' - 2Kr(1-Kr)/Kg V'``, ``B = Y' + 2(1-Kb) U'`` with
``Y' = (Y-16)*255/219``, ``U' = (U-128)*255/224`` (limited) or ``Y' = Y``, ``U' = U-128`` (full), rounded
to nearest and clipped to 0..255. Computed in int16 fixed point (1/32 level), vectorised over whole
planes: within one level of the exact result. The model input is then made by :func:`hetsched.model.preprocess.preprocess_array`,
exactly as for a decoded JPEG/PNG of the same pixels.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from hetsched.config import InputConfig
from hetsched.errors import ProtocolError
from hetsched.model.preprocess import ImageLimits, _byte_view, _check_size, preprocess_array

__all__ = ["PIXEL_ENCODINGS", "YUV_ENCODINGS", "COLORS", "DEFAULT_COLOR", "payload_size", "check_pixels",
           "pixels_to_rgb", "pixels_to_input"]

PIXEL_ENCODINGS = ("rgb24", "bgr24", "nv12", "nv21")
YUV_ENCODINGS = ("nv12", "nv21")
COLORS = ("bt601", "bt709", "full")
DEFAULT_COLOR = "bt601"

_KR_KB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "full": (0.299, 0.114)}
_SHIFT = 5  # fixed point, 1/32 of a level: the largest sum (bt709 blue, Y=U=255) stays inside int16
# Fresh multi-megabyte temporaries cost more in page faults than the arithmetic itself (1280x720:
# 11 ms fresh, 4 ms reused), so each thread keeps its scratch arrays for frames up to this size.
_SCRATCH_MAX_PIXELS = 1920 * 1088


def _coefficients(color: str) -> tuple[float, float, tuple[tuple[float, float], ...]]:
    """(luma offset, luma scale, per output channel R, G, B: (U factor, V factor)), all in levels."""
    kr, kb = _KR_KB[color]
    kg = 1.0 - kr - kb
    y0, ys, cs = (0.0, 1.0, 1.0) if color == "full" else (16.0, 255.0 / 219.0, 255.0 / 224.0)
    return y0, ys, ((0.0, 2 * (1 - kr) * cs), (-2 * kb * (1 - kb) / kg * cs, -2 * kr * (1 - kr) / kg * cs),
                    (2 * (1 - kb) * cs, 0.0))


_COEFFICIENTS = {color: _coefficients(color) for color in COLORS}


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: type = np.int16) -> np.ndarray:
        if math.prod(shape) > 3 * _SCRATCH_MAX_PIXELS:
            return np.empty(shape, dtype)
        a = self.arrays.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self.arrays[key] = np.empty(shape, dtype)
        return a


_scratch = _Scratch()


def _fixmul(x: np.ndarray, s: float, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """out = x * s in int16 for |x| <= 255 and |s| < 128: the integer part, then 7 bits of fraction."""
    a = math.floor(s)
    f = round((s - a) * 128)
    np.multiply(x, np.int16(a), out=out)
    if f:
        np.multiply(x, np.int16(f), out=tmp)
        tmp >>= 7
        out += tmp
    return out


def payload_size(encoding: str, width: int, height: int) -> int:
    """Bytes a frame of ``encoding`` and this size has on the wire."""
    if encoding in YUV_ENCODINGS:
        return width * height * 3 // 2
    if encoding in ("rgb24", "bgr24"):
        return width * height * 3
    raise ProtocolError("BAD_IMAGE", f"unknown pixel encoding {encoding!r}; use one of {', '.join(PIXEL_ENCODINGS)}")


def check_pixels(encoding: str, nbytes: int, width: int, height: int, color: str | None = None,
                 limits: ImageLimits = ImageLimits()) -> None:
    """Every check on a raw pixel frame that needs no pixel: cheap enough for the server to refuse a
    bad frame on receipt. Raises ProtocolError (BAD_IMAGE, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL,
    SIZE_MISMATCH); :func:`pixels_to_rgb` runs it again itself."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)):
        raise ProtocolError("BAD_IMAGE", f"width and height must be integers, got {width!r} and {height!r}")
    expected = payload_size(encoding, width, height)  # BAD_IMAGE for an unknown encoding
    if color is not None and (encoding not in YUV_ENCODINGS or color not in COLORS):
        raise ProtocolError("BAD_IMAGE", f"color {color!r} with {encoding}: only nv12/nv21 take a color, one of "
                                         f"{', '.join(COLORS)}")
    _check_size(width, height, limits, f"declared for {encoding}")
    if encoding in YUV_ENCODINGS and (width % 2 or height % 2):
        raise ProtocolError("BAD_IMAGE", f"{encoding} needs an even width and height (4:2:0 chroma covers 2x2 "
                                         f"pixels), got {width}x{height}")
    if nbytes != expected:
        raise ProtocolError("SIZE_MISMATCH", f"{encoding} {width}x{height} is {expected} bytes, the payload has "
                                             f"{nbytes}")


def _yuv420sp_to_rgb(buf: np.ndarray, width: int, height: int, vu: bool, color: str,
                     out: np.ndarray | None = None) -> np.ndarray:
    y0, ys, factors = _COEFFICIENTS[color]
    one, h2, w2, hw = 1 << _SHIFT, height // 2, width // 2, width * height
    rows = (h2, 2, width)  # Y as pairs of rows: one chroma row covers both
    luma, tmp = _scratch.get("luma", rows), _scratch.get("tmp", rows)
    np.subtract(buf[:hw].reshape(rows), np.int16(y0), out=tmp, dtype=np.int16)
    _fixmul(tmp, ys * one, luma, _scratch.get("tmp2", rows))
    luma += np.int16(one // 2)  # the final shift then rounds to nearest
    uv = _scratch.get("uv", (h2, w2, 2))
    np.subtract(buf[hw:].reshape(h2, w2, 2), np.int16(128), out=uv, dtype=np.int16)
    u, v = (uv[..., 1], uv[..., 0]) if vu else (uv[..., 0], uv[..., 1])
    term, term2, qtmp = (_scratch.get(k, (h2, w2)) for k in ("term", "term2", "qtmp"))
    pairs = _scratch.get("pairs", (h2, w2, 2))
    out = np.empty((height, width, 3), np.uint8) if out is None else out
    for ch, (fu, fv) in enumerate(factors):
        _fixmul(u if fu else v, (fu or fv) * one, term, qtmp)
        if fu and fv:
            term += _fixmul(v, fv * one, term2, qtmp)
        pairs[..., 0] = term  # chroma repeated across the two columns ...
        pairs[..., 1] = term
        np.add(luma, pairs.reshape(h2, 1, width), out=tmp)  # ... and broadcast over the two rows
        tmp >>= _SHIFT
        np.clip(tmp, 0, 255, out=tmp)
        out[..., ch] = tmp.reshape(height, width)
    return out


def _as_bytes(payload: Any) -> np.ndarray:
    """A flat uint8 array over any buffer (bytes, memoryview, zmq.Frame, uint8 array); no copy when
    the buffer is contiguous."""
    if hasattr(payload, "buffer") and not isinstance(payload, (memoryview, np.ndarray)):
        payload = payload.buffer  # zmq.Frame
    if isinstance(payload, np.ndarray) and payload.dtype != np.uint8:
        raise ProtocolError("BAD_IMAGE", f"raw pixels must be uint8, got an array of {payload.dtype}")
    try:
        return np.frombuffer(_byte_view(payload), np.uint8)
    except TypeError:
        raise ProtocolError("BAD_IMAGE", f"expected raw pixel bytes, got {type(payload).__name__}") from None


def pixels_to_rgb(encoding: str, payload: Any, *, width: int, height: int, color: str | None = None,
                  limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Raw pixels -> uint8 H x W x 3 RGB (possibly a read-only view of ``payload`` for rgb24).

    ``payload``: bytes, memoryview, zmq.Frame or a uint8 array of exactly
    ``payload_size(encoding, width, height)`` bytes in the layout of the module docstring.
    ``color`` (nv12/nv21 only): ``bt601`` (default), ``bt709`` or ``full``.
    """
    return _to_rgb(encoding, payload, width, height, color, limits, reuse=False)


def _to_rgb(encoding: str, payload: Any, width: int, height: int, color: str | None, limits: ImageLimits,
            reuse: bool) -> np.ndarray:
    buf = _as_bytes(payload)
    check_pixels(encoding, buf.size, width, height, color, limits)
    if encoding in YUV_ENCODINGS:
        out = _scratch.get("rgb", (height, width, 3), np.uint8) if reuse else None
        return _yuv420sp_to_rgb(buf, width, height, encoding == "nv21", color or DEFAULT_COLOR, out)
    rgb = buf.reshape(height, width, 3)
    return rgb[:, :, ::-1] if encoding == "bgr24" else rgb


def pixels_to_input(encoding: str, payload: Any, *, width: int, height: int, color: str | None = None,
                    cfg: InputConfig, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Raw pixels -> the model input tensor (``model_input_shape(cfg)``, float32), like
    :func:`hetsched.model.preprocess.preprocess_encoded` for an encoded image. Same arguments and
    errors as :func:`pixels_to_rgb`."""
    # reuse=True: the RGB array is scratch, as preprocess_array copies what it keeps
    return preprocess_array(_to_rgb(encoding, payload, width, height, color, limits, reuse=True), cfg)
