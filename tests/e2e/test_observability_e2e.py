"""Metrics, traces and logs with real processes: a production web process (daphne, DEBUG off,
JSON logs, /metrics behind a bearer token), a prefork worker of two children recycled every
twenty tasks, and beat, on their own Redis. Orders go in over HTTP: two that go through, one whose
payment fails twice then passes (retries), one declined (a compensation), one whose payment
never passes (retries run out: a final failure, then compensations). Then:

- `/metrics` agrees with the databases (sagas by outcome, step attempts, final failures,
  barrier hits), summed over every pool child, recycled ones included; the web process's HTTP
  requests are counted by route template (never the order's id), method and status;
- each order is one trace: the request span in the web process is its root, and the spans of
  the worker's children (each attempt, each compensation) link up to it;
- log lines are JSON, saga lines carry the saga, order, step, attempt, service and trace ids,
  and no payment token or password appears anywhere in what was logged.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter, defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestration.models import Saga, SagaEvent
from tests.conftest import CATALOGUE, order_body
from tests.processes import wait_for
from tests.stack import PASSWORD, Stack

pytestmark = [
    pytest.mark.production,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(400),
]

METRICS_TOKEN = "metrics-test-token-0123456789"
TOKENS = {"ok1": "tok_visa", "ok2": "tok_visa", "retried": "tok_flaky_2", "declined": "tok_declined"}
TOKENS["exhausted"] = "tok_flaky_9"  # more failures than charge_payment's 5 attempts
ENDED = {"completed", "compensated", "failed", "parked", "cancelled"}


def scrape(stack: Stack, token: str | None = METRICS_TOKEN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{stack.web_port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[tuple, float]:
    out: dict[tuple, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
    return out


def total(values: dict[tuple, float], name: str, **labels) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, labels[k]) in ls for k in labels))


@pytest.fixture(scope="module")
def run(django_db_setup, django_db_blocker, tmp_path_factory):
    from django.contrib.auth import get_user_model

    from inventory.services import stock_set
    from orders.models import Product

    tmp = tmp_path_factory.mktemp("obs")
    stack = Stack("observability", concurrency=2)
    stack.env.update(
        {
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "observability-test-secret-key",
            "SAGA_METRICS_TOKEN": METRICS_TOKEN,
            "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prometheus"),
            "OTEL_TRACES_EXPORTER": "file",
            "SAGA_TRACE_FILE": str(tmp / "spans.jsonl"),
            "LOG_FORMAT": "json",
            "CELERY_WORKER_MAX_TASKS_PER_CHILD": "5",
            "SAGA_RETRY_MAX_INTERVAL_OVERRIDE": "0.3",
            "SAGA_STEP_TIMEOUT_OVERRIDE": "10",
        }
    )
    (tmp / "prometheus").mkdir()
    with django_db_blocker.unblock():
        for sku, (price, stock) in CATALOGUE.items():
            Product.objects.using("orders").update_or_create(
                sku=sku, defaults={"name": sku.title(), "unit_price": price}
            )
            stock_set(sku=sku, on_hand=stock)
        get_user_model().objects.create_user("watcher", "watcher@example.com", PASSWORD)
        try:
            stack.start()
            receipts = {}
            for name, token in TOKENS.items():
                status, body = stack.call("watcher", "POST", "/api/orders/", order_body(token=token))
                assert status == 202, body
                receipts[name] = body

            def all_ended():
                states = dict(
                    Saga.objects.filter(id__in=[r["saga"]["id"] for r in receipts.values()]).values_list("id", "state")
                )
                return len(states) == len(receipts) and set(states.values()) <= ENDED

            wait_for(all_ended, timeout=240, interval=0.5, message="every saga to end")
            saga_ids = [r["saga"]["id"] for r in receipts.values()]
            names = {r["saga"]["id"]: name for name, r in receipts.items()}
            db = {
                "states": Counter(Saga.objects.filter(id__in=saga_ids).values_list("state", flat=True)),
                "events": Counter(SagaEvent.objects.filter(saga_id__in=saga_ids).values_list("kind", flat=True)),
                "exhausted": SagaEvent.objects.filter(
                    saga_id__in=saga_ids, kind="step_failed", data__reason="retries_exhausted"
                ).count(),
                # Each charge retry's saga and error code, by the name of its order.
                "charge_retries": [
                    (names[str(saga_id)], (data.get("error") or {}).get("code"))
                    for saga_id, data in SagaEvent.objects.filter(
                        saga_id__in=saga_ids, kind="retry_scheduled", step="charge_payment"
                    ).values_list("saga_id", "data")
                ],
            }
            reads = {
                "detail": stack.call("watcher", "GET", f"/api/orders/{receipts['ok1']['id']}/")[0],
                "missing": stack.call("watcher", "GET", "/api/orders/00000000-0000-4000-8000-000000000000/")[0],
            }
            refused = {"none": scrape(stack, None), "wrong": scrape(stack, "nope")}
            status, text = scrape(stack)
            assert status == 200, text
            children = stack.worker_children()
        finally:
            stack.stop()
    spans = [json.loads(line) for line in (tmp / "spans.jsonl").read_text().splitlines() if line.strip()]
    logs = "\n".join(stack.log(name) for name in ("web", "worker0", "beat"))
    files = {p.name for p in (tmp / "prometheus").iterdir()}
    return {
        "receipts": receipts,
        "db": db,
        "metrics": samples(text),
        "refused": refused,
        "reads": reads,
        "spans": spans,
        "logs": logs,
        "files": files,
        "children": children,
    }


def test_metrics_match_the_databases_across_recycled_pool_children(run):
    db, values = run["db"], run["metrics"]
    assert db["states"] == {"completed": 3, "compensated": 2}, db["states"]
    # Children were recycled during the run (max-tasks-per-child 5: the commands and replies a
    # worker runs inline leave a few Celery tasks per order, besides beat's): more pids wrote
    # samples than the two children alive at the end, and their counts are all still there.
    pids = {name.rsplit("_", 1)[1] for name in run["files"] if name.startswith("counter_")}
    assert len(pids) > 3, run["files"]

    assert total(values, "sagaplatform_sagas_started_total") == 5
    for outcome, n in db["states"].items():
        assert total(values, "sagaplatform_sagas_finished_total", outcome=outcome) == n, outcome
    assert total(values, "sagaplatform_saga_duration_seconds_count") == 5
    assert db["exhausted"] == 1
    assert (
        total(
            values, "sagaplatform_step_final_failures_total", service="payments", step="charge_payment", kind="action"
        )
        == 1
    )
    assert total(values, "sagaplatform_step_final_failures_total") == 1
    # Every failed charge attempt: those retried, and the last of the one that ran out.
    transient = total(values, "sagaplatform_step_attempts_total", step="charge_payment", outcome="transient_error")
    assert transient == len(db["charge_retries"]) + 1
    # The flaky cards fail their first attempts, whatever failed them (5 attempts: 4 retries for
    # the one that runs out). A charge may also come before its card's registration, which goes
    # to payments in a message of its own: it waits (`payment_method_pending`), retried like any
    # transient error, and that is the only other retry any order may have.
    retries = Counter(name for name, _ in db["charge_retries"])
    assert (retries["retried"], retries["exhausted"]) == (2, 4), db["charge_retries"]
    codes = {code for name, code in db["charge_retries"] if name not in ("retried", "exhausted")}
    assert codes <= {"payment_method_pending"}, db["charge_retries"]
    assert {code for _, code in db["charge_retries"]} <= {"gateway_unavailable", "payment_method_pending"}
    assert (
        total(values, "sagaplatform_step_attempts_total", kind="action", outcome="succeeded")
        == db["events"]["step_succeeded"]
    )
    assert total(values, "sagaplatform_step_attempts_total", outcome="business_failure") == 1  # the declined card
    assert (
        total(values, "sagaplatform_step_attempts_total", kind="compensation", outcome="succeeded")
        == db["events"]["step_compensated"]
    )
    # The charge that never passed left nothing behind: its refund is a null compensation.
    assert total(values, "sagaplatform_barrier_hits_total", service="payments", kind="null_compensation") == 1
    assert total(values, "sagaplatform_queue_wait_seconds_count", queue="payments") >= 5
    assert total(values, "sagaplatform_step_handler_duration_seconds_count", service="inventory") >= 5
    # Scrape-time gauges from the databases: nothing left in flight, nothing left unpublished.
    assert total(values, "sagaplatform_sagas_in_flight") == 0
    assert total(values, "sagaplatform_collector_up", source="sagas") == 1
    assert total(values, "sagaplatform_live_workers", queue="payments") == 1
    # No saga, order or customer id in any label.
    for (_, labels), _ in values.items():
        for _, value in labels:
            assert not any(r["saga"]["id"] in value or r["id"] in value for r in run["receipts"].values())


def test_http_requests_of_the_web_process_are_counted_by_route(run):
    values = run["metrics"]
    assert run["reads"] == {"detail": 200, "missing": 404}
    requests = "sagaplatform_http_requests_total"
    assert total(values, requests, method="POST", route="/api/orders/", status="202") == len(TOKENS)
    detail = "/api/orders/<uuid:order_id>/"
    assert total(values, requests, method="GET", route=detail, status="200") == 1
    assert total(values, requests, method="GET", route=detail, status="404") == 1
    assert total(values, requests, method="GET", route="/metrics", status="401") == 2  # the refused scrapes
    latency = "sagaplatform_http_request_duration_seconds_count"
    assert total(values, latency, method="POST", route="/api/orders/") == len(TOKENS)
    assert total(values, "sagaplatform_http_requests_in_progress") == 1  # the scrape itself
    assert total(values, "sagaplatform_http_exceptions_total") == 0


def test_metrics_need_the_bearer_token_in_production(run):
    for status, body in run["refused"].values():
        assert status == 401
        assert json.loads(body)["code"] == "not_authenticated"


def test_each_order_is_one_trace_from_the_request_through_every_worker_child(run):
    spans = run["spans"]
    by_id = {s["span_id"]: s for s in spans}
    worker_pids: set[int] = set()
    for name, receipt in run["receipts"].items():
        saga_spans = [s for s in spans if s["attributes"].get("saga.id") == receipt["saga"]["id"]]
        assert saga_spans, name
        traces = {s["trace_id"] for s in saga_spans}
        assert len(traces) == 1, (name, traces)
        trace = [s for s in spans if s["trace_id"] in traces]
        roots = [s for s in trace if s["parent_span_id"] is None]
        assert len(roots) == 1, (name, [r["name"] for r in roots])
        assert roots[0]["kind"] == "SERVER", roots[0]
        assert "POST" in roots[0]["name"], roots[0]
        # Linked: every span's parent is in the same trace.
        assert all(by_id.get(s["parent_span_id"], {}).get("trace_id") in traces for s in trace if s is not roots[0])
        # Across processes: the web process's request, then the worker's pool children. Which
        # child runs which task is the pool's choice: a short saga may run in one child alone.
        workers = {s["pid"] for s in trace} - {roots[0]["pid"]}
        assert workers, name
        worker_pids |= workers
    # Into every child: with more than twenty tasks in all, children recycled every twenty
    # tasks are at least two processes, and each one's spans link up to their request.
    assert len(worker_pids) >= 2, worker_pids
    retried = [
        s
        for s in spans
        if s["attributes"].get("saga.id") == run["receipts"]["retried"]["saga"]["id"]
        and s["attributes"].get("saga.step") == "charge_payment"
    ]
    assert sorted((s["attributes"]["saga.attempt"], s["attributes"]["saga.outcome"]) for s in retried) == [
        (1, "transient_error"),
        (2, "transient_error"),
        (3, "succeeded"),
    ]
    declined = run["receipts"]["declined"]["saga"]["id"]
    compensations = [
        s
        for s in spans
        if s["attributes"].get("saga.id") == declined and s["attributes"].get("saga.op") == "compensate"
    ]
    assert {s["attributes"]["saga.step"] for s in compensations} >= {"reserve_stock"}


def test_log_lines_are_json_with_the_saga_ids_and_no_secrets(run):
    logs = run["logs"]
    for secret in ("tok_visa", "tok_flaky", "tok_declined", PASSWORD, METRICS_TOKEN):
        assert secret not in logs, secret
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    saga_lines = [line for line in lines if line.get("saga_id")]
    assert saga_lines
    for line in saga_lines:
        assert {"saga_id", "service", "trace_id", "span_id", "timestamp", "level", "event"} <= set(line), line
    saga_ids = {r["saga"]["id"] for r in run["receipts"].values()}
    assert {line["saga_id"] for line in saga_lines} >= saga_ids
    # A service's line about an attempt names everything needed to find it.
    transient = [line for line in saga_lines if "failed transiently" in line["event"]]
    assert transient
    for line in transient:
        assert line["service"] == "payments"
        assert line["step"] == "charge_payment"
        assert line["attempt"] >= 1
        assert line["order_id"]
    # The engine's lines carry the order too.
    engine = [line for line in saga_lines if line.get("logger") == "orchestration.engine"]
    assert engine
    assert all(line.get("order_id") for line in engine)
    # Request lines carry the request id and the user.
    requests = [
        line for line in lines if line.get("event") == "request_finished" and line["request"] == "POST /api/orders/"
    ]
    assert len(requests) == len(TOKENS)
    assert all(line.get("request_id") and line.get("user_id") for line in requests)
