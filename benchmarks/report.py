"""Presenting the figures: the printed table, ``results.json`` and the ``drain.png`` chart.

Each of our drain figures is given as a ratio to its pgbench ceiling and to the best figure
of each peer library measured in the same run (``vs pgqueuer``...).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .measure import Figure

__all__ = [
    "best_peers",
    "format_machine",
    "format_table",
    "peer_ratios",
    "ratio",
    "write_chart",
    "write_json",
]


def ratio(figure: Figure, figures: Mapping[str, Figure]) -> float | None:
    """The figure's median over its ceiling's median, when both were measured."""
    if figure.ceiling is None or figure.ceiling not in figures:
        return None
    ceiling = figures[figure.ceiling]
    if not ceiling.runs or not figure.runs:
        return None
    return figure.median / ceiling.median


def best_peers(figures: Sequence[Figure]) -> dict[str, Figure]:
    """Each peer library's figure with the highest median, by library, in the order met."""
    best: dict[str, Figure] = {}
    for figure in figures:
        if figure.library is None or not figure.runs:
            continue
        if figure.library not in best or figure.median > best[figure.library].median:
            best[figure.library] = figure
    return best


def peer_ratios(figure: Figure, best: Mapping[str, Figure]) -> dict[str, float]:
    """One of our drain figures over each peer library's best (nothing for other figures)."""
    if figure.group != "drain" or not figure.runs:
        return {}
    return {library: figure.median / peer.median for library, peer in best.items()}


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit in ("ms", "%") or abs(value) < 100:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def format_table(figures: Sequence[Figure]) -> str:
    """One row per figure: median, min, max, ratio to the ceiling and to each peer's best,
    wall and CPU seconds."""
    by_key = {figure.key: figure for figure in figures}
    best = best_peers(figures)
    header = (
        "group",
        "figure",
        "median",
        "min",
        "max",
        "unit",
        "vs ceiling",
        *(f"vs {library}" for library in best),
        "wall s",
        "client CPU s",
        "PG CPU s",
    )
    rows: list[tuple[str, ...]] = []
    for figure in figures:
        if not figure.runs:
            continue
        share = ratio(figure, by_key)
        versus = peer_ratios(figure, best)
        rows.append(
            (
                figure.group,
                figure.label + (" (best)" if best.get(figure.library or "") is figure else ""),
                _number(figure.median, figure.unit),
                _number(figure.low, figure.unit),
                _number(figure.high, figure.unit),
                figure.unit,
                f"{share:.0%}" if share is not None else "n/a" if figure.ceiling else "",
                *(f"{versus[library]:.0%}" if library in versus else "" for library in best),
                _number(figure.median_of("wall")),
                _number(figure.median_of("cpu_client")),
                _number(figure.median_of("cpu_server")),
            )
        )
    if not rows:
        return "(no figure was measured)"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {0, 1, 5}

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.ljust(width) if index in left else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def format_machine(facts: Mapping[str, Any]) -> str:
    settings = facts.get("postgresql_settings", {})
    return "\n".join(
        [
            f"cores: {facts['cores']} ({facts.get('cpu_model') or 'unknown CPU'}), "
            f"{facts['platform']}",
            f"PostgreSQL {facts['postgresql']}, "
            + ", ".join(f"{name}={value}" for name, value in settings.items())
            + ("" if facts["server_cpu_measured"] else " (server CPU: n/a, not local)"),
            f"{facts['pgbench']}",
            f"Python {facts['python']}, SQLAlchemy {facts['sqlalchemy']}, psycopg "
            f"{facts['psycopg']} ({facts['psycopg_impl']}), sqlalchemy-que "
            f"{facts['sqlalchemy_que']}",
        ]
    )


def _summary(
    figure: Figure, figures: Mapping[str, Figure], best: Mapping[str, Figure]
) -> dict[str, Any]:
    return {
        "group": figure.group,
        "key": figure.key,
        "label": figure.label,
        "unit": figure.unit,
        "library": figure.library,
        "median": figure.median,
        "min": figure.low,
        "max": figure.high,
        "ceiling": figure.ceiling,
        "ratio_to_ceiling": ratio(figure, figures),
        "ratio_to_peers": {
            library: {"peer": best[library].key, "ratio": value}
            for library, value in peer_ratios(figure, best).items()
        },
        "median_wall_seconds": figure.median_of("wall"),
        "median_client_cpu_seconds": figure.median_of("cpu_client"),
        "median_server_cpu_seconds": figure.median_of("cpu_server"),
        "runs": [dataclasses.asdict(run) for run in figure.runs],
    }


