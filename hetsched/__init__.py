"""hetsched: pipeline CNN inference across heterogeneous CPU clusters."""

__version__ = "0.1.0"
