"""A Shoal cluster over network-namespace hosts for fault-tolerance tests: start a head and
nodes with short health checks, run drivers that report through stdout lines, and kill
or cut off hosts.

    cluster = FtCluster(network, env={...})
    cluster.start_head("head", cpus=1)
    cluster.start_node("a", cpus=2)
    drv = cluster.driver("head", SCRIPT, arg...)   # a Driver: .expect("READY") ...
    cluster.kill_host("a")                           # SIGKILL every process of host a

Driver scripts print ``KEY json`` lines; ``Driver.expect(KEY)`` waits for one (with a
deadline, failing at once if the driver exits) and returns the decoded json.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import netns

PORT = 6380
# `python -m shoal`, not the `shoal` on PATH: the cluster runs the code under test (a
# checkout's venv need not be first on PATH).
SHOAL = [sys.executable, "-m", "shoal"]


class Driver:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, key: str, timeout: float = 60) -> Any:
        """The json after the next line that starts with ``key ``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} line within {timeout}s:\n{self.text()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)  # the next expect sees the end too
                raise AssertionError(f"the driver exited before a {key} line:\n{self.text()}")
            if line.startswith(key + " "):
                return json.loads(line[len(key) + 1 :])

    def text(self) -> str:
        time.sleep(0.2)  # let the reader catch up on what was written last
        return "".join(self.output)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


class FtCluster:
    def __init__(self, network: netns.Network, env: dict[str, str]) -> None:
        self.network = network
        self.env = env
        self.key_file = str(network.dir / "cluster.key")
        self.head_ip = ""

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{PORT}"

    def start_head(
        self, name: str, cpus: float = 1, resources: dict[str, float] | None = None
    ) -> None:
        host = self.network[name]
        self.head_ip = host.ip
        host.run(
            [*SHOAL, "start", "--head", "--port", str(PORT), "--bind", host.ip]
            + ["--key-file", self.key_file, "--num-cpus", str(cpus)]
            + ["--resources", json.dumps(resources or {}), "--object-store-memory", str(512 << 20)],
            env=self.env,
            timeout=60,
        )

    def start_node(
        self, name: str, cpus: float = 1, resources: dict[str, float] | None = None
    ) -> None:
        self.network[name].run(
            [*SHOAL, "start", "--address", self.address, "--key-file", self.key_file]
            + ["--num-cpus", str(cpus), "--resources", json.dumps(resources or {})]
            + ["--object-store-memory", str(512 << 20)],
            env=self.env,
            timeout=60,
        )

    def info(self, name: str) -> dict[str, Any]:
        """The host's head.json (its node id, pid ...)."""
        text = self.network[name].run(["sh", "-c", "cat $SHOAL_TMPDIR/session_2*/head.json"]).stdout
        info: dict[str, Any] = json.loads(text)
        return info

    def node_id(self, name: str) -> str:
        return str(self.info(name)["node_id"])

    def driver(
        self, name: str, script: str, *args: str, env: dict[str, str] | None = None
    ) -> Driver:
        proc = self.network[name].popen(
            [sys.executable, "-c", script, *args],
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return Driver(proc)

    def kill_host(self, name: str) -> list[int]:
        """SIGKILL every process of the host at once (as a machine that loses power)."""
        host = self.network[name]
        pids = sorted(host.pids())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def link(self, name: str, state: str) -> None:
        subprocess.run(["ip", "link", "set", self.network[name].veth, state], check=True)

    def segments(self, name: str) -> list[str]:
        listing = self.network[name].run(["ls", "/dev/shm"]).stdout.split()
        return [n for n in listing if n.startswith("shoal-")]


PRELUDE = """
import json, os, sys, time
import numpy as np
import shoal
import shoal.state
from shoal.exceptions import (
    ActorDiedError, ClusterGoneError, ObjectLostError, OwnerDiedError, ShoalError,
)
from shoal.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

def say(key, value):
    print(key, json.dumps(value), flush=True)

def node_of():
    return shoal.get_runtime_context().get_node_id()

def wait_file(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)

def node_states():
    return {n["NodeID"]: [n["Alive"], n["DeathReason"], n["NodeManagerAddress"]] for n in shoal.nodes()}
"""
