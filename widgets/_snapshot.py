"""One monitor tick's data: the snapshot, fetched through a given core, and the rate at
which tasks end, from successive snapshots. No ipywidgets here (the terminal uses it)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

REQUEST_TIMEOUT = 2.0
RATE_WINDOW_SECONDS = 3.0


def fetch_snapshot(
    core: Any, failures: int = 10, actors: int = 20, objects: int = 5
) -> dict[str, Any]:
    """``shoal.state.cluster_snapshot`` through ``core``. Unlike ``shoal.state``, it never
    starts a cluster: a monitor whose cluster was shut down must not start a new one."""
    from shoal._protocol import Message, MsgType

    body = {"kind": "snapshot", "failures": failures, "actors": actors, "objects": objects}
    reply = core.request(Message(MsgType.STATE, body), timeout=REQUEST_TIMEOUT)
    result = dict(reply.body)
    if "e" in result:
        raise ValueError(result["e"])
    result.pop("r", None)
    return result


class EndRate:
    """Tasks ended (finished, failed, cancelled) per second over the last few seconds,
    from the counts of successive snapshots (by the head's clock)."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS) -> None:
        self.window = window
        self.points: deque[tuple[float, int]] = deque()
        self.rate: float | None = None

    def note(self, snapshot: dict[str, Any]) -> float | None:
        by_state = (snapshot.get("tasks") or {}).get("by_state") or {}
        ended = sum(by_state.get(s, 0) for s in ("FINISHED", "FAILED", "CANCELLED"))
        now = float(snapshot.get("time") or time.time())
        self.points.append((now, ended))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window:
            self.points.popleft()
        first_time, first_ended = self.points[0]
        if now - first_time >= 0.5:
            self.rate = max(0.0, (ended - first_ended) / (now - first_time))
        return self.rate
