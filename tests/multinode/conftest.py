"""Fixtures for multi-node tests: hosts in network namespaces (see ``netns.py``).

- ``network``: an empty ``Network`` of the test's own; ``network.add_host("head")`` adds hosts.
- ``make_network(hosts=..., **options)``: more networks, or other options (``shm_size``...).
Both tear down at the end of the test, failed or not: every process in a host is killed and
the namespaces, veths and the bridge are deleted.

Every test here skips when namespaces cannot be made here (not root, no ``ip``...), unless
``SHOAL_REQUIRE_NETNS=1``, which makes that a failure (for CI, where it must work).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# pytest's default import mode puts this directory on sys.path already; importlib mode does not.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns
from netns import require_netns


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    require_netns()


@pytest.fixture
def make_network() -> Iterator[Callable[..., netns.Network]]:
    """``make_network(hosts=0, **options)``: a started ``netns.Network``, closed at teardown."""
    networks: list[netns.Network] = []

    def make(hosts: int | list[str] = 0, **options: Any) -> netns.Network:
        network = netns.Network(hosts, **options)
        network.__enter__()
        networks.append(network)
        return network

    yield make
    errors = []
    for network in reversed(networks):
        try:
            network.close()
        except netns.HostError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture
def network(make_network: Callable[..., netns.Network]) -> netns.Network:
    """An empty network of the test's own; add hosts with ``network.add_host(name)``."""
    return make_network()
