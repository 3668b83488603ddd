"""How workers start: forked from the head's zygote, or (fallback) a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import shoal

pytestmark = pytest.mark.timeout(60)


def test_forked_workers_do_not_share_a_random_sequence(make_cluster, tmp_path, rendezvous):
    make_cluster(num_cpus=2)
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    directory = str(arrivals)

    @shoal.remote
    def draw():
        import os
        import random

        rendezvous(directory, 2)  # two different workers, at the same time
        return os.getpid(), random.random()

    (pid_a, a), (pid_b, b) = shoal.get([draw.remote(), draw.remote()], timeout=30)
    assert pid_a != pid_b
    assert a != b


def test_workers_start_without_the_zygote_too(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, shoal
            shoal.init(num_cpus=1)

            @shoal.remote
            def where():
                return os.getpid()

            @shoal.remote
            class Counter:
                def __init__(self):
                    self.n = 0
                def add(self):
                    self.n += 1
                    return self.n

            assert shoal.get(where.remote(), timeout=30) != os.getpid()
            c = Counter.remote()
            c.add.remote()
            print("result", shoal.get(c.add.remote(), timeout=30), flush=True)
            shoal.shutdown()
            """
        )
    )
    env = {**__import__("os").environ, "SHOAL_NO_ZYGOTE": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    assert "result 2" in done.stdout
