"""Self-tests of the multi-host harness (netns.py): hosts talk over the bridge and only there,
each has its own /dev/shm and session directory, and teardown leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid

import netns
import psutil
import pytest

pytestmark = pytest.mark.timeout(60)

PORT = 7070  # every host has its own ports: a fixed number cannot collide

# Echoes on ADDRESS:PORT and on 127.0.0.1:PORT+1.
ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys, threading

    def serve(server):
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(conn.recv(1024))

    address, port = sys.argv[1], int(sys.argv[2])
    local = socket.create_server(("127.0.0.1", port + 1))
    threading.Thread(target=serve, args=(local,), daemon=True).start()
    serve(socket.create_server((address, port)))
    """
)

CONNECT = textwrap.dedent(
    """
    import json, socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
            conn.sendall(b"ping")
            print(json.dumps({"reply": conn.recv(1024).decode()}))
    except OSError as exc:
        print(json.dumps({"error": type(exc).__name__}))
    """
)


def connect(host: netns.Host, address: str, port: int) -> dict[str, str]:
    return json.loads(host.python(CONNECT, address, str(port), timeout=20).stdout)


def test_hosts_talk_over_the_bridge_and_loopback_stays_local(network):
    a, b = network.add_host("a"), network.add_host("b")
    assert a.ip != b.ip
    server = a.popen([sys.executable, "-c", ECHO_SERVER, a.ip, str(PORT)])
    b.wait_for_port(PORT, a.ip, proc=server)
    a.wait_for_port(PORT + 1, "127.0.0.1", proc=server)

    assert connect(b, a.ip, PORT) == {"reply": "ping"}
    assert connect(b, "a", PORT) == {"reply": "ping"}  # host names resolve in every host
    # The test process reaches the hosts through the root namespace's address on the bridge.
    with socket.create_connection((a.ip, PORT), timeout=5) as conn:
        conn.sendall(b"root")
        assert conn.recv(1024) == b"root"

    # A's loopback-only listener works inside A, and from B it is out of reach: nothing
    # listens on A's bridge address at that port, and B's 127.0.0.1 is B's own.
    assert connect(a, "127.0.0.1", PORT + 1) == {"reply": "ping"}
    assert connect(b, a.ip, PORT + 1) == {"error": "ConnectionRefusedError"}
    assert connect(b, "127.0.0.1", PORT + 1) == {"error": "ConnectionRefusedError"}
    assert server.poll() is None


