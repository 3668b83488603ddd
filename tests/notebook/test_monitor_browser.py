"""The monitor, the progress bar and a remote error in a real browser: JupyterLab on
127.0.0.1 with a token and a temporary root, driven by Playwright with Debian's chromium
(Playwright cannot download browsers here). What a person would see is saved as
screenshots in a directory the tests print (``SHOAL_TEST_ARTIFACTS`` chooses it).

Skipped, with the reason, only when no chromium is found (``tools/install-system-deps.sh``
installs it); everything else these tests need comes with the ``test`` extra.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from shoal import testing


def find_chromium() -> str | None:
    for candidate in (
        os.environ.get("SHOAL_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/bin/chromium",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
# Without the networking flags Chromium keeps trying to reach the (closed) internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium found (tools/install-system-deps.sh installs it with "
        "`apt-get install chromium`; SHOAL_CHROMIUM names another binary)",
    ),
]

TASKS = 400
CELLS = [
    "%load_ext shoal\n%cluster start --cpus 2",
    f"""\
import shoal, time

@shoal.remote
def work(i):
    time.sleep(0.02)
    if i % 100 == 99:
        raise ValueError(f"task {{i}} failed on purpose")
    return i

@shoal.remote
class Tally:
    def add(self, n):
        return n

tally = Tally.options(name="tally").remote()
table = shoal.put(b"x" * 5_000_000)
refs = [work.remote(i) for i in range({TASKS})] + [tally.add.remote(1)]
try:
    shoal.get(refs)
