"""What a %%remote cell reads from the notebook and binds in it (jupyter_ext/_analysis.py)."""

from __future__ import annotations

import pytest
from shoal.jupyter_ext._analysis import analyze

pytestmark = pytest.mark.timeout(10)


def names(source: str) -> tuple[list[str], list[str]]:
    result = analyze(source)
    return result.inputs, result.outputs


@pytest.mark.parametrize(
    ("source", "inputs", "outputs"),
    [
        ("y = x + 1", ["x"], ["y"]),
        # assigned before it is read: not shipped
        ("x = 1\ny = x", [], ["x", "y"]),
        # read before it is assigned: shipped, and comes back
        ("x = x + 1", ["x"], ["x"]),
        ("total += step", ["step", "total"], ["total"]),
        # builtins are names like any other at this stage; the magic ships only names that
        # exist in the notebook
        ("n = len(items)", ["len", "items"], ["n"]),
        # imports count as assignments
        (
            "import numpy as np\nimport os.path\nfrom a import b as c\nz = np.zeros(k)",
            ["k"],
            ["np", "os", "c", "z"],
        ),
        # functions and classes come back; their bodies read globals at call time
        (
            "def f(a, b=default):\n    return a + helper(a)\nr = f(1)",
            ["default", "helper"],
            ["f", "r"],
        ),
        (
            "class C(Base):\n    size = unit * 2\n    def m(self):\n        return other",
            ["Base", "unit", "other"],
            ["C"],
        ),
        # a global used by a function that is assigned before the definition is not shipped
        ("import numpy as np\ndef f():\n    return np.zeros(3)\nf()", [], ["np", "f"]),
        # a name local to the function is not a global
        ("def f():\n    tmp = 1\n    return tmp\n", [], ["f"]),
        (
            "def outer():\n    v = 1\n    def inner():\n        return v + w\n    return inner\n",
            ["w"],
            ["outer"],
        ),
        # `global` in a function: read and written in the notebook's namespace
        (
            "def bump():\n    global counter\n    counter += 1\nbump()",
            ["counter"],
            ["counter", "bump"],
        ),
        # comprehensions: their variables are their own; the first iterable is read outside
        ("squares = [v * k for v in data]", ["data", "k"], ["squares"]),
        ("total = sum(v for v in data if v > limit)", ["sum", "data", "limit"], ["total"]),
        ("[(last := v) for v in data]", ["data"], ["last"]),
        ("f = lambda q: q * factor", ["factor"], ["f"]),
        # branches: bound in both, definitely bound after
        ("if flag:\n    a = 1\nelse:\n    a = 2\nprint(a)", ["flag", "print"], ["a"]),
        # bound in one branch only: the notebook's value is the fallback, so it is shipped
        ("if flag:\n    a = 1\nprint(a)", ["flag", "print", "a"], ["a"]),
        # a loop body may not run
        (
            "for i in range(n):\n    last = i\nprint(last)",
            ["range", "n", "print", "last"],
            ["i", "last"],
        ),
        ("while cond():\n    step = 1", ["cond"], ["step"]),
        ("with open(path) as fh:\n    text = fh.read()\ntext", ["open", "path"], ["fh", "text"]),
        (
            "try:\n    r = risky()\nexcept ValueError as e:\n    r = None\n",
            ["risky", "ValueError"],
            ["r", "e"],
        ),
        # changed in place: comes back
        ("a[i] = 1", ["a", "i"], ["a"]),
        ("cfg.lr = 0.1", ["cfg"], ["cfg"]),
        ("counts['x'] += 1", ["counts"], ["counts"]),
        ("del cache[key]", ["cache", "key"], ["cache"]),
        ("del old", ["old"], []),
        # annotations
        ("x: int = base", ["int", "base"], ["x"]),
        ("x: Annotated", ["Annotated"], []),
        # top-level await, as IPython allows
        (
            "async def fetch():\n    return await source()\nresult = await fetch()",
            ["source"],
            ["fetch", "result"],
        ),
        (
            "match point:\n    case (px, py) if px > bound:\n        hit = True",
            ["point", "bound"],
            ["px", "py", "hit"],
        ),
    ],
)
def test_inputs_and_outputs(source, inputs, outputs):
    assert names(source) == (inputs, outputs)


def test_decorators_and_defaults_are_read_at_definition():
    source = "@register(kind)\ndef handler(event=DEFAULT_EVENT) -> Result:\n    return event"
    assert names(source) == (["register", "kind", "DEFAULT_EVENT", "Result"], ["handler"])


def test_two_functions_with_the_same_name():
    source = "def f():\n    return a\ndef f():\n    return b\n"
    assert names(source) == (["a", "b"], ["f"])


def test_syntax_error_is_raised():
    with pytest.raises(SyntaxError):
        analyze("x = (")
