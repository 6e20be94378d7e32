from django.core.management.base import BaseCommand, CommandError

from loadtest.bench import STYLES, fault_rules, parse_styles, run_benchmark, run_styles_benchmark


def add_bench_arguments(parser) -> None:
    parser.add_argument("-n", "--orders", type=int, default=500, help="orders per measured run")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="clients with an order in flight")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each on every queue)")
    parser.add_argument("--worker-concurrency", type=int, default=4, help="prefork processes of each worker")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--style",
        action="append",
        default=None,
        help=f"the saga's style, one or a comma-separated list ({', '.join(STYLES)}); default orchestrated",
    )
    parser.add_argument(
        "--failure-rate",
        default="",
        help="transient failures: a rate for every operation, or service[.operation]=rate pairs (payments.charge=0.2)",
    )
    parser.add_argument(
        "--latency-ms",
        default=None,
        help="added latency: ms for every operation, or service[.operation]=ms pairs (default 50 with --styles)",
    )
    parser.add_argument("--faults", default="", help="fault rules in SAGA_FAULTS' syntax (kernel/faults.py)")
    parser.add_argument("--prefill", type=int, default=0, help="finished sagas written before the run")
    parser.add_argument(
        "--compare-prefill",
        type=int,
        default=0,
        metavar="N",
        help="run on the empty database, then again after pre-filling N finished sagas, and print the ratio",
    )
    parser.add_argument("--prefill-days", type=float, default=30.0, help="pre-filled sagas ended up to this long ago")
    parser.add_argument("--no-chain", action="store_true", help="skip the bare chain")
    parser.add_argument(
        "--no-autovacuum",
        action="store_true",
        help="on a PostgreSQL server with autovacuum off, do not do its work while measuring (it is done by default)",
    )
    parser.add_argument("--styles", action="store_true", help="compare the four transaction styles' latency instead")
    parser.add_argument(
        "--observability",
        action="store_true",
        help="the saga with metrics and tracing (null exporter) on vs off, in alternating rounds",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of saga and chain, the order reversed in even ones, medians reported (default 1); "
        "with --observability, rounds of off/on (default 2)",
    )


def bench_options(options: dict) -> dict:
    """Check the options and turn them into `run_benchmark`'s arguments (ValueError if bad)."""
    for name in ("orders", "concurrency", "workers", "worker_concurrency", "rounds"):
        if options[name] is not None and options[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "prefill", "compare_prefill"):
        if options[name] < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    if options["prefill"] and options["compare_prefill"]:
        raise ValueError("--prefill and --compare-prefill exclude each other")
    if options["prefill_days"] <= 0.2:
        raise ValueError("--prefill-days must be more than 0.2 (the youngest pre-filled saga ended 3 hours ago)")
    return {
        "n": options["orders"],
        "concurrency": options["concurrency"],
        "workers": options["workers"],
        "worker_concurrency": options["worker_concurrency"],
        "warmup": options["warmup"],
        "styles": parse_styles(options["style"] or ["orchestrated"]),
        "rules": fault_rules(
            failure_rate=options["failure_rate"], latency_ms=options["latency_ms"] or "", faults=options["faults"]
        ),
        "prefill": options["prefill"],
        "compare_prefill": options["compare_prefill"],
        "prefill_days": options["prefill_days"],
        "chain": not options["no_chain"],
        "rounds": options["rounds"] or 1,
        "autovacuum": not options["no_autovacuum"],
    }


class Command(BaseCommand):
    help = (
        "Orders/s, latency and CPU-ms per order of the sagas vs a bare Celery chain (production stack); "
        "the last line of output is a JSON object with every figure."
    )

    def add_arguments(self, parser):
        add_bench_arguments(parser)

    def handle(self, *args, **options):
        try:
            if options["observability"]:
                from loadtest.observability_bench import run_observability_benchmark

                run_observability_benchmark(
                    n=options["orders"],
                    concurrency=options["concurrency"],
                    worker_concurrency=options["worker_concurrency"],
                    warmup=options["warmup"],
                    rounds=options["rounds"] or 2,
                    out=self.stdout,
                )
            elif options["styles"]:
                latency = options["latency_ms"] if options["latency_ms"] is not None else "50"
                try:
                    latency_ms = int(latency)
                except ValueError:
                    raise CommandError("--latency-ms with --styles is one number of ms") from None
                run_styles_benchmark(
                    n=options["orders"],
                    concurrency=options["concurrency"],
                    worker_concurrency=options["worker_concurrency"],
                    latency_ms=latency_ms,
                    out=self.stdout,
                )
            else:
                try:
                    arguments = bench_options(options)
                except ValueError as exc:
                    raise CommandError(str(exc)) from exc
                run_benchmark(out=self.stdout, **arguments)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
