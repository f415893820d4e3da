"""The autoscaling signal as CloudWatch Embedded Metric Format (EMF) lines on stdout.

ECS target tracking reads CloudWatch, not Prometheus. With the awslogs driver, a log line in EMF
becomes CloudWatch metrics with no sidecar: every RUNNERD_EMF_INTERVAL_S the worker prints one
such line with the backlog per worker and the saturation, dimensioned by service name, which is
what deploy/autoscaling.json tracks. (The alternative, a collector sidecar scraping /metrics, is
in deploy/adot-sidecar.json.) Format: the `_aws` member with Timestamp (ms) and CloudWatchMetrics
directives, then each dimension and metric value as a top-level member.
"""

from __future__ import annotations

import json
import time

NAMESPACE = "runnerd"
DIMENSION = "Service"
BACKLOG_PER_WORKER = "BacklogPerWorker"
SATURATION = "Saturation"


def line(
    service: str, backlog_per_worker: float, saturation: float, now_s: float | None = None
) -> str:
    timestamp_ms = int((time.time() if now_s is None else now_s) * 1000)
    document = {
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [[DIMENSION]],
                    "Metrics": [
                        {"Name": BACKLOG_PER_WORKER, "Unit": "Count"},
                        {"Name": SATURATION, "Unit": "None"},
                    ],
                }
            ],
        },
        DIMENSION: service,
        BACKLOG_PER_WORKER: backlog_per_worker,
        SATURATION: saturation,
    }
    return json.dumps(document, separators=(",", ":"))
