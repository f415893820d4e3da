"""How the js scenario's figures are gathered over repetitions, judged and written out."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench import report
from bench.stats import Spread, Summary, spread
from bench.workers import TreeMemory

# The targets of the forked path (one worker process, 2 cores, every step sandboxed).
TARGET_JS_CPU_MS = 8.0  # CPU of the worker's whole tree per trivial JavaScript execution
TARGET_JS_RATE_RATIO = 0.7  # JavaScript executions/s over Python executions/s, same worker
TARGET_JS_CHAIN_P50_MS = 40.0  # six JavaScript steps, one execution at a time
TARGET_RSS_GROWTH_MIB = 2.0  # first reading after the warm-up to the last, over the soak
RATES = ("fork-node", "fork-python", "exec-node", "exec-python")
LABELS = {
    "fork-node": ("forked", "JavaScript"),
    "fork-python": ("forked", "Python"),
    "exec-node": ("exec'd per step", "JavaScript"),
    "exec-python": ("exec'd per step", "Python"),
}


@dataclass(frozen=True)
class Throughput:
    """One measurement in one repetition: trivial executions from concurrent callers, or
    6-step chains one at a time (then the CPU is per chain)."""

    per_s: float
    latency: Summary
    cpu_ms: dict[str, tuple[float, float]]  # per execution, by role (bench/cpu.py): user, sys
    layers: list[str]

    @property
    def cpu_ms_total(self) -> float:
        return sum(user + system for user, system in self.cpu_ms.values())


@dataclass
class Repetition:
    throughput: dict[str, Throughput]  # by case, RATES
    chains: dict[str, Throughput]  # by path
    node_cpu_ms: float  # median CPU of one bare `node -e 0`
    node_wall_ms: float


@dataclass(frozen=True)
class SoakSample:
    executions: int  # measured so far, after the warm-up
    per_s: float  # over the executions since the previous reading (0 at the first)
    cpu_ms: float  # CPU of the worker's tree per execution, over the same
    memory: TreeMemory


# --- across repetitions ---------------------------------------------------------------------


def _pairs(
    repetitions: Sequence[Repetition], figure: Callable[[Repetition], float | None]
) -> Spread | None:
    values = [v for v in (figure(r) for r in repetitions) if v is not None]
    return spread(values) if values else None


def _rate(key: str, what: str) -> Callable[[Repetition], float | None]:
    def figure(r: Repetition) -> float | None:
        found = r.throughput.get(key)
        if found is None:
            return None
        return found.per_s if what == "per_s" else found.cpu_ms_total

    return figure


def _ratio(
    top: Callable[[Repetition], float | None], bottom: Callable[[Repetition], float | None]
) -> Callable[[Repetition], float | None]:
    def figure(r: Repetition) -> float | None:
        a, b = top(r), bottom(r)
        return None if a is None or not b else a / b

    return figure


def _chain_p50(path: str) -> Callable[[Repetition], float | None]:
    return lambda r: r.chains[path].latency.p50 if path in r.chains else None


def _node_cpu(r: Repetition) -> float:
    return r.node_cpu_ms


RATIOS: dict[str, Callable[[Repetition], float | None]] = {
    "forked: JavaScript / Python executions/s": _ratio(
        _rate("fork-node", "per_s"), _rate("fork-python", "per_s")
    ),
    "JavaScript executions/s: forked / exec'd": _ratio(
        _rate("fork-node", "per_s"), _rate("exec-node", "per_s")
    ),
    "JavaScript CPU per execution: forked / exec'd": _ratio(
        _rate("fork-node", "cpu"), _rate("exec-node", "cpu")
    ),
    "JavaScript CPU per execution, forked / one node -e 0": _ratio(
        _rate("fork-node", "cpu"), _node_cpu
    ),
    "JavaScript CPU per execution, exec'd / one node -e 0": _ratio(
        _rate("exec-node", "cpu"), _node_cpu
    ),
    "6-step JS chain p50: forked / exec'd": _ratio(_chain_p50("fork"), _chain_p50("exec")),
    "Python executions/s: exec'd-path worker / forked-path worker (a control, ~1)": _ratio(
        _rate("exec-python", "per_s"), _rate("fork-python", "per_s")
    ),
}


def ratios(repetitions: Sequence[Repetition]) -> dict[str, Spread]:
    found = {name: _pairs(repetitions, figure) for name, figure in RATIOS.items()}
    return {name: value for name, value in found.items() if value is not None}


def _median_roles(measured: Sequence[Throughput]) -> dict[str, float]:
    """Median over repetitions of each role's user + system ms, and of the whole tree's."""
    roles = {
        role: statistics.median(sum(t.cpu_ms[role]) for t in measured)
        for role in measured[0].cpu_ms
    }
    roles["total"] = statistics.median(t.cpu_ms_total for t in measured)
    roles["user"] = statistics.median(sum(u for u, _ in t.cpu_ms.values()) for t in measured)
    roles["system"] = statistics.median(sum(s for _, s in t.cpu_ms.values()) for t in measured)
    return roles


def _aggregate(measured: Sequence[Throughput]) -> dict[str, Any]:
    return {
        "per_s": spread([t.per_s for t in measured]),
        "p50": spread([t.latency.p50 for t in measured]),
        "p90": statistics.median(t.latency.p90 for t in measured),
        "p99": statistics.median(t.latency.p99 for t in measured),
        "max": statistics.median(t.latency.max for t in measured),
        "n": measured[0].latency.n,
        "cpu_ms": _median_roles(measured),
    }


def aggregates(repetitions: Sequence[Repetition]) -> dict[str, Any]:
    if not repetitions:
        return {}
    found: dict[str, Any] = {}
    for key in RATES:
        measured = [r.throughput[key] for r in repetitions if key in r.throughput]
        if measured:
            found[key] = _aggregate(measured)
    for path in ("fork", "exec"):
        measured = [r.chains[path] for r in repetitions if path in r.chains]
        if measured:
            found[f"{path}-chain"] = _aggregate(measured)
    found["node -e 0"] = {
        "cpu_ms": spread([r.node_cpu_ms for r in repetitions]),
        "wall_ms": spread([r.node_wall_ms for r in repetitions]),
    }
    return found


def layers(repetitions: Sequence[Repetition], soak_layers: Sequence[str]) -> list[str]:
    found = set(soak_layers)
    for r in repetitions:
        for t in [*r.throughput.values(), *r.chains.values()]:
            found |= set(t.layers)
    return sorted(found)


# --- the report -----------------------------------------------------------------------------


def _range(s: Spread, digits: int = 0) -> str:
    return f"{s.median:.{digits}f} ({s.low:.{digits}f}..{s.high:.{digits}f})"


def _cpu_cells(cpu: dict[str, float]) -> list[str]:
    return [
        f"{cpu['total']:.1f} ({cpu['user']:.1f} / {cpu['system']:.1f})",
        *(f"{cpu[role]:.1f}" for role in ("worker", "zygote", "node zygote", "steps")),
    ]


def rate_table(found: dict[str, Any]) -> str:
    rows = []
    for key in RATES:
        if key in found:
            agg = found[key]
            path, runtime = LABELS[key]
            rows.append(
                [
                    path,
                    runtime,
                    str(agg["n"]),
                    _range(agg["per_s"]),
                    report.ms(agg["p50"].median),
                    report.ms(agg["p99"]),
                    *_cpu_cells(agg["cpu_ms"]),
                ]
            )
    headers = ["JS path", "steps", "n per rep.", "executions/s (range)", "p50 ms", "p99 ms"]
    headers += ["CPU ms per execution (user / sys)", "worker", "zygote", "node zygote", "steps"]
    return report.markdown_table(headers, rows)


def chain_table(found: dict[str, Any]) -> str:
    rows = []
    for path in ("fork", "exec"):
        agg = found.get(f"{path}-chain")
        if agg is not None:
            p50 = agg["p50"]
            rows.append(
                [
                    "forked" if path == "fork" else "exec'd per step",
                    str(agg["n"]),
                    report.ms(p50.median),
                    report.ms(agg["p90"]),
                    report.ms(agg["p99"]),
                    report.ms(agg["max"]),
                    f"{report.ms(p50.low)}..{report.ms(p50.high)}",
                    *_cpu_cells(agg["cpu_ms"]),
                ]
            )
    headers = ["6 JS steps, JS path", "n per rep.", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    headers += ["p50 range ms", "CPU ms per chain (user / sys)", "worker", "zygote"]
    headers += ["node zygote", "steps"]
    return report.markdown_table(headers, rows)


def ratio_table(found: dict[str, Spread]) -> str:
    rows = [[name, f"{s.median:.2f}x", f"{s.low:.2f}..{s.high:.2f}x"] for name, s in found.items()]
    return report.markdown_table(["ratio, per repetition", "median", "range"], rows)


def verdicts(found: dict[str, Any], ratio: dict[str, Spread]) -> list[str]:
    lines = []
    if "fork-node" in found:
        cpu_ms = found["fork-node"]["cpu_ms"]["total"]
        met = cpu_ms <= TARGET_JS_CPU_MS
        lines.append(
            f"- forked JavaScript: CPU per execution <= {TARGET_JS_CPU_MS:g} ms (worker's whole "
            f"tree): {cpu_ms:.1f} ms: {'met' if met else 'missed'}"
        )
    rate = ratio.get("forked: JavaScript / Python executions/s")
    if rate is not None:
        met = rate.median >= TARGET_JS_RATE_RATIO
        lines.append(
            f"- forked JavaScript executions/s >= {TARGET_JS_RATE_RATIO:g}x Python's, same worker: "
            f"{rate.median:.2f}x (repetitions {rate.low:.2f}..{rate.high:.2f}x): "
            f"{'met' if met else 'missed'}"
        )
    if "fork-chain" in found:
        p50 = found["fork-chain"]["p50"]
        met = p50.median <= TARGET_JS_CHAIN_P50_MS
        lines.append(
            f"- forked 6-step JavaScript chain p50 <= {TARGET_JS_CHAIN_P50_MS:g} ms: "
            f"{report.ms(p50.median)} ms "
            f"(repetitions {report.ms(p50.low)}..{report.ms(p50.high)}): "
            f"{'met' if met else 'missed'}"
        )
    return lines


def comparison_body(
    repetitions: Sequence[Repetition], paths: Sequence[str]
) -> tuple[str, list[str]]:
    found = aggregates(repetitions)
    ratio = ratios(repetitions)
    node = found["node -e 0"]
    parts = [
        rate_table(found),
        chain_table(found),
        f"A bare `node -e 0`: {_range(node['cpu_ms'], 1)} ms of CPU, "
        f"{_range(node['wall_ms'], 1)} ms wall (median of each repetition's median).",
    ]
    if ratio:
        parts.append(ratio_table(ratio))
    judged = verdicts(found, ratio)
    if "fork" not in paths:
        judged.append("- no targets: the forked path was not measured")
    parts.append("Targets:\n\n" + "\n".join(judged))
    return "\n\n".join(parts) + "\n", judged


def soak_body(samples: Sequence[SoakSample], planned: int) -> tuple[str, list[str]]:
    first, last = samples[0].memory, samples[-1].memory
    rows = []
    for name, field in (
        ("worker (runnerd serve)", "worker_mib"),
        ("zygote", "zygote_mib"),
        ("node zygote", "node_zygote_mib"),
    ):
        values: list[float] = [getattr(s.memory, field) for s in samples]
        rows.append(
            [
                name,
                f"{values[0]:.2f}",
                f"{values[-1]:.2f}",
                f"{max(values):.2f}",
                f"{values[-1] - values[0]:+.2f}",
            ]
        )
    headers = ["process", "first MiB", "last MiB", "max MiB", "last - first MiB"]
    table = report.markdown_table(headers, rows)
    measured = samples[1:]
    done = samples[-1].executions
    rate = spread([s.per_s for s in measured])
    cpu_ms = spread([s.cpu_ms for s in measured])
    children = [s.memory.zygote_children for s in samples]
    summary = (
        f"{done} of {planned} trivial JavaScript executions, forked, in {len(measured)} chunks "
        f"(RSS read after the warm-up and after each): executions/s per chunk {_range(rate)}, "
        f"CPU per execution {_range(cpu_ms, 1)} ms; processes under the zygote "
        f"{children[0]} at the first reading, {min(children)}..{max(children)} over the soak."
    )
    judged = []
    for name, growth in (
        ("worker", last.worker_mib - first.worker_mib),
        ("node zygote", last.node_zygote_mib - first.node_zygote_mib),
    ):
        met = growth <= TARGET_RSS_GROWTH_MIB
        judged.append(
            f"- {name} RSS flat over {done} JavaScript executions (last - first <= "
            f"{TARGET_RSS_GROWTH_MIB:g} MiB): {growth:+.2f} MiB: {'met' if met else 'missed'}"
        )
    body = f"{table}\n\n{summary}\n\nTargets:\n\n" + "\n".join(judged) + "\n"
    return body, judged
