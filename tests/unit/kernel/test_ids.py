"""Primary keys in time order (kernel/ids.py): what the indexes over them rely on."""

from __future__ import annotations

import time
import uuid

import pytest

from sagaplatform.kernel.ids import new_id


def test_new_ids_are_version_7_with_the_creation_time_and_sort_in_creation_order():
    before = int(time.time() * 1000)
    ids = [new_id() for _ in range(2000)]
    after = int(time.time() * 1000)
    assert all(isinstance(i, uuid.UUID) and i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)  # within one millisecond too
    assert len(set(ids)) == len(ids)
    assert before <= ids[0].int >> 80 <= ids[-1].int >> 80 <= after
    # 74 random bits after the time: two ids of the same millisecond share only the prefix.
    assert len({i.int & ((1 << 62) - 1) for i in ids}) == len(ids)


@pytest.mark.django_db(databases="__all__")
def test_every_uuid_key_the_platform_creates_is_time_ordered():
    from django.apps import apps
    from django.db import models

    uuid_keys = [
        (model._meta.label, field.name)
        for model in apps.get_models()
        for field in model._meta.concrete_fields
        if isinstance(field, models.UUIDField) and field.has_default()
    ]
    assert ("orchestration.Saga", "id") in uuid_keys
    assert ("kernel.OutboxMessage", "id") in uuid_keys
    assert ("orders.Order", "saga_id") in uuid_keys
    for label, name in uuid_keys:
        assert apps.get_model(label)._meta.get_field(name).default is new_id, (label, name)


@pytest.mark.django_db(databases="__all__")
def test_sagas_started_in_the_same_millisecond_get_their_own_tracking_numbers():
    # A tracking number is drawn from the saga's id: from its random part, not its time.
    from shipping.services import shipment_schedule
    from tests.conftest import ADDRESS

    saga_ids = [new_id() for _ in range(20)]
    assert len({i.int >> 80 for i in saga_ids}) < len(saga_ids)  # some share their millisecond

    shipments = [shipment_schedule(saga_id=i, order_id=uuid.uuid4(), address=ADDRESS) for i in saga_ids]

    assert len({s.tracking_number for s in shipments}) == len(saga_ids)
