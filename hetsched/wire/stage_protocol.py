"""What travels between the coordinator and stage workers (the internal data path).

A data message is a multipart ZeroMQ message::

    [header, tensor_0, tensor_1, ...]

``header`` is a packed little-endian struct (cheap to build and parse in Python; no pickle)::

    magic "HS" | version u8 | kind u8 | n_tensors u8 | n_hops u8 | reserved u16 | frame_id u64 | t_submit f64
    then per tensor:  dtype code u8 | ndim u8 | dims u32 x ndim
    then per hop:     stage u8 | replica u8 | reserved u16 | t_recv f64 | t_start f64 | t_end f64

Each ``tensor_i`` frame is the raw C-contiguous bytes of the tensor, sent without copying
(pyzmq ``copy=False``) and viewed on receipt with ``numpy.frombuffer``. Every stage appends one
hop record, so the coordinator gets a per-frame trace at no extra message cost. Times are
``time.monotonic()`` seconds (CLOCK_MONOTONIC, comparable across processes on one host).

Control messages (handshake, stats, commands) are JSON on a separate DEALER/ROUTER socket.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hetsched.errors import ProtocolError, ShapeMismatch
from hetsched.wire.dtypes import WIRE_CODES, WIRE_DTYPES

MAGIC = b"HS"
VERSION = 1
KIND_DATA = 1
KIND_ERROR = 2
KIND_SHM = 3  # the one payload frame is a JSON reference to a shared-memory slot (see hetsched/wire/shm.py)

_FIXED = struct.Struct("<2sBBBBHQd")
_HOP = struct.Struct("<BBHddd")
_TDESC = struct.Struct("<BB")

DTYPE_CODES, CODE_DTYPES = WIRE_CODES, WIRE_DTYPES
MAX_DIMS = 8


@dataclass(frozen=True)
class Hop:
    stage: int
    replica: int
    t_recv: float
    t_start: float
    t_end: float


@dataclass(frozen=True)
class Header:
    frame_id: int
    t_submit: float
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) per tensor frame
    hops: tuple[Hop, ...] = ()
    kind: int = KIND_DATA


def encode_header(frame_id: int, t_submit: float, arrays: Sequence[np.ndarray],
                  hops: Sequence[Hop] = (), kind: int = KIND_DATA) -> bytes:
    return encode_header_desc(frame_id, t_submit, [(a.dtype.name, a.shape) for a in arrays], hops, kind)


def encode_header_desc(frame_id: int, t_submit: float, tensors: Sequence[tuple[str, tuple[int, ...]]],
                       hops: Sequence[Hop] = (), kind: int = KIND_DATA) -> bytes:
    parts = [_FIXED.pack(MAGIC, VERSION, kind, len(tensors), len(hops), 0, frame_id, t_submit)]
    for dtype, shape in tensors:
        code = DTYPE_CODES.get(dtype)
        if code is None:
            raise ProtocolError("BAD_DTYPE", f"dtype {dtype} cannot be sent")
        parts.append(_TDESC.pack(code, len(shape)))
        parts.append(struct.pack(f"<{len(shape)}I", *shape))
    for h in hops:
        parts.append(_HOP.pack(h.stage, h.replica, 0, h.t_recv, h.t_start, h.t_end))
    return b"".join(parts)


def decode_header(buf: bytes | memoryview) -> Header:
    buf = memoryview(buf)
    if len(buf) < _FIXED.size:
        raise ProtocolError("BAD_HEADER", f"header too short ({len(buf)} bytes)")
    magic, version, kind, n_t, n_h, _, frame_id, t_submit = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError("BAD_HEADER", "bad magic")
    if version != VERSION:
        raise ProtocolError("BAD_VERSION", f"stage protocol version {version}, expected {VERSION}")
    off = _FIXED.size
    tensors = []
    try:
        for _ in range(n_t):
            code, ndim = _TDESC.unpack_from(buf, off)
            off += _TDESC.size
            if code not in CODE_DTYPES or ndim > MAX_DIMS:
                raise ProtocolError("BAD_HEADER", f"bad tensor descriptor (dtype code {code}, ndim {ndim})")
            shape = struct.unpack_from(f"<{ndim}I", buf, off)
            off += 4 * ndim
            tensors.append((CODE_DTYPES[code], tuple(shape)))
        hops = []
        for _ in range(n_h):
            stage, replica, _r, a, b, c = _HOP.unpack_from(buf, off)
            off += _HOP.size
            hops.append(Hop(stage, replica, a, b, c))
    except struct.error as exc:
        raise ProtocolError("BAD_HEADER", f"truncated header: {exc}") from None
    if off != len(buf):
        raise ProtocolError("BAD_HEADER", f"header has {len(buf) - off} trailing bytes")
    return Header(frame_id, t_submit, tuple(tensors), tuple(hops), kind)


def views(header: Header, frames: Sequence[Any], expected: Sequence[tuple[str, tuple[int, ...]]] | None = None
          ) -> list[np.ndarray]:
    """numpy views (no copy) of the tensor frames; check them against ``expected`` (dtype, shape)."""
    if len(frames) != len(header.tensors):
        raise ProtocolError("BAD_FRAMES", f"{len(frames)} tensor frames, header says {len(header.tensors)}")
    if expected is not None and tuple(header.tensors) != tuple(expected):
        raise ShapeMismatch(f"got {list(header.tensors)}, plan expects {list(expected)}")
    out = []
    for (dtype, shape), frame in zip(header.tensors, frames):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        nbytes = memoryview(buf).nbytes
        if nbytes != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ShapeMismatch(f"frame of {nbytes} bytes does not hold {dtype}{list(shape)}")
        out.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return out


def control(msg_type: str, **fields: Any) -> bytes:
    return json.dumps({"type": msg_type, **fields}, separators=(",", ":")).encode()


def parse_control(raw: bytes) -> dict:
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("BAD_CONTROL", f"control message is not JSON: {exc}") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError("BAD_CONTROL", "control message without type")
    return msg
