"""For step authors: `from runnerd.step import Fatal`, then `raise Fatal("why")` to fail the
execution at once, without its retries (the error type is `fatal`). The class is the sandbox's
own (sandbox/step.py), which is what the runtime recognises in the step's child."""

from __future__ import annotations

from sandbox.step import Fatal

__all__ = ["Fatal"]
