"""The one table of tensor element types: numpy name <-> ONNX TensorProto code <-> onnxruntime type
string <-> the one-byte code on the stage wire <-> item size. Every module that names a dtype uses
this table. Pure Python on purpose (no numpy, no onnx): worker processes import it before they pin
themselves, and numpy starts threads when it is imported."""

from __future__ import annotations

# numpy name, ONNX TensorProto code (onnx.TensorProto.FLOAT == 1, ...), onnxruntime type string,
# wire code (never reuse one), bytes per element
_TABLE = (
    ("float32", 1, "tensor(float)", 1, 4),
    ("float16", 10, "tensor(float16)", 2, 2),
    ("float64", 11, "tensor(double)", 3, 8),
    ("int8", 3, "tensor(int8)", 4, 1),
    ("uint8", 2, "tensor(uint8)", 5, 1),
    ("int32", 6, "tensor(int32)", 6, 4),
    ("int64", 7, "tensor(int64)", 7, 8),
    ("bool", 9, "tensor(bool)", 8, 1),
    ("int16", 5, "tensor(int16)", 9, 2),
    ("uint16", 4, "tensor(uint16)", 10, 2),
)

ONNX_TO_NUMPY: dict[int, str] = {o: n for n, o, _, _, _ in _TABLE}
NUMPY_TO_ONNX: dict[str, int] = {n: o for n, o, _, _, _ in _TABLE}
ORT_TO_NUMPY: dict[str, str] = {t: n for n, _, t, _, _ in _TABLE}
WIRE_CODES: dict[str, int] = {n: c for n, _, _, c, _ in _TABLE}
WIRE_DTYPES: dict[int, str] = {c: n for n, _, _, c, _ in _TABLE}
ITEMSIZE: dict[str, int] = {n: b for n, _, _, _, b in _TABLE}
