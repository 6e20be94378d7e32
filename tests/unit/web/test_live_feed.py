"""The live feed: websocket consumers (auth, origin, permissions, events arriving, coalescing,
healing from the database) and the publisher. Sagas run in-process (`broker`); the feed runs for
real: committed changes go through the publisher thread and the channel layer of the mode under
test (in-memory when embedded, channels_redis on the production stack)."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Permission
from django.test import Client

from loadtest.processes import wait_for
from orchestration import overview
from orchestration.consumers import DashboardConsumer
from orchestration.models import Saga, SagaEvent
from orders.models import Order
from sagaplatform import workers
from sagaplatform.asgi import application
from sagaplatform.kernel import feed
from tests.conftest import deliver_until, make_user, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ORIGIN = (b"origin", b"http://testserver")
HOST = (b"host", b"testserver")  # a browser always sends it; the Origin must match it, port included


@pytest.fixture(autouse=True)
def _fresh_layer(settings):
    """A new channel layer per test (the in-memory one is bound to the test's event loop)."""
    settings.FEED_FLUSH_SECONDS = 0.05
    settings.FEED_BATCH_SECONDS = 0.01
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


def cookie_for(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


def operator(username: str = "ops", *, permission: bool = True):
    user = make_user(username, staff=True)
    if permission:
        user.user_permissions.add(Permission.objects.get(codename="operate_saga"))
    return user


async def connect(path: str, user=None, origin=ORIGIN, host=HOST) -> WebsocketCommunicator:
    headers = [h for h in (host, origin, await sync_to_async(cookie_for)(user) if user else None) if h]
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=10)
    communicator.connected = connected
    return communicator


async def receive_until(communicator, predicate, *, timeout: float = 15.0) -> tuple[dict, list[dict]]:
    """Messages until one satisfies `predicate`; returns it and everything received."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching message in {timeout}s; got types {[m.get('type') for m in seen]}")
        message = await communicator.receive_json_from(timeout=remaining)
        seen.append(message)
        if predicate(message):
            return message, seen


def place_order(api, **kwargs) -> Order:
    response = api.post("/api/orders/", order_body(**kwargs), format="json")
    assert response.status_code == 202, response.content
    return Order.objects.using("orders").get(id=response.json()["id"])


def header_in(message: dict, saga_id, **fields) -> bool:
    return message.get("type") in ("sagas", "snapshot") and any(
        h["id"] == str(saga_id) and all(h[k] == v for k, v in fields.items()) for h in message["sagas"]
    )


# --- Refusals --------------------------------------------------------------------------------


def test_dashboard_refuses_anonymous_non_staff_and_foreign_origin(alice):
    async def scenario():
        anonymous = await connect("/ws/dashboard/")
        assert (await anonymous.receive_output(timeout=5))["code"] == 4401

        customer = await connect("/ws/dashboard/", alice)
        assert (await customer.receive_output(timeout=5))["code"] == 4403

        staff = await sync_to_async(operator)()
        foreign = await connect("/ws/dashboard/", staff, origin=(b"origin", b"http://evil.example"))
        assert foreign.connected is False

    async_to_sync(scenario)()


def test_a_socket_opened_from_the_right_host_but_another_port_is_refused(settings):
    """Another service on the same host (another port: another origin) must not open an
    operator's socket with the operator's cookie, nor can a page reach a server on another port."""
    settings.ALLOWED_HOSTS = ["shop.example", "testserver"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://admin.shop.example:8443", "https://*.partner.example"]

    async def scenario():
        staff = await sync_to_async(operator)()

        async def opens(origin: bytes, host: bytes) -> bool:
            communicator = await connect("/ws/dashboard/", staff, origin=(b"origin", origin), host=(b"host", host))
            if communicator.connected:
                await communicator.disconnect()
            return communicator.connected

        assert await opens(b"http://shop.example:8000", b"shop.example:8000")
        assert await opens(b"http://shop.example", b"shop.example")
        assert await opens(b"http://shop.example:80", b"shop.example")  # the default port, spelled out
        assert await opens(b"https://admin.shop.example:8443", b"shop.example:8000")  # trusted
        assert not await opens(b"http://shop.example:8001", b"shop.example:8000")
        assert not await opens(b"http://shop.example:8000", b"shop.example")
        assert not await opens(b"http://shop.example", b"shop.example:8000")
        assert not await opens(b"https://shop.example", b"shop.example")  # not served over TLS here
        assert not await opens(b"https://admin.shop.example", b"shop.example:8000")  # trusted on 8443 only
        assert not await opens(b"http://evil.example:8000", b"evil.example:8000")  # not an allowed host
        assert await opens(b"https://app.partner.example", b"shop.example")  # a trusted subdomain
        assert not await opens(b"https://partner.example.evil.example", b"shop.example")
        assert not await opens(b"http://app.partner.example", b"shop.example")  # trusted over https only
        assert not await opens(b"http://shop.example:x", b"shop.example")
        assert not await opens(b"null", b"shop.example")

    async_to_sync(scenario)()


def test_behind_a_tls_proxy_the_origin_is_https(settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

    async def scenario():
        staff = await sync_to_async(operator)()
        headers = [(b"origin", b"https://testserver"), (b"host", b"testserver"), await sync_to_async(cookie_for)(staff)]
        proxied = WebsocketCommunicator(
            application, "/ws/dashboard/", headers=[*headers, (b"x-forwarded-proto", b"https")]
        )
        assert (await proxied.connect(timeout=10))[0] is True
        await proxied.disconnect()
        direct = WebsocketCommunicator(application, "/ws/dashboard/", headers=headers)
        assert (await direct.connect(timeout=10))[0] is False

    async_to_sync(scenario)()


def test_order_socket_is_its_owner_only(broker, catalogue, alice, alice_api, bob):
    order = place_order(alice_api)

    async def scenario():
        anonymous = await connect(f"/ws/orders/{order.id}/")
        assert (await anonymous.receive_output(timeout=5))["code"] == 4401
        other = await connect(f"/ws/orders/{order.id}/", bob)
        assert (await other.receive_output(timeout=5))["code"] == 4404
        garbage = await connect("/ws/orders/not-a-uuid/", alice)
        assert (await garbage.receive_output(timeout=5))["code"] == 4404

    async_to_sync(scenario)()


# --- The dashboard ---------------------------------------------------------------------------


def test_dashboard_greets_with_definitions_snapshot_and_overview(broker, catalogue, alice_api):
    order = place_order(alice_api)
    broker.deliver()
    staff = operator()

    async def scenario():
        ws = await connect("/ws/dashboard/", staff)
        hello = await ws.receive_json_from(timeout=10)
        assert hello["type"] == "hello"
        assert hello["can_operate"] is True
        parallel = hello["definitions"]["place_order_parallel"]
        after = {s["name"]: s["after"] for s in parallel["steps"]}
        assert after["charge_payment"] == []
        assert sorted(after["approve_order"]) == ["charge_payment", "reserve_stock"]
        assert [s["name"] for s in parallel["steps"] if s["pivot"]] == ["dispatch_shipment"]
        snapshot = await ws.receive_json_from(timeout=10)
        assert header_in(
            snapshot, order.saga_id, state="completed", steps_done=8, steps_total=8, order_id=str(order.id)
        )
        ov = await ws.receive_json_from(timeout=10)
        assert ov["type"] == "overview"
        assert sum(m["completed"] for m in ov["minutes"]) == 1
        assert sum(m["started"] for m in ov["minutes"]) == 1
        assert ov["latency_ms"]["count"] == 1
        await ws.disconnect()

    async_to_sync(scenario)()


def test_saga_changes_arrive_coalesced_and_the_watched_saga_in_full(broker, catalogue, alice_api):
    staff = operator()
    order = place_order(alice_api)

    async def scenario():
        ws = await connect("/ws/dashboard/", staff)
        await receive_until(ws, lambda m: m["type"] == "overview")
        # The saga exists once its start has run: a watch before that is answered not_found.
        await sync_to_async(broker.deliver)(limit=1)
        await ws.send_json_to({"action": "watch", "saga": str(order.saga_id)})
        full, _ = await receive_until(ws, lambda m: m["type"] == "saga" and m["full"])
        assert full["saga"]["id"] == str(order.saga_id)
        assert len(full["steps"]) == 10

        await sync_to_async(broker.deliver)()
        version = await sync_to_async(lambda: Saga.objects.get(id=order.saga_id).version)()
        _last, seen = await receive_until(ws, lambda m: header_in(m, order.saga_id, state="completed", version=version))
        header_messages = [m for m in seen if m["type"] == "sagas"]
        # Every engine transaction was published; the socket sent far fewer messages.
        assert 0 < len(header_messages) < version
        # The watched saga's events all arrived, in order, none twice.
        details = [m for m in seen if m["type"] == "saga"]
        seqs = [e["seq"] for e in full["events"]] + [e["seq"] for m in details for e in m["events"]]
        # A flush sends the headers before the details, and a flush may fall between a batch's
        # two messages: the last events can follow the final header in several messages.
        while seqs[-1] != version:
            more, _ = await receive_until(ws, lambda m: m["type"] == "saga")
            assert not more["full"]
            seqs += [e["seq"] for e in more["events"]]
        assert seqs == list(range(1, version + 1))
        assert all(m["sent_at"] > 0 for m in header_messages)
        assert any(h["committed_at"] for m in header_messages for h in m["sagas"])
        await ws.disconnect()

    async_to_sync(scenario)()


def unpublished_change(broker, saga_id, version: int) -> None:
    """Deliver until the saga has changed (with the feed off, that change is never published)."""
    while Saga.objects.get(id=saga_id).version == version:
        assert broker.deliver(limit=1) == 1


def test_a_lost_change_of_the_watched_saga_is_read_from_the_database(settings, broker, catalogue, alice_api):
    """A detail message lost in the middle (a worker killed within the batch window) leaves a
    gap in the events: the next change reveals it, and the consumer reads the missing events
    (once, without resending the rest) instead of sending the gap on."""
    staff = operator()
    order = place_order(alice_api)

    async def scenario():
        ws = await connect("/ws/dashboard/", staff)
        await receive_until(ws, lambda m: m["type"] == "overview")
        await sync_to_async(broker.deliver)(limit=1)  # the saga starts
        await ws.send_json_to({"action": "watch", "saga": str(order.saga_id)})
        full, _ = await receive_until(ws, lambda m: m["type"] == "saga" and m["full"])
        settings.SAGA_FEED_ENABLED = False
        await sync_to_async(unpublished_change)(broker, order.saga_id, full["saga"]["version"])
        settings.SAGA_FEED_ENABLED = True
        await sync_to_async(broker.deliver)()
        version = await sync_to_async(lambda: Saga.objects.get(id=order.saga_id).version)()
        assert full["events"][-1]["seq"] < version - 1
        seqs = [e["seq"] for e in full["events"]]
        while seqs[-1] != version:
            more, _ = await receive_until(ws, lambda m: m["type"] == "saga")
            assert not more["full"]
            seqs += [e["seq"] for e in more["events"]]
        assert seqs == list(range(1, version + 1))
        await ws.disconnect()

    async_to_sync(scenario)()


def test_a_lost_feed_is_healed_from_the_database(settings, broker, catalogue, alice_api):
    """With publishing off (every message lost), the reconcile still brings the final state."""
    staff = operator()
    order = place_order(alice_api)
    settings.SAGA_FEED_ENABLED = False
    settings.FEED_RECONCILE_SECONDS = 0.3

    async def scenario():
        ws = await connect("/ws/dashboard/", staff)
        await receive_until(ws, lambda m: m["type"] == "overview")
        await sync_to_async(broker.deliver)()
        await receive_until(ws, lambda m: header_in(m, order.saga_id, state="completed"))
        await ws.disconnect()

    async_to_sync(scenario)()


def test_the_reconcile_sends_the_watched_saga_only_the_events_it_lacks(settings, broker, catalogue, alice_api):
    staff = operator()
    order = place_order(alice_api)
    broker.deliver(limit=1)
    settings.SAGA_FEED_ENABLED = False
    settings.FEED_RECONCILE_SECONDS = 0.3

    async def scenario():
        ws = await connect("/ws/dashboard/", staff)
        await receive_until(ws, lambda m: m["type"] == "overview")
        await ws.send_json_to({"action": "watch", "saga": str(order.saga_id)})
        full, _ = await receive_until(ws, lambda m: m["type"] == "saga" and m["full"])
        await sync_to_async(broker.deliver)()
        version = await sync_to_async(lambda: Saga.objects.get(id=order.saga_id).version)()
        seqs = [e["seq"] for e in full["events"]]
        while seqs[-1] != version:
            healed, _ = await receive_until(ws, lambda m: m["type"] == "saga")
            assert not healed["full"]
            seqs += [e["seq"] for e in healed["events"]]
        assert seqs == list(range(1, version + 1))
        await ws.disconnect()

    async_to_sync(scenario)()


def test_cancel_from_the_dashboard_is_permission_checked_and_audited(broker, catalogue, alice_api):
    staff = operator()
    order = place_order(alice_api)
    broker.deliver(limit=1)  # the saga starts; its first command waits
    viewer = operator("viewer", permission=False)

    async def scenario():
        ws = await connect("/ws/dashboard/", viewer)
        await receive_until(ws, lambda m: m["type"] == "overview")
        await ws.send_json_to({"action": "cancel", "saga": str(order.saga_id), "request_id": "r1"})
        refused, _ = await receive_until(ws, lambda m: m["type"] == "action_result")
        assert refused == {**refused, "request_id": "r1", "ok": False, "code": "permission_denied"}

        ops = await connect("/ws/dashboard/", staff)
        await receive_until(ops, lambda m: m["type"] == "overview")
        await ops.send_json_to({"action": "skip", "saga": str(order.saga_id), "request_id": "r2"})
        result, _ = await receive_until(ops, lambda m: m["type"] == "action_result")
        assert (result["ok"], result["code"]) == (False, "reason_required")
        await ops.send_json_to(
            {"action": "cancel", "saga": str(order.saga_id), "reason": "customer phoned", "request_id": "r3"}
        )
        result, _ = await receive_until(ops, lambda m: m["type"] == "action_result")
        assert result["ok"] is True, result
        await ops.send_json_to({"action": "cancel", "saga": str(order.saga_id), "request_id": "r4"})
        again, _ = await receive_until(ops, lambda m: m["type"] == "action_result")
        assert (again["ok"], again["code"]) == (False, "already_cancelled")
        await ops.send_json_to({"action": "retry", "saga": "nonsense", "request_id": "r5"})
        bad, _ = await receive_until(ops, lambda m: m["type"] == "action_result")
        assert (bad["ok"], bad["code"]) == (False, "invalid")
        await ops.send_json_to(["not", "an", "object"])
        error, _ = await receive_until(ops, lambda m: m["type"] == "error")
        assert error["code"] == "bad_message"
        await ws.disconnect()
        await ops.disconnect()

    async_to_sync(scenario)()
    event = SagaEvent.objects.get(saga_id=order.saga_id, kind="saga_cancel_requested")
    assert (event.actor, event.data["reason"]) == ("user:ops", "customer phoned")
    broker.deliver()
    assert Order.objects.using("orders").get(id=order.id).status == Order.Status.CANCELLED


def test_a_withdrawn_permission_is_noticed_on_the_next_action(broker, catalogue, alice_api):
    staff = operator()
    order = place_order(alice_api)
    broker.deliver(limit=1)

    async def scenario():
        ws = await connect("/ws/dashboard/", staff)
        await receive_until(ws, lambda m: m["type"] == "overview")
        await sync_to_async(staff.user_permissions.clear)()
        await ws.send_json_to({"action": "cancel", "saga": str(order.saga_id), "request_id": "x"})
        result, _ = await receive_until(ws, lambda m: m["type"] == "action_result")
        assert (result["ok"], result["code"]) == (False, "permission_denied")
        await ws.disconnect()

    async_to_sync(scenario)()
    assert Saga.objects.get(id=order.saga_id).state == Saga.State.RUNNING


# --- The customer's order page ---------------------------------------------------------------


def test_order_page_socket_follows_the_order_to_shipped(broker, catalogue, alice, alice_api):
    order = place_order(alice_api)

    async def scenario():
        ws = await connect(f"/ws/orders/{order.id}/", alice)
        first = await ws.receive_json_from(timeout=10)
        # Not started yet: a cancel would still be accepted (the saga would start cancelled).
        assert first["order"] == {"id": str(order.id), "status": "pending", "can_cancel": True, "failure": None}
        await sync_to_async(deliver_until)(broker, "shipping.execute")
        # Stock reserved, card charged, order approved: the page shows three steps done.
        middle, _ = await receive_until(
            ws, lambda m: m["saga"] and [s["state"] for s in m["saga"]["steps"]][:4] == ["succeeded"] * 3 + ["running"]
        )
        # The order service approved the order before the engine heard of it.
        assert middle["order"]["status"] == "approved"
        assert middle["order"]["can_cancel"] is True
        # Handling window over (0 s in tests): the parcel leaves and the order ships.
        await sync_to_async(broker.deliver)()
        last, _ = await receive_until(
            ws, lambda m: m["order"]["status"] == "shipped" and m["saga"]["state"] == "completed"
        )
        assert last["order"]["can_cancel"] is False
        assert [s["state"] for s in last["saga"]["steps"]] == ["succeeded"] * 8
        await ws.disconnect()

    async_to_sync(scenario)()


# --- Pieces ----------------------------------------------------------------------------------


def test_merge_keeps_the_latest_state_and_every_event():
    def delta(version, events):
        return {
            "saga": {"id": "s", "version": version},
            "steps": [{"v": version}],
            "events": [{"seq": e} for e in events],
        }

    merged = feed.merge([delta(2, [1, 2]), delta(4, [3, 4]), delta(3, [])])
    assert merged["s"]["saga"]["version"] == 4
    assert merged["s"]["steps"] == [{"v": 4}]
    assert [e["seq"] for e in merged["s"]["events"]] == [1, 2, 3, 4]


def test_a_late_change_of_the_watched_saga_keeps_the_newest_header():
    """Batches of two workers may arrive out of order: the older one adds its events only."""
    consumer = DashboardConsumer()
    consumer.watching, consumer.detail, consumer.detail_version = "s", None, 2

    def delta(version):
        return {
            "delta": {"saga": {"id": "s", "version": version}, "steps": [{"v": version}], "events": [{"seq": version}]}
        }

    async_to_sync(consumer.feed_detail)(delta(4))
    async_to_sync(consumer.feed_detail)(delta(3))
    assert (consumer.detail["saga"]["version"], consumer.detail["steps"]) == (4, [{"v": 4}])
    assert [e["seq"] for e in consumer.detail["events"]] == [3, 4]


def test_overview_counts_traffic_and_failures(broker, catalogue, alice_api):
    place_order(alice_api)
    place_order(alice_api, token="tok_declined")
    broker.deliver()
    ov = overview.overview()
    counts = {k: sum(m[k] for m in ov["minutes"]) for k in ("started", "completed", "compensated")}
    assert counts == {"started": 2, "completed": 1, "compensated": 1}
    edges = {(e["source"], e["target"], e["kind"]): e for e in ov["flow"]["edges"]}
    assert edges[("orchestrator", "payments", "command")]["per_min"] > 0
    assert edges[("payments", "orchestrator", "reply")]["failures_per_min"] > 0  # the decline
    assert edges[("inventory", "orchestrator", "reply")]["failures_per_min"] == 0
    assert ov["in_flight"] == 0
    assert ov["latency_ms"]["count"] == 2
    assert set(ov["queues"]) >= {"orchestrator", "payments"}


def test_overview_counts_each_saga_start_once_whatever_its_style(broker, catalogue, alice_api):
    """The choreography's tracker records every observed event at saga level; those are not starts."""
    for mode in ("orchestrated", "parallel", "tcc", "choreography", "choreography", "choreography"):
        response = alice_api.post("/api/orders/", {**order_body(), "mode": mode}, format="json")
        assert response.status_code == 202, response.content
    broker.deliver()
    assert SagaEvent.objects.filter(step="", kind="event_observed").count() > 3  # what was miscounted
    counts = {k: sum(m[k] for m in overview.overview()["minutes"]) for k in ("started", "completed")}
    assert counts == {"started": 6, "completed": Saga.objects.filter(state="completed").count()}
    assert counts["completed"] >= 1


def test_workers_announce_themselves_and_healthz_reports_them(client, settings):
    workers.announce("celery@node-1", ["inventory", "payments"])
    workers.announce("celery@node-2", ["orchestrator"])
    client.force_login(make_user("ops", staff=True))
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert set(body["broker"]["queues"]) == set(settings.SAGA_QUEUES)
    assert {w["name"] for w in body["workers"]} >= {"celery@node-1", "celery@node-2"}
    workers.withdraw("celery@node-1")
    assert "celery@node-1" not in {w["name"] for w in workers.live_workers()}
    settings.WORKER_HEARTBEAT_SECONDS = 0.3
    workers.announce("celery@node-3", ["shipping"])
    assert "celery@node-3" in {w["name"] for w in workers.live_workers()}
    # Three missed beats (rounded up to a second): its announcement expires.
    wait_for(
        lambda: "celery@node-3" not in {w["name"] for w in workers.live_workers()},
        timeout=5,
        interval=0.05,
        message="the silent worker's announcement to expire",
    )


def test_a_dashboard_is_sent_no_more_rows_a_second_than_a_browser_paints(settings):
    """A big batch postpones the next one (its rows coalesce meanwhile): 10 rows at 20 rows/s
    leave half a second before the next message, which carries only each saga's latest row."""
    settings.FEED_MAX_ROWS_PER_SECOND = 20
    staff = operator()

    def headers(version, count=10):
        return [{"id": f"s{i}", "version": version, "state": "running"} for i in range(count)]

    async def scenario():
        layer = get_channel_layer()
        ws = await connect("/ws/dashboard/", staff)
        await receive_until(ws, lambda m: m["type"] == "overview")
        await layer.group_send(feed.SAGAS_GROUP, {"type": "feed.headers", "headers": headers(1)})
        first, _ = await receive_until(ws, lambda m: m["type"] == "sagas")
        for version in (2, 3, 4):  # arrive while the first batch's half second runs
            await layer.group_send(feed.SAGAS_GROUP, {"type": "feed.headers", "headers": headers(version)})
        second, _ = await receive_until(ws, lambda m: m["type"] == "sagas")
        assert len(first["sagas"]) == 10
        assert second["sent_at"] - first["sent_at"] >= 450
        assert sorted((h["id"], h["version"]) for h in second["sagas"]) == [(f"s{i}", 4) for i in range(10)]
        await ws.disconnect()

    async_to_sync(scenario)()


def test_a_closed_sockets_wait_on_the_channel_layer_ends_wherever_the_cancel_lands():
    """When a websocket closes, Channels cancels its consumer's wait on the channel layer. That
    wait sends commands to Redis before it blocks; a cancel that landed just as a write completed
    was lost (redis-py writes under asyncio.wait_for when the socket has a timeout, and Python
    3.11's wait_for drops such a cancel), so the task polled Redis forever and the test server's
    loop never closed. The cancel is swept over every step of the wait's start."""

    async def scenario() -> list[int]:
        layer = get_channel_layer()
        lost = []
        for steps in range(60):  # past the last write: by then it blocks in BZPOPMIN
            channel = await layer.new_channel()
            waiting = asyncio.ensure_future(layer.receive(channel))
            for _ in range(steps):
                await asyncio.sleep(0)
            waiting.cancel()
            done, _ = await asyncio.wait([waiting], timeout=2)
            if not done:
                lost.append(steps)
                await layer.send(channel, {"type": "feed.headers", "headers": []})  # lets it end
                await asyncio.wait([waiting], timeout=10)
        return lost

    assert async_to_sync(scenario)() == []
