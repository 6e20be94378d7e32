"""The benchmark's own machinery, without starting it: its options, its JSON last line, the CPU
accounting from /proc and the pre-fill of finished sagas (`loadtest/`)."""

from __future__ import annotations

import io
import itertools
import json
import os
import statistics
import time
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from loadtest import autovacuum, bench
from loadtest import cpu_totals as cpu
from loadtest import prefill as history
from loadtest.management.commands.bench import Command, bench_options

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def options(*args: str) -> dict:
    parser = Command().create_parser("manage.py", "bench")
    return bench_options(vars(parser.parse_args(list(args))))


def test_options_turn_into_the_benchmark_arguments():
    defaults = options()
    assert defaults["styles"] == ["orchestrated"]
    assert (defaults["n"], defaults["workers"], defaults["worker_concurrency"]) == (500, 1, 4)
    assert (defaults["rules"], defaults["prefill"], defaults["compare_prefill"], defaults["chain"]) == ([], 0, 0, True)
    assert defaults["rounds"] == 1
    assert options("--rounds", "3")["rounds"] == 3
    assert defaults["autovacuum"] is True
    assert options("--no-autovacuum")["autovacuum"] is False

    given = options(
        "--style", "tcc,parallel", "--style", "tcc", "--workers", "2", "--worker-concurrency", "3",
        "--failure-rate", "payments.charge=0.2,shipping=0.05", "--latency-ms", "10",
        "--faults", "inventory.reserve:fail_first=1", "--compare-prefill", "100000", "--no-chain",
    )  # fmt: skip
    assert given["styles"] == ["tcc", "parallel"]
    assert (given["workers"], given["worker_concurrency"], given["compare_prefill"]) == (2, 3, 100000)
    assert given["chain"] is False
    rules = {(r.service, r.operation): r for r in given["rules"]}
    # 10 ms on every operation of every service, a failure rate on two targets, and the raw rule.
    assert {(s, "*") for s in settings.SERVICE_ALIASES} <= set(rules)
    assert all(rules[(s, "*")].latency_ms == 10 for s in settings.SERVICE_ALIASES)
    assert rules[("payments", "charge")].failure_rate == 0.2
    assert rules[("shipping", "*")].failure_rate == 0.05
    assert rules[("inventory", "reserve")].fail_first == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--style", "saga"],
        ["--style", ""],
        ["--failure-rate", "1.5"],
        ["--failure-rate", "payments.charge=often"],
        ["--latency-ms", "billing=10"],
        ["--faults", "billing.pay:failure_rate=0.1"],
        ["--faults", "payments.charge:colour=red"],
        ["--workers", "0"],
        ["--prefill", "-1"],
        ["--prefill", "10", "--compare-prefill", "10"],
        ["--rounds", "0"],
    ],
)
def test_bad_options_are_refused_before_anything_runs(args, monkeypatch):
    monkeypatch.setattr(bench, "run_benchmark", lambda **kw: pytest.fail("must not run"))
    with pytest.raises(ValueError, match=r"."):
        options(*args)
    with pytest.raises(CommandError):
        call_command("bench", *args)


class FakeWorker:
    pid = os.getpid()

    def check_alive(self) -> None:
        pass

    def stop(self, timeout: float) -> None:
        self.stopped = True


def fake_figures(throughput: float, cpu_ms: float) -> dict:
    return {
        "orders": 5,
        "throughput_per_s": throughput,
        "p50_ms": 100.0 / throughput,
        "p95_ms": 200.0 / throughput,
        "p99_ms": 300.0 / throughput,
        "mean_ms": 120.0 / throughput,
        "new_pg_sessions": 0,
        "cpu_ms_per_order": cpu_ms,
        "cpu_ms_per_order_own": cpu_ms / 2,
        "cpu_ms_per_order_by_component": {},
        "pg_per_order": {"blocks": 900.0, "seq_rows_read": 300.0, "commits": 20.0},
    }


