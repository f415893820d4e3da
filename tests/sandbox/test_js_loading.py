"""How a JavaScript step's source becomes code: compiled as its author named it, never written to
a file, with builtins (static and dynamic imports, require) at hand. On both JS paths: forked
from the node zygote and a node exec'd per step (they share step_runner.cjs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_step_file, runnerd_env

MODULE_STEP = """import path from "node:path";

function helper(input) {
  return input.deep.value;
}

export async function run(input, ctx) {
  const { createHash } = await import("node:crypto");
  if (input.fail) return helper(input);
  const fs = await import("node:fs");
  return {
    joined: path.join("a", "b"),
    hash: createHash("sha256").update("x").digest("hex").slice(0, 8),
    tmpdir: fs.readdirSync(ctx.tmpdir),
  };
}
"""

COMMONJS_STEP = """const path = require("node:path");

function helper(input) {
  return input.deep.value;
}

exports.run = async (input, ctx) => {
  const { createHash } = await import("node:crypto");
  if (input.fail) return helper(input);
  return {
    joined: path.join("a", "b"),
    hash: createHash("sha256").update("x").digest("hex").slice(0, 8),
    tmpdir: require("node:fs").readdirSync(ctx.tmpdir),
    filename: path.basename(__filename),
  };
};
"""


@pytest.fixture(params=["forked", "node per step"])
def js_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return runnerd_env(RUNNERD_NODE_FORK="true" if request.param == "forked" else "false")


@pytest.mark.parametrize(
    ("name", "source"), [("boom.mjs", MODULE_STEP), ("boom.js", COMMONJS_STEP)]
)
def test_step_runs_from_its_source_with_builtins_and_leaves_no_file(
    profile: str, tmp_path: Path, js_env: dict[str, str], name: str, source: str
) -> None:
    step = tmp_path / name
    step.write_text(source)
    result = run_step_file(profile, step, "--input", "{}", env=js_env)
    assert result.exit_code == 0, result.report
    assert result.output["joined"] == "a/b"
    assert result.output["hash"] == "2d711642"  # sha256("x")
    # The step's source is nowhere on disk. (A runtime installed under /tmp, as a venv made
    # there, shows in a node per step's /tmp: a directory, not a file of the step's.)
    assert not [
        name for name in result.output["tmpdir"] if "boom" in name or name.startswith("step-")
    ]
    if name == "boom.js":
        assert result.output["filename"] == "boom.js"


@pytest.mark.parametrize(
    ("name", "source", "line"), [("boom.mjs", MODULE_STEP, 4), ("boom.js", COMMONJS_STEP, 4)]
)
def test_error_stack_names_the_authors_file_and_line(
    profile: str, tmp_path: Path, js_env: dict[str, str], name: str, source: str, line: int
) -> None:
    step = tmp_path / name
    step.write_text(source)
    result = run_step_file(profile, step, "--input", '{"fail": true}', env=js_env)
    assert result.error_type == "exception", result.report
    message = result.report["error"]["message"]
    assert "\n\nTypeError: Cannot read properties of undefined" in message, message
    assert f"{name}:{line}:" in message, message
    assert "data:" not in message and "step-" not in message, message


SYNTAX_ERRORS = {
    "bad.mjs": 'import path from "node:path";\n'
    "export function run(input) {\n  return input..x;\n}\n",
    "bad.js": "exports.run = function (input) {\n  return input..x;\n};\n",
}


@pytest.mark.parametrize("name", sorted(SYNTAX_ERRORS))
def test_a_syntax_error_shows_the_file_line_and_caret(
    profile: str, tmp_path: Path, js_env: dict[str, str], name: str
) -> None:
    step = tmp_path / name
    step.write_text(SYNTAX_ERRORS[name])
    line = 3 if name == "bad.mjs" else 2
    result = run_step_file(profile, step, env=js_env)
    assert result.error_type == "fatal", result.report
    message = result.report["error"]["message"]
    assert message == (
        f"{name}:{line}\n  return input..x;\n               ^\n\nSyntaxError: Unexpected token '.'"
    )


def test_an_error_shows_the_authors_line_once_without_runtime_frames(
    profile: str, tmp_path: Path, js_env: dict[str, str]
) -> None:
    step = tmp_path / "boom.mjs"
    step.write_text(MODULE_STEP)
    result = run_step_file(profile, step, "--input", '{"fail": true}', env=js_env)
    lines = result.report["error"]["message"].splitlines()
    assert lines[:3] == ["boom.mjs:4", "  return input.deep.value;", "                    ^"]
    assert lines[4].startswith("TypeError: Cannot read properties of undefined (reading 'value')")
    assert sum("Cannot read properties" in line for line in lines) == 1  # the message, once
    frames = lines[5:]
    assert frames[0].strip() == "at helper (boom.mjs:4:21)", frames
    assert all("boom.mjs" in frame for frame in frames), frames  # no runner, no node:internal


def test_an_error_thrown_in_a_callback_points_at_its_line(
    profile: str, tmp_path: Path, js_env: dict[str, str]
) -> None:
    step = tmp_path / "late.mjs"
    step.write_text(
        "export function run() {\n"
        "  return new Promise(() => {\n"
        "    setTimeout(() => { null.x; }, 1);\n"
        "  });\n"
        "}\n"
    )
    result = run_step_file(profile, step, env=js_env)
    assert result.error_type == "exception", result.report
    message = result.report["error"]["message"]
    assert message.startswith("late.mjs:3\n    setTimeout(() => { null.x; }, 1);\n"), message
    assert "at Timeout._onTimeout (late.mjs:3:29)" in message
    assert "node:internal" not in message
