from django.core.management.base import BaseCommand, CommandError

from loadtest.ramp import run_ramp


class Command(BaseCommand):
    help = (
        "Orders at rising rates over HTTP to a stack it starts on 127.0.0.1: per step accepted, refused, 5xx, "
        "p50/p99, connections, and whether every accepted order ended well (exit 1 if not)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--rates", default="5,10,20,40,80", help="orders/s of each step, comma-separated")
        parser.add_argument("--seconds", type=float, default=15.0, help="length of each step")
        parser.add_argument("--workers", type=int, default=2, help="worker processes to start (2 processes each)")
        parser.add_argument("--decline-rate", type=float, default=0.05, help="share of declined cards")
        parser.add_argument("--settle-timeout", type=float, default=600.0, help="seconds to wait for the sagas")
        parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds a client waits for an answer")
        parser.add_argument("--clients", type=int, default=128, help="requests in flight at most")

    def handle(self, *args, rates, seconds, workers, decline_rate, settle_timeout, request_timeout, clients, **options):
        try:
            steps = [float(rate) for rate in rates.split(",")]
        except ValueError:
            raise CommandError(f"--rates must be numbers separated by commas, got {rates!r}") from None
        if not steps or min(steps) <= 0 or max(steps) > 1000 or seconds <= 0 or seconds * sum(steps) > 100_000:
            raise CommandError("the ramp is bounded: rates from 0 to 1000 orders/s, at most 100,000 orders")
        try:
            ok = run_ramp(
                rates=steps,
                seconds=seconds,
                workers=workers,
                decline_rate=decline_rate,
                settle_timeout=settle_timeout,
                request_timeout=request_timeout,
                clients=clients,
                out=self.stdout,
            )
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        if not ok:
            raise SystemExit(1)
