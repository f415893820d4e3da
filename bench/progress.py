"""A one-line progress bar on stderr for long runs; standard library only, because the peer
driver (bench/peer_apps/drive.py) uses it too, inside the peers' own environments.

Drawn only when stderr is a terminal, at most ten times a second, so it costs nothing measurable
and leaves logs and CI output clean.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
REDRAW_S = 0.1


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()
        self.drawn = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self.drawn >= REDRAW_S or self.done >= self.total):
            self.drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        filled = min(WIDTH, WIDTH * self.done // self.total)
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        bar = "#" * filled + "-" * (WIDTH - filled)
        line = f"\r{self.label} [{bar}] {self.done}/{self.total} {rate:.0f}/s {elapsed:.0f}s"
        self.stream.write(line + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
