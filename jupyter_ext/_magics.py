"""The magics: ``%cluster start | connect | stop | status | monitor`` and ``%%remote``.

``register(shell)`` adds them to an IPython shell (``%load_ext shoal`` and ``shoal.init()``
inside IPython both call it; a second call does nothing). It also makes the notebook's
error output of a task error name the original exception (``ZeroDivisionError: division by
zero``) rather than Shoal's wrapper; the traceback itself comes from the error's
``_render_traceback_`` (_tracebacks.py); and it lets ``shoal.get`` of several refs show a
progress bar when it waits (shoal.widgets).
"""

from __future__ import annotations

import argparse
from typing import Any

import shoal
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.display import display

from ._args import HelpShown, parse_cluster
from ._output import cancel_cell_work, cell_tags, forget_cell_tags, install
from ._remote import RemoteCells
from ._reprs import ClusterSummary, cluster_snapshot


@magics_class
class ShoalMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.remote_cells = RemoteCells(shell)
        self.monitor: Any = None  # the ClusterMonitor the magics showed last

    @no_var_expand
    @line_magic
    def cluster(self, line: str) -> None:
        """Start, join, stop or show the cluster this kernel drives.

        %cluster start [--cpus N] [--gpus N] [--resources JSON] [--object-store-memory SIZE] [--restart]
        %cluster connect ADDRESS [--key-file FILE]
        %cluster stop
        %cluster status
        %cluster monitor [--interval SECONDS]

        `start` starts a local cluster with this kernel as its driver (it stops with the
        kernel); SIZE is like 2GB, 512MiB or a number of bytes. `connect` joins a running
        cluster: HOST:PORT (or tcp://HOST:PORT) in client-server mode, with the key from
        --key-file or $SHOAL_CLUSTER_KEY; `auto` joins the one `shoal start --head` started
        on this machine. `monitor` shows the cluster live (shoal.widgets.ClusterMonitor);
        `start` shows one too, below its summary, unless --no-monitor. Each subcommand
        takes -h.
        """
        if line.split(maxsplit=1)[:1] == ["connect"]:
            # `connect` takes no JSON, so {name} and $name are expanded as in other magics
            # (an address kept in a variable); the other subcommands keep their braces.
            line = self.shell.var_expand(line, depth=1)
        try:
            command, args = parse_cluster(line)
        except HelpShown:
            return
        getattr(self, f"_cluster_{command}")(args)

    @no_var_expand
    @cell_magic
    def remote(self, line: str, cell: str) -> Any:
        """Run the cell on the cluster.

        %%remote [--cpus N] [--gpus N] [--resources JSON] [--node ID] [--actor NAME] [--all]
                 [--async [NAME]] [--push A,B] [--pull X,Y]

        The notebook's variables that the cell reads are shipped (refs stay refs, large
        values go through the object store, modules are imported again by name); the names
        the cell assigns (and the functions and classes it defines) come back; the value of
        its last expression is shown, and what it prints appears below it.

        --actor NAME   run in a persistent session on the cluster (created on first use)
                       whose variables live on from cell to cell
        --all          run once on every alive node; outputs are labelled by node
        --node ID      run on that node (an id, or a unique prefix of one)
        --async [NAME] return at once; NAME (default _remote) holds the running cell, and
                       NAME.get() waits, brings back its names and returns its value
        --push / --pull   the names to ship / bring back, instead of the cell's analysis
        """
        try:
            return self.remote_cells.run(line, cell)
        except HelpShown:
            return None

    # -- %cluster subcommands ----------------------------------------------------------
    def _cluster_start(self, args: argparse.Namespace) -> None:
        if shoal.is_initialized():
            if not args.restart:
                print(
                    "A Shoal cluster is already running in this kernel: `%cluster start "
                    "--restart` restarts it, `%cluster stop` stops it."
                )
                display(ClusterSummary(cluster_snapshot()))
                return
            self._stop(quiet=True)
        kwargs = {
            key: getattr(args, key)
            for key in ("object_store_memory", "resources")
            if getattr(args, key) is not None
        }
        if args.cpus is not None:
            kwargs["num_cpus"] = args.cpus
        if args.gpus is not None:
            kwargs["num_gpus"] = args.gpus
        try:
            shoal.init(**kwargs)
        except (ValueError, TypeError, ConnectionError, RuntimeError, OSError) as exc:
            raise UsageError(f"%cluster start: {exc}") from None
        display(ClusterSummary(cluster_snapshot()))
        if args.monitor and _widgets_shown_here():
            self._show_monitor(0.25)

    def _cluster_connect(self, args: argparse.Namespace) -> None:
        if shoal.is_initialized():
            raise UsageError(
                "%cluster connect: this kernel is already connected to a cluster; "
                "`%cluster stop` first"
            )
        try:
            shoal.init(args.address, key_file=args.key_file)
        except (ValueError, TypeError, ConnectionError, RuntimeError, OSError) as exc:
            raise UsageError(f"%cluster connect {args.address}: {exc}") from None
        display(ClusterSummary(cluster_snapshot()))

    def _cluster_stop(self, args: argparse.Namespace) -> None:
        self._stop(quiet=False)

    def _stop(self, quiet: bool) -> None:
        from shoal import _api

        cluster = _api._cluster
        self.remote_cells.forget_sessions()
        if cluster is None:
            if not quiet:
                print("No Shoal cluster is running in this kernel.")
            return
        started_here = cluster.head is not None
        address = cluster.address
        shoal.shutdown()
        if not quiet:
            if started_here:
                print("Stopped the Shoal cluster that this kernel started.")
            else:
                print(f"Disconnected from the Shoal cluster at {address}.")

    def _cluster_monitor(self, args: argparse.Namespace) -> None:
        if not shoal.is_initialized():
            raise UsageError(
                "%cluster monitor: no cluster is running in this kernel; "
                "`%cluster start` starts one"
            )
        if _widgets_shown_here():
            self._show_monitor(args.interval)
            return
        # A terminal: the picture of this moment, as text (a live one needs a notebook).
        from shoal import _api
        from shoal.widgets import _monitor_text
        from shoal.widgets._snapshot import fetch_snapshot

        assert _api._cluster is not None
        snapshot = fetch_snapshot(_api._cluster.core)
        print(_monitor_text.render(snapshot, status="now; live in a notebook", rate=None))

    def _show_monitor(self, interval: float) -> None:
        try:
            from shoal.widgets import ClusterMonitor
        except ImportError as exc:
            raise UsageError(f"%cluster monitor: {exc}") from None
        previous, self.monitor = self.monitor, None
        if previous is not None:
            previous.stop("a newer monitor replaced it")
        self.monitor = ClusterMonitor(interval)
        display(self.monitor)

    def _cluster_status(self, args: argparse.Namespace) -> None:
        display(ClusterSummary(cluster_snapshot()))
        sessions = sorted(name for _core, name in self.remote_cells.sessions)
        if sessions and shoal.is_initialized():
            print(f"%%remote sessions (--actor): {', '.join(sessions)}")


