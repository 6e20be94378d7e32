import io

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser as DrfJSONParser

from .api import RequestTooLarge


class JSONParser(DrfJSONParser):
    """DRF's JSON parser, with a size limit and deeply nested bodies refused as malformed.

    Size: Django refuses a declared `Content-Length` over `DATA_UPLOAD_MAX_MEMORY_SIZE` when the
    body is read (`RequestDataTooBig`, a 413 in `sagaplatform.api`). A body sent without a
    length (chunked) escapes that check, so what is read is measured here too.

    Nesting: `json.loads` raises RecursionError (not ValueError, which DRF catches) on a few KB
    of `[[[[`.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None:
            body = stream.read(limit + 1)
            if len(body) > limit:
                raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
            stream = io.BytesIO(body)
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the document is nested too deeply") from None