@pytest.fixture
def no_processes(monkeypatch, settings):
    """The benchmark's flow with its worker processes and measured runs stubbed out."""
    settings.EMBEDDED_DATABASES = settings.EMBEDDED_BROKER = False
    workers: list[FakeWorker] = []

    def start_worker(concurrency, log_path, extra_env=None, *, name="bench", beat=False):
        workers.append(FakeWorker())
        workers[-1].beat = beat
        return workers[-1]

    def measure(name, **kwargs):
        return fake_figures(40.0, 40.0) if "chain" in name else fake_figures(20.0, 100.0)

    monkeypatch.setattr(bench, "start_worker", start_worker)
    monkeypatch.setattr(bench, "measure", measure)
    return workers


def test_the_last_line_is_a_json_object_with_every_figure(no_processes):
    out = io.StringIO()
    bench.run_benchmark(
        n=5, concurrency=2, worker_concurrency=1, warmup=0, out=out, styles=["orchestrated", "tcc"], workers=2
    )
    lines = out.getvalue().splitlines()
    summary = json.loads(lines[-1])
    assert len(no_processes) == 2
    assert [w.beat for w in no_processes] == [True, False]  # the relay and sweeps run, once, as in production
    assert all(w.stopped for w in no_processes)
    assert summary["styles"] == ["orchestrated", "tcc"]
    assert summary["workers"] == 2
    for style in ("orchestrated", "tcc"):
        figures = summary["run"][style]
        assert figures["throughput_ratio"] == 0.5
        assert figures["cpu_ratio"] == 2.5
        assert figures["cpu_ms_per_order"] == 100.0
    assert summary["run"]["chain"]["cpu_ms_per_order"] == 40.0
    # The flat keys scripts read before (the first style against the chain).
    assert summary["throughput_ratio"] == 0.5
    assert summary["saga"]["throughput_per_s"] == 20.0
    assert any("CPU per order saga/chain 2.5" in line for line in lines)


def test_rounds_alternate_the_order_and_report_the_mean_of_each_rounds_own_ratio(no_processes, monkeypatch):
    """The host slows down over the run: each measured run is 10 % slower than the one before,
    the saga's true ratio being 0.5. Each round's own ratio leans to whichever side ran first;
    with the order reversed every other round, their geometric mean over an even number of
    rounds is the true ratio."""
    calls: list[str] = []

    def measure(name, **kwargs):
        calls.append(name)
        slower = 1 + 0.1 * (len(calls) - 1)
        if "chain" in name:
            return fake_figures(40.0 / slower, 40.0 * slower)
        return {**fake_figures(20.0 / slower, 100.0 * slower), "warmup": kwargs["warmup"]}

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "_outcomes", lambda ids: {"completed": 5})
    out = io.StringIO()
    bench.run_benchmark(n=5, concurrency=2, worker_concurrency=1, warmup=3, out=out, rounds=4)
    summary = json.loads(out.getvalue().splitlines()[-1])

    assert calls == [
        "round 1 saga orchestrated", "round 1 chain",
        "round 2 chain", "round 2 saga orchestrated",
        "round 3 saga orchestrated", "round 3 chain",
        "round 4 chain", "round 4 saga orchestrated",
    ]  # fmt: skip
    rounds = summary["run"]["rounds"]
    assert [r["orchestrated"]["warmup"] for r in rounds] == [3, 0, 0, 0]  # warmed up once
    own = [r["throughput_ratio"] for r in summary["run"]["orchestrated"]["round_ratios"]]
    assert own == [0.55, 0.46, 0.54, 0.47]
    assert summary["throughput_ratio"] == 0.5  # without the reversal: 0.55, 0.54, 0.53, 0.53
    # Each side's figures are the median of its rounds; the outcomes are added up.
    assert summary["saga"]["throughput_per_s"] == round(statistics.median([20.0, 20 / 1.3, 20 / 1.4, 20 / 1.7]), 2)
    assert summary["saga"]["outcomes"] == {"completed": 20}
    text = out.getvalue()
    assert "round 2 ratio orchestrated" in text
    assert "4 rounds" in text


