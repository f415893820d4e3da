"""The progress bar draws on a terminal only, and clears its line when done."""

from __future__ import annotations

import io

from bench.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_on_a_terminal_and_clears_its_line() -> None:
    stream = Terminal()
    progress = Progress("throughput", 4, stream)
    for _ in range(4):
        progress.advance()
    drawn = stream.getvalue()
    progress.close()

    assert "throughput [" + "#" * 30 + "] 4/4" in drawn, "the last step draws the full bar"
    assert stream.getvalue().endswith("\r\x1b[K"), "close clears the line"


def test_writes_nothing_to_a_log() -> None:
    stream = io.StringIO()
    progress = Progress("throughput", 4, stream)
    progress.advance(4)
    progress.close()

    assert stream.getvalue() == ""
