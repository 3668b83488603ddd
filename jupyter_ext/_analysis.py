"""What a ``%%remote`` cell needs from the notebook, and what it gives back.

    analyze(source) -> CellNames(inputs, outputs)

``inputs`` are the names the cell reads before it has bound them: the notebook's values of
these (those that exist) are shipped to the cluster. ``outputs`` are the names the cell
binds at its top level (assignments, imports, ``def``, ``class``, ``for`` targets, ``with
... as``, ``except ... as``, walrus, and ``global`` names that its functions assign), and
the objects it changes by item or attribute assignment (``a[i] = v``, ``obj.x = v``): those
that exist on the cluster when the cell ends come back into the notebook. (A change made
by a method call, ``a.append(v)``, cannot be seen: assign the name or ``--pull`` it.)

The module level is walked in execution order, keeping the set of names *definitely*
bound so far (a name bound in only one branch of an ``if`` is not definitely bound after
it): a read of a name not definitely bound is an input. Shipping a name that turns out not
to be needed costs a copy; missing one would be a NameError on the cluster, so the
analysis errs towards shipping. Nested scopes (functions, classes, lambdas,
comprehensions) are resolved with ``symtable``, which knows Python's scoping rules: the
names they read from the module's globals are inputs if not bound before the definition.
"""

from __future__ import annotations

import ast
import symtable
from dataclasses import dataclass, field

_SCOPE_NODES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)
_TABLE_NAMES = {
    ast.Lambda: "lambda",
    ast.ListComp: "listcomp",
    ast.SetComp: "setcomp",
    ast.DictComp: "dictcomp",
    ast.GeneratorExp: "genexpr",
}


