"""`runnerd` subcommands: parse, build Settings, make one call, return an exit code.

Exit codes, the same for every subcommand:
  0  ok (the execution succeeded; the status was read; the dead letters were replayed; the
     execution was cancelled)
  1  the work failed, or what was asked did not happen: a step or an execution failed (also
     `dead` or `cancelled`), a required sandbox layer is missing, Redis cannot be reached, a
     replay was refused, a cancel came after the execution had finished
  2  usage: a bad flag or environment value (REDIS_URL with no redis://, rediss:// or unix://
     scheme, or a database the server does not have), an unreadable file, a negative
     --timeout, `dead-letters purge` without --yes
  3  nothing there (yet): no result within the timeout or at all, an unknown execution
     (cancel), no such dead letter
User errors print one line on stderr, no traceback. The operator's commands (status,
dead-letters, cancel) print text, or one JSON document with --json; result and submit --wait
print a result as one JSON line either way (--json is accepted there too).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import msgspec

from runnerd import __version__, run_step
from runnerd import settings as settings_module
from runnerd.errors import ConfigError, RunnerdError, UsageError
from runnerd.outcomes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from runnerd.run_step import RUNTIMES as RUNTIMES
from runnerd.secret_source import ENV_PREFIX, SecretSource
from runnerd.settings import SETTINGS_HELP, Settings, env_name
from runnerd.spawner import Spawner
from runnerd.zygote_link import SandboxOptions
from sandbox.protocol import Capabilities

SANDBOX = ("sandbox_mode", "sandbox_require", "sandbox_uid_base", "sandbox_slots")
NODE = ("node_path", "node_fork")
CLIENT = ("redis_url", "key_prefix", "partitions")
BUNDLES = ("bundle_cache_dir", "bundle_cache_mb", "bundle_max_mb")
# What a worker reads, bar where its Redis is and its HTTP server (a demo has neither).
WORKER = (
    "concurrency",
    "partitions",
    "key_prefix",
    "result_ttl_s",
    "claim_idle_s",
    "max_deliveries",
    "drain_s",
    "retry_base_s",
    "retry_max_s",
    "log_level",
    "emf_interval_s",
    "service_name",
    *SANDBOX,
    "pool_size",
    *NODE,
)
# The settings each subcommand reads: its --help shows these and it accepts no others.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "run-step": (*SANDBOX, *NODE),
    "doctor": (*SANDBOX, *NODE, "bundle_cache_dir"),
    "serve": (
        "redis_url",
        *WORKER,
        *BUNDLES,
        "http_port",
        "http_host",
        "metrics_integration_label",
        "secrets_dir",
        "secrets_allow",
    ),
    "submit": CLIENT,
    "result": (*CLIENT, "result_ttl_s"),
    "status": CLIENT,
    "dead-letters": CLIENT,  # on each of its own subcommands
    "cancel": (*CLIENT, "result_ttl_s"),
    "healthcheck": ("http_port",),
    "demo": (*WORKER, *BUNDLES),
    "bundle": (*CLIENT, "bundle_max_mb"),  # on its `build` subcommand
}
DEAD_LETTER_ID = "<partition>:<stream id> as `dead-letters list` shows it, e.g. 0:1712345678901-0"
METAVARS = {
    "redis_url": "URL",
    "key_prefix": "PREFIX",
    "http_host": "HOST",
    "service_name": "NAME",
    "node_path": "PATH",
    "sandbox_require": "LAYER,...",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # "runnerd: " is printed once, by main(); a subcommand names itself after it.
        command = self.prog.removeprefix("runnerd").strip()
        raise UsageError(f"{command}: {message}" if command else message)


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="runnerd",
        description="Run customer steps, each in a fresh sandbox.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"runnerd {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, title="commands"
    )

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=_HelpFormatter
        )

    run_step.add_arguments(command("run-step", "run one step locally (no Redis)"))
    command("doctor", "print which sandbox layers work on this host")
    serve = command("serve", "run a worker: executions from Redis Streams")
    serve.add_argument(
        "--embedded-redis",
        action="store_true",
        help="start a private Redis for the life of this command and print its URL",
    )
    submit = command(
        "submit",
        "enqueue an execution of an integration, or one per line of a JSON Lines file; print "
        "the execution ids, or with --wait the results (exit 0 all succeeded, 1 one failed, 3 "
        "one has no result in time)",
    )
    submit.add_argument("integration", help="an integration JSON file")
    submit.add_argument(
        "--input",
        default="null",
        metavar="JSON|@FILE",
        help="JSON input, @file.json, or @file.jsonl: one execution per line (blank lines "
        "skipped; a bad line submits nothing)",
    )
    submit.add_argument("--wait", action="store_true", help="wait and print the results")
    submit.add_argument(
        "--timeout", type=_seconds, default=60.0, metavar="S", help="seconds to wait (--wait)"
    )
    _add_json(submit, 'each id as {"execution_id": ...} (results are JSON anyway)')
    result = command(
        "result",
        "print an execution's result as submit --wait does (exit 0 succeeded, 1 failed, "
        "dead or cancelled, 3 no result yet)",
    )
    result.add_argument("execution_id", help="what submit printed")
    result.add_argument("--wait", action="store_true", help="wait for the result")
    result.add_argument(
        "--timeout", type=_seconds, default=60.0, metavar="S", help="seconds to wait (--wait)"
    )
    _add_json(result, "the result (it is JSON anyway)")
    status = command(
        "status",
        "per partition the backlog, pending, oldest entry's age, delayed retries and dead "
        "letters; the live workers; totals",
    )
    _add_json(status, "one JSON document")
    dead = command("dead-letters", "list, show, replay or purge the dead-letter streams")
    _add_dead_letter_commands(dead)
    cancel = command(
        "cancel",
        "cancel an execution: a queued one never runs, a running one has its step killed; "
        "its result is `cancelled` (exit 0 cancelled, 1 it had finished, 3 unknown)",
    )
    cancel.add_argument("execution_id", help="what submit printed")
    _add_json(cancel, "{execution_id, outcome: cancelled|finished|unknown, status}")
    command("healthcheck", "exit 0 when this host's worker answers /healthz (for HEALTHCHECK)")
    demo = command("demo", "run the bundled 6-step integration on an embedded Redis and one worker")
    demo.add_argument("--runs", type=int, default=20, help="timed runs after the first")
    bundle = command("bundle", "build dependency bundles and store them for the workers")
    bundle_leaves = bundle.add_subparsers(
        dest="bundle_command", metavar="SUBCOMMAND", parser_class=_Parser, title="subcommands"
    )
    build = bundle_leaves.add_parser(
        "build",
        help="install an integration's declared npm and pip dependencies (where the registries "
        "are reachable) and store each bundle in Redis, unless stored already",
        formatter_class=_HelpFormatter,
    )
    build.add_argument("integration", help="an integration JSON file")
    for name, subparser in commands.choices.items():
        if name in ("dead-letters", "bundle"):  # a flag belongs to the subcommand it is given after
            for leaf in _subcommands(subparser).values():
                _add_setting_flags(leaf, COMMAND_SETTINGS[name])
        else:
            _add_setting_flags(subparser, COMMAND_SETTINGS[name])
    return parser


def _add_dead_letter_commands(parser: argparse.ArgumentParser) -> None:
    leaves = parser.add_subparsers(
        dest="dead_letters_command", metavar="SUBCOMMAND", parser_class=_Parser, title="subcommands"
    )

    def leaf(name: str, help_text: str) -> argparse.ArgumentParser:
        full = f"{help_text}. A dead letter's id: {DEAD_LETTER_ID}"
        return leaves.add_parser(
            name, help=help_text, description=full, formatter_class=_HelpFormatter
        )

    listing = leaf("list", "the newest dead letters: id, when, execution, reason")
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="how many at most")
    _add_json(listing, "{total, dead_letters: [...]}")
    show = leaf("show", "one dead letter whole: reason, the execution, its result")
    show.add_argument("id", help="a dead letter's id")
    _add_json(show, "one JSON document")
    replay = leaf(
        "replay",
        "put dead letters' executions back on the work stream as attempt 1, with a fresh "
        "delivery count; says what it did per id (exit 1 if one was refused)",
    )
    replay.add_argument("ids", nargs="+", metavar="ID", help="dead letters' ids")
    _add_json(replay, "{replays: [{id, outcome, execution_id, new_entry_id}]}")
    purge = leaf("purge", "delete every dead letter (refused, exit 2, without --yes)")
    purge.add_argument("--yes", action="store_true", help="really delete them")
    _add_json(purge, "{deleted: N}")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print JSON: {what}")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _add_setting_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...]) -> None:
    """After the command's own options: the settings it reads, each with its variable and
    default (a flag overrides the variable)."""
    group = parser.add_argument_group(
        "settings", "each also read from its environment variable; a flag overrides it"
    )
    defaults = Settings()
    for field in fields:
        kind = Settings.__annotations__[field]
        choices = _choices(kind)
        default = getattr(defaults, field)
        if isinstance(default, tuple):
            default = ",".join(default)
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, float):
            default = f"{default:g}"
        shown = {"node_path": "node on PATH"}.get(field, default)
        group.add_argument(
            "--" + field.replace("_", "-"),
            dest=f"setting_{field}",
            metavar=None if choices else METAVARS.get(field, _metavar(field, kind)),
            choices=choices,
            help=f"{SETTINGS_HELP[field]} [{env_name(field)}, default {shown}]",
        )


def _choices(kind: str) -> list[str] | None:
    if kind == "bool":
        return ["true", "false"]
    if kind.startswith("Literal["):
        return [part.strip().strip("'\"") for part in kind[8:-1].split(",")]
    if kind == "SandboxMode":
        return ["strict", "best-effort"]
    return None


def _metavar(field: str, kind: str) -> str:
    if kind == "float":
        return "S" if field.endswith("_s") else "X"
    return "N" if kind == "int" else "TEXT"


def _settings_from(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    overrides: dict[str, Any] = {}
    for field in SETTINGS_HELP:
        value = getattr(args, f"setting_{field}", None)
        if value is not None and field == "sandbox_require":
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        overrides[field] = value
    return settings_module.load(environ, overrides)


def _take_secrets(args: argparse.Namespace, environ: dict[str, str], settings: Settings) -> None:
    """For `serve`: the worker's secrets (RUNNERD_SECRET_*, RUNNERD_SECRETS_DIR) as its
    SecretSource, `args.secrets`; a bad name or allowlist is a ConfigError before anything
    starts. From here only that object holds them: no process this one starts (an embedded
    Redis, the compiler of the node addon) inherits the variables."""
    if args.command != "serve":
        return
    args.secrets = SecretSource.load(environ, settings.secrets_dir, settings.secrets_allow)
    for variable in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        del os.environ[variable]


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
        # Dependency bundles are unpacked here and shown to steps read-only.
        "bundle_cache_dir": settings.bundle_cache_dir,
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
        args, unknown = build_parser().parse_known_args(arguments)
        if unknown and args.command is not None:
            raise UsageError(
                f"{args.command}: unrecognized arguments: {' '.join(unknown)} "
                f"(runnerd {args.command} --help lists what it takes)"
            )
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            raise UsageError(
                f"a command is needed: {', '.join(COMMAND_SETTINGS)} (runnerd --help says more)"
            )
        _need_subcommand(args)
        environ = dict(os.environ)
        settings = _settings_from(args, environ)
        _take_secrets(args, environ, settings)
        if args.command == "run-step":
            return run_step.command(args, exec_argv, settings, _run)
        if args.command == "doctor":
            return cmd_doctor(settings)
        if args.command == "healthcheck":
            return cmd_healthcheck(settings)
        from runnerd import bundle_command, commands, operator_commands  # only when used

        handler = {
            "serve": commands.serve,
            "submit": commands.submit,
            "result": commands.result,
            "status": operator_commands.status,
            "dead-letters": operator_commands.dead_letters_command,
            "cancel": operator_commands.cancel,
            "demo": commands.demo,
            "bundle": bundle_command.build,
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


def _need_subcommand(args: argparse.Namespace) -> None:
    if args.command == "bundle" and args.bundle_command is None:
        raise UsageError("bundle: a subcommand is needed: build (runnerd bundle --help)")
    if args.command == "dead-letters" and args.dead_letters_command is None:
        raise UsageError(
            "dead-letters: a subcommand is needed: list, show, replay, purge "
            "(runnerd dead-letters --help says more)"
        )


def entry() -> NoReturn:
    sys.exit(main())
