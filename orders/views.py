"""The customer's pages: their orders, a form to place one, an order's live progress, cancelling.

Plain server-rendered HTML that works without JavaScript; `static/js/order.js` makes the order
page live (the `/ws/orders/<id>/` websocket, docs/LIVE_FEED.md) and cancels through the REST API.
The pages write only through the same functions the API uses (`services.order_place` and
`services.order_cancel`) and validate input with the API's own serializer, so a rule cannot differ
between the two.
"""

from __future__ import annotations

import time
import uuid

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_countries import countries

from sagaplatform.api import ApiError
from sagaplatform.kernel import ports

from . import selectors, services
from .apis import MAX_QUANTITY, OrdersApi, place_validated
from .exceptions import IdempotencyKeyInFlight, IdempotencyKeyReused
from .live import order_state
from .models import Order

# The simulated card network's test cards (payments/gateway.py).
TEST_CARDS = [
    ("tok_visa", "Test card: always accepted"),
    ("tok_declined", "Test card: declined"),
    ("tok_flaky_2", "Test card: fails twice (network error), then accepted"),
    ("tok_hang", "Test card: hangs past the step timeout, then accepted"),
]

# Customer-facing names of the saga's action steps. The failure path (reject_order,
# notify_failure) is not shown: the order's status and message say what happened.
STEP_LABELS = {
    "reserve_stock": "Reserve the items",
    "charge_payment": "Take payment",
    "approve_order": "Approve the order",
    "schedule_shipment": "Book the delivery",
    "dispatch_shipment": "Parcel leaves the warehouse",
    "commit_stock": "Update stock",
    "mark_shipped": "Mark as shipped",
    "notify_customer": "Send the confirmation e-mail",
}
STEP_STATE_LABELS = {
    "pending": "waiting",
    "running": "in progress",
    "retrying": "retrying",
    "succeeded": "done",
    "failed": "failed",
    "compensating": "undoing",
    "compensated": "undone",
    # Compensated without having taken effect (orders/live.py: shown_state).
    "not_done": "did not go through",
    "compensation_failed": "undo failed, we are on it",
    "skipped": "skipped",
    "confirming": "confirming",
    "confirmed": "done",
    "confirm_failed": "confirming failed, we are on it",
    # Shown instead of "waiting" once the order has ended without reaching the step.
    "not_started": "not needed",
}
STATUS_LABELS = {
    "pending": "Processing",
    "approved": "Approved",
    "shipped": "Shipped",
    "rejected": "Not placed",
    "cancelled": "Cancelled",
}
# What the page says about the order, by situation (order.js picks the same situations).
NOTES = {
    "pending": "We are reserving your items and taking payment.",
    "approved": "Payment taken. Your parcel is being prepared: you can cancel until it leaves the warehouse.",
    "leaving": "Your parcel is leaving the warehouse, so this order can no longer be cancelled.",
    "confirmed": "Your order is confirmed: every service has agreed.",
    "shipped": "Your parcel has left the warehouse, so this order can no longer be cancelled.",
    "undoing": "Stopping the order: what was done is being undone (stock released, payment refunded).",
    "rejected": "This order did not go through. Any stock reserved for it was released and any payment refunded.",
    "cancelled": "This order is cancelled. The stock reserved for it was released and any payment refunded.",
}
STEP_DONE = {"succeeded", "confirmed", "skipped"}
ORDER_RECEIVED = "We have received your order. Its progress shows below as it happens."
# Everything order.js needs to word the page as the server does.
LABELS = {
    "steps": STEP_LABELS,
    "states": STEP_STATE_LABELS,
    "statuses": STATUS_LABELS,
    "notes": NOTES,
    "requested": "Cancellation requested. What was done is being undone (stock released, payment refunded); "
    "this page shows when it is complete.",
    "refused_shipped": "Not cancelled: your parcel has already left the warehouse, so this order can no longer be "
    "cancelled.",
}


