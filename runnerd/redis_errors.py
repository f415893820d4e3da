"""Which Redis failures are worth another try: the ones a reconnect, a failover or a moment's
wait can clear. Everything else (a bad script, a wrong type) is the caller's to see."""

from __future__ import annotations

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

TRANSIENT_TYPES = (
    ConnectionError,  # also redis-py's MaxConnectionsError
    TimeoutError,
    BusyLoadingError,
    ClusterDownError,
    TryAgainError,
    MasterDownError,
    ReadOnlyError,  # a write that reached a master just demoted to replica
    SlotNotCoveredError,  # a hole in the cluster's slot map while a failover settles
    OSError,
)
# What a server in a failover answers in plain text; redis-py does not map all of these.
TRANSIENT_PREFIXES = ("UNBLOCKED", "LOADING", "READONLY", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_TYPES):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).lstrip().upper().startswith(TRANSIENT_PREFIXES)
    return False


def is_noscript(exc: BaseException) -> bool:
    """A script not in this server's cache (a new master after a failover): send its source."""
    return isinstance(exc, NoScriptError)
