"""Raw pixel frames (rgb24, bgr24, nv12, nv21): the conversion against independent references (the
exact formula, Pillow's JPEG YCbCr, FFmpeg's swscale through PyAV), every coded error, the real
model on real photos, the wire fields (parse_submit) and what Client.submit puts on a real socket."""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from PIL import Image

from hetsched.client import Client
from hetsched.config import InputConfig
from hetsched.errors import ProtocolError
from hetsched.model.pixels import (COLORS, PIXEL_ENCODINGS, check_pixels, payload_size, pixels_to_input,
                                   pixels_to_rgb)
from hetsched.model.preprocess import ImageLimits, decode_image, preprocess_array, preprocess_encoded
from hetsched.wire import client_protocol as cp
from hetsched.wire.shm import attach_region

from .conftest import SHARED_IMAGES, needs_shared
from .test_preprocess import session  # noqa: F401 - the real model's onnxruntime session (a fixture)

KR_KB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "full": (0.299, 0.114)}
AV_COLOR = {"bt601": ("itu601", "MPEG"), "bt709": ("itu709", "MPEG"), "full": ("itu601", "JPEG")}
ESPRESSO = 967


def random_yuv(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, w * h * 3 // 2, dtype=np.uint8)


def planes(buf: np.ndarray, w: int, h: int, vu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V at full resolution (chroma repeated over its 2x2 block)."""
    y = buf[:w * h].reshape(h, w)
    uv = buf[w * h:].reshape(h // 2, w // 2, 2)
    u, v = (uv[..., 1], uv[..., 0]) if vu else (uv[..., 0], uv[..., 1])
    up = lambda c: np.repeat(np.repeat(c, 2, axis=0), 2, axis=1)  # noqa: E731
    return y, up(u), up(v)


def exact_rgb(buf: np.ndarray, w: int, h: int, vu: bool, color: str) -> np.ndarray:
    """The textbook formula in float64 (BT.601/BT.709, limited or full range), rounded and clipped."""
    y, u, v = (p.astype(np.float64) for p in planes(buf, w, h, vu))
    kr, kb = KR_KB[color]
    kg = 1 - kr - kb
    if color == "full":
        u, v = u - 128, v - 128
    else:
        y, u, v = (y - 16) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
    rgb = np.stack([y + 2 * (1 - kr) * v, y - 2 * kb * (1 - kb) / kg * u - 2 * kr * (1 - kr) / kg * v,
                    y + 2 * (1 - kb) * u], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def photo(name: str = "coffee.jpg") -> np.ndarray:
    """The photo as RGB, cropped to even sides."""
    rgb = decode_image((SHARED_IMAGES / name).read_bytes())
    h, w = rgb.shape[0] & ~1, rgb.shape[1] & ~1
    return np.ascontiguousarray(rgb[:h, :w])


def av_nv12(rgb: np.ndarray, color: str) -> np.ndarray:
    """nv12 bytes made by FFmpeg's swscale (an independent RGB -> YUV conversion)."""
    av = pytest.importorskip("av")
    cs, rng = AV_COLOR[color]
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="nv12", dst_colorspace=cs,
                                                                      dst_color_range=rng)
    return frame.to_ndarray().reshape(-1)


def nv12_to_nv21(buf: np.ndarray, w: int, h: int) -> np.ndarray:
    out = buf.copy()
    uv = out[w * h:].reshape(-1, 2)
    uv[:] = uv[:, ::-1]
    return out


def expect(code: str, *args, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        pixels_to_rgb(*args, **kw)
    assert info.value.code == code, info.value
    assert info.value.detail  # every refusal says what is wrong
    return info.value


# ---------------------------------------------------------------------------------------------
# conversions


@pytest.mark.timeout(30)
@pytest.mark.parametrize("color", COLORS)
@pytest.mark.parametrize("encoding", ["nv12", "nv21"])
@pytest.mark.parametrize("size", [(8, 8), (64, 48), (322, 18)])
def test_yuv_within_one_level_of_the_exact_formula(encoding, color, size):
    w, h = size
    buf = random_yuv(w, h, seed=w + h)
    got = pixels_to_rgb(encoding, buf, width=w, height=h, color=color)
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    exact = exact_rgb(buf, w, h, encoding == "nv21", color)
    assert max_diff(got, exact) <= 1
    assert (got != exact).mean() < 0.06  # rounded to nearest, not truncated (that would be ~50 %)


@pytest.mark.timeout(30)
def test_color_defaults_to_bt601_and_the_three_differ():
    w, h = 32, 16
    buf = random_yuv(w, h, seed=3)
    default = pixels_to_rgb("nv12", buf, width=w, height=h)
    np.testing.assert_array_equal(default, pixels_to_rgb("nv12", buf, width=w, height=h, color="bt601"))
    outs = [pixels_to_rgb("nv12", buf, width=w, height=h, color=c) for c in COLORS]
    assert all(max_diff(a, b) > 5 for i, a in enumerate(outs) for b in outs[i + 1:])


@pytest.mark.timeout(30)
def test_full_range_matches_pillows_jpeg_ycbcr():
    w, h = 96, 64
    buf = random_yuv(w, h, seed=7)
    y, u, v = planes(buf, w, h, vu=False)
    ref = np.asarray(Image.merge("YCbCr", [Image.fromarray(np.ascontiguousarray(p)) for p in (y, u, v)])
                     .convert("RGB"))
    assert max_diff(pixels_to_rgb("nv12", buf, width=w, height=h, color="full"), ref) <= 1


@needs_shared
@pytest.mark.timeout(60)
@pytest.mark.parametrize("color", COLORS)
def test_matches_ffmpeg_swscale_on_a_photo(color):
    av = pytest.importorskip("av")
    from av.video.reformatter import Interpolation
    rgb = photo()
    h, w = rgb.shape[:2]
    nv12 = av_nv12(rgb, color)
    cs, rng = AV_COLOR[color]
    # POINT: chroma repeated, as ours; ACCURATE_RND | FULL_CHR_H_INT: swscale's exact path (its
    # fast path is biased by about 1.5 levels)
    flags = Interpolation.POINT | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
    ref = av.VideoFrame.from_ndarray(nv12.reshape(h * 3 // 2, w), format="nv12").reformat(
        format="rgb24", src_colorspace=cs, src_color_range=rng, interpolation=flags).to_ndarray()
    got = pixels_to_rgb("nv12", nv12, width=w, height=h, color=color)
    assert max_diff(got, ref) <= 1
    # and the round trip RGB -> nv12 (swscale) -> RGB (ours) keeps the photo
    assert np.abs(got.astype(np.int16) - rgb).mean() < 2.0


@pytest.mark.timeout(30)
def test_rgb24_and_bgr24_are_the_pixels_and_any_buffer_is_accepted():
    w, h = 20, 10
    rgb = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for payload in (rgb, rgb.tobytes(), memoryview(rgb.tobytes()), bytearray(rgb.tobytes()),
                    zmq.Frame(rgb.tobytes())):
        np.testing.assert_array_equal(pixels_to_rgb("rgb24", payload, width=w, height=h), rgb)
    np.testing.assert_array_equal(pixels_to_rgb("bgr24", rgb[:, :, ::-1].tobytes(), width=w, height=h), rgb)
    # a non-contiguous array is read in its logical order
    np.testing.assert_array_equal(pixels_to_rgb("bgr24", rgb[:, :, ::-1], width=w, height=h), rgb)


@pytest.mark.timeout(30)
def test_pixels_to_input_is_preprocess_array_of_the_rgb_and_equals_a_png():
    cfg = InputConfig(size=32, resize=40)
    w, h = 64, 48
    buf = random_yuv(w, h, seed=11)
    first = pixels_to_input("nv12", buf, width=w, height=h, cfg=cfg)
    np.testing.assert_array_equal(first, preprocess_array(pixels_to_rgb("nv12", buf, width=w, height=h), cfg))
    keep = first.copy()
    second = pixels_to_input("nv21", random_yuv(w, h, seed=12), width=w, height=h, cfg=cfg)
    np.testing.assert_array_equal(first, keep)  # reused scratch memory never leaks into earlier results
    assert not np.array_equal(first, second)
    # raw rgb24 pixels give exactly what the same pixels as a PNG give
    import io
    rgb = pixels_to_rgb("nv12", buf, width=w, height=h).copy()
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    np.testing.assert_array_equal(pixels_to_input("rgb24", rgb, width=w, height=h, cfg=cfg),
                                  preprocess_encoded(png.getvalue(), cfg))


# ---------------------------------------------------------------------------------------------
# coded errors


@pytest.mark.timeout(30)
def test_size_mismatch_names_both_sizes():
    w, h = 16, 8
    for enc in PIXEL_ENCODINGS:
        n = payload_size(enc, w, h)
        for wrong in (n - 1, n + 1, 0):
            err = expect("SIZE_MISMATCH", enc, bytes(wrong), width=w, height=h)
            assert str(n) in err.detail and str(wrong) in err.detail
    assert payload_size("nv12", 1280, 720) == 1382400 and payload_size("rgb24", 4, 2) == 24


@pytest.mark.timeout(30)
def test_limits_are_the_image_limits_and_checked_before_any_pixel():
    lim = ImageLimits(max_pixels=10_000, max_side=200, min_side=8)
    expect("IMAGE_TOO_LARGE", "nv12", b"", width=202, height=8, limits=lim)      # a side
    expect("IMAGE_TOO_LARGE", "rgb24", b"", width=120, height=100, limits=lim)   # the pixel count
    expect("IMAGE_TOO_SMALL", "rgb24", bytes(6 * 8 * 3), width=6, height=8, limits=lim)
    expect("BAD_IMAGE", "nv12", b"", width=0, height=8)
    # a huge declared size with a tiny payload is refused at once, nothing allocated
    expect("IMAGE_TOO_LARGE", "nv12", b"x", width=1 << 20, height=1 << 20)
    # at the limits themselves: accepted
    pixels_to_rgb("nv12", bytes(100 * 100 * 3 // 2), width=100, height=100, limits=lim)
    pixels_to_rgb("rgb24", bytes(8 * 8 * 3), width=8, height=8, limits=lim)


@pytest.mark.timeout(30)
def test_bad_image_cases():
    expect("BAD_IMAGE", "nv12", bytes(15 * 8 * 3 // 2), width=15, height=8)     # odd width
    expect("BAD_IMAGE", "nv21", bytes(16 * 9 * 3 // 2), width=16, height=9)     # odd height
    expect("BAD_IMAGE", "yuyv", bytes(16 * 8 * 2), width=16, height=8)          # unknown encoding
    expect("BAD_IMAGE", "rgb24", bytes(16 * 8 * 3), width=16, height=8, color="bt709")
    expect("BAD_IMAGE", "nv12", bytes(16 * 8 * 3 // 2), width=16, height=8, color="srgb")
    expect("BAD_IMAGE", "rgb24", np.zeros((8, 16, 3), np.float32), width=16, height=8)
    expect("BAD_IMAGE", "rgb24", 12345, width=16, height=8)
    expect("BAD_IMAGE", "rgb24", bytes(16 * 8 * 3), width=16.0, height=8)
    expect("BAD_IMAGE", "rgb24", bytes(16 * 8 * 3), width=True, height=8)
    # check_pixels is the same check without a payload (what a server can do on receipt)
    with pytest.raises(ProtocolError) as info:
        check_pixels("nv12", 10, 16, 8, "bt601")
    assert info.value.code == "SIZE_MISMATCH"
    check_pixels("nv12", 192, 16, 8, "full")


# ---------------------------------------------------------------------------------------------
# the real model


def top1(session, x: np.ndarray) -> int:
    return int(np.argmax(session.run(None, {session.get_inputs()[0].name: x})[0]))


@needs_shared
@pytest.mark.timeout(120)
@pytest.mark.parametrize("encoding", PIXEL_ENCODINGS)
def test_coffee_is_espresso_in_every_encoding(session, encoding):
    rgb = photo("coffee.jpg")
    h, w = rgb.shape[:2]
    cfg = InputConfig()
    if encoding == "rgb24":
        payloads = [(rgb, None)]
    elif encoding == "bgr24":
        payloads = [(np.ascontiguousarray(rgb[:, :, ::-1]).tobytes(), None)]
    else:
        payloads = []
        for color in COLORS:
            nv12 = av_nv12(rgb, color)
            payloads.append((nv12 if encoding == "nv12" else nv12_to_nv21(nv12, w, h), color))
    for payload, color in payloads:
        x = pixels_to_input(encoding, payload, width=w, height=h, color=color, cfg=cfg)
        assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
        assert top1(session, x) == ESPRESSO, (encoding, color)
    if encoding == "rgb24":  # the same pixels as the decoded JPEG give the same tensor
        np.testing.assert_array_equal(pixels_to_input("rgb24", rgb, width=w, height=h, cfg=cfg),
                                      preprocess_array(rgb, cfg))


# ---------------------------------------------------------------------------------------------
# the wire: parse_submit


def submit(n_payload: int = 1, **fields) -> cp.Submit:
    return cp.parse_submit({"v": 1, "type": "submit", "seq": 0, **fields}, n_payload)


def submit_error(n_payload: int = 1, **fields) -> str:
    with pytest.raises(ProtocolError) as info:
        submit(n_payload, **fields)
    return info.value.code


def test_parse_submit_pixel_fields():
    s = submit(encoding="nv12", width=64, height=48)
    assert (s.encoding, s.pixels, s.width, s.height, s.color) == ("nv12", "nv12", 64, 48, "bt601")
    assert s.dtype is None and s.shape is None  # never mistaken for a raw tensor
    assert submit(encoding="nv21", width=64, height=48, color="full").color == "full"
    s = submit(encoding="rgb24", shape=[48, 64, 3])
    assert (s.pixels, s.width, s.height, s.color) == ("rgb24", 64, 48, None)
    assert submit(encoding="bgr24", width=64, height=48, dtype="uint8").height == 48
    assert submit(encoding="rgb24", width=64, height=48, shape=[48, 64, 3]).width == 64
    s = submit(0, encoding="shm", shm=1, slot=2, pixels="nv12", width=64, height=48, color="bt709")
    assert (s.encoding, s.pixels, s.shm, s.slot, s.color, s.dtype) == ("shm", "nv12", 1, 2, "bt709", None)
    assert submit(0, encoding="shm", shm=0, slot=0, dtype="float32", shape=[1, 3, 4, 4]).pixels is None
    for enc in PIXEL_ENCODINGS:
        assert enc in cp.ENCODINGS


@pytest.mark.parametrize("fields, code", [
    ({"encoding": "nv12", "height": 48}, "BAD_HEADER"),                             # no width
    ({"encoding": "nv12", "width": "64", "height": 48}, "BAD_HEADER"),
    ({"encoding": "nv12", "width": -2, "height": 48}, "BAD_HEADER"),
    ({"encoding": "nv12", "width": True, "height": 48}, "BAD_HEADER"),
    ({"encoding": "nv12", "width": 64, "height": 2 ** 21}, "BAD_HEADER"),
    ({"encoding": "nv12", "width": 64, "height": 48, "color": "srgb"}, "BAD_HEADER"),
    ({"encoding": "nv12", "width": 64, "height": 48, "shape": [72, 64]}, "BAD_HEADER"),
    ({"encoding": "nv12", "width": 64, "height": 48, "dtype": "uint8"}, "BAD_HEADER"),
    ({"encoding": "rgb24", "width": 64, "height": 48, "color": "bt601"}, "BAD_HEADER"),
    ({"encoding": "rgb24"}, "BAD_HEADER"),
    ({"encoding": "rgb24", "shape": [48, 64, 3], "dtype": "float32"}, "BAD_DTYPE"),
    ({"encoding": "rgb24", "shape": [48, 64, 4]}, "SHAPE_MISMATCH"),
    ({"encoding": "rgb24", "shape": [48, 64]}, "SHAPE_MISMATCH"),
    ({"encoding": "rgb24", "shape": [48, 64, 3], "width": 48, "height": 64}, "SHAPE_MISMATCH"),
    ({"encoding": "raw", "pixels": "nv12", "dtype": "uint8", "shape": [1]}, "BAD_HEADER"),
    ({"encoding": "yuv420p", "width": 64, "height": 48}, "BAD_HEADER"),
])
def test_parse_submit_refuses_bad_pixel_fields(fields, code):
    assert submit_error(**fields) == code


def test_parse_submit_pixel_frame_counts():
    assert submit_error(0, encoding="rgb24", shape=[8, 8, 3]) == "BAD_FRAMES"
    assert submit_error(2, encoding="nv12", width=8, height=8) == "BAD_FRAMES"
    assert submit_error(1, encoding="shm", shm=0, slot=0, pixels="nv12", width=8, height=8) == "BAD_FRAMES"
    assert submit_error(0, encoding="shm", shm=0, slot=0, pixels="yuyv", width=8, height=8) == "BAD_HEADER"
    assert submit_error(0, encoding="shm", shm=0, slot=0, pixels=None, width=8, height=8) == "BAD_HEADER"
    assert "SIZE_MISMATCH" in cp.ERROR_CODES


# ---------------------------------------------------------------------------------------------
# Client.submit on a real socket


@pytest.fixture
def router(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/r.sock"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close(linger=0)
    ctx.term()


def receive(sock: zmq.Socket) -> tuple[bytes, dict, list[bytes]]:
    assert sock.poll(10_000), "nothing arrived"
    ident, head, *payload = sock.recv_multipart()
    return ident, cp.decode_header(head), payload


@pytest.mark.timeout(30)
def test_client_submit_sends_pixel_headers_that_parse(router):
    sock, endpoint = router
    rgb = np.random.default_rng(2).integers(0, 256, (10, 16, 3), dtype=np.uint8)
    nv12 = random_yuv(16, 10).reshape(15, 16)
    with Client(endpoint, timeout=10) as c:
        c.submit(rgb, stream="a", encoding="rgb24")
        c.submit(rgb[:, :, ::-1], stream="a", encoding="bgr24")           # non-contiguous: copied
        c.submit(nv12, stream="b", encoding="nv12", color="bt709")          # [H*3/2, W]: size from the array
        c.submit(nv12.tobytes(), stream="b", encoding="nv21", width=16, height=10)
        sent = [receive(sock) for _ in range(4)]
        for bad in (dict(data=nv12.tobytes(), encoding="nv12"),                        # no size
                    dict(data=nv12.tobytes(), encoding="nv12", width=16, height=12),  # wrong size
                    dict(data=rgb, encoding="rgb24", width=10, height=16),            # disagrees with the array
                    dict(data=rgb, encoding="rgb24", color="full"),
                    dict(data=rgb.astype(np.float32), encoding="rgb24"),
                    dict(data=rgb, encoding="jpeg", width=16)):
            with pytest.raises(ValueError):
                c.submit(stream="x", **bad)
    subs = [cp.parse_submit(head, len(payload)) for _, head, payload in sent]
    assert [(s.stream, s.seq, s.pixels, s.width, s.height, s.color) for s in subs] == [
        ("a", 0, "rgb24", 16, 10, None), ("a", 1, "bgr24", 16, 10, None),
        ("b", 0, "nv12", 16, 10, "bt709"), ("b", 1, "nv21", 16, 10, "bt601")]
    for (_, _, payload), s in zip(sent, subs):
        np.testing.assert_array_equal(
            pixels_to_rgb(s.pixels, payload[0], width=s.width, height=s.height, color=s.color),
            rgb if s.pixels.startswith(("rgb", "bgr")) else pixels_to_rgb(
                s.pixels, nv12, width=16, height=10, color=s.color))


@pytest.mark.timeout(30)
def test_client_submit_writes_pixel_frames_into_shared_memory(router):
    sock, endpoint = router
    nv12 = random_yuv(64, 48, seed=5)
    with Client(endpoint, timeout=10) as c:
        def answer_register():
            ident, head, _ = receive(sock)
            assert head["type"] == "shm_register" and head["slot_bytes"] == 4608
            sock.send_multipart([ident, cp.encode({"type": "shm_registered", "shm": 0, "slots": 2,
                                                   "slot_bytes": head["slot_bytes"]})])
            return head

        import threading
        got: list = []
        th = threading.Thread(target=lambda: got.append(answer_register()))
        th.start()
        assert c.enable_shm(slots=2, slot_bytes=payload_size("nv12", 64, 48), lane=False)  # (this router: no lane)
        th.join(10)
        region = attach_region(got[0]["name"], 2, got[0]["slot_bytes"])
        try:
            c.submit(nv12, stream="s", encoding="nv12", width=64, height=48, color="full")
            _, head, payload = receive(sock)
            sub = cp.parse_submit(head, len(payload))
            assert (sub.encoding, sub.pixels, sub.width, sub.height, sub.color) == ("shm", "nv12", 64, 48, "full")
            slot = region.view(sub.slot, "uint8", (payload_size(sub.pixels, sub.width, sub.height),))
            np.testing.assert_array_equal(slot, nv12)
            # a frame larger than a slot goes over the socket
            big = np.zeros((48, 64, 3), np.uint8)
            c.submit(big, stream="s", encoding="rgb24")
            _, head, payload = receive(sock)
            assert head["encoding"] == "rgb24" and len(payload[0]) == big.nbytes
            del slot
        finally:
            region.close()