def test_wait_for_port_fails_fast_when_the_server_exits(network):
    host = network.add_host("a")
    crashed = host.popen([sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(netns.CommandError, match="exited before"):
        host.wait_for_port(PORT, proc=crashed, timeout=30)


def test_dev_shm_and_session_directories_are_per_host(network):
    a, b = network.add_host("a"), network.add_host("b")
    name = f"shoal-netns-test-{uuid.uuid4().hex}"
    a.run(["sh", "-c", f"echo hello > /dev/shm/{name}"])

    # Another process of A sees it: /dev/shm belongs to the host, not to one process.
    assert a.run(["cat", f"/dev/shm/{name}"]).stdout == "hello\n"
    assert b.run(["ls", "-A", "/dev/shm"]).stdout == ""
    assert not os.path.exists(f"/dev/shm/{name}")
    assert a.run(["stat", "-f", "-c", "%T", "/dev/shm"]).stdout.strip() == "tmpfs"

    keys = ["SHOAL_TMPDIR", "TMPDIR", "SHOAL_TEST_SESSION", "EXTRA"]
    report = f"import json, os, socket; print(json.dumps([os.environ.get(k) for k in {keys}]"
    report += " + [socket.gethostname()]))"
    seen = {
        host.name: json.loads(host.python(report, env={"EXTRA": host.name}).stdout)
        for host in (a, b)
    }
    for host in (a, b):
        shoal_tmpdir, tmpdir, session, extra, hostname = seen[host.name]
        assert (shoal_tmpdir, tmpdir) == (str(host.shoal_tmpdir), str(host.tmpdir))
        assert os.path.isdir(shoal_tmpdir) and os.path.isdir(tmpdir)
        assert shoal_tmpdir != os.environ["SHOAL_TMPDIR"]
        assert session == os.environ["SHOAL_TEST_SESSION"]  # the leak check finds strays
        assert (extra, hostname) == (host.name, host.name)
    assert seen["a"][0] != seen["b"][0] and seen["a"][1] != seen["b"][1]


def test_run_reports_output_of_a_failed_command(network):
    host = network.add_host("a")
    with pytest.raises(netns.CommandError) as failure:
        host.python("import sys; print('out-text'); sys.exit('err-text')")
    assert failure.value.returncode == 1
    assert "out-text" in str(failure.value) and "err-text" in str(failure.value)
    assert host.python("raise SystemExit(3)", check=False).returncode == 3
    with pytest.raises(netns.CommandError, match="timed out"):
        host.run(["sleep", "30"], timeout=0.2)


STUBBORN = textwrap.dedent(
    """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork() == 0:  # a daemon outside the Popen's process tree
        os.setsid()
        if os.fork() == 0:
            open("/dev/shm/shoal-netns-daemon", "w").close()
            print(os.getpid(), flush=True)
            while True:
                time.sleep(1)
        os._exit(0)
    while True:
        time.sleep(1)
    """
)


def snapshot() -> tuple[set[str], str]:
    names = set(os.listdir(netns.NETNS_DIR)) if netns.NETNS_DIR.exists() else set()
    return names, netns._ip("-o", "link", "show").stdout


def test_teardown_leaves_nothing_even_after_a_failure():
    failed = pytest.raises(RuntimeError, match="the test failed")
    with failed, netns.Network(["a", "b"], kill_grace=0.2) as network:
        a = network["a"]
        stubborn = a.popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
        daemon = psutil.Process(int(stubborn.stdout.readline()))
        sleeper = network["b"].popen(["sleep", "300"])
        assert a.pids() >= {stubborn.pid, daemon.pid} and sleeper.pid in network["b"].pids()
        names = {host.ns for host in network.hosts}
        links = [network.bridge] + [host.veth for host in network.hosts]
        assert names <= snapshot()[0] and all(link in snapshot()[1] for link in links)
        directory = network.dir
        raise RuntimeError("the test failed")

    assert stubborn.poll() == -9 and sleeper.poll() is not None
    assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE
    namespaces, link_list = snapshot()
    assert not names & namespaces
    assert not [link for link in links if f" {link}:" in link_list or f" {link}@" in link_list]
    assert not directory.exists()
    stubborn.stdout.close()
    with pytest.raises(netns.HostError, match="not running"):
        a.popen(["true"])


CRASHING_SESSION = textwrap.dedent(
    """
    import os, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    import netns
    network = netns.Network(["a"]).__enter__()
    sleeper = network["a"].popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(network.octet, sleeper.pid, flush=True)
    os._exit(0)  # no teardown, as after SIGKILL
    """
)


def test_a_new_network_removes_what_a_dead_session_left():
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_SESSION, os.path.dirname(netns.__file__)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    octet, pid = map(int, crashed.stdout.split())
    sleeper = psutil.Process(pid)
    left = f"{netns.NAME_PREFIX}{octet}"
    assert f"{left}-a" in snapshot()[0] and f" {left}br:" in snapshot()[1]
    assert sleeper.is_running()

    with netns.Network(["a"]) as network:
        assert f"{left}-a" not in snapshot()[0] and f" {left}br:" not in snapshot()[1]
        assert not os.path.exists(f"/tmp/{left}") or network.octet == octet
        assert not sleeper.is_running() or sleeper.status() == psutil.STATUS_ZOMBIE
