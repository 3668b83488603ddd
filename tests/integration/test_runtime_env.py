"""Runtime environments through the public API, on real clusters: env_vars, merging of the
job's env with a task's, working_dir and py_modules shipped and imported, pip envs built
from a wheel made here (no network), failures, and the node's cache across restarts.

Every test that builds something points SHOAL_RUNTIME_ENV_DIR at a directory of its own
(set before the cluster starts, which inherits it), so builds can be counted.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import pytest
import shoal
from shoal import testing
from shoal.exceptions import ActorDiedError, RuntimeEnvSetupError

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------ helpers


def builds(cache: Path) -> int:
    """How many times a pip environment was built in this cache (one log section each)."""
    return sum(
        Path(log).read_text().count("=== build ")
        for log in glob.glob(str(cache / "venvs" / "*.log"))
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A runtime env cache of the test's own, for the clusters it starts."""
    path = tmp_path / "env-cache"
    monkeypatch.setenv("SHOAL_RUNTIME_ENV_DIR", str(path))
    return path


def _env_reader():
    @shoal.remote
    def read_env(*names):
        import os

        return [os.environ.get(n) for n in names]

    return read_env


# ---------------------------------------------------------------------------- env_vars


def test_env_vars_reach_tasks_and_actors(make_cluster, cache):
    make_cluster(num_cpus=2)
    read_env = _env_reader()
    assert shoal.get(read_env.remote("SHOAL_T_A"), timeout=30) == [None]
    with_a = read_env.options(runtime_env={"env_vars": {"SHOAL_T_A": "task"}})
    assert shoal.get(with_a.remote("SHOAL_T_A"), timeout=30) == ["task"]

    @shoal.remote(runtime_env={"env_vars": {"SHOAL_T_A": "actor", "SHOAL_T_B": "b"}})
    class Reader:
        def read(self, *names):
            import os

            return [os.environ.get(n) for n in names], shoal.get_runtime_context().runtime_env

    reader = Reader.remote()
    values, env = shoal.get(reader.read.remote("SHOAL_T_A", "SHOAL_T_B"), timeout=30)
    assert values == ["actor", "b"]
    assert env == {"env_vars": {"SHOAL_T_A": "actor", "SHOAL_T_B": "b"}}
    # Another env in .options() gets workers of its own; the default ones are untouched.
    other = Reader.options(runtime_env={"env_vars": {"SHOAL_T_A": "other"}}).remote()
    assert shoal.get(other.read.remote("SHOAL_T_A"), timeout=30)[0] == ["other"]
    assert shoal.get(read_env.remote("SHOAL_T_A"), timeout=30) == [None]
    shoal.kill(reader)
    shoal.kill(other)


def test_job_env_merges_with_task_env_as_in_ray(make_cluster, cache):
    job_env = {"env_vars": {"SHOAL_T_A": "job", "SHOAL_T_B": "job"}}
    make_cluster(num_cpus=2, runtime_env=job_env)
    assert shoal.get_runtime_context().runtime_env == job_env
    read_env = _env_reader()
    names = ("SHOAL_T_A", "SHOAL_T_B", "SHOAL_T_C")
    assert shoal.get(read_env.remote(*names), timeout=30) == ["job", "job", None]
    # A task's env_vars merge key by key with the job's; the task's value wins.
    task_env = {"env_vars": {"SHOAL_T_B": "task", "SHOAL_T_C": "task"}}
    assert shoal.get(read_env.options(runtime_env=task_env).remote(*names), timeout=30) == [
        "job",
        "task",
        "task",
    ]

    @shoal.remote(runtime_env={"env_vars": {"SHOAL_T_C": "parent"}})
    def parent(read_env):
        # A child inherits its parent's env (which holds the job's), and merges onto it.
        inherited = shoal.get(read_env.remote(*names))
        own = shoal.get(
            read_env.options(runtime_env={"env_vars": {"SHOAL_T_A": "child"}}).remote(*names)
        )
        return inherited, own, shoal.get_runtime_context().runtime_env

    inherited, own, env = shoal.get(parent.remote(read_env), timeout=60)
    assert inherited == ["job", "job", "parent"]
    assert own == ["child", "job", "parent"]
    assert env["env_vars"] == {"SHOAL_T_A": "job", "SHOAL_T_B": "job", "SHOAL_T_C": "parent"}


