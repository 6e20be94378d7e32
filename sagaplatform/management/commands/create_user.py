import getpass
import os

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

FROM_ENVIRONMENT = "SAGA_USER_PASSWORD"


class Command(BaseCommand):
    help = (
        "Create a login: a customer, or with --operator a staff user who may retry, skip and cancel sagas. "
        f"The password is asked for, or read from ${FROM_ENVIRONMENT} (scripts)."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--operator", action="store_true", help="staff, with the operate_saga permission")

    def handle(self, *args, username: str, email: str, operator: bool, **options):
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            raise CommandError(f"the user {username!r} already exists")
        password = os.environ.get(FROM_ENVIRONMENT) or self._ask()
        user = User(username=username, email=email, is_staff=operator)
        try:
            validate_password(password, user)
        except ValidationError as error:
            raise CommandError(" ".join(error.messages)) from None
        user.set_password(password)
        user.save()
        if operator:
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label="orchestration", codename="operate_saga")
            )
        self.stdout.write(f"Created {'operator' if operator else 'customer'} {username}.")

    def _ask(self) -> str:
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Password (again): "):
            raise CommandError("the two passwords differ")
        return password
