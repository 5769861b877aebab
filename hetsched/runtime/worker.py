"""A stage worker process: one worker of one stage's pool, pinned to its cores.

Started by the coordinator with the ``spawn`` start method and a :class:`WorkerSpec`. In order: die
with the parent (PR_SET_PDEATHSIG), pin to the worker's cores, *then* create the zmq context and the
onnxruntime session (every thread they start inherits the affinity), map the shared-memory rings and
bind one IOBinding per ring slot (inputs read in place from the input ring, outputs written by
onnxruntime straight into the output ring), bind the work socket, report READY, wait for GO, then
serve: a work message names a frame's slot; the worker runs the sub-model on that slot and sends a
small done header (the last stage adds the top-k). Per frame: two small messages, no JSON, no
tensor copies, no allocations beyond onnxruntime's own.

Every ``stats_interval`` seconds the worker sends STATS (frames, wait/compute/send seconds, recent
compute samples) on the control socket; this is also its heartbeat.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

from hetsched.runtime.spec import WorkerSpec

# Nothing heavy at module level: a spawned worker imports this module (and its spec's) before it pins
# itself, and threads started by an import (numpy's BLAS pool) would keep the unpinned CPU set.


class StageRunner:
    """The session and its bindings: everything one frame needs, prepared once."""

    def __init__(self, spec: WorkerSpec):
        import numpy as np
        self.np = np
        from hetsched.host.ort import create_session
        from hetsched.wire.rings import attach_ring
        self.spec = spec
        self.sess = create_session(spec.model_path, spec.threads, spinning=spec.spinning)
        from hetsched.model.topk import TOPK_INDICES, TOPK_SCORES
        from hetsched.wire.stage_protocol import TOP
        self.in_names = [i.name for i in self.sess.get_inputs()]
        names = [o.name for o in self.sess.get_outputs()]
        self.out_names = [n for n in names if n not in (TOPK_INDICES, TOPK_SCORES)]
        # the last stage's session computes the top-k itself (hetsched.model.topk.with_topk)
        self.topk_names = [n for n in (TOPK_INDICES, TOPK_SCORES) if n in names]
        slots = spec.in_ring.slots if spec.in_ring is not None else 1
        if spec.direct_endpoint is not None:
            slots += 1  # the direct lane's frames: outputs in the worker's own buffers (one frame at a time)
        k = spec.topk.k if spec.topk is not None else 0
        self.top_idx = [np.empty((1, k), np.int64) for _ in range(slots)] if self.topk_names else []
        self.top_sc = [np.empty((1, k), np.float32) for _ in range(slots)] if self.topk_names else []
        self.top_rec = [np.empty(k, TOP) for _ in range(slots)] if self.topk_names else []
        in_pos = {t[0]: i for i, t in enumerate(spec.inputs)}
        out_pos = {t[0]: i for i, t in enumerate(spec.outputs)}
        self.in_idx = [in_pos[n] for n in self.in_names]
        self.out_idx = [out_pos[n] for n in self.out_names]
        self.pass_idx = [(in_pos[n], out_pos[n]) for n in spec.passthrough]
        self.in_ring = self.out_ring = None
        self.bindings: list = []
        self.ext_bindings: list = []
        self.ext_outs: list = []
        self.direct_slot = -1
        if spec.in_ring is not None:
            self.in_ring = attach_ring(spec.in_ring, writable=False)
            self.out_ring = attach_ring(spec.out_ring, writable=True)
            for s in range(spec.in_ring.slots):
                self.bindings.append(self._binding(self.in_ring.views(s), self.out_ring.views(s)))
                if spec.stage == 0:  # inputs from a client's region or a decoded image: rebound per frame
                    self.ext_bindings.append(self._binding(None, self.out_ring.views(s)))
                    self.ext_outs.append(self.out_ring.views(s))
            if spec.direct_endpoint is not None and spec.stage == 0:
                own = [np.empty(shape, dtype) for _, dtype, shape in spec.outputs]
                self.direct_slot = len(self.ext_bindings)
                self.ext_bindings.append(self._binding(None, own))
                self.ext_outs.append(own)

    def _binding(self, ins, outs):
        b = self.sess.io_binding()
        if ins is not None:
            for name, i in zip(self.in_names, self.in_idx):
                a = ins[i]
                b.bind_input(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        if outs is not None:
            for name, i in zip(self.out_names, self.out_idx):
                a = outs[i]
                b.bind_output(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
            if self.topk_names:
                slot = len(self.ext_bindings if ins is None else self.bindings)
                for name, a in zip(self.topk_names, (self.top_idx[slot], self.top_sc[slot])):
                    b.bind_output(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        return b

    def top(self, slot: int, outs: list):
        """The last stage's top-k of this slot's frame (structured index/score), as the session computed
        it; the numpy top-k only when the session has none or gave NaN scores."""
        spec = self.spec.topk
        if self.topk_names:
            sc = self.top_sc[slot][0]
            if sc[0] == sc[0]:  # not NaN (a NaN output would rank first in TopK)
                rec = self.top_rec[slot]
                rec["index"] = self.top_idx[slot][0]
                rec["score"] = sc
                return rec
        from hetsched.model.topk import topk_scores
        from hetsched.wire.stage_protocol import TOP
        idx, scores = topk_scores(outs[spec.output], spec.k, spec.apply_softmax)
        rec = self.np.empty(len(idx), TOP)
        rec["index"], rec["score"] = idx, scores
        return rec

    def session_info(self) -> dict:
        return {"inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in self.sess.get_inputs()],
                "outputs": [{"name": o.name, "shape": o.shape, "type": o.type} for o in self.sess.get_outputs()
                            if o.name in self.out_names]}

    def run_slot(self, slot: int) -> list:
        """Inputs in ring slot ``slot`` -> outputs in the output ring's slot (returned as views)."""
        self.sess.run_with_iobinding(self.bindings[slot])
        outs = self.out_ring.views(slot)
        if self.pass_idx:
            ins = self.in_ring.views(slot)
            for i, o in self.pass_idx:
                self.np.copyto(outs[o], ins[i])
        return outs

    def run_external(self, slot: int, x) -> list:
        """Stage 0 with its one input given as an array (a client's region view or a decoded image)."""
        b = self.ext_bindings[slot]
        b.bind_input(self.in_names[0], "cpu", 0, x.dtype, x.shape, x.ctypes.data)
        self.sess.run_with_iobinding(b)
        return self.ext_outs[slot]

    def run_arrays(self, arrays: list) -> list:
        """tcp:// path: inputs as arrays in boundary order -> outputs in boundary order (new arrays)."""
        feed = {n: arrays[i] for n, i in zip(self.in_names, self.in_idx)}
        res = self.sess.run(self.out_names + self.topk_names, feed)
        if self.topk_names:
            self.top_idx[0][...], self.top_sc[0][...] = res[-2], res[-1]
            res = res[:-2]
        outs: list = [None] * len(self.spec.outputs)
        for r, i in zip(res, self.out_idx):
            outs[i] = r
        for i, o in self.pass_idx:
            outs[o] = arrays[i]
        return outs

    def close(self) -> None:
        self.bindings = self.ext_bindings = []
        for r in (self.in_ring, self.out_ring):
            if r is not None:
                r.close()


