"""Python client for a running hetsched service (protocol in docs/protocol.md).

    with Client("tcp://127.0.0.1:5555") as c:
        c.submit(open("cat.jpg", "rb").read(), stream="cam0")
        c.submit(np_array_float32, stream="cam0")          # raw tensor of the model's input shape
        c.submit(rgb_hwc_uint8, stream="cam0", encoding="rgb24")          # raw camera pixels
        c.submit(nv12_bytes, stream="cam1", encoding="nv12", width=1280, height=720)
        for reply in c.replies(expect=2):
            print(reply["seq"], reply["top_k"][0])

A service with CURVE keys (docs/security.md) needs the server's public key and this client's
secret key file:

    Client("tcp://10.0.0.5:5555", server_public_key="keys/server.key",
           client_secret_key_file="keys/client.key_secret")
"""

from __future__ import annotations

import dataclasses
import itertools
import select
import time
from typing import Any, Iterator

import numpy as np
import zmq

from hetsched.errors import HetschedError
from hetsched.model.pixels import PIXEL_ENCODINGS, YUV_ENCODINGS, payload_size
from hetsched.wire import client_protocol as cp
from hetsched.wire.security import SecuritySettings, apply_client

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _pixel_payload(data: Any, encoding: str, width: int | None, height: int | None,
                   color: str | None) -> tuple[np.ndarray, dict]:
    """(contiguous uint8 array of the frame's bytes, header fields) of a raw pixel frame."""
    arr = data if isinstance(data, np.ndarray) else np.frombuffer(memoryview(data).cast("B"), np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"{encoding} pixels must be uint8, got {arr.dtype}")
    if encoding in YUV_ENCODINGS:
        if width is None and height is None and arr.ndim == 2 and arr.shape[0] % 3 == 0:
            height, width = arr.shape[0] * 2 // 3, arr.shape[1]  # PyAV's [H*3/2, W] nv12 array
        if width is None or height is None:
            raise ValueError(f"{encoding} needs width and height (or a [H*3/2, W] array)")
    else:
        if color is not None:
            raise ValueError(f"color applies to nv12/nv21 only, not {encoding}")
        if arr.ndim == 3:
            if arr.shape[2] != 3 or (width, height) not in ((None, None), (arr.shape[1], arr.shape[0])):
                raise ValueError(f"{encoding} needs a [H, W, 3] array (matching width and height if given), got "
                                 f"shape {arr.shape}")
            height, width = arr.shape[:2]
        elif width is None or height is None:
            raise ValueError(f"{encoding} needs a [H, W, 3] array (or width and height), got shape {arr.shape}")
    if arr.nbytes != payload_size(encoding, width, height):
        raise ValueError(f"{encoding} {width}x{height} is {payload_size(encoding, width, height)} bytes, "
                         f"got {arr.nbytes}")
    fields: dict = {"width": width, "height": height}
    if color is not None:
        fields["color"] = color
    return np.ascontiguousarray(arr), fields


def _poll(poller: zmq.Poller, seconds: float) -> list:
    """``poller.poll`` for up to ``seconds``, to the microsecond and without spinning. ZeroMQ waits
    in whole milliseconds: the wait truncated (0.4 ms -> 0) returned at once and a paced client
    waiting out the gap between two frames spun a core (at 130 frames/s 0.99 ms of CPU per frame,
    taken from the model); rounded up, it would send frames up to a millisecond late. So the whole
    milliseconds wait in ZeroMQ and the rest in select() on the sockets' ZMQ_FD (readable when a
    socket has news; ZeroMQ's own poll, which runs first, leaves it unsignalled)."""
    if seconds <= 0:
        return poller.poll(0)
    deadline = time.monotonic() + seconds
    events = poller.poll(int(seconds * 1000))
    if events:
        return events
    left = deadline - time.monotonic()
    if left > 0:
        select.select([s.FD for s, _ in poller.sockets], [], [], left)
        events = poller.poll(0)
    return events


