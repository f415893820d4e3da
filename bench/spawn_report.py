"""How the spawn scenario's figures are judged against the targets and written out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench import report
from bench.stats import Aggregate, Spread, Summary, spread
from bench.variants import Fresh, Runnerd, Variant

# The targets the spawn scenario is held against (per-step overhead of a trivial step).
TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0
TARGET_NODE_RATIO = 1.3  # runnerd's JavaScript step vs a bare `node -e`
TARGET_JS_FORK_P50_MS = 5.0  # a warm JavaScript child forked from the node zygote


@dataclass(frozen=True)
class Repetition:
    order: list[str]
    summaries: dict[str, Summary]
    ratios: dict[str, dict[str, dict[str, float]]]  # variant -> baseline -> {p50, p99}


@dataclass(frozen=True)
class Verdict:
    variant: str
    target: str
    measured: str
    met: bool


def ratio_spreads(
    variants: list[Variant], repetitions: list[Repetition]
) -> dict[str, dict[str, dict[str, Spread]]]:
    return {
        v.key: {
            base: {
                q: spread([r.ratios[v.key][base][q] for r in repetitions]) for q in ("p50", "p99")
            }
            for base in v.baselines
        }
        for v in variants
    }


def verdicts(
    variants: list[Variant],
    aggregates: dict[str, Aggregate],
    ratios: dict[str, dict[str, dict[str, Spread]]],
) -> list[Verdict]:
    judged = []
    for v in variants:
        if not isinstance(v, Runnerd):
            continue
        if v.runtime == "python":
            agg = aggregates[v.key]
            judged.append(
                Verdict(
                    v.key,
                    f"p50 <= {TARGET_P50_MS:g} ms and p99 <= {TARGET_P99_MS:g} ms",
                    f"p50 {report.ms(agg.p50)} ms, p99 {report.ms(agg.p99)} ms",
                    agg.p50 <= TARGET_P50_MS and agg.p99 <= TARGET_P99_MS,
                )
            )
        elif v.options.node_fork and v.pool_size > 0:
            agg = aggregates[v.key]
            judged.append(
                Verdict(
                    v.key,
                    f"p50 <= {TARGET_JS_FORK_P50_MS:g} ms",
                    f"p50 {report.ms(agg.p50)} ms (repetitions {report.ms(agg.p50_low)}.."
                    f"{report.ms(agg.p50_high)}), p99 {report.ms(agg.p99)} ms",
                    agg.p50 <= TARGET_JS_FORK_P50_MS,
                )
            )
        elif "js-fresh" in ratios[v.key]:
            p50, p99 = ratios[v.key]["js-fresh"]["p50"], ratios[v.key]["js-fresh"]["p99"]
            judged.append(
                Verdict(
                    v.key,
                    f"p50 <= {TARGET_NODE_RATIO:g}x node -e",
                    f"p50 {p50.median:.2f}x (repetitions {p50.low:.2f}..{p50.high:.2f}x), "
                    f"p99 {p99.median:.2f}x",
                    p50.median <= TARGET_NODE_RATIO,
                )
            )
    return judged


def table(
    variants: list[Variant],
    aggregates: dict[str, Aggregate],
    ratios: dict[str, dict[str, dict[str, Spread]]],
) -> str:
    labels = {v.key: v.label for v in variants}
    rows = []
    for v in variants:
        agg = aggregates[v.key]
        versus = ", ".join(
            f"{ratios[v.key][base]['p50'].median:.2f}x {labels[base]}" for base in v.baselines
        )
        rows.append(
            [
                v.label,
                report.ms(agg.p50),
                report.ms(agg.p90),
                report.ms(agg.p99),
                report.ms(agg.max),
                f"{report.ms(agg.p50_low)}..{report.ms(agg.p50_high)}",
                versus or "baseline",
            ]
        )
    headers = ["variant", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 range ms", "p50 vs"]
    return report.markdown_table(headers, rows)


def targets(verdicts: list[Verdict], notes: list[str]) -> str:
    lines = ["Targets:", ""]
    lines += [
        f"- {v.variant}: {v.target}: {v.measured}: {'met' if v.met else 'missed'}" for v in verdicts
    ]
    lines += [f"- note: {note}" for note in notes]
    return "\n".join(lines)


def markdown(command: str, info: dict[str, str], body: str) -> str:
    """The full report: what ran where, then the table and the verdicts."""
    heading = "## spawn: latency of a trivial step, as the caller sees it"
    machine = report.machine_markdown(info)
    return f"{heading}\n\n{machine}\n\nCommand: `{command}`\n\n{body}"


def layer_notes(variants: list[Variant], layers: list[str]) -> list[str]:
    """Every runnerd step should have run with every layer the host allows."""
    notes = []
    for v in variants:
        if isinstance(v, Runnerd) and sorted(v.layers) != sorted(layers):
            notes.append(f"{v.key} ran with layers {v.layers}, the host allows {layers}")
    return notes


def describe(variant: Variant) -> dict[str, Any]:
    described: dict[str, Any] = {
        "key": variant.key,
        "label": variant.label,
        "runtime": variant.runtime,
        "rate_per_s": variant.rate_per_s,
        "baselines": list(variant.baselines),
    }
    if isinstance(variant, Fresh):
        described["argv"] = [arg if "\n" not in arg else "<step source>" for arg in variant.argv]
    if isinstance(variant, Runnerd):
        described["pool_size"] = variant.pool_size
        described["layers"] = variant.layers
        if variant.runtime == "node":
            described["node_fork"] = variant.options.node_fork
    return described
