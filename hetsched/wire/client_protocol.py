"""The client wire protocol (version 1), documented in docs/protocol.md.

Transport: ZeroMQ. The server binds a ROUTER socket; clients connect a DEALER socket. Every
message is multipart: a UTF-8 JSON header frame, then zero or more binary payload frames.
Nothing on the wire is ever unpickled or evaluated.

Client -> server:  submit (1 payload frame; none for encoding "shm"), hello, stats, query, trace,
                   shm_register
Server -> client:  result (0..n payload frames), error, hello, stats, query
"""

from __future__ import annotations

import orjson
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hetsched.errors import ProtocolError
from hetsched.model.pixels import COLORS, DEFAULT_COLOR, PIXEL_ENCODINGS, YUV_ENCODINGS

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024
MAX_STREAM_NAME = 128
IMAGE_ENCODINGS = ("jpeg", "png", "image")
ENCODINGS = IMAGE_ENCODINGS + ("raw", "shm") + PIXEL_ENCODINGS
MAX_PIXEL_SIDE = 1 << 20  # the form check of width/height; ImageLimits decide what is accepted
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int32", "int64")
CLIENT_TYPES = ("submit", "hello", "stats", "query", "trace", "shm_register", "lane_open", "lane_report")
MAX_TRACE_FRAMES = 5000

# Error codes (see docs/protocol.md for what each means and whether a retry can help).
ERROR_CODES = {
    "BAD_HEADER": "header frame is not a JSON object of the documented form",
    "BAD_VERSION": "unsupported protocol version",
    "BAD_TYPE": "unknown message type",
    "NO_LANE": "the direct lane is offered on ipc:// sockets only",
    "BAD_FRAMES": "wrong number of payload frames",
    "BAD_IMAGE": "payload is not a decodable JPEG/PNG image",
    "IMAGE_TOO_LARGE": "image dimensions over the limit (checked before decoding)",
    "IMAGE_TOO_SMALL": "image dimensions under the minimum",
    "TOO_LARGE": "payload over the size limit",
    "BAD_DTYPE": "raw tensor dtype not accepted",
    "SHAPE_MISMATCH": "raw tensor shape or size differs from the model input",
    "SIZE_MISMATCH": "raw pixel payload size differs from what its encoding, width and height need",
    "NO_PREPROCESS": "this service takes raw tensors only",
    "BAD_SHM": "shared-memory region not usable (not registered, not a private regular file, wrong or changed size, "
               "not over ipc://)",
    "BAD_SLOT": "shared-memory slot number outside the registered region",
    "BUSY": "the service is full: the frame was NOT accepted; resend later",
    "LIMIT": "a per-client limit (streams, frames in flight) was reached; the frame was NOT accepted",
    "STAGE_FAILED": "a pipeline stage failed on this frame",
    "FRAME_FAILED": "the frame's processing killed its worker twice (a poison frame): it is dropped",
    "SHUTTING_DOWN": "the service is stopping and accepts no new frames",
    "TIMEOUT": "the frame was accepted but not finished before the service stopped",
}


@dataclass(frozen=True)
class Submit:
    stream: str
    seq: int
    encoding: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    want_outputs: bool = False
    shm: int | None = None    # encoding "shm": registered region id and slot
    slot: int | None = None
    # raw pixel frames (encoding in PIXEL_ENCODINGS, or "shm" with a "pixels" field): what the bytes
    # are; width/height as declared; color resolved (bt601 by default) for nv12/nv21, None otherwise
    pixels: str | None = None
    width: int | None = None
    height: int | None = None
    color: str | None = None


def _small_int(msg: dict, key: str, hi: int) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < hi:
        raise ProtocolError("BAD_HEADER", f"{key} must be an integer in 0..{hi - 1}")
    return v


def encode(msg: dict) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, **msg})


def loads(raw: bytes | memoryview) -> Any:
    """JSON -> Python (orjson: about five times faster than the standard library on our messages)."""
    return orjson.loads(raw)


