from django.core.management.base import BaseCommand

from loadtest.simulate import Plan, run_simulation


class Command(BaseCommand):
    help = "Place many concurrent orders under a fault plan, wait for rest, report, and audit (exit 1 on violations)."

    def add_arguments(self, parser):
        parser.add_argument("-n", "--orders", type=int, default=Plan.orders)
        parser.add_argument("-c", "--concurrency", type=int, default=Plan.concurrency, help="orders in flight at once")
        parser.add_argument("--failure-rate", type=float, default=Plan.failure_rate, help="transient, every operation")
        parser.add_argument("--decline-rate", type=float, default=Plan.decline_rate)
        parser.add_argument("--latency-ms", type=int, default=Plan.latency_ms)
        parser.add_argument("--spawn-workers", type=int, default=0, help="start N worker processes (production mode)")
        parser.add_argument("--kill-workers", type=int, default=0, help="SIGKILL and restart a spawned worker K times")
        parser.add_argument("--step-timeout", type=float, default=Plan.step_timeout, help="for spawned workers")
        parser.add_argument("--handling-seconds", type=float, default=Plan.handling_seconds, help="before dispatch")
        parser.add_argument(
            "--timeout", type=float, default=Plan.timeout, help="seconds one order may take to come to rest"
        )
        parser.add_argument("--seed", type=int, default=Plan.seed)
        parser.add_argument(
            "--payments-outage", type=float, default=0.0, help="every charge fails for this many seconds, then recovers"
        )
        parser.add_argument(
            "--no-breaker", dest="breaker", action="store_false", help="spawned workers run without circuit breakers"
        )
        parser.add_argument(
            "--mode", default=Plan.mode, choices=["orchestrated", "parallel", "tcc", "choreography", "mixed"]
        )

    def handle(self, *args, **options):
        plan = Plan(**{key: options[key] for key in Plan.__dataclass_fields__})
        if run_simulation(plan, self.stdout):
            raise SystemExit(1)
