"""Benchmark of the live feed: from commit to a painted browser, at 100, 1,000 and 10,000 events/s.

What runs: the production feed path end to end. This process plays the workers: it publishes
synthetic saga changes through the real publisher (`feed.publisher.put`, what the engine's
on-commit hook calls) at the offered rate. The channel layer is Redis; the server is daphne
(`manage.py serve`) in a subprocess; the dashboard is open in headless Chromium, logged in as an
operator, watching one saga. Each change is one engine transaction's worth: a new version of one
saga, with the step that moved.

What is measured, per offered rate:
* events/s offered and published, websocket messages/s and saga headers/s the browser applied;
* whether the final state (last version) of every saga reached the browser;
* commit to paint: from the publisher's clock after commit (`committed_at`) to the browser's
  requestAnimationFrame after applying it (`window.__onFeedApplied`), p50/p95, for the list's
  rows and for the watched saga's graph node changing colour.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

from django.conf import settings

from loadtest.processes import Process, answers, serve_command
from orchestration.definitions import PLACE_ORDER
from orchestration.live import style_of
from sagaplatform.kernel import feed

# Debian's Chromium (never a downloaded one); CHROMIUM_PATH points elsewhere. Without the
# background-networking flags it keeps trying to reach Google's hosts, which this network refuses.
CHROMIUM = os.environ.get("CHROMIUM_PATH") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
STEP_STATES = ("running", "succeeded")

# In the page before any of its scripts: count the websocket's traffic and record what the
# dashboard reports it applied and painted.
PROBE = """
window.__probe = {messages: 0, bytes: 0, rows: [], nodes: [], latest: {}};
const NativeWebSocket = window.WebSocket;
window.WebSocket = function (...args) {
  const socket = new NativeWebSocket(...args);
  socket.addEventListener('message', (e) => { window.__probe.messages++; window.__probe.bytes += e.data.length; });
  return socket;
};
window.WebSocket.prototype = NativeWebSocket.prototype;
Object.assign(window.WebSocket, NativeWebSocket);
window.__onFeedApplied = (headers, paintedAt, watched) => {
  const p = window.__probe;
  for (const h of headers) {
    if (h.committed_at) {
      (h.id === watched ? p.nodes : p.rows).push(paintedAt - h.committed_at);
    }
    if (!p.latest[h.id] || p.latest[h.id] < h.version) p.latest[h.id] = h.version;
  }
};
"""


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def synthetic_delta(saga_id: str, version: int, created_at: str) -> dict:
    """Version `version` of a place_order saga: steps complete one after another."""
    steps = []
    # Each version moves one step (running, then succeeded); after the last, it starts over.
    progress = (version - 1) % (2 * len(PLACE_ORDER.steps) + 1)
    for position, spec in enumerate(PLACE_ORDER.steps):
        done = progress // 2
        state = "succeeded" if position < done else ("running" if position == done and progress % 2 == 0 else "pending")
        steps.append(
            {
                "name": spec.name,
                "kind": "action",
                "service": spec.service,
                "position": position,
                "state": state,
                "attempts": 1 if state != "pending" else 0,
                "compensation_attempts": 0,
                "confirm_attempts": 0,
                "next_attempt_at": None,
                "deadline_at": None,
                "started_at": created_at if state != "pending" else None,
                "finished_at": created_at if state == "succeeded" else None,
                "error": None,
            }
        )
    done = sum(s["state"] == "succeeded" for s in steps)
    active = next((s["name"] for s in steps if s["state"] == "running"), None)
    complete = done == len(steps)
    return {
        "saga": {
            "id": saga_id,
            "order_id": None,
            "definition": PLACE_ORDER.name,
            "style": style_of(PLACE_ORDER),
            "state": "completed" if complete else "running",
            "version": version,
            "created_at": created_at,
            "updated_at": created_at,
            "finished_at": created_at if complete else None,
            "failure": None,
            "active_step": active,
            "steps_done": done,
            "steps_total": len(steps),
            "stuck": False,
            "cancellable": not complete and done < 4,
            "committed_at": None,
        },
        "steps": steps,
        "events": [
            {
                "seq": version,
                "step": active or "",
                "kind": "step_started" if active else "saga_completed",
                "from_state": "pending",
                "to_state": "running" if active else "completed",
                "data": {"synthetic": True},
                "actor": "bench",
                "created_at": created_at,
            }
        ],
    }


def offer(rate: int, seconds: float, sagas: list[str], versions: dict[str, int]) -> None:
    """Publish `rate` changes a second for `seconds`: one in ten to the watched saga (the first),
    the rest round robin over the others. `versions` holds each saga's last version."""
    created = datetime.now(UTC).isoformat()
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        ahead = start + i / rate - time.perf_counter()
        if ahead > 0:  # stay on schedule: sleep only when ahead of it
            time.sleep(ahead)
        saga_id = sagas[0] if i % 10 == 0 else sagas[1 + i % (len(sagas) - 1)]
        versions[saga_id] = versions.get(saga_id, 0) + 1
        feed.publisher.put(synthetic_delta(saga_id, versions[saga_id], created))


