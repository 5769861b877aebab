"""The Python client of a running hetsched service (protocol: docs/protocol.md)."""

from hetsched.client.connection import Client

__all__ = ["Client"]
