"""A machine whose /dev/shm is small (Docker's and Binder's 64 MiB): the store sizes itself
to what the filesystem has free, and objects larger in total than /dev/shm spill instead of
failing with ENOSPC. The driver runs in a private mount namespace with its own 64 MiB
tmpfs on /dev/shm (root only, as in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare(1) for a private /dev/shm",
    ),
]

SCRIPT = textwrap.dedent(
    """
    import warnings
    import numpy as np
    import shoal

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shoal.init(num_cpus=2)
    capacity = shoal.cluster_resources()["object_store_memory"]
    print("capacity", int(capacity))
    print("warned", any("/dev/shm" in str(w.message) for w in caught))
    # Three 24 MB puts: more than /dev/shm holds, so one of them spills.
    refs = [shoal.put(np.full(3_000_000, i, dtype=np.float64)) for i in range(3)]

    @shoal.remote
    def make(i):
        return np.full(3_000_000, i, dtype=np.float64)

    results = shoal.get([make.remote(i) for i in range(4)])
    print("results", [int(a[0]) for a in results], [int(shoal.get(r)[-1]) for r in refs])
    shoal.shutdown()
    """
)


def test_a_64_mib_dev_shm_sizes_the_store_and_spills_instead_of_failing(tmp_path):
    script = tmp_path / "small_shm.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {script}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert int(lines["capacity"]) <= 0.9 * 64 * 2**20
    assert lines["warned"] == "True"
    assert lines["results"] == "[0, 1, 2, 3] [0, 1, 2]"
