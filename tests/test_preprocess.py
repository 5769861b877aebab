"""Tests of hetsched.model.preprocess (pure, fast): decoding limits, preprocessing, top-k."""

from __future__ import annotations

import importlib.util
import io
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

import hetsched.model.preprocess as pp
from hetsched.config import InputConfig
from hetsched.errors import ConfigError, ProtocolError
from hetsched.model.preprocess import (
    ImageLimits,
    decode_image,
    load_labels,
    looks_like_probabilities,
    model_input_shape,
    preprocess_array,
    preprocess_encoded,
    sniff_format,
    softmax,
    top_k,
)

pytestmark = pytest.mark.timeout(60)  # nothing here may hang

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "squeezenet1.1.onnx"
LABELS = SHARED / "models" / "imagenet_synset_words.txt"
IMAGES = SHARED / "images"
VERIFY = SHARED / "models" / "tools" / "verify.py"
needs_shared = pytest.mark.skipif(not (MODEL.is_file() and LABELS.is_file() and IMAGES.is_dir()),
                                  reason=f"shared model and photos not found under {SHARED}")

# README.txt top-3 of shared/models/squeezenet1.1.onnx (verify.py, onnxruntime) per photo.
REFERENCE = {
    "chelsea.jpg": [(285, "Egyptian cat", 0.646), (281, "tabby", 0.170), (282, "tiger cat", 0.164)],
    "coffee.jpg": [(967, "espresso", 0.855), (925, "consomme", 0.107), (968, "cup", 0.015)],
}
TOP1_OK = {"chelsea.jpg": {281, 282, 285}, "coffee.jpg": {967}}


# ---------------------------------------------------------------------------------------------
# helpers