def _arrays_from_frames(spec: WorkerSpec, frames) -> list:
    import numpy as np

    from hetsched.errors import ProtocolError
    if len(frames) != len(spec.inputs):
        raise ProtocolError("BAD_FRAMES", f"{len(frames)} tensor frames, the stage takes {len(spec.inputs)}")
    out = []
    for (name, dtype, shape), f in zip(spec.inputs, frames):
        buf = f.buffer if hasattr(f, "buffer") else f
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if memoryview(buf).nbytes != n:
            raise ProtocolError("SHAPE_MISMATCH", f"tensor {name}: {memoryview(buf).nbytes} bytes, expected {n}")
        out.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return out


def main(spec: WorkerSpec) -> int:
    from hetsched.host.process import die_with_parent, keep_large_buffers
    if spec.orphan_timeout is None:  # else not our parent's child: the control link decides (below)
        die_with_parent(spec.parent_pid)
    keep_large_buffers()
    os.sched_setaffinity(0, spec.cores)
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s [stage {spec.stage} w{spec.worker}] %(message)s")
    log = logging.getLogger("hetsched.worker")
    stop = {"flag": False}

    def on_signal(signum, frame):  # only set a flag; the loop notices within one poll timeout
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C goes to the coordinator, which stops us

    import zmq

    from hetsched.wire.links import LinkKeys, secure_link_client, secure_link_server, start_link_authenticator
    from hetsched.wire.stage_protocol import control, parse_control

    ctx = zmq.Context(io_threads=1)
    link_keys = LinkKeys.from_dict(spec.link_keys)
    link_auth = start_link_authenticator(ctx, link_keys, f"{spec.name} input")
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.LINGER, 1000)
    ctl.setsockopt(zmq.IDENTITY, f"w{spec.worker}".encode())
    secure_link_client(ctl, link_keys)
    watch = None
    if spec.orphan_timeout is not None:
        from hetsched.runtime.liveness import LinkWatch
        watch = LinkWatch(ctl, spec.orphan_timeout, spec.name)
    ctl.connect(spec.ctl_endpoint)
    inp = out = runner = direct = None
    try:
        runner = StageRunner(spec)
        inp = ctx.socket(zmq.PULL)
        inp.setsockopt(zmq.RCVHWM, 64)
        inp.setsockopt(zmq.LINGER, 0)
        secure_link_server(inp, link_keys)
        inp.bind(spec.data_endpoint)
        endpoint = inp.getsockopt(zmq.LAST_ENDPOINT).decode()
        out = ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.SNDHWM, 10000)
        out.setsockopt(zmq.LINGER, 2000)
        secure_link_client(out, link_keys)
        out.connect(spec.results_endpoint)
        direct_endpoint = None
        if spec.direct_endpoint is not None and runner.direct_slot >= 0:
            direct = ctx.socket(zmq.ROUTER)
            direct.setsockopt(zmq.RCVHWM, 64)
            direct.setsockopt(zmq.SNDHWM, 1000)
            direct.setsockopt(zmq.LINGER, 0)
            direct.bind(spec.direct_endpoint)
            direct_endpoint = direct.getsockopt(zmq.LAST_ENDPOINT).decode()
        ctl.send(control("READY", stage=spec.stage, worker=spec.worker, pid=os.getpid(),
                         cores=sorted(os.sched_getaffinity(0)), endpoint=endpoint, direct_endpoint=direct_endpoint,
                         **runner.session_info()))
        deadline = time.monotonic() + spec.connect_timeout
        early: list[dict] = []  # control messages before GO (client regions): handled when serving starts
        while True:
            if stop["flag"] or time.monotonic() > deadline:
                log.warning("no GO from the coordinator; exiting")
                return 2
            if ctl.poll(100):
                msg = parse_control(ctl.recv())
                if msg["type"] == "GO":
                    break
                if msg["type"] == "STOP":
                    return 0
                early.append(msg)
        from hetsched.host.process import quiet_garbage_collector
        quiet_garbage_collector()
        ctl.send(control("RUNNING", stage=spec.stage, worker=spec.worker))
        return serve(spec, runner, inp, out, ctl, stop, early, direct)
    except Exception as exc:
        try:
            ctl.send(control("FAILED", stage=spec.stage, worker=spec.worker, pid=os.getpid(),
                             error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
        except Exception:
            pass
        log.error("worker failed: %s", exc)
        return 1
    finally:
        for sock in (inp, out, ctl, direct):
            if sock is not None:
                sock.close(linger=500)
        if link_auth is not None:
            link_auth.stop()
        if watch is not None:
            watch.close()
        ctx.term()
        if runner is not None:
            runner.close()


def serve(spec: WorkerSpec, runner: StageRunner, inp, out, ctl, stop: dict, early: list[dict] = (),
          direct=None) -> int:
    """The worker's loop (see the module docstring)."""
    import numpy as np
    import zmq

    from hetsched.errors import ProtocolError
    from hetsched.wire import stage_protocol as sp
    from hetsched.wire.shm import attach_region

    decode = convert = None
    if spec.preprocess is not None:
        from hetsched.model.pixels import check_pixels, payload_size, pixels_to_input
        from hetsched.model.preprocess import ImageLimits, preprocess_encoded
        limits = ImageLimits(**(spec.image_limits or {}))
        decode = lambda data: preprocess_encoded(data, spec.preprocess, limits)  # noqa: E731

        def convert(w, payload):  # raw camera pixels -> the model input
            return pixels_to_input(w.pixels, payload, width=w.width, height=w.height, color=w.color,
                                   cfg=spec.preprocess, limits=limits)
    regions: dict[int, object] = {}
    region_errors: dict[int, str] = {}  # why a region could not be mapped (said in its frames' errors)
    in_dtype, in_shape = (spec.inputs[0][1], spec.inputs[0][2]) if spec.inputs else (None, None)
    topk = spec.topk
    tcp = spec.in_ring is None
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    poller.register(ctl, zmq.POLLIN)
    if direct is not None:
        poller.register(direct, zmq.POLLIN)
    stage, wid = spec.stage, spec.worker
    interval = spec.stats_interval
    frames_done = errors = 0
    wait_s = compute_s = send_s = input_s = cpu_s = 0.0
    # onnxruntime's (and the input conversion's) CPU time: this thread's with one intra-op thread,
    # the whole process's with more (its pool threads do the work)
    cpu_clock = time.thread_time if spec.threads == 1 else time.process_time
    samples: list[float] = []
    direct_frames = 0                 # frames of the direct lane (their clients count them, not the coordinator)
    direct_samples: list[float] = []  # ... and their compute times (the re-planner's speed estimate)
    monotonic = time.monotonic
    t_last_stats = t_idle_from = monotonic()
    send = out.send_multipart
    send1 = out.send
    NOBLOCK = int(zmq.NOBLOCK)

    def send_stats(final: bool = False) -> None:
        nonlocal samples, direct_samples
        ctl.send(sp.control("STATS", stage=stage, worker=wid, pid=os.getpid(), frames=frames_done, errors=errors,
                            wait_s=wait_s, compute_s=compute_s, send_s=send_s, input_s=input_s,
                            compute_cpu_s=cpu_s, samples=samples[-512:], t=monotonic(), final=final,
                            direct_frames=direct_frames, direct_samples=direct_samples[-512:]))
        samples, direct_samples = [], []

    def on_control(msg: dict) -> bool:
        kind = msg["type"]
        if kind == "STOP":
            return False
        if kind == "REGION":  # a client's shared-memory region (stage 0): map it once
            try:
                regions[int(msg["id"])] = attach_region(msg["name"], msg["slots"], msg["slot_bytes"])
            except Exception as exc:  # the coordinator checked it; the region changed since: its frames fail
                region_errors[int(msg["id"])] = getattr(exc, "detail", None) or str(exc)
                logging.getLogger("hetsched.worker").warning("cannot map region %s: %s", msg.get("name"), exc)
        elif kind == "UNREGION":
            r = regions.pop(int(msg["id"]), None)
            if r is not None:
                r.close()
        return True

    def compute(w, parts, slot: int, t_recv: float):
        """Run one frame (inputs wherever its work message says); (outputs, compute start time)."""
        t_start = t_recv  # compute starts after decoding (the decoding shows as queueing)
        if tcp:
            if w.kind in (sp.KIND_BYTES, sp.KIND_PIXELS):
                if decode is None:
                    raise ProtocolError("BAD_ENCODING", "this stage does not decode images")
                arrays = [decode(parts[1].buffer) if w.kind == sp.KIND_BYTES else convert(w, parts[1].buffer)]
                t_start = monotonic()
            else:
                arrays = _arrays_from_frames(spec, parts[1:])
            outs = runner.run_arrays(arrays)
        elif w.kind == sp.KIND_RING:
            outs = runner.run_slot(slot)
        elif w.kind == sp.KIND_REGION:
            region = regions.get(w.region)
            deadline = monotonic() + 0.5
            while region is None and monotonic() < deadline:  # its REGION message may still be on its way
                if ctl.poll(20) and not on_control(sp.parse_control(ctl.recv())):
                    stop["flag"] = True
                region = regions.get(w.region)
            if region is None:
                raise ProtocolError("BAD_SHM", region_errors.get(
                    w.region, f"shared-memory region {w.region} is not mapped here"))
            if w.pixels is None:
                outs = runner.run_external(slot, region.view(w.region_slot, in_dtype, in_shape))
            elif convert is None:
                raise ProtocolError("BAD_ENCODING", "this stage does not take camera pixels")
            else:
                x = convert(w, region.view(w.region_slot, "uint8", (payload_size(w.pixels, w.width, w.height),)))
                t_start = monotonic()
                outs = runner.run_external(slot, x)
        elif w.kind == sp.KIND_BYTES:
            if decode is None:
                raise ProtocolError("BAD_ENCODING", "this stage does not decode images")
            x = decode(parts[1].buffer)
            t_start = monotonic()
            outs = runner.run_external(slot, x)
        elif w.kind == sp.KIND_PIXELS:
            if convert is None:
                raise ProtocolError("BAD_ENCODING", "this stage does not take camera pixels")
            x = convert(w, parts[1].buffer)
            t_start = monotonic()
            outs = runner.run_external(slot, x)
        else:
            raise ProtocolError("BAD_FRAMES", "tensors in frames on a shared-memory link")
        return outs, t_start

    def direct_check(w, parts) -> None:
        """What a direct client sends is checked here (the coordinator does not see it): a region frame
        or an encoded image only, never a ring slot, pixel frames within their region slot and limits."""
        if w.kind not in (sp.KIND_REGION, sp.KIND_BYTES, sp.KIND_PIXELS):
            raise ProtocolError("BAD_FRAMES", "the direct lane takes region frames and encoded images only")
        if w.kind != sp.KIND_REGION and len(parts) != 2:
            raise ProtocolError("BAD_FRAMES", "an encoded or pixel frame needs exactly one payload frame")
        if w.pixels is not None and convert is not None:  # (without, the frame fails with BAD_ENCODING)
            n = payload_size(w.pixels, w.width, w.height)
            size = n if w.kind == sp.KIND_REGION else len(parts[1].buffer)
            check_pixels(w.pixels, size, w.width, w.height, w.color, limits)

    def drain(sock, lane: bool) -> bool:
        """Serve every frame waiting on ``sock``: the coordinator's link (done messages go to it), or
        the direct lane (``lane``: the answer goes back to the client that sent the frame)."""
        nonlocal frames_done, errors, wait_s, compute_s, send_s, input_s, cpu_s, t_idle_from, t_last_stats
        nonlocal direct_frames
        while True:
            try:
                parts = sock.recv_multipart(NOBLOCK, copy=False)
            except zmq.Again:
                return True
            t_recv = monotonic()
            c0 = cpu_clock()
            ident = None
            if lane:
                if len(parts) < 2:
                    errors += 1
                    continue
                ident, parts = parts[0], parts[1:]
            try:
                w = sp.unpack_work(parts[0].buffer)
            except ProtocolError:
                errors += 1
                continue
            slot = runner.direct_slot if lane else w.slot
            try:
                if lane:
                    direct_check(w, parts)
                outs, t_start = compute(w, parts, slot, t_recv)
                t_end = monotonic()
                cpu_s += cpu_clock() - c0
                top = runner.top(0 if tcp else slot, outs) if topk is not None else None
                head = sp.pack_done(stage, wid, w.frame_id, w.attempt, w.slot, t_recv, t_start, t_end, top)
                if tcp or (lane and w.flags & sp.FLAG_WANT_OUTPUTS):
                    msg = [head, *(np.ascontiguousarray(a) for a in outs)]
                else:
                    msg = [head]
            except Exception as exc:  # a bad frame must not kill the stage
                errors += 1
                code = getattr(exc, "code", "STAGE_FAILED")
                text = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
                msg = [sp.pack_failed(stage, wid, w.frame_id, w.attempt, w.slot, code, t_recv, monotonic()),
                       text.encode("utf-8", "replace")]
                t_start = t_end = monotonic()
            if lane:
                try:
                    direct.send_multipart([ident, *msg], NOBLOCK)
                except zmq.ZMQError:  # a client gone, or not reading its answers: it loses them, not others
                    pass
                direct_frames += 1
                direct_samples.append(t_end - t_start)
            else:
                try:
                    if len(msg) == 1:
                        send1(msg[0], NOBLOCK)
                    else:
                        send(msg, NOBLOCK, copy=tcp)
                except zmq.Again:  # the coordinator is not reading: wait (heartbeats go on)
                    while not stop["flag"]:
                        if out.poll(50, zmq.POLLOUT):
                            send(msg, copy=tcp)
                            break
                        if monotonic() - t_last_stats >= interval:
                            send_stats()
                            t_last_stats = monotonic()
            t_sent = monotonic()
            frames_done += 1
            wait_s += max(0.0, t_recv - t_idle_from)
            compute_s += t_end - t_start
            input_s += t_start - t_recv
            send_s += t_sent - t_end
            samples.append(t_end - t_start)
            t_idle_from = t_sent
            if t_sent - t_last_stats >= interval:  # busy without a break: the heartbeat goes on
                send_stats()
                t_last_stats = monotonic()
                if ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN and not on_control(sp.parse_control(ctl.recv())):
                    stop["flag"] = True
                    return False
            if sock is inp and direct is not None and direct.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return True  # take turns with the direct lane: neither waits for the other to empty

    for msg in early:
        on_control(msg)
    while not stop["flag"]:
        events = dict(poller.poll(min(100, int(interval * 1000))))
        if not events:
            if monotonic() - t_last_stats >= interval:
                send_stats()
                t_last_stats = monotonic()
            continue
        if ctl in events and not on_control(sp.parse_control(ctl.recv())):
            break
        if not drain(inp, False):
            break
        if direct is not None and not drain(direct, True):
            break
        now = monotonic()
        if now - t_last_stats >= interval:
            send_stats()
            t_last_stats = now
    send_stats(final=True)
    for r in regions.values():
        r.close()
    return 0


def run(spec: WorkerSpec) -> None:
    """multiprocessing target."""
    sys.exit(main(spec))
