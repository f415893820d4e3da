"""`runnerd run-step`: one step, locally, no Redis, the way `sam local invoke` runs a function.

The step file and the event file (`--input @event.json`) are read, the step runs in a fresh
sandbox, and the outcome is printed: a readable summary on a terminal (`--pretty`), one JSON
object when piped (`--json`). `--watch` keeps one sandbox zygote and runs the step again each
time its file or the event file changes (their mtimes polled), until Ctrl-C.

It gives the step only what its command line says: no worker secret and no dependency
bundle. A `{"secret": NAME}` value of `--env` is refused (the author gives the value itself:
there is no integration here for RUNNERD_SECRETS_ALLOW to allow, and nothing to hide it
from); a step that fails importing a package it lacks gets one line on what to do instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from runnerd.errors import SandboxUnavailable, UsageError
from runnerd.messages import StepOutcome
from runnerd.outcomes import (
    EXIT_FAILED,
    EXIT_OK,
    check_required_layers,
    outcome_json,
    outcome_text,
    read_json_input,
    read_text,
    write_stdout,
)
from runnerd.secret_source import SecretRef
from runnerd.settings import Settings
from runnerd.spawner import Spawner, StepSpec
from runnerd.zygote_link import SandboxOptions
from sandbox.protocol import Limits, Runtime, StepError

RUNTIMES: dict[str, Runtime] = {".py": "python", ".js": "node", ".mjs": "node", ".cjs": "node"}
LIMIT_FLAGS = (
    ("wall_s", float, "wall-clock seconds before the step is killed"),
    ("cpu_s", int, "CPU seconds"),
    ("memory_mb", int, "memory, MB"),
    ("pids", int, "processes and threads at once"),
    ("file_size_mb", int, "largest file it may write, MB"),
    ("tmp_mb", int, "its private /tmp, MB"),
    ("output_mb", int, "its output, MB"),
)
WATCH_POLL_S = 0.3
# What Python and node say of a bare package name they cannot find (not of a relative path),
# and what an ES module step's `ctx.require` is without a bundle.
# Only as the error's own line (the runtimes print it first, or after the source line).
_MISSING_PACKAGE = re.compile(
    r"^(ModuleNotFoundError: No module named '(?P<module>[^'./][^'.]*)"
    r"|Error: Cannot find module '(?P<package>[^'./][^']*)'"
    r"|TypeError: (?P<require>ctx\.require is not a function))",
    re.MULTILINE,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("step", nargs="?", help="a .py, .js or .mjs file defining run(input, ctx)")
    parser.add_argument(
        "--input",
        default="null",
        metavar="JSON|@EVENT.json",
        help="the step's input: JSON text, or @ and an event file holding it (as `sam local "
        "invoke -e event.json`); default null",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a variable of the step's environment (repeatable); the value itself: run-step "
        'resolves no {"secret": NAME}',
    )
    parser.add_argument("--exec", action="store_true", help="run the argv after -- as an exec step")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--pretty",
        dest="pretty",
        action="store_true",
        default=None,
        help="a readable summary: status, output, logs, the error with its source line "
        "(the default on a terminal)",
    )
    shown.add_argument(
        "--json",
        dest="pretty",
        action="store_false",
        help="one JSON object (the default when stdout is not a terminal)",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="run again whenever the step file or the event file changes (Ctrl-C stops)",
    )
    limits = parser.add_argument_group("limits", "what the step may use (an integration's limits)")
    defaults = Limits()
    for name, kind, help_text in LIMIT_FLAGS:
        limits.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(defaults, name),
            metavar="S" if name.endswith("_s") else "N",
            help=f"{help_text} (default {getattr(defaults, name):g})",
        )
    limits.add_argument("--network", action="store_true", help="give the step the host's network")


def step_spec_from_args(args: argparse.Namespace, exec_argv: list[str]) -> StepSpec:
    """The step as the flags and files say now (read again for each run of --watch)."""
    names = [name for name, _, _ in LIMIT_FLAGS]
    for name in names:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    limits = Limits(network=args.network, **{name: getattr(args, name) for name in names})
    data = msgspec.msgpack.encode(read_json_input(args.input))
    env = _environment(args.env)
    if args.exec:
        if not exec_argv:
            raise UsageError("--exec needs the program after --, as in: --exec -- jq .")
        argv = tuple(exec_argv)
        return StepSpec("exec", exec_argv[0], input=data, limits=limits, argv=argv, env=env)
    if not args.step:
        raise UsageError("run-step needs a step file (.py, .js, .mjs) or --exec -- ARGV")
    path = Path(args.step)
    runtime = RUNTIMES.get(path.suffix)
    if runtime is None:
        raise UsageError(f"{args.step}: unknown step kind; use .py, .js, .mjs or --exec")
    source = read_text(path, "step file")
    return StepSpec(runtime, path.name, source, data, limits, env=env)


def _environment(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise UsageError(f"--env needs KEY=VALUE, got {pair!r}")
        if (secret := _secret_ref(value)) is not None:
            raise UsageError(
                f'--env {key}: run-step resolves no secrets ({{"secret": "{secret}"}} is '
                f"resolved by serve, for the integrations RUNNERD_SECRETS_ALLOW allows); give "
                f"the step the value itself: --env {key}=VALUE"
            )
        env[key] = value
    return env


def _secret_ref(value: str) -> str | None:
    """The NAME of an integration's `{"secret": NAME}` env value, copied into --env."""
    if not value.lstrip().startswith("{"):
        return None
    try:
        return msgspec.json.decode(value, type=SecretRef).secret
    except msgspec.DecodeError:
        return None


