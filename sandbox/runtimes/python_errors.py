"""What the author of a Python step reads when it fails: the error first, once, then the frames
of their own code with its source lines, without the runtime's frames around them; and, where
a limit or a policy is the cause, the limit named (`pids limit of 16 reached`, `network is off
for this step`) instead of the errno it surfaced as.

The step's source is registered with linecache under its filename (`register_source`), so the
traceback shows the author's lines although no such file exists in the child.
"""

from __future__ import annotations

import errno
import linecache
import os
import socket
import traceback
from types import TracebackType

from sandbox.protocol import ErrorType
from sandbox.runtimes import NETWORK_HINT, PIDS_HINT, network_is_on, pids_limit
from sandbox.step import Fatal

RUNTIME_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sandbox/
TRACEBACK_LINES_MAX = 60  # the first and the last frames are kept, the middle cut
TRACEBACK_HEAD_LINES = 10
FORK_FILES = ("subprocess.py", "popen_fork.py", "popen_forkserver.py", "os.py", "pty.py")


def register_source(filename: str, source: str) -> None:
    # No mtime: linecache.checkcache() leaves such an entry alone (it cannot stat the file).
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def describe_syntax_error(exc: SyntaxError | ValueError) -> str:
    """A source that does not compile: the error, then file, line and caret (as python says
    them, the error moved to the top)."""
    lines = traceback.format_exception_only(exc)
    return "".join([lines[-1], *lines[:-1]]).rstrip()


def describe(
    exc: BaseException, filename: str, layers: list[str], where: str = ""
) -> tuple[ErrorType, str]:
    """The error type and message for what a step raised; `where` says where it escaped from
    (a thread, an asyncio task) when that was not run() itself."""
    kind: ErrorType = "fatal" if isinstance(exc, Fatal) else "exception"
    summary = traceback.TracebackException.from_exception(exc)
    _trim(summary, filename)
    only = list(summary.format_exception_only())
    body = list(summary.format())
    if body[-len(only) :] == only:  # the error itself is the first line, not the last again
        del body[-len(only) :]
    head = "".join(only).rstrip()
    if isinstance(exc, Fatal):  # the contract's name, not the module it happens to live in
        head = head.replace(f"{type(exc).__module__}.", "", 1)
    limit = _limit_reached(exc, layers)
    if limit is not None:  # the limit said in words, the errno it surfaced as only named
        head = f"{limit[0]} (it raised {type(exc).__qualname__}); {limit[1]}"
    lines = "".join(body).rstrip().splitlines()
    if len(lines) > TRACEBACK_LINES_MAX:
        cut = len(lines) - TRACEBACK_LINES_MAX
        tail = lines[-(TRACEBACK_LINES_MAX - TRACEBACK_HEAD_LINES) :]
        lines = [*lines[:TRACEBACK_HEAD_LINES], f"  ... ({cut} lines cut)", *tail]
    parts = [head, *([where] if where else []), *lines]
    return kind, "\n".join(parts)


def _trim(summary: traceback.TracebackException, filename: str) -> None:
    """Drop the runtime's frames, and everything above the first frame of the step's file (the
    runtime's call, asyncio's loop, a thread's bootstrap), in the error and in those it chains."""
    seen: set[int] = set()
    pending = [summary]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        frames = [frame for frame in current.stack if not _is_runtime(frame.filename)]
        first = next((i for i, frame in enumerate(frames) if frame.filename == filename), 0)
        current.stack = traceback.StackSummary.from_list(frames[first:])
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        pending += list(getattr(current, "exceptions", None) or [])


def _is_runtime(path: str) -> bool:
    return path.startswith(RUNTIME_DIR + os.sep)


# --- limits and policies -----------------------------------------------------------------------


def _limit_reached(exc: BaseException, layers: list[str]) -> tuple[str, str] | None:
    """What was reached, and what to do about it; None when no limit or policy explains it."""
    chain = _chain(exc)
    if any(_is_fork_refusal(e) for e in chain):
        return f"{pids_limit(layers)} reached", PIDS_HINT
    if any(_is_socket_refusal(e) for e in chain) and not network_is_on(layers):
        return "network is off for this step", NETWORK_HINT
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or any(current is e for e in found) or len(found) > 32:
            continue
        found.append(current)
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None)]
    return [e for e in found if isinstance(e, BaseException)]


def _is_fork_refusal(exc: BaseException) -> bool:
    """fork(2) and clone(2) fail with EAGAIN at RLIMIT_NPROC or the pids cgroup's limit; a
    thread that cannot start says so in words. EAGAIN of non-blocking I/O is not one: it is
    told apart by where it was raised (subprocess, multiprocessing, os.fork itself)."""
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return True
    if not isinstance(exc, BlockingIOError) or exc.errno != errno.EAGAIN:
        return False
    innermost = _innermost(exc.__traceback__)
    if innermost is None:
        return False
    code = innermost.tb_frame.f_code
    if os.path.basename(code.co_filename) in FORK_FILES:
        return True
    line = linecache.getline(code.co_filename, innermost.tb_lineno)
    return any(word in line for word in ("fork", "spawn", "Popen", "Thread"))


def _is_socket_refusal(exc: BaseException) -> bool:
    if isinstance(exc, socket.gaierror):
        return True
    if not isinstance(exc, OSError) or exc.errno not in (errno.EPERM, errno.ENETUNREACH):
        return False
    innermost = _innermost(exc.__traceback__)
    if innermost is None:
        return False
    code = innermost.tb_frame.f_code
    if os.path.basename(code.co_filename) == "socket.py":
        return True
    line = linecache.getline(code.co_filename, innermost.tb_lineno)
    return any(word in line for word in ("socket", "connect"))


def _innermost(tb: TracebackType | None) -> TracebackType | None:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb
