"""``%%remote``: run a notebook cell on the cluster.

    cell --ast--> names it reads (inputs) and binds (outputs)        _analysis.py
         inputs in the notebook --encode--> request                  _shipping.py
         request --task / session actor call--> _runner.execute       _runner.py
         result --decode--> names bound in the notebook, value shown
         prints: the driver's log forwarding, held until the marker   _output.py
         errors: TaskError._render_traceback_                         _tracebacks.py

A plain cell is a task (``num_cpus=1`` unless ``--cpus`` says otherwise, no retries: a
cell runs once). ``--actor NAME`` runs it in a session actor, created on first use, whose
namespace lives on; a session is sent only the names it does not have yet (``--push``
sends them anyway). ``--all`` runs one task per alive node, pinned there.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import shoal
from IPython.core.error import UsageError
from IPython.display import display

from . import _analysis, _output, _shipping
from ._args import parse_remote

# How long a finished cell waits, at most, for its last printed lines to arrive through the
# head (they come within milliseconds; the marker that says so is missing only when the
# driver does not forward output).
OUTPUT_GRACE_SECONDS = 5.0


class RemoteCells:
    """The ``%%remote`` state of one IPython shell: its session actors."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        # (id of the core, name) -> [handle, names the session has]; the core's id keeps a
        # session of a cluster that was stopped from being used with the next one.
        self.sessions: dict[tuple[int, str], list[Any]] = {}
        self._cell_fn: Any = None
        self._session_cls: Any = None

    def forget_sessions(self) -> None:
        self.sessions.clear()

    # -- the magic ---------------------------------------------------------------------
    def run(self, line: str, cell: str) -> Any:
        args = parse_remote(line)
        if not cell.strip():
            return None
        number = self.shell.execution_count
        text = f"%%remote {line}".rstrip() + "\n" + cell
        filename = self._cache_source(text, number)
        try:
            names = _analysis.analyze(cell)
        except SyntaxError as exc:
            exc.filename = filename
            if exc.lineno is not None:
                exc.lineno += 1  # the %%remote line is line 1 of the cell
            raise
        core = _ensure_cluster()
        task_name = f"%%remote In[{number}]"
        session_key = None
        if args.actor:
            session_key = (id(core), args.actor)
        inputs = self._inputs(args, names, session_key)
        request: dict[str, Any] = {
            "source": cell,
            "filename": filename,
            "first_line": 2,
            "text": text,
            "inputs": inputs,
            "outputs": [] if args.all and args.pull is None else (args.pull or names.outputs),
            "display": not cell.rstrip().endswith(";"),
        }
        if args.async_name is not None:
            targets = self._submit(args, request, task_name, session_key)
            self.shell.user_ns[args.async_name] = RemoteCell(
                self, number, targets, args, session_key
            )
            what = ", ".join(request["outputs"]) or "nothing"
            print(
                f"{task_name} is running on the cluster. {args.async_name}.get() waits for it, "
                f"brings back its names ({what}) and returns its value."
            )
            return None
        router = _output.install(core, self.shell)
        if router is None:
            targets = self._submit(args, request, task_name, session_key)
            return RemoteCell(self, number, targets, args, session_key).finish(None)
        # Expect the marker before submitting: the cell may finish before submit returns.
        token, request["marker"] = _output.new_marker()
        quiet = [] if args.all else [_task_name(task_name, session_key)]
        nodes = _alive_nodes() if args.all else None
        event = router.expect(token, quiet, len(nodes) if nodes else 1)
        try:
            targets = self._submit(args, request, task_name, session_key, nodes)
            return RemoteCell(self, number, targets, args, session_key).finish(event)
        finally:
            router.done(token, quiet)

    def _cache_source(self, text: str, number: int) -> str:
        """Register the cell's text under a file name, as IPython does for every cell, so
        that tracebacks name it ``Cell In[n]`` and show its lines."""
        try:
            return str(self.shell.compile.cache(text, number))
        except Exception:
            import linecache

            name = f"<%%remote In[{number}]>"
            linecache.cache[name] = (len(text), None, text.splitlines(keepends=True), name)
            return name

    def _inputs(
        self, args: argparse.Namespace, names: _analysis.CellNames, session_key: Any
    ) -> dict[str, Any]:
        user_ns = self.shell.user_ns
        if args.push is not None:
            missing = [n for n in args.push if n not in user_ns]
            if missing:
                raise UsageError(
                    f"%%remote --push: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                    "not defined in the notebook"
                )
            wanted = list(args.push)
        else:
            hidden = getattr(self.shell, "user_ns_hidden", {})
            have = self.sessions.get(session_key, [None, set()])[1] if session_key else set()
            wanted = [n for n in names.inputs if n in user_ns and n not in hidden and n not in have]
        inputs = {}
        for name in wanted:
            try:
                inputs[name] = _shipping.encode(name, user_ns[name], put_large=True)
            except _shipping.ShippingError as exc:
                raise UsageError(
                    f"%%remote cannot ship the variable {name!r}: {exc.reason}. Create it inside "
                    "the cell, or choose what to send with --push"
                ) from None
        return inputs

    # -- submitting --------------------------------------------------------------------
    def _submit(
        self,
        args: argparse.Namespace,
        request: dict[str, Any],
        task_name: str,
        session_key: Any,
        nodes: list[dict[str, Any]] | None = None,
    ) -> list[tuple[str, Any, str]]:
        """[(label, ref, task name)]: one per node with --all, else one."""
        options: dict[str, Any] = {}
        if args.cpus is not None:
            options["num_cpus"] = args.cpus
        if args.gpus is not None:
            options["num_gpus"] = args.gpus
        if args.resources:
            options["resources"] = args.resources
        if args.node:
            options["scheduling_strategy"] = _affinity(_resolve_node(args.node))
        if session_key is not None:
            handle = self._session(session_key, options)
            name = _task_name(task_name, session_key)
            try:
                run = handle.run
            except AttributeError:
                self.sessions.pop(session_key, None)
                raise UsageError(
                    f"%%remote --actor {session_key[1]}: that name belongs to another actor "
                    f"({handle._meta.get('cls', '?')}), not a %%remote session"
                ) from None
            return [("", run.options(name=name).remote(request), name)]
        fn = self._cell_function()
        if not args.all:
            return [("", fn.options(name=task_name, **options).remote(request), task_name)]
        targets = []
        for node in nodes if nodes is not None else _alive_nodes():
            node_id = node["NodeID"]
            label = f"node {node_id[:8]} ({node.get('NodeManagerAddress', '')})"
            name = f"{task_name} @{node_id[:8]}"
            opts = dict(options, scheduling_strategy=_affinity(node_id), name=name)
            targets.append((label, fn.options(**opts).remote(request), name))
        return targets

    def _cell_function(self) -> Any:
        if self._cell_fn is None:
            from ._runner import run_cell

            self._cell_fn = shoal.remote(max_retries=0)(run_cell)
        return self._cell_fn

    def _session(self, key: tuple[int, str], options: dict[str, Any]) -> Any:
        entry = self.sessions.get(key)
        if entry is not None:
            if options:
                print(
                    f"%%remote: the session {key[1]!r} exists already; --cpus, --gpus, "
                    "--resources and --node apply only when a session is created",
                    file=sys.stderr,
                )
            return entry[0]
        if self._session_cls is None:
            from ._runner import Session

            self._session_cls = shoal.remote(Session)
        try:
            handle = self._session_cls.options(name=key[1], get_if_exists=True, **options).remote()
        except ValueError as exc:
            raise UsageError(f"%%remote --actor {key[1]}: {exc}") from None
        self.sessions[key] = [handle, set()]
        return handle


def _task_name(base: str, session_key: Any) -> str:
    """The name the cell's task has (what prefixes its output lines)."""
    return f"{base} @{session_key[1]}" if session_key is not None else base


class RemoteCell:
    """A ``%%remote`` cell that was submitted: wait for it with ``get()``.

    ``get()`` brings the cell's names back into the notebook (once) and returns the value
    of its last expression (with ``--all``: a dict from node id to value).
    """

    def __init__(
        self,
        owner: RemoteCells,
        number: int,
        targets: list[tuple[str, Any, str]],
        args: argparse.Namespace,
        session_key: Any,
    ) -> None:
        self._owner = owner
        self.number = number
        self._targets = targets
        self._all = bool(args.all)
        self._explicit = args.pull is not None
        self._session_key = session_key
        self._finished = False
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def refs(self) -> list[Any]:
        """The ObjectRefs of the cell's task(s)."""
        return [t[1] for t in self._targets]

    def ready(self) -> bool:
        """Whether the cell has finished (without waiting)."""
        if self._finished:
            return True
        refs = self.refs
        done, _ = shoal.wait(refs, num_returns=len(refs), timeout=0)
        return len(done) == len(refs)

    def cancel(self) -> None:
        for ref in self.refs:
            try:
                shoal.cancel(ref)
            except Exception:
                pass  # an actor call or a finished task: nothing to cancel

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the cell; bring its names back; return its value."""
        if self._finished:
            if self._error is not None:
                raise self._error
            return self._value
        return self._collect(timeout, display_values=False)

    def finish(self, event: Any) -> Any:
        """A synchronous cell: wait, let its output arrive, show its value(s)."""
        try:
            return self._collect(None, display_values=True, event=event, local_frames=False)
        except KeyboardInterrupt:
            self.cancel()
            raise

    def _collect(
        self,
        timeout: float | None,
        display_values: bool,
        event: Any = None,
        local_frames: bool = True,
    ) -> Any:
        results: list[tuple[str, dict[str, Any]]] = []
        errors: list[tuple[str, BaseException]] = []
        for label, ref, _name in self._targets:
            try:
                results.append((label, shoal.get(ref, timeout=timeout)))
            except shoal.exceptions.GetTimeoutError:
                raise
            except shoal.exceptions.ShoalError as exc:
                errors.append((label, exc))
        if event is not None:
            # The cell ended (well or not): let its last printed lines arrive first.
            event.wait(OUTPUT_GRACE_SECONDS)
        self._finished = True
        self._value = self._bring_back(results, display_values)
        if errors:
            if self._session_key is not None and isinstance(
                errors[0][1], shoal.exceptions.ActorDiedError
            ):
                self._owner.sessions.pop(self._session_key, None)  # a new one next time
            self._error = _first_error(errors, self._all, local_frames)
            raise self._error
        return self._value

    def _bring_back(self, results: list[tuple[str, dict[str, Any]]], display_values: bool) -> Any:
        shell = self._owner.shell
        if self._session_key is not None and results:
            entry = self._owner.sessions.get(self._session_key)
            if entry is not None:
                entry[1] = set(results[0][1].get("names", ()))
        if self._all:
            values: dict[str, Any] = {}
            pulled: dict[str, dict[str, Any]] = {}
            for label, result in results:
                node = result.get("node", "") or label
                names = _decode_names(result, label, self._explicit)
                for name, value in names.items():
                    pulled.setdefault(name, {})[node] = value
                value = _decode_value(result, label)
                values[node] = value
                if display_values and value is not None:
                    display(NodeOutput(label, value))
            if pulled:
                shell.push(pulled, interactive=True)
            return None if display_values else values
        if not results:
            return None
        label, result = results[0]
        names = _decode_names(result, "", self._explicit)
        if names:
            shell.push(names, interactive=True)
        return _decode_value(result, "")

    def __repr__(self) -> str:
        state = "done" if self._finished else ("finished" if self._ready_quietly() else "running")
        return f"RemoteCell(In[{self.number}], {state})"

    def _ready_quietly(self) -> bool:
        try:
            return self.ready()
        except Exception:
            return False

    def _repr_html_(self) -> str:
        from ._reprs import _badge

        if self._finished:
            state = "ready"
        else:
            state = "ready" if self._ready_quietly() else "pending"
        hint = "" if self._finished else " · <code>.get()</code> brings back its names"
        return f"<code>%%remote In[{self.number}]</code> {_badge(state)}{hint}"


_VALUE = "the cell's value"  # the runner's name for it in "failed"


def _decode_names(result: dict[str, Any], label: str, explicit: bool) -> dict[str, Any]:
    where = f" from {label}" if label else ""
    names = {}
    for name, entry in result.get("outputs", {}).items():
        try:
            names[name] = _shipping.decode(name, entry)
        except _shipping.ShippingError as exc:
            _warn(f"could not bring back {name!r}{where}: {exc.reason}")
    for name, reason in result.get("failed", {}).items():
        what = name if name == _VALUE else repr(name)
        _warn(f"could not bring back {what}{where}: {reason}")
    if explicit:
        for name in result.get("missing", ()):
            _warn(f"--pull {name}: {name!r} is not defined on the cluster{where}")
    return names


class _RemoteRepr:
    """A value that could not travel, shown by the text its repr() gave on the cluster."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _decode_value(result: dict[str, Any], label: str) -> Any:
    entry = result.get("value")
    if entry is None:
        if "value_repr" in result:
            return _RemoteRepr(result["value_repr"])
        return None
    try:
        return _shipping.decode(_VALUE, entry)
    except _shipping.ShippingError as exc:
        where = f" from {label}" if label else ""
        _warn(f"could not bring back the cell's value{where}: {exc.reason}")
        return None


def _warn(message: str) -> None:
    print(f"%%remote: {message}", file=sys.stderr)


def _first_error(
    errors: list[tuple[str, BaseException]], several: bool, local_frames: bool
) -> BaseException:
    """The first failure, in full; the others summarized by kind and count."""
    label, err = errors[0]
    try:
        if not local_frames:
            err._shoal_hide_local_frames = True  # type: ignore[attr-defined]
        if several:
            from ._tracebacks import local_face

            kinds: dict[str, list[str]] = {}
            for other_label, other in errors[1:]:
                face = local_face(other)
                kind = face[0].__name__ if face else type(other).__name__
                kinds.setdefault(kind, []).append(other_label)
            note = f"(This was on {label}."
            if kinds:
                note += " Also failed: " + "; ".join(
                    f"{kind} on {len(where)} other node{'s' if len(where) > 1 else ''}"
                    for kind, where in kinds.items()
                )
                note += "."
            err._shoal_also_failed = note + ")"  # type: ignore[attr-defined]
    except Exception:
        pass  # an exception type without a __dict__: shown as it is
    return err


class NodeOutput:
    """One node's value under ``--all``: labelled with the node."""

    def __init__(self, label: str, value: Any) -> None:
        self.label = label
        self.value = value

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        import html

        shell = _shell()
        data: dict[str, Any] = {}
        if shell is not None:
            try:
                data, _ = shell.display_formatter.format(self.value)
            except Exception:
                data = {}
        text = data.get("text/plain", repr(self.value))
        bundle = {
            "text/plain": f"[{self.label}] " + text
            if "\n" not in text
            else f"[{self.label}]\n{text}"
        }
        inner = data.get("text/html")
        if inner is None:
            inner = f"<pre>{html.escape(text)}</pre>"
        bundle["text/html"] = f"<div><b>{html.escape(self.label)}</b>{inner}</div>"
        return bundle


def _shell() -> Any:
    try:
        from IPython import get_ipython

        return get_ipython()
    except Exception:
        return None


# -- the cluster -----------------------------------------------------------------------
def _ensure_cluster() -> Any:
    from shoal import _worker_context

    if not shoal.is_initialized():
        shoal.init()
        print(
            "%%remote started a local Shoal cluster for this kernel (%cluster status shows it, "
            "%cluster stop stops it)."
        )
    return _worker_context.core()


def _alive_nodes() -> list[dict[str, Any]]:
    return [n for n in shoal.nodes() if n.get("Alive")]


def _resolve_node(text: str) -> str:
    nodes = _alive_nodes()
    wanted = text.lower().strip()
    matches = [n["NodeID"] for n in nodes if n["NodeID"].startswith(wanted)]
    if len(matches) == 1:
        return str(matches[0])
    known = ", ".join(n["NodeID"][:12] for n in nodes)
    if not matches:
        raise UsageError(f"%%remote --node {text}: no alive node has that id (nodes: {known})")
    raise UsageError(f"%%remote --node {text}: several nodes start with it (nodes: {known})")


def _affinity(node_id: str) -> Any:
    from shoal.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