def _missing_package(outcome: StepOutcome, step: StepSpec) -> None:
    """A step that failed for want of a package: say, in one line, where it can have one."""
    if outcome.error is None or outcome.error.type != "exception":
        return
    found = _MISSING_PACKAGE.search(outcome.error.message)
    if found is None:
        return
    name = found["module"] or found["package"]
    needs = f"package {name}" if name else "a package (ctx.require)"
    print(
        f"runnerd: {step.filename} needs {needs}, and run-step gives a "
        'step no dependency bundle: declare it in the integration\'s "dependencies", build '
        "it (runnerd bundle build INTEGRATION.json) and run the step on a worker (runnerd "
        "submit INTEGRATION.json --wait)",
        file=sys.stderr,
    )


def command(
    args: argparse.Namespace, exec_argv: list[str], settings: Settings, run: Callable[[Any], Any]
) -> int:
    """`run` runs a coroutine to its end (uvloop when there is one; cli._run)."""
    pretty = sys.stdout.isatty() if args.pretty is None else bool(args.pretty)
    if args.watch:
        if args.exec or not args.step:
            raise UsageError("--watch needs a step file to watch")
        # Ctrl-C is how a watch ends: the loop cancels it and the sandbox is closed first.
        with contextlib.suppress(KeyboardInterrupt):
            run(_watch(args, exec_argv, settings, pretty))
        return EXIT_OK
    step = step_spec_from_args(args, exec_argv)
    outcome: StepOutcome = run(_run_once(settings, step))
    shown = _show(outcome, step, pretty)
    _missing_package(outcome, step)
    return shown


async def _run_once(settings: Settings, step: StepSpec) -> StepOutcome:
    refusal = _node_missing(settings, step)
    if refusal is not None:
        return refusal
    spawner = await Spawner.start(SandboxOptions.from_settings(settings), pool_size=0)
    try:
        refused = check_required_layers(settings, spawner.capabilities)
        if refused is not None:
            return StepOutcome(ok=False, error=StepError("sandbox", refused))
        return await spawner.run_step(step)
    finally:
        await spawner.close()


def _node_missing(settings: Settings, step: StepSpec) -> StepOutcome | None:
    if step.runtime == "node" and not settings.node_path:
        message = "node was not found on PATH: install it, or set RUNNERD_NODE_PATH (--node-path)"
        return StepOutcome(ok=False, error=StepError("sandbox", message))
    return None


def _show(outcome: StepOutcome, step: StepSpec, pretty: bool) -> int:
    report = outcome_json(outcome)
    if pretty:
        write_stdout(outcome_text(report, step.filename) + "\n")
    else:
        write_stdout(msgspec.json.encode(report).decode() + "\n")
    return EXIT_OK if report["ok"] else EXIT_FAILED


async def _watch(
    args: argparse.Namespace, exec_argv: list[str], settings: Settings, pretty: bool
) -> None:
    """One zygote for the whole watch; each change runs the step again in a fresh child."""
    watched = [Path(args.step)]
    if args.input.startswith("@"):
        watched.append(Path(args.input[1:]))
    spawner = await Spawner.start(SandboxOptions.from_settings(settings), pool_size=0)
    try:
        refused = check_required_layers(settings, spawner.capabilities)
        if refused is not None:
            raise SandboxUnavailable(refused)
        while True:
            seen = _stamps(watched)
            try:
                step = step_spec_from_args(args, exec_argv)
            except UsageError as exc:  # a file half-saved, an event file not yet valid: wait
                print(f"runnerd: {exc}", file=sys.stderr)
            else:
                outcome = _node_missing(settings, step) or await spawner.run_step(step)
                _show(outcome, step, pretty)
                _missing_package(outcome, step)
            names = " and ".join(str(path) for path in watched)
            print(f"runnerd: watching {names} for changes (Ctrl-C to stop)", file=sys.stderr)
            while _stamps(watched) == seen:
                await asyncio.sleep(WATCH_POLL_S)
            when = time.strftime("%H:%M:%S")
            print(f"\nrunnerd: changed, running again at {when}", file=sys.stderr)
    finally:
        await spawner.close()


def _stamps(paths: list[Path]) -> list[tuple[int, int] | None]:
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size))
    return stamps