def synthetic(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some noise (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=2)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int, bit_depth: int = 1, full: bool = True) -> bytes:
    """A greyscale PNG of zeros: tiny encoded, width*height pixels decoded. ``full=False`` writes
    only the header and a token IDAT (a header that lies)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = bytes(1 + (width * bit_depth + 7) // 8)  # filter byte 0 + zero pixels
    parts = [comp.compress(row) for _ in range(height if full else 1)]
    idat = b"".join(parts) + comp.flush()
    return pp._PNG_MAGIC + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def reference_preprocess(rgb: np.ndarray, cfg: InputConfig) -> np.ndarray:
    """Independent restatement of shared/models/tools/verify.py's preprocess for any cfg (NCHW, RGB)."""
    img = Image.fromarray(rgb)
    w, h = img.size
    s = cfg.resize / min(w, h)
    img = img.resize((max(cfg.resize, round(w * s)), max(cfg.resize, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - cfg.size) // 2, (h - cfg.size) // 2
    img = img.crop((left, top, left + cfg.size, top + cfg.size))
    x = (np.asarray(img, np.float32) / 255.0 - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
    return x.transpose(2, 0, 1)[None].copy()


def expect_error(code: str, data, limits: ImageLimits = ImageLimits(), within: float = 5.0) -> ProtocolError:
    t0 = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        decode_image(data, limits)
    assert info.value.code == code, f"expected {code}, got {info.value}"
    assert time.monotonic() - t0 < within
    return info.value


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# the real model on real photos


@pytest.fixture(scope="module")
def session():
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])


@needs_shared
@pytest.mark.parametrize("photo", sorted(REFERENCE))
def test_reference_photos_match_readme(session, photo):
    labels = load_labels(str(LABELS))
    x = preprocess_encoded((IMAGES / photo).read_bytes(), InputConfig())
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    top = top_k(out, 5, labels)
    assert len(top) == 5
    assert top[0]["index"] in TOP1_OK[photo]
    for got, (index, name, score) in zip(top, REFERENCE[photo]):
        assert got["index"] == index and name in got["label"]
        assert abs(got["score"] - score) < 0.02, (photo, got, score)
    assert ("cat" if photo == "chelsea.jpg" else "espresso") in top[0]["label"]


@needs_shared
@pytest.mark.skipif(not VERIFY.is_file(), reason="verify.py not shipped")
@pytest.mark.parametrize("photo", sorted(REFERENCE))
def test_bit_identical_to_reference_tool(photo):
    pytest.importorskip("onnxruntime")  # verify.py imports it
    spec = importlib.util.spec_from_file_location("shared_verify", VERIFY)
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    data = (IMAGES / photo).read_bytes()
    ours = preprocess_encoded(data, InputConfig())
    theirs = verify.preprocess(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# preprocess_array: shapes, layout, channel order, rounding


def test_shapes_layouts_and_channel_order():
    data = encode(synthetic(320, 240), "PNG")
    rgb = decode_image(data)
    assert rgb.dtype == np.uint8 and rgb.shape == (240, 320, 3)
    base = InputConfig(size=64, resize=72)
    nchw = preprocess_encoded(data, base)
    nhwc = preprocess_encoded(data, InputConfig(size=64, resize=72, layout="NHWC"))
    bgr = preprocess_encoded(data, InputConfig(size=64, resize=72, channel_order="BGR"))
    bgr_nhwc = preprocess_encoded(data, InputConfig(size=64, resize=72, channel_order="BGR", layout="NHWC"))
    for x, cfg_shape in ((nchw, (1, 3, 64, 64)), (nhwc, (1, 64, 64, 3)), (bgr, (1, 3, 64, 64)),
                         (bgr_nhwc, (1, 64, 64, 3))):
        assert x.shape == cfg_shape and x.dtype == np.float32 and x.flags.c_contiguous
    assert model_input_shape(base) == (1, 3, 64, 64)
    assert model_input_shape(InputConfig(size=64, layout="NHWC")) == (1, 64, 64, 3)
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(bgr, nchw[:, ::-1])
    np.testing.assert_array_equal(bgr_nhwc, nhwc[..., ::-1])
    assert not np.array_equal(bgr, nchw)


def test_normalisation_values():
    rgb = np.empty((40, 50, 3), np.uint8)
    rgb[...] = (10, 128, 250)
    cfg = InputConfig(size=16, resize=20, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = preprocess_array(rgb, cfg)
    expected = [(10 / 255 - 0.5) / 0.5, (128 / 255 - 0.25) / 0.25, (250 / 255) / 2.0]
    for c in range(3):
        np.testing.assert_allclose(x[0, c], expected[c], rtol=1e-5)
    scaled = preprocess_array(rgb, InputConfig(size=16, resize=20, mean=(0, 0, 0), std=(1, 1, 1), scale=1.0))
    np.testing.assert_allclose(scaled[0, :, 0, 0], [10, 128, 250])


@pytest.mark.parametrize("w,h,resize,size", [
    (451, 300, 256, 224),   # landscape, odd resized width (385)
    (300, 451, 256, 224),   # portrait
    (257, 259, 256, 224),   # near-square
    (100, 60, 40, 32),      # upscale... and (h - size) odd
    (65, 97, 30, 27),       # (new - size) = 3 mod 4: floor and round-half-even differ here
    (50, 50, 50, 50),       # no resize, no crop
    (40, 30, 20, 24),       # crop larger than the resized image: zero overhang
    (33, 70, 16, 40),
])
def test_matches_reference_rounding(w, h, resize, size):
    rgb = synthetic(w, h, seed=w * h)
    cfg = InputConfig(size=size, resize=resize)
    np.testing.assert_array_equal(preprocess_array(rgb, cfg), reference_preprocess(rgb, cfg))


def test_windowed_resize_equals_full_resize(monkeypatch):
    cases = [(451, 300, 256, 224), (300, 451, 256, 224), (1000, 33, 256, 224), (40, 30, 20, 24)]
    full = {c: preprocess_array(synthetic(c[0], c[1]), InputConfig(size=c[3], resize=c[2])) for c in cases}
    monkeypatch.setattr(pp, "_FULL_RESIZE_MAX_PIXELS", 0)
    one_level = 1.0 / 255.0 / min(InputConfig().std) + 1e-6
    for c, ref in full.items():
        got = preprocess_array(synthetic(c[0], c[1]), InputConfig(size=c[3], resize=c[2]))
        assert got.shape == ref.shape
        # Pillow's uint8 intermediate pass (and its pass order) may differ: one grey level at most
        assert np.abs(got - ref).max() <= one_level
        assert np.abs(got - ref).mean() < one_level / 2


def test_extreme_aspect_ratio_is_bounded():
    # 8 x 16384 would resize to 256 x 524288 (400 MB): only the crop window is computed.
    strip = synthetic(16384, 8)
    before = maxrss_mb()
    t0 = time.monotonic()
    x = preprocess_encoded(encode(strip, "PNG"), InputConfig())
    assert time.monotonic() - t0 < 5.0
    assert x.shape == (1, 3, 224, 224) and np.all(np.isfinite(x))
    assert maxrss_mb() - before < 50


def test_preprocess_array_rejects_bad_arrays():
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32),
                np.zeros((0, 8, 3), np.uint8), "not an array"):
        with pytest.raises(ProtocolError) as info:
            preprocess_array(bad, InputConfig())
        assert info.value.code == "BAD_IMAGE"
    with pytest.raises(ValueError, match="layout"):
        preprocess_array(np.zeros((8, 8, 3), np.uint8), InputConfig(layout="CHW"))
    # non-contiguous input is fine
    rgb = synthetic(64, 48)
    np.testing.assert_array_equal(preprocess_array(rgb[:, ::-1][:, ::-1], InputConfig(size=32, resize=40)),
                                  preprocess_array(rgb, InputConfig(size=32, resize=40)))


# ---------------------------------------------------------------------------------------------
# decode_image: formats, modes, orientation


def test_sniff_format():
    assert sniff_format(encode(synthetic(16, 16), "JPEG")) == "jpeg"
    assert sniff_format(memoryview(encode(synthetic(16, 16), "PNG"))) == "png"
    assert sniff_format(encode(synthetic(16, 16), "GIF")) is None
    assert sniff_format(b"") is None
    assert sniff_format(b"\xff\xd8") is None


def test_accepts_bytes_like_inputs():
    data = encode(synthetic(20, 10), "PNG")
    ref = decode_image(data)
    for form in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8),
                 np.frombuffer(data, np.uint8).copy()):
        np.testing.assert_array_equal(decode_image(form), ref)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I;16", "CMYK", "P+transparency"])
