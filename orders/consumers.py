"""The customer order page's websocket: one order, its owner only (docs/LIVE_FEED.md).

It listens to the order's saga on the live feed and, at most every FEED_FLUSH_SECONDS, re-reads
the order (its status is the orders service's) and sends the page what it shows. Every
FEED_RECONCILE_SECONDS it also re-reads both, so a lost feed message only delays the page.
"""

from __future__ import annotations

import uuid

from channels.db import database_sync_to_async

from sagaplatform.kernel import feed, ports
from sagaplatform.kernel.feed import FeedConsumer

from . import selectors
from .live import order_state


class OrderConsumer(FeedConsumer):
    refused_code = 4404  # someone else's order looks like no order at all

    async def allowed(self, user) -> bool:
        try:
            order_id = uuid.UUID(str(self.scope["url_route"]["kwargs"]["order_id"]))
        except ValueError:
            return False
        self.order = await database_sync_to_async(selectors.order_get_for_customer)(
            order_id=order_id, customer_id=user.pk
        )
        return self.order is not None

    async def start(self) -> None:
        self.saga: dict | None = None
        self.changed = False
        self.last_sent: dict | None = None
        self.group = feed.saga_group(self.order.saga_id)
        await database_sync_to_async(feed.watch)(self.order.saga_id)
        await self.join(self.group)
        await self.reconcile()

    async def feed_detail(self, event):
        delta = event["delta"]
        if self.saga is None or delta["saga"]["version"] > self.saga.get("version", -1):
            self.saga = {**delta["saga"], "steps": delta["steps"]}
            self.changed = True

    async def flush(self) -> None:
        if self.changed:
            self.changed = False
            await self.send_state(await database_sync_to_async(self._read_order)())

    async def reconcile(self) -> None:
        await database_sync_to_async(feed.watch)(self.order.saga_id)
        order, summary = await database_sync_to_async(self._read_both)()
        if summary is not None and (self.saga is None or summary["version"] >= self.saga.get("version", -1)):
            self.saga = summary
        await self.send_state(order)

    def _read_order(self):
        return selectors.order_get(order_id=self.order.id)

    def _read_both(self):
        return self._read_order(), ports.saga_summary(self.order.saga_id)

    async def send_state(self, order) -> None:
        state = order_state(order, self.saga)
        if state != self.last_sent:
            self.last_sent = state
            await self.send_json(state)
