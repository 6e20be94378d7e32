from django.urls import path

from . import apis, console_apis

urlpatterns = [
    path("", apis.SagaListApi.as_view(), name="saga-list"),
    path("search/", console_apis.SagaSearchApi.as_view(), name="saga-search"),
    path("bulk/", console_apis.SagaBulkApi.as_view(), name="saga-bulk"),
    path("export.csv", console_apis.SagaCsvApi.as_view(), name="saga-export-csv"),
    path("views/", console_apis.SavedViewListApi.as_view(), name="saga-views"),
    path("views/<int:view_id>/", console_apis.SavedViewDetailApi.as_view(), name="saga-view-detail"),
    path("<uuid:saga_id>/export/", console_apis.SagaExportApi.as_view(), name="saga-export"),
    path("<uuid:saga_id>/", apis.SagaDetailApi.as_view(), name="saga-detail"),
    path("<uuid:saga_id>/retry/", apis.SagaRetryApi.as_view(), name="saga-retry"),
    path("<uuid:saga_id>/skip/", apis.SagaSkipApi.as_view(), name="saga-skip"),
    path("<uuid:saga_id>/cancel/", apis.SagaCancelApi.as_view(), name="saga-cancel"),
]
