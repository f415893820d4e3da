"""What a step's own code may use from its runtime: `Fatal`, the failure that is not retried.

A Python step raises it as `runnerd.step.Fatal` (runnerd/step.py re-exports this class, so an
author's editor and type checker find it where runnerd is installed) or as `ctx.Fatal`, which
needs no import. The class lives here, in the sandbox package, because the Python runtime must
recognise it without importing runnerd (tests/test_import_direction.py): a step that imports
`runnerd.step` loads that module and runnerd/__init__.py (a version string) in its own child,
nothing else of the daemon. Stdlib only, imported by the zygote before it forks.
"""

from __future__ import annotations


class Fatal(Exception):
    """Fail the step, and its execution at once: retrying cannot help (the input is invalid, a
    setting is missing). The step's result gets the error type `fatal` and this message; the
    executor skips the integration's retries."""
