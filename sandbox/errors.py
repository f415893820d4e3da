"""Faults of the sandbox itself. A customer step failing is not one of these: it is a value."""


class SandboxError(Exception):
    """Base of every error the sandbox raises for its own faults."""


class LayerError(SandboxError):
    """A confinement layer that should apply could not; the child stops (fail closed)."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


class ProtocolError(SandboxError):
    """A frame or message that is malformed, oversized or out of order."""
