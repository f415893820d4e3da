"""A step looks for the caller's secrets: its environment (the Redis password, cloud
credentials, the ECS credential endpoint's path and the RUNNERD_SECRET_* variables live there
in production), its files, and the secrets directory of a real `serve`."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from runnerd.client import Client
from runnerd.messages import Integration
from tests.conftest import runnerd_argv, runnerd_env
from tests.hostile.conftest import RunStep, Witnesses

ENVIRONMENT_STEP = """
import errno, os

def run(input, ctx):
    seen = {"os.environ": "\\n".join(f"{k}={v}" for k, v in os.environ.items())}
    refused = {}
    paths = ["/proc/self/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ"]
    paths += [f"/proc/{pid}/environ" for pid in os.listdir("/proc") if pid.isdigit()]
    for path in dict.fromkeys(paths):
        try:
            with open(path, "rb") as f:
                seen[path] = f.read().decode(errors="replace")
        except OSError as exc:
            refused[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    return {"seen": seen, "refused": refused}
"""

FILES_STEP = """
import errno, os

def attempt(action, *args):
    try:
        value = action(*args)
        return value if isinstance(value, str) else "done"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def read(path):
    with open(path) as f:
        return f.read()

def overwrite(path):
    with open(path, "w") as f:
        f.write("overwritten")

def run(input, ctx):
    private, secret, public = input["private"], input["secret"], input["public"]
    return {
        "read private": attempt(read, private),
        "read secret": attempt(read, secret),
        "read public": attempt(read, public),
        "overwrite secret": attempt(overwrite, secret),
        "overwrite public": attempt(overwrite, public),
        "chmod secret": attempt(os.chmod, secret, 0o666),
        "unlink public": attempt(os.unlink, public),
        "create beside": attempt(overwrite, os.path.join(os.path.dirname(public), "new.txt")),
    }
"""


def test_step_cannot_find_the_callers_environment(
    run_step_with_env: RunStep, witnesses: Witnesses
) -> None:
    token = witnesses.secret
    caller_env = {
        "REDIS_URL": f"redis://:{token}@127.0.0.1:6379/0",
        "AWS_SECRET_ACCESS_KEY": token,
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": f"/v2/credentials/{token}",
        "HOSTILE_SECRET": token,
        "RUNNERD_SECRET_HOSTILE": token,
    }
    result = run_step_with_env(ENVIRONMENT_STEP, caller_env)

    assert result.exit_code == 0, result.report
    seen = result.output["seen"]
    assert [place for place, text in seen.items() if token in text] == []
    # The step's environment is only what the sandbox gives every step.
    assert sorted(line.split("=")[0] for line in seen["os.environ"].splitlines()) == [
        "HOME",
        "LANG",
        "PATH",
        "TMPDIR",
    ]
    witnesses.assert_unharmed()


def test_step_cannot_read_or_change_the_callers_files(
    run_step: RunStep, witnesses: Witnesses, profile: str
) -> None:
    paths = {
        "private": str(witnesses.private_file),
        "secret": str(witnesses.exposed_secret),
        "public": str(witnesses.exposed_public),
    }
    result = run_step(FILES_STEP, "--input", json.dumps(paths))

    assert result.exit_code == 0, result.report
    outcome = result.output
    # Under the full profile nothing outside the filesystem view exists for the step, not
    # even the world-readable file beside the secret. Without a view that file is readable:
    # the path is reachable, so what refuses the secret is its owner and mode.
    expected = "ENOENT" if profile == "full" else witnesses.exposed_public.read_text()
    assert outcome.pop("read public") == expected
    assert witnesses.secret not in json.dumps(outcome)
    assert set(outcome.values()) <= {"EACCES", "EPERM", "ENOENT"}, outcome
    witnesses.assert_unharmed()


# Everything it finds goes back base64-encoded: masking would hide a leak in plain text.
SERVE_STEP = """
import base64, errno, os

def read(path):
    try:
        if os.path.isdir(path):
            return "dir: " + " ".join(os.listdir(path))
        with open(path, "rb") as f:
            return base64.b64encode(f.read()).decode()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def run(input, ctx):
    paths = [f"/proc/{input['daemon']}/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ"]
    paths += [f"/proc/{pid}/environ" for pid in os.listdir("/proc") if pid.isdigit()]
    paths += [input["dir"], input["dir"] + "/OTHER_FILE", input["dir"] + "/MINE"]
    seen = {path: read(path) for path in dict.fromkeys(paths)}
    seen["mine"] = base64.b64encode(os.environ["MINE"].encode()).decode()
    return seen
"""


@pytest.fixture
def secret_serve(
    tmp_path: Path, redis_port: int, witnesses: Witnesses, profile: str
) -> Iterator[dict[str, Any]]:
    """A `runnerd serve` under the profile with secrets of three kinds: MINE (a variable, the
    step's integration is allowed it), OTHER (a variable), OTHER_FILE (a file, 0400, in a 0700
    directory); the values of the last two are the witnesses' secret."""
    # Beside the witnesses' files, where every user may look (tmp_path is root's, 0700).
    directory = witnesses.exposed_dir / "secrets"
    directory.mkdir()
    directory.chmod(0o700)
    (directory / "OTHER_FILE").write_text(witnesses.secret)
    (directory / "OTHER_FILE").chmod(0o400)
    prefix = f"h{uuid.uuid4().hex[:12]}"
    url = f"redis://127.0.0.1:{redis_port}/0"
    env = runnerd_env(
        REDIS_URL=url,
        RUNNERD_KEY_PREFIX=prefix,
        RUNNERD_POOL_SIZE="0",  # no warm child alive when the witnesses count leftovers
        RUNNERD_HTTP_PORT="0",
        RUNNERD_SECRETS_DIR=str(directory),
        RUNNERD_SECRETS_ALLOW="hostile=MINE",
        RUNNERD_SECRET_MINE="mine-" + uuid.uuid4().hex,
        RUNNERD_SECRET_OTHER=witnesses.secret,
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            runnerd_argv(profile, "serve"),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"worker \S+ serving", log_path.read_text(errors="replace")):
            assert daemon.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "runnerd serve did not start"
            time.sleep(0.1)
        yield {"url": url, "prefix": prefix, "pid": daemon.pid, "dir": str(directory)}
    finally:
        daemon.terminate()
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{{{prefix}*"):
            client.delete(key)
        client.close()


def test_step_of_serve_finds_no_other_secret(
    secret_serve: dict[str, Any], witnesses: Witnesses, profile: str
) -> None:
    step = {"name": "look", "source": SERVE_STEP, "env": {"MINE": {"secret": "MINE"}}}
    integration = Integration.from_dict({"name": "hostile", "steps": [step]})
    data = {"daemon": secret_serve["pid"], "dir": secret_serve["dir"]}

    async def run() -> Any:
        async with Client.connect(secret_serve["url"], secret_serve["prefix"]) as client:
            return await client.run(integration, data, timeout=60)

    result = asyncio.run(run())

    assert result.status == "succeeded", result.error
    seen = {path: _decoded(text) for path, text in result.output.items()}
    assert seen.pop("mine").startswith("mine-")  # the one it is allowed arrived
    assert [path for path, text in seen.items() if witnesses.secret in text] == []
    # The daemon's own environment (RUNNERD_SECRET_* in its initial block) and the secrets
    # directory: not in the step's /proc and view (full), refused by uid and mode (Fargate).
    expected = "ENOENT" if profile == "full" else "EACCES"
    assert seen[f"/proc/{secret_serve['pid']}/environ"] == expected
    assert seen[secret_serve["dir"]] == expected
    assert seen[secret_serve["dir"] + "/OTHER_FILE"] == expected
    witnesses.assert_unharmed()


def _decoded(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode(errors="replace")
    except ValueError:
        return text
