"""runtime_env without a cluster: validation, Ray's merge rule, keys, excludes patterns,
packages (content hashes, unpacking that refuses what could escape), and the node cache."""

from __future__ import annotations

import io
import os
import threading
import zipfile

import pytest
from shoal.runtime_env import RuntimeEnv, RuntimeEnvConfig
from shoal.runtime_env._cache import EnvCache
from shoal.runtime_env._excludes import Excludes
from shoal.runtime_env._packaging import package_dir, package_zip, unpack
from shoal.runtime_env._spec import check_wire, describe, merge, validate
from shoal.runtime_env._state import env_key

pytestmark = pytest.mark.timeout(20)


def test_merge_replaces_fields_but_merges_env_vars():
    parent = {"env_vars": {"A": "a", "B": "b"}, "pip": {"packages": ["x"]}, "working_dir": "p"}
    child = {"env_vars": {"B": "B", "C": "c"}, "pip": {"packages": ["y"]}}
    assert merge(parent, child) == {
        "env_vars": {"A": "a", "B": "B", "C": "c"},
        "pip": {"packages": ["y"]},
        "working_dir": "p",
    }
    assert parent["env_vars"] == {"A": "a", "B": "b"}  # not changed in place


def test_keys_ignore_config_and_order_and_are_empty_for_nothing():
    assert env_key({}) == "" and env_key({"config": {"eager_install": False}}) == ""
    a = env_key({"env_vars": {"A": "1", "B": "2"}, "config": {"setup_timeout_seconds": 5}})
    b = env_key({"env_vars": {"B": "2", "A": "1"}})
    assert a == b and len(a) == 32
    assert env_key({"env_vars": {"A": "2"}}) != a


def test_validate_normalizes_and_none_fields_are_unset(tmp_path):
    (tmp_path / "w").mkdir()
    req = tmp_path / "requirements.txt"
    req.write_text("# a comment\nrequests==2.31  # pinned\n\n--no-index\n")
    env = validate(
        {
            "working_dir": str(tmp_path / "w" / ".." / "w"),
            "pip": str(req),
            "py_modules": None,
            "env_vars": {"X": "1"},
        }
    )
    assert env["working_dir"] == str(tmp_path / "w")
    assert env["pip"]["packages"] == ["requests==2.31", "--no-index"]
    assert "py_modules" not in env
    assert validate(env) == env  # validating twice changes nothing (.options() does)


def test_a_local_wheel_is_named_by_its_content(tmp_path):
    wheel = tmp_path / "w-1.0-py3-none-any.whl"
    wheel.write_bytes(b"one")
    first = validate({"pip": [str(wheel)]})
    wheel.write_bytes(b"two")
    second = validate({"pip": [str(wheel)]})
    assert env_key(first) != env_key(second)


def test_runtime_env_classes_check_what_they_hold(tmp_path):
    env = RuntimeEnv(env_vars={"A": "1"}, config=RuntimeEnvConfig(setup_timeout_seconds=5))
    assert env == {
        "env_vars": {"A": "1"},
        "config": {"setup_timeout_seconds": 5, "eager_install": True},
    }
    with pytest.raises(ValueError, match="does not exist"):
        RuntimeEnv(working_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="setup_timeout_seconds"):
        RuntimeEnvConfig(setup_timeout_seconds=-5)
    assert describe({"env_vars": {"A": "1"}, "pip": {"packages": ["a", "b"]}}) == (
        "pip (a, b), env_vars (1)"
    )


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        ([], "must be a dict"),
        ({"conda": "x"}, "no plugin for the runtime_env field 'conda'"),
        ({"env_vars": {"A": 1}}, "env_vars must be a dict of str to str"),
        ({"env_vars": {"SHOAL_WORKER_ID": "x"}}, "env_vars must be"),
        ({"working_dir": "/etc"}, "working_dir must be a package URI"),
        ({"py_modules": ["pkg://" + "a" * 32, 3]}, "py_modules must be"),
        ({"pip": {"packages": "x"}}, "pip must be"),
        ({"pip": {"packages": ["a"], "extra": 1}}, "pip must be"),
        ({"excludes": "x"}, "excludes must be"),
    ],
)
def test_nodes_refuse_malformed_wire_envs(wire, reason):
    with pytest.raises(ValueError, match=reason):
        check_wire(wire)
    valid = {
        "working_dir": "pkg://" + "a" * 32 + "/sub",
        "py_modules": ["pkg://" + "b" * 32],
        "pip": {"packages": ["x"], "pip_check": False, "pip_install_options": []},
        "env_vars": {"A": "1"},
        "excludes": ["*.log"],
        "config": {"setup_timeout_seconds": 5},
    }
    assert check_wire(valid) is valid


