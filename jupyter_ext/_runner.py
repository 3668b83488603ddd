"""The cluster's side of ``%%remote``: run a cell's code in a namespace, send back names.

    run_cell(request)       a task: a fresh namespace per cell
    Session.run(request)    an actor (``--actor NAME``): one namespace that lives on from
                            cell to cell, like an ipyparallel engine

A request is a dict: ``source`` (the cell without its ``%%remote`` line), ``filename`` and
``first_line`` (so that tracebacks name the notebook cell and its line numbers), ``text``
(the whole cell, for the traceback's source lines), ``inputs`` (name -> shipping entry),
``outputs`` (names to send back), ``display`` (whether the last expression's value is wanted) and ``marker`` (a line printed
last, which tells the notebook that all of the cell's output has arrived).

Workers import this module by name: it must not import IPython.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import inspect
import linecache
import sys
from typing import Any

from . import _shipping


def new_namespace() -> dict[str, Any]:
    return {"__name__": "__main__", "__builtins__": builtins}


def run_cell(request: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in a namespace of its own (the task behind a plain ``%%remote``)."""
    return execute(request, new_namespace())


class Session:
    """A persistent namespace on the cluster: the actor behind ``%%remote --actor NAME``."""

    def __init__(self) -> None:
        self.ns = new_namespace()

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        return execute(request, self.ns)

    def names(self) -> list[str]:
        """The names defined in the session (what ``%cluster status`` lists)."""
        return sorted(k for k in self.ns if not k.startswith("__"))


def execute(request: dict[str, Any], ns: dict[str, Any]) -> dict[str, Any]:
    # The task's output streams, taken now: the cell may replace them (they are put back
    # after it, since the worker runs other tasks next).
    stdout, stderr = sys.stdout, sys.stderr
    restore_display = _install_display(request, ns)
    try:
        for name, entry in request["inputs"].items():
            try:
                ns[name] = _shipping.decode(name, entry)
            except _shipping.ShippingError as exc:
                raise RuntimeError(
                    f"%%remote could not load the notebook's {exc.name!r} on the cluster: "
                    f"{exc.reason}"
                ) from None
        value = _run_source(request, ns)
        outputs: dict[str, Any] = {}
        failed: dict[str, str] = {}
        missing: list[str] = []
        for name in request["outputs"]:
            if name not in ns:
                missing.append(name)
                continue
            try:
                outputs[name] = _shipping.encode(name, ns[name])
            except _shipping.ShippingError as exc:
                failed[name] = exc.reason
        result: dict[str, Any] = {
            "outputs": outputs,
            "failed": failed,
            "missing": missing,
            "node": _node_id(),
            "value": None,
            # What the namespace holds now: a session's driver ships only what it lacks.
            "names": [k for k in ns if not k.startswith("__")],
        }
        if value is not None:
            try:
                result["value"] = _shipping.encode("the cell's value", value)
            except _shipping.ShippingError as exc:
                result["value_repr"] = _safe_repr(value)
                failed["the cell's value"] = exc.reason
        return result
    finally:
        restore_display()
        sys.stdout, sys.stderr = stdout, stderr
        marker = request.get("marker")
        if marker:
            try:
                print(marker, flush=True)
            except Exception:
                pass


# -- display() -------------------------------------------------------------------------
def _install_display(request: dict[str, Any], ns: dict[str, Any]) -> Any:
    """Let the cell's ``display(obj)`` show ``obj`` under the notebook cell, richly.

    A worker has no IPython shell, where IPython's ``display`` would only print. The cell
    gets a ``display`` of its own (unless the notebook shipped one), and while it runs,
    ``IPython.display.display`` is that one too (only when the cell mentions IPython:
    importing it costs a worker a tenth of a second). Returns what undoes it."""
    source = request["source"]
    if "display" not in source:
        return _nothing
    if "display" not in request["inputs"] and "display" not in ns:
        ns["display"] = display
    saved: list[tuple[Any, Any]] = []
    if "IPython" in source:
        try:
            import IPython.core.display_functions as functions
            import IPython.display as public

            saved = [(m, m.display) for m in (public, functions)]
        except Exception:
            pass
    for module, _ in saved:
        module.display = display

    def restore() -> None:
        for module, original in saved:
            module.display = original
        if ns.get("display") is display:
            del ns["display"]  # a session's namespace keeps only what the cells defined

    return restore


def _nothing() -> None:
    pass


def display(*objs: Any, raw: bool = False, metadata: Any = None, **_ignored: Any) -> None:
    """``IPython.display.display`` for code running on the cluster: each object's rich
    representations go to the notebook cell that started the task."""
    from shoal import _task_output

    for obj in objs:
        if raw and isinstance(obj, dict):
            bundle = {"data": obj, "metadata": metadata or {}}
        else:
            data, meta = mime_bundle(obj)
            bundle = {"data": data, "metadata": metadata or meta}
        if not _task_output.display(bundle):
            print(bundle["data"].get("text/plain", ""))  # not in a worker


def mime_bundle(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """IPython's representations of ``obj`` (text/plain always), without a shell."""
    try:
        from IPython.core.formatters import DisplayFormatter

        formatter = _FORMATTER[0] if _FORMATTER else None
        if formatter is None:
            formatter = DisplayFormatter()
            _FORMATTER.append(formatter)
        data, meta = formatter.format(obj)
        if data:
            return dict(data), dict(meta or {})
    except Exception:
        pass
    data = {"text/plain": _safe_repr(obj)}
    html = getattr(obj, "_repr_html_", None)
    if callable(html):
        try:
            text = html()
            if text:
                data["text/html"] = str(text)
        except Exception:
            pass
    return data, {}


_FORMATTER: list[Any] = []


def _run_source(request: dict[str, Any], ns: dict[str, Any]) -> Any:
    filename = request["filename"]
    text = request.get("text") or request["source"]
    # Tracebacks read source lines through linecache: give it the cell, as IPython does.
    # (mtime None: linecache.checkcache never drops the entry.)
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(request["source"], filename, "exec", ast.PyCF_ONLY_AST | flags)
    ast.increment_lineno(tree, request.get("first_line", 1) - 1)
    last = None
    if request.get("display") and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
    _run(compile(tree, filename, "exec", flags), ns)
    if last is None:
        return None
    return _run(compile(ast.Expression(last.value), filename, "eval", flags), ns)


def _run(code: Any, ns: dict[str, Any]) -> Any:
    result = eval(code, ns)
    if code.co_flags & inspect.CO_COROUTINE:
        # The cell used top-level `await`, as IPython allows: run it to completion here.
        result = asyncio.run(result)
    return result


def _node_id() -> str:
    try:
        import shoal

        return str(shoal.get_runtime_context().get_node_id())
    except Exception:
        return ""


def _safe_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<{type(value).__name__} (repr failed: {exc})>"
    return text if len(text) <= 2000 else text[:2000] + "..."
