"""Where observability's CPU goes, per order, in one Celery worker process (`--pool solo`), with
metrics and tracing off and on (the `null` exporter), orders placed a few at a time: the worker's
own CPU time (user + system, from /proc) per order, and optionally a cProfile of it.

    DATABASE_URL=... REDIS_URL=... python -m loadtest.observability_profile -n 50 [--profile var/obs]

A deterministic counterpart of `make bench --observability` for attributing the cost: one
process, no pool children, no contention between them."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid` so far, by thread name."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            raw = f.read()
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[f"{name}/{tid}"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("-c", type=int, default=4, help="orders in flight")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default="off,on", help="off, on, metrics (alone), traces (alone)")
    parser.add_argument("--profile", default="", help="write <prefix>-<mode>.prof (cProfile of the worker)")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaplatform.settings")
    import django

    django.setup()
    from django.conf import settings

    from loadtest import bench, cpu
    from loadtest.observability_bench import MODES, _set_in_process
    from loadtest.processes import Process, celery

    bench._seed(10 * (args.n + 5) * args.rounds)
    log_path = settings.VAR_DIR / "obs-profile-worker.log"
    results: dict[str, list[float]] = {}
    for _round in range(args.rounds):
        for mode in args.modes.split(","):
            _set_in_process(mode)
            command = celery(
                "worker",
                "-Q",
                ",".join(settings.SAGA_QUEUES),
                "-P",
                "solo",
                "-n",
                "obsprofile@%h",
                "--loglevel",
                "WARNING",
                "--include",
                "loadtest.bench",
            )
            if args.profile:
                # CPU time of the main thread (where the tasks run), not wall time.
                command = [
                    sys.executable,
                    "-m",
                    "loadtest.observability_profile",
                    "--run-profiled",
                    f"{args.profile}-{mode}.prof",
                    *command[1:],
                ]
            env = {
                **os.environ,
                "LOG_LEVEL": "WARNING",
                "EMAIL_BACKEND": "django.core.mail.backends.dummy.EmailBackend",
                "SHIPPING_HANDLING_SECONDS": "0",
                **MODES[mode],
            }
            worker = Process(f"worker {mode}", command, env=env, log_path=log_path).start()
            from celery import current_app

            worker.wait_until(lambda: bool(current_app.control.ping(timeout=0.5)), message="ping")
            try:
                bench.drive(
                    bench.Run(f"{mode} warm-up"),
                    n=5,
                    concurrency=1,
                    place=bench._place_saga_order,
                    finished_ids=bench._finished_sagas,
                    out=sys.stdout,
                )
                before = cpu.read(worker.pid)
                started = time.monotonic()
                bench.drive(
                    bench.Run(mode),
                    n=args.n,
                    concurrency=args.c,
                    place=bench._place_saga_order,
                    finished_ids=bench._finished_sagas,
                    out=sys.stdout,
                )
                after = cpu.read(worker.pid)
                sys.stdout.write(f"  threads: {_threads(worker.pid)}\n")
                if before is None or after is None:
                    raise RuntimeError("the worker exited during the round")
                per_order = 1000 * (after[1] - before[1]) / args.n
                results.setdefault(mode, []).append(per_order)
                sys.stdout.write(f"{mode}: worker CPU {per_order:.1f} ms/order ({time.monotonic() - started:.1f} s)\n")
                sys.stdout.flush()
            finally:
                worker.stop(timeout=60)
    _set_in_process("off")
    for mode, values in results.items():
        sys.stdout.write(f"{mode}: worker CPU ms/order {[round(v, 1) for v in values]}\n")


def run_profiled(path: str, argv: list[str]) -> None:
    """`python -m celery ...` under cProfile with the main thread's CPU time as its clock."""
    import cProfile
    import runpy
    import signal

    profiler = cProfile.Profile(time.thread_time)
    sys.argv = argv[1:] if argv[0] == "-m" else argv
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    profiler.enable()
    try:
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-profiled"]:
        run_profiled(sys.argv[2], sys.argv[3:])
    else:
        main()