class Client:
    def __init__(self, endpoint: str, *, timeout: float = 30.0, context: zmq.Context | None = None,
                 identity: bytes | None = None, security: SecuritySettings | None = None,
                 server_public_key: str | None = None, client_secret_key_file: str | None = None):
        """``server_public_key`` (the server's ``server.key`` file or its Z85 key) and
        ``client_secret_key_file`` (this client's ``NAME.key_secret``) make the connection CURVE;
        so does a ``security`` with both set. Raises ConfigError for bad or missing key files."""
        if server_public_key is not None or client_secret_key_file is not None:
            security = dataclasses.replace(security or SecuritySettings(),
                                           server_public_key=server_public_key,
                                           client_secret_key=client_secret_key_file)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self.sock = self._mon = None
        try:
            self.sock = self._ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.SNDHWM, 1000)
            self.sock.setsockopt(zmq.RCVHWM, 1000)
            if identity:
                self.sock.setsockopt(zmq.IDENTITY, identity)
            self.curve = apply_client(self.sock, security)
            # failed handshakes explain a silent server (refused key, missing keys, wrong server key)
            self._mon = self.sock.get_monitor_socket(_HANDSHAKE_FAILED)
            self.sock.connect(endpoint)
            self._poller = zmq.Poller()
            self._poller.register(self.sock, zmq.POLLIN)
        except BaseException:
            self.close()
            raise
        self.endpoint, self.timeout = endpoint, timeout
        self._seqs: dict[str, itertools.count] = {}
        self._region = None            # shared-memory input slots (enable_shm)
        self._shm_id: int | None = None
        self._free_slots: list[int] = []
        self._slot_of: dict[tuple[str, int], int] = {}
        self._slot_views: dict[tuple, np.ndarray] = {}
        self._side: list[dict] = []  # non-frame replies seen while waiting for frame replies
        self._handshake_error: str | None = None
        self._lane = None             # the direct lane to the workers (hetsched.client.lane), if granted
        self._ready: list[dict] = []  # lane: replies due to the caller, in stream order
        self._fields: dict[tuple, dict] = {}  # (dtype, shape) -> the header fields of such a tensor

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._lane is not None:
            try:
                self._lane.report(time.monotonic(), force=True)
            except zmq.ZMQError:
                pass
            self._lane.close()
            self._lane = None
        if self._mon is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._mon.close(linger=0)
            self._mon = None
        if self.sock is not None:
            self.sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()
            self._own_ctx = False
        if self._region is not None:
            self._slot_views.clear()
            self._region.close()
            self._region = None

    def handshake_error(self) -> str | None:
        """Why the server refused this connection's security handshake, if it did (else None)."""
        from zmq.utils.monitor import recv_monitor_message
        while self._mon is not None:
            try:
                ev = recv_monitor_message(self._mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            event, value = int(ev["event"]), int(ev["value"])
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._handshake_error = (f"the server refused this client's CURVE key (ZAP status {value}): "
                                         "its public key is not in the server's authorized_clients")
            elif event & _HANDSHAKE_FAILED:
                if value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", None):
                    self._handshake_error = ("security mismatch: the server requires CURVE keys (give "
                                             "--server-key and --client-key)" if not self.curve else
                                             "security mismatch: this client uses CURVE, the server does not")
                elif value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", None) or (
                        self.curve and event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                    # the server cannot decrypt our HELLO and drops the connection
                    self._handshake_error = ("the server dropped the CURVE handshake: the server public key "
                                             "given (--server-key) is probably not this server's")
                else:
                    self._handshake_error = f"security handshake failed (code {value:#x})"
        return self._handshake_error

    def _no_reply(self, what: str) -> HetschedError:
        why = self.handshake_error()
        return HetschedError(f"{what} from {self.endpoint}" + (f": {why}" if why else ""))

    # ------------------------------------------------------------------ requests
    def enable_shm(self, slots: int = 16, slot_bytes: int | None = None, lane: bool = True) -> bool:
        """Use shared-memory input slots (services on ipc:// only): tensors and raw pixel frames are
        written into a /dev/shm region the service maps, and only a small header crosses the socket.
        ``slot_bytes`` defaults to one model input; give at least the largest pixel frame you will
        send (``hetsched.model.pixels.payload_size``: 1382400 for a 1280x720 nv12 frame). Frames
        larger than a slot still go over the socket. Returns False (and keeps sending over the
        socket) when the service does not offer it. ``lane``: also ask for the direct lane (frames
        straight to the workers, the coordinator off the per-frame path; ``hetsched.client.lane``)."""
        from hetsched.wire.shm import create_region
        if slot_bytes is None:
            inp = self.hello()["input"]
            slot_bytes = int(np.prod(inp["shape"])) * np.dtype(inp["dtype"]).itemsize
        region = create_region(slots, slot_bytes)
        try:
            rep = self._request({"type": "shm_register", "name": region.name, "slots": slots,
                                 "slot_bytes": slot_bytes}, "shm_registered", errors_ok=True)
        except HetschedError:
            region.close()
            raise
        if rep.get("type") != "shm_registered":
            region.close()
            return False
        if self._region is not None:  # a second call replaces the first region
            self._slot_views.clear()
            self._region.close()
        self._region, self._shm_id = region, rep["shm"]
        self._free_slots = list(range(slots))
        if lane:
            self.open_lane()
        return True

    def open_lane(self) -> bool:
        """Ask for the direct lane (needs :meth:`enable_shm` first; ipc:// services only). True when
        frames now go straight to the workers; with a lane granted but not usable now (a plan of
        several stages, say) frames go through the service until it is, without asking again."""
        from hetsched.client.lane import Lane
        if self._shm_id is None:
            return False
        rep = self._request({"type": "lane_open", "shm": self._shm_id}, "lane", errors_ok=True)
        if rep.get("type") != "lane":
            return False
        if self._lane is not None:
            self._lane.close()
        self._lane = Lane(rep, self._ctx, self.sock, self._region.slot_bytes)
        self._lane.pump(self._send_book_frame)
        return self._lane.direct

    def lane_status(self) -> dict | None:
        """The direct lane as this client sees it (None: not asked for or not offered)."""
        if self._lane is None:
            return None
        b = self._lane.book
        return {"direct": self._lane.direct, "why": self._lane.why, "generation": self._lane.generation,
                "unanswered": b.unanswered, "replays": b.replays, "duplicates": b.duplicates}

    def submit(self, data: np.ndarray | bytes | memoryview, stream: str = "default", seq: int | None = None,
               encoding: str | None = None, want_outputs: bool = False, *, width: int | None = None,
               height: int | None = None, color: str | None = None) -> int:
        """Send one frame; returns its seq.

        * a numpy tensor of the model input's dtype and shape (``encoding`` None: raw);
        * encoded JPEG/PNG bytes (``encoding`` None/"image", "jpeg" or "png");
        * raw pixels (docs/protocol.md, "Raw pixel frames"): ``encoding="rgb24"`` or ``"bgr24"`` with a
          uint8 [H, W, 3] array; ``encoding="nv12"`` or ``"nv21"`` with ``width``, ``height`` and the
          W*H*3/2 bytes (bytes, memoryview or a uint8 array; a [H*3/2, W] array, as PyAV's
          ``to_ndarray(format="nv12")`` gives, needs no ``width``/``height``), ``color`` "bt601"
          (default), "bt709" or "full".

        With :meth:`enable_shm`, tensors and pixel frames that fit a slot go through shared memory.
        Raises ValueError for pixels that do not match their encoding and size.
        """
        if seq is None:
            seq = next(self._seqs.setdefault(stream, itertools.count()))
        request = self._request_for(data, encoding, width, height, color)
        if request[1] is not None:
            self._slot_of[(stream, seq)] = request[1]
        if self._lane is None:
            self._send_front(stream, seq, request, want_outputs)
            return seq
        # on the lane every frame goes into its book (so replies keep per-stream order whichever way
        # each frame went): region frames and encoded images to the workers, the rest through the service
        lane = self._lane
        f = lane.book.add(stream, seq, request, want_outputs, time.monotonic())
        if request[0] != "encoded" and request[1] is None:  # no slot: it can only go through the service
            lane.book.queued.remove(f.token)
            lane.book.on_sent(f.token, None, None)
            self._send_front(stream, seq, request, want_outputs)
        lane.pump(self._send_book_frame)
        return seq

    # ------------------------------------------------------------------ frames
    def _slot_for(self, arr: np.ndarray) -> int | None:
        """A free slot holding a copy of ``arr`` (None: none free, or it does not fit)."""
        if not self._free_slots or arr.nbytes > self._region.slot_bytes:
            return None
        slot = self._free_slots.pop()
        key = (slot, arr.dtype, arr.shape)  # (numpy computes dtype.name anew on every call: not here)
        view = self._slot_views.get(key)
        if view is None:
            view = self._slot_views[key] = self._region.view(slot, arr.dtype.name, arr.shape)
        np.copyto(view, arr)
        return slot

    def _tensor_fields(self, arr: np.ndarray) -> dict:
        key = (arr.dtype, arr.shape)
        fields = self._fields.get(key)
        if fields is None:
            fields = self._fields[key] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
        return fields

    def _request_for(self, data: Any, encoding: str | None, width: int | None, height: int | None,
                     color: str | None) -> tuple:
        """(kind, slot, header fields, payload) of a frame: tensors and pixel frames that fit a free
        slot are copied into it (payload None), the rest travel in the message."""
        if encoding in PIXEL_ENCODINGS:
            pix, fields = _pixel_payload(data, encoding, width, height, color)
            slot = self._slot_for(pix)
            return "pixels", slot, {"pixels": encoding, **fields}, None if slot is not None else pix
        if width is not None or height is not None or color is not None:
            raise ValueError("width, height and color go with a pixel encoding "
                             f"({', '.join(PIXEL_ENCODINGS)}), not encoding {encoding!r}")
        if isinstance(data, np.ndarray):
            slot = self._slot_for(data)
            return "tensor", slot, self._tensor_fields(data), None if slot is not None else np.ascontiguousarray(data)
        return "encoded", None, {"encoding": encoding or "image"}, data

    def _send_front(self, stream: str, seq: int, request: tuple, want_outputs: bool) -> None:
        """A frame through the service's socket (docs/protocol.md ``submit``)."""
        kind, slot, fields, payload = request
        head: dict = {"type": "submit", "stream": stream, "seq": seq}
        if want_outputs:
            head["outputs"] = True
        if slot is not None:
            head.update(encoding="shm", shm=self._shm_id, slot=slot, **fields)
            self.sock.send(cp.encode(head))
            return
        if kind == "pixels":
            head.update(encoding=fields["pixels"], **{k: v for k, v in fields.items() if k != "pixels"})
        elif kind == "tensor":
            head.update(encoding="raw", **fields)
        else:
            head.update(encoding=fields["encoding"])
        self.sock.send_multipart([cp.encode(head), payload], copy=False)

    def _send_book_frame(self, f: Any) -> None:
        """A lane-book frame through the service (no lane now)."""
        self._send_front(f.stream, f.seq, f.request, f.want_outputs)

    def _recv_lane(self, timeout: float) -> dict | None:
        lane = self._lane
        deadline = time.monotonic() + timeout
        while not self._ready:
            left = deadline - time.monotonic()
            events = dict(_poll(lane.poller, left))
            for sock in events:
                if sock is self.sock:
                    msg = self._recv_front()
                    if msg.get("type") == "lane":
                        for f, why in lane.update(msg):
                            self._ready += lane.book.answer(f.token, {"type": "error", "code": "STAGE_FAILED",
                                                                      "message": why, "stream": f.stream, "seq": f.seq})
                        continue
                    token = lane.book.front_token(msg.get("stream"), msg.get("seq")) \
                        if msg.get("type") in ("result", "error") else None
                    if token is None:
                        self._ready.append(msg)
                    else:
                        self._ready += lane.book.answer(token, msg)
                elif sock in lane.sock_key:
                    self._ready += lane.on_worker_reply(sock)
            lane.pump(self._send_book_frame)
            lane.report(time.monotonic())
            if not events and time.monotonic() >= deadline:
                return None
        return self._deliver(self._ready.pop(0))

    def send_raw(self, parts: list) -> None:
        """Send arbitrary frames (for tests of hostile input)."""
        self.sock.send_multipart(parts)

    def _request(self, msg: dict, reply_type: str, errors_ok: bool = False) -> dict:
        if self._lane is not None:  # what the lane did so far first: stats and trace then count it
            self._lane.report(time.monotonic(), force=True)
        self.sock.send_multipart([cp.encode(msg)])
        deadline = time.monotonic() + self.timeout
        while True:
            rep = self.recv(max(0.0, deadline - time.monotonic()))
            if rep is None:
                raise self._no_reply(f"no {reply_type} reply within {self.timeout:.0f} s")
            if rep.get("type") == reply_type or (errors_ok and rep.get("type") == "error" and "seq" not in rep):
                return rep
            self._side.append(rep)

    def hello(self) -> dict:
        return self._request({"type": "hello"}, "hello")

    def stats(self) -> dict:
        return self._request({"type": "stats"}, "stats")

    def trace(self, limit: int = 1000) -> dict:
        return self._request({"type": "trace", "limit": limit}, "trace")

    def query(self, stream: str) -> dict:
        return self._request({"type": "query", "stream": stream}, "query")

    # ------------------------------------------------------------------ replies
    def recv(self, timeout: float | None = None) -> dict | None:
        """Next reply (result, error, ...) or None after ``timeout`` seconds."""
        if self._side:
            return self._side.pop(0)
        t = self.timeout if timeout is None else timeout
        if self._lane is not None:
            return self._recv_lane(t)
        if not _poll(self._poller, t):
            return None
        return self._deliver(self._recv_front())

    def _recv_front(self) -> dict:
        first = self.sock.recv(copy=False)
        parts = [first] if not first.more else [first, *self.sock.recv_multipart(copy=False)]
        msg = cp.loads(first.bytes)
        if msg.get("type") == "result" and "outputs" in msg:
            msg["arrays"] = [np.frombuffer(f.buffer, dtype=o["dtype"]).reshape(o["shape"])
                             for o, f in zip(msg["outputs"], parts[1:])]
        return msg

    def _deliver(self, msg: dict) -> dict:
        if self._slot_of and msg.get("type") in ("result", "error"):  # its shared-memory slot is free again
            slot = self._slot_of.pop((msg.get("stream"), msg.get("seq")), None)
            if slot is not None:
                self._free_slots.append(slot)
        return msg

    def replies(self, expect: int, timeout: float | None = None) -> Iterator[dict]:
        """Yield ``expect`` frame replies (results or errors); raise if one takes longer than timeout."""
        got = 0
        held: list[dict] = []  # other replies (hello, stats, ...) are kept for later callers
        try:
            while got < expect:
                rep = self.recv(timeout)
                if rep is None:
                    raise self._no_reply(f"timed out waiting for reply {got + 1} of {expect}")
                if rep.get("type") in ("result", "error"):
                    got += 1
                    yield rep
                else:
                    held.append(rep)
        finally:
            self._side.extend(held)
