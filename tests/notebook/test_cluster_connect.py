"""%cluster connect: a notebook joins a running cluster in client-server mode (a head
started by the CLI on tcp), runs %%remote cells there, and disconnects without stopping it."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import shoal
from IPython.core.error import UsageError
from shoal import _session

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def head(
    shoal_cli: Callable[..., Any],
    leak_check: Callable[..., None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    head_dir = tempfile.mkdtemp(prefix="shoal-nb-h-", dir="/tmp")  # short: ipc paths
    key_file = str(tmp_path_factory.mktemp("connect") / "cluster.key")
    try:
        started = shoal_cli(
            "start", "--head", "--port", "0", "--bind", "127.0.0.1", "--key-file", key_file,
            "--num-cpus", "2", "--temp-dir", head_dir,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        [session] = glob.glob(os.path.join(head_dir, "session_2*"))
        with open(os.path.join(session, "head.json")) as f:
            info = json.load(f)
        yield {"address": info["tcp"].removeprefix("tcp://"), "key_file": key_file}
    finally:
        stopped = shoal_cli("stop", "--temp-dir", head_dir)
        try:
            leak_check("after the cluster that the notebook connected to")
        finally:
            shutil.rmtree(head_dir, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def run(shell: Any, source: str) -> Any:
    result = shell.run_cell(source, store_history=True)
    for err in (result.error_before_exec, result.error_in_exec):
        if err is not None:
            raise err
    return result.result


def test_connect_run_and_disconnect(shell, head, capsys):
    run(shell, f"%cluster connect {head['address']} --key-file {head['key_file']}")
    out = capsys.readouterr().out
    assert f"Shoal cluster at tcp://{head['address']} (connected in client-server mode)" in out
    assert "1 node, 2 CPUs" in out
    with pytest.raises(UsageError, match="already connected to a cluster"):
        run(shell, f"%cluster connect {head['address']}")

    shell.user_ns["big"] = np.ones(500_000)  # 4 MB: streamed to the head's store
    value = run(shell, "%%remote\nprint('on the cluster')\ntotal = float(big.sum())\nbig[:2] * 3")
    assert value.tolist() == [3.0, 3.0]
    assert shell.user_ns["total"] == 500_000.0
    assert "on the cluster" in capsys.readouterr().out

    run(shell, "%cluster stop")
    assert f"Disconnected from the Shoal cluster at tcp://{head['address']}." in (
        capsys.readouterr().out
    )
    assert not shoal.is_initialized()


def test_key_from_the_environment(shell, head, monkeypatch, capsys):
    key = _session.read_key_file(head["key_file"])
    monkeypatch.setenv("SHOAL_CLUSTER_KEY", key.hex())
    run(shell, f"%cluster connect tcp://{head['address']}")
    assert "connected in client-server mode" in capsys.readouterr().out
    assert run(shell, "%%remote\n6 * 7") == 42
