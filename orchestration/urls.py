from django.urls import path

from . import apis

urlpatterns = [
    path("", apis.SagaListApi.as_view(), name="saga-list"),
    path("<uuid:saga_id>/", apis.SagaDetailApi.as_view(), name="saga-detail"),
    path("<uuid:saga_id>/retry/", apis.SagaRetryApi.as_view(), name="saga-retry"),
    path("<uuid:saga_id>/skip/", apis.SagaSkipApi.as_view(), name="saga-skip"),
    path("<uuid:saga_id>/cancel/", apis.SagaCancelApi.as_view(), name="saga-cancel"),
]
