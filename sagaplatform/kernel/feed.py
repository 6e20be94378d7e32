"""The live feed's plumbing, shared by every live page: publishing committed changes to the
channel layer, and the websocket consumer base that coalesces and heals them.

Publishing: `publisher.put(delta)` (called from an `on_commit` hook) hands a change to this
process's publisher thread, which batches what arrived in the last FEED_BATCH_SECONDS, keeps
only the latest state of each saga, and sends:

* one message to the `sagas` group with the headers (what the dashboard's list needs);
* a message to `saga.<id>` with the steps and new events of each saga someone watches (the
  dashboard's selected saga, a customer's order page). Watchers mark the saga in the cache
  (`watch()`), so the publisher sends nothing for the thousands of sagas no one looks at.

Nothing here is needed for correctness: a lost message (a worker killed within the batch window,
channels_redis dropping a message for a full channel) is healed by the consumers, which
reconcile with the database every FEED_RECONCILE_SECONDS. The engine never waits for the feed.

With the in-memory channel layer (the embedded mode) the layer lives on the server's event loop,
so sends are scheduled there (`asyncio.run_coroutine_threadsafe`); a send from another loop
would be lost (measured: 0-7 of 20 delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)

SAGAS_GROUP = "sagas"
WATCH_KEY = "feed:watch:{}"
# How long a watch mark lasts without being renewed (consumers renew it at every reconcile).
WATCH_TTL = 60


def saga_group(saga_id: uuid.UUID | str) -> str:
    return f"saga.{saga_id}"


def now_ms() -> float:
    return time.time() * 1000


def merge(deltas: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keep the latest header and steps of each saga and every event, in order."""
    merged: dict[str, dict[str, Any]] = {}
    for delta in deltas:
        saga_id = delta["saga"]["id"]
        previous = merged.get(saga_id)
        if previous is None or delta["saga"]["version"] >= previous["saga"]["version"]:
            events = (previous["events"] if previous else []) + delta["events"]
            merged[saga_id] = {**delta, "events": events}
        else:
            previous["events"] = sorted(previous["events"] + delta["events"], key=lambda e: e["seq"])
    return merged


def watch(saga_id: uuid.UUID | str) -> None:
    """Ask publishers to send this saga's details (renew within WATCH_TTL)."""
    cache.set(WATCH_KEY.format(saga_id), 1, timeout=WATCH_TTL)


def watched(saga_ids: Iterable[str]) -> set[str]:
    keys = {WATCH_KEY.format(i): i for i in saga_ids}
    return {keys[k] for k in cache.get_many(list(keys))}


class Publisher:
    """A thread per process that batches committed changes and sends them to the channel layer."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.server_loop: asyncio.AbstractEventLoop | None = None
        self.sent_batches = 0

    def put(self, delta: dict[str, Any]) -> None:
        delta["saga"]["committed_at"] = now_ms()
        self._ensure_thread()
        self._queue.put(delta)

    def attach_server_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The embedded mode: the in-memory layer must be used from the loop that serves it."""
        self.server_loop = loop

    def _ensure_thread(self) -> None:
        # After a fork (Celery's prefork pool) the parent's thread does not exist in the child.
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="saga-feed", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        while True:
            batch = [self._queue.get()]
            time.sleep(settings.FEED_BATCH_SECONDS)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.send(merge(batch), loop=loop)
            except Exception:  # the feed must never take anything down with it
                logger.exception("live feed: could not send %d changes", len(batch))

    def send(self, merged: dict[str, dict[str, Any]], *, loop: asyncio.AbstractEventLoop) -> None:
        layer = get_channel_layer()
        if layer is None or not merged:
            return
        details = {i: merged[i] for i in watched(merged)}
        coro = _send_all(layer, merged, details)
        if isinstance(layer, InMemoryChannelLayer):
            if self.server_loop is None or self.server_loop.is_closed():
                coro.close()  # no websocket has connected to this process: no one to tell
                return
            asyncio.run_coroutine_threadsafe(coro, self.server_loop).result(timeout=10)
        else:
            loop.run_until_complete(coro)
        self.sent_batches += 1


async def _send_all(layer: Any, merged: dict[str, dict[str, Any]], details: dict[str, dict[str, Any]]) -> None:
    await layer.group_send(SAGAS_GROUP, {"type": "feed.headers", "headers": [d["saga"] for d in merged.values()]})
    for saga_id, delta in details.items():
        await layer.group_send(saga_group(saga_id), {"type": "feed.detail", "delta": delta})


publisher = Publisher()


class FeedConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]  # channels has no types
    """What both live pages share: the checks on connect, the flush and reconcile loops."""

    async def connect(self) -> None:
        # The in-memory layer (embedded mode) must be used from this loop; see live.py.
        publisher.attach_server_loop(asyncio.get_running_loop())
        self.tasks: list[asyncio.Task[None]] = []
        self.groups_joined: set[str] = set()
        user = self.scope.get("user")
        # Accept then close, so the browser sees why (a refused handshake carries no code).
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        if not await self.allowed(user):
            await self.close(code=self.refused_code)
            return
        await self.start()
        self.tasks.append(asyncio.create_task(self._loop(settings.FEED_FLUSH_SECONDS, self.flush)))
        self.tasks.append(asyncio.create_task(self._loop(settings.FEED_RECONCILE_SECONDS, self.reconcile)))

    refused_code = 4403

    async def allowed(self, user: Any) -> bool:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError

    async def reconcile(self) -> None:
        raise NotImplementedError

    async def join(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.add(group)

    async def leave(self, group: str) -> None:
        await self.channel_layer.group_discard(group, self.channel_name)
        self.groups_joined.discard(group)

    async def disconnect(self, code: int) -> None:
        for task in self.tasks:
            task.cancel()
        for group in list(self.groups_joined):
            await self.leave(group)

    async def _loop(self, every: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad tick must not end the feed
                logger.exception("live feed: %s failed", work.__name__)

    async def send_json(self, content: Any, close: bool = False) -> None:
        with contextlib.suppress(Exception):  # the socket closed under us
            await super().send_json(content, close=close)
