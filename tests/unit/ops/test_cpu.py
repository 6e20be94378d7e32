"""loadtest/cpu.py: CPU time per component from /proc, for the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from loadtest import cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_delta_counts_this_process_cpu():
    before = cpu.snapshot()
    _burn(0.3)
    after = cpu.snapshot()
    used = cpu.delta(before, after)
    assert 0.25 <= used["client"] <= 1.5
    assert used["total"] == pytest.approx(sum(used[c] for c in cpu.COMPONENTS), abs=0.01)
    assert used["workers"] == used["postgres"] == used["redis"] == 0


def test_workers_include_children_and_reaped_grandchildren():
    # A parent that starts a busy child, waits for it (so its time moves to the parent's cutime),
    # then starts a second busy child that is alive at the second snapshot.
    script = (
        "import subprocess, sys, time\n"
        "burn = 'import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass\\n'\n"
        "subprocess.run([sys.executable, '-c', burn])\n"
        "live = subprocess.Popen([sys.executable, '-c', burn + 'time.sleep(30)'])\n"
        "print('ready', flush=True)\n"
        "live.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        before = cpu.snapshot(workers=[parent.pid], client=False)
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        # The live child has burnt its 0.3 s once it sleeps; wait for it by its CPU, not a timer.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = cpu.snapshot(workers=[parent.pid], client=False)
            if len(after["workers"]) == 2 and cpu.delta(before, after)["workers"] >= 0.55:
                break
            time.sleep(0.05)
        assert len(after["workers"]) == 2  # the parent and its live child
        assert 0.55 <= cpu.delta(before, after)["workers"] <= 3
    finally:
        parent.kill()
        for pid in cpu.descendants([parent.pid]) - {parent.pid}:
            subprocess.run(["kill", str(pid)], check=False)
        parent.wait()


def test_a_reused_pid_counts_from_zero_and_a_gone_process_adds_nothing():
    before = {"workers": {10: (100, 5.0), 11: (100, 1.0)}}
    after = {"workers": {10: (200, 0.5), 12: (300, 0.25)}}  # 10 restarted, 11 gone, 12 new
    assert cpu.delta(before, after)["workers"] == 0.75
    assert cpu.delta(before, after, exclude={12})["workers"] == 0.5


def test_sampler_keeps_the_last_reading_of_a_process_that_exited():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(1)\n",
        ]
    )
    sampler = cpu.Sampler(interval=0.05, workers=[child.pid], client=False)
    before = sampler.start()
    child.wait()  # reaped by this process, not by a watched one: its time is gone with it
    after = sampler.stop()
    assert child.pid in after["workers"]
    assert cpu.delta(before, after)["workers"] >= 0.2
    assert 0 < sampler.own_seconds < 0.5  # its own reading of /proc, counted apart


@pytest.mark.postgres
@pytest.mark.django_db(databases=["default"])
def test_postgres_backends_are_found_by_their_process_title():
    from django.db import connection

    connection.ensure_connection()
    backend = connection.connection.info.backend_pid
    name = connection.settings_dict["NAME"]
    assert backend in cpu.postgres_backends([name])
    assert backend not in cpu.postgres_backends([name + "_not_this_one"])
    assert cpu.postgres_backends([]) == set()
    readings = cpu.snapshot(databases=[name], client=False)["postgres"]
    assert backend in readings