@dataclass
class CellNames:
    """Inputs and outputs of a cell, each in the order of first appearance."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def analyze(source: str) -> CellNames:
    """The names a cell reads before binding them, and the names it binds.

    Raises SyntaxError for a cell that is not valid Python."""
    tree = ast.parse(source)
    table = symtable.symtable(source, "<cell>", "exec")
    walker = _Walker(table)
    walker.block(tree.body, set())
    return CellNames(list(walker.inputs), list(walker.outputs))


class _Walker:
    def __init__(self, table: symtable.SymbolTable) -> None:
        # First-level child scopes of the module, matched to AST nodes by name and line.
        self._children: dict[tuple[str, int], list[symtable.SymbolTable]] = {}
        for child in table.get_children():
            self._children.setdefault((child.get_name(), child.get_lineno()), []).append(child)
        self.inputs: dict[str, None] = {}  # ordered sets
        self.outputs: dict[str, None] = {}

    # -- statements --------------------------------------------------------------------
    def block(self, stmts: list[ast.stmt], bound: set[str]) -> set[str]:
        """Walk ``stmts`` with ``bound`` definitely bound before; return the set after."""
        for stmt in stmts:
            bound = self.stmt(stmt, bound)
        return bound

    def stmt(self, node: ast.stmt, bound: set[str]) -> set[str]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for deco in node.decorator_list:
                self.expr(deco, bound)
            if isinstance(node, ast.ClassDef):
                for base in (*node.bases, *(k.value for k in node.keywords)):
                    self.expr(base, bound)
            else:
                self._arguments(node.args, bound)
                if node.returns is not None:
                    self.expr(node.returns, bound)
            self._scope(node, node.name, bound)
            return self._bind(node.name, bound)
        if isinstance(node, ast.Assign):
            self.expr(node.value, bound)
            for target in node.targets:
                bound = self._target(target, bound)
            return bound
        if isinstance(node, ast.AugAssign):
            self.expr(node.value, bound)
            self._target_read(node.target, bound)
            return self._target(node.target, bound)
        if isinstance(node, ast.AnnAssign):
            self.expr(node.annotation, bound)
            if node.value is None:
                return bound  # `x: int` binds nothing
            self.expr(node.value, bound)
            return self._target(node.target, bound)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    continue  # unknowable; the star import runs remotely anyway
                name = alias.asname or alias.name.split(".")[0]
                bound = self._bind(name, bound)
            return bound
        if isinstance(node, ast.If):
            self.expr(node.test, bound)
            return self.block(node.body, set(bound)) & self.block(node.orelse, set(bound))
        if isinstance(node, (ast.For, ast.AsyncFor)):
            self.expr(node.iter, bound)
            inner = self._target(node.target, set(bound))
            self.block(node.body, inner)
            self.block(node.orelse, set(bound))
            return bound  # the body may run zero times
        if isinstance(node, ast.While):
            self.expr(node.test, bound)
            self.block(node.body, set(bound))
            self.block(node.orelse, set(bound))
            return bound
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self.expr(item.context_expr, bound)
                if item.optional_vars is not None:
                    bound = self._target(item.optional_vars, bound)
            return self.block(node.body, bound)
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            after_body = self.block(node.body, set(bound))
            for handler in node.handlers:
                if handler.type is not None:
                    self.expr(handler.type, bound)
                inner = set(bound)
                if handler.name:
                    inner = self._bind(handler.name, inner)
                self.block(handler.body, inner)
            self.block(node.orelse, after_body)
            # Any statement of the body may have raised: only what was bound before, plus
            # what `finally` binds, is certain.
            return self.block(node.finalbody, set(bound))
        if isinstance(node, ast.Match):
            self.expr(node.subject, bound)
            for case in node.cases:
                inner = set(bound)
                for sub in ast.walk(case.pattern):
                    if isinstance(sub, ast.MatchValue):
                        self.expr(sub.value, bound)
                    elif isinstance(sub, ast.MatchClass):
                        self.expr(sub.cls, bound)
                    name = getattr(sub, "name", None) or getattr(sub, "rest", None)
                    if isinstance(name, str):
                        inner = self._bind(name, inner)
                if case.guard is not None:
                    self.expr(case.guard, inner)
                self.block(case.body, inner)
            return bound
        if isinstance(node, ast.Delete):
            for target in node.targets:
                self._target_read(target, bound)
                if isinstance(target, ast.Name):
                    bound = bound - {target.id}
                elif (root := _root_name(target)) is not None:
                    self.outputs.setdefault(root)  # `del a[0]` changes a
            return bound
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            return bound
        # Expr, Return, Raise, Assert, Pass, Break, Continue ...: reads only.
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, bound)
        return bound

    # -- expressions -------------------------------------------------------------------
    def expr(self, node: ast.expr, bound: set[str]) -> None:
        """Record the reads in ``node``; walrus targets become bound (in place)."""
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load) and node.id not in bound:
                self.inputs.setdefault(node.id)
            return
        if isinstance(node, ast.NamedExpr):
            self.expr(node.value, bound)
            bound.add(node.target.id)
            self.outputs.setdefault(node.target.id)
            return
        if isinstance(node, ast.Lambda):
            self._arguments(node.args, bound)
            self._scope(node, "lambda", bound)
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            # The first iterable is evaluated in the enclosing scope; the rest in the
            # comprehension's own.
            self.expr(node.generators[0].iter, bound)
            for sub in ast.walk(node):
                if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                    bound.add(sub.target.id)  # a walrus in a comprehension binds out here
                    self.outputs.setdefault(sub.target.id)
            self._scope(node, _TABLE_NAMES[type(node)], bound)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, bound)
            elif isinstance(child, ast.keyword):
                self.expr(child.value, bound)
            elif isinstance(child, ast.comprehension):  # pragma: no cover - handled above
                self.expr(child.iter, bound)

    def _arguments(self, args: ast.arguments, bound: set[str]) -> None:
        """Defaults and annotations are evaluated when the function is defined."""
        for default in (*args.defaults, *(d for d in args.kw_defaults if d is not None)):
            self.expr(default, bound)
        every = (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg)
        for arg in every:
            if arg is not None and arg.annotation is not None:
                self.expr(arg.annotation, bound)

    def _scope(self, node: ast.AST, name: str, bound: set[str]) -> None:
        """The module globals that a nested scope reads (inputs) and assigns (outputs)."""
        table = self._table_for(node, name)
        if table is None:
            # No symbol table to say what is local: take every name it reads, to be safe.
            for sub in ast.walk(node):
                loaded = isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
                if loaded and sub.id not in bound:  # type: ignore[attr-defined]
                    self.inputs.setdefault(sub.id)  # type: ignore[attr-defined]
            return
        for sym_name, read, assigned in _globals_of(table):
            if assigned:
                self.outputs.setdefault(sym_name)
            if read and sym_name not in bound:
                self.inputs.setdefault(sym_name)

    def _table_for(self, node: ast.AST, name: str) -> symtable.SymbolTable | None:
        linenos = [getattr(node, "lineno", 0)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # Some Python versions number a decorated definition from its first decorator.
            linenos += [d.lineno for d in node.decorator_list]
        for lineno in linenos:
            tables = self._children.get((name, lineno))
            if tables:
                return tables.pop(0)
        return None

    # -- binding -----------------------------------------------------------------------
    def _bind(self, name: str, bound: set[str]) -> set[str]:
        self.outputs.setdefault(name)
        return bound | {name}

    def _target(self, target: ast.expr, bound: set[str]) -> set[str]:
        """Bind the names of an assignment target; read what a subscript or attribute
        target needs (``a[i] = v`` reads ``a`` and ``i``)."""
        if isinstance(target, ast.Name):
            return self._bind(target.id, bound)
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                bound = self._target(elt, bound)
            return bound
        if isinstance(target, ast.Starred):
            return self._target(target.value, bound)
        # Attribute / Subscript: the object is read and changed in place, not rebound. It
        # comes back, or the change would be lost with the cluster's copy.
        self.expr(target, bound)
        root = _root_name(target)
        if root is not None:
            self.outputs.setdefault(root)
        return bound

    def _target_read(self, target: ast.expr, bound: set[str]) -> None:
        """``x += 1`` and ``del x`` read ``x`` first."""
        if isinstance(target, ast.Name):
            if target.id not in bound:
                self.inputs.setdefault(target.id)
        else:
            self.expr(target, bound)


def _globals_of(table: symtable.SymbolTable) -> list[tuple[str, bool, bool]]:
    """(name, read, assigned) for the module globals this scope and its inner scopes use."""
    found: list[tuple[str, bool, bool]] = []
    stack = [table]
    while stack:
        current = stack.pop()
        for sym in current.get_symbols():
            if sym.is_global():
                # `global x` then `x = ...` in a function binds x in the notebook's globals.
                declared = sym.is_declared_global()
                assigned = declared and sym.is_assigned()
                found.append((sym.get_name(), sym.is_referenced() or declared, assigned))
        stack.extend(current.get_children())
    return found


def _root_name(node: ast.expr) -> str | None:
    """``a`` for ``a.b[i].c``; None when the chain starts with a call or a literal."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None
