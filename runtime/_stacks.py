"""Python stacks of running workers, taken without stopping them (``shoal stack``).

    requester --STACK {task | actor | node}--> control store: which workers run it
    control store --STACK_DUMP {q}--> each worker (DOWN, through its node manager)
    worker's IO thread: sys._current_frames(), formatted --STACK_DUMP {q, text}--> control
    control store --REPLY {stacks, missing}--> requester, when all answered or at the
        deadline (a worker stuck in C code holding the GIL cannot answer)

The worker's main thread (the task) keeps running: only the IO thread, which already
shares the GIL with it, does the formatting.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from typing import Any

# How long the control store waits for the workers' answers.
STACK_TIMEOUT_SECONDS = 3.0


def dump_threads(running: dict[bytes, tuple[Any, ...]]) -> str:
    """Every thread's stack in this process, the main thread first. ``running`` is the
    task event buffer's table of tasks running here (task id -> (start, _, name, ...))."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    now = time.time()
    lines = []
    for task_id, info in list(running.items()):
        lines.append(f"running {info[2]} (task {task_id.hex()}) for {now - info[0]:.1f} s\n")
    main = threading.main_thread().ident
    order = sorted(frames, key=lambda ident: (ident != main, names.get(ident, "")))
    for ident in order:
        name = names.get(ident, "?")
        if ident == me:
            lines.append(f'\nThread "{name}" (the IO thread answering this request)\n')
            continue
        lines.append(f'\nThread "{name}" (id {ident}), most recent call last:\n')
        lines.extend(
            traceback.format_list(_from_worker_main(traceback.extract_stack(frames[ident])))
        )
    del frames
    return "".join(lines)


def _from_worker_main(stack: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The stack from the worker's ``main`` on: the frames below it (the zygote that forked
    the worker, the head's start-up) are the same in every worker and say nothing."""
    for i, frame in enumerate(stack):
        if frame.name == "main" and os.path.basename(frame.filename) == "_worker.py":
            return list(stack[i:])
    return list(stack)


class _Query:
    __slots__ = ("deadline", "reply_id", "requester", "results", "waiting")

    def __init__(self, requester: bytes, reply_id: Any, waiting: dict[bytes, dict[str, Any]]):
        self.requester = requester
        self.reply_id = reply_id
        self.waiting = waiting  # worker id -> what the answer is labelled with
        self.results: list[dict[str, Any]] = []
        self.deadline = time.monotonic() + STACK_TIMEOUT_SECONDS


class StackQueries:
    """The control store's stack requests in flight. No IO: methods return the replies
    to send as (requester, body)."""

    def __init__(self) -> None:
        self.queries: dict[int, _Query] = {}
        self._ids = itertools.count(1)

    def start(
        self, requester: bytes, reply_id: Any, targets: dict[bytes, dict[str, Any]]
    ) -> tuple[int, list[tuple[bytes, dict[str, Any]]]]:
        """A new query for ``targets`` (worker id -> labels); returns its id, and the reply
        at once when there is nobody to ask."""
        qid = next(self._ids)
        query = _Query(requester, reply_id, dict(targets))
        if not targets:
            return qid, [self._reply(query)]
        self.queries[qid] = query
        return qid, []

    def answer(self, qid: int, worker: bytes, text: str) -> list[tuple[bytes, dict[str, Any]]]:
        query = self.queries.get(qid)
        if query is None or worker not in query.waiting:
            return []
        labels = query.waiting.pop(worker)
        query.results.append({**labels, "text": text})
        if query.waiting:
            return []
        del self.queries[qid]
        return [self._reply(query)]

    def expire(self, now: float | None = None) -> list[tuple[bytes, dict[str, Any]]]:
        now = time.monotonic() if now is None else now
        out = []
        for qid, query in list(self.queries.items()):
            if now >= query.deadline:
                del self.queries[qid]
                out.append(self._reply(query))
        return out

    @staticmethod
    def _reply(query: _Query) -> tuple[bytes, dict[str, Any]]:
        missing = [
            {**labels, "reason": f"no answer within {STACK_TIMEOUT_SECONDS:.0f} s"}
            for labels in query.waiting.values()
        ]
        results = sorted(query.results, key=lambda r: (r.get("node_id", ""), r.get("pid") or 0))
        return query.requester, {"r": query.reply_id, "stacks": results, "missing": missing}
