"""Hosts that steps cannot use: a node the slot uids cannot reach, one that is not there."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def hidden_node() -> Iterator[Path]:
    """A node binary in a 0700 directory, as `mktemp -d`, nvm under /root or a pyenv leave it:
    root runs it, the slot uids cannot even reach it."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    directory = Path(tempfile.mkdtemp(prefix="runnerd-hidden-node-"))  # mode 0700
    copy = directory / "node"
    try:
        os.link(os.path.realpath(node), copy)  # the same file, only behind another directory
    except OSError:
        shutil.copy2(node, copy)
    try:
        yield copy
    finally:
        shutil.rmtree(directory, ignore_errors=True)