# --------------------------------------------------------------- working_dir, py_modules


def test_working_dir_is_shipped_imported_and_the_cwd(make_cluster, cache, tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "helper.py").write_text("def answer():\n    return 42\n")
    (project / "data" / "input.txt").write_text("hello")
    (project / "data" / "huge.log").write_text("left out")
    (project / "notes.tmp").write_text("left out")
    make_cluster(num_cpus=2)

    @shoal.remote(runtime_env={"working_dir": str(project), "excludes": ["*.log", "/notes.tmp"]})
    def use_project():
        import os

        import helper

        return (
            helper.answer(),
            open("data/input.txt").read(),
            sorted(os.listdir(".")),
            os.listdir("data"),
            os.getcwd(),
            shoal.get_runtime_context().runtime_env["working_dir"],
        )

    answer, text, top, data, cwd, uri = shoal.get(use_project.remote(), timeout=60)
    assert (answer, text) == (42, "hello")
    assert top == ["data", "helper.py"] and data == ["input.txt"]
    assert cwd.startswith(str(cache / "pkgs")), cwd  # unpacked in the node's cache
    assert uri.startswith("pkg://")
    # An edit makes a new package: the next use sees it.
    (project / "helper.py").write_text("def answer():\n    return 43\n")
    again = use_project.options(runtime_env={"working_dir": str(project)})
    assert shoal.get(again.remote(), timeout=60)[0] == 43


def test_py_modules_are_importable(make_cluster, cache, tmp_path):
    package = tmp_path / "libs" / "shoal_t_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from .inner import NAME\n")
    (package / "inner.py").write_text("NAME = 'package'\n")
    module = tmp_path / "libs" / "shoal_t_single.py"
    module.write_text("NAME = 'single'\n")
    make_cluster(num_cpus=2)

    @shoal.remote(runtime_env={"py_modules": [str(package), str(module)]})
    def use_modules():
        import shoal_t_pkg
        import shoal_t_single

        return shoal_t_pkg.NAME, shoal_t_single.NAME

    assert shoal.get(use_modules.remote(), timeout=60) == ("package", "single")


def test_bad_envs_fail_at_the_decorator_or_init(make_cluster, cache, tmp_path, monkeypatch):
    cases = [
        ({"conda": "env"}, ValueError, "not supported"),
        ({"workdir": "."}, ValueError, "unknown field 'workdir'"),
        ({"env_vars": {"A": 1}}, TypeError, "env_vars['A'] must be a str"),
        ({"env_vars": ["A"]}, TypeError, "env_vars must be a dict"),
        ({"working_dir": str(tmp_path / "missing")}, ValueError, "does not exist"),
        ({"working_dir": "s3://bucket/x.zip"}, ValueError, "remote URI"),
        ({"py_modules": "mod"}, TypeError, "py_modules must be a list"),
        ({"pip": 3}, TypeError, "pip must be a list"),
        ({"excludes": "*.log"}, TypeError, "excludes must be a list"),
        ({"config": {"setup_timeout_seconds": 0}}, ValueError, "setup_timeout_seconds"),
        ({"config": {"retries": 1}}, ValueError, "unknown field 'retries'"),
    ]
    for env, error, text in cases:
        with pytest.raises(error, match=None) as info:
            shoal.remote(runtime_env=env)(lambda: None)
        assert text in str(info.value), (env, str(info.value))
    with pytest.raises(ValueError, match="does not exist"):
        shoal.init(runtime_env={"working_dir": str(tmp_path / "missing")})
    assert not shoal.is_initialized()  # nothing was started

    # A directory over the size limit fails at its first use, naming the largest files.
    big = tmp_path / "big"
    big.mkdir()
    (big / "weights.bin").write_bytes(b"\0" * 300_000)
    (big / "small.py").write_text("x = 1\n")
    monkeypatch.setenv("SHOAL_RUNTIME_ENV_MAX_PACKAGE_BYTES", "200000")
    make_cluster(num_cpus=1)
    f = shoal.remote(runtime_env={"working_dir": str(big)})(lambda: 1)
    with pytest.raises(ValueError, match="more than the limit") as info:
        f.remote()
    assert "weights.bin" in str(info.value) and "excludes" in str(info.value)
    small = f.options(runtime_env={"working_dir": str(big), "excludes": ["*.bin"]})
    assert shoal.get(small.remote(), timeout=60) == 1


