"""The step contract for JavaScript, as for Python: `ctx.log` lines survive every ending, `Fatal`
fails without retries, a source that does not compile is fatal, and an error a limit or the
network policy caused names it. On both JS paths (forked, and a node per step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import StepRun, run_step_file, runnerd_env

BEFORE = """
export async function run(input, ctx) {
  ctx.log("fetched 3 orders");
  ctx.log.warn("order 2 has no customer");
  console.log("printed before the end");
"""

ENDINGS = {
    "timeout": (
        BEFORE + "  await new Promise(() => setInterval(() => {}, 1000));\n}\n",
        ("--wall-s", "2"),
        "timeout",
    ),
    "memory": (
        BEFORE + "  const hog = [];\n  for (;;) hog.push(Buffer.alloc(8 << 20, 1));\n}\n",
        ("--memory-mb", "128"),
        "memory",
    ),
    # abort(3) ends in a fault, which reaches even pid 1 of a pid namespace.
    "crash": (BEFORE + "  process.abort();\n}\n", (), "killed"),
    "exception": (BEFORE + "  throw new RangeError('late');\n}\n", (), "exception"),
}


@pytest.fixture(params=["forked", "node per step"])
def js_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return runnerd_env(RUNNERD_NODE_FORK="true" if request.param == "forked" else "false")


def run_js(
    profile: str,
    tmp_path: Path,
    env: dict[str, str],
    source: str,
    *flags: str,
    name: str = "step.mjs",
) -> StepRun:
    step = tmp_path / name
    step.write_text(source)
    return run_step_file(profile, step, *flags, env=env, timeout_s=90)


@pytest.mark.parametrize("ending", ENDINGS, ids=list(ENDINGS))
def test_logs_survive_every_ending(
    profile: str, tmp_path: Path, js_env: dict[str, str], ending: str
) -> None:
    source, flags, error_type = ENDINGS[ending]
    result = run_js(profile, tmp_path, js_env, source, *flags)
    assert result.error_type == error_type, result.report["error"]
    assert result.report["logs"] == ["INFO fetched 3 orders", "WARNING order 2 has no customer"]
    assert result.report["stdout"] == "printed before the end\n"


def test_fatal_is_its_own_error_type_with_the_authors_line(
    profile: str, tmp_path: Path, js_env: dict[str, str]
) -> None:
    source = (
        "export function run(input, ctx) {\n"
        "  if (!input?.id) throw new ctx.Fatal('the order has no id');\n"
        "  return input.id;\n"
        "}\n"
    )
    result = run_js(profile, tmp_path, js_env, source, "--input", "{}", name="orders.mjs")
    assert result.error_type == "fatal", result.report
    message = result.report["error"]["message"]
    assert message.startswith("orders.mjs:2\n  if (!input?.id) throw new ctx.Fatal"), message
    assert "\n\nFatal: the order has no id\n    at run (orders.mjs:2:" in message


def test_an_error_of_the_authors_named_fatal_is_fatal_too(
    profile: str, tmp_path: Path, js_env: dict[str, str]
) -> None:
    source = (
        "class Fatal extends Error { constructor(m) { super(m); this.name = 'Fatal'; } }\n"
        "exports.run = () => { throw new Fatal('no such account'); };\n"
    )
    result = run_js(profile, tmp_path, js_env, source, name="accounts.js")
    assert result.error_type == "fatal", result.report


def test_a_syntax_error_is_fatal_and_a_runtime_one_is_not(
    profile: str, tmp_path: Path, js_env: dict[str, str]
) -> None:
    broken = run_js(profile, tmp_path, js_env, "export function run( {\n", name="broken.mjs")
    assert broken.error_type == "fatal", broken.report
    assert broken.report["error"]["message"].startswith("broken.mjs:2\n"), broken.report
    parsing = run_js(
        profile, tmp_path, js_env, "export const run = () => JSON.parse('{');\n", name="p.mjs"
    )
    assert parsing.error_type == "exception", parsing.report  # SyntaxError, but at run time


def test_a_refused_fork_names_the_pids_limit(
    profile: str, tmp_path: Path, js_env: dict[str, str]
) -> None:
    source = """
import { spawn } from "node:child_process";
export async function run() {
  const children = [];
  try {
    for (let i = 0; i < 40; i++) {
      const child = spawn("sleep", ["5"]);
      children.push(child);
      await new Promise((resolve, reject) => {
        child.once("spawn", resolve);
        child.once("error", reject);
      });
    }
  } finally {
    for (const child of children) child.kill();
  }
  return "all started";
}
"""
    result = run_js(profile, tmp_path, js_env, source, "--pids", "16")
    assert result.error_type == "exception", result.report
    first = result.report["error"]["message"].splitlines()[0]
    assert first.startswith("pids limit of 16 reached (it raised Error: spawn sleep EAGAIN)"), first
    assert "raise limits.pids (run-step --pids)" in first


def test_a_refused_connection_says_the_network_is_off(
    profile: str, tmp_path: Path, js_env: dict[str, str]
) -> None:
    source = "export async function run() { return (await fetch('http://192.0.2.1/')).status; }\n"
    result = run_js(profile, tmp_path, js_env, source)
    assert result.error_type == "exception", result.report
    first = result.report["error"]["message"].splitlines()[0]
    assert first.startswith("network is off for this step (it raised TypeError: fetch failed)")
    assert '"network": true' in first