def decode_header(raw: bytes | memoryview) -> dict:
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("BAD_HEADER", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        msg = orjson.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("BAD_HEADER", f"header is not UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("BAD_HEADER", "header must be a JSON object")
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError("BAD_VERSION", f"protocol version {v!r} not supported (server speaks {PROTOCOL_VERSION})")
    t = msg.get("type")
    if t not in CLIENT_TYPES:
        raise ProtocolError("BAD_TYPE", f"unknown message type {t!r} (expected one of {', '.join(CLIENT_TYPES)})")
    return msg


def check_stream(stream: object) -> str:
    if not isinstance(stream, str) or not 0 < len(stream) <= MAX_STREAM_NAME:
        raise ProtocolError("BAD_HEADER", f"stream must be a string of 1..{MAX_STREAM_NAME} characters")
    return stream


def parse_submit(msg: dict, n_payload: int) -> Submit:
    stream = check_stream(msg.get("stream", "default"))
    seq = msg.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or seq >= 2**63:
        raise ProtocolError("BAD_HEADER", "seq must be a non-negative integer")
    enc = msg.get("encoding", "image")
    if enc not in ENCODINGS:
        raise ProtocolError("BAD_HEADER", f"encoding must be one of {', '.join(ENCODINGS)}")
    want = 0 if enc == "shm" else 1
    if n_payload != want:
        raise ProtocolError("BAD_FRAMES", f"submit with encoding {enc} carries exactly {want} payload frame(s), "
                                          f"got {n_payload}")
    dtype = shape = shm = slot = None
    if enc == "shm":
        shm, slot = _small_int(msg, "shm", 1 << 31), _small_int(msg, "slot", 1 << 31)
    if "pixels" in msg and enc != "shm":
        raise ProtocolError("BAD_HEADER", f"pixels names what a shared-memory slot holds (encoding shm); "
                                          f"with encoding {enc} leave it out")
    if enc in PIXEL_ENCODINGS or "pixels" in msg:
        return Submit(stream, seq, enc, None, None, bool(msg.get("outputs", False)), shm, slot,
                      *_pixel_fields(msg, enc if enc in PIXEL_ENCODINGS else msg["pixels"]))
    if enc in ("raw", "shm"):
        dtype = msg.get("dtype")
        if dtype not in DTYPES:
            raise ProtocolError("BAD_DTYPE", f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        shape = msg.get("shape")
        if (not isinstance(shape, list) or not 0 < len(shape) <= 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape)):
            raise ProtocolError("SHAPE_MISMATCH", "shape must be a list of 1..8 positive integers")
        shape = tuple(shape)
    return Submit(stream, seq, enc, dtype, shape, bool(msg.get("outputs", False)), shm, slot)


def _pixel_fields(msg: dict, pixels: Any) -> tuple[str, int, int, str | None]:
    """(pixels, width, height, color) of a raw pixel submit, checked for form only: the sizes are
    checked against the image limits by hetsched.model.pixels.check_pixels."""
    if pixels not in PIXEL_ENCODINGS:
        raise ProtocolError("BAD_HEADER", f"pixels must be one of {', '.join(PIXEL_ENCODINGS)}, got {pixels!r}")
    dims = {}
    for key in ("width", "height"):
        v = msg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_PIXEL_SIDE):
            raise ProtocolError("BAD_HEADER", f"{key} must be an integer in 0..{MAX_PIXEL_SIDE}, got {v!r}")
        dims[key] = v
    width, height = dims["width"], dims["height"]
    shape, dtype = msg.get("shape"), msg.get("dtype")
    if pixels in YUV_ENCODINGS:
        if shape is not None or dtype is not None:
            raise ProtocolError("BAD_HEADER", f"{pixels} takes width and height, not shape or dtype")
    else:
        if dtype is not None and dtype != "uint8":
            raise ProtocolError("BAD_DTYPE", f"{pixels} pixels are uint8, got dtype {dtype!r}")
        if shape is not None:
            if (not isinstance(shape, list) or len(shape) != 3 or shape[2] != 3
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_PIXEL_SIDE
                               for d in shape)):
                raise ProtocolError("SHAPE_MISMATCH", f"{pixels} shape must be [height, width, 3], got {shape!r}")
            if (height, width) not in ((None, None), tuple(shape[:2])):
                raise ProtocolError("SHAPE_MISMATCH", f"{pixels} shape {shape} disagrees with width {width} and "
                                                      f"height {height}")
            height, width = shape[0], shape[1]
    if width is None or height is None:
        need = "width and height" if pixels in YUV_ENCODINGS else "width and height (or shape [height, width, 3])"
        raise ProtocolError("BAD_HEADER", f"a {pixels} submit needs {need}")
    color = msg.get("color")
    if pixels in YUV_ENCODINGS:
        if color is None:
            color = DEFAULT_COLOR
        elif color not in COLORS:
            raise ProtocolError("BAD_HEADER", f"color must be one of {', '.join(COLORS)}, got {color!r}")
    elif color is not None:
        raise ProtocolError("BAD_HEADER", f"color applies to nv12/nv21 only, not {pixels}")
    return pixels, width, height, color


