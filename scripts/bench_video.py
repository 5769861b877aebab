"""Video input: raw pixel frames (what `hetsched feed --video` sends) against JPEG-encoding each
frame (what a client without pixel input must do), on a real service.

    python scripts/bench_video.py [--seconds 8]

Makes a 640x480 mp4 with PyAV, starts `hetsched start` (two cores, the second emulated at half
speed), and feeds the video in a loop, as fast as the service takes it, three ways: rgb24 frames
through shared memory, rgb24 frames over the socket, and each frame JPEG-encoded by the client.
Reports the service's throughput and the feeding client's CPU time per frame (its thread:
decoding the video, converting or encoding, the socket).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hetsched.client import Client  # noqa: E402
from hetsched.client.feed import feed, video_frames  # noqa: E402
from hetsched.client.video import VideoSource  # noqa: E402
from scripts.service_process import start_service, stop_service  # noqa: E402

CONFIG = """model: builtin:squeezenet1.1
clusters:
  big: {cores: [0]}
  little: {cores: [1], speed: 0.5}
planner: {traffic: encoded}
profile: {repeats: 10, warmup: 2}
"""


def make_video(path: str, frames: int = 90, size: tuple[int, int] = (640, 480)) -> None:
    import av

    from hetsched.model.samples import sample_jpeg
    from PIL import Image
    with av.open(path, "w") as out:
        st = out.add_stream("mpeg4", rate=30)
        st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            img = np.asarray(Image.open(io.BytesIO(sample_jpeg(seed=i % 8))).convert("RGB"))
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)


def jpeg_frames(source):
    """Each decoded frame JPEG-encoded, as a client without raw pixel input would send it."""
    from PIL import Image
    for f in source.frames():
        buf = io.BytesIO()
        Image.fromarray(f.data).save(buf, format="JPEG", quality=90)
        yield f, buf.getvalue(), {"encoding": "jpeg"}


def run(sock: str, video: str, mode: str, seconds: float) -> tuple[float, float]:
    with Client(sock, timeout=60) as c, VideoSource(video, loop=True) as src:
        if mode == "raw rgb24, shared memory":
            c.enable_shm(12, src.width * src.height * 3)
        frames = jpeg_frames(src) if mode.startswith("jpeg") else video_frames(src)
        c0 = time.thread_time()
        stats = feed(c, frames, fps=None, duration=seconds, count=None, window=8, stream=mode)
        cpu = time.thread_time() - c0
    return stats.received / seconds, cpu / max(stats.sent, 1) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="hetsched-video-")
    video, config = os.path.join(tmp, "clip.mp4"), os.path.join(tmp, "config.yaml")
    make_video(video)
    with open(config, "w") as fh:
        fh.write(CONFIG)
    sock = f"ipc://{tmp}/s.sock"
    proc = start_service(config, sock, tmp)
    rows = []
    try:
        for mode in ("raw rgb24, shared memory", "raw rgb24, socket", "jpeg (client encodes each frame)"):
            run(sock, video, mode, 1.5)  # warm-up
            rows.append((mode, *run(sock, video, mode, args.seconds)))
    finally:
        stop_service(proc)
    print("| input | service fps | client CPU ms/frame |\n|---|---|---|")
    for mode, fps, cpu in rows:
        print(f"| {mode} | {fps:.1f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
