"""What travels between the coordinator and stage workers (the internal data path).

The coordinator dispatches every frame to every stage itself (a star: it picks the worker that
will finish the frame first, see ``hetsched.runtime.dispatch``). On one host activations never go
through a socket: they live in shared-memory rings (``hetsched.wire.rings``), one per stage
boundary, and a message names only the frame's slot. All headers are packed little-endian structs;
nothing on the data path is JSON.

Work message, coordinator -> worker (ZeroMQ PUSH -> the worker's PULL)::

    frame 0: magic "H2" | kind u8 | flags u8 | attempt u16 | slot u16 | frame_id u64 | t_submit f64
             | region u32 | region_slot u32 | pixels u8 | color u8 | width u32 | height u32
    kind RING   : the stage's inputs are in the input ring at ``slot``
    kind REGION : stage 0's input is in a client's shared-memory region ``region`` at ``region_slot``
                  (a model input tensor, or raw camera pixels when ``pixels`` != 0)
    kind BYTES  : frame 1 holds an encoded image (JPEG/PNG) for stage 0 to decode
    kind PIXELS : frame 1 holds raw camera pixels (``pixels``: 1 rgb24, 2 bgr24, 3 nv12, 4 nv21;
                  ``color``: 0 none, 1 bt601, 2 bt709, 3 full; ``width`` x ``height``)
    kind TENSORS: frames 1.. hold the input tensors (tcp:// links; described by the stage's spec)

Done message, worker -> coordinator (PUSH -> the coordinator's PULL)::

    frame 0: magic "H2" | kind u8 (DONE / FAILED) | stage u8 | attempt u16 | slot u16 | worker u16
             | code u16 | n_top u16 | frame_id u64 | t_recv f64 | t_start f64 | t_end f64
             then n_top x (index u32 | score f32)            (last stage: top-k of the chosen output)
    DONE on tcp://: frames 1.. hold the stage's output tensors.
    FAILED: frame 1 is the error text (UTF-8); ``code`` indexes ``ERROR_CODES``.

Times are ``time.monotonic()`` seconds (comparable across processes on one host). Control messages
(handshake, heartbeats with statistics, region registration, stop) are JSON on a separate
DEALER/ROUTER socket: they are not per frame.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

import numpy as np

from hetsched.errors import ProtocolError

MAGIC = b"H2"
KIND_RING, KIND_REGION, KIND_BYTES, KIND_TENSORS, KIND_PIXELS = 1, 2, 3, 4, 5
PIXEL_CODES = {None: 0, "rgb24": 1, "bgr24": 2, "nv12": 3, "nv21": 4}
COLOR_CODES = {None: 0, "bt601": 1, "bt709": 2, "full": 3}
PIXEL_NAMES = {v: k for k, v in PIXEL_CODES.items()}
COLOR_NAMES = {v: k for k, v in COLOR_CODES.items()}
KIND_DONE, KIND_FAILED = 16, 17
FLAG_WANT_OUTPUTS = 1

# codes a stage may report for a frame it could not process (index = wire code)
ERROR_CODES = ("STAGE_FAILED", "BAD_IMAGE", "IMAGE_TOO_SMALL", "IMAGE_TOO_LARGE", "TOO_LARGE", "BAD_SHM",
               "BAD_SLOT", "SHAPE_MISMATCH", "BAD_FRAMES", "SIZE_MISMATCH", "BAD_ENCODING")
_CODE_INDEX = {c: i for i, c in enumerate(ERROR_CODES)}

WORK = struct.Struct("<2sBBHHQdIIBBII")
DONE = struct.Struct("<2sBBHHHHHQddd")
TOP = np.dtype([("index", "<u4"), ("score", "<f4")])


class Work(NamedTuple):  # (a tuple: built for every frame on both sides, cheaper than a frozen dataclass)
    kind: int
    flags: int
    attempt: int
    slot: int
    frame_id: int
    t_submit: float
    region: int = 0
    region_slot: int = 0
    pixels: str | None = None
    color: str | None = None
    width: int = 0
    height: int = 0


class Done(NamedTuple):
    kind: int
    stage: int
    attempt: int
    slot: int
    worker: int
    code: str | None
    frame_id: int
    t_recv: float
    t_start: float
    t_end: float
    top: tuple  # flat (index, score, index, score, ...), possibly empty


def pack_work(kind: int, frame_id: int, attempt: int, slot: int, t_submit: float, flags: int = 0,
              region: int = 0, region_slot: int = 0, pixels: tuple | None = None) -> bytes:
    """``pixels``: (encoding, width, height, color) of a raw camera frame."""
    pix = col = w = h = 0
    if pixels is not None:
        pix, col, w, h = PIXEL_CODES[pixels[0]], COLOR_CODES[pixels[3]], pixels[1], pixels[2]
    return WORK.pack(MAGIC, kind, flags, attempt, slot, frame_id, t_submit, region, region_slot, pix, col, w, h)


def unpack_work(buf: Any) -> Work:
    if len(buf) != WORK.size:
        raise ProtocolError("BAD_HEADER", f"work header of {len(buf)} bytes, expected {WORK.size}")
    magic, kind, flags, attempt, slot, fid, t_submit, region, rslot, pix, col, w, h = WORK.unpack(buf)
    if magic != MAGIC or kind not in (KIND_RING, KIND_REGION, KIND_BYTES, KIND_TENSORS, KIND_PIXELS) \
            or pix not in PIXEL_NAMES or col not in COLOR_NAMES or (kind == KIND_PIXELS and not pix):
        raise ProtocolError("BAD_HEADER", f"not a work header (magic {magic!r}, kind {kind})")
    return Work(kind, flags, attempt, slot, fid, t_submit, region, rslot, PIXEL_NAMES[pix], COLOR_NAMES[col], w, h)


def pack_done(stage: int, worker: int, frame_id: int, attempt: int, slot: int, t_recv: float, t_start: float,
              t_end: float, top: np.ndarray | None = None) -> bytes:
    n_top = 0 if top is None else len(top)
    head = DONE.pack(MAGIC, KIND_DONE, stage, attempt, slot, worker, 0, n_top, frame_id, t_recv, t_start, t_end)
    return head if not n_top else head + top.astype(TOP, copy=False).tobytes()


def pack_failed(stage: int, worker: int, frame_id: int, attempt: int, slot: int, code: str, t_recv: float,
                t_end: float) -> bytes:
    return DONE.pack(MAGIC, KIND_FAILED, stage, attempt, slot, worker, _CODE_INDEX.get(code, 0), 0, frame_id,
                     t_recv, t_recv, t_end)


def unpack_done(buf: Any) -> Done:
    n = len(buf)
    if n < DONE.size:
        raise ProtocolError("BAD_HEADER", f"done header of {n} bytes, shorter than {DONE.size}")
    magic, kind, stage, attempt, slot, worker, code, n_top, fid, t_recv, t_start, t_end = DONE.unpack_from(buf, 0)
    if magic != MAGIC or kind not in (KIND_DONE, KIND_FAILED) or n != DONE.size + n_top * TOP.itemsize:
        raise ProtocolError("BAD_HEADER", f"not a done header (magic {magic!r}, kind {kind}, {n} bytes)")
    top = struct.unpack_from("<" + "If" * n_top, buf, DONE.size) if n_top else ()  # no numpy on this path
    err = ERROR_CODES[code] if kind == KIND_FAILED and code < len(ERROR_CODES) else (
        "STAGE_FAILED" if kind == KIND_FAILED else None)
    return Done(kind, stage, attempt, slot, worker, err, fid, t_recv, t_start, t_end, top)


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
