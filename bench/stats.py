"""Percentiles within one repetition, medians and ranges across repetitions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """One variant in one repetition; latencies in milliseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True)
class Spread:
    """The median of per-repetition values and their range."""

    median: float
    low: float
    high: float


@dataclass(frozen=True)
class Aggregate:
    """One variant across repetitions: the median of each per-repetition percentile, and the
    range of the per-repetition p50s (how far one repetition can be from another)."""

    repetitions: int
    p50: float
    p90: float
    p99: float
    max: float
    p50_low: float
    p50_high: float


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between closest ranks (as numpy's
    default does), so p99 of 200 samples lies between the 2nd and 3rd largest."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples_ms: Sequence[float]) -> Summary:
    return Summary(
        n=len(samples_ms),
        p50=percentile(samples_ms, 50),
        p90=percentile(samples_ms, 90),
        p99=percentile(samples_ms, 99),
        max=max(samples_ms),
    )


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


def aggregate(summaries: Sequence[Summary]) -> Aggregate:
    p50s = [s.p50 for s in summaries]
    return Aggregate(
        repetitions=len(summaries),
        p50=statistics.median(p50s),
        p90=statistics.median(s.p90 for s in summaries),
        p99=statistics.median(s.p99 for s in summaries),
        max=statistics.median(s.max for s in summaries),
        p50_low=min(p50s),
        p50_high=max(p50s),
    )
