"""Stage worker process: one pipeline stage (or one replica of it) pinned to its cores.

Started by the coordinator with the ``spawn`` start method and a small picklable spec dict. In
order: die with the parent (PR_SET_PDEATHSIG), pin to the stage's cores, *then* create the zmq
context and the onnxruntime session (so every thread they start inherits the affinity), bind the
input socket, report READY with the session's real input/output shapes, wait for CONNECT with
the downstream endpoints, then stream: receive header + tensor frames (zero-copy views), run the
sub-model, append this stage's hop record and send on without copying.

Every ``stats_interval`` seconds the worker sends STATS (frames, wait/compute/send seconds, recent
compute samples) on the control socket; this doubles as its heartbeat.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

def main(spec: dict) -> int:
    from hetsched.host.process import die_with_parent, keep_large_buffers
    die_with_parent(spec["parent_pid"])
    keep_large_buffers()
    os.sched_setaffinity(0, spec["cores"])
    tag = f"[stage {spec['stage']}.{spec['replica']}]"
    logging.basicConfig(level=spec.get("log_level", logging.WARNING), format=f"%(asctime)s {tag} %(message)s")
    log = logging.getLogger("hetsched.worker")
    stop = {"flag": False}

    def on_signal(signum, frame):  # only set a flag; the loop notices within one poll timeout
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C goes to the coordinator, which stops us

    import zmq

    from hetsched.errors import ShapeMismatch
    from hetsched.wire.shm import RegionCache
    from hetsched.wire.stage_protocol import KIND_SHM, Hop, control, decode_header, encode_header, parse_control, views

    from hetsched.wire.security import LinkKeys, secure_link_client, secure_link_server, start_link_authenticator

    ctx = zmq.Context(io_threads=1)
    link_keys = LinkKeys.from_dict(spec.get("link_keys"))
    link_auth = start_link_authenticator(ctx, link_keys, f"stage {spec['stage']}.{spec['replica']} input")
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.LINGER, 1000)
    ctl.setsockopt(zmq.IDENTITY, f"s{spec['stage']}r{spec['replica']}".encode())
    secure_link_client(ctl, link_keys)
    ctl.connect(spec["ctl_endpoint"])
    inp = out = None
    try:
        import numpy as np
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = spec["threads"]
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if spec["threads"] == 1 or not spec.get("spinning", True):
            # A stage's intra-op threads spin only on the stage's own cores; with one thread there is
            # nothing to spin for. (Without spinning onnxruntime's 2-thread runs are no faster than 1.)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        passthrough = list(spec.get("passthrough", []))
        expected_in = [(t["dtype"], tuple(t["shape"])) for t in spec["inputs"]]
        feed_names = [t["name"] for t in spec["inputs"]]
        prep = None
        if spec.get("preprocess") is not None:
            # This stage also decodes images: encoded bytes (uint8, 1-D) become the model input.
            from hetsched.config import InputConfig
            from hetsched.model.preprocess import ImageLimits, preprocess_encoded
            prep_cfg = InputConfig(**spec["preprocess"])
            prep_limits = ImageLimits(**spec.get("image_limits", {}))
            prep = lambda data: preprocess_encoded(data, prep_cfg, prep_limits)  # noqa: E731
        if spec.get("model_path"):
            sess = ort.InferenceSession(spec["model_path"], so, providers=["CPUExecutionProvider"])
            in_names = [i.name for i in sess.get_inputs()]
            out_names = [o.name for o in sess.get_outputs()]
            session_info = {"inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in sess.get_inputs()],
                            "outputs": [{"name": o.name, "shape": o.shape, "type": o.type} for o in sess.get_outputs()]}
        else:  # a preprocessing-only stage
            sess, in_names, out_names = None, [], []
            session_info = {"inputs": [], "outputs": []}

        inp = ctx.socket(zmq.PULL)
        inp.setsockopt(zmq.RCVHWM, spec["hwm"])
        inp.setsockopt(zmq.LINGER, 0)
        secure_link_server(inp, link_keys)
        inp.bind(spec["bind"])
        endpoint = inp.getsockopt(zmq.LAST_ENDPOINT).decode()

        ctl.send(control("READY", stage=spec["stage"], replica=spec["replica"], pid=os.getpid(),
                         cores=sorted(os.sched_getaffinity(0)), endpoint=endpoint,
                         passthrough=passthrough, preprocess=prep is not None, **session_info))
        deadline = time.monotonic() + spec.get("connect_timeout", 60.0)
        downstream = None
        while downstream is None:
            if stop["flag"] or time.monotonic() > deadline:
                log.warning("no CONNECT from the coordinator; exiting")
                return 2
            if ctl.poll(100):
                msg = parse_control(ctl.recv())
                if msg["type"] == "CONNECT":
                    downstream = msg["endpoints"]
                elif msg["type"] == "STOP":
                    return 0
        out = ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.SNDHWM, spec["hwm"])
        out.setsockopt(zmq.LINGER, 2000)
        secure_link_client(out, link_keys)
        for ep in downstream:
            out.connect(ep)
        ctl.send(control("RUNNING", stage=spec["stage"], replica=spec["replica"]))

        shm_cache = RegionCache()
        poller = zmq.Poller()
        poller.register(inp, zmq.POLLIN)
        poller.register(ctl, zmq.POLLIN)
        stage, replica = spec["stage"], spec["replica"]
        interval = spec.get("stats_interval", 0.5)
        frames_done = errors = 0
        wait_s = compute_s = send_s = 0.0
        samples: list[float] = []
        t_last_stats = t_idle_from = time.monotonic()
        monotonic = time.monotonic
        def send_stats(final: bool = False) -> None:
            nonlocal samples
            ctl.send(control("STATS", stage=stage, replica=replica, pid=os.getpid(), frames=frames_done,
                             errors=errors, wait_s=wait_s, compute_s=compute_s, send_s=send_s,
                             samples=samples[-512:], t=monotonic(), final=final))
            samples = []

        while not stop["flag"]:
            events = dict(poller.poll(min(100, int(interval * 1000))))
            if ctl in events:
                msg = parse_control(ctl.recv())
                if msg["type"] == "STOP":
                    break
            if inp in events:
                t_recv = monotonic()
                parts = inp.recv_multipart(copy=False)
                try:
                    hdr = decode_header(parts[0].buffer)
                    t_start = monotonic()
                    if hdr.kind == KIND_SHM:  # the input sits in a client's shared-memory slot
                        ref = parse_control(parts[1].bytes)
                        arrays = [shm_cache.view(ref["name"], ref["slots"], ref["slot_bytes"], ref["slot"],
                                                 *hdr.tensors[0])]
                    elif prep is not None and hdr.tensors and hdr.tensors[0][0] == "uint8" \
                            and len(hdr.tensors[0][1]) == 1:
                        arrays = [prep(parts[1].buffer)]
                    else:
                        arrays = views(hdr, parts[1:], expected_in)  # checks against the plan itself
                    if [(a.dtype.name, a.shape) for a in arrays] != expected_in:
                        raise ShapeMismatch(f"stage input is {[(a.dtype.name, a.shape) for a in arrays]}, "
                                            f"plan expects {expected_in}")
                    feed = dict(zip(feed_names, arrays))
                    outs = sess.run(out_names, {n: feed[n] for n in in_names}) if sess is not None else []
                    t_end = monotonic()
                    sending = list(outs) + [feed[n] for n in passthrough]
                    header = encode_header(hdr.frame_id, hdr.t_submit, sending,
                                           hdr.hops + (Hop(stage, replica, t_recv, t_start, t_end),))
                except Exception as exc:  # a bad frame must not kill the stage
                    errors += 1
                    fid = None
                    try:
                        fid = decode_header(parts[0].buffer).frame_id
                    except Exception:
                        pass
                    ctl.send(control("FRAME_ERROR", stage=stage, replica=replica, frame_id=fid,
                                     code=getattr(exc, "code", "STAGE_FAILED"), error=str(exc)))
                    t_idle_from = monotonic()
                    continue
                msg_parts = [header, *[np.ascontiguousarray(a) for a in sending]]
                while True:
                    try:
                        out.send_multipart(msg_parts, flags=zmq.NOBLOCK, copy=False)
                        break
                    except zmq.Again:
                        if stop["flag"]:
                            break
                        out.poll(50, zmq.POLLOUT)
                        # blocked by a slow or restarting neighbour is not hung: keep the heartbeat
                        if monotonic() - t_last_stats >= interval:
                            send_stats()
                            t_last_stats = monotonic()
                t_sent = monotonic()
                frames_done += 1
                wait_s += t_recv - t_idle_from
                compute_s += t_end - t_start
                send_s += t_sent - t_end
                samples.append(t_end - t_start)
                t_idle_from = t_sent
            now = monotonic()
            if now - t_last_stats >= interval:
                send_stats()
                t_last_stats = now
        send_stats(final=True)
        return 0
    except Exception as exc:
        try:
            ctl.send(control("FAILED", stage=spec["stage"], replica=spec["replica"], pid=os.getpid(),
                             error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
        except Exception:
            pass
        log.error("stage failed: %s", exc)
        return 1
    finally:
        for sock in (inp, out, ctl):
            if sock is not None:
                sock.close(linger=500)
        if link_auth is not None:
            link_auth.stop()
        ctx.term()


def run(spec: dict) -> None:
    """multiprocessing target."""
    sys.exit(main(spec))
