"""``excludes``: gitignore-style patterns, matched against paths relative to a package root.

- ``name`` (no slash) matches a file or directory of that name at any depth;
- ``a/b`` or ``/a`` (a slash at the start or in the middle) is anchored at the root;
- a trailing ``/`` matches directories only; ``!pattern`` re-includes what an earlier
  pattern excluded; the last pattern that matches decides;
- ``*`` and ``?`` never match ``/``; ``**/`` matches any number of directories, ``/**`` all
  that is inside; ``[abc]`` is a class.

As in git, a file inside an excluded directory cannot be re-included: an excluded
directory is not even looked into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


class Excludes:
    def __init__(self, patterns: list[str]) -> None:
        self.rules: list[_Rule] = []
        for pattern in patterns:
            rule = _compile(pattern)
            if rule is not None:
                self.rules.append(rule)

    def excluded(self, relpath: str, is_dir: bool) -> bool:
        """Whether ``relpath`` ('/'-separated, relative to the root) is excluded."""
        result = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relpath):
                result = not rule.negate
        return result


def _compile(pattern: str) -> _Rule | None:
    text = pattern.strip()
    if not text or text.startswith("#"):
        return None
    negate = text.startswith("!")
    if negate:
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    if not text:
        return None
    anchored = "/" in text
    text = text.lstrip("/")
    body = _translate(text)
    prefix = "^" if anchored else "^(?:.*/)?"
    return _Rule(re.compile(prefix + body + "$"), negate, dir_only)


def _translate(pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i) and (i + 2 == n) and (i == 0 or pattern[i - 1] == "/"):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
                continue
            inner = pattern[i + 1 : end]
            if inner[:1] in ("!", "^"):
                inner = "^" + inner[1:]
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)
