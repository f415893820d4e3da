"""`runnerd run-step` and what it does not give a step: no worker secret (a `{"secret": NAME}`
value of `--env` is refused in one line, the step unrun) and no dependency bundle (a step that
fails importing a package it lacks is told, in one line, where it can have one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runnerd.test_commands import one_line, runnerd

ECHO_TOKEN = "import os\n\ndef run(input, ctx):\n    return os.environ.get('TOKEN')\n"
VALUE = "sk-0123456789abcdef"


def test_a_secret_reference_in_env_is_refused_in_one_line(tmp_path: Path) -> None:
    step = tmp_path / "post.py"
    step.write_text(ECHO_TOKEN)
    reference = json.dumps({"secret": "API_KEY"})
    # As on a worker's host: the secret is defined and allowed there, for serve alone.
    worker = {"RUNNERD_SECRET_API_KEY": VALUE, "RUNNERD_SECRETS_ALLOW": "*=*"}

    refused = runnerd("run-step", str(step), "--json", "--env", f"TOKEN={reference}", **worker)
    given = runnerd("run-step", str(step), "--json", "--env", f"TOKEN={VALUE}", **worker)

    assert refused.returncode == 2 and refused.stdout == ""  # the step never ran
    line = one_line(refused.stderr)
    assert line.startswith('runnerd: --env TOKEN: run-step resolves no secrets ({"secret": ')
    assert line.endswith("give the step the value itself: --env TOKEN=VALUE")
    assert VALUE not in line
    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout)["output"] == VALUE


@pytest.mark.parametrize(
    ("file", "source", "needs"),
    [
        ("parse.py", "import dateutil_x.parser\n\ndef run(i, ctx):\n    return 1\n", "dateutil_x"),
        ("parse.js", 'const p = require("xml-x");\nmodule.exports.run = () => 1;\n', "xml-x"),
        ("parse.mjs", 'export function run(i, ctx) { return ctx.require("xml-x"); }\n', None),
    ],
)
def test_a_step_lacking_a_package_is_told_where_to_have_one(
    tmp_path: Path, file: str, source: str, needs: str | None
) -> None:
    step = tmp_path / file
    step.write_text(source)

    done = runnerd("run-step", str(step), "--json")

    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["type"] == "exception"  # the step's own report
    line = one_line(done.stderr)
    what = f"package {needs}" if needs else "a package (ctx.require)"
    assert line.startswith(f"runnerd: {file} needs {what}, and run-step gives a step no ")
    assert "runnerd bundle build INTEGRATION.json" in line


def test_a_step_failing_otherwise_gets_no_package_line(tmp_path: Path) -> None:
    step = tmp_path / "fail.py"
    step.write_text("def run(i, ctx):\n    raise ValueError(\"No module named 'x' here\")\n")

    done = runnerd("run-step", str(step), "--json")

    assert done.returncode == 1
    assert "ValueError" in json.loads(done.stdout)["error"]["message"]
    assert done.stderr == ""
