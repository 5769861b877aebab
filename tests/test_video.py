"""Video input with PyAV: clips generated in the test from a real photo are read back through
hetsched.client.video (frame count, timestamps, pixels, loop, colour tags) and classified by the real
model; then ``hetsched feed --video`` and scripts/camera_example.py against a running service."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hetsched.client.feed import video_frames
from hetsched.client.video import VideoSource, is_device
from hetsched.config import InputConfig
from hetsched.errors import HetschedError
from hetsched.model.pixels import payload_size, pixels_to_input, pixels_to_rgb
from hetsched.model.preprocess import decode_image

from .conftest import ROOT, SHARED_IMAGES, SHARED_LABELS, SHARED_MODEL, needs_shared
from .test_lifecycle import start_service
from .test_pixels import session, top1  # noqa: F401 - session is a fixture

av = pytest.importorskip("av", reason="PyAV is the video extra: pip install -e '.[video]'")

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
N_FRAMES, RATE = 10, 10


def chelsea() -> np.ndarray:
    rgb = decode_image((SHARED_IMAGES / "chelsea.jpg").read_bytes())
    return np.ascontiguousarray(rgb[:rgb.shape[0] & ~1, :rgb.shape[1] & ~1])


def write_clip(path: Path, rgb: np.ndarray, *, n: int = N_FRAMES, rate: int = RATE, codec: str | None = None,
               pix_fmt: str = "yuv420p") -> Path:
    """An n-frame clip of the photo, panning one pixel per frame; the first encoder the wheel has."""
    with av.open(str(path), "w") as out:
        for name in ([codec] if codec else ["libx264", "mpeg4"]):
            try:
                stream = out.add_stream(name, rate=rate)
                break
            except (av.FFmpegError, ValueError):
                continue
        else:
            pytest.skip("this PyAV wheel has no libx264 or mpeg4 encoder")
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], pix_fmt
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(rgb, i, axis=1)), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"shared images not present at {SHARED_IMAGES}")
    return write_clip(tmp_path_factory.mktemp("video") / "chelsea.mp4", chelsea())


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------------------
# the reader


@needs_shared
@pytest.mark.timeout(120)
def test_reads_every_frame_with_number_timestamp_and_the_photos_class(clip, session):
    rgb = chelsea()
    with VideoSource(str(clip)) as src:
        assert (src.width, src.height, src.encoding, src.device) == (rgb.shape[1], rgb.shape[0], "rgb24", False)
        assert src.rate == pytest.approx(RATE)
        frames = list(src.frames())
    assert [f.index for f in frames] == list(range(N_FRAMES))
    assert [f.time for f in frames] == pytest.approx([i / RATE for i in range(N_FRAMES)], abs=1e-6)
    assert {f.loop for f in frames} == {0}
    for i, f in enumerate(frames):
        assert f.data.shape == rgb.shape and f.data.dtype == np.uint8 and f.color is None
        assert mean_diff(f.data, np.roll(rgb, i, axis=1)) < 6  # lossy codec, same picture
        assert f.submit_args() == {"encoding": "rgb24", "width": rgb.shape[1], "height": rgb.shape[0]}
    assert frames[3].label == "chelsea.mp4#3 t=0.300s" and str(frames[3]) == frames[3].label
    for f in (frames[0], frames[-1]):
        x = pixels_to_input(f.encoding, f.data, width=f.width, height=f.height, cfg=InputConfig())
        assert top1(session, x) in CATS


@needs_shared
@pytest.mark.timeout(120)
def test_nv12_frames_are_the_decoders_planes_and_the_same_picture(clip, session):
    with VideoSource(str(clip)) as src:
        rgb_frames = list(src.frames())
    with VideoSource(str(clip), pixels="nv12") as src:
        assert src.encoding == "nv12"
        nv_frames = list(src.frames())
    assert len(nv_frames) == N_FRAMES
    for a, b in zip(rgb_frames, nv_frames):
        assert (b.index, b.time) == (a.index, a.time)
        assert b.data.shape == (b.height * 3 // 2, b.width) and b.data.nbytes == payload_size("nv12", b.width, b.height)
        assert b.color == "bt601"  # untagged H.264: what FFmpeg assumes too
        assert b.submit_args() == {"encoding": "nv12", "width": b.width, "height": b.height, "color": "bt601"}
        ours = pixels_to_rgb("nv12", b.data, width=b.width, height=b.height, color=b.color)
        assert mean_diff(ours, a.data) < 2.5  # ours vs swscale's fast path, from the same YUV
    f = nv_frames[5]
    assert top1(session, pixels_to_input("nv12", f.data, width=f.width, height=f.height, color=f.color,
                                         cfg=InputConfig())) in CATS


@needs_shared
@pytest.mark.timeout(60)
def test_loop_starts_the_file_again_with_its_own_numbers(clip):
    with VideoSource(str(clip), loop=True) as src:
        it = src.frames()
        got = [next(it) for _ in range(2 * N_FRAMES + 5)]
        it.close()
    assert [f.index for f in got] == list(range(N_FRAMES)) * 2 + list(range(5))
    assert [f.loop for f in got] == [0] * N_FRAMES + [1] * N_FRAMES + [2] * 5
    assert got[N_FRAMES].time == pytest.approx(0.0) and got[N_FRAMES].label == "chelsea.mp4#0 t=0.000s @loop1"
    # the feed loop's items: (frame, pixels, submit arguments)
    with VideoSource(str(clip)) as src:
        items = list(video_frames(src))
    assert len(items) == N_FRAMES
    frame, data, kwargs = items[2]
    assert data is frame.data and frame.index == 2 and kwargs == frame.submit_args()


def tagged_clip(path: Path, rgb: np.ndarray, codec: str, pix_fmt: str, colorspace: str, color_range: str) -> Path:
    """A 3-frame clip whose pixels AND tags are in the given colour matrix and range."""
    with av.open(str(path), "w") as out:
        try:
            stream = out.add_stream(codec, rate=5)
        except (av.FFmpegError, ValueError):
            pytest.skip(f"this PyAV wheel has no {codec} encoder")
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], pix_fmt
        # the stream's tags (H.264 VUI): AVCOL_SPC_BT709 1 / SMPTE170M 6, AVCOL_RANGE_MPEG 1 / JPEG 2
        stream.codec_context.colorspace = {"itu709": 1, "itu601": 6}[colorspace]
        stream.codec_context.color_range = {"MPEG": 1, "JPEG": 2}[color_range]
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=colorspace, dst_color_range=color_range)
            frame.pts = i
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    return path


@needs_shared
@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec, pix_fmt, colorspace, color_range, want", [
    ("mjpeg", "yuvj420p", "itu601", "JPEG", "full"),    # JPEG-style full range
    ("libx264", "yuv420p", "itu709", "MPEG", "bt709"),  # HD video tagged BT.709
    ("libx264", "yuv420p", "itu601", "MPEG", "bt601"),
])
def test_the_streams_colour_tags_pick_the_color(tmp_path, codec, pix_fmt, colorspace, color_range, want):
    rgb = chelsea()[100:164, 150:246]
    path = tagged_clip(tmp_path / f"c.{'avi' if codec == 'mjpeg' else 'mp4'}", rgb, codec, pix_fmt, colorspace,
                       color_range)
    with VideoSource(str(path), pixels="nv12") as src:
        frames = list(src.frames())
    assert len(frames) == 3 and [f.color for f in frames] == [want] * 3
    ours = pixels_to_rgb("nv12", frames[0].data, width=96, height=64, color=want)
    assert mean_diff(ours, rgb) < 4  # the right matrix and range give the photo back
    wrong = "bt601" if want != "bt601" else "bt709"
    assert mean_diff(pixels_to_rgb("nv12", frames[0].data, width=96, height=64, color=wrong), rgb) > \
        mean_diff(ours, rgb) + 0.5


@pytest.mark.timeout(60)
def test_raw_rgb_video_odd_sizes_and_source_errors(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (21, 33, 3), dtype=np.uint8)
    path = tmp_path / "odd.nut"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 33, 21, "rgb24"
        for p in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    with VideoSource(str(path), pixels="nv12") as src:
        assert src.encoding == "rgb24"  # 4:2:0 cannot carry odd sides: rgb24 instead
        (frame,) = list(src.frames())
    np.testing.assert_array_equal(frame.data, rgb)  # lossless all the way
    with pytest.raises(HetschedError, match="no-such.mp4"):
        VideoSource(str(tmp_path / "no-such.mp4"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(4096))
    with pytest.raises(HetschedError, match="cannot open video .*junk.bin"):
        VideoSource(str(junk))
    assert is_device("/dev/null") and not is_device(str(path))
    with pytest.raises(HetschedError, match="cannot open camera /dev/null"):
        VideoSource("/dev/null")  # a character device that is no camera
    with pytest.raises(HetschedError, match="pixels"):
        VideoSource(str(path), pixels="yuyv")


# ---------------------------------------------------------------------------------------------
# end to end: hetsched feed --video against a running service


def stop_service(proc) -> None:
    proc.send_signal(signal.SIGINT)  # drain and stop
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def service(tmp_path):
    if not SHARED_MODEL.is_file():
        pytest.skip(f"shared model not present at {SHARED_MODEL}")
    proc, sock, _ = start_service(tmp_path, f"model: {SHARED_MODEL}\nclusters:\n  big: {{cores: [0]}}\n"
                                  f"  little: {{cores: [1]}}\nprofile: {{measure: false}}\n"
                                  f"input: {{labels: {SHARED_LABELS}}}\n")
    yield sock
    stop_service(proc)


@needs_shared
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pixels", ["rgb24", "nv12"])
def test_feed_video_gives_the_photos_class_for_every_frame(service, clip, pixels, tmp_path):
    r = subprocess.run([sys.executable, "-m", "hetsched", "feed", "--connect", service, "--video", str(clip),
                        "--pixels", pixels, "--json", "--fps", "50", "--timeout", "60"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    results, summary = lines[:-1], lines[-1]
    assert summary["type"] == "summary" and summary["received"] == N_FRAMES and summary["errors"] == 0
    assert [x["frame"] for x in results] == list(range(N_FRAMES))
    assert [x["t"] for x in results] == pytest.approx([i / RATE for i in range(N_FRAMES)], abs=1e-6)
    for x in results:
        assert x["type"] == "result" and x["top_k"][0]["index"] in CATS, x
        assert x["source"].startswith(f"chelsea.mp4#{x['frame']} t=")


@needs_shared
@pytest.mark.timeout(300)
def test_camera_example_streams_two_sources(service, clip):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "camera_example.py"), "--connect", service,
                        str(clip), str(clip), "--frames", "6"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("cam")]
    assert sorted(ln.split()[0] for ln in lines) == ["cam0"] * 6 + ["cam1"] * 6
    assert all("cat" in ln for ln in lines), r.stdout