# --------------------------------------------------------------------------------- pip


def test_pip_env_is_built_once_for_concurrent_tasks(
    make_cluster, make_wheel, cache, tmp_path, shoal_cli
):
    wheel = make_wheel(tmp_path, "shoal_t_wheel", "1.5", "VERSION = '1.5'\n")
    make_cluster(num_cpus=2)
    env = {"pip": {"packages": [wheel], "pip_install_options": ["--no-index"]}}

    @shoal.remote(runtime_env=env)
    def where():
        import sys

        import numpy  # the node's packages stay visible
        import shoal_t_wheel

        return shoal_t_wheel.VERSION, sys.prefix, numpy.__name__

    # Six tasks, and an actor of another env (other variables) with the same requirements,
    # all at once: one virtual environment is built, shared by both envs.
    refs = [where.remote() for _ in range(6)]
    Holder = shoal.remote(runtime_env={**env, "env_vars": {"SHOAL_T_X": "1"}})(_holder_class())
    holder = Holder.remote()
    results = shoal.get(refs, timeout=90)
    assert {r[0] for r in results} == {"1.5"}
    prefixes = {r[1] for r in results}
    assert len(prefixes) == 1 and prefixes.pop().startswith(str(cache / "venvs"))
    assert shoal.get(holder.version.remote(), timeout=60) == "1.5"
    assert builds(cache) == 1
    # The driver does not have the package: only the environment's workers do.
    with pytest.raises(ImportError):
        import shoal_t_wheel  # noqa: F401
    status = shoal_cli("status")
    assert status.returncode == 0, status.stderr
    assert "Runtime environments" in status.stdout and "ready" in status.stdout
    assert "shoal_t_wheel" in status.stdout
    shoal.kill(holder)


def _holder_class():
    class Holder:
        def version(self):
            import shoal_t_wheel

            return shoal_t_wheel.VERSION

    return Holder


def test_failing_requirement_fails_fast_without_harming_other_work(make_cluster, cache):
    make_cluster(num_cpus=2)
    bad = {"pip": {"packages": ["shoal-no-such-package"], "pip_install_options": ["--no-index"]}}

    @shoal.remote(runtime_env=bad, max_retries=5)
    def never():
        return "ran"

    @shoal.remote
    def fine(x):
        return x + 1

    started = time.monotonic()
    ref = never.remote()
    assert shoal.get([fine.remote(i) for i in range(4)], timeout=30) == [1, 2, 3, 4]
    with pytest.raises(RuntimeEnvSetupError) as info:
        shoal.get(ref, timeout=60)
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "shoal-no-such-package" in message and "pip install failed" in message
    assert "No matching distribution" in message  # pip's own output
    # Asked again at once: the same error, without another build.
    with pytest.raises(RuntimeEnvSetupError):
        shoal.get(never.remote(), timeout=30)
    assert builds(cache) == 1

    Bad = shoal.remote(runtime_env=bad)(_holder_class())
    actor = Bad.remote()
    with pytest.raises(RuntimeEnvSetupError) as info:
        shoal.get(actor.version.remote(), timeout=60)
    assert isinstance(info.value, ActorDiedError)
    assert "No matching distribution" in str(info.value)
    assert shoal.get(fine.remote(10), timeout=30) == 11


def test_workers_that_cannot_start_fail_the_env(make_cluster, cache):
    make_cluster(num_cpus=1)
    broken = shoal.remote(runtime_env={"env_vars": {"PYTHONHOME": "/nonexistent"}})(lambda: 1)
    with pytest.raises(RuntimeEnvSetupError, match="exit as they start") as info:
        shoal.get(broken.remote(), timeout=60)
    assert "encodings" in str(info.value)  # the end of the worker's own log
    assert shoal.get(shoal.remote(lambda: 2).remote(), timeout=30) == 2


