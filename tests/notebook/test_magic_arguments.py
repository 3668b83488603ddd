"""Arguments of %cluster and %%remote, in an in-process IPython shell: bad input gives one
clear line (UsageError), never a traceback, and starts nothing."""

from __future__ import annotations

import argparse

import pytest
import shoal
from IPython.core.error import UsageError
from shoal.jupyter_ext._args import parse_cluster, parse_remote, parse_size, split

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000", 1000),
        ("2GB", 2 * 10**9),
        ("2gb", 2 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5G", int(1.5 * 2**30)),
        ("64 KiB", 64 * 1024),
        ("3TB", 3 * 10**12),
        ("10B", 10),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", "1e9", "two"])
def test_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_split_keeps_bare_json_together():
    words = split('start --resources {"accel": 2, "x y": 1} --cpus 2', "%cluster")
    assert words == ["start", "--resources", '{"accel": 2, "x y": 1}', "--cpus", "2"]
    assert split("start --resources '{\"a\": 1}'", "%cluster")[-1] == '{"a": 1}'


def test_parse_cluster_start():
    command, args = parse_cluster(
        'start --cpus 3 --gpus 1 --resources {"accel": 2} --object-store-memory 512MiB --restart'
    )
    assert command == "start"
    assert (args.cpus, args.gpus, args.resources) == (3, 1, {"accel": 2})
    assert (args.object_store_memory, args.restart) == (512 * 2**20, True)
    assert parse_cluster("start --cpus 0.5")[1].cpus == 0.5


def test_parse_cluster_connect():
    command, args = parse_cluster("connect 10.1.2.3:6380 --key-file ~/cluster.key")
    assert (command, args.address, args.key_file) == ("connect", "10.1.2.3:6380", "~/cluster.key")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "%cluster needs a subcommand"),
        ("launch", "unknown subcommand 'launch'"),
        ("start --cpus x", "--cpus: expected a number >= 0, got 'x'"),
        ("start --cpus -1", "--cpus"),
        ("start --gpus 1.5", "--gpus: expected a whole number >= 0"),
        ("start --resources {bad", "unbalanced braces"),
        ("start --resources '[1]'", "expected a JSON object"),
        ('start --resources {"CPU": 2}', "use --cpus / --gpus"),
        ('start --resources {"a": -1}', "resource 'a' must be a number >= 0"),
        ("start --object-store-memory lots", "expected a size such as 2GB"),
        ("start --frobnicate", "unrecognized arguments: --frobnicate"),
        ("connect", "the following arguments are required: address"),
        ("stop now", "unrecognized arguments: now"),
        ("start --cpus 'unclosed", "No closing quotation"),
    ],
)
def test_cluster_usage_errors(line, message):
    with pytest.raises(UsageError, match=None) as info:
        parse_cluster(line)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--all --node abc", "cannot be combined with --node"),
        ("--all --actor s", "--all cannot be combined with --actor"),
        ("--push 1a", "'1a' is not a variable name"),
        ("--pull a,b-c", "'b-c' is not a variable name"),
        ("--async 9lives", "--async NAME must be a variable name"),
        ("--cpus many", "--cpus: expected a number"),
        ("--bogus", "unrecognized arguments: --bogus"),
    ],
)
def test_remote_usage_errors(line, message):
    with pytest.raises(UsageError) as info:
        parse_remote(line)
    assert message in str(info.value)


def test_parse_remote_options():
    args = parse_remote('--cpus 2 --gpus 1 --resources {"a": 1} --push x,y --pull z --async')
    assert (args.cpus, args.gpus, args.resources) == (2, 1, {"a": 1})
    assert (args.push, args.pull, args.async_name) == (["x", "y"], ["z"], "_remote")
    assert parse_remote("--async job --actor sim").async_name == "job"
    assert parse_remote("").async_name is None


def test_load_ext_registers_the_magics(shell):
    magics = shell.magics_manager.magics
    assert "cluster" in magics["line"] and "remote" in magics["cell"]


def test_bad_arguments_show_one_line_and_start_nothing(shell, capsys):
    result = shell.run_cell("%cluster start --cpus lots")
    assert isinstance(result.error_in_exec, UsageError)
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "UsageError: %cluster start: argument --cpus: expected a number >= 0, got 'lots' "
        "(see %cluster start -h)"
    )
    assert "Traceback" not in captured.out + captured.err
    assert not shoal.is_initialized()


def test_help_shows_usage_and_starts_nothing(shell, capsys):
    result = shell.run_cell("%cluster start -h")
    assert result.error_in_exec is None
    assert "--object-store-memory SIZE" in capsys.readouterr().out
    assert not shoal.is_initialized()
    shell.run_cell("%%remote -h\nx = 1")
    assert "--actor NAME" in capsys.readouterr().out
    assert not shoal.is_initialized()


def test_stop_and_status_without_a_cluster(shell, capsys):
    shell.run_cell("%cluster stop")
    assert "No Shoal cluster is running in this kernel." in capsys.readouterr().out
    shell.run_cell("%cluster status")
    assert "No Shoal cluster is connected" in capsys.readouterr().out


def test_connect_to_nothing_is_one_line(shell, capsys, monkeypatch):
    monkeypatch.delenv("SHOAL_CLUSTER_KEY", raising=False)
    result = shell.run_cell("%cluster connect 127.0.0.1:1")
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err.strip()
    assert err.startswith("UsageError: %cluster connect 127.0.0.1:1: ")
    assert "needs its key" in err and "\n" not in err


def test_init_inside_ipython_registers_the_magics(make_cluster):
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(colors="nocolor")
    try:
        assert "cluster" not in sh.magics_manager.magics["line"]
        make_cluster(num_cpus=1)
        assert "cluster" in sh.magics_manager.magics["line"]
        assert "remote" in sh.magics_manager.magics["cell"]
        sh.run_line_magic("load_ext", "shoal")  # loading it as well changes nothing
        assert sh.run_cell("%%remote\n40 + 2").result == 42
    finally:
        sh.run_line_magic("unload_ext", "shoal")
        assert "cluster" not in sh.magics_manager.magics["line"]
        InteractiveShell.clear_instance()
