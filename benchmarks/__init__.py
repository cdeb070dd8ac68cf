"""sqlalchemy-que's benchmark suite: throughput and latency against the machine's own ceiling.

Not part of the test run. From the repository root, with the project's virtualenv::

    .venv/bin/python -m benchmarks.run                 # full run: 10-13 minutes on 2 cores,
                                                       # several more with the peers installed
    .venv/bin/python -m benchmarks.run --quick         # smoke check: under a minute
    .venv/bin/python -m benchmarks.run --only ceiling,drain --runs 5
    .venv/bin/python -m benchmarks.run --database-url postgresql://me@localhost/bench

Without ``--database-url`` a throwaway PostgreSQL is started
(:func:`sqlalchemy_que.testing.temporary_postgres`). With one, everything happens in schemas
of its own (``que_bench``; ``que_bench_pgqueuer`` and ``que_bench_procrastinate`` for the
peers; all dropped afterwards), so an existing ``que_jobs`` is never touched; the database
should be otherwise idle, since job locks are database-wide.

Groups (``--only NAME[,NAME]``):

``enqueue``
    one job per transaction through a Session and through a Core Connection, and the bulk
    ``COPY`` form; jobs/s.
``drain``
    pre-enqueued no-op jobs worked to empty by worker threads (1, 2, 4, 8) and by 2 and 4
    processes of 4 workers; jobs/s. The plan is :data:`benchmarks.drain.PLAN`, one line a
    figure; entries for WorkerPool options it does not take yet are skipped with a message.
``peers``
    the same drain by pgqueuer and procrastinate, each in a schema of its own, through its own
    API (:mod:`benchmarks.peers`); skipped with a message unless installed
    (``pip install -e '.[bench-peers]'``). Runs in turns with ``drain``.
``monitoring``
    the cost of Prometheus metrics: pairs of drains of the same jobs, one with metrics on and
    one without, back to back in alternating order (:mod:`benchmarks.monitoring`); the
    metrics-on drain's jobs/s as a percentage of the plain one's, and the client CPU per job
    that metrics add; and the CPU per job metrics add to the worker's code path around a job,
    timed without a database.
``ceiling``
    the same per-job SQL cycle (1, 2, 4, 8 clients), a batched cycle (100 jobs locked in one
    statement, deleted in one, unlocked in one; 1 and 4 clients) and the same single-row
    insert run by ``pgbench``, the limits of this design on this machine; every figure above
    is also given as a ratio to one of them, and each drain of ours as a ratio to each
    peer's best.
``latency``
    commit of an enqueue to the start of its handler, with LISTEN/NOTIFY and with polling.

Each figure is the median of ``--runs`` runs (default 3) with min and max, with the CPU
seconds of the client (this process, or the worker processes) and of PostgreSQL. The table
is printed; ``results.json`` (every raw run) and ``drain.png`` go to ``--output``
(default ``benchmarks/results/``, ignored by git). The chart needs matplotlib
(``pip install -e '.[bench]'``).
"""