def situation(state: dict) -> str:
    order, saga = state["order"], state["saga"] or {}
    if saga.get("state") == "compensating":
        return "undoing"
    if order["status"] == Order.Status.APPROVED and not order["can_cancel"]:
        return "confirmed" if saga.get("state") == "completed" else "leaving"
    return order["status"]


def progress(state: dict) -> dict:
    """What the progress bar shows (order.js computes the same from each websocket message)."""
    steps = (state["saga"] or {}).get("steps", [])
    total = len(steps)
    done = sum(1 for s in steps if s["state"] in STEP_DONE)
    status = state["order"]["status"]
    if (
        status in (Order.Status.REJECTED, Order.Status.CANCELLED)
        and (state["saga"] or {}).get("state") != "compensating"
    ):
        tone, value, text = "stopped", total, STATUS_LABELS[status]
    elif (state["saga"] or {}).get("state") == "compensating":
        tone, value, text = "undoing", done, f"Undoing: {done} of {total} steps still to undo"
    elif not total:
        tone, value, text = "active", 0, "Starting…"
    else:
        tone, value, text = ("done" if done == total else "active"), done, f"{done} of {total} steps done"
    return {
        "total": total,
        "value": value,
        "percent": round(100 * value / total) if total else 0,
        "tone": tone,
        "text": text,
    }


def refusal_message(refusal: ApiError, order: Order) -> str:
    """A refused cancel, in the customer's words. A completed saga answers `not_cancellable`;
    for the customer what matters is that the parcel has left."""
    if refusal.code == "already_shipped" or order.status == Order.Status.SHIPPED:
        return LABELS["refused_shipped"]
    return f"Not cancelled: {refusal.message}."


# --- Pages ------------------------------------------------------------------------------------


@login_required
def order_list(request):
    orders = list(selectors.order_list_for_customer(customer_id=request.user.id)[:100])
    for order in orders:
        order.status_label = STATUS_LABELS.get(order.status, order.status)
    return render(request, "orders/list.html", {"orders": orders})


@login_required
def order_detail(request, order_id):
    order = selectors.order_get_for_customer(order_id=order_id, customer_id=request.user.id)
    if order is None:
        raise Http404("No such order")
    state = order_state(order, ports.saga_summary(order.saga_id))
    names = {p.sku: p.name for p in selectors.product_list()}
    lines = list(order.lines.all())
    for line in lines:
        line.subtotal = line.unit_price * line.quantity
        line.name = names.get(line.sku, line.sku)
    steps = [
        {
            **step,
            "label": STEP_LABELS.get(step["name"], step["name"].replace("_", " ").capitalize()),
            "state_label": STEP_STATE_LABELS.get(step["shown"], step["shown"]),
            "in_progress": step["state"] in ("running", "retrying"),
        }
        for step in (state["saga"] or {}).get("steps", [])
    ]
    return render(
        request,
        "orders/detail.html",
        {
            "order": order,
            "lines": lines,
            "state": state,
            "steps": steps,
            "progress": progress(state),
            "status_label": STATUS_LABELS.get(order.status, order.status),
            "note": NOTES.get(situation(state), ""),
            "labels": LABELS,
            "ws_path": f"/ws/orders/{order.id}/",
        },
    )


@login_required
@require_POST
def order_cancel(request, order_id):
    """The no-JavaScript cancel (the page's script posts to the REST API instead)."""
    order = selectors.order_get_for_customer(order_id=order_id, customer_id=request.user.id)
    if order is None:
        raise Http404("No such order")
    try:
        services.order_cancel(
            order=order, actor=f"customer:{request.user.get_username()}", reason=request.POST.get("reason", "")[:500]
        )
    except ApiError as refusal:  # 409: already shipped, leaving now, already cancelled, ended
        messages.error(request, refusal_message(refusal, selectors.order_get(order_id=order.id)))
    else:
        messages.success(request, LABELS["requested"])
    return redirect("order_pages:detail", order_id=order.id)


