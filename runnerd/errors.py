"""Faults of runnerd itself (a failing customer step is a result value, not one of these)."""


class RunnerdError(Exception):
    """Base of runnerd's own errors."""


class ConfigError(RunnerdError):
    """A setting, flag or input file is invalid; the message names it and says what is expected."""


class UsageError(RunnerdError):
    """Bad command-line usage or unreadable input; exit status 2."""


class SandboxUnavailable(RunnerdError):
    """The zygote could not start, died, or lacks layers that strict mode requires."""


class BundleMissing(RunnerdError):
    """An integration's dependency bundle is not stored: submitting it would only fail."""


class StoreError(RunnerdError):
    """Redis refused or lost an operation the store needed."""
