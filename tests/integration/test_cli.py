"""The command line: `shoal start --head`, drivers joining with address="auto" (several at
once), `shoal status`, detached actors outliving their driver, and `shoal stop`.

`shoal stop` stops every cluster in the session directory; conftest gives the test session
a private one (SHOAL_TMPDIR), so other Shoal sessions on the machine are safe.
"""

from __future__ import annotations

import json
import uuid

import pytest
from shoal import testing

pytestmark = pytest.mark.timeout(90)


def _result(stdout):
    """The JSON value a driver printed on its `RESULT ` line."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{stdout}"
    return json.loads(lines[-1][len("RESULT ") :])


RESOURCES_DRIVER = """
import json, shoal
shoal.init(address="auto")

@shoal.remote
def square(x):
    return x * x

squares = shoal.get([square.remote(i) for i in range(4)], timeout=60)
print("RESULT " + json.dumps({"resources": shoal.cluster_resources(), "squares": squares}))
shoal.shutdown()
"""


def test_start_run_stop_leaves_nothing(shoal_cli, run_driver, leak_check):
    started = shoal_cli(
        "start", "--head", "--num-cpus", "1", "--num-gpus", "1",
        "--resources", json.dumps({"gizmo": 2}),
    )  # fmt: skip
    try:
        assert started.returncode == 0, testing.describe_run(started)
        result = _result(run_driver(RESOURCES_DRIVER))
        assert result["squares"] == [0, 1, 4, 9]
        resources = result["resources"]
        assert (resources["CPU"], resources["GPU"], resources["gizmo"]) == (1.0, 1.0, 2.0)
        assert testing.shoal_processes(), "the cluster stopped when its driver left"
    finally:
        stopped = shoal_cli("stop")
    assert stopped.returncode == 0, testing.describe_run(stopped)
    leak_check("after `shoal stop`")


@pytest.fixture(scope="class")
def head(shoal_cli, leak_check):
    """A head started by `shoal start --head` on a chosen port, stopped after the class."""
    port = testing.free_port()
    started = shoal_cli(
        "start", "--head", "--port", str(port), "--num-cpus", "2",
        "--resources", json.dumps({"cli_marker": 3}),
    )  # fmt: skip
    try:
        assert started.returncode == 0, testing.describe_run(started)
        yield port
    finally:
        stopped = shoal_cli("stop")
        leak_check("after `shoal stop` of the class's head")
    assert stopped.returncode == 0, testing.describe_run(stopped)


@pytest.mark.usefixtures("head")
class TestHeadStartedByCli:
    def test_driver_joins_with_address_auto(self, run_driver):
        result = _result(run_driver(RESOURCES_DRIVER))
        assert result["squares"] == [0, 1, 4, 9]
        # The marker resource proves the driver joined this head, not a new local cluster.
        assert result["resources"]["cli_marker"] == 3.0
        assert result["resources"]["CPU"] == 2.0

    def test_status_mentions_cpu(self, shoal_cli):
        status = shoal_cli("status")
        assert status.returncode == 0, testing.describe_run(status)
        assert "CPU" in status.stdout, testing.describe_run(status)

    def test_two_drivers_at_once(self, start_driver, tmp_path):
        script = """
        import json, os, sys, time
        import shoal

        me, other = sys.argv[1], sys.argv[2]
        shoal.init(address="auto")

        @shoal.remote
        def square(x):
            return x * x

        first = shoal.get(square.remote(3), timeout=60)
        open(me, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(other):  # both drivers are connected from here on
            if time.monotonic() > deadline:
                sys.exit("the other driver never arrived")
            time.sleep(0.01)
        squares = shoal.get([square.remote(i) for i in range(8)], timeout=60)
        job = shoal.get_runtime_context().get_job_id()
        print("RESULT " + json.dumps({"first": first, "squares": squares, "job": job}))
        """
        a, b = str(tmp_path / "a-ready"), str(tmp_path / "b-ready")
        drivers = [start_driver(script, a, b), start_driver(script, b, a)]
        results = [_result(d.finish(timeout=75)) for d in drivers]
        for result in results:
            assert result["first"] == 9
            assert result["squares"] == [i * i for i in range(8)]
        assert results[0]["job"] != results[1]["job"]

    def test_detached_actor_outlives_its_driver(self, run_driver):
        name, namespace = f"keeper-{uuid.uuid4().hex[:8]}", "cli-tests"
        create = f"""
        import json, shoal
        shoal.init(address="auto")

        @shoal.remote
        class Keeper:
            def __init__(self):
                self.n = 0

            def increment(self):
                self.n += 1
                return self.n

        keeper = Keeper.options(name={name!r}, namespace={namespace!r}, lifetime="detached").remote()
        print("RESULT " + json.dumps(shoal.get(keeper.increment.remote(), timeout=60)))
        shoal.shutdown()
        """
        use = f"""
        import json, shoal
        shoal.init(address="auto")
        keeper = shoal.get_actor({name!r}, namespace={namespace!r})
        value = shoal.get(keeper.increment.remote(), timeout=60)
        shoal.kill(keeper)
        print("RESULT " + json.dumps(value))
        """
        assert _result(run_driver(create)) == 1
        assert _result(run_driver(use)) == 2

    def test_actor_without_detached_lifetime_dies_with_its_driver(self, run_driver):
        name, namespace = f"owned-{uuid.uuid4().hex[:8]}", "cli-tests"
        create = f"""
        import json, shoal
        shoal.init(address="auto")

        @shoal.remote
        class Owned:
            def ping(self):
                return "pong"

        owned = Owned.options(name={name!r}, namespace={namespace!r}).remote()
        print("RESULT " + json.dumps(shoal.get(owned.ping.remote(), timeout=60)))
        """
        check = f"""
        import json, time, shoal
        from shoal.exceptions import ActorDiedError, GetTimeoutError
        shoal.init(address="auto")
        deadline, outcome = time.monotonic() + 20, "alive"
        while time.monotonic() < deadline:  # the owner's exit is noticed asynchronously
            try:
                handle = shoal.get_actor({name!r}, namespace={namespace!r})
            except ValueError:
                outcome = "gone"
                break
            try:
                shoal.get(handle.ping.remote(), timeout=5)
            except ActorDiedError:
                outcome = "dead"
                break
            except GetTimeoutError:
                pass
            time.sleep(0.05)
        print("RESULT " + json.dumps(outcome))
        """
        assert _result(run_driver(create)) == "pong"
        assert _result(run_driver(check)) in ("gone", "dead")


def test_start_refuses_a_session_directory_too_long_for_sockets(shoal_cli, tmp_path):
    # Unix socket paths are limited to 107 bytes; the workers' sockets live in the session
    # directory. This used to "start" and then crash-loop workers forever.
    long_dir = tmp_path / ("x" * 80)
    done = shoal_cli("start", "--head", "--num-cpus", "1", "--temp-dir", str(long_dir))
    assert done.returncode == 1
    assert "too long" in done.stderr and "107" in done.stderr
    assert not long_dir.exists()