# --- Placing an order -------------------------------------------------------------------------


def _country_choices() -> list[tuple[str, str]]:
    return [("", "Choose a country"), *((code, name) for code, name in countries)]


class CountryChoiceField(forms.ChoiceField):
    """An ISO 3166-1 alpha-2 code, as the API takes it (capitals), whatever case was posted."""

    def to_python(self, value) -> str:
        return super().to_python(value).strip().upper()


class OrderForm(forms.Form):
    """The HTML side of `POST /api/orders/`: one quantity per product, a card, an address, a
    style. The body it builds is validated by the API's serializer (`OrdersApi.InputSerializer`)."""

    token = forms.ChoiceField(label="Card", choices=TEST_CARDS, initial="tok_visa")
    name = forms.CharField(label="Full name", max_length=200)
    line1 = forms.CharField(label="Address", max_length=200)
    line2 = forms.CharField(label="Address line 2", max_length=200, required=False)
    city = forms.CharField(label="City", max_length=100)
    postal_code = forms.CharField(label="Postal code", max_length=20)
    # A choice, not a two-letter box: a box cut "Germany" to "GE" (Georgia) without a word.
    country = CountryChoiceField(label="Country", choices=_country_choices)
    phone = forms.CharField(
        label="Mobile phone", required=False, max_length=16, help_text="For SMS updates, for example +33612345678."
    )
    mode = forms.ChoiceField(label="How the order runs", choices=Order.Mode.choices, initial=Order.Mode.ORCHESTRATED)
    # The form's own key, also in its URL (`/orders/new/<key>/`): submitting the same form twice
    # (a double click, a resubmit after a timeout, Back then submit again) places one order.
    idempotency_key = forms.CharField(widget=forms.HiddenInput, max_length=255)

    ADDRESS_FIELDS = ("name", "line1", "line2", "city", "postal_code", "country", "phone")

    def __init__(self, *args, products, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.products = products
        for product in products:
            self.fields[self.quantity_field(product.sku)] = forms.IntegerField(
                label=f"Quantity of {product.name}",
                min_value=0,
                # Not capped by the stock shown: it is a hint, and the saga's reservation decides
                # (ordering more than there is ends as a rejected order, stock untouched).
                max_value=MAX_QUANTITY,
                initial=0,
                required=False,
            )

    @staticmethod
    def quantity_field(sku: str) -> str:
        return f"qty_{sku}"

    def product_rows(self):
        return [(product, self[self.quantity_field(product.sku)]) for product in self.products]

    def clean(self):
        cleaned = super().clean()
        # A product withdrawn since the form was rendered has no field any more: say so rather
        # than place the order without it.
        withdrawn = sorted(
            key.removeprefix("qty_")
            for key, value in self.data.items()
            if key.startswith("qty_") and key not in self.fields and value.strip() not in ("", "0")
        )
        if withdrawn:
            raise forms.ValidationError(
                f"No longer sold, so removed from the form: {', '.join(withdrawn)}. Check your order and submit again."
            )
        quantities_valid = not any(self.quantity_field(p.sku) in self.errors for p in self.products)
        if quantities_valid and not self.items():
            raise forms.ValidationError("Choose at least one product (a quantity of 1 or more).")
        return cleaned

    def items(self) -> list[dict]:
        return [
            {"sku": p.sku, "quantity": self.cleaned_data.get(self.quantity_field(p.sku)) or 0}
            for p in self.products
            if self.cleaned_data.get(self.quantity_field(p.sku))
        ]

    def api_body(self) -> dict:
        data = self.cleaned_data
        address = {k: data[k] for k in self.ADDRESS_FIELDS if data.get(k)}
        return {
            "items": self.items(),
            "payment": {"token": data["token"]},
            "shipping_address": address,
            "mode": data["mode"],
        }

    def add_api_errors(self, errors: dict) -> None:
        """Put the serializer's errors on the fields they concern."""
        for key, value in errors.items():
            if key == "payment":
                self._add_nested(value, lambda name: "token")
            elif key == "shipping_address":
                self._add_nested(value, lambda name: name if name in self.fields else None)
            elif key == "mode":
                self.add_error("mode", _flatten(value))
            else:
                self.add_error(None, _flatten(value))

    def _add_nested(self, value, field_for) -> None:
        if isinstance(value, dict):
            for name, detail in value.items():
                self.add_error(field_for(name), _flatten(detail))
        else:
            self.add_error(None, _flatten(value))


def _flatten(detail) -> list[str]:
    if isinstance(detail, dict):
        return [m for v in detail.values() for m in _flatten(v)]
    if isinstance(detail, list):
        return [m for v in detail for m in _flatten(v)]
    return [str(detail)]


def _catalogue() -> list:
    """Active products with what is available now. The page reads the inventory service's
    stock levels, through the kernel's port, for display only (a hint: the saga's reservation
    is what decides)."""
    available = ports.stock_available()
    products = list(selectors.product_list())
    for product in products:
        product.available = available.get(product.sku, 0)
    return products


@login_required
def order_new(request, form_key: uuid.UUID | None = None):
    if request.method == "GET" and form_key is None:
        # Each form gets its own address, so the history entry that Back returns to renders the
        # same key again (a page rendered afresh with a new key would place a second order).
        return redirect("order_pages:new_keyed", form_key=uuid.uuid4())
    products = _catalogue()
    status = 200
    placed = None
    if request.method == "POST":
        form = OrderForm(request.POST, products=products)
        if form.is_valid():
            serializer = OrdersApi.InputSerializer(data=form.api_body())
            if not serializer.is_valid():
                form.add_api_errors(serializer.errors)
                status = 400
            else:
                try:
                    placement = _place(request, form.cleaned_data["idempotency_key"], serializer.validated_data)
                except IdempotencyKeyReused:
                    form = _fresh(form, products)
                    form.add_error(
                        None,
                        "This form was already used to place a different order. "
                        "Check the details and submit again to place a new one.",
                    )
                    status = 422
                except ApiError as refusal:  # unknown product, total too large, key in flight
                    form.add_error(None, refusal.message)
                    status = refusal.status
                else:
                    if placement.replayed:
                        messages.info(request, "This order was already placed: here it is.")
                    else:
                        # Not "placed", and not green: the order may yet be declined.
                        messages.info(request, ORDER_RECEIVED)
                    return redirect("order_pages:detail", order_id=placement.order.id)
        else:
            status = 400
    else:
        form = OrderForm(
            products=products,
            initial={"idempotency_key": form_key.hex, "name": request.user.get_full_name()},
        )
        placed = selectors.order_for_idempotency_key(customer_id=request.user.id, key=form_key.hex)
    key = _as_uuid(form["idempotency_key"].value() or "")
    action = reverse("order_pages:new_keyed", args=[key]) if key else reverse("order_pages:new")
    return render(request, "orders/new.html", {"form": form, "action": action, "placed": placed}, status=status)


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


# A double click sends the second submit while the first is being processed. An API client is
# told 409 and retries; a browser shows only the last answer, so the page waits for the first
# request to commit (milliseconds) and then answers with its order.
IN_FLIGHT_WAIT_SECONDS = 3.0
IN_FLIGHT_POLL_SECONDS = 0.05


def _place(request, idempotency_key: str, data: dict) -> services.Placement:
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while True:
        try:
            return place_validated(user=request.user, data=data, idempotency_key=idempotency_key)
        except IdempotencyKeyInFlight:
            if time.monotonic() >= deadline:
                raise
            time.sleep(IN_FLIGHT_POLL_SECONDS)


def _fresh(form: OrderForm, products) -> OrderForm:
    """The same answers with a new idempotency key: the next submit is a new order."""
    data = form.data.copy()
    data["idempotency_key"] = uuid.uuid4().hex
    fresh = OrderForm(data, products=products)
    fresh.is_valid()
    return fresh
