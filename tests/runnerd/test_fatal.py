"""Non-retryable failures (issue 14): a step that raises Fatal, a source that does not compile,
an input an exec step cannot be given fail the execution at once, its retries unused; any
other failure is still retried. Through a real `runnerd serve`."""

from __future__ import annotations

from pathlib import Path

import pytest

from runnerd.messages import Integration
from tests.runnerd.conftest import ServeFactory, run_one, write_integration

FILES = {
    "fatal.py": (
        "from runnerd.step import Fatal\n"
        "def run(input, ctx):\n"
        "    raise Fatal(f'attempt {ctx.attempt}: order has no customer')\n"
    ),
    "broken.py": "def run(input, ctx)\n    return input\n",
    "flaky.py": "def run(input, ctx):\n    raise RuntimeError(f'attempt {ctx.attempt}')\n",
    "bytes.py": "def run(input, ctx):\n    return {'blob': b'not JSON'}\n",
}
CASES = {
    "Fatal": ([{"name": "check", "code": "fatal.py"}], "fatal", 1, "Fatal: attempt 1:"),
    "syntax error": ([{"name": "check", "code": "broken.py"}], "fatal", 1, "SyntaxError:"),
    "exec input": (
        [{"name": "make", "code": "bytes.py"}, {"name": "check", "exec": ["cat"]}],
        "fatal",
        1,
        "input is not JSON-representable",
    ),
    "any other error": ([{"name": "check", "code": "flaky.py"}], "exception", 3, "RuntimeError"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fatal_failures_are_not_retried(
    case: str, serve: ServeFactory, prefix: str, tmp_path: Path
) -> None:
    steps, error_type, attempts, message = CASES[case]
    spec = {"name": "fatal", "retries": 2, "steps": steps}
    integration = Integration.load(write_integration(tmp_path / "fatal", spec, FILES))
    serve(retry_base_s=0.1, retry_max_s=0.2)

    result = run_one(integration, None, prefix)

    assert result.status == "failed"
    assert result.failed_step == "check"
    assert result.error is not None
    assert result.error.type == error_type
    assert result.error.message.startswith(message), result.error.message
    assert result.attempts == attempts
