"""The two kinds of traffic every contender gets, frame for frame the same: raw tensors of the model's
input shape (seeded random), and JPEG photos (``../shared/images/*.jpg`` beside the checkout when
present, else synthetic photo-like JPEGs at a camera's 640 x 480). Each comes with the unsplit
model's outputs for its frames (1-thread onnxruntime; for JPEG after the service's own
preprocessing code), to check hetsched's outputs against."""

from __future__ import annotations

import dataclasses
import glob
import io
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from hetsched.errors import HetschedError
from hetsched.observe import metrics


@dataclass
class Traffic:
    kind: str                 # metrics.RAW or metrics.ENCODED
    names: list[str]
    payloads: list[Any]       # what the client sends: np.ndarray (raw) or JPEG bytes
    reference: np.ndarray     # the unsplit model's first output per frame
    source: str               # human description
    files: list[str] = dataclasses.field(default_factory=list)  # JPEG files (for the onnxruntime processes)

    def frames(self) -> Iterator[tuple[str, Any]]:
        """Endless (name, payload) in order, as ``hetsched.client.feed.feed`` takes them."""
        k = 0
        while True:
            i = k % len(self.payloads)
            yield f"{self.names[i]}#{k}", self.payloads[i]
            k += 1


def model_io(model_bytes: bytes) -> tuple[str, list[int], str]:
    """(input name, static shape, numpy dtype) of the model's first input."""
    from hetsched.host.ort import create_session
    from hetsched.wire.dtypes import ORT_TO_NUMPY
    inp = create_session(model_bytes, 1).get_inputs()[0]
    if not all(isinstance(d, int) for d in inp.shape):
        raise HetschedError(f"model input {inp.name} has a dynamic shape {inp.shape}; the benchmark needs a static one")
    dtype = ORT_TO_NUMPY.get(inp.type)
    if dtype is None:
        raise HetschedError(f"model input type {inp.type} is not supported by the benchmark")
    return inp.name, list(inp.shape), dtype


def _reference(model_bytes: bytes, input_name: str, tensors: list[np.ndarray]) -> np.ndarray:
    from hetsched.host.ort import create_session
    sess = create_session(model_bytes, 1)
    return np.stack([sess.run(None, {input_name: x})[0] for x in tensors])


def raw_traffic(model_bytes: bytes, n: int, seed: int) -> Traffic:
    name, shape, dtype = model_io(model_bytes)
    rng = np.random.default_rng(seed)
    pool = [np.ascontiguousarray(rng.standard_normal(shape).astype(dtype)) for _ in range(n)]
    return Traffic(metrics.RAW, [f"tensor{i}" for i in range(n)], pool, _reference(model_bytes, name, pool),
                   f"{n} seeded random tensors {dtype}{shape}")


def default_images_dir() -> str | None:
    """``../shared/images`` beside the checkout, if it holds JPEGs."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    d = os.path.join(os.path.dirname(root), "shared", "images")
    return d if glob.glob(os.path.join(d, "*.jpg")) else None


def synthetic_jpegs(n: int = 6, width: int = 640, height: int = 480, seed: int = 0) -> list[tuple[str, bytes]]:
    """Photo-like JPEGs (smooth colour fields, edges and sensor noise), quality 90, camera size."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for i in range(n):
        fx, fy = rng.uniform(0.5, 3.0, 2)
        base = [128 + 100 * np.sin(fx * xx / width * np.pi + c) * np.cos(fy * yy / height * np.pi - c)
                for c in (0.0, 1.0, 2.0)]
        img = np.stack(base, -1) + rng.normal(0, 10, (height, width, 3))
        img[int(height * 0.3):int(height * 0.6), int(width * 0.2):int(width * 0.5)] *= 0.5  # an object
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append((f"synthetic{i}.jpg", buf.getvalue()))
    return out


def jpeg_traffic(model_bytes: bytes, input_cfg: Any, images_dir: str | None, tmp: str) -> Traffic:
    """JPEG photos from ``images_dir`` (or the default directory, or synthetic ones written to ``tmp``);
    the reference runs the service's preprocessing (``preprocess_encoded`` with the scenario's input
    config) and the unsplit model."""
    from hetsched.model.preprocess import preprocess_encoded
    d = images_dir or default_images_dir()
    files = sorted(glob.glob(os.path.join(d, "*.jpg")) + glob.glob(os.path.join(d, "*.jpeg"))) if d else []
    if images_dir and not files:
        raise HetschedError(f"no *.jpg images in {images_dir}: give a directory of JPEG photos (--images)")
    if files:
        items = [(os.path.basename(f), open(f, "rb").read()) for f in files]
        source = f"{len(files)} JPEG photos from {d}"
    else:
        items = synthetic_jpegs()
        os.makedirs(os.path.join(tmp, "jpeg"), exist_ok=True)
        for name, data in items:
            files.append(os.path.join(tmp, "jpeg", name))
            with open(files[-1], "wb") as fh:
                fh.write(data)
        source = f"{len(items)} synthetic 640 x 480 JPEGs (no ../shared/images)"
    name, _, _ = model_io(model_bytes)
    tensors = [preprocess_encoded(data, input_cfg) for _, data in items]
    return Traffic(metrics.ENCODED, [n for n, _ in items], [data for _, data in items],
                   _reference(model_bytes, name, tensors), source, files)


def make_traffic(kind: str, model_bytes: bytes, input_cfg: Any, opts: Any, tmp: str) -> Traffic:
    if kind == metrics.RAW:
        return raw_traffic(model_bytes, opts.pool, opts.seed)
    if kind == metrics.ENCODED:
        return jpeg_traffic(model_bytes, input_cfg, opts.images, tmp)
    raise HetschedError(f"unknown traffic {kind!r}: use {' or '.join(metrics.TRAFFIC_KINDS)}")
