"""The benchmark command: ``python -m benchmarks.run [options]`` from the repository root.

See :mod:`benchmarks` for what is measured. The groups run in stages (:data:`_STAGES`); within
a stage the figures take turns (run 1 of each, then run 2 of each...), so that a drift of the
machine spreads over all of them: our drains and the peers' share a stage, so that their
ratios are taken from interleaved runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sqlalchemy_que.testing import find_postgres_bindir, temporary_postgres

from . import async_drain, ceiling, drain, enqueue, latency, monitoring, peers
from .database import BenchDatabase
from .measure import Figure, Run
from .report import format_machine, format_table, write_chart, write_json

GROUPS = ("enqueue", "drain", "peers", "monitoring", "ceiling", "latency")

#: The stages groups run in, each stage's figures taking turns: the ceilings first, beside
#: nothing else running; our drains and the peers' together.
_STAGES = (("ceiling",), ("enqueue",), ("drain", "peers"), ("monitoring",), ("latency",))

LATENCY_SPACING = 0.02


@dataclasses.dataclass(frozen=True)
class Sizes:
    enqueue: int = 5_000
    bulk: int = 100_000
    drain: int = 20_000
    insert_ceiling: int = 20_000
    latency: int = 500
    #: Jobs per drain of a monitoring pair (batched: about 2 s each on 2 cores).
    monitoring: int = 50_000


QUICK = Sizes(
    enqueue=500, bulk=10_000, drain=2_000, insert_ceiling=2_000, latency=50, monitoring=2_000
)

Measure = Callable[[], Run]
Plan = list[tuple[Figure, Measure]]


@dataclasses.dataclass
class _Suite:
    """What the planners share: the database and sizes, the notes about figures skipped, and
    what to undo at the end (the peers' schemas)."""

    database: BenchDatabase
    sizes: Sizes
    skipped: list[str] = dataclasses.field(default_factory=list)
    cleanups: list[Callable[[], None]] = dataclasses.field(default_factory=list)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _take_turns(plan: Sequence[tuple[Figure, Measure]], runs: int) -> list[Figure]:
    for index in range(runs):
        for figure, measure in plan:
            run = measure()
            figure.runs.append(run)
            _progress(
                f"  {figure.key} run {index + 1}/{runs}: {run.value:,.2f} {figure.unit} "
                f"({run.wall:.1f} s)"
            )
    return [figure for figure, _ in plan]


def _enqueue(suite: _Suite) -> Plan:
    database, sizes = suite.database, suite.sizes
    insert = "ceiling.insert"
    plan: list[tuple[Figure, Measure]] = [
        (
            Figure("enqueue", "enqueue.session", "Session, 1 job/commit", "jobs/s", insert),
            lambda: enqueue.run_session(database, jobs=sizes.enqueue),
        ),
        (
            Figure("enqueue", "enqueue.core", "Core Connection, 1 job/commit", "jobs/s", insert),
            lambda: enqueue.run_core(database, jobs=sizes.enqueue),
        ),
        (
            Figure("enqueue", "enqueue.bulk", f"bulk insert_jobs, {sizes.bulk:,} jobs", "jobs/s"),
            lambda: enqueue.run_bulk(database, jobs=sizes.bulk),
        ),
        (
            Figure(
                "enqueue", "enqueue.bulk_many", f"bulk insert_many, {sizes.bulk:,} jobs", "jobs/s"
            ),
            lambda: enqueue.run_bulk_many(database, jobs=sizes.bulk),
        ),
    ]
    return plan


def _drain(suite: _Suite) -> Plan:
    """:data:`drain.PLAN`, less the entries whose options this WorkerPool does not take."""
    plan: Plan = []
    unsupported: dict[tuple[str, ...], list[str]] = {}
    for entry in drain.PLAN:
        missing = tuple(drain.unsupported_options(entry.options))
        if missing:
            unsupported.setdefault(missing, []).append(entry.key)
            continue
        plan.append(
            (
                Figure("drain", entry.key, entry.label, "jobs/s", entry.ceiling),
                functools.partial(entry.measure, suite.database, suite.sizes.drain),
            )
        )
    for async_entry in async_drain.ASYNC_PLAN:  # beside the sync pool's, in the same stage
        plan.append(
            (
                Figure("drain", async_entry.key, async_entry.label, "jobs/s", async_entry.ceiling),
                functools.partial(async_entry.measure, suite.database, suite.sizes.drain),
            )
        )
    for names, keys in unsupported.items():
        suite.skipped.append(
            f"drain: {', '.join(keys)} skipped: WorkerPool() does not accept {', '.join(names)} yet"
        )
    return plan


def _peers(suite: _Suite) -> Plan:
    """:data:`peers.PLAN`, for the peer libraries installed (their schemas created here and
    dropped at the end)."""
    plan: Plan = []
    keys: set[str] = set()
    available: dict[str, bool] = {}
    for entry in peers.PLAN:
        library = entry.library
        if library not in available:
            reason = peers.missing(library)
            available[library] = reason is None
            if reason is not None:
                suite.skipped.append(f"peers: {reason}")
            else:
                _progress(f"  installing {library} in schema {peers.schema(library)}")
                peers.install(suite.database, library)
                suite.cleanups.append(functools.partial(peers.drop, suite.database, library))
        if not available[library] or entry.key in keys:
            continue
        keys.add(entry.key)
        plan.append(
            (
                Figure("peers", entry.key, entry.label, "jobs/s", library=library),
                functools.partial(entry.measure, suite.database, suite.sizes.drain),
            )
        )
    return plan


def _ceiling(suite: _Suite) -> Plan:
    database, sizes = suite.database, suite.sizes
    plan: Plan = [
        (
            Figure(
                "ceiling",
                f"ceiling.cycle.{clients}",
                f"pgbench job cycle, {clients} client{'s' if clients > 1 else ''}",
                "jobs/s",
            ),
            functools.partial(ceiling.run_cycle, database, clients=clients, jobs=sizes.drain),
        )
        for clients in ceiling.CYCLE_CLIENTS
    ]
    plan.extend(
        (
            Figure(
                "ceiling",
                f"ceiling.batch.{clients}",
                f"pgbench batched cycle ({ceiling.BATCH_SIZE} jobs), "
                f"{clients} client{'s' if clients > 1 else ''}",
                "jobs/s",
            ),
            functools.partial(ceiling.run_batch_cycle, database, clients=clients, jobs=sizes.drain),
        )
        for clients in ceiling.BATCH_CLIENTS
    )
    plan.append(
        (
            Figure("ceiling", "ceiling.insert", "pgbench single-row insert, 1 client", "jobs/s"),
            lambda: ceiling.run_insert(database, transactions=sizes.insert_ceiling),
        )
    )
    plan.append(
        (
            Figure(
                "ceiling",
                "ceiling.insert_tx",
                "pgbench BEGIN; INSERT; COMMIT, 1 client",
                "jobs/s",
            ),
            lambda: ceiling.run_insert(database, transactions=sizes.insert_ceiling, explicit=True),
        )
    )
    return plan


def _latency(suite: _Suite, runs: int) -> list[Figure]:
    database, sizes = suite.database, suite.sizes
    modes = (("listen", True, 5.0), ("poll", False, 0.05))
    figures: dict[tuple[str, str], Figure] = {}
    for mode, listen, wake_interval in modes:
        how = f"{'LISTEN/NOTIFY' if listen else 'polling'}, wake {wake_interval:g} s"
        for point in ("p50", "p90", "p99", "max"):
            figures[mode, point] = Figure(
                "latency", f"latency.{mode}.{point}", f"{how}: {point}", "ms"
            )
    for index in range(runs):
        for mode, listen, wake_interval in modes:
            run = latency.run_latency(
                database,
                listen=listen,
                wake_interval=wake_interval,
                jobs=sizes.latency,
                spacing=LATENCY_SPACING,
            )
            for point in ("p50", "p90", "p99", "max"):
                # The samples are kept once, with the p50 figure.
                figures[mode, point].runs.append(
                    run
                    if point == "p50"
                    else Run(run.detail[point], run.wall, run.cpu_client, run.cpu_server)
                )
            detail = run.detail
            _progress(
                f"  latency.{mode} run {index + 1}/{runs}: p50 {detail['p50']:.2f} ms, "
                f"p99 {detail['p99']:.2f} ms, max {detail['max']:.2f} ms"
            )
    return list(figures.values())


def _monitoring(suite: _Suite, runs: int) -> list[Figure]:
    """:data:`monitoring.PLAN`, the pairs taking turns: for each, the metrics-on drain's jobs/s
    as a percentage of the plain one's, and the client CPU per job that metrics add."""
    figures: list[tuple[monitoring.Pair, Figure, Figure]] = [
        (
            pair,
            Figure("monitoring", pair.key, pair.label, "%"),
            Figure(
                "monitoring",
                f"{pair.key}.cpu",
                f"client CPU added by metrics: {pair.drain.label}",
                "us/job",
            ),
        )
        for pair in monitoring.PLAN
    ]
    for index in range(runs):
        for pair, share, cpu in figures:
            run = pair.measure(suite.database, suite.sizes.monitoring, index=index)
            share.runs.append(run)
            added = run.detail["added_cpu_us_per_job"]
            cpu.runs.append(Run(added, run.wall, run.cpu_client, run.cpu_server))
            _progress(
                f"  {pair.key} run {index + 1}/{runs} ({run.detail['first']} first): "
                f"{run.value:.1f}% of the plain drain's jobs/s "
                f"({run.detail['off']['jobs_per_s']:,.0f} off, "
                f"{run.detail['on']['jobs_per_s']:,.0f} on), {added:+.2f} us/job of client CPU"
            )
    path = Figure(
        "monitoring",
        "monitoring.code_path",
        "metrics' cost on the worker's path around a job, no database",
        "us/job",
    )
    for index in range(runs):
        run = monitoring.code_path_cost()
        path.runs.append(run)
        _progress(
            f"  {path.key} run {index + 1}/{runs}: +{run.value:.2f} us/job "
            f"({run.detail['off_us_per_job']:.2f} off, {run.detail['on_us_per_job']:.2f} on)"
        )
    return [figure for _, share, cpu in figures for figure in (share, cpu)] + [path]


_PLANNERS: dict[str, Callable[[_Suite], Plan]] = {
    "ceiling": _ceiling,
    "enqueue": _enqueue,
    "drain": _drain,
    "peers": _peers,
}


def _run_stage(suite: _Suite, groups: Sequence[str], runs: int) -> list[Figure]:
    """The figures of ``groups`` (those selected), taking turns."""
    if list(groups) == ["latency"]:
        return _latency(suite, runs)
    if list(groups) == ["monitoring"]:
        return _monitoring(suite, runs)
    plan = [step for group in groups for step in _PLANNERS[group](suite)]
    return _take_turns(plan, runs)


def _groups(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown group {', '.join(unknown) or value!r}; choose from {', '.join(GROUPS)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure sqlalchemy-que's throughput and latency against pgbench's ceiling.",
    )
    parser.add_argument(
        "--database-url",
        help="the database to measure (a schema que_bench is created and dropped in it); "
        "default: a throwaway PostgreSQL started for the run",
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per figure (median, min, max); default 3"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 run: a smoke check")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where results.json and drain.png go; default benchmarks/results/",
    )
    parser.add_argument(
        "--only",
        type=_groups,
        default=list(GROUPS),
        metavar="NAME[,NAME]",
        help=f"the groups to run, of {', '.join(GROUPS)}; default all",
    )
    return parser


@contextlib.contextmanager
def _database_url(url: str | None) -> Iterator[tuple[str, Path]]:
    """The database to measure, and the binaries folder pgbench comes from (the throwaway
    server's own, so that client and server are the same PostgreSQL)."""
    bindir = find_postgres_bindir()
    if url:
        yield url, bindir
        return
    _progress(f"starting a throwaway PostgreSQL from {bindir} (durable: fsync on)...")
    # The figures are meant for a server as it runs in production: the test suite's fast,
    # non-durable settings would flatter every commit.
    durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    with temporary_postgres(bindir=bindir, settings=durable) as temporary:
        yield temporary, bindir


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        _parser().error("--runs must be at least 1")
    sizes = QUICK if args.quick else Sizes()
    started_at = datetime.datetime.now(datetime.timezone.utc)
    figures: list[Figure] = []
    with _database_url(args.database_url) as (url, bindir):
        database = BenchDatabase(url, bindir=bindir)
        database.create()
        suite = _Suite(database, sizes)
        try:
            facts = database.machine_facts()
            _progress(format_machine(facts))
            for stage in _STAGES:
                groups = [group for group in stage if group in args.only]
                if groups:
                    _progress(f"{', '.join(groups)}:")
                    figures.extend(_run_stage(suite, groups, runs))
        finally:
            for cleanup in reversed(suite.cleanups):
                cleanup()
            database.drop()
    order = {group: index for index, group in enumerate(GROUPS)}
    figures.sort(key=lambda figure: order[figure.group])
    print()
    print(format_machine(facts))
    print()
    print(format_table(figures))
    if suite.skipped:
        print()
        print("skipped:")
        for note in suite.skipped:
            print(f"  {note}")
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(
        args.output / "results.json",
        figures,
        {
            "command": ["python", "-m", "benchmarks.run", *(argv or sys.argv[1:])],
            "started_at": started_at.isoformat(),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "runs": runs,
            "quick": args.quick,
            "sizes": dataclasses.asdict(sizes),
            "database": "given" if args.database_url else "throwaway",
            "machine": facts,
            "skipped": suite.skipped,
            "pgbench_scripts": {
                "cycle": ceiling.cycle_script(),
                "batch": ceiling.batch_script(),
                "insert": ceiling.insert_script(),
                "insert_tx": ceiling.insert_script(explicit=True),
            },
        },
    )
    charted = write_chart(args.output / "drain.png", figures, facts)
    print()
    print(f"wrote {args.output / 'results.json'}" + (" and drain.png" if charted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
