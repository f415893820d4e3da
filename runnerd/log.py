"""JSON-lines logging on stdout: one object per line, with level, logger, message, worker id and,
when the record carries them, execution id and step (and, at an execution's end, its
integration, failed step, error type and dead-letter reason). Customer output never goes
through here unmarked: it is in the step results, not the daemon's log."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# The last four: on the end-of-execution line, what an SRE filters failures by.
FIELDS = ("execution_id", "step", "worker_id", "integration", "failed_step", "error_type", "reason")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("runnerd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
