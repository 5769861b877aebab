"""Process entry point of a stage worker (the loop is ``hetsched.runtime.worker``)."""

from hetsched.runtime.worker import main, run

__all__ = ["main", "run"]
