#!/usr/bin/env python3
"""Stream cameras or video files into a running hetsched service, one stream per source, and print
each frame's label as it comes back.

    pip install -e '.[video]'                    # PyAV: FFmpeg's libraries, from PyPI
    hetsched start --labels ../shared/models/imagenet_synset_words.txt &
    python scripts/camera_example.py /dev/video0 clip.mp4          # a camera and a file: cam0, cam1
    python scripts/camera_example.py clip.mp4 clip.mp4 --frames 50 # the same file on two streams

What it shows, in about 60 lines of PyAV and hetsched.client.Client:

* decoding with PyAV (``av.open``; a camera under /dev opens with FFmpeg's ``v4l2`` input, e.g.
  ``--option video_size=1280x720 --option input_format=mjpeg``);
* sending each decoded frame as raw pixels, ``Client.submit(frame, encoding="rgb24")`` for a
  [H, W, 3] uint8 array: no JPEG round trip (``--nv12`` sends ``encoding="nv12"`` with the decoder's
  planes instead, half the bytes);
* one ordered stream per source (``stream="cam0"``, ``"cam1"``): replies to one stream come in
  order, and a slow frame on one stream never holds back the other (docs/protocol.md section 6);
* a window of frames in flight per stream, so a slow service never builds a queue of old frames;
  a ``BUSY`` reply (the service is full) just drops that frame, as a live camera should.

Press Ctrl+C to stop. Each line: ``cam0 #12 t=0.480s  Egyptian cat 0.64  23.1 ms``.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

import av

from hetsched.client import Client


def open_source(path: str, options: dict) -> av.container.InputContainer:
    is_camera = os.path.exists(path) and stat.S_ISCHR(os.stat(path).st_mode)
    return av.open(path, format="v4l2" if is_camera else None, options=options)


def decoded(container: av.container.InputContainer, nv12: bool):
    """(frame number, seconds, submit arguments) of each decoded frame."""
    for n, frame in enumerate(container.decode(video=0)):
        t = float(frame.pts * frame.time_base) if frame.pts is not None else None
        if nv12 and frame.width % 2 == 0 and frame.height % 2 == 0:
            # [H*3/2, W]: Y plane, then U/V interleaved; BT.601 limited range (untagged video)
            args = {"data": frame.to_ndarray(format="nv12"), "encoding": "nv12"}
        else:
            args = {"data": frame.to_ndarray(format="rgb24"), "encoding": "rgb24"}
        yield n, t, args


def describe(reply: dict) -> str:
    if reply["type"] == "error":
        return f"error {reply['code']}: {reply['message']}"
    best = reply["top_k"][0]
    return f"{best.get('label', best['index'])} {best['score']:.2f}  {reply['latency_ms']:.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", help="video files or cameras (/dev/video0), one stream each")
    ap.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the service's client socket")
    ap.add_argument("--frames", type=int, default=None, help="stop after this many frames per source")
    ap.add_argument("--window", type=int, default=4, help="frames in flight per stream")
    ap.add_argument("--nv12", action="store_true", help="send nv12 planes instead of rgb24")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="FFmpeg input option")
    args = ap.parse_args()
    options = dict(opt.split("=", 1) for opt in args.option)

    containers = [open_source(path, options) for path in args.sources]
    streams = {f"cam{i}": decoded(c, args.nv12) for i, c in enumerate(containers)}
    in_flight: dict[tuple[str, int], tuple[int, float | None]] = {}  # (stream, seq) -> (frame, t)
    sent = {name: 0 for name in streams}
    try:
        with Client(args.connect, timeout=30) as client:
            while streams or in_flight:
                for name, frames in list(streams.items()):  # top every stream's window up
                    while sum(1 for s, _ in in_flight if s == name) < args.window:
                        item = next(frames, None) if args.frames is None or sent[name] < args.frames else None
                        if item is None:
                            del streams[name]
                            break
                        n, t, submit_args = item
                        seq = client.submit(stream=name, **submit_args)
                        in_flight[(name, seq)] = (n, t)
                        sent[name] += 1
                reply = client.recv(timeout=30)
                if reply is None:
                    print(f"no reply within 30 s; {len(in_flight)} frames outstanding", file=sys.stderr)
                    return 1
                n, t = in_flight.pop((reply.get("stream"), reply.get("seq")), (None, None))
                when = f" t={t:.3f}s" if t is not None else ""
                print(f"{reply.get('stream')} #{n}{when}  {describe(reply)}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for c in containers:
            c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
