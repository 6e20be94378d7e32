from django.core.management.base import BaseCommand, CommandError

from loadtest.bench import run_benchmark, run_styles_benchmark


class Command(BaseCommand):
    help = "Orders/s and end-to-end latency of the place_order saga vs a bare Celery chain (production stack)."

    def add_arguments(self, parser):
        parser.add_argument("-n", "--orders", type=int, default=500)
        parser.add_argument("-c", "--concurrency", type=int, default=32, help="clients with an order in flight")
        parser.add_argument("--worker-concurrency", type=int, default=4, help="prefork processes of the worker")
        parser.add_argument("--warmup", type=int, default=20)
        parser.add_argument("--styles", action="store_true", help="compare the four transaction styles instead")
        parser.add_argument(
            "--observability",
            action="store_true",
            help="the saga with metrics and tracing (null exporter) on vs off, in alternating rounds",
        )
        parser.add_argument("--rounds", type=int, default=2, help="with --observability: off/on rounds")
        parser.add_argument(
            "--latency-ms", type=int, default=50, help="with --styles: added to every service operation"
        )

    def handle(self, *args, orders, concurrency, worker_concurrency, warmup, styles, latency_ms, **options):
        try:
            if options["observability"]:
                from loadtest.observability_bench import run_observability_benchmark

                run_observability_benchmark(
                    n=orders,
                    concurrency=concurrency,
                    worker_concurrency=worker_concurrency,
                    warmup=warmup,
                    rounds=options["rounds"],
                    out=self.stdout,
                )
            elif styles:
                run_styles_benchmark(
                    n=orders,
                    concurrency=concurrency,
                    worker_concurrency=worker_concurrency,
                    latency_ms=latency_ms,
                    out=self.stdout,
                )
            else:
                run_benchmark(
                    n=orders,
                    concurrency=concurrency,
                    worker_concurrency=worker_concurrency,
                    warmup=warmup,
                    out=self.stdout,
                )
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
