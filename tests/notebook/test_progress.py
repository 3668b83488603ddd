"""Progress bars outside a notebook: ``shoal.get`` under the extension in an in-process
IPython shell (a terminal's case: text on stderr), ``shoal.widgets.progress`` in plain
Python, on a pipe and on a terminal (a pty), and the get path's guarantees (no bar for
one ref or a quick get, a broken display never breaks a get)."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import shoal
from shoal import _api
from shoal.exceptions import GetTimeoutError
from shoal.widgets import ProgressBar, progress

pytestmark = pytest.mark.timeout(60)


def napper():
    @shoal.remote
    def nap(seconds, fail=False):
        time.sleep(seconds)
        if fail:
            raise ValueError("nap failed")
        return seconds

    return nap


def test_a_slow_get_of_a_list_shows_its_progress_then_a_summary(shell, make_cluster, capsys):
    make_cluster(num_cpus=2)
    nap = napper()
    assert _api._get_watcher is not None  # the extension installed it
    refs = [nap.remote(0.6) for _ in range(4)]  # 1.2 s on 2 CPUs: past the 1 s threshold
    assert shoal.get(refs) == [0.6] * 4
    err = capsys.readouterr().err
    assert re.search(r"^shoal\.get: 4 of 4 done, in \d+\.\d s \([\d.]+/s\)$", err, re.M), err


def test_failures_are_counted_and_the_error_still_raised(shell, make_cluster, capsys):
    make_cluster(num_cpus=2)
    nap = napper()
    refs = [nap.remote(0.6, fail=(i == 1)) for i in range(4)]
    with pytest.raises(ValueError, match="nap failed"):
        shoal.get(refs)
    assert "shoal.get: 4 of 4 done, 1 failed, in " in capsys.readouterr().err


def test_a_timeout_is_summarized(shell, make_cluster, capsys, gate, wait_path):
    make_cluster(num_cpus=2)
    release = gate()

    @shoal.remote
    def held(path):
        wait_path(path)

    refs = [held.remote(release) for _ in range(3)]
    with pytest.raises(GetTimeoutError):
        shoal.get(refs, timeout=1.3)
    assert re.search(r"shoal\.get: 0 of 3 timed out, in 1\.\d s", capsys.readouterr().err)
    Path(release).touch()
    shoal.get(refs)


def test_an_interrupted_get_says_so(shell, make_cluster, capsys, gate, wait_path, monkeypatch):
    from shoal.widgets import _progress

    make_cluster(num_cpus=2)
    release = gate()

    @shoal.remote
    def held(path):
        wait_path(path)

    shown = threading.Event()

    def watcher(total, started):
        bar = _progress.watch_get(total, started)
        shown.set()
        return bar

    monkeypatch.setattr(_api, "_get_watcher", watcher)
    interrupter = threading.Thread(
        target=lambda: shown.wait(30) and os.kill(os.getpid(), signal.SIGINT)
    )
    refs = [held.remote(release) for _ in range(2)]
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        shoal.get(refs)
    interrupter.join(5)
    assert "shoal.get: 0 of 2 interrupted, in " in capsys.readouterr().err
    Path(release).touch()
    assert shoal.get(refs) == [None, None]


def test_no_bar_for_quick_gets_single_refs_other_threads_or_without_the_extension(
    shell, make_cluster, capsys
):
    make_cluster(num_cpus=2)
    nap = napper()
    assert shoal.get([nap.remote(0) for _ in range(20)]) == [0] * 20  # well under a second
    assert shoal.get(nap.remote(1.2)) == 1.2  # one ref: the fast path, never a bar
    results = []
    worker = threading.Thread(
        target=lambda: results.append(shoal.get([nap.remote(0.6)] * 2 + [nap.remote(0.7)]))
    )
    worker.start()
    worker.join(30)
    assert results == [[0.6, 0.6, 0.7]]  # a get of another thread than the cell's: no bar
    shell.run_line_magic("unload_ext", "shoal")
    assert _api._get_watcher is None
    assert shoal.get([nap.remote(0.7) for _ in range(4)]) == [0.7] * 4
    assert capsys.readouterr().err == ""
    shell.run_line_magic("load_ext", "shoal")  # for the fixture's teardown


class BrokenReporter:
    def __init__(self) -> None:
        self.calls = 0

    def update(self, done: int, failed: int) -> None:
        self.calls += 1
        raise RuntimeError("the display broke")

    def finish(self, done: int, failed: int, outcome: str) -> None:
        raise RuntimeError("the display broke again")


def test_a_broken_display_never_breaks_the_get(make_cluster, monkeypatch, caplog):
    make_cluster(num_cpus=2)
    nap = napper()
    reporter = BrokenReporter()
    monkeypatch.setattr(_api, "_get_watcher", lambda total, started: reporter)
    assert shoal.get([nap.remote(0.6) for _ in range(4)]) == [0.6] * 4
    assert reporter.calls == 1  # it broke once and was not asked again
    assert "the progress display failed" in caplog.text

    def no_watcher(total, started):
        raise RuntimeError("no display today")

    monkeypatch.setattr(_api, "_get_watcher", no_watcher)
    assert shoal.get([nap.remote(0.6) for _ in range(4)]) == [0.6] * 4
    assert "the progress display could not be made" in caplog.text


def test_explicit_progress_in_plain_python_blocks_and_summarizes(make_cluster, capsys):
    make_cluster(num_cpus=2)
    nap = napper()
    refs = [nap.remote(0.05, fail=(i == 3)) for i in range(20)]
    bar = progress(refs, label="naps")
    assert bar.finished and bar.outcome == "done"
    assert (bar.total, bar.done, bar.failed) == (20, 20, 1)
    err = capsys.readouterr().err
    assert re.fullmatch(r"naps: 20 of 20 done, 1 failed, in \S+ \S+ \([\d.]+/s\)\n", err), err
    assert repr(bar) == err.strip()


def test_explicit_progress_without_blocking_can_be_closed(make_cluster, capsys, gate, wait_path):
    make_cluster(num_cpus=2)
    release = gate()

    @shoal.remote
    def held(path):
        wait_path(path)
        return 1

    refs = [held.remote(release) for _ in range(2)]
    bar = progress(refs, block=False)
    assert not bar.wait(0.3)  # held: not done
    thread = bar._thread
    bar.close()
    assert not thread.is_alive() and bar.outcome == "stopped"
    assert "progress: 0 of 2 stopped" in capsys.readouterr().err
    Path(release).touch()
    second = progress(refs, block=False)
    assert second.wait(20) and second.done == 2 and second.outcome == "done"
    assert shoal.get(refs) == [1, 1]


def test_bad_input_is_named(make_cluster, monkeypatch):
    make_cluster(num_cpus=1)
    with pytest.raises(TypeError, match="progress\\(\\) expects ObjectRefs, but item 1 is a int"):
        progress([shoal.put(1), 2])
    monkeypatch.setenv("SHOAL_PROGRESS", "loud")
    with pytest.raises(
        ValueError, match="SHOAL_PROGRESS must be one of auto, widget, html, text, off"
    ):
        progress([shoal.put(1)])
    monkeypatch.setenv("SHOAL_PROGRESS", "off")
    bar = progress([shoal.put(1)])
    assert bar.finished and bar._view is None


def test_progress_bar_texts():
    bar = ProgressBar(2000, label="work", view=None, started=time.monotonic() - 4.0)
    bar.update(1000, 3)
    assert re.fullmatch(
        r"work: \[#{12}\.{12}\] 1,000/2,000 done · 3 failed · 2\d\d/s · \d\.\d s left", bar.text()
    ), bar.text()
    html = bar.html()
    assert "<b>1,000</b> / 2,000 done" in html and "3 failed" in html
    bar.finish(2000, 3, "done")
    assert re.fullmatch(
        r"work: 2,000 of 2,000 done, 3 failed, in 4\.\d s \(\d+/s\)", bar.summary_text()
    )
    assert "&#10008;" in bar.summary_html()  # failures: not a plain tick


SCRIPT = """
import time, shoal
from shoal.widgets import progress

