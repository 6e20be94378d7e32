from django.urls import path

from . import alerting_apis

urlpatterns = [
    path("channels/", alerting_apis.AlertChannelListApi.as_view(), name="alert-channel-list"),
    path("channels/<int:pk>/", alerting_apis.AlertChannelDetailApi.as_view(), name="alert-channel-detail"),
    path("notifications/", alerting_apis.AlertGroupListApi.as_view(), name="alert-notification-list"),
]
