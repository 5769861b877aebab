"""Exception hierarchy. Errors that reach a client become coded replies."""


class HetschedError(Exception):
    """Base class of every error hetsched raises on purpose."""


class ConfigError(HetschedError):
    """A configuration value is missing or invalid; the message names the key path."""


class TopologyError(HetschedError):
    """CPU topology could not be read or does not fit the request."""


class ModelError(HetschedError):
    """The ONNX model cannot be loaded, analysed or split."""


class PlanError(HetschedError):
    """No valid plan exists for the given costs and clusters."""


class ProtocolError(HetschedError):
    """A message on the wire is malformed. `code` is the protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message


class ShapeMismatch(ProtocolError):
    """A tensor's dtype or shape differs from what the plan expects."""

    def __init__(self, message: str):
        super().__init__("SHAPE_MISMATCH", message)


class WorkerDied(HetschedError):
    """A stage worker exited or failed its start-up handshake."""


class EmulationError(HetschedError):
    """Heterogeneity emulation could not be started (e.g. no real-time scheduling)."""
