"""The OpenAPI generator (drf-spectacular's), completed where it leaves out what the API enforces."""

from __future__ import annotations

from django.core.validators import ProhibitNullCharactersValidator
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import is_list_serializer

from .api import StrictCharField

# Text with no NUL character (PostgreSQL cannot store one, and DRF refuses it).
NO_NUL = "^[^\\u0000]*$"


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
        # The fields that validate input (an answer's text is whatever was stored).
        if (
            isinstance(field, StrictCharField)
            and schema.get("type") == "string"
            and "pattern" not in schema
            and any(isinstance(v, ProhibitNullCharactersValidator) for v in field.validators)
        ):
            schema["pattern"] = NO_NUL
