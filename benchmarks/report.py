"""Presenting the figures: the printed table, ``results.json`` and the ``drain.png`` chart."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .measure import Figure

__all__ = ["format_machine", "format_table", "ratio", "write_chart", "write_json"]


def ratio(figure: Figure, figures: Mapping[str, Figure]) -> float | None:
    """The figure's median over its ceiling's median, when both were measured."""
    if figure.ceiling is None or figure.ceiling not in figures:
        return None
    ceiling = figures[figure.ceiling]
    if not ceiling.runs or not figure.runs:
        return None
    return figure.median / ceiling.median


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "ms" or abs(value) < 100:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def format_table(figures: Sequence[Figure]) -> str:
    """One row per figure: median, min, max, ratio to the ceiling, wall and CPU seconds."""
    by_key = {figure.key: figure for figure in figures}
    header = (
        "group",
        "figure",
        "median",
        "min",
        "max",
        "unit",
        "vs ceiling",
        "wall s",
        "client CPU s",
        "PG CPU s",
    )
    rows: list[tuple[str, ...]] = []
    for figure in figures:
        if not figure.runs:
            continue
        share = ratio(figure, by_key)
        rows.append(
            (
                figure.group,
                figure.label,
                _number(figure.median, figure.unit),
                _number(figure.low, figure.unit),
                _number(figure.high, figure.unit),
                figure.unit,
                f"{share:.0%}" if share is not None else "n/a" if figure.ceiling else "",
                _number(figure.median_of("wall")),
                _number(figure.median_of("cpu_client")),
                _number(figure.median_of("cpu_server")),
            )
        )
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


def _summary(figure: Figure, figures: Mapping[str, Figure]) -> dict[str, Any]:
    return {
        "group": figure.group,
        "key": figure.key,
        "label": figure.label,
        "unit": figure.unit,
        "median": figure.median,
        "min": figure.low,
        "max": figure.high,
        "ceiling": figure.ceiling,
        "ratio_to_ceiling": ratio(figure, figures),
        "median_wall_seconds": figure.median_of("wall"),
        "median_client_cpu_seconds": figure.median_of("cpu_client"),
        "median_server_cpu_seconds": figure.median_of("cpu_server"),
        "runs": [dataclasses.asdict(run) for run in figure.runs],
    }


def write_json(path: Path, figures: Sequence[Figure], header: Mapping[str, Any]) -> None:
    """Every figure with its summary and every raw run, after ``header`` (machine, settings)."""
    by_key = {figure.key: figure for figure in figures}
    document = {
        **header,
        "figures": [_summary(figure, by_key) for figure in figures if figure.runs],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(path: Path, figures: Sequence[Figure], facts: Mapping[str, Any]) -> bool:
    """Drain jobs/s against worker threads (median, min..max bars), the pgbench ceiling at
    the same client counts, and the multi-process runs at their total worker count.

    :returns: False when no drain figure was measured (nothing is written).
    """
    by_key = {figure.key: figure for figure in figures if figure.runs}
    threads = sorted(
        (int(key.rsplit(".", 1)[1]), figure)
        for key, figure in by_key.items()
        if key.startswith("drain.threads.")
    )
    if not threads:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_, axes = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    xs = [count for count, _ in threads]
    medians = [figure.median for _, figure in threads]
    axes.errorbar(
        xs,
        medians,
        yerr=[
            [figure.median - figure.low for _, figure in threads],
            [figure.high - figure.median for _, figure in threads],
        ],
        marker="o",
        capsize=4,
        label="sqlalchemy-que WorkerPool (threads, one process)",
    )
    ceiling = [
        by_key[f"ceiling.cycle.{count}"] for count in xs if f"ceiling.cycle.{count}" in by_key
    ]
    if ceiling:
        axes.errorbar(
            [count for count in xs if f"ceiling.cycle.{count}" in by_key],
            [figure.median for figure in ceiling],
            yerr=[
                [figure.median - figure.low for figure in ceiling],
                [figure.high - figure.median for figure in ceiling],
            ],
            linestyle="--",
            marker="s",
            capsize=4,
            color="black",
            label="ceiling: pgbench, same SQL cycle, same client count",
        )
    processes = sorted(
        (figure.runs[0].detail["processes"] * figure.runs[0].detail["workers_per_process"], figure)
        for key, figure in by_key.items()
        if key.startswith("drain.processes.")
    )
    if processes:
        axes.plot(
            [count for count, _ in processes],
            [figure.median for _, figure in processes],
            linestyle="none",
            marker="^",
            markersize=8,
            label="processes of 4 threads (at their total workers)",
        )
    axes.set_xscale("log", base=2)
    ticks = sorted({*xs, *(count for count, _ in processes)})
    axes.set_xticks(ticks, [str(tick) for tick in ticks])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("workers")
    axes.set_ylabel("jobs/s (no-op jobs)")
    axes.set_title(
        f"Drain throughput: {facts['cores']} cores, PostgreSQL "
        f"{str(facts['postgresql']).split()[0]}, Python {facts['python']}",
        fontsize=10,
    )
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure_.tight_layout()
    figure_.savefig(path)
    plt.close(figure_)
    return True
