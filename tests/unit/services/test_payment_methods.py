"""The card token goes to payments alone, registered under an opaque reference; a charge that
comes first waits for it, and one whose reference never appears fails for good
(`payment_method_unknown`), compensated and recorded. Choreographed services receive only the
context keys their reaction declares."""

from __future__ import annotations

import uuid

import pytest
from cryptography.fernet import InvalidToken

from orchestration import definitions
from orchestration.models import Saga
from orders.models import Order
from payments import tasks as payment_tasks
from payments.models import Charge, PaymentMethod
from payments.services import payment_method_register
from sagaplatform.kernel import choreography, commands, sealing
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

REGISTER = "payments.register_payment_method"


def charge_message(reference: str, *, attempt: int = 1, saga_id=None) -> dict:
    return commands.Command(
        saga_id=saga_id or uuid.uuid4(),
        step="charge_payment",
        op="action",
        operation="charge",
        attempt=attempt,
        payload={"order_id": str(uuid.uuid4()), "amount": "25.00", "currency": "EUR", "payment_method": reference},
    ).to_message()


def test_a_charge_before_its_registration_is_retried_then_succeeds(broker):
    reference = f"pm_{uuid.uuid4().hex}"
    first = charge_message(reference)

    outcome = commands.execute(service="payments", message=first)

    assert (outcome["status"], outcome["error"]["code"]) == ("transient_error", "payment_method_pending")
    assert not Charge.objects.using("payments").exists()
    payment_tasks.register_payment_method({"reference": reference, "sealed_token": sealing.seal("tok_visa")})
    outcome = commands.execute(service="payments", message={**first, "attempt": 2})
    assert outcome["status"] == "succeeded"
    assert Charge.objects.using("payments").get().state == "captured"
    assert PaymentMethod.objects.using("payments").get(reference=reference).token == "tok_visa"


def test_a_reference_awaited_too_long_is_a_business_failure(broker, settings):
    settings.PAYMENT_METHOD_WAIT_SECONDS = 0.0

    outcome = commands.execute(service="payments", message=charge_message("pm_never"))

    assert (outcome["status"], outcome["error"]["code"]) == ("business_failure", "payment_method_unknown")
    assert outcome["error"]["details"] == {"payment_method": "pm_never"}
    assert not Charge.objects.using("payments").exists()


def test_a_registration_is_idempotent_and_needs_our_seal(broker):
    sealed = sealing.seal("tok_visa")
    payment_method_register(reference="pm_a", sealed_token=sealed)
    payment_method_register(reference="pm_a", sealed_token=sealing.seal("tok_declined"))  # a replay changes nothing

    assert list(PaymentMethod.objects.using("payments").values_list("reference", "token")) == [("pm_a", "tok_visa")]
    with pytest.raises(InvalidToken):
        payment_method_register(reference="pm_b", sealed_token="tok_visa")  # not sealed: refused
    assert not PaymentMethod.objects.using("payments").filter(reference="pm_b").exists()


@pytest.mark.parametrize("mode", ["orchestrated", "parallel", "tcc", "choreography"])
def test_a_registration_that_never_arrives_ends_as_payment_method_unknown(alice_api, catalogue, broker, mode):
    response = alice_api.post("/api/orders/", {**order_body(), "mode": mode}, format="json")
    receipt = response.json()
    assert len(broker.take(REGISTER)) == 1  # lost

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "compensated", saga.failure
    assert saga.failure["code"] == "payment_method_unknown"
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.failure_code) == ("rejected", "payment_method_unknown")
    assert not Charge.objects.using("payments").filter(state__in=["authorized", "captured"]).exists()
    detail = alice_api.get(receipt["url"]).json()
    assert detail["failure"]["code"] == "payment_method_unknown"


def test_a_malformed_token_is_still_a_400(alice_api, catalogue, broker):
    response = alice_api.post("/api/orders/", order_body(token="tok_visa; DROP"), format="json")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"
    assert "payment" in response.json()["details"]
    assert "tok_visa" not in response.content.decode()  # the answer does not echo it
    assert not broker.queue


def test_each_reaction_receives_only_its_declared_inputs(alice_api, catalogue, broker, monkeypatch):
    received = []
    real = choreography.get_operation

    def spying(service, name):
        fn = real(service, name)

        def wrapped(*, command):
            received.append((service, name, set(command.payload)))
            return fn(command=command)

        return wrapped

    monkeypatch.setattr(choreography, "get_operation", spying)
    for token in ("tok_visa", "tok_declined"):
        alice_api.post("/api/orders/", {**order_body(token=token), "mode": "choreography"}, format="json")
        broker.deliver()

    assert {(service, name) for service, name, _ in received} >= {
        ("inventory", "reserve"),
        ("payments", "charge"),
        ("inventory", "release"),
        ("orders", "reject"),
        ("notifications", "send_failure"),
        ("notifications", "send_confirmation"),
    }
    rules = {(r.service, r.operation): r for r in choreography.reactions()}
    for service, name, keys in received:
        assert keys <= {*rules[service, name].inputs, "failure"}, (service, name, keys)
    # And each subscriber's copy of an event carries only keys some reaction declares.
    for message in broker.delivered:
        if message["task"].endswith(".react"):
            rule = next(
                r
                for r in choreography.reactions()
                if r.key == message["payload"]["reaction"] and message["task"] == f"{r.service}.react"
            )
            assert set(message["payload"]["context"]) <= choreography.relayed(rule)
    declared = {key for r in choreography.reactions() for key in r.inputs}
    told = [m for m in broker.delivered if m["payload"].get("reaction") == "notify_failure:action"]
    assert told
    # (and the keys naming the saga's definition, for the tracker: `choreography.NAMING`)
    assert set(told[0]["payload"]["context"]) <= declared | set(choreography.NAMING)
    assert "payment_token" not in told[0]["payload"]["context"]


def test_each_reaction_declares_the_inputs_of_its_step():
    """The choreography's services receive what the orchestrated definition's steps receive."""
    steps = {s.name: s for s in (*definitions.PLACE_ORDER.steps, *definitions.PLACE_ORDER.on_failure)}
    for rule in choreography.reactions():
        if rule.step in steps:
            assert set(rule.inputs) == set(steps[rule.step].inputs), rule
