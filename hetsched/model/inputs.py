"""The model's input as preprocessing must make it: layout and dtype decided from the model.

``input.layout: auto`` (the default) is NHWC when the model input is ``[1, H, W, 3]`` and NCHW
otherwise; ``input.dtype: auto`` is the model input's dtype (float32, float16 or uint8). The
runtime calls :func:`resolve_input_config` once the model is analysed and hands the result to
``hetsched.model.preprocess.preprocess_array``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from hetsched.config import InputConfig
from hetsched.errors import ConfigError

PREPROCESS_DTYPES = ("float32", "float16", "uint8")


def model_input_layout(shape: Sequence[int]) -> str | None:
    """NHWC for a [1, H, W, 3] input, NCHW for [1, 3, H, W] (also when both fit), None otherwise."""
    if len(shape) != 4:
        return None
    if shape[1] == 3:
        return "NCHW"
    return "NHWC" if shape[3] == 3 else None


def resolve_input_config(cfg: InputConfig, model_input: Any) -> InputConfig:
    """``cfg`` with ``layout: auto`` and ``dtype: auto`` decided from the model input (a TensorInfo:
    ``.name``, ``.shape``, ``.dtype``) and checked against it: NHWC when the input is [1, H, W, 3]
    and the config does not say otherwise, the input's dtype. Raises ConfigError naming the key when
    the config and the model disagree (e.g. ``input.size`` is not the model's H = W)."""
    if cfg.layout not in ("NCHW", "NHWC", "auto") or cfg.dtype not in PREPROCESS_DTYPES + ("auto",):
        raise ConfigError(f"input.layout / input.dtype: unknown value {cfg.layout!r} / {cfg.dtype!r}")
    shape, name = tuple(model_input.shape), model_input.name
    found = model_input_layout(shape)
    if found is None:
        raise ConfigError(f"input: model input {name!r} is {list(shape)}, not an image tensor [1, 3, H, W] or "
                          "[1, H, W, 3]; send tensors instead of images for this model")
    layout = found if cfg.layout == "auto" else cfg.layout
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if (shape[1] if layout == "NCHW" else shape[3]) != 3:
        raise ConfigError(f"input.layout: {layout} does not fit model input {name!r} {list(shape)} "
                          f"(which looks {found}); set input.layout: {found} or leave it auto")
    if h != w:
        raise ConfigError(f"input.size: model input {name!r} is {list(shape)} ({h} x {w}); preprocessing makes "
                          "square crops, so send tensors instead of images for this model")
    if cfg.size != h:
        raise ConfigError(f"input.size: {cfg.size} but model input {name!r} is {list(shape)}; set input.size: {h} "
                          f"(and input.resize, e.g. {round(h * 256 / 224)})")
    want = str(model_input.dtype)
    dtype = want if cfg.dtype == "auto" else cfg.dtype
    if dtype not in PREPROCESS_DTYPES or dtype != want:
        said = "" if cfg.dtype == "auto" else f", and the config says {dtype}"
        raise ConfigError(f"input.dtype: model input {name!r} is {want}; preprocessing makes "
                          f"{', '.join(PREPROCESS_DTYPES)}{said}")
    return dataclasses.replace(cfg, layout=layout, dtype=dtype)
