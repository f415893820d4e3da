"""What the `runnerd` command says (issue 14): an integration file's mistakes with what was
meant, the values a field takes and a line and column; each subcommand's --help with its own
options first and only the settings it reads, each with its variable and default; one prefix
for a usage error; --version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runnerd import __version__
from tests.runnerd.test_commands import one_line, runnerd

STEP = "def run(input, ctx):\n    return input\n"
MISTAKES = {
    "misspelt step field": (
        '{"name": "x", "steps": [{"nmae": "a", "code": "s.py"}]}',
        "`$.steps[0]`: unknown field `nmae`; did you mean `name`?",
    ),
    "misspelt top-level field": (
        '{"name": "x", "step": [{"name": "a", "code": "s.py"}]}',
        "`$`: unknown field `step`; did you mean `steps`?",
    ),
    "misspelt limit": (
        '{"name": "x", "steps": [{"name": "a", "code": "s.py", "limits": {"wal_s": 5}}]}',
        "`$.steps[0].limits`: unknown field `wal_s`; did you mean `wall_s`?",
    ),
    "unknown runtime": (
        '{"name": "x", "steps": [{"name": "a", "source": "x", "runtime": "nodejs"}]}',
        "`$.steps[0].runtime`: 'nodejs' is not one of python, node, exec; did you mean 'node'?",
    ),
    "malformed JSON": (
        '{"name": "x",\n "steps": [\n   {"name": "a", "code": "s.py"},\n ]\n}',
        "integration.json: JSON is malformed: trailing comma in array (line 4, column 2)",
    ),
}


@pytest.mark.parametrize("case", MISTAKES, ids=list(MISTAKES))
def test_integration_file_mistakes_say_what_was_meant(case: str, tmp_path: Path) -> None:
    text, expected = MISTAKES[case]
    (tmp_path / "s.py").write_text(STEP)
    path = tmp_path / "integration.json"
    path.write_text(text)

    done = runnerd("submit", str(path), REDIS_URL="redis://127.0.0.1:1/0")

    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("runnerd: ")
    assert expected in line
    assert "byte" not in line


def test_an_unknown_field_with_nothing_close_lists_the_fields(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text(STEP)
    path = tmp_path / "integration.json"
    path.write_text(json.dumps({"name": "x", "steps": [{"name": "a", "code": "s.py", "zz": 1}]}))

    line = one_line(runnerd("submit", str(path)).stderr)

    assert "unknown field `zz`" in line
    assert "did you mean" not in line
    fields = "name, code, source, runtime, exec, limits, network, env, for_each, dependencies"
    assert f"(a step has: {fields})" in line


def _sections(help_text: str) -> dict[str, str]:
    """The --help text cut at its section titles ("options:", "settings:", ...)."""
    parts = re.split(r"^(\w[\w ]*):$", help_text, flags=re.MULTILINE)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _flags(section: str) -> list[str]:
    return re.findall(r"^  (--[a-z-]+)", section, flags=re.MULTILINE)


EXPECTED_SETTINGS = {
    "run-step": {"--sandbox-mode", "--sandbox-require", "--node-path", "--node-fork"},
    "submit": {"--redis-url", "--key-prefix", "--partitions"},
    "healthcheck": {"--http-port"},
}


@pytest.mark.parametrize("command", EXPECTED_SETTINGS)
def test_help_shows_own_options_first_and_only_the_settings_used(command: str) -> None:
    done = runnerd(command, "--help")

    assert done.returncode == 0
    assert "SETTING_" not in done.stdout
    titles = list(_sections(done.stdout))
    assert titles.index("options") < titles.index("settings")
    settings = _sections(done.stdout)["settings"]
    assert EXPECTED_SETTINGS[command] <= set(_flags(settings))
    if command != "serve":
        assert "--concurrency" not in done.stdout
    # Each setting says its variable and its default.
    flat = " ".join(settings.split())
    if command == "submit":
        assert "[REDIS_URL, default redis://127.0.0.1:6379/0]" in flat
        assert "[RUNNERD_PARTITIONS, default 1]" in flat
        assert "--wait" in _flags(_sections(done.stdout)["options"])
    if command == "run-step":
        assert "[RUNNERD_SANDBOX_MODE, default best-effort]" in flat
        assert "--watch" in _flags(_sections(done.stdout)["options"])


def test_serve_help_has_every_worker_setting() -> None:
    settings = _sections(runnerd("serve", "--help").stdout)["settings"]

    assert {"--redis-url", "--concurrency", "--drain-s", "--http-port"} <= set(_flags(settings))


def test_demo_refuses_the_settings_it_would_ignore() -> None:
    done = runnerd("demo", "--redis-url", "redis://elsewhere:6379/0")

    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("runnerd: demo: unrecognized arguments: --redis-url")
    assert "--redis-url" not in runnerd("demo", "--help").stdout


def test_no_command_is_one_line_with_one_prefix() -> None:
    done = runnerd()

    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("runnerd: a command is needed: run-step, ")
    assert line.count("runnerd:") == 1


def test_a_bad_flag_value_names_the_subcommand_once() -> None:
    line = one_line(runnerd("run-step", "--wall-s", "soon").stderr)

    assert line == "runnerd: run-step: argument --wall-s: invalid float value: 'soon'"


def test_version() -> None:
    done = runnerd("--version")

    assert done.returncode == 0
    assert done.stdout.strip() == f"runnerd {__version__}"


def test_a_bad_boolean_variable_says_what_it_takes() -> None:
    done = runnerd("doctor", RUNNERD_NODE_FORK="maybe")

    assert done.returncode == 2
    assert one_line(done.stderr) == "runnerd: RUNNERD_NODE_FORK: expected true or false (or 1 or 0)"
    assert "Traceback" not in done.stderr
