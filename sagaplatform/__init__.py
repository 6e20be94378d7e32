from .observability import prepare_environment

prepare_environment()

from .celery import app as celery_app  # noqa: E402

__all__ = ("celery_app",)
