"""Video files and cameras as frame sources, decoded with PyAV (FFmpeg's libraries, from PyPI:
``pip install 'hetsched[video]'``).

    with VideoSource("clip.mp4") as src:               # or "/dev/video0" (V4L2 camera)
        for f in src.frames():
            client.submit(f.data, stream="cam0", **f.submit_args())
            print(f.index, f.time)

Frames come out as raw pixels for the client protocol's pixel encodings (docs/protocol.md):
``rgb24`` (``[H, W, 3]`` uint8, the default) or ``nv12`` (``[H*3/2, W]`` uint8: the Y plane, then the
interleaved U/V plane), never re-encoded. Which to send (measured on a 1280x720 H.264 clip: decoding
takes 1.6 ms of CPU per frame; then swscale makes rgb24 in 0.44 ms or nv12 in 0.25 ms, while the
service's stage 0 needs about 4.5 ms to turn nv12 into RGB): rgb24 costs the client 0.2 ms more per
frame and twice the bytes on the socket, and saves the service the YUV conversion, so it is the
default; nv12 halves the bytes (a slow tcp:// link). ``color`` of an nv12 frame comes from the
stream's tags: ``full`` for full-range (JPEG, ``yuvj*``) video, ``bt709`` for streams tagged BT.709,
else ``bt601`` (what FFmpeg assumes for untagged video).

``index`` is the frame's number in the source (0-based, from the start again on each ``loop``) and
``time`` its presentation time in seconds, ``pts * time_base``. A path under /dev (a character
device) opens with FFmpeg's ``v4l2`` input; ``options`` go to FFmpeg as they are, e.g.
``{"video_size": "1280x720", "framerate": "30", "input_format": "mjpeg"}``.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from hetsched.errors import HetschedError

log = logging.getLogger(__name__)

__all__ = ["VideoFrame", "VideoSource", "PIXEL_CHOICES", "is_device"]

PIXEL_CHOICES = ("rgb24", "nv12")
_YUV420 = ("yuv420p", "yuvj420p", "nv12", "nv21")
_AVCOL_SPC_BT709 = 1
_AVCOL_RANGE_JPEG = 2


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame as raw pixels, with where it was in the source."""

    data: np.ndarray         # rgb24: [H, W, 3]; nv12: [H*3/2, W]; uint8, C order
    encoding: str            # "rgb24" or "nv12"
    width: int
    height: int
    color: str | None        # nv12: "bt601", "bt709" or "full"; None for rgb24
    index: int               # frame number in the source, 0-based (restarts on each loop)
    time: float | None       # presentation time, seconds (pts * time_base); None without timestamps
    loop: int = 0            # 0 on the first pass through the source, then 1, 2, ...
    source: str = ""

    def submit_args(self) -> dict:
        """Keyword arguments of :meth:`hetsched.client.Client.submit` for this frame."""
        args: dict[str, Any] = {"encoding": self.encoding, "width": self.width, "height": self.height}
        if self.color is not None:
            args["color"] = self.color
        return args

    @property
    def label(self) -> str:
        """``clip.mp4#12 t=0.480s`` (``@loop2`` appended on later passes)."""
        t = f" t={self.time:.3f}s" if self.time is not None else ""
        again = f" @loop{self.loop}" if self.loop else ""
        return f"{os.path.basename(self.source) or self.source}#{self.index}{t}{again}"

    def __str__(self) -> str:
        return self.label


def is_device(source: str) -> bool:
    """True for a capture device (a character device such as /dev/video0)."""
    try:
        return stat.S_ISCHR(os.stat(source).st_mode)
    except OSError:
        return source.startswith("/dev/video")


def _av():
    try:
        import av
    except ImportError:
        raise HetschedError("video input needs PyAV: pip install 'hetsched[video]' (or pip install av)") from None
    return av


def frame_color(frame: Any) -> str:
    """The pixel encodings' ``color`` of a decoded YUV frame, from its tags (see the module docstring)."""
    if int(frame.color_range) == _AVCOL_RANGE_JPEG or frame.format.name.startswith("yuvj"):
        return "full"
    return "bt709" if int(frame.colorspace) == _AVCOL_SPC_BT709 else "bt601"


class VideoSource:
    """An open video file or camera. ``pixels``: ``rgb24`` (default) or ``nv12`` (falls back to
    rgb24 for odd sizes, which 4:2:0 cannot carry); ``loop``: start the file again at its end
    (ignored for devices: a camera does not end)."""

    def __init__(self, source: str, *, pixels: str = "rgb24", loop: bool = False,
                 options: dict[str, str] | None = None, fmt: str | None = None):
        if pixels not in PIXEL_CHOICES:
            raise HetschedError(f"pixels must be one of {', '.join(PIXEL_CHOICES)}, got {pixels!r}")
        self.source, self.loop, self.options = source, loop, dict(options or {})
        self.device = is_device(source)
        self.fmt = fmt or ("v4l2" if self.device else None)
        self._container = self._open()
        stream = self._container.streams.video[0]
        self.width, self.height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate
        self.rate: float | None = float(rate) if rate else None
        self.encoding = "nv12" if pixels == "nv12" and not (self.width % 2 or self.height % 2) else "rgb24"
        if self.encoding != pixels:
            log.info("%s: %dx%d has an odd side; sending rgb24 instead of %s", source, self.width, self.height,
                     pixels)

    def _open(self):
        av = _av()
        try:
            container = av.open(self.source, format=self.fmt, options=self.options)
        except (OSError, av.FFmpegError, ValueError) as exc:
            kind = "camera" if self.device else "video"
            raise HetschedError(f"cannot open {kind} {self.source}: {exc}") from None
        if not container.streams.video:
            container.close()
            raise HetschedError(f"{self.source} has no video stream")
        stream = container.streams.video[0]
        if not self.device:
            stream.thread_type = "AUTO"  # frame-parallel decoding of files
        return container

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _convert(self, frame: Any) -> tuple[np.ndarray, str | None]:
        if self.encoding == "nv12":
            if frame.format.name not in _YUV420:
                return frame.to_ndarray(format="nv12"), "bt601"  # swscale's own RGB/4:2:2 -> 4:2:0 is BT.601
            color = frame_color(frame)
            # same range in and out: swscale only interleaves U and V (yuvj420p would otherwise be
            # squeezed into limited range)
            rng = "JPEG" if color == "full" else "MPEG"
            return frame.to_ndarray(format="nv12", src_color_range=rng, dst_color_range=rng), color
        return frame.to_ndarray(format="rgb24"), None

    def frames(self) -> Iterator[VideoFrame]:
        """Decoded frames, in order; with ``loop`` forever (for files)."""
        av = _av()
        loop = 0
        while True:
            if self._container is None:
                self._container = self._open()
            stream = self._container.streams.video[0]
            index = -1
            try:
                for index, frame in enumerate(self._container.decode(stream)):
                    if (frame.width, frame.height) != (self.width, self.height):
                        raise HetschedError(f"{self.source}: frame {index} is {frame.width}x{frame.height}, the "
                                            f"stream began at {self.width}x{self.height}")
                    data, color = self._convert(frame)
                    t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
                    yield VideoFrame(data, self.encoding, self.width, self.height, color, index, t, loop, self.source)
            except av.FFmpegError as exc:
                raise HetschedError(f"{self.source}: decoding failed after frame {index}: {exc}") from None
            self.close()
            if not self.loop or self.device or index < 0:
                return
            loop += 1
