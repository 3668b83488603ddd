"""Task errors as IPython shows them (jupyter_ext/_tracebacks.py), without a cluster: the
errors are built as a worker builds them."""

from __future__ import annotations

import pytest
from kernel_helpers import strip_ansi
from shoal.exceptions import GetTimeoutError, TaskError
from shoal.jupyter_ext import _tracebacks
from shoal.jupyter_ext._tracebacks import local_face, parse_remote_traceback, render

pytestmark = pytest.mark.timeout(30)

CELL = "import shoal\n@shoal.remote\ndef f(x):\n    return 1 / x\n"


def remote_text(cell_file: str) -> str:
    """What a worker's traceback of f(0) looks like, runtime frames and all."""
    return (
        "Traceback (most recent call last):\n"
        '  File "/opt/venv/lib/python3.11/site-packages/shoal/jupyter_ext/_runner.py", line 80, in execute\n'
        "    value = _run_source(request, ns)\n"
        '  File "/opt/venv/lib/python3.11/site-packages/shoal/_worker.py", line 500, in _call\n'
        "    return fn(*args)\n"
        f'  File "{cell_file}", line 4, in f\n'
        "    return 1 / x\n"
        "           ~~^~~\n"
        "ZeroDivisionError: division by zero\n"
    )


def task_error(remote: str, cause: BaseException | None = None) -> TaskError:
    err = TaskError(
        "f() failed with ZeroDivisionError on node abcdef012345 (pid=4242, worker=...):\n" + remote,
        cause=cause if cause is not None else ZeroDivisionError("division by zero"),
        cause_type_name="ZeroDivisionError",
        remote_traceback=remote,
        task_name="f",
        pid=4242,
        node_id="abcdef012345" + "0" * 20,
        worker_id="11" * 8,
    )
    return err.as_instanceof_cause()


def raised(err: BaseException) -> BaseException:
    try:
        raise err
    except BaseException as exc:
        return exc


def test_parse_frames_carets_and_exception():
    parsed = parse_remote_traceback(remote_text("/tmp/cell.py"))
    assert [(f.filename.rsplit("/", 1)[-1], f.lineno, f.name) for f in parsed.frames] == [
        ("_runner.py", 80, "execute"),
        ("_worker.py", 500, "_call"),
        ("cell.py", 4, "f"),
    ]
    assert parsed.frames[2].line == "return 1 / x"
    assert parsed.exception == "ZeroDivisionError: division by zero"


def test_parse_recursion_note_and_multiline_message():
    text = (
        "Traceback (most recent call last):\n"
        '  File "/a.py", line 2, in r\n'
        "    return r()\n"
        "  [Previous line repeated 996 more times]\n"
        "ValueError: first line\n"
        "second line\n"
    )
    parsed = parse_remote_traceback(text)
    assert len(parsed.frames) == 1
    assert parsed.frames[0].extra == ["[Previous line repeated 996 more times]"]
    assert parsed.exception == "ValueError: first line\nsecond line"


def test_parse_no_frames():
    assert parse_remote_traceback("KeyError: 'k'").exception == "KeyError: 'k'"
    assert parse_remote_traceback("").frames == []


def test_render_in_ipython_names_the_cell_and_hides_the_runtime(shell):
    cell_file = shell.compile.cache(CELL, 3)
    err = raised(task_error(remote_text(cell_file)))
    text = strip_ansi("\n".join(render(err)))
    lines = text.splitlines()
    assert lines[1].startswith("ZeroDivisionError") and "Traceback" in lines[1]
    assert "Task f failed on node abcdef012345 (pid 4242):" in text
    assert "Cell In[3], line 4, in f" in text
    # The worker had no source for the notebook's cell: the lines come from the notebook.
    assert "      3 def f(x):" in text
    assert "----> 4     return 1 / x" in text
    assert "_runner.py" not in text and "_worker.py" not in text
    assert lines[-1] == "ZeroDivisionError: division by zero"
    # The caller's frame (this test) is shown as a file frame.
    assert "test_remote_tracebacks.py" in text


def test_render_without_source_uses_the_workers_line(shell):
    err = raised(task_error(remote_text("/elsewhere/job.py")))
    text = strip_ansi("\n".join(render(err)))
    assert "File /elsewhere/job.py:4, in f" in text
    assert "----> return 1 / x" in text


def test_hidden_local_frames_and_summary_of_others(shell):
    err = raised(task_error(remote_text("/elsewhere/job.py")))
    err._shoal_hide_local_frames = True
    err._shoal_also_failed = "(This was on node a. Also failed: KeyError on 2 other nodes.)"
    text = strip_ansi("\n".join(render(err)))
    assert "test_remote_tracebacks.py" not in text
    assert text.splitlines()[-1] == "(This was on node a. Also failed: KeyError on 2 other nodes.)"


def test_other_shoal_errors_render_without_runtime_frames(shell):
    err = raised(GetTimeoutError("get() timed out after 0.1s: 1 of 1 objects are not ready"))
    text = strip_ansi("\n".join(render(err)))
    assert text.splitlines()[-1] == (
        "GetTimeoutError: get() timed out after 0.1s: 1 of 1 objects are not ready"
    )


def test_render_never_raises(shell, monkeypatch):
    def broken(err):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(_tracebacks, "_render", broken)
    err = raised(task_error("garbage"))
    lines = render(err)
    assert lines and "ZeroDivisionError" in strip_ansi("\n".join(lines))


def test_ipython_uses_render_traceback(shell, capsys):
    shell.user_ns["err"] = task_error(remote_text("/elsewhere/job.py"))
    shell.run_cell("raise err")
    out = strip_ansi(capsys.readouterr().out)
    assert "Task f failed on node abcdef012345 (pid 4242):" in out
    assert "ZeroDivisionError: division by zero" in out


def test_local_face():
    err = task_error(remote_text("/x.py"))
    etype, value = local_face(err)
    assert etype is ZeroDivisionError and str(value) == "division by zero"
    # An exception that could not be pickled arrives as text only.
    bare = TaskError(
        "m", cause=None, cause_type_name="LockError", remote_traceback="mod.LockError: no pickle"
    )
    etype, value = local_face(bare)
    assert etype.__name__ == "LockError" and str(value) == "no pickle"
    assert local_face(ValueError("x")) is None