shoal.init(num_cpus=2)

@shoal.remote
def nap(i):
    time.sleep(0.05)
    return i

refs = [nap.remote(i) for i in range(60)]
bar = progress(refs)
assert bar.done == 60, bar
print("get", sum(shoal.get([nap.remote(i) for i in range(30)])))
shoal.shutdown()
"""


def test_plain_python_on_a_pipe_gets_one_summary_line(start_driver):
    driver = start_driver(SCRIPT)
    assert driver.finish(timeout=60) == "get 435\n"
    # No terminal: no redrawing, only the summary; get() shows nothing outside IPython.
    assert re.fullmatch(r"progress: 60 of 60 done, in \S+ s \([\d.]+/s\)\n", driver.stderr())


def test_plain_python_on_a_terminal_redraws_one_line(tmp_path: Path):
    script = tmp_path / "tty.py"
    script.write_text(textwrap.dedent(SCRIPT))
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=child, stdout=child, stderr=child, cwd=tmp_path
    )
    os.close(child)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=30) == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    text = out.decode(errors="replace")
    frames = text.split("\r")
    partial = [f for f in frames if re.search(r"progress: \[[#.]{24}\] \d+/60 done", f)]
    assert len(partial) >= 2, text  # redrawn in place while the naps ran
    assert re.search(r"\rprogress: 60 of 60 done, in \S+ s \([\d.]+/s\) *\r?\n", text), text
    assert "get 435" in text
