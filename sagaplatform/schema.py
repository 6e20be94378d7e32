"""The OpenAPI generator (drf-spectacular's), completed where it leaves out what the API enforces."""

from __future__ import annotations

from django.core.validators import RegexValidator
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import is_list_serializer

from .api import ANY_TEXT, NOT_BLANK, NOT_BLANK_TEXT, StrictCharField


class AutoSchema(SpectacularAutoSchema):
    def _unwrap_list_serializer(self, serializer, direction):
        # drf-spectacular drops a `many=True` serializer's `min_length` / `max_length`: without
        # them the schema would allow an empty order or 51 lines, which the API refuses.
        schema = super()._unwrap_list_serializer(serializer, direction)
        if schema and is_list_serializer(serializer):
            if serializer.min_length is not None:
                schema["minItems"] = serializer.min_length
            if serializer.max_length is not None:
                schema["maxItems"] = serializer.max_length
        return schema

    def _insert_field_validators(self, field, schema):
        super()._insert_field_validators(field, schema)
        # What the field's Python validators take (NUL, `NOT_BLANK`), as one ECMAScript pattern,
        # unless a pattern of its own already says more.
        own_pattern = any(isinstance(v, RegexValidator) and v is not NOT_BLANK for v in field.validators)
        if isinstance(field, StrictCharField) and schema.get("type") == "string" and not own_pattern:
            schema["pattern"] = ANY_TEXT if field.allow_blank else NOT_BLANK_TEXT
