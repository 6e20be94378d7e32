from django.core.management.base import BaseCommand

from orchestration.audit import run_audit


class Command(BaseCommand):
    help = "Check the cross-service invariants; exit 1 and name every violation found."

    def add_arguments(self, parser):
        parser.add_argument(
            "--gateway",
            action="store_true",
            help="also compare the payment gateway's own records with the charges (needs the workers' cache)",
        )

    def handle(self, *args, **options):
        violations = run_audit(gateway=options["gateway"])
        for violation in violations:
            self.stdout.write(self.style.ERROR(str(violation)))
        if violations:
            rules = sorted({v.rule for v in violations})
            self.stdout.write(self.style.ERROR(f"{len(violations)} violation(s): {', '.join(rules)}"))
            raise SystemExit(1)
        self.stdout.write(self.style.SUCCESS("audit: no violations"))
