"""`runnerd` subcommands: parse, build Settings, make one call, return an exit code.

Exit codes: 0 ok, 1 the work failed (a step, a missing required layer), 2 usage (bad flag,
bad environment value, unreadable file). User errors print one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from runnerd import settings as settings_module
from runnerd.errors import ConfigError, RunnerdError, UsageError
from runnerd.messages import StepOutcome
from runnerd.outcomes import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    check_required_layers,
    outcome_json,
    read_json_input,
    read_text,
)
from runnerd.settings import SETTINGS_HELP, Settings
from runnerd.spawner import Spawner, StepSpec
from runnerd.zygote_link import SandboxOptions
from sandbox.protocol import Capabilities, Limits, Runtime, StepError

RUNTIMES: dict[str, Runtime] = {".py": "python", ".js": "node", ".mjs": "node", ".cjs": "node"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="runnerd", description="Run customer steps, each in a fresh sandbox.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run_step = commands.add_parser("run-step", help="run one step locally (no Redis)")
    run_step.add_argument(
        "step", nargs="?", help="a .py, .js or .mjs file defining run(input, ctx)"
    )
    run_step.add_argument("--input", default="null", help="JSON input, or @file.json")
    run_step.add_argument(
        "--exec", action="store_true", help="run the argv after -- as an exec step"
    )
    defaults = Limits()
    limit_flags = (
        ("wall_s", float),
        ("cpu_s", int),
        ("memory_mb", int),
        ("pids", int),
        ("file_size_mb", int),
        ("tmp_mb", int),
        ("output_mb", int),
    )
    for name, kind in limit_flags:
        run_step.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(defaults, name),
            help=f"default {getattr(defaults, name)}",
        )
    run_step.add_argument("--network", action="store_true", help="give the step the host's network")
    _add_setting_flags(run_step)

    doctor = commands.add_parser("doctor", help="print which sandbox layers work on this host")
    _add_setting_flags(doctor)

    serve = commands.add_parser("serve", help="run a worker: executions from Redis Streams")
    serve.add_argument(
        "--embedded-redis",
        action="store_true",
        help="start a private Redis for the life of this command and print its URL",
    )
    _add_setting_flags(serve)

    submit = commands.add_parser("submit", help="enqueue an execution of an integration")
    submit.add_argument("integration", help="an integration JSON file")
    submit.add_argument("--input", default="null", help="JSON input, or @file.json")
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (--wait)")
    _add_setting_flags(submit)

    result = commands.add_parser(
        "result",
        help="print an execution's result as submit --wait does (exit 0 succeeded, 1 failed "
        "or dead, 3 no result yet)",
    )
    result.add_argument("execution_id", help="what submit printed")
    result.add_argument("--wait", action="store_true", help="wait for the result")
    result.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (--wait)")
    _add_setting_flags(result)

    healthcheck = commands.add_parser(
        "healthcheck", help="exit 0 when this host's worker answers /healthz (for HEALTHCHECK)"
    )
    _add_setting_flags(healthcheck)

    demo = commands.add_parser(
        "demo", help="run the bundled 6-step integration on an embedded Redis and one worker"
    )
    demo.add_argument("--runs", type=int, default=20, help="timed runs after the first")
    _add_setting_flags(demo)
    return parser


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for field, help_text in SETTINGS_HELP.items():
        parser.add_argument("--" + field.replace("_", "-"), dest=f"setting_{field}", help=help_text)


def _settings_from(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    overrides: dict[str, Any] = {}
    for field in SETTINGS_HELP:
        value = getattr(args, f"setting_{field}", None)
        if value is not None and field == "sandbox_require":
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        overrides[field] = value
    return settings_module.load(environ, overrides)


# --- run-step ----------------------------------------------------------------------------------


def step_spec_from_args(args: argparse.Namespace, exec_argv: list[str]) -> StepSpec:
    names = ("wall_s", "cpu_s", "memory_mb", "pids", "file_size_mb", "tmp_mb", "output_mb")
    for name in names:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    limits = Limits(network=args.network, **{name: getattr(args, name) for name in names})
    data = msgspec.msgpack.encode(read_json_input(args.input))
    if args.exec:
        if not exec_argv:
            raise UsageError("--exec needs the program after --, as in: --exec -- jq .")
        return StepSpec("exec", exec_argv[0], input=data, limits=limits, argv=tuple(exec_argv))
    if not args.step:
        raise UsageError("run-step needs a step file (.py, .js, .mjs) or --exec -- ARGV")
    path = Path(args.step)
    runtime = RUNTIMES.get(path.suffix)
    if runtime is None:
        raise UsageError(f"{args.step}: unknown step kind; use .py, .js, .mjs or --exec")
    return StepSpec(runtime, path.name, read_text(path, "step file"), data, limits)


async def _run_step(settings: Settings, step: StepSpec) -> StepOutcome:
    if step.runtime == "node" and not settings.node_path:
        message = "node was not found on PATH: install it, or set RUNNERD_NODE_PATH (--node-path)"
        return StepOutcome(ok=False, error=StepError("sandbox", message))
    spawner = await Spawner.start(SandboxOptions.from_settings(settings), pool_size=0)
    try:
        refusal = check_required_layers(settings, spawner.capabilities)
        if refusal is not None:
            return StepOutcome(ok=False, error=StepError("sandbox", refusal))
        return await spawner.run_step(step)
    finally:
        await spawner.close()


def cmd_run_step(args: argparse.Namespace, exec_argv: list[str], settings: Settings) -> int:
    step = step_spec_from_args(args, exec_argv)
    report = outcome_json(_run(_run_step(settings, step)))
    sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    return EXIT_OK if report["ok"] else EXIT_FAILED


# --- doctor ------------------------------------------------------------------------------------


async def _probe(settings: Settings) -> Capabilities:
    spawner = await Spawner.start(SandboxOptions.from_settings(settings), pool_size=0)
    await spawner.close()
    return spawner.capabilities


def cmd_doctor(settings: Settings) -> int:
    capabilities = _run(_probe(settings))
    missing = capabilities.missing(list(settings.sandbox_require))
    report = {
        "layers": {
            name: {"ok": status.ok, **({"reason": status.reason} if not status.ok else {})}
            for name, status in capabilities.layers.items()
        },
        "mode": settings.sandbox_mode,
        "required": list(settings.sandbox_require),
        "missing_required": missing,
        "problems": capabilities.problems,
        # Without a filesystem view: where steps can write on the host (cleaned per slot).
        "writable_dirs": capabilities.writable_dirs,
        "uid": os.geteuid(),
        "node": settings.node_path or None,
        # How JS steps start: forked from the node zygote, or (and why) a node each.
        "javascript": (
            "forked from the node zygote"
            if capabilities.node_forked
            else f"a node started per step: {capabilities.node_fork_note or 'no node'}"
        ),
    }
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
    # The JSON is for programs; a person running doctor sees each problem (steps will fail)
    # and each missing required layer on its own line, with its fix, as stderr.
    for problem in capabilities.problems:
        print(f"runnerd: problem: {problem}", file=sys.stderr)
    if missing:
        print(f"runnerd: required layers missing: {', '.join(missing)}", file=sys.stderr)
    return EXIT_FAILED if missing or capabilities.problems else EXIT_OK


# --- healthcheck -------------------------------------------------------------------------------


def cmd_healthcheck(settings: Settings) -> int:
    """GET /healthz on this host; what the image's HEALTHCHECK and ECS's healthCheck run."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{settings.http_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            healthy = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"runnerd: {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if healthy else EXIT_FAILED


# --- entry point -------------------------------------------------------------------------------


def _run(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    exec_argv: list[str] = []
    if "--" in arguments:
        split = arguments.index("--")
        arguments, exec_argv = arguments[:split], arguments[split + 1 :]
    try:
        args = build_parser().parse_args(arguments)
        settings = _settings_from(args, dict(os.environ))
        if args.command == "run-step":
            return cmd_run_step(args, exec_argv, settings)
        if args.command == "doctor":
            return cmd_doctor(settings)
        if args.command == "healthcheck":
            return cmd_healthcheck(settings)
        from runnerd import commands  # the Redis side is only imported when used

        handler = {
            "serve": commands.serve,
            "submit": commands.submit,
            "result": commands.result,
            "demo": commands.demo,
        }
        return int(_run(handler[args.command](args, settings)))
    except (UsageError, ConfigError) as exc:
        print(f"runnerd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunnerdError as exc:
        print(f"runnerd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def entry() -> NoReturn:
    sys.exit(main())
