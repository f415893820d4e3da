"""PNG charts of the comparison and of the open-loop run, for a person to look at.

matplotlib comes with `pip install 'runnerd[bench]'` (and the test extra); only `--png` needs it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.compare import SystemRuns
    from bench.loops import Distributed
    from bench.openloop import Level


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install 'runnerd[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _subtitle(info: dict[str, str]) -> str:
    return (
        f"{info['date']}, {info['cores']} cores, {info['memory']}, {info['python']}, "
        f"load {info['load average 1/5/15 min'].split()[0]}"
    )


def compare(path: str, all_runs: Sequence[SystemRuns], info: dict[str, str]) -> None:
    """Left: executions/s per system (median, bar; range, whisker). Right: 6-step chain p50
    and p99 per system, on a log scale (arq as shipped and Celery with a fresh process per
    task are seconds where runnerd is milliseconds)."""
    plt = _pyplot()
    names = [runs.name for runs in all_runs]
    # Which systems give every task a fresh process, as runnerd does: the fair comparison.
    labels = [f"{r.name}\n(fresh process)" if r.fresh_process else r.name for r in all_runs]
    colours = ["#d62728" if name == "runnerd" else "#7f7f7f" for name in names]
    rates = [[m.per_s for m in runs.repetitions] for runs in all_runs]
    medians = [statistics.median(r) for r in rates]
    whiskers = [
        [m - min(r) for m, r in zip(medians, rates, strict=True)],
        [max(r) - m for m, r in zip(medians, rates, strict=True)],
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    left.bar(labels, medians, yerr=whiskers, color=colours, capsize=4)
    for x, value in enumerate(medians):
        left.annotate(
            f"{value:.0f}",
            (x, value),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    left.set_title("trivial executions/s (closed loop)")
    left.set_ylabel("executions/s, median over repetitions")
    left.tick_params(axis="x", labelrotation=30)

    p50 = [statistics.median(m.chain.p50 for m in runs.repetitions) for runs in all_runs]
    p99 = [statistics.median(m.chain.p99 for m in runs.repetitions) for runs in all_runs]
    positions = range(len(names))
    right.bar([x - 0.2 for x in positions], p50, width=0.4, label="p50", color=colours)
    right.bar([x + 0.2 for x in positions], p99, width=0.4, label="p99", color=colours, alpha=0.45)
    right.set_yscale("log")
    right.set_xticks(list(positions), labels, rotation=30)
    right.set_title("6-step chain, end to end (solid p50, light p99)")
    right.set_ylabel("ms, log scale")
    figure.suptitle(f"runnerd vs RQ, arq, Celery, one Redis, one run: {_subtitle(info)}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def open_loop(path: str, levels: Sequence[Level], info: dict[str, str]) -> None:
    """Latency percentiles (from the intended send time) against the offered rate."""
    plt = _pyplot()
    rates = [level.rate_per_s for level in levels]
    figure, axes = plt.subplots(figsize=(8, 5))
    for name in ("p50", "p90", "p99", "max"):
        axes.plot(rates, [getattr(level.latency, name) for level in levels], marker="o", label=name)
    for level in levels:
        if level.saturated:
            axes.axvline(level.rate_per_s, color="#d62728", linestyle=":", label="saturated")
    axes.set_yscale("log")
    axes.set_xlabel("offered executions/s")
    axes.set_ylabel("latency ms, log scale (median over repetitions)")
    axes.set_title(f"runnerd open loop, 1 worker: {_subtitle(info)}", fontsize=9)
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def loop_items(
    path: str, rates: Sequence[tuple[float, float]], distributed: Distributed, info: dict[str, str]
) -> None:
    """A distributed loop's items/s over time (between count samples), and items done."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.plot([t for t, _ in rates], [r for _, r in rates], marker=".", label="items/s")
    axes.set_xlabel("seconds since submit")
    axes.set_ylabel("items/s (between samples)")
    done = axes.twinx()
    done.plot(
        [s.at_s for s in distributed.samples],
        [s.done for s in distributed.samples],
        color="#7f7f7f",
        linestyle="--",
        label="items done",
    )
    done.set_ylabel("items done")
    axes.set_title(
        f"runnerd distributed for_each, {distributed.items:,} items over 2 workers, "
        f"{distributed.took_s:.0f} s\n{_subtitle(info)}",
        fontsize=9,
    )
    axes.set_ylim(bottom=0)
    done.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
