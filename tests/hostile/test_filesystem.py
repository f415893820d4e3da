"""A step looks for places on the filesystem to keep state for a later step (another
customer's), to fill the host's disk, or to find the host's files: every world-writable
directory, not only the three temp dirs. Under the full profile the step's root is an
allowlisted view, in which only its own /tmp is writable; under the Fargate profile (no mount
namespace) the zygote finds the host's writable directories at start and takes back everything
a slot's uid left in them before the slot is used again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, doctor_report, runnerd_argv, runnerd_env
from tests.hostile.conftest import UID_BASE, RunSequence, RunStep, Witnesses

# Every directory the step can create a file in, found by walking its whole filesystem.
WRITABLE_STEP = """
import errno, os

def run(input, ctx):
    writable = []
    stack = ["/"]
    while stack:
        path = stack.pop()
        if path in ("/proc", "/sys"):
            continue
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        probe = os.path.join(path, ".runnerd-probe")
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            os.unlink(probe)
            writable.append(path)
        except OSError:
            pass
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return {"writable": sorted(writable), "tmpdir": ctx.tmpdir,
            "root": sorted(os.listdir("/"))}
"""

DROP_STEP = """
import errno, os

def run(input, ctx):
    done = {}
    for path in input["paths"]:
        try:
            with open(path, "w") as f:
                f.write("left by an earlier step")
            done[path] = "written"
        except OSError as exc:
            done[path] = errno.errorcode[exc.errno]
    return done
"""

FIND_STEP = """
import errno, os

def run(input, ctx):
    found = {}
    for path in input["paths"]:
        try:
            with open(path) as f:
                found[path] = f.read()
        except OSError as exc:
            found[path] = errno.errorcode[exc.errno]
    return found
"""


@pytest.fixture
def drop_dir() -> Iterator[Path]:
    """A world-writable directory outside every temp dir, made before the sandbox starts."""
    path = Path(tempfile.mkdtemp(prefix="runnerd-hostile-drop-", dir="/run"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_only_the_steps_own_tmp_is_writable(
    run_step: RunStep, profile: str, witnesses: Witnesses, drop_dir: Path
) -> None:
    result = run_step(WRITABLE_STEP, "--wall-s", "60", timeout_s=120)

    assert result.exit_code == 0, result.report
    writable = result.output["writable"]
    if profile == "full":
        # /var/tmp and /dev/shm are links into /tmp; nothing of the host is there at all.
        assert writable == ["/tmp"], writable
        root = set(result.output["root"])
        assert {"usr", "etc", "dev", "proc", "tmp"} <= root, root
        assert not {"run", "root", "home", "opt", "srv", "mnt", "boot", "sys"} & root, root
    else:
        # Without a view the step may write wherever every user may: exactly the directories
        # the zygote found and cleans, plus its own temp dir.
        assert str(drop_dir) in writable and "/run/lock" in writable
        cleaned = set(_writable_dirs_found(profile))
        outside = [
            p for p in writable if p not in cleaned and not p.startswith(result.output["tmpdir"])
        ]
        assert outside == [], outside
    witnesses.assert_unharmed()


def test_files_left_outside_tmp_never_reach_a_later_step(
    run_sequence: RunSequence, profile: str, witnesses: Witnesses, drop_dir: Path
) -> None:
    paths = ["/run/lock/hostile-note", "/var/lock/hostile-note2", str(drop_dir / "note")]
    dropped, found = run_sequence(
        [(DROP_STEP, ".py", {"paths": paths}), (FIND_STEP, ".py", {"paths": paths})]
    )

    assert dropped["ok"] and found["ok"], (dropped, found)
    if profile == "full":
        assert set(dropped["output"].values()) == {"ENOENT"}, dropped  # no such places in view
    else:
        assert set(dropped["output"].values()) == {"written"}, dropped  # what Fargate allows
    assert set(found["output"].values()) == {"ENOENT"}, found
    left = [p for p in paths if os.path.exists(p)]
    assert left == [], f"a step's files outlived it on the host: {left}"
    witnesses.assert_unharmed()


def test_a_venv_under_a_private_directory(profile: str, tmp_path: Path) -> None:
    """An interpreter environment under a 0700 directory of root's: the full profile binds it
    into the view at its own path, so steps import from it; without a view steps cannot reach
    it, and run-step and doctor name the path."""
    private = Path(tempfile.mkdtemp(prefix="runnerd-venv-", dir="/root"))  # mode 0700
    try:
        venv = private / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next(venv.glob("lib/python3*/site-packages"))
        project_site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
        (site / "runnerd-deps.pth").write_text(f"{ROOT}\n{project_site}\n")
        (site / "customer_lib.py").write_text("GREETING = 'imported from the venv'\n")
        step = tmp_path / "step.py"
        step.write_text(
            "import customer_lib\ndef run(input, ctx):\n    return customer_lib.GREETING\n"
        )
        python = str(venv / "bin" / "python")
        env = runnerd_env()
        env.pop("PYTHONPATH", None)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            argv = [python if a == sys.executable else a for a in runnerd_argv(profile, *args)]
            return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)

        report = json.loads(run("run-step", str(step)).stdout)
        doctor = run("doctor")
        if profile == "full":
            assert report["output"] == "imported from the venv", report
            assert doctor.returncode == 0, doctor.stdout
        else:
            assert report["error"] is not None, report
            assert doctor.returncode != 0, doctor.stdout
            assert str(private) in doctor.stdout + doctor.stderr
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _writable_dirs_found(profile: str) -> list[str]:
    dirs: list[str] = doctor_report(profile)["writable_dirs"]
    return dirs


def test_slot_uids_own_nothing_on_the_host_afterwards(profile: str) -> None:
    """After the tests above: no file anywhere in the writable places belongs to a slot uid."""
    owned = []
    for directory in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        for dirpath, dirnames, filenames in os.walk(directory):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    uid = os.lstat(path).st_uid
                except OSError:
                    continue
                if UID_BASE <= uid <= UID_BASE + 256:
                    owned.append(path)
    assert owned == []