@pytest.mark.parametrize(
    ("server", "enabled", "expected"), [(True, True, "server"), (False, True, "emulated"), (False, False, "off")]
)
def test_the_summary_says_who_did_autovacuums_work(no_processes, monkeypatch, server, enabled, expected):
    monkeypatch.setattr(autovacuum, "postgres_aliases", lambda: ["default"])
    monkeypatch.setattr(autovacuum, "server_runs_it", lambda alias: server)
    monkeypatch.setattr(autovacuum, "run_once", lambda aliases: ["default: ANALYZE public.t"])
    out = io.StringIO()
    bench.run_benchmark(n=5, concurrency=2, worker_concurrency=1, warmup=0, out=out, autovacuum=enabled)
    summary = json.loads(out.getvalue().splitlines()[-1])
    assert summary["autovacuum"] == expected
    assert f"autovacuum {expected}" in out.getvalue().splitlines()[0]
    # Only an emulation counts what it ran (here: however many passes the stubbed run lasted).
    assert (summary["run"]["autovacuum_emulated"] is None) == (expected != "emulated")


def _flush_stats(alias: str) -> None:
    """Make this session's table counters visible now (PostgreSQL publishes them at most once a
    second otherwise)."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")


@pytest.mark.postgres
def test_autovacuums_work_is_found_by_the_servers_thresholds_and_done():
    from inventory.models import StockItem

    alias, table = "inventory", "public.inventory_stockitem"
    with connections[alias].cursor() as cursor:
        cursor.execute(f"VACUUM (ANALYZE) {table}")  # whatever the tests before left: nothing due
    StockItem.objects.using(alias).bulk_create([StockItem(sku=f"AV-{i}", on_hand=i) for i in range(20)])
    _flush_stats(alias)
    assert table not in dict(autovacuum.due(alias))  # 20 changed rows: under 50 + 10 %

    StockItem.objects.using(alias).bulk_create([StockItem(sku=f"AV-{i}", on_hand=i) for i in range(20, 200)])
    _flush_stats(alias)
    assert dict(autovacuum.due(alias))[table] == "ANALYZE"  # 200 rows inserted: not 1,000 for a vacuum

    StockItem.objects.using(alias).filter(sku__startswith="AV-").delete()
    _flush_stats(alias)
    assert dict(autovacuum.due(alias))[table] == "VACUUM (ANALYZE)"  # 200 dead rows

    assert f"{alias}: VACUUM (ANALYZE) {table}" in autovacuum.run_once([alias])
    _flush_stats(alias)
    assert table not in dict(autovacuum.due(alias))
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT n_dead_tup, last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relname = %s",
            [table.split(".")[1]],
        )
        assert cursor.fetchone() == (0, True)


@pytest.mark.postgres
def test_the_emulation_runs_only_where_the_server_runs_no_autovacuum():
    server = autovacuum.server_runs_it("default")
    assert autovacuum.Autovacuum().active is not server
    assert autovacuum.Autovacuum(enabled=False).active is False


def test_compare_prefill_runs_empty_then_prefilled_and_prints_the_ratio(no_processes, monkeypatch):
    filled = []
    monkeypatch.setattr(bench, "make_templates", lambda styles: ["t1"])
    monkeypatch.setattr(history, "capture", lambda ids: [SimpleNamespace(saga_id=i) for i in ids])
    monkeypatch.setattr(
        history, "prefill", lambda templates, n, **kw: filled.append(n) or {"sagas": n, "rows": {"x": 1}, "seconds": 0}
    )
    out = io.StringIO()
    bench.run_benchmark(n=5, concurrency=2, worker_concurrency=1, warmup=0, out=out, compare_prefill=1000)
    summary = json.loads(out.getvalue().splitlines()[-1])
    assert filled == [1000]
    assert summary["empty"]["prefilled_sagas"] == 0
    assert summary["prefilled"]["prefilled_sagas"] == 1000
    assert summary["prefilled_vs_empty"]["orchestrated"] == {
        "throughput": 1.0,
        "p50": 1.0,
        "cpu_per_order": 1.0,
        "cpu_per_order_own": 1.0,
        "pg_blocks_per_order": 1.0,
        "pg_seq_rows_read_per_order": 1.0,
        "pg_commits_per_order": 1.0,
    }
    assert "prefilled/empty orchestrated" in out.getvalue()


def test_cpu_accounting_reads_proc_per_component():
    if not cpu.available():
        pytest.skip("no /proc")
    before = cpu.snapshot(workers=[os.getpid()], databases=["no-such-database"])
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    spent = cpu.delta(before, cpu.snapshot(workers=[os.getpid()], databases=["no-such-database"]))
    assert spent["client"] >= 0.15
    assert spent["workers"] >= 0.15  # the "worker" given is this process
    assert spent["postgres_own"] == 0.0
    assert spent["total"] == pytest.approx(spent["workers"] + spent["postgres"] + spent["redis"] + spent["client"])
    assert cpu.per_order_ms({"total": 1.5}, 3) == {"total": 500.0}


def test_delta_counts_a_backend_born_mid_run_whole_and_never_goes_negative():
    a = dict.fromkeys(cpu.COMPONENTS, 1.0) | {"own_backends": {10: 0.5}}
    b = dict.fromkeys(cpu.COMPONENTS, 2.0) | {"own_backends": {10: 0.75, 11: 0.25}, "redis": 0.5}
    spent = cpu.delta(a, b)
    assert spent["postgres_own"] == pytest.approx(0.5)
    assert spent["redis"] == 0.0
    assert spent["total"] == pytest.approx(3.0)


@pytest.mark.postgres
def test_prefill_clones_real_sagas_into_every_database_and_the_audit_passes(alice_api, catalogue, broker):
    from orchestration.audit import run_audit
    from orchestration.models import Saga, SagaEvent, SagaStep
    from orders.models import Order
    from payments.models import Charge
    from sagaplatform.kernel.clock import db_now
    from tests.conftest import order_body

    ids = []
    for token in ("tok_visa", "tok_declined"):
        response = alice_api.post("/api/orders/", order_body(token=token), format="json")
        ids.append(response.json()["saga"]["id"])
    broker.deliver()
    templates = history.capture(ids)
    assert {t.saga_id for t in templates} == set(ids)
    before = {key: len(pks) for t in templates for key, pks in t.rows.items() if pks}
    totals = {key: sum(len(t.rows.get(key, ())) for t in templates) for key in before}
    assert totals[("default", "orchestration.SagaEvent")] > 10
    assert totals[("payments", "kernel.Barrier")] >= 2

    result = history.prefill(templates, 6, min_age=timedelta(days=1), max_age=timedelta(days=10))

    assert result["sagas"] == 6
    for (alias, label), count in totals.items():
        model = history._model(label)
        # Each template and its three clones: four of every row.
        assert model.objects.using(alias).count() == 4 * count, (alias, label)
    now = db_now("default")
    clones = Saga.objects.exclude(id__in=ids)
    assert clones.count() == 6
    assert Saga.objects.filter(state="completed").count() == 4
    for saga in clones:
        assert saga.is_terminal
        assert now - timedelta(days=10, minutes=5) < saga.finished_at < now - timedelta(days=1) + timedelta(minutes=5)
        assert saga.created_at <= saga.finished_at
        order = Order.objects.using("orders").get(id=saga.context["order_id"])
        assert str(order.saga_id) == str(saga.id)
        assert Charge.objects.using("payments").get(saga_id=saga.id).order_id == order.id
        assert SagaStep.objects.filter(saga=saga).count() == SagaStep.objects.filter(saga_id=ids[0]).count()
    assert run_audit() == []
    # Keys in time order, as the platform writes its own: version 7 UUIDs, the clones' in the
    # order of their times (clones of the two templates share each time slot).
    assert {saga.id.version for saga in clones} | {uuid.UUID(i).version for i in ids} == {7}
    assert [s.finished_at for s in sorted(clones, key=lambda s: s.id)] == sorted(s.finished_at for s in clones)
    # Written oldest first, as the engine appends a timeline: in the order they were written, no
    # clone's event is older than an earlier written one's by more than a template's own span.
    written = list(SagaEvent.objects.exclude(saga_id__in=ids).order_by("id").values_list("created_at", flat=True))
    assert written[0] < written[-1] - timedelta(days=5)
    assert all(later > earlier - timedelta(hours=1) for earlier, later in itertools.pairwise(written))