def run(*, rates: list[int], seconds: float, sagas: int, port: int, out) -> list[dict]:
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.backends.db import SessionStore
    from playwright.sync_api import sync_playwright

    from orchestration import engine
    from orchestration.models import Saga

    user, _ = get_user_model().objects.get_or_create(username="feedbench", defaults={"is_staff": True})
    session = SessionStore()
    session["_auth_user_id"] = str(user.pk)
    session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
    session["_auth_user_hash"] = user.get_session_auth_hash()
    session.create()

    # The watched saga exists (the dashboard watches only real sagas); no worker runs it, so
    # only the synthetic changes move it.
    watched = str(uuid.uuid4())
    engine.saga_start(saga_id=watched, definition=PLACE_ORDER.name, context={"order_id": None})

    env = {**os.environ, "SAGA_EMBEDDED_WORKER": "false", "LOG_LEVEL": "WARNING"}
    server = Process("web", serve_command(port=port), env=env, log_path=None).start()
    results: list[dict] = []
    versions = {watched: Saga.objects.using("default").get(id=watched).version}
    try:
        server.wait_until(lambda: answers(f"http://127.0.0.1:{port}"), timeout=30, message="the server to start")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context()
            context.add_cookies(
                [
                    {
                        "name": settings.SESSION_COOKIE_NAME,
                        "value": session.session_key or "",  # set by create()
                        "url": f"http://127.0.0.1:{port}",
                    }
                ]
            )
            context.add_init_script(PROBE)
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/dashboard/#saga={watched}")
            page.wait_for_function("window.dashboard && window.dashboard.connected", timeout=15000)
            page.evaluate("id => window.dashboard.select(id)", watched)
            time.sleep(1)
            for rate in rates:
                # The watched saga's versions carry on from run to run (they only go up).
                versions = {watched: versions[watched]}
                results.append(_measure(page, rate, seconds, sagas, watched, versions, out))
            browser.close()
    finally:
        server.stop(timeout=10)
    return results


def _measure(page, rate: int, seconds: float, saga_count: int, watched: str, versions: dict, out) -> dict:
    page.evaluate("() => { const p = window.__probe; p.messages = 0; p.bytes = 0; p.rows = []; p.nodes = []; }")
    sagas = [watched] + [str(uuid.uuid4()) for _ in range(min(saga_count, max(10, rate // 10)))]
    sent_before = feed.publisher.sent_batches
    started = time.perf_counter()
    offer(rate, seconds, sagas, versions)
    offered_for = time.perf_counter() - started
    # How long after the last change every saga's final state is on screen (at most 30 s).
    stopped = time.perf_counter()
    while True:
        probe = page.evaluate("() => window.__probe")
        arrived = sum(1 for s, v in versions.items() if probe["latest"].get(s, 0) >= v)
        if arrived == len(versions) or time.perf_counter() - stopped > 30:
            break
        time.sleep(0.1)
    settled_after = time.perf_counter() - stopped
    events = int(rate * seconds)
    result = {
        "offered_per_s": rate,
        "published_per_s": round(events / offered_for),
        "batches": feed.publisher.sent_batches - sent_before,
        "ws_messages_per_s": round(probe["messages"] / seconds, 1),
        "ws_kib_per_s": round(probe["bytes"] / 1024 / seconds, 1),
        "rows_applied_per_s": round(len(probe["rows"]) / seconds, 1),
        "final_state_arrived": f"{arrived}/{len(versions)}",
        "final_state_after_s": round(settled_after, 2),
        "row_delay_ms": {f"p{p}": _round(percentile(probe["rows"], p)) for p in (50, 95)},
        "node_delay_ms": {f"p{p}": _round(percentile(probe["nodes"], p)) for p in (50, 95)},
    }
    out.write(
        f"{rate:>6} ev/s offered: published {result['published_per_s']}/s in {result['batches']} batches; "
        f"browser got {result['ws_messages_per_s']} msg/s ({result['ws_kib_per_s']} KiB/s), "
        f"{result['rows_applied_per_s']} row updates/s; final state {result['final_state_arrived']} "
        f"({result['final_state_after_s']} s after the last change); "
        f"commit->row p50 {result['row_delay_ms']['p50']} ms p95 {result['row_delay_ms']['p95']} ms; "
        f"commit->node p50 {result['node_delay_ms']['p50']} ms p95 {result['node_delay_ms']['p95']} ms\n"
    )
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
