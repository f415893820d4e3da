"""A step looks for the caller's secrets: its environment (the Redis password, cloud
credentials and the ECS credential endpoint's path live there in production) and its files."""

from __future__ import annotations

import json

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
