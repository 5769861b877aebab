"""``hetsched feed``: stream images (files, a directory, synthetic frames, a video file or camera) into
a running service over its client socket, with a live progress line and a final summary (``--json``:
one JSON object per result, then the summary). Video frames are decoded with PyAV and sent as raw
pixels (no JPEG round trip); each result names the frame's number and timestamp."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Iterator

from hetsched.client.feed import FeedStats, feed, file_frames, image_files, synthetic_frames, video_frames
from hetsched.client.video import PIXEL_CHOICES, VideoFrame, VideoSource
from hetsched.errors import HetschedError
from hetsched.model.pixels import payload_size


def open_video(args: argparse.Namespace, hello: dict) -> VideoSource:
    """The --video source, after checking that the service takes its pixel encoding."""
    options = {}
    for opt in args.video_option:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise HetschedError(f"--video-option {opt!r}: expected KEY=VALUE, e.g. video_size=1280x720")
        options[key] = value
    accepts = hello.get("accepts", [])
    if args.pixels not in accepts:
        raise HetschedError(f"the service does not accept raw {args.pixels} frames (it accepts "
                            f"{', '.join(accepts) or 'nothing'}); it needs pixel input (a newer hetsched, "
                            "started with image preprocessing)")
    return VideoSource(args.video, pixels=args.pixels, loop=args.loop, options=options)


def cmd_feed(args: argparse.Namespace) -> int:
    from hetsched.cli.common import StopFlag, eprint
    from hetsched.client import Client

    from hetsched.cli.keys import client_key_options
    stop = StopFlag().install()
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(args.connect, timeout=args.timeout, **client_key_options(args)))
        hello = client.hello()
        if args.synthetic:
            inp = hello["input"]
            frames: Iterator = synthetic_frames(tuple(inp["shape"]), inp["dtype"])
        elif args.video:
            video = stack.enter_context(open_video(args, hello))
            frames = video_frames(video)
            if args.fps is None and not video.device:
                args.fps = video.rate  # the file's frame rate; a camera paces itself
        elif args.images or args.files:
            frames = file_frames(image_files((args.images or []) + (args.files or [])), args.loop)
        else:
            raise HetschedError("give --images DIR, --files F.., --video F|DEVICE or --synthetic")
        slot_bytes = payload_size(video.encoding, video.width, video.height) if args.video else None
        # shared memory (and with it the direct lane to the workers) for every kind of frame: images go
        # straight to a worker in their message, tensors and video frames through the slots
        if args.shm and not client.enable_shm(args.window + 2, slot_bytes) and (args.synthetic or args.video):
            eprint("note: the service does not offer shared-memory input here (ipc:// only); sending frames over "
                   "the socket")
        tty = sys.stderr.isatty()

        def on_result(name, rep: dict) -> None:
            if args.json:
                out = {"type": rep["type"], "source": str(name), "stream": rep.get("stream"), "seq": rep.get("seq")}
                if isinstance(name, VideoFrame):
                    out.update(frame=name.index, t=name.time, loop=name.loop)
                if rep["type"] == "result":
                    out.update(top_k=rep["top_k"], latency_ms=rep["latency_ms"], stages=rep["stages"])
                else:
                    out.update(code=rep.get("code"), message=rep.get("message"))
                print(json.dumps(out), flush=True)
            elif rep["type"] == "error":
                eprint(f"\n{name}: error {rep.get('code')}: {rep.get('message')}")
            elif args.show:
                top = rep["top_k"][0] if rep["top_k"] else {}
                label = f" {top.get('label')}" if top.get("label") else ""
                print(f"{name}: {top.get('index')}{label} ({top.get('score', 0):.3f})  {rep['latency_ms']:.1f} ms",
                      flush=True)

        def on_progress(stats: FeedStats) -> None:
            if tty:
                eprint("\r  " + stats.line() + "   ", end="")

        from hetsched.host.process import quiet_garbage_collector
        quiet_garbage_collector()  # this process does nothing else: keep the collector off the hot path
        stats = feed(client, frames, fps=args.fps, duration=args.duration, count=args.count, window=args.window,
                     stream=args.stream, on_result=on_result, on_progress=on_progress, should_stop=stop,
                     reply_timeout=args.timeout)
    summary = stats.summary()
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        if tty:
            eprint("")
        print("summary: " + stats.line() + f"  ({summary['seconds']:.1f} s)")
    return 0 if stats.errors == 0 else 1


def add_parser(sub, common) -> None:
    sp = sub.add_parser("feed", help="stream images into a running service and report results")
    sp.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the service's client socket")
    src = sp.add_argument_group("source (one of)")
    src.add_argument("--images", nargs="+", help="image directories or files (JPEG/PNG)")
    src.add_argument("--files", nargs="+", help="image files")
    src.add_argument("--synthetic", action="store_true", help="random raw tensors of the model's input shape")
    src.add_argument("--video", metavar="FILE|DEVICE",
                     help="a video file or a V4L2 camera (/dev/video0), decoded with PyAV (pip install "
                          "'hetsched[video]') and sent as raw pixels")
    sp.add_argument("--pixels", choices=PIXEL_CHOICES, default="rgb24",
                    help="--video: send rgb24 (default; the service converts nothing) or nv12 (half the bytes, "
                         "the service converts YUV)")
    sp.add_argument("--video-option", action="append", default=[], metavar="KEY=VALUE",
                    help="--video: an FFmpeg input option, e.g. video_size=1280x720, framerate=30, "
                         "input_format=mjpeg (repeatable)")
    sp.add_argument("--loop", action="store_true", help="repeat the images or the video file")
    sp.add_argument("--fps", type=float, default=None,
                    help="target frames/s (default: a video file's own frame rate, else as fast as allowed)")
    sp.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    sp.add_argument("--count", type=int, default=None, help="stop after sending this many frames")
    sp.add_argument("--window", type=int, default=8, help="max frames in flight")
    sp.add_argument("--stream", default="feed", help="stream name")
    sp.add_argument("--json", action="store_true", help="one JSON line per result, then a summary line")
    sp.add_argument("--no-shm", dest="shm", action="store_false",
                    help="send everything through the service's socket even when it offers shared-memory input "
                         "and the direct lane (by default a client on the same host as an ipc:// service writes "
                         "tensors and video frames to /dev/shm, and sends every frame, images too, straight to "
                         "a worker when the plan has one stage)")
    sp.add_argument("--show", action="store_true", help="print each result's top-1")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    from hetsched.cli.keys import add_client_key_arguments
    add_client_key_arguments(sp)
    sp.set_defaults(func=cmd_feed)