def test_converts_modes_to_rgb(mode):
    rgb = synthetic(24, 16)
    if mode == "I;16":
        img = Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257))
        fmt = "PNG"
    elif mode == "CMYK":
        img, fmt = Image.fromarray(rgb).convert("CMYK"), "JPEG"
    elif mode == "P+transparency":
        img, fmt = Image.fromarray(rgb).convert("P"), "PNG"
        img.info["transparency"] = 0
    else:
        img, fmt = Image.fromarray(rgb).convert(mode), "PNG"
    data = encode(img, fmt, **({"transparency": 0} if mode == "P+transparency" else {}))
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode.startswith(mode.split("+")[0][0])
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.shape == (16, 24, 3)
    if mode == "I;16":  # 16 bits scaled down, not clipped to white
        np.testing.assert_array_equal(out[:, :, 1], rgb[:, :, 0])
    if mode == "L":
        np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_exif_orientation_applied_for_jpeg():
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(rgb, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (32, 16, 3)
    assert out[:16].mean() > 200 and out[16:].mean() < 50  # the white half is now on top
    exif[0x0112] = 1
    assert decode_image(encode(rgb, "JPEG", exif=exif.tobytes())).shape == (16, 32, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_imageops(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(synthetic(20, 12), "JPEG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data), expected)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored():
    data = encode(synthetic(32, 16), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\xff\xff\xff\xf0garbage")
    assert decode_image(data).shape == (16, 32, 3)


# ---------------------------------------------------------------------------------------------
# decode_image: bad inputs, limits


def test_garbage_and_empty():
    rng = np.random.default_rng(1)
    expect_error("BAD_IMAGE", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error("BAD_IMAGE", b"")
    expect_error("BAD_IMAGE", memoryview(b""))
    expect_error("BAD_IMAGE", pp._JPEG_MAGIC + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error("BAD_IMAGE", pp._PNG_MAGIC + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = expect_error("BAD_IMAGE", "a string, not bytes")
    assert "str" in err.detail


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_refused(fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = encode(synthetic(128, 96), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    err = expect_error("BAD_IMAGE", data[: len(data) // 2])
    assert "truncated" in err.detail or "corrupt" in err.detail
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_refuses_to_run_with_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(synthetic(16, 16), "PNG"))


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fails the test if Pillow decodes any pixel data."""
    calls = []
    real_load = ImageFile.ImageFile.load

    def load(self, *a, **kw):
        calls.append(self.size)
        return real_load(self, *a, **kw)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    yield calls
    assert calls == [], f"pixels were decoded for {calls}"


def test_decompression_bomb_png_refused_before_decoding(no_pixel_decoding):
    bomb = bomb_png(30000, 30000, bit_depth=1)  # 900 M pixels from ~100 kB
    assert len(bomb) < 1_000_000
    liar = bomb_png(100000, 100000, bit_depth=8, full=False)  # header claims 10^10 pixels
    before = maxrss_mb()
    for data in (bomb, liar):
        err = expect_error("IMAGE_TOO_LARGE", data, within=2.0)
        assert "pixels" in err.detail or "side" in err.detail
    # within every side limit but over the pixel budget: 8000 x 8000 = 64 M > 40 M
    expect_error("IMAGE_TOO_LARGE", bomb_png(8000, 8000, full=False), within=2.0)
    # a side over max_side, few pixels
    expect_error("IMAGE_TOO_LARGE", bomb_png(20000, 8, full=False), within=2.0)
    assert maxrss_mb() - before < 50


def test_pillow_bomb_check_is_a_second_line(no_pixel_decoding):
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS * 2 >= 900_000_000:
        pytest.skip("Pillow's bomb limit is disabled or above 450 M pixels in this process")
    lax = ImageLimits(max_pixels=10**12, max_side=10**6)
    before = maxrss_mb()
    err = expect_error("IMAGE_TOO_LARGE", bomb_png(30000, 30000, bit_depth=1), lax, within=2.0)
    assert "decompression" in err.detail.lower()
    assert maxrss_mb() - before < 50


def test_too_small():
    err = expect_error("IMAGE_TOO_SMALL", encode(synthetic(4, 4), "PNG"))
    assert "4x4" in err.detail
    expect_error("IMAGE_TOO_SMALL", encode(synthetic(100, 4), "JPEG"))
    assert decode_image(encode(synthetic(8, 8), "PNG")).shape == (8, 8, 3)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_unsupported_formats(fmt):
    try:
        data = encode(synthetic(32, 32), fmt)
    except (KeyError, OSError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    err = expect_error("BAD_IMAGE", data)
    assert fmt.lower() in err.detail.lower() and "JPEG or PNG" in err.detail


def test_encoded_size_limit():
    data = encode(synthetic(64, 64), "PNG")
    err = expect_error("TOO_LARGE", data, ImageLimits(max_encoded_bytes=len(data) - 1))
    assert str(len(data)) in err.detail
    assert decode_image(data, ImageLimits(max_encoded_bytes=len(data))).shape == (64, 64, 3)
    expect_error("TOO_LARGE", bytes(ImageLimits().max_encoded_bytes + 1))


def test_jpeg_scan_count_limit():
    data = encode(synthetic(32, 32), "JPEG")
    # an APP15 segment is skipped by decoders, but FF DA pairs still count: cheap upper bound
    payload = b"\xff\xda" * (pp._MAX_JPEG_SCANS + 1)
    many = data[:2] + b"\xff\xef" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    err = expect_error("BAD_IMAGE", many)
    assert "scans" in err.detail
    assert decode_image(encode(synthetic(64, 64), "JPEG", progressive=True)).shape == (64, 64, 3)


# ---------------------------------------------------------------------------------------------
# fuzzing: decode_image returns uint8 HxWx3 or raises ProtocolError, nothing else

FUZZ_LIMITS = ImageLimits(max_pixels=1_000_000, max_side=4096)  # keeps mutated headers cheap


def _fuzz_bases() -> list[bytes]:
    rgb = synthetic(24, 16, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 8
    return [
        encode(rgb, "JPEG", quality=80),
        encode(rgb, "JPEG", progressive=True, exif=exif.tobytes()),
        encode(Image.fromarray(rgb).convert("L"), "JPEG"),
        encode(rgb, "PNG"),
        encode(Image.fromarray(rgb).convert("P"), "PNG"),
        encode(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 200), "PNG"),
        encode(Image.fromarray(rgb).convert("RGBA"), "PNG", optimize=True),
    ]


FUZZ_BASES = _fuzz_bases()


def _check_decode(data: bytes) -> None:
    try:
        out = decode_image(data, FUZZ_LIMITS)
    except ProtocolError as exc:
        assert exc.code in ("BAD_IMAGE", "IMAGE_TOO_LARGE", "IMAGE_TOO_SMALL", "TOO_LARGE")
        return
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    h, w = out.shape[:2]
    assert min(h, w) >= FUZZ_LIMITS.min_side and h * w <= FUZZ_LIMITS.max_pixels


FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(prefix=st.sampled_from([b"", pp._JPEG_MAGIC, pp._PNG_MAGIC, pp._PNG_MAGIC + b"\x00\x00\x00\x0dIHDR"]),
       body=st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(prefix, body):
    _check_decode(prefix + body)


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(FUZZ_BASES)))
    for _ in range(draw(st.integers(1, 8))):
        # mostly past the magic bytes, which only lead to the trivial "not JPEG/PNG" refusal
        lo = 0 if draw(st.integers(0, 4)) == 0 else min(8, len(data) - 1)
        pos = draw(st.integers(lo, len(data) - 1))
        op = draw(st.sampled_from(["set", "flip", "insert", "delete"]))
        if op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:pos + draw(st.integers(1, 16))]
        if not data:
            break
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
@given(mutated_images())
def test_fuzz_mutated_images(data):
    _check_decode(data)


# ---------------------------------------------------------------------------------------------
# postprocessing


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([1000.0, 1001.0, 999.0], np.float32))
    assert p.dtype == np.float32 and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert p.argmax() == 1
    np.testing.assert_allclose(softmax(np.array([[0.0, 0.0], [0.0, np.log(3.0)]])), [[0.5, 0.5], [0.25, 0.75]])
    assert softmax(np.array([-np.inf, 0.0]))[1] == 1.0


def test_looks_like_probabilities():
    assert looks_like_probabilities(np.array([0.2, 0.3, 0.5], np.float32))
    assert not looks_like_probabilities(np.array([0.2, 0.3, 0.4]))
    assert not looks_like_probabilities(np.array([-0.5, 1.5]))
    assert not looks_like_probabilities(np.array([2.0, -1.0]))
    assert not looks_like_probabilities(np.array([np.nan, 1.0]))
    assert not looks_like_probabilities(np.array([]))


def test_top_k_applies_softmax_to_logits():
    logits = np.array([[1.0, 3.0, 2.0, -1.0]], np.float32)
    top = top_k(logits, 2)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert [t["index"] for t in top] == [1, 2]
    assert top[0]["score"] == pytest.approx(float(p[1]), rel=1e-6)
    assert top[1]["score"] == pytest.approx(float(p[2]), rel=1e-6)
    assert all("label" not in t for t in top)
    assert all(type(t["index"]) is int and type(t["score"]) is float for t in top)


def test_top_k_keeps_probabilities():
    probs = np.array([0.1, 0.6, 0.3], np.float32).reshape(1, 3, 1, 1)
    top = top_k(probs, 3)
    assert [t["index"] for t in top] == [1, 2, 0]
    assert [t["score"] for t in top] == pytest.approx([0.6, 0.3, 0.1], rel=1e-6)


def test_top_k_larger_than_classes_and_labels():
    top = top_k(np.array([0.5, 2.0, 1.0]), 10, ["a", "b", "c"])
    assert [(t["index"], t["label"]) for t in top] == [(1, "b"), (2, "c"), (0, "a")]
    assert sum(t["score"] for t in top) == pytest.approx(1.0)
    assert top_k(np.array([1.0, 2.0]), 0) == []
    assert [t["index"] for t in top_k(np.zeros(4), 4)] == [0, 1, 2, 3]  # ties: lower index first


def test_top_k_rejects_bad_outputs():
    with pytest.raises(ValueError, match="one class vector"):
        top_k(np.zeros((2, 10)), 3)
    with pytest.raises(ValueError, match="empty"):
        top_k(np.zeros((1, 0)), 3)
    with pytest.raises(ValueError, match="labels"):
        top_k(np.zeros(10), 3, ["a", "b"])


def test_load_labels(tmp_path):
    assert load_labels(None) is None
    f = tmp_path / "labels.txt"
    f.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\nplain label\n\n\n", encoding="utf-8")
    assert load_labels(str(f)) == ["tench, Tinca tinca", "goldfish", "plain label"]
    with pytest.raises(ConfigError, match="cannot read"):
        load_labels(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="no labels"):
        load_labels(str(tmp_path / "empty.txt"))


@needs_shared
def test_load_shared_labels():
    labels = load_labels(str(LABELS))
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca" and labels[285] == "Egyptian cat" and labels[967] == "espresso"
