"""What every command shares: printing to stderr, the Ctrl+C flag, loading the config, options."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Callable

DEFAULT_CONFIG = "configs/big_little.yaml"


def eprint(*args: Any, **kw: Any) -> None:
    print(*args, file=sys.stderr, flush=True, **kw)


class StopFlag:
    """SIGINT/SIGTERM set the flag (graceful stop); a second signal forces the stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0

    def install(self) -> "StopFlag":
        def handler(signum, frame):
            self.count += 1
            self.event.set()
            if self.count == 1:
                eprint(f"\n{signal.Signals(signum).name}: draining and stopping (again to force)")
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        return self

    def __call__(self) -> bool:
        return self.event.is_set()


def load_cfg(args: argparse.Namespace):
    from hetsched.config import Config, load_config
    path = getattr(args, "config", None)
    if path is None:
        path = DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None
    cfg = load_config(path) if path else Config(little_speed=0.5)  # built-in default: big + emulated little
    if getattr(args, "model", None):
        cfg = cfg.with_overrides(model=os.path.abspath(args.model))
    if getattr(args, "no_cache", False):
        import dataclasses
        cfg = cfg.with_overrides(profile=dataclasses.replace(cfg.profile, cache=False))
    if getattr(args, "labels", None):
        import dataclasses
        cfg = cfg.with_overrides(input=dataclasses.replace(cfg.input, labels=os.path.abspath(args.labels)))
    if getattr(args, "no_replan", False):
        import dataclasses
        cfg = cfg.with_overrides(planner=dataclasses.replace(
            cfg.planner, replan=dataclasses.replace(cfg.planner.replan, enabled=False)))
    if getattr(args, "input_shape", None):
        from hetsched.config import ModelInputConfig
        cfg = cfg.with_overrides(model_input=ModelInputConfig(parse_shape(args.input_shape)))
    return cfg


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``1x3x224x224`` -> (1, 3, 224, 224); ConfigError naming --input-shape."""
    from hetsched.errors import ConfigError
    parts = text.replace("x", ",").replace(" ", "").strip("[]()").split(",")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"--input-shape: expected positive integers like 1,3,224,224, got {text!r}")
    return dims


def progress_printer(quiet: bool) -> Callable[[str], None]:
    return (lambda msg: None) if quiet else (lambda msg: eprint(f"  {msg}"))


def common_options(sp, model: bool = True) -> None:
    """--config (and --model, --no-cache) for the commands that load a config."""
    sp.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG} if present, else built-in)")
    if model:
        sp.add_argument("--model", help="ONNX model path (overrides the config's model)")
        sp.add_argument("--no-cache", action="store_true", help="re-measure layer costs instead of using the cache")
