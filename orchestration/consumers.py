"""The operator dashboard's websocket (protocol: docs/LIVE_FEED.md).

A connection joins the `sagas` group (every saga's header) and, for the saga the operator has
selected, that saga's group (its steps and events). What arrives is coalesced per saga and sent
at most every FEED_FLUSH_SECONDS, so a burst of thousands of changes a second costs the browser
ten messages a second. Every FEED_RECONCILE_SECONDS the consumer compares the versions it sent
with the database and sends what it missed: the feed may drop messages, the final state is
never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime, timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Prefetch

from sagaplatform.api import ApiError, operator_actor
from sagaplatform.kernel import feed, ports
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.feed import FeedConsumer, now_ms

from . import engine, live, overview
from .definitions import DEFINITIONS
from .exceptions import OperationNotAllowed
from .models import Saga, SagaStep
from .permissions import OPERATE

logger = logging.getLogger(__name__)

DB = "default"
SNAPSHOT_RECENT = 200
SNAPSHOT_OPEN = 500
SENT_MEMORY = 5000
OVERVIEW_SECONDS = 2.0
ACTIONS = ("cancel", "retry", "skip")


@database_sync_to_async
def _fresh_user(user_id):
    return get_user_model().objects.filter(pk=user_id, is_active=True).first()


def _headers(sagas, now) -> list[dict]:
    return [live.saga_header(s, s.steps.all(), now=now) for s in sagas]


def _with_steps(queryset):
    return queryset.prefetch_related(Prefetch("steps", queryset=SagaStep.objects.using(DB).all()))


class DashboardConsumer(FeedConsumer):
    async def allowed(self, user) -> bool:
        return user.is_active and user.is_staff

    async def start(self) -> None:
        self.pending: dict[str, dict] = {}
        # Saga id -> the version the client has; negated once the saga ended (nothing to follow).
        self.sent: dict[str, int] = {}
        self.reconciled_at = None
        self.headers_due = 0.0
        self.watching: str | None = None
        self.detail: dict | None = None  # the watched saga's changes not yet sent
        self.detail_version = 0
        user = self.scope["user"]
        await self.send_json(
            {
                "type": "hello",
                "user": user.get_username(),
                "can_operate": await database_sync_to_async(user.has_perm)(OPERATE),
                "definitions": {name: live.definition_graph(d) for name, d in DEFINITIONS.items()},
                "server_time": await database_sync_to_async(lambda: db_now(DB).isoformat())(),
            }
        )
        await self.join(feed.SAGAS_GROUP)
        await self.send_snapshot()
        await self.send_overview()
        self.tasks.append(asyncio.create_task(self._loop(OVERVIEW_SECONDS, self.send_overview)))

    # --- from the channel layer ---

    async def feed_headers(self, event):
        for header in event["headers"]:
            known = self.pending.get(header["id"])
            if known is None or header["version"] > known["version"]:
                self.pending[header["id"]] = header

    async def feed_detail(self, event):
        delta = event["delta"]
        if delta["saga"]["id"] != self.watching or delta["saga"]["version"] <= self.detail_version:
            return
        # Batches from several workers may arrive out of order: keep the newest header.
        self.detail = delta if self.detail is None else feed.merge([self.detail, delta])[self.watching]

    async def flush(self) -> None:
        now = time.monotonic()
        if self.pending and now >= self.headers_due:
            headers, self.pending = list(self.pending.values()), {}
            self.remember(headers)
            # A browser applies a few thousand rows a second: send no faster than that, so it
            # never falls behind (the rows waiting meanwhile coalesce to their latest version).
            self.headers_due = now + len(headers) / settings.FEED_MAX_ROWS_PER_SECOND
            await self.send_json({"type": "sagas", "sagas": headers, "sent_at": now_ms()})
        if self.detail is not None:
            detail, self.detail = self.detail, None
            # Events the client has not had (the seq is the saga's version at that event), once.
            events = sorted(
                {e["seq"]: e for e in detail["events"] if e["seq"] > self.detail_version}.values(),
                key=lambda e: e["seq"],
            )
            if events and events[0]["seq"] != self.detail_version + 1:
                # An earlier change was lost (a dropped message) or is late (another worker's
                # batch): every version has its event, so read what is missing from the database.
                await self.send_detail(full=False)
                return
            self.detail_version = max(self.detail_version, detail["saga"]["version"])
            await self.send_json({"type": "saga", "full": False, **detail, "events": events, "sent_at": now_ms()})

    async def reconcile(self) -> None:
        if self.watching:
            await database_sync_to_async(feed.watch)(self.watching)
        missed, watched_version = await database_sync_to_async(self._missed)()
        for header in missed:
            known = self.pending.get(header["id"])
            if known is None or header["version"] > known["version"]:
                self.pending[header["id"]] = header
        if self.watching and watched_version is not None and watched_version > self.detail_version:
            await self.send_detail(full=False)

    def _missed(self) -> tuple[list[dict], int | None]:
        """Headers the client lacks, at a newer version than it has: open sagas, the sagas it
        believes open, and those that finished since the last look (with a margin for
        transactions that committed late)."""
        now = db_now(DB)
        since = self.reconciled_at - timedelta(seconds=max(5.0, 2 * settings.FEED_RECONCILE_SECONDS))
        self.reconciled_at = now
        sagas = Saga.objects.using(DB).order_by()
        rows = dict(sagas.exclude(state__in=Saga.TERMINAL_STATES).values_list("id", "version")[:SNAPSHOT_OPEN])
        rows.update(sagas.filter(finished_at__gte=since).values_list("id", "version")[:SNAPSHOT_OPEN])
        open_ids = [i for i, v in self.sent.items() if v >= 0]
        rows.update(sagas.filter(id__in=open_ids).values_list("id", "version"))
        watched_version = None
        if self.watching:
            watched_version = sagas.filter(id=self.watching).values_list("version", flat=True).first()
        stale = [
            i
            for i, version in rows.items()
            if abs(self.sent.get(str(i), 0)) < version
            and (str(i) not in self.pending or self.pending[str(i)]["version"] < version)
        ]
        if not stale:
            return [], watched_version
        return _headers(_with_steps(sagas.filter(id__in=stale[:SNAPSHOT_OPEN])), now), watched_version

    # --- from the browser ---

    async def receive_json(self, content, **kwargs):
        if not isinstance(content, dict) or not isinstance(content.get("action"), str):
            await self.send_json({"type": "error", "code": "bad_message", "message": 'Expected {"action": ...}.'})
            return
        action = content["action"]
        if action == "snapshot":
            await self.send_snapshot()
        elif action == "watch":
            await self.watch(content.get("saga"))
        elif action in ACTIONS:
            await self.act(action, content)
        else:
            await self.send_json({"type": "error", "code": "unknown_action", "message": f"Unknown action {action!r}."})

    async def send_snapshot(self) -> None:
        headers, self.reconciled_at = await database_sync_to_async(self._snapshot)()
        self.pending.clear()
        self.sent = {}
        self.remember(headers)
        await self.send_json({"type": "snapshot", "sagas": headers, "sent_at": now_ms()})

    def remember(self, headers: list[dict]) -> None:
        for h in headers:
            self.sent[h["id"]] = -h["version"] if h["state"] in Saga.TERMINAL_STATES else h["version"]
        if len(self.sent) > SENT_MEMORY:  # forget the oldest ended sagas
            ended = [i for i, v in self.sent.items() if v < 0]
            for saga_id in ended[: len(self.sent) - SENT_MEMORY]:
                del self.sent[saga_id]

    def _snapshot(self) -> tuple[list[dict], datetime]:
        now = db_now(DB)
        sagas = Saga.objects.using(DB).order_by("-created_at")
        open_ids = list(sagas.exclude(state__in=Saga.TERMINAL_STATES).values_list("id", flat=True)[:SNAPSHOT_OPEN])
        recent_ids = list(sagas.values_list("id", flat=True)[:SNAPSHOT_RECENT])
        return _headers(_with_steps(sagas.filter(id__in={*open_ids, *recent_ids})), now), now

    async def watch(self, saga_id) -> None:
        if self.watching:
            await self.leave(feed.saga_group(self.watching))
        self.watching, self.detail, self.detail_version = None, None, 0
        if not saga_id:
            return
        saga_id = str(saga_id)
        if not await database_sync_to_async(Saga.objects.using(DB).filter(id=_uuid_or_none(saga_id)).exists)():
            await self.send_json({"type": "error", "code": "not_found", "message": "No such saga."})
            return
        # Mark, join, then read: a change committed after the read arrives through the group.
        self.watching = saga_id
        await database_sync_to_async(feed.watch)(saga_id)
        await self.join(feed.saga_group(saga_id))
        await self.send_detail(full=True)

    async def send_detail(self, *, full: bool) -> None:
        """The watched saga from the database: all of it, or the events the client lacks."""
        detail = await database_sync_to_async(self._detail)(self.watching, 0 if full else self.detail_version)
        if detail is None:
            return
        version = detail["saga"]["version"]
        # The feed kept arriving (and flushing) during the read: send no event twice, and keep
        # the changes that committed after the read for the next flush.
        if not full:
            if version <= self.detail_version:
                return
            detail["events"] = [e for e in detail["events"] if e["seq"] > self.detail_version]
        if self.detail is not None and self.detail["saga"]["version"] <= version:
            self.detail = None
        self.detail_version = max(self.detail_version, version)
        await self.send_json({"type": "saga", "full": full, **detail, "sent_at": now_ms()})

    @staticmethod
    def _detail(saga_id, events_after: int) -> dict | None:
        saga = Saga.objects.using(DB).filter(id=saga_id).first()
        return live.saga_detail(saga, now=db_now(DB), events_after=events_after) if saga else None

    async def send_overview(self) -> None:
        await self.send_json({"type": "overview", **await database_sync_to_async(overview.overview)()})

    async def act(self, action: str, content: dict) -> None:
        request_id = content.get("request_id")
        saga_id = content.get("saga")
        reason = content.get("reason") or ""

        async def reply(ok: bool, code: str, message: str) -> None:
            await self.send_json(
                {
                    "type": "action_result",
                    "request_id": request_id,
                    "action": action,
                    "saga": saga_id,
                    "ok": ok,
                    "code": code,
                    "message": message,
                }
            )

        # The permission is checked again on every action: it may have been withdrawn since
        # the socket opened.
        user = await _fresh_user(self.scope["user"].pk)
        if user is None or not user.is_staff or not await database_sync_to_async(user.has_perm)(OPERATE):
            await reply(False, "permission_denied", "You may not operate sagas.")
            return
        if not isinstance(saga_id, str) or _uuid_or_none(saga_id) is None:
            await reply(False, "invalid", "A saga id is required.")
            return
        if not isinstance(reason, str) or len(reason) > 500:
            await reply(False, "invalid", "The reason must be text of at most 500 characters.")
            return
        if action == "skip" and not reason.strip():
            await reply(False, "reason_required", "Say why the compensation may be skipped.")
            return
        try:
            message = await database_sync_to_async(self._act)(
                action, saga_id, operator_actor(user), reason, content.get("step")
            )
        except ApiError as exc:
            await reply(False, exc.code, exc.message)
            return
        await reply(True, "accepted", message)

    @staticmethod
    def _act(action: str, saga_id: str, actor: str, reason: str, step: str | None) -> str:
        saga = Saga.objects.using(DB).filter(id=saga_id).first()
        if saga is None:
            raise OperationNotAllowed("not_found", "No such saga.")
        if action == "cancel":
            ports.saga_cancel(
                saga_id=saga.id, context=saga.context, actor=actor, reason=reason or "Cancelled by an operator"
            )
            return "Cancellation started: completed steps are being compensated."
        if action == "retry":
            engine.saga_retry(saga_id=saga.id, actor=actor, reason=reason)
            return "Retrying."
        if not step:
            step = (
                SagaStep.objects.using(DB)
                .filter(saga=saga, state=SagaStep.State.COMPENSATION_FAILED)
                .order_by("-position")
                .values_list("name", flat=True)
                .first()
            )
            if step is None:
                raise OperationNotAllowed("nothing_to_skip", "No compensation of this saga has failed.")
        engine.saga_skip(saga_id=saga.id, step_name=step, actor=actor, reason=reason)
        return f"Skipped the compensation of {step}."


def _uuid_or_none(value):
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None
