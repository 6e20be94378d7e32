from rest_framework.permissions import BasePermission

OPERATE = "orchestration.operate_saga"


class IsOperator(BasePermission):
    """Staff with the permission to operate sagas (retry, skip, cancel); superusers have it."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.is_staff and user.has_perm(OPERATE))


class IsStaff(BasePermission):
    """Staff, as the dashboard: reading sagas (search, export, saved views), not acting on them."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.is_staff)