def _widgets_shown_here() -> bool:
    """A kernel (whose frontend may show widgets) with ipywidgets installed."""
    from shoal.widgets._progress_views import in_kernel, widgets_available

    return in_kernel() and widgets_available()


def register(shell: Any) -> None:
    """Add the magics to ``shell`` (once), the task-error face of error outputs, and the
    progress bar of ``shoal.get``."""
    if shell is None or getattr(shell, "_shoal_magics", None) is not None:
        return
    magics = ShoalMagics(shell)
    shell.register_magics(magics)
    shell._shoal_magics = magics
    _patch_error_output(shell)
    from shoal.widgets import _progress

    _progress.install()
    cell_tags(shell)  # from now on, work submitted here carries its cell's tag
    shell.events.register("pre_run_cell", _on_pre_run_cell)
    shell.events.register("post_run_cell", _on_post_run_cell)
    from shoal import _worker_context

    core = _worker_context.maybe_core()
    if core is not None:
        install(core, shell)  # already connected: route its tasks' output from now on


def _on_pre_run_cell(info: Any = None) -> None:
    """A cell starts: outside a kernel, it is known by this count from now to its end (see
    ``CellTags.begin``)."""
    from IPython import get_ipython

    tags = cell_tags(get_ipython())
    if tags is not None:
        tags.begin()


def _on_post_run_cell(result: Any) -> None:
    """The stop button: a cell that ends with KeyboardInterrupt cancels what it started."""
    if not isinstance(getattr(result, "error_in_exec", None), KeyboardInterrupt):
        return
    import sys

    from IPython import get_ipython

    try:
        counts = cancel_cell_work(get_ipython(), getattr(result, "execution_count", None))
    except Exception as exc:  # never turn an interrupt into a second error
        print(f"Shoal could not cancel this cell's tasks: {exc}", file=sys.stderr)
        return
    if not counts:
        return
    cancelled, running_on = counts
    if cancelled:
        tasks = "task" if cancelled == 1 else "tasks"
        print(
            f"Shoal cancelled {cancelled} unfinished {tasks} of this cell, with their children.",
            file=sys.stderr,
        )
    if running_on:
        calls = "call was" if running_on == 1 else "calls were"
        print(
            f"{running_on} actor {calls} sent to the actor before the interrupt and "
            "cannot be stopped; they run to their end.",
            file=sys.stderr,
        )


def _patch_error_output(shell: Any) -> None:
    """ipykernel's error output carries ``ename``/``evalue`` (what a notebook shows in
    summaries, and what nbclient reports): for a task error, those of the original error."""
    original = getattr(shell, "_showtraceback", None)
    if original is None or getattr(original, "_shoal", False):
        return

    def showtraceback(etype: Any, evalue: Any, stb: Any) -> Any:
        try:
            from ._tracebacks import local_face

            face = local_face(evalue)
            if face is not None:
                etype, evalue = face
        except Exception:
            pass
        return original(etype, evalue, stb)

    showtraceback._shoal = True  # type: ignore[attr-defined]
    shell._showtraceback = showtraceback


def unregister(shell: Any) -> None:
    magics = shell.__dict__.pop("_shoal_magics", None)
    if magics is None:
        return
    from shoal.widgets import _progress

    _progress.uninstall()
    if magics.monitor is not None:
        magics.monitor.stop("the extension was unloaded")
    for kind, names in (("line", ["cluster"]), ("cell", ["remote"])):
        table = shell.magics_manager.magics[kind]
        for name in names:
            table.pop(name, None)
    for event, handler in (
        ("pre_run_cell", _on_pre_run_cell),
        ("post_run_cell", _on_post_run_cell),
    ):
        try:
            shell.events.unregister(event, handler)
        except ValueError:
            pass
    forget_cell_tags(shell)
    patched = shell.__dict__.pop("_showtraceback", None)
    if patched is not None and not getattr(patched, "_shoal", False):
        shell._showtraceback = patched