def raw_tensor(sub: Submit, payload: Any, expected: tuple[str, tuple[int, ...]], max_elements: int) -> np.ndarray:
    """View a raw payload as the model input, checking dtype, shape and byte size."""
    n = math.prod(sub.shape)
    if n > max_elements:
        raise ProtocolError("TOO_LARGE", f"tensor of {n} elements exceeds the limit of {max_elements}")
    if (sub.dtype, sub.shape) != expected:
        raise ProtocolError("SHAPE_MISMATCH", f"got {sub.dtype}{list(sub.shape)}, model input is "
                                              f"{expected[0]}{list(expected[1])}")
    buf = payload.buffer if hasattr(payload, "buffer") else payload
    if len(buf) != n * np.dtype(sub.dtype).itemsize:
        raise ProtocolError("SHAPE_MISMATCH", f"payload has {len(buf)} bytes, {sub.dtype}{list(sub.shape)} "
                                              f"needs {n * np.dtype(sub.dtype).itemsize}")
    return np.frombuffer(buf, dtype=sub.dtype).reshape(sub.shape)


def top_items(top: Sequence, labels: Sequence[str] | None) -> list[dict]:
    """A result's ``top_k`` from a stage's flat (index, score, index, score, ...) top-k."""
    out = []
    for i, score in zip(top[0::2], top[1::2]):
        item = {"index": i, "score": score}
        if labels is not None and i < len(labels):
            item["label"] = labels[i]
        out.append(item)
    return out


def result_message(stream: str, seq: int, top: Sequence[dict], latency_ms: float, stages: Sequence[dict],
                   outputs: Sequence[np.ndarray] | None, output_names: Sequence[str]) -> list:
    head = {"type": "result", "stream": stream, "seq": seq, "top_k": list(top), "latency_ms": round(latency_ms, 3),
            "stages": list(stages)}
    frames: list = []
    if outputs is not None:
        head["outputs"] = [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)}
                           for n, a in zip(output_names, outputs)]
        frames = [np.ascontiguousarray(a) for a in outputs]
    return [encode(head), *frames]


def error_message(code: str, message: str, stream: str | None = None, seq: int | None = None,
                  rid: Any = None) -> list:
    head: dict = {"type": "error", "code": code, "message": message}
    if stream is not None:
        head["stream"] = stream
    if seq is not None:
        head["seq"] = seq
    if rid is not None:
        head["id"] = rid
    return [encode(head)]


def control_id(msg: dict) -> Any:
    """The optional ``id`` of a control message (hello, stats, query, trace, shm_register), echoed
    in its reply so a client can match replies that carry no stream/seq: an integer in 0..2**53 or
    a string of 1..64 characters; anything else is BAD_HEADER."""
    rid = msg.get("id")
    if rid is None:
        return None
    if (isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= 2 ** 53) or (
            isinstance(rid, str) and 0 < len(rid) <= 64):
        return rid
    raise ProtocolError("BAD_HEADER", "id must be an integer in 0..2**53 or a string of 1..64 characters")
