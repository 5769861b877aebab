"""The one table of tensor element types: numpy name <-> ONNX TensorProto code <-> onnxruntime type
string <-> the one-byte code on the stage wire. Every module that names a dtype uses this table."""

from __future__ import annotations

import onnx

# numpy name, ONNX TensorProto code, onnxruntime type string, wire code (never reuse a wire code)
_TABLE = (
    ("float32", onnx.TensorProto.FLOAT, "tensor(float)", 1),
    ("float16", onnx.TensorProto.FLOAT16, "tensor(float16)", 2),
    ("float64", onnx.TensorProto.DOUBLE, "tensor(double)", 3),
    ("int8", onnx.TensorProto.INT8, "tensor(int8)", 4),
    ("uint8", onnx.TensorProto.UINT8, "tensor(uint8)", 5),
    ("int32", onnx.TensorProto.INT32, "tensor(int32)", 6),
    ("int64", onnx.TensorProto.INT64, "tensor(int64)", 7),
    ("bool", onnx.TensorProto.BOOL, "tensor(bool)", 8),
    ("int16", onnx.TensorProto.INT16, "tensor(int16)", 9),
    ("uint16", onnx.TensorProto.UINT16, "tensor(uint16)", 10),
)

ONNX_TO_NUMPY: dict[int, str] = {o: n for n, o, _, _ in _TABLE}
NUMPY_TO_ONNX: dict[str, int] = {n: o for n, o, _, _ in _TABLE}
ORT_TO_NUMPY: dict[str, str] = {t: n for n, _, t, _ in _TABLE}
WIRE_CODES: dict[str, int] = {n: c for n, _, _, c in _TABLE}
WIRE_DTYPES: dict[int, str] = {c: n for n, _, _, c in _TABLE}
