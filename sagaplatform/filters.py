"""Query filter pieces shared by the API's lists (django-filter)."""

from __future__ import annotations

from datetime import UTC

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django_filters.fields import IsoDateTimeField
from drf_spectacular.utils import extend_schema_field

from .api import ANY_TEXT


class UtcIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 date-time, turned to UTC here rather than by the database.

    Python accepts offsets up to ±23:59 and PostgreSQL only up to ±15:59 (a 500, found by
    schemathesis), and a date at the edge of the calendar can leave it once moved to UTC.
    """

    def to_python(self, value):
        value = super().to_python(value)
        if value is None:
            return None
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValidationError("This date-time is out of range.", code="invalid") from None


class DateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


class StrictNullBooleanField(forms.NullBooleanField):
    """`true`/`false` (or 1/0); anything else is refused rather than read as "no filter"."""

    TRUE, FALSE = {"true", "1"}, {"false", "0"}

    def to_python(self, value):
        if value in (None, ""):
            return None
        text = str(value).lower()
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        raise ValidationError("Use true or false.", code="invalid")

    def validate(self, value):
        pass


class BooleanFilter(django_filters.BooleanFilter):
    field_class = StrictNullBooleanField

    def __init__(self, *args, **kwargs):
        # A plain input: django-filter's boolean widgets turn an unknown value into "no filter".
        kwargs.setdefault("widget", forms.TextInput)
        super().__init__(*args, **kwargs)


class TextFilter(django_filters.CharFilter):
    """A text query parameter, documented as its form field takes it: at most `max_length`
    characters, none of them NUL (refused with a 400). drf-spectacular documents a CharFilter as
    any string, so a schema-valid `?sku=` of 65 characters was refused."""

    def __init__(self, *args, max_length: int, **kwargs):
        super().__init__(*args, max_length=max_length, **kwargs)
        schema = {"type": "string", "maxLength": max_length, "pattern": ANY_TEXT}
        extend_schema_field({**schema, "description": kwargs.get("help_text", "")})(self)


class FilterSet(django_filters.FilterSet):
    """A FilterSet that refuses a filter given with no value (`?created_before=`), as the schema
    documents a date, a UUID, a number or a choice for it, rather than ignoring that filter. A
    text filter (`?sku=`, a prefix) takes the empty string: it matches everything."""

    def is_valid(self) -> bool:
        valid = super().is_valid()
        empty = [
            name
            for name, filter_ in self.filters.items()
            if not isinstance(filter_, django_filters.CharFilter) and "" in self.data.getlist(name)
        ]
        for name in empty:
            self.form.add_error(name, ValidationError("A value is required.", code="required"))
        return valid and not empty