except ValueError as exc:
    print("a task failed:", exc.cause_type_name)""",
    "shoal.get(work.remote(99))",
]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("SHOAL_TEST_ARTIFACTS")
    path = Path(chosen) / "browser" if chosen else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def lab(
    kernel_name: str, tmp_path_factory: pytest.TempPathFactory, _leak_guard: Any
) -> Iterator[dict[str, Any]]:
    """A JupyterLab server on loopback, its root holding the test's notebook."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": kernel_name,
        "display_name": kernel_name,
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nbformat.write(nb, root / "monitor.ipynb")
    # No "would you like news?" prompt over the page.
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port, token = testing.free_port(), secrets.token_hex(16)
    # The kernelspecs of the session (conftest) and the widget manager's frontend, which
    # lives under the base interpreter's share/ when this runs in a venv that uses it.
    paths = [os.environ.get("JUPYTER_PATH", ""), os.path.join(sys.prefix, "share", "jupyter")]
    paths.append(os.path.join(sys.base_prefix, "share", "jupyter"))
    env = dict(
        os.environ,
        JUPYTER_PATH=os.pathsep.join(p for p in paths if p),
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(base / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
    )
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    seen: dict[int, psutil.Process] = {}
    try:

        def serving() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"jupyter lab exited:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    return True
            except OSError:
                return False

        testing.wait_for(serving, timeout=90, interval=0.2)
        yield {"url": url, "token": token, "server": server, "seen": seen, "log": log_path}
    finally:
        try:
            for child in psutil.Process(server.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.Error:
            pass
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        leftover = []
        for proc in seen.values():
            try:
                proc.kill()
                leftover.append(proc)
            except psutil.Error:
                pass
        psutil.wait_procs(leftover, timeout=10)
        _leak_guard.check("after the JupyterLab server's shutdown")


def kernel_ready(lab: dict[str, Any]) -> bool:
    try:
        url = f"{lab['url']}/api/kernels?token={lab['token']}"
        with urllib.request.urlopen(url, timeout=5) as r:
            kernels = json.load(r)
    except OSError as exc:  # HTTPError included: asked again until the deadline
        lab["last_error"] = repr(exc)
        return False
    return bool(kernels) and all(
        k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels
    )


@pytest.fixture(scope="module")
def page(lab: dict[str, Any], artifacts: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            open_notebook(page, f"{lab['url']}/lab/tree/monitor.ipynb?token={lab['token']}")
            try:
                testing.wait_for(lambda: kernel_ready(lab), timeout=90, interval=0.2)
            except TimeoutError:
                raise AssertionError(
                    f"the notebook's kernel never became ready ({lab.get('last_error')}); "
                    f"the server's log:\n{lab['log'].read_text()[-3000:]}"
                ) from None
            # Note the kernel's processes now: teardown ends them if the server does not.
            for child in psutil.Process(lab["server"].pid).children(recursive=True):
                lab["seen"].setdefault(child.pid, child)
            yield page
        finally:
            try:
                page.screenshot(path=str(artifacts / "last.png"), full_page=True)
            except Exception:
                pass
            browser.close()


def open_notebook(page: Any, url: str, attempts: int = 3) -> None:
    """Load the page until JupyterLab has its theme: on a loaded machine the theme's
    stylesheet can time out, which leaves an unstyled page behind an error dialog."""
    for attempt in range(attempts):
        page.goto(url)
        page.wait_for_selector("body[data-jp-theme-name] .jp-NotebookPanel, .jp-Dialog")
        if page.locator(".jp-Dialog").count() == 0:
            page.wait_for_selector("body[data-jp-theme-name] .jp-NotebookPanel")
            return
        message = page.locator(".jp-Dialog").first.inner_text()
        if attempt == attempts - 1:
            raise AssertionError(f"JupyterLab showed an error while loading: {message}")


def cell(page: Any, index: int) -> Any:
    return page.locator(".jp-NotebookPanel .jp-Cell").nth(index)


def run_cell(page: Any, index: int) -> None:
    cell(page, index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def running(page: Any, index: int) -> bool:
    return "*" in cell(page, index).locator(".jp-InputPrompt").inner_text()


FINISHED_JS = """() => {
  // The "finished" cell of the row of `work` in the monitor's table of functions.
  const rows = document.querySelectorAll('.shoal-cluster-monitor table.shoal-functions tr');
  for (const row of rows) {
    const cells = row.querySelectorAll('td');
    if (cells.length && cells[0].textContent === 'work') {
      return Number(cells[4].textContent.replace(/,/g, '') || 0);
    }
  }
  return null;
}"""


def test_the_monitor_renders_moves_with_the_tasks_and_expands_a_failure(
    page: Any, artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(f"\nbrowser screenshots: {artifacts}")
    started = time.monotonic()
    run_cell(page, 0)
    monitor = page.locator(".jp-OutputArea-output .shoal-cluster-monitor")
    monitor.wait_for(state="visible")
    assert "live, every 0.25 s" in monitor.locator(".shoal-monitor-status").inner_text()
    assert monitor.locator("table.shoal-nodes").is_visible()  # the widget, not a fallback

    run_cell(page, 1)
    seen_while_running: list[int] = []
    bar_seen = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        value = page.evaluate(FINISHED_JS)
        busy = running(page, 1)
        bar_seen = bar_seen or page.locator(".jp-OutputArea-output .shoal-progress").count() > 0
        if busy and value is not None:
            seen_while_running.append(value)
        if not busy and value == TASKS - 4:
            break
        page.wait_for_timeout(100)
    assert page.evaluate(FINISHED_JS) == TASKS - 4
    assert len(set(seen_while_running)) >= 3, seen_while_running  # it moved as tasks ran
    assert seen_while_running == sorted(seen_while_running)
    assert bar_seen  # the get's progress bar showed while it waited...
    summary = cell(page, 1).locator(".shoal-progress-summary")  # ...and became a summary
    assert re.search(
        rf"shoal\.get: {TASKS + 1} of {TASKS + 1} done, 4 failed", summary.inner_text()
    )
    page.screenshot(path=str(artifacts / "tasks-done.png"), full_page=True)

    headers = monitor.locator(".jupyter-widget-Collapse-header")
    testing.wait_for(lambda: headers.count() == 4, timeout=30, interval=0.1)
    header = headers.filter(has_text="task 199 failed on purpose")
    traceback = monitor.locator(
        ".jupyter-widget-Collapse-contents:not(.lm-mod-hidden) pre.shoal-traceback"
    )
    assert traceback.count() == 0  # closed until clicked
    header.click()
    traceback.wait_for(state="visible")
    text = traceback.inner_text()
    assert "Traceback (most recent call last)" in text
    assert "ValueError: task 199 failed on purpose" in text
    assert "Cell In[2], line 7, in work" in text  # as the notebook's own errors say
    actors = monitor.locator("table.shoal-actors").inner_text()
    assert "Tally" in actors and "tally" in actors and "alive" in actors
    objects = monitor.locator("table.shoal-objects").inner_text()
    assert "4.8 MiB" in objects and "put() at Cell In[2], line 16" in objects
    monitor.scroll_into_view_if_needed()
    monitor.screenshot(path=str(artifacts / "monitor.png"))
    with capsys.disabled():
        print(f"monitor test: {time.monotonic() - started:.1f} s in the page")


def test_a_remote_error_reads_like_a_local_one(page: Any, artifacts: Path) -> None:
    run_cell(page, 2)
    error = cell(page, 2).locator(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    )
    error.wait_for(state="visible")
    text = error.inner_text()
    assert "ValueError: task 99 failed on purpose" in text
    assert "Task work failed on node" in text and "Cell In[2], line 7, in work" in text
    assert "shoal/_" not in text  # no frames of the runtime
    cell(page, 2).scroll_into_view_if_needed()
    cell(page, 2).screenshot(path=str(artifacts / "remote_error.png"))