@pytest.mark.parametrize(
    ("patterns", "path", "is_dir", "excluded"),
    [
        (["*.log"], "a.log", False, True),
        (["*.log"], "deep/er/a.log", False, True),
        (["*.log"], "a.log.txt", False, False),
        (["/top.txt"], "top.txt", False, True),
        (["/top.txt"], "sub/top.txt", False, False),
        (["data/"], "data", True, True),
        (["data/"], "data", False, False),
        (["data/"], "x/data", True, True),
        (["a/b"], "a/b", False, True),
        (["a/b"], "x/a/b", False, False),
        (["**/cache"], "x/y/cache", True, True),
        (["logs/**"], "logs/a/b", False, True),
        (["a/**/z"], "a/z", False, True),
        (["a/**/z"], "a/b/c/z", False, True),
        (["*.py", "!keep.py"], "keep.py", False, False),
        (["*.py", "!keep.py"], "drop.py", False, True),
        (["file?.txt"], "file1.txt", False, True),
        (["file?.txt"], "file10.txt", False, False),
        (["[ab].txt"], "b.txt", False, True),
        (["[!ab].txt"], "b.txt", False, False),
        (["# comment", ""], "# comment", False, False),
    ],
)
def test_excludes_match_like_gitignore(patterns, path, is_dir, excluded):
    assert Excludes(patterns).excluded(path, is_dir) is excluded


def test_packages_are_named_by_content_and_unpack_intact(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("X = 1\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o755)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "x.pyc").write_bytes(b"cache")
    first = package_dir(str(src), [], keep_name=False)
    os.utime(src / "run.sh", (1, 1))  # times do not matter, content does
    assert package_dir(str(src), [], keep_name=False).uri == first.uri
    dest = tmp_path / "out"
    unpack(first.uri, first.data, str(dest))
    assert sorted(os.listdir(dest)) == ["pkg", "run.sh"]  # no __pycache__
    assert os.access(dest / "run.sh", os.X_OK)
    (src / "pkg" / "__init__.py").write_text("X = 2\n")
    assert package_dir(str(src), [], keep_name=False).uri != first.uri
    named = package_dir(str(src / "pkg"), [], keep_name=True)
    unpack(named.uri, named.data, str(tmp_path / "named"))
    assert os.listdir(tmp_path / "named") == ["pkg"]


def test_unpack_refuses_content_that_is_not_what_the_uri_names(tmp_path):
    pkg = package_dir(str(_tree(tmp_path)), [], keep_name=False)
    other = "pkg://" + "0" * 32
    with pytest.raises(ValueError, match="other content"):
        unpack(other, pkg.data, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../evil.py", "/abs.py", "a/../../evil.py", "a\\b.py"])
def test_unpack_refuses_names_that_could_escape(tmp_path, name):
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr(name, "x")
    path = tmp_path / "bad.zip"
    path.write_bytes(data.getvalue())
    with pytest.raises(ValueError, match="unsafe name"):
        package_zip(str(path))


def test_a_zip_with_one_top_directory_names_it(tmp_path):
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("project/main.py", "x = 1\n")
        zf.writestr("project/lib/util.py", "y = 2\n")
    path = tmp_path / "project.zip"
    path.write_bytes(data.getvalue())
    pkg, top = package_zip(str(path))
    assert top == "project" and pkg.uri.startswith("pkg://")


def test_cache_entries_are_made_once_and_evicted_when_unused(tmp_path):
    cache = EnvCache(str(tmp_path / "cache"), max_bytes=10)
    made = []

    def make():
        with cache.entry("pkgs", "ab" * 16) as entry:
            if not entry.ready:
                made.append(1)
                os.makedirs(entry.path)
                with open(os.path.join(entry.path, "f"), "w") as f:
                    f.write("x" * 100)
                entry.mark_ready()

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [1]
    assert cache.evict() == []  # in use by this process: kept though over the bound
    cache.close()
    other = EnvCache(str(tmp_path / "cache"), max_bytes=10)
    assert other.evict() == ["pkgs/" + "ab" * 16]
    assert os.listdir(tmp_path / "cache" / "pkgs") == []


def _tree(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.py").write_text("a = 1\n")
    return root
