"""The benchmark suite's own machinery: its plans, its report, the batched pgbench ceiling and
the peer drains (when the peers are installed). The figures themselves are not tested."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from benchmarks import async_drain, ceiling, drain, monitoring, peers
from benchmarks.database import BenchDatabase
from benchmarks.measure import Figure, Run
from benchmarks.report import best_peers, format_table, peer_ratios
from sqlalchemy_que import _hooks
from sqlalchemy_que.testing import find_postgres_bindir


@pytest.fixture
def bench(empty_database_url: str) -> Iterator[BenchDatabase]:
    database = BenchDatabase(empty_database_url, bindir=find_postgres_bindir())
    database.create()
    yield database
    database.drop()


def _advisory_locks(database: BenchDatabase) -> int:
    with database.admin.connect() as connection:
        count: int = connection.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        ).scalar_one()
        return count


def test_drain_plan_keeps_todays_keys_and_compares_with_measured_ceilings() -> None:
    keys = [entry.key for entry in drain.PLAN]
    assert len(keys) == len(set(keys))
    assert {
        "drain.threads.1",
        "drain.threads.2",
        "drain.threads.4",
        "drain.threads.8",
        "drain.processes.2x4",
        "drain.processes.4x4",
    } <= set(keys)
    measured = {f"ceiling.cycle.{clients}" for clients in ceiling.CYCLE_CLIENTS} | {
        f"ceiling.batch.{clients}" for clients in ceiling.BATCH_CLIENTS
    }
    for entry in drain.PLAN:
        assert entry.ceiling in measured, entry
    assert drain.Drain(workers=8, completion="batch").ceiling == "ceiling.batch.4"
    assert drain.Drain(workers=4, processes=4).ceiling == "ceiling.cycle.8"
    assert drain.Drain(workers=4, completion="batch", batch_size=50).key == (
        "drain.batch.k50.threads.4"
    )


def test_a_monitoring_pair_drains_with_metrics_off_and_on_in_turns(bench: BenchDatabase) -> None:
    keys = [pair.key for pair in monitoring.PLAN]
    assert len(keys) == len(set(keys))
    assert "monitoring.batch.threads.4" in keys
    with pytest.raises(ValueError, match="metrics off"):
        monitoring.Pair(drain.Drain(workers=1, metrics=True))
    pair = monitoring.Pair(drain.Drain(workers=2, completion="batch"), scale=0.5)
    first, second = (pair.measure(bench, 600, index=index) for index in (0, 1))
    assert (first.detail["first"], second.detail["first"]) == ("off", "on")
    for run in (first, second):
        off, on = run.detail["off"], run.detail["on"]
        assert run.detail["jobs"] == 300
        assert off["left_behind"] == on["left_behind"] == 0
        assert run.value == pytest.approx(100 * on["jobs_per_s"] / off["jobs_per_s"])
        assert off["client_cpu_us_per_job"] > 0 and on["client_cpu_us_per_job"] > 0
    assert _hooks.active == ()  # the metrics were removed after their drain
    assert bench.count() == 0


def test_the_code_path_cost_times_the_hook_path_with_and_without_metrics() -> None:
    run = monitoring.code_path_cost(batches=5, repeats=2)
    assert run.detail["jobs"] == 500
    assert run.value == pytest.approx(run.detail["on_us_per_job"] - run.detail["off_us_per_job"])
    assert run.detail["on_us_per_job"] > 0
    assert _hooks.active == ()


def test_unsupported_options_names_what_the_pool_does_not_take() -> None:
    assert drain.unsupported_options({"wake_interval": 1.0}) == []
    assert drain.unsupported_options({"wake_interval": 1.0, "no_such_option": 1}) == [
        "no_such_option"
    ]


def test_a_peer_not_installed_is_skipped_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(peers.LIBRARIES, "pgqueuer", ("pgqueuer", "no_such_module_for_que"))
    message = peers.missing("pgqueuer")
    assert message is not None
    assert "no_such_module_for_que not installed" in message
    assert "bench-peers" in message


def _figure(group: str, key: str, value: float, library: str | None = None) -> Figure:
    figure = Figure(group, key, key, "jobs/s", library=library)
    figure.runs.append(Run(value, 1.0, 1.0, None))
    return figure


def test_report_gives_our_drains_as_ratios_to_each_peers_best() -> None:
    ours = _figure("drain", "drain.threads.4", 3000)
    figures = [
        ours,
        _figure("peers", "peers.pgqueuer.a", 2000, "pgqueuer"),
        _figure("peers", "peers.pgqueuer.b", 6000, "pgqueuer"),
        _figure("peers", "peers.procrastinate.a", 500, "procrastinate"),
        _figure("ceiling", "ceiling.cycle.4", 4000),
    ]
    best = best_peers(figures)
    assert {library: figure.key for library, figure in best.items()} == {
        "pgqueuer": "peers.pgqueuer.b",
        "procrastinate": "peers.procrastinate.a",
    }
    assert peer_ratios(ours, best) == {"pgqueuer": 0.5, "procrastinate": 6.0}
    assert peer_ratios(figures[4], best) == {}
    table = format_table(figures)
    assert "vs pgqueuer" in table
    assert "vs procrastinate" in table
    assert "peers.pgqueuer.b (best)" in table
    row = next(line for line in table.splitlines() if line.startswith("drain"))
    assert "50%" in row
    assert "600%" in row


def test_the_batched_lock_statement_locks_exactly_what_it_returns(bench: BenchDatabase) -> None:
    bench.refill(3 * ceiling.BATCH_SIZE)
    check = ceiling.check_batch_lock(bench)
    assert check["returned"] == ceiling.BATCH_SIZE
    assert check["advisory_locks_held"] == ceiling.BATCH_SIZE
    assert _advisory_locks(bench) == 0
    assert bench.count() == 3 * ceiling.BATCH_SIZE


def test_the_lock_check_rejects_a_statement_that_locks_more_than_it_returns(
    bench: BenchDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sorting after the lock call makes PostgreSQL lock every row before the LIMIT applies.
    greedy = (
        "SELECT count(*), array_agg(priority), array_agg(run_at), array_agg(job_id) FROM ("
        "SELECT priority, run_at, job_id FROM que_jobs WHERE pg_try_advisory_lock(job_id) "
        f"ORDER BY job_id LIMIT {ceiling.BATCH_SIZE}) AS taken"
    )
    monkeypatch.setattr(ceiling, "BATCH_LOCK_SQL", greedy)
    bench.refill(3 * ceiling.BATCH_SIZE)
    with pytest.raises(RuntimeError, match=r"held 299 advisory locks for 100 jobs returned"):
        ceiling.check_batch_lock(bench)
    assert _advisory_locks(bench) == 0


@pytest.mark.slow
def test_the_batched_pgbench_cycle_deletes_whole_batches(bench: BenchDatabase) -> None:
    jobs = 10 * ceiling.BATCH_SIZE
    run = ceiling.run_batch_cycle(bench, clients=1, jobs=jobs)
    transactions = int(jobs * 0.9) // ceiling.BATCH_SIZE
    assert run.detail["transactions"] == transactions
    assert run.detail["jobs_deleted"] == transactions * ceiling.BATCH_SIZE
    assert bench.count() == jobs - transactions * ceiling.BATCH_SIZE
    assert run.value > 0
    assert _advisory_locks(bench) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "peer",
    [
        peers.Peer("pgqueuer", processes=2, batch_size=10),
        peers.Peer("procrastinate", processes=1, concurrency=2),
    ],
    ids=lambda peer: peer.library,
)
def test_a_peer_drains_every_job_through_its_own_api(
    bench: BenchDatabase, peer: peers.Peer
) -> None:
    for module in peers.LIBRARIES[peer.library]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (extra bench-peers)")
    peers.install(bench, peer.library)
    try:
        run = peer.measure(bench, 200)
    finally:
        peers.drop(bench, peer.library)
    assert run.detail["left_behind"] == 0
    assert run.detail["succeeded"] == 200
    assert len(run.detail["process_reports"]) == peer.processes
    assert run.value > 0


@pytest.mark.parametrize(
    "entry",
    [
        async_drain.AsyncDrain(workers=2),
        async_drain.AsyncDrain(workers=2, write=True),
        async_drain.AsyncDrain(workers=2, kind="sync", write=True),
    ],
    ids=lambda entry: entry.key,
)
def test_the_async_pools_drains_and_their_sync_baseline_work_every_job(
    bench: BenchDatabase, entry: async_drain.AsyncDrain
) -> None:
    run = entry.measure(bench, 200)
    assert run.detail["left_behind"] == 0
    assert run.detail["written"] == (200 if entry.write else 0)
    assert run.value > 0
    assert _advisory_locks(bench) == 0


def test_the_async_drain_keys_sit_beside_the_sync_ones() -> None:
    keys = [entry.key for entry in async_drain.ASYNC_PLAN]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {entry.key for entry in drain.PLAN}
    assert "drain.async.tasks.4" in keys and "drain.write.threads.4" in keys