def write_json(path: Path, figures: Sequence[Figure], header: Mapping[str, Any]) -> None:
    """Every figure with its summary and every raw run, after ``header`` (machine, settings);
    ``best_peers`` names each peer library's best figure, which ``ratio_to_peers`` uses."""
    by_key = {figure.key: figure for figure in figures}
    best = best_peers(figures)
    document = {
        **header,
        "best_peers": {library: figure.key for library, figure in best.items()},
        "figures": [_summary(figure, by_key, best) for figure in figures if figure.runs],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def _mode(figure: Figure) -> str:
    """What distinguishes one series of our drains: the key between ``drain`` and
    ``.threads.``/``.processes.`` (empty for the pool's defaults)."""
    for part in (".threads.", ".processes."):
        if part in figure.key:
            return figure.key[len("drain") : figure.key.index(part)]
    return figure.key


def write_chart(path: Path, figures: Sequence[Figure], facts: Mapping[str, Any]) -> bool:
    """Drain jobs/s against workers: our thread drains (median, min..max bars) per mode, the
    multi-process runs at their total worker count, the pgbench ceilings at their client
    counts, and each peer library's best drain as a horizontal line.

    :returns: False when no drain figure, ours or a peer's, was measured (nothing is written).
    """
    measured = [figure for figure in figures if figure.runs]
    ours = [figure for figure in measured if figure.group == "drain"]
    best = best_peers(measured)
    if not ours and not best:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_, axes = plt.subplots(figsize=(8.5, 5.4), dpi=120)
    ticks: set[int] = set()

    def series(
        points: list[tuple[int, Figure]], label: str, **style: Any
    ) -> None:  # one line with min..max bars
        points.sort(key=lambda point: point[0])
        ticks.update(count for count, _ in points)
        axes.errorbar(
            [count for count, _ in points],
            [figure.median for _, figure in points],
            yerr=[
                [figure.median - figure.low for _, figure in points],
                [figure.high - figure.median for _, figure in points],
            ],
            capsize=4,
            label=label,
            **style,
        )

    modes: dict[str, list[Figure]] = {}
    for figure in ours:
        modes.setdefault(_mode(figure), []).append(figure)
    for mode, members in modes.items():
        options = mode.strip(".").replace(".", ", ") or "defaults"
        threads = [
            (int(figure.runs[0].detail["workers"]), figure)
            for figure in members
            if "processes" not in figure.runs[0].detail
        ]
        if threads:
            series(threads, f"sqlalchemy-que, threads in 1 process ({options})", marker="o")
        processes = [
            (
                int(figure.runs[0].detail["processes"])
                * int(figure.runs[0].detail["workers_per_process"]),
                figure,
            )
            for figure in members
            if "processes" in figure.runs[0].detail
        ]
        if processes:
            series(
                processes,
                f"sqlalchemy-que, processes (at their total workers; {options})",
                marker="^",
                markersize=8,
                linestyle="none",
            )
    for prefix, label, marker in (
        ("ceiling.cycle.", "ceiling: pgbench per-job cycle, same client count", "s"),
        ("ceiling.batch.", "ceiling: pgbench batched cycle, same client count", "D"),
    ):
        ceilings = [
            (int(figure.key.rsplit(".", 1)[1]), figure)
            for figure in measured
            if figure.key.startswith(prefix)
        ]
        if ceilings and ours:
            series(ceilings, label, linestyle="--", marker=marker, color="black")
    for library, peer in best.items():
        axes.axhline(
            peer.median,
            linestyle=":",
            color="tab:red" if library == "pgqueuer" else "tab:purple",
            label=f"best {peer.label}",
        )
    axes.set_xscale("log", base=2)
    if ticks:
        axes.set_xticks(sorted(ticks), [str(tick) for tick in sorted(ticks)])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("workers (threads, processes x threads, pgbench clients)")
    axes.set_ylabel("jobs/s (no-op jobs)")
    axes.set_title(
        f"Drain throughput: {facts['cores']} cores, PostgreSQL "
        f"{str(facts['postgresql']).split()[0]}, Python {facts['python']}",
        fontsize=10,
    )
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure_.tight_layout()
    figure_.savefig(path)
    plt.close(figure_)
    return True
