"""Inject faults at run time: `manage.py faults add payments.charge --failure-rate 0.2`."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule

# The orchestrator's rules (its commit-then-publish, its relay) live in its database, `default`.
TARGETS = {faults.ORCHESTRATOR: "default", **{alias: alias for alias in settings.SERVICE_ALIASES}}


class Command(BaseCommand):
    help = "List, add or clear fault-injection rules in the service databases."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list")
        add = sub.add_parser("add")
        add.add_argument("target", help="service.operation (operation * for all), or orchestrator.<step|relay>")
        add.add_argument("--failure-rate", type=float, default=0.0)
        add.add_argument("--fail-first", type=int, default=0)
        add.add_argument("--latency-ms", type=int, default=0)
        add.add_argument("--hang-seconds", type=float, default=0.0)
        add.add_argument("--crash-point", choices=[c for c, _ in FaultRule.CrashPoint.choices if c], default="")
        add.add_argument("--crashes", type=int, default=1)
        clear = sub.add_parser("clear")
        clear.add_argument("service", nargs="?", help="one service or orchestrator (default: all)")

    def handle(self, *args, action, **options):
        if action == "list":
            for service, alias in TARGETS.items():
                for rule in FaultRule.objects.using(alias).filter(service=service):
                    self.stdout.write(
                        f"{service}#{rule.id} {rule} rate={rule.failure_rate} first={rule.fail_first} "
                        f"latency={rule.latency_ms}ms hang={rule.hang_seconds}s crash={rule.crash_point or '-'}"
                        f"x{rule.crashes_left} enabled={rule.is_enabled}"
                    )
        elif action == "add":
            if not settings.SAGA_FAULT_INJECTION:
                raise CommandError("fault injection is off here: set SAGA_FAULT_INJECTION=1 to add rules")
            service, _, operation = options["target"].partition(".")
            if service not in TARGETS:
                raise CommandError(f"unknown service {service!r}; one of {', '.join(TARGETS)}")
            rule = FaultRule.objects.using(TARGETS[service]).create(
                service=service,
                operation=operation or "*",
                failure_rate=options["failure_rate"],
                fail_first=options["fail_first"],
                latency_ms=options["latency_ms"],
                hang_seconds=options["hang_seconds"],
                crash_point=options["crash_point"],
                crashes_left=options["crashes"],
            )
            self.stdout.write(f"added {service}#{rule.id} {rule}")
        else:
            if options["service"] and options["service"] not in TARGETS:
                raise CommandError(f"unknown service {options['service']!r}; one of {', '.join(TARGETS)}")
            for service in [options["service"]] if options["service"] else TARGETS:
                deleted, _ = FaultRule.objects.using(TARGETS[service]).filter(service=service).delete()
                self.stdout.write(f"cleared {deleted} rule(s) of {service}")