def test_setup_timeout_stops_a_slow_build(make_cluster, cache, tmp_path):
    # A source package whose build never ends (pip runs its setup.py).
    slow = tmp_path / "slowpkg"
    slow.mkdir()
    (slow / "setup.py").write_text(
        "import time\ntime.sleep(120)\nfrom setuptools import setup\nsetup(name='slowpkg')\n"
    )
    make_cluster(num_cpus=1)
    env = {
        "pip": {
            "packages": [str(slow)],
            "pip_install_options": ["--no-index", "--no-build-isolation"],
        },
        "config": {"setup_timeout_seconds": 3},
    }
    started = time.monotonic()
    ref = shoal.remote(runtime_env=env)(lambda: 1).remote()
    # While it builds, the node says so (what `shoal status` shows).
    testing.wait_for(
        lambda: [e["state"] for e in shoal.nodes()[0]["RuntimeEnvs"]] == ["building"],
        timeout=10,
    )
    with pytest.raises(RuntimeEnvSetupError, match="setup_timeout_seconds"):
        shoal.get(ref, timeout=60)
    assert time.monotonic() - started < 20
    testing.wait_for(
        lambda: [e["state"] for e in shoal.nodes()[0]["RuntimeEnvs"]] == ["failed"],
        timeout=10,
    )
    assert shoal.get(shoal.remote(lambda: 2).remote(), timeout=30) == 2


def test_env_cache_survives_a_restart(make_cluster, make_wheel, cache, tmp_path):
    wheel = make_wheel(tmp_path, "shoal_t_cached", "2.0", "VERSION = '2.0'\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "cached_helper.py").write_text("NAME = 'cached'\n")
    env = {"pip": [wheel, "--no-index"], "working_dir": str(project)}  # an option line

    def run_once():
        @shoal.remote
        def use():
            import sys

            import cached_helper
            import shoal_t_cached

            return shoal_t_cached.VERSION, cached_helper.NAME, sys.prefix

        return shoal.get(use.remote(), timeout=90)

    # eager_install (the default for a job's env): built at init, before any task.
    make_cluster(num_cpus=1, runtime_env=env)
    deadline = time.monotonic() + 60
    while builds(cache) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    first = run_once()
    shoal.shutdown()
    venv_ready = glob.glob(str(cache / "venvs" / "*.ready"))
    assert len(venv_ready) == 1
    ready_time = os.stat(venv_ready[0]).st_mtime

    make_cluster(num_cpus=1, runtime_env=env)
    second = run_once()
    assert first == second == ("2.0", "cached", first[2])
    assert builds(cache) == 1  # the second cluster used the first one's environment
    assert os.stat(venv_ready[0]).st_mtime == ready_time


def test_unused_entries_are_evicted_when_the_cache_is_over_its_bound(
    make_cluster, cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHOAL_RUNTIME_ENV_CACHE_BYTES", "1")  # every entry is too much
    dirs = []
    for name in ("first", "second"):
        d = tmp_path / name
        d.mkdir()
        (d / f"{name}_mod.py").write_text(f"NAME = {name!r}\n")
        dirs.append(d)

    def run_in(directory, module):
        @shoal.remote(runtime_env={"working_dir": str(directory)})
        def use(module):
            import importlib
            import os

            return importlib.import_module(module).NAME, os.getcwd()

        return shoal.get(use.remote(module), timeout=60)

    make_cluster(num_cpus=1)
    _, first_dir = run_in(dirs[0], "first_mod")
    assert os.path.isdir(first_dir)  # in use by this node: kept though over the bound
    shoal.shutdown()
    make_cluster(num_cpus=1)
    name, second_dir = run_in(dirs[1], "second_mod")
    assert name == "second" and os.path.isdir(second_dir)
    assert not os.path.exists(first_dir)  # nobody used it any more: evicted
    kept = sorted(p for p in os.listdir(cache / "pkgs") if not p.endswith(".lock"))
    assert kept == [os.path.basename(second_dir), os.path.basename(second_dir) + ".ready"]
